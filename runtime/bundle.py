"""The bundle backend: runs a `.mann` itself with CSR kernels, one task's ops only."""

from __future__ import annotations

import numpy as np

from mann_edge.bundle import load_compact
from mann_edge.graph.executor import Executor
from mann_edge.graph.model import CompactModel, Task
from mann_edge.runtime.kernels import kernel_backend, runtime_ops
from mann_edge.runtime.session import Session

__all__ = ["BundleSession", "PARALLEL_MIN_WORK"]

PARALLEL_MIN_WORK = 1 << 22
"""Multiply-adds per run (a task's nonzeros times the batch) from which a session with ``threads`` > 1 runs op by
op on the parallel kernels; below it, the serial compiled program. About a millisecond of serial work: the
paper-scale model at batch 1 (579,400 nonzeros, 0.2 ms) gains 20 % from a second thread when the cores are
idle, and loses 100x when another process holds one (each parallel op then waits for a descheduled thread;
measured on 2 shared cores); at batch 32 the second thread halves the time."""


class BundleSession(Session):
    """Executes a compact model's task graph with the CSR kernels; each task is prepared on first use.

    With numba, a task runs as a compiled program planned once per input shapes
    (`mann_edge.runtime.program.TaskProgram`: buffers, kernels and shapes fixed, one compiled
    call per run); a run big enough to gain from ``threads`` > 1 (`PARALLEL_MIN_WORK`) runs op by
    op on the parallel kernels instead. Without numba (or with ``MANN_EDGE_KERNELS=numpy``), op
    by op on the scipy kernels. With numba, opening a bundle starts loading the compiled
    interpreters its tasks run on a short-lived background thread (`program.preload`), whatever
    ``threads`` says: that thread loads code, it runs no task.

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
        if kernel_backend() == "numba":
            from mann_edge.runtime.program import preload

            preload(self.model)
        super().__init__(path, self.model.tasks)
        self._executors: dict[str, Executor] = {}
        self._programs: dict = {}

    def _program(self, task: Task):
        """The task's compiled program, or None when the kernels are scipy's (numba missing or switched off)."""
        if task.name not in self._programs:
            program = None
            if kernel_backend() == "numba":
                from mann_edge.runtime.program import TaskProgram

                program = TaskProgram(self.model, task.name, threads=self.threads)
            self._programs[task.name] = program
        return self._programs[task.name]

    def _run(self, task: Task, inputs):
        program = self._program(task)
        if program is not None:
            batch = next(iter(inputs.values())).shape[0] if inputs else 1
            if self.threads == 1 or program.work(batch) < PARALLEL_MIN_WORK:
                plan = program.plan({name: array.shape for name, array in inputs.items()})
                if plan is not None:  # None: its buffers would pass the memory limit; op by op below
                    return program.run(inputs, plan)
        executor = self._executors.get(task.name)
        if executor is None:
            executor = self._executors[task.name] = Executor(self.model, task.name, self.ops)
        # the kernels hand batches along transposed; callers get C-ordered arrays
        return [np.ascontiguousarray(y) for y in executor.run(inputs)]
