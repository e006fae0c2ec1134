"""The compact model: a DAG of single-task ops with CSR weights, and its tasks.

Numpy only: the runtime and every converter read this.

Tensors are named: a graph input by its spec's name, a node's output by the
node's name. A task is its input specs, its output specs and the ancestors of
its outputs; running a task touches nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from mann_edge.errors import TaskError
from mann_edge.sparse import CSRWeight, weight_nbytes, weight_nnz

__all__ = ["TensorSpec", "Node", "Task", "CompactModel", "find_task", "embedding_rows", "with_id_limits"]

DTYPES = ("float32", "float16", "int32", "int64")


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (``None`` where any size goes, the batch first) and dtype of a tensor."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(None if d is None else int(d) for d in self.shape))

    def describe(self) -> str:
        dims = ", ".join("None" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: Mapping) -> "TensorSpec":
        return cls(data["name"], tuple(data["shape"]), data["dtype"])


@dataclass(frozen=True)
class Node:
    """One single-task op: ``op`` reads ``inputs`` (tensor names) and ``weights`` (role -> weight key).

    ``shape``/``dtype`` describe its one output tensor, which is named ``name``.
    """

    name: str
    op: str
    inputs: tuple[str, ...]
    weights: Mapping[str, str] = field(default_factory=dict)
    attrs: Mapping = field(default_factory=dict)
    shape: tuple[int | None, ...] = ()
    dtype: str = "float32"

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "op": self.op,
            "inputs": list(self.inputs),
            "weights": dict(self.weights),
            "attrs": dict(self.attrs),
            "shape": list(self.shape),
            "dtype": self.dtype,
        }

    @classmethod
    def from_json(cls, data: Mapping) -> "Node":
        return cls(
            name=data["name"],
            op=data["op"],
            inputs=tuple(data["inputs"]),
            weights=dict(data["weights"]),
            attrs=dict(data["attrs"]),
            shape=tuple(None if d is None else int(d) for d in data["shape"]),
            dtype=data["dtype"],
        )


@dataclass(frozen=True)
class Task:
    """A task: the graph inputs it reads, its outputs and the tensors that hold them.

    ``labels`` optionally names the classes of an output (output name -> class names).
    ``id_limits`` maps an integer input read by embedding tables to the rows of the smallest
    of them: ids must be below it (derived from the graph, see `with_id_limits`; not stored).
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    output_tensors: tuple[str, ...]
    labels: Mapping[str, Sequence[str]] = field(default_factory=dict)
    id_limits: Mapping[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "inputs": [spec.name for spec in self.inputs],
            "outputs": [
                {**spec.to_json(), "tensor": tensor} for spec, tensor in zip(self.outputs, self.output_tensors)
            ],
            "labels": {k: list(v) for k, v in self.labels.items()},
        }


