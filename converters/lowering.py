"""What every format's lowering table shares: the check that each node of a model has a lowering."""

from __future__ import annotations

from typing import Iterable, Mapping

from mann_edge.errors import ConversionError
from mann_edge.graph.activations import normalize_activation
from mann_edge.graph.model import Node

__all__ = ["check_nodes"]


def check_nodes(format: str, nodes: Iterable[Node], lowerings: Mapping, activation_lowerings: Mapping) -> None:
    """Raises ConversionError naming the first node whose op or activation ``format`` cannot lower.

    Checked before any conversion work, so a model the format cannot hold fails at once and
    says what the format supports.

    Example:
        >>> check_nodes("ONNX", cm.nodes, LOWERINGS, ACTIVATION_LOWERINGS)   # silent when all can be lowered
    """
    for node in nodes:
        if node.op not in lowerings:
            raise ConversionError(
                f"{format} export cannot lower op type {node.op!r} (node '{node.name}'). Supported ops: {sorted(lowerings)}"
            )
        if "activation" in node.attrs:
            try:
                name = normalize_activation(node.attrs["activation"])["name"]
            except ValueError as error:
                raise ConversionError(f"{format} export: node '{node.name}': {error}") from None
            if name not in activation_lowerings:
                raise ConversionError(
                    f"{format} export cannot lower activation {name!r} (node '{node.name}'). "
                    f"Supported activations: {sorted(activation_lowerings)}"
                )
