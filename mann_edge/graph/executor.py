"""Runs one task of a compact model, op by op, and checks what callers pass in.

`normalize_inputs` is the one place that turns a caller's inputs into the arrays
a task's specs ask for; every runtime backend uses it, so every backend refuses
the same bad input with the same message.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from mann_edge.errors import InputError
from mann_edge.graph.model import CompactModel, Task, TensorSpec
from mann_edge.graph.ops import OPS, bind

__all__ = ["Executor", "normalize_inputs"]


class Executor:
    """The ops of one task, bound to their weights once, run in graph order.

    ``registry`` maps op types to op classes; the reference ops by default, the
    runtime passes its fast kernels.
    """

    def __init__(self, model: CompactModel, task: str, registry: Mapping | None = None):
        self.task = model.task(task)
        registry = OPS if registry is None else registry
        self.steps = [(node.name, node.inputs, bind(node, model.weights, registry)) for node in model.task_nodes(task)]

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
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
    expected = ", ".join(spec.describe() for spec in specs)
    if isinstance(inputs, Mapping):
        names = [spec.name for spec in specs]
        if set(inputs) != set(names):
            raise InputError(
                f"Task {task.name!r} takes inputs {names}. Received: {sorted(inputs)}. Expected: {expected}"
            )
        arrays = [inputs[name] for name in names]
    elif isinstance(inputs, (list, tuple)) and (len(specs) > 1 or all(hasattr(v, "shape") for v in inputs)):
        arrays = list(inputs)
    else:  # one array, possibly as nested lists
        arrays = [inputs]
    if len(arrays) != len(specs):
        raise InputError(
            f"Task {task.name!r} takes {len(specs)} input(s). Received: {len(arrays)}. Expected: {expected}"
        )
    checked = {spec.name: _check_array(task, spec, array) for spec, array in zip(specs, arrays)}
    batches = {name: array.shape[0] for name, array in checked.items() if array.ndim}
    if len(set(batches.values())) > 1:
        sizes = ", ".join(f"'{name}': {batch}" for name, batch in batches.items())
        raise InputError(f"Task {task.name!r}: every input needs the same batch size. Received batch sizes {sizes}")
    return checked


def _check_array(task: Task, spec: TensorSpec, value) -> np.ndarray:
    where = f"Task {task.name!r} input '{spec.name}' (expected {spec.describe()})"
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as error:
        raise InputError(f"{where}: cannot read the value as an array ({error})") from None
    if array.dtype.kind not in "biuf":
        raise InputError(f"{where}: takes numbers. Received dtype {array.dtype}")
    if spec.dtype.startswith("float"):
        array = array.astype(spec.dtype, copy=False)
    elif array.dtype.kind == "f":
        raise InputError(f"{where}: takes integer ids. Received dtype {array.dtype}")
    else:
        array = array.astype(spec.dtype, copy=False)
    if array.ndim != len(spec.shape) or any(d is not None and d != a for d, a in zip(spec.shape, array.shape)):
        hint = " (add a batch axis: x[None])" if array.shape == tuple(spec.shape[1:]) else ""
        raise InputError(f"{where}: received shape {array.shape}{hint}")
    return np.ascontiguousarray(array)