class CompactModel:
    """Per-task graph of single-task ops with CSR weights; what every export starts from.

    Example:
        >>> cm = mann_edge.compact(keras_model, task_names=["digits", "cancer"])
        >>> [t.name for t in cm.tasks]
        ['digits', 'cancer']
        >>> y = cm.run("digits", x)[0]           # numpy reference executor
        >>> cm.save("model.mann")
    """

    def __init__(
        self,
        inputs: Sequence[TensorSpec],
        nodes: Sequence[Node],
        tasks: Sequence[Task],
        weights: Mapping[str, "np.ndarray | CSRWeight"],
        provenance: Mapping | None = None,
    ):
        self.inputs = tuple(inputs)
        self.nodes = tuple(nodes)
        self.weights = dict(weights)
        self.tasks = with_id_limits(tasks, embedding_rows(self.nodes, lambda key: tuple(self.weights[key].shape)))
        self.provenance = dict(provenance or {})
        self._nodes_by_name = {node.name: node for node in self.nodes}
        self._executors: dict[str, object] = {}

    # -- structure -------------------------------------------------------------------------------

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    def task(self, name: str) -> Task:
        """The task called ``name``, or a TaskError listing the tasks there are."""
        return find_task(self.tasks, name, "this model")

    def node(self, name: str) -> Node:
        return self._nodes_by_name[name]

    def ancestors(self, tensors: Iterable[str]) -> set[str]:
        """Names of the nodes and graph inputs the given tensors are computed from (themselves included)."""
        seen: set[str] = set()
        stack = list(tensors)
        while stack:
            tensor = stack.pop()
            if tensor in seen:
                continue
            seen.add(tensor)
            if tensor in self._nodes_by_name:
                stack.extend(self._nodes_by_name[tensor].inputs)
        return seen

    def task_nodes(self, name: str) -> list[Node]:
        """The nodes task ``name`` runs, in graph order: the ancestors of its outputs."""
        needed = self.ancestors(self.task(name).output_tensors)
        return [node for node in self.nodes if node.name in needed]

    def task_weight_keys(self, name: str) -> list[str]:
        keys: list[str] = []
        for node in self.task_nodes(name):
            keys.extend(k for k in node.weights.values() if k not in keys)
        return keys

    def select_tasks(self, names: Iterable[str]) -> "CompactModel":
        """A model with only the named tasks (in the order given) and what they need."""
        tasks = [self.task(name) for name in names]
        if not tasks:
            raise TaskError(f"Select at least one task. This model's tasks: {self.task_names}")
        needed = {node.name for task in tasks for node in self.task_nodes(task.name)}
        nodes = [node for node in self.nodes if node.name in needed]
        used_inputs = {spec.name for task in tasks for spec in task.inputs}
        weights = {k: self.weights[k] for node in nodes for k in node.weights.values()}
        return CompactModel(
            [spec for spec in self.inputs if spec.name in used_inputs], nodes, tasks, weights, self.provenance
        )

    def astype(self, dtype: str) -> "CompactModel":
        """The same model with float weight values stored as ``dtype`` ('float32' or 'float16')."""
        weights = {
            key: w.astype(dtype) if isinstance(w, CSRWeight) or np.issubdtype(w.dtype, np.floating) else w
            for key, w in self.weights.items()
        }
        return CompactModel(self.inputs, self.nodes, self.tasks, weights, self.provenance)

    def with_provenance(self, **items) -> "CompactModel":
        return CompactModel(self.inputs, self.nodes, self.tasks, self.weights, {**self.provenance, **items})

    def dense_weight(self, key: str) -> np.ndarray:
        weight = self.weights[key]
        return weight.to_dense() if isinstance(weight, CSRWeight) else weight

    # -- figures ---------------------------------------------------------------------------------

    def node_stats(self) -> list[dict]:
        """Per node: dense parameter count, nonzeros and stored bytes of its weights."""
        rows = []
        for node in self.nodes:
            weights = [self.weights[k] for k in node.weights.values()]
            rows.append(
                {
                    "node": node.name,
                    "op": node.op,
                    "params": sum(math.prod(_shape(w)) for w in weights),
                    "nonzeros": sum(weight_nnz(w) for w in weights),
                    "bytes": sum(weight_nbytes(w) for w in weights),
                    "dense_bytes": sum(math.prod(_shape(w)) * 4 for w in weights),
                }
            )
        return rows

    def task_stats(self) -> list[dict]:
        """Per task: what its subnetwork costs (dense parameters, nonzeros, stored bytes, float32 dense bytes)."""
        by_node = {row["node"]: row for row in self.node_stats()}
        rows = []
        for task in self.tasks:
            nodes = [by_node[node.name] for node in self.task_nodes(task.name)]
            params = sum(r["params"] for r in nodes)
            nonzeros = sum(r["nonzeros"] for r in nodes)
            rows.append(
                {
                    "task": task.name,
                    "params": params,
                    "nonzeros": nonzeros,
                    "density": nonzeros / params if params else 1.0,
                    "bytes": sum(r["bytes"] for r in nodes),
                    "dense_bytes": sum(r["dense_bytes"] for r in nodes),
                }
            )
        return rows

    # -- execution and files ---------------------------------------------------------------------

    def run(self, task: str, inputs) -> list[np.ndarray]:
        """Runs one task with the numpy reference ops; returns its outputs in order.

        ``inputs``: one array, or a list (task input order) or dict (by input name).
        """
        from mann_edge.graph.executor import Executor, normalize_inputs

        if task not in self._executors:
            self._executors[task] = Executor(self, task)
        return self._executors[task].run(normalize_inputs(self.task(task), inputs))

    def save(self, path, *, force: bool = False) -> "str":
        """Writes the `.mann` bundle (zip of manifest JSON + safetensors) atomically; returns the path."""
        from mann_edge.bundle import save_compact

        return save_compact(self, path, force=force)

    def __repr__(self) -> str:
        tasks = ", ".join(self.task_names)
        return f"CompactModel(tasks=[{tasks}], nodes={len(self.nodes)}, weights={len(self.weights)})"


def _shape(weight) -> tuple[int, ...]:
    return tuple(weight.shape)


def embedding_rows(nodes: Iterable[Node], weight_shape: Callable[[str], tuple]) -> dict[str, int]:
    """Tensor name -> rows of the smallest embedding table that reads it (the ids it may hold).

    ``weight_shape(key)`` gives a weight's shape (from the weights, or from a manifest's entries).
    """
    rows: dict[str, int] = {}
    for node in nodes:
        if node.op == "embedding" and node.inputs and "table" in node.weights:
            shape = weight_shape(node.weights["table"])
            if shape:
                rows[node.inputs[0]] = min(rows.get(node.inputs[0], shape[0]), shape[0])
    return rows


def with_id_limits(tasks: Iterable[Task], rows: Mapping[str, int]) -> tuple[Task, ...]:
    """``tasks`` with their `Task.id_limits` set from `embedding_rows`."""
    return tuple(replace(task, id_limits={spec.name: rows[spec.name] for spec in task.inputs if spec.name in rows})
                 for task in tasks)


def find_task(tasks: Sequence[Task], name: str, where: str) -> Task:
    """The task called ``name`` among ``tasks``, or a TaskError naming ``where`` and the tasks there are.

    Example:
        >>> find_task(model.tasks, "nope", "model.mann")
        Traceback (most recent call last):
        TaskError: Unknown task 'nope' in model.mann. Tasks: ['digits', 'cancer']
    """
    for task in tasks:
        if task.name == name:
            return task
    raise TaskError(f"Unknown task {name!r} in {where}. Tasks: {[task.name for task in tasks]}")
