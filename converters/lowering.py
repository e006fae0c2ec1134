"""What every format's lowering shares: its two tables, the check that each node has a lowering, the bitmask encoding.

Each format lowers the compact graph with two `mann_edge.registry.Registry` tables made by
`lowering_tables`: one entry per compact op, one per activation, registered beside their
functions (``@LOWERINGS.register("dense")``). An op or activation a table lacks is refused
before any conversion work, with one message shape for every format:
"ONNX export cannot lower op 'fft' (node 'mystery'). Supported ops: [...]".

Example:
    >>> LOWERINGS, ACTIVATION_LOWERINGS = lowering_tables("ONNX export")
    >>> check_nodes(cm.nodes, LOWERINGS, ACTIVATION_LOWERINGS)   # silent when every node can be lowered
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from mann_edge.errors import ConversionError, FormatCannotExpressError
from mann_edge.graph.activations import normalize_activation
from mann_edge.graph.model import Node
from mann_edge.registry import Registry

__all__ = ["lowering_tables", "check_nodes", "split_activation", "encode_bitmask", "bitmask_nbytes"]


def lowering_tables(owner: str) -> tuple[Registry, Registry]:
    """(op lowerings, activation lowerings) of one format; ``owner`` (e.g. "ONNX export") names it in errors.

    Example:
        >>> LOWERINGS, ACTIVATION_LOWERINGS = lowering_tables("Core ML export")
        >>> @LOWERINGS.register("flatten")
        ... def _flatten(builder, node, inputs): ...
    """
    return (
        Registry("op", owner=owner, verb="lower", error=FormatCannotExpressError),
        Registry("activation", owner=owner, verb="lower", error=FormatCannotExpressError),
    )


def check_nodes(nodes: Iterable[Node], lowerings: Registry, activation_lowerings: Registry) -> None:
    """Raises ConversionError naming the first node whose op or activation has no entry in the tables.

    Checked before any conversion work, so a model the format cannot hold fails at once and
    says what the format supports.

    Example:
        >>> check_nodes(cm.nodes, LOWERINGS, ACTIVATION_LOWERINGS)
    """
    for node in nodes:
        layer = node.attrs.get("layer")
        where = f"node '{node.name}'" + (f" of layer '{layer}'" if layer else "")
        lowerings.lookup(node.op, context=where)
        if "activation" in node.attrs:
            try:
                name, _ = split_activation(node.attrs["activation"])
            except ValueError as error:
                raise ConversionError(f"{lowerings.owner}: {where}: {error}") from None
            activation_lowerings.lookup(name, context=where)


def split_activation(activation: Any) -> tuple[str, dict]:
    """(name, parameters) of an activation given as a name or ``{"name": ..., **params}`` (None: linear).

    Example:
        >>> split_activation({"name": "relu", "max_value": 6.0})
        ('relu', {'max_value': 6.0})
    """
    spec = normalize_activation(activation)
    return spec["name"], {key: value for key, value in spec.items() if key != "name"}


# -- the bitmask weight encoding (ONNX's expansion and Core ML's constexpr_sparse_to_dense read it alike) --


def encode_bitmask(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask, values): the nonzero pattern as packed bits (uint8, little-endian bit order) and the nonzeros.

    Bit ``j`` of byte ``i`` says whether element ``8 * i + j`` of the flattened (row-major)
    array is nonzero; ``values`` holds those elements in order.

    Example:
        >>> mask, values = encode_bitmask(np.array([[0, 2.0], [0, 0], [1.5, 0]], "float32"))
        >>> mask, values
        (array([18], dtype=uint8), array([2. , 1.5], dtype=float32))
    """
    flat = np.ascontiguousarray(array).reshape(-1)
    present = flat != 0
    return np.packbits(present, bitorder="little"), flat[present]


def bitmask_nbytes(array: np.ndarray) -> int:
    """The bytes of ``array``'s bitmask encoding: ``ceil(n / 8) + nnz * itemsize``, before any per-format overhead.

    Example:
        >>> bitmask_nbytes(np.eye(4, dtype="float32"))
        18
    """
    return -(-array.size // 8) + int(np.count_nonzero(array)) * array.dtype.itemsize
