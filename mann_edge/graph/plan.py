"""Checking a compact model's shapes against its ops, and what a run of it may allocate.

A bundle comes from a file someone else wrote, and the runtime's compiled kernels read
their arrays without bounds checks. So before anything runs, `check_model` walks the graph
once with each op's shape rule (`mann_edge.graph.ops.Op.infer`): every weight must fit its
op (a bias as long as the kernel has outputs, a kernel as wide as its input, a window that
fits its input), every node's declared shape and every task output must be what its op
gives, and no tensor or temporary array of a one-example run may exceed `MAX_TENSOR_BYTES`.
Each `Executor` then checks the concrete shapes of every new input batch the same way
(`check_run`) before running, so a batch cannot make a run allocate more than that either.

Example:
    >>> check_model(load_compact("model.mann"))          # what `load_compact` does
    >>> shapes = check_run(model.task_nodes("digits"), model.weights, {"digits_in": (32, 64)})
    >>> shapes["digits"]
    (32, 10)
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from mann_edge.graph.model import CompactModel, Node
from mann_edge.graph.ops import OPS, Shape

__all__ = ["MAX_TENSOR_BYTES", "check_model", "check_run", "infer_shapes", "describe_bytes"]

# The most one tensor or temporary array of a run may take. Far above what an edge model needs
# (a 224x224x64 float32 activation is 13 MB), and a bound on what a crafted file can make a
# process allocate: a window of 1e6 x 1e6 cells asks for terabytes and is refused here.
MAX_TENSOR_BYTES = 1 << 30


def describe_bytes(size: int) -> str:
    """``size`` bytes in a unit people read ('3.2 GiB').

    Example:
        >>> describe_bytes(3 * 2**40)
        '3.0 TiB'
    """
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} bytes"  # pragma: no cover


def _nbytes(shape: Shape, itemsize: int) -> int | None:
    if any(d is None for d in shape):
        return None
    total = itemsize
    for d in shape:
        total *= d
    return total


def infer_shapes(nodes: Iterable[Node], weights: Mapping, shapes: Mapping[str, Shape], *,
                 limit: int | None = None) -> dict[str, Shape]:
    """Every tensor's shape, from the graph inputs' ``shapes`` through ``nodes`` (in graph order).

    Raises:
        ValueError: naming the op and node whose inputs, weights or attributes do not fit, or
            (with ``limit``) whose output or a temporary array would take more than ``limit`` bytes.
    """
    known = dict(shapes)
    for node in nodes:
        op = OPS[node.op]
        where = f"Op {node.op} (node '{node.name}')"
        attrs = op.check(node)
        inputs = [known[name] for name in node.inputs]
        node_weights = {role: weights[key] for role, key in node.weights.items()}
        try:
            shape = tuple(op.infer(attrs, inputs, node_weights))
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        if limit is not None:
            itemsize = np.dtype(node.dtype).itemsize if node.dtype in ("float16", "float32", "int32", "int64") else 8
            sizes = {"its output": _nbytes(shape, max(itemsize, 4)), **op.temporaries(attrs, inputs, shape, node_weights)}
            for what, size in sizes.items():
                if size is not None and size > limit:
                    inputs_text = ", ".join(str(tuple(s)) for s in inputs)
                    raise ValueError(f"{where}: {what} for inputs of shape {inputs_text} would take "
                                     f"{describe_bytes(size)}, more than the {describe_bytes(limit)} a run may allocate")
        known[node.name] = shape
    return known


def _compatible(declared: Shape, inferred: Shape) -> bool:
    return len(declared) == len(inferred) and all(a is None or b is None or a == b for a, b in zip(declared, inferred))


def _shape_text(shape: Shape) -> str:
    return "[" + ", ".join("None" if d is None else str(d) for d in shape) + "]"


def check_model(model: CompactModel) -> None:
    """ValueError unless every node of ``model`` fits its op, its declared shape and `MAX_TENSOR_BYTES` for one example.

    The batch (a None first size of an input) is taken as 1 for the byte bound; other
    unknown sizes are bounded when a run gives them (`check_run`).
    """
    one = {spec.name: tuple(1 if i == 0 and d is None else d for i, d in enumerate(spec.shape)) for spec in model.inputs}
    shapes = infer_shapes(model.nodes, model.weights, one, limit=MAX_TENSOR_BYTES)
    for spec in model.inputs:
        size = _nbytes(one[spec.name], np.dtype(spec.dtype).itemsize)
        if size is not None and size > MAX_TENSOR_BYTES:
            raise ValueError(f"input '{spec.name}' of shape {_shape_text(spec.shape)} would take {describe_bytes(size)} "
                             f"per example, more than the {describe_bytes(MAX_TENSOR_BYTES)} a run may allocate")
    for node in model.nodes:
        if not _compatible(node.shape, shapes[node.name]):
            raise ValueError(f"Op {node.op} (node '{node.name}') declares shape {_shape_text(node.shape)}, but its "
                             f"inputs and weights give {_shape_text(shapes[node.name])}")
    for task in model.tasks:
        for spec, tensor in zip(task.outputs, task.output_tensors):
            if not _compatible(spec.shape, shapes[tensor]):
                raise ValueError(f"task '{task.name}' output '{spec.name}' declares shape {_shape_text(spec.shape)}, "
                                 f"but tensor '{tensor}' has shape {_shape_text(shapes[tensor])}")


def check_run(nodes: Iterable[Node], weights: Mapping, input_shapes: Mapping[str, Shape]) -> dict[str, Shape]:
    """The shapes a run on inputs of ``input_shapes`` gives; ValueError naming the node if one does not fit or
    would allocate more than `MAX_TENSOR_BYTES`."""
    return infer_shapes(nodes, weights, input_shapes, limit=MAX_TENSOR_BYTES)
