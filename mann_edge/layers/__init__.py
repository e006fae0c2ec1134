"""Keras 3 MANN layers, compatible with the original `mann`/`beyondml` layers.

Constructor arguments, config keys and weight shapes (tasks first, masks as
non-trainable weights) match the originals, and every class is registered for
serialization, so ``keras.models.load_model("m.keras")`` needs no custom_objects.
What tools need to know about a class (``masked``, ``multitask``, ``list_input``,
``block_prunable``) are class attributes beside it; see `base.LayerFacts`.

Example:
    >>> from mann_edge.layers import MultiMaskedDense, SelectorLayer
    >>> x0, x1 = keras.Input((64,)), keras.Input((30,))
    >>> h = MultiMaskedDense(32, activation="relu")([MaskedDense(32)(x0), MaskedDense(32)(x1)])
"""

from mann_edge.layers.masked import MaskedConv1D, MaskedConv2D, MaskedConv3D, MaskedDense
from mann_edge.layers.multi import (
    MultiConv1D,
    MultiConv2D,
    MultiConv3D,
    MultiDense,
    MultiMaskedConv1D,
    MultiMaskedConv2D,
    MultiMaskedConv3D,
    MultiMaskedDense,
    MultiMaxPool2D,
    MultiMaxPool3D,
)
from mann_edge.layers.routing import FilterLayer, MultitaskNormalization, SelectorLayer, SumLayer

__all__ = [
    "MaskedDense",
    "MaskedConv1D",
    "MaskedConv2D",
    "MaskedConv3D",
    "MultiMaskedDense",
    "MultiMaskedConv1D",
    "MultiMaskedConv2D",
    "MultiMaskedConv3D",
    "MultiDense",
    "MultiConv1D",
    "MultiConv2D",
    "MultiConv3D",
    "MultiMaxPool2D",
    "MultiMaxPool3D",
    "MultitaskNormalization",
    "SelectorLayer",
    "FilterLayer",
    "SumLayer",
]
