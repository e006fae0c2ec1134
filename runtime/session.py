"""What every runtime backend shares: the tasks, the input checks and `run`."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from mann_edge.graph.executor import normalize_inputs
from mann_edge.graph.model import Task, find_task

__all__ = ["Session"]


class Session:
    """A loaded model: its tasks (names, input and output specs) and `run`, which executes only one task.

    Backends implement ``_run(task, inputs)`` with inputs already checked against the
    task's specs (cast to their dtypes, shapes verified) and keyed by input name.

    Example:
        >>> sess = mann_edge.runtime.load("model.mann")
        >>> [t.name for t in sess.tasks]
        ['digits', 'cancer']
        >>> probabilities = sess.run("digits", x)[0]
    """

    backend = "?"

    def __init__(self, path, tasks: Sequence[Task]):
        self.path = Path(path)
        self.tasks = list(tasks)

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    def task(self, name: str) -> Task:
        """The task called ``name``, or a TaskError listing the tasks there are."""
        return find_task(self.tasks, name, str(self.path))

    def run(self, task: str, inputs) -> list[np.ndarray]:
        """Runs one task; returns its outputs in order (a list of arrays).

        ``inputs``: one array, or a list (task input order) or dict (by input name).
        """
        spec = self.task(task)
        return self._run(spec, normalize_inputs(spec, inputs))

    def _run(self, task: Task, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, backend={self.backend!r}, tasks={self.task_names})"
