"""The bundle backend: runs a `.mann` itself with CSR kernels, one task's ops only."""

from __future__ import annotations

from mann_edge.bundle import load_compact
from mann_edge.graph.executor import Executor
from mann_edge.graph.model import CompactModel, Task
from mann_edge.runtime.kernels import RUNTIME_OPS
from mann_edge.runtime.session import Session

__all__ = ["BundleSession"]


class BundleSession(Session):
    """Executes a compact model's task graph in numpy/scipy; each task's ops are bound on first use."""

    backend = "bundle"

    def __init__(self, path, model: CompactModel | None = None):
        self.model = load_compact(path) if model is None else model
        super().__init__(path, self.model.tasks)
        self._executors: dict[str, Executor] = {}

    def _run(self, task: Task, inputs):
        executor = self._executors.get(task.name)
        if executor is None:
            executor = self._executors[task.name] = Executor(self.model, task.name, RUNTIME_OPS)
        return executor.run(inputs)
