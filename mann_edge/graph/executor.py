"""Runs one task of a compact model, op by op, and checks what callers pass in.

`normalize_inputs` is the one place that turns a caller's inputs into the arrays
a task's specs ask for; every runtime backend uses it, so every backend refuses
the same bad input with the same message. Its rules, the same for every backend:

- float inputs: float64 and integers are cast to the spec's dtype; NaN and infinite values
  (and values too large for float32) are refused, since backends disagree on what they give
  (a ReLU turns NaN into 0 in one and keeps it in another);
- integer inputs (token ids): floats are refused, and ids outside the embedding tables that
  read them (`Task.id_limits`), or outside the spec's dtype, are refused before any cast,
  which would wrap an int64 2**32 + 1 or a uint64 2**63 into a valid id;
- an empty batch (0 examples) is refused: not every backend can run one.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from mann_edge.errors import InputError
from mann_edge.graph import plan
from mann_edge.graph.model import CompactModel, Task, TensorSpec
from mann_edge.graph.ops import OPS, bind

__all__ = ["Executor", "normalize_inputs"]


class Executor:
    """The ops of one task, bound to their weights once, run in graph order.

    ``registry`` maps op types to op classes; the reference ops by default, the
    runtime passes its fast kernels.
    """

    # input shapes already checked against `plan.MAX_TENSOR_BYTES`; a few, as callers use a few batch sizes
    _MAX_PLANS = 32

    def __init__(self, model: CompactModel, task: str, registry: Mapping | None = None):
        self.task = model.task(task)
        registry = OPS if registry is None else registry
        self.nodes = model.task_nodes(task)
        self.weights = {key: model.weights[key] for node in self.nodes for key in node.weights.values()}
        self.steps = [(node.name, node.inputs, bind(node, model.weights, registry)) for node in self.nodes]
        self._planned: dict[tuple, None] = {}

    def check(self, inputs: Mapping[str, np.ndarray]) -> None:
        """InputError naming the node when inputs of these shapes do not fit an op or would make a run
        allocate more than `plan.MAX_TENSOR_BYTES` for one tensor."""
        key = tuple((name, array.shape) for name, array in inputs.items())
        if key in self._planned:
            return
        try:
            plan.check_run(self.nodes, self.weights, {name: array.shape for name, array in inputs.items()})
        except ValueError as error:
            raise InputError(f"Task {self.task.name!r}: {error}") from None
        if len(self._planned) >= self._MAX_PLANS:
            self._planned.pop(next(iter(self._planned)))
        self._planned[key] = None

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        self.check(inputs)
        values = dict(inputs)
        for name, input_names, op in self.steps:
            values[name] = op.run(*(values[i] for i in input_names))
        return [values[tensor] for tensor in self.task.output_tensors]


def normalize_inputs(task: Task, inputs) -> dict[str, np.ndarray]:
    """The task's inputs by name, cast to their spec dtype, or an InputError naming the task and spec.

    ``inputs`` is one array (for a one-input task), a list/tuple in the task's input
    order, or a dict by input name. float64 (or integer) arrays are cast to a float
    spec; a shape that does not match the spec, or inputs of different batch sizes, are refused.
    """
    specs = task.inputs

    def expected() -> str:  # for the errors only: this runs before every inference
        return ", ".join(spec.describe() for spec in specs)

    if isinstance(inputs, Mapping):
        names = [spec.name for spec in specs]
        if set(inputs) != set(names):
            raise InputError(
                f"Task {task.name!r} takes inputs {names}. Received: {sorted(inputs)}. Expected: {expected()}"
            )
        arrays = [inputs[name] for name in names]
    elif isinstance(inputs, (list, tuple)) and (len(specs) > 1 or all(hasattr(v, "shape") for v in inputs)):
        arrays = list(inputs)
    else:  # one array, possibly as nested lists
        arrays = [inputs]
    if len(arrays) != len(specs):
        raise InputError(
            f"Task {task.name!r} takes {len(specs)} input(s). Received: {len(arrays)}. Expected: {expected()}"
        )
    checked = {spec.name: _check_array(task, spec, array) for spec, array in zip(specs, arrays)}
    batches = {name: array.shape[0] for name, array in checked.items() if array.ndim}
    empty = [name for name, batch in batches.items() if batch == 0]
    if empty:
        raise InputError(f"Task {task.name!r}: input '{empty[0]}' holds an empty batch (0 examples); "
                         f"pass at least one example")
    if len(set(batches.values())) > 1:
        sizes = ", ".join(f"'{name}': {batch}" for name, batch in batches.items())
        raise InputError(f"Task {task.name!r}: every input needs the same batch size. Received batch sizes {sizes}")
    return checked


def _check_array(task: Task, spec: TensorSpec, value) -> np.ndarray:
    def where() -> str:  # for the errors only: this runs before every inference
        return f"Task {task.name!r} input '{spec.name}' (expected {spec.describe()})"

    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as error:
        raise InputError(f"{where()}: cannot read the value as an array ({error})") from None
    if array.dtype.kind not in "biuf":
        raise InputError(f"{where()}: takes numbers. Received dtype {array.dtype}")
    if array.ndim != len(spec.shape) or any(d is not None and d != a for d, a in zip(spec.shape, array.shape)):
        hint = " (add a batch axis: x[None])" if array.shape == tuple(spec.shape[1:]) else ""
        raise InputError(f"{where()}: received shape {array.shape}{hint}")
    if spec.dtype.startswith("float"):
        if array.dtype != spec.dtype:
            with np.errstate(over="ignore"):  # an overflow becomes inf, refused just below
                array = array.astype(spec.dtype)
        # checked after the cast, which turns float64 values beyond float32 into inf
        if array.dtype.kind == "f" and array.size and not np.isfinite(array).all():
            bad = int(np.count_nonzero(~np.isfinite(array)))
            raise InputError(f"{where()}: holds {bad} NaN or infinite value(s) (or values too large for {spec.dtype}); "
                             "inputs must be finite")
    elif array.dtype.kind == "f":
        raise InputError(f"{where()}: takes integer ids. Received dtype {array.dtype}")
    else:
        _check_ids(where(), array, spec.dtype, task.id_limits.get(spec.name))
        array = array.astype(spec.dtype, copy=False)
    return np.ascontiguousarray(array)


def _check_ids(where: str, ids: np.ndarray, dtype: str, rows: int | None) -> None:
    """InputError unless every id is in ``[0, rows)`` (the smallest table reading them), or fits ``dtype`` when
    no table reads them; checked on the caller's values, before a cast could wrap one into range."""
    if not ids.size:
        return
    low, high = int(ids.min()), int(ids.max())  # Python ints: no wrap-around in the comparison
    if rows is not None:
        if low < 0 or high >= rows:
            raise InputError(f"{where}: ids must be in [0, {rows}) (the rows of the embedding table reading them). "
                             f"Received: min {low}, max {high}")
        return
    info = np.iinfo(dtype)
    if low < info.min or high > info.max:
        raise InputError(f"{where}: values must fit {dtype} [{info.min}, {info.max}]. Received: min {low}, max {high}")
