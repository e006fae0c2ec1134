"""The bundle backend: runs a `.mann` itself with CSR kernels, one task's ops only."""

from __future__ import annotations

import numpy as np

from mann_edge.bundle import load_compact
from mann_edge.graph.executor import Executor
from mann_edge.graph.model import CompactModel, Task
from mann_edge.runtime.kernels import runtime_ops
from mann_edge.runtime.session import Session

__all__ = ["BundleSession"]


class BundleSession(Session):
    """Executes a compact model's task graph with the CSR kernels; each task's ops are bound on first use.

    Args:
        path: the `.mann` bundle (zip or directory).
        model: the already-loaded compact model (then ``path`` only names it).
        threads: threads the CSR kernels use (1: serial; None: all cores). The kernels are
            compiled (numba) when numba is installed, scipy otherwise (see runtime/kernels.py).

    Example:
        >>> sess = BundleSession("model.mann", threads=1)
        >>> sess.run("digits", x)[0].shape
        (1, 10)
    """

    backend = "bundle"

    def __init__(self, path, model: CompactModel | None = None, threads: int | None = None):
        self.ops = runtime_ops(threads)
        self.threads = threads
        self.model = load_compact(path) if model is None else model
        super().__init__(path, self.model.tasks)
        self._executors: dict[str, Executor] = {}

    def _run(self, task: Task, inputs):
        executor = self._executors.get(task.name)
        if executor is None:
            executor = self._executors[task.name] = Executor(self.model, task.name, self.ops)
        # the kernels hand batches along transposed; callers get C-ordered arrays
        return [np.ascontiguousarray(y) for y in executor.run(inputs)]
