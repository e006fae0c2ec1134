"""Compaction: a Keras model of MANN layers -> the compact model (per-task ops, CSR weights).

Each layer is lowered by one small function registered for its class. A
multitask layer becomes one op per branch (branch ``i`` reads slab ``i`` with
its mask applied); routing layers (`SelectorLayer`, on `FilterLayer`,
`Dropout`...) become wiring; a batch normalisation is folded into the dense or
conv op before it when nothing else reads that op. Weights are stored as CSR
where that is smaller. Every node records where it came from in its attributes:
``attrs["layer"]`` (the Keras layer's name) and, for a branch of a multitask
layer, ``attrs["slab"]`` (its slab index); tools read those, never node names.

Example:
    >>> cm = compact(model, task_names=["digits", "cancer"])
    >>> cm.task_stats()[0]["nonzeros"]
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from typing import Sequence

import keras
import numpy as np

from mann_edge import layers as mann_layers
from mann_edge._version import __version__
from mann_edge.errors import CompactionError
from mann_edge.files import build_time
from mann_edge.graph.activations import ACTIVATIONS, normalize_activation
from mann_edge.graph.model import CompactModel, Node, Task, TensorSpec
from mann_edge.registry import Registry
from mann_edge.sparse import encode_weight

__all__ = ["compact", "check_compactable", "MaskOverlapWarning", "mask_overlaps", "task_usage", "TaskUsage"]


class MaskOverlapWarning(UserWarning):
    """Two tasks' masks in one multitask layer share positions (RSN2 with exclusive=False?).

    Also raised, as a report only, for shared bias positions (see `mask_overlaps`).
    """


# -- the lowering table --------------------------------------------------------------------------

# Layer class -> its lowering, by exact class: a subclass may compute something else.
LOWERINGS = Registry("layer type", owner="mann-edge", verb="compact", error=CompactionError)


def lowers(*classes: type, ops: tuple[str, ...]):
    """Registers a lowering for ``classes`` in `LOWERINGS`, naming every compact op it may emit.

    The ops are what the README's layer table and `mann_edge.coverage` read to say which
    formats take a layer; `_Builder.add` refuses an op a lowering did not name, so the
    table cannot drift from what compaction does.

    Example:
        >>> @lowers(keras.layers.Flatten, ops=("flatten",))
        ... def _flatten(b, layer, inputs, outputs, name): ...
    """
    def register(function):
        function.ops = tuple(ops)
        return LOWERINGS.register(*classes)(function)

    return register


class _Builder:
    """Collects nodes and weights while layers are lowered.

    ``layer`` names the Keras layer being lowered; every node added records it. ``call`` is
    the Keras call (node) being lowered, for lowerings that read call arguments
    (``use_causal_mask``). ``shapes`` holds every tensor's shape so far (`shape`).
    """

    def __init__(self):
        self.nodes: list[Node] = []
        self.weights: dict[str, object] = {}
        self.layer: str | None = None
        self.ops: tuple[str, ...] = ()  # what the lowering being run declared (`lowers`)
        self.call = None
        self.shapes: dict[str, tuple] = {}

    def shape(self, tensor: str) -> tuple:
        """The shape of ``tensor`` (a graph input or a node added so far), batch None."""
        return self.shapes[tensor]

    def add(self, name, op, inputs, out, weights=None, attrs=None, layouts=None, slab=None) -> str:
        """Adds a node; ``weights`` maps roles to dense arrays, stored as CSR where smaller.

        ``slab``: the slab index when the node is branch ``slab`` of a multitask layer.
        """
        if op not in self.ops:
            raise CompactionError(f"The lowering of layer '{self.layer}' emitted op {op!r}, which it does not declare "
                                  f"(ops={self.ops}): a mann-edge bug, please report it")
        roles = {}
        for role, array in (weights or {}).items():
            if array is None:
                continue
            array = np.asarray(array)
            if array.dtype.kind == "f":
                array = array.astype(np.float32)
                if not np.all(np.isfinite(array)):
                    raise CompactionError(f"Layer weight '{name}/{role}' holds NaN or infinite values; refusing to compact it")
            key = f"{name}/{role}"
            self.weights[key] = encode_weight(array, (layouts or {}).get(role, "rows"))
            roles[role] = key
        attrs = dict(attrs or {})
        shape = _activated_shape(tuple(out.shape), attrs.get("activation"))
        self.shapes[name] = shape
        # Where the node came from, for plots and reports: recorded now, never parsed back from its name.
        attrs["layer"] = self.layer
        if slab is not None:
            attrs["slab"] = int(slab)
        self.nodes.append(Node(name, op, tuple(inputs), roles, attrs, shape, _dtype_name(out.dtype)))
        return name


def _activated_shape(shape: tuple, activation: dict | None) -> tuple:
    """Keras's symbolic shape of a layer ignores its activation; glu halves its axis."""
    if not activation or activation["name"] != "glu" or shape[activation["axis"]] is None:
        return shape
    axis = activation["axis"] % len(shape)
    return shape[:axis] + (shape[axis] // 2,) + shape[axis + 1:]


def _dtype_name(dtype) -> str:
    # The compact model computes in float32 whatever the Keras dtype (a float16 model's weights are
    # widened exactly), so its floating tensors are float32; the export's --dtype picks storage.
    name = keras.backend.standardize_dtype(dtype)
    return "float32" if name in ("float16", "bfloat16", "float64") else name


def _numpy(variable) -> np.ndarray | None:
    return None if variable is None else keras.ops.convert_to_numpy(variable)


def _activation(layer, function=None) -> dict:
    """The activation of ``layer`` as a graph attribute, or a CompactionError for a custom function."""
    function = layer.activation if function is None else function
    name = keras.activations.serialize(function)
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise CompactionError(
            f"Layer '{layer.name}' ({type(layer).__name__}) uses activation {name!r}, which mann-edge cannot "
            f"compact. Supported: {sorted(ACTIVATIONS)}"
        )
    return normalize_activation(name)


def _require_channels_last(layer):
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise CompactionError(
            f"Layer '{layer.name}' ({type(layer).__name__}) uses data_format={layer.data_format!r}; "
            "mann-edge compacts channels_last models only"
        )


KERNEL_LAYOUT = {"kernel": "oi"}


def _kernel_and_bias(layer) -> tuple[np.ndarray, np.ndarray | None]:
    """The kernel and bias as the layer applies them: masked for a MANN layer, as stored for a Keras one."""
    if getattr(layer, "masked", False):
        return _numpy(layer.masked_kernel()), _numpy(layer.masked_bias())
    return _numpy(layer.kernel), _numpy(layer.bias)


@lowers(mann_layers.MaskedDense, keras.layers.Dense, ops=("dense",))
def _dense(b, layer, inputs, outputs, name):
    if getattr(layer, "quantization_mode", None):
        raise CompactionError(f"Layer '{layer.name}' is quantized ({layer.quantization_mode}); compact the float model")
    kernel, bias = _kernel_and_bias(layer)
    attrs = {"activation": _activation(layer)}
    return [b.add(name, "dense", inputs, outputs[0], {"kernel": kernel, "bias": bias}, attrs, KERNEL_LAYOUT)]


@lowers(mann_layers.MultiDense, mann_layers.MultiMaskedDense, ops=("dense",))
def _multi_dense(b, layer, inputs, outputs, name):
    kernel, bias = _numpy(layer.masked_kernel()), _numpy(layer.masked_bias())
    attrs = {"activation": _activation(layer)}
    return [
        b.add(f"{name}[{i}]", "dense", [x], out, {"kernel": kernel[i], "bias": None if bias is None else bias[i]},
              attrs, KERNEL_LAYOUT, slab=i)
        for i, (x, out) in enumerate(zip(inputs, outputs))
    ]


def _conv_attrs(layer) -> dict:
    _require_channels_last(layer)
    if getattr(layer, "groups", 1) != 1:
        raise CompactionError(f"Layer '{layer.name}' uses groups={layer.groups}; mann-edge compacts groups=1 only")
    paddings = ("same", "valid", "causal") if len(layer.strides) == 1 else ("same", "valid")
    if layer.padding not in paddings:
        raise CompactionError(f"Layer '{layer.name}' uses padding={layer.padding!r}; use one of {list(paddings)}")
    return {
        "strides": list(layer.strides),
        "padding": layer.padding,
        "dilation": list(getattr(layer, "dilation_rate", (1,) * len(layer.strides))),
        "activation": _activation(layer),
    }


def _conv_node(b, name: str, x: str, out, kernel: np.ndarray, bias: np.ndarray | None, attrs: dict,
               slab: int | None = None) -> str:
    """One convolution of any rank, by its kernel's: 1-D as `_conv1d_nodes`, 2-D `conv2d`, 3-D `conv3d`."""
    if kernel.ndim == 3:
        return _conv1d_nodes(b, name, x, out, kernel, bias, attrs, slab)
    op = {4: "conv2d", 5: "conv3d"}[kernel.ndim]
    return b.add(name, op, [x], out, {"kernel": kernel, "bias": bias}, attrs, KERNEL_LAYOUT, slab=slab)


@lowers(mann_layers.MaskedConv1D, mann_layers.MaskedConv2D, mann_layers.MaskedConv3D,
        keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D, ops=("conv2d", "conv3d", "pad", "reshape"))
def _conv(b, layer, inputs, outputs, name):
    kernel, bias = _kernel_and_bias(layer)
    return [_conv_node(b, name, inputs[0], outputs[0], kernel, bias, _conv_attrs(layer))]


@lowers(mann_layers.MultiConv1D, mann_layers.MultiMaskedConv1D, mann_layers.MultiConv2D,
        mann_layers.MultiMaskedConv2D, mann_layers.MultiConv3D, mann_layers.MultiMaskedConv3D,
        ops=("conv2d", "conv3d", "reshape"))
def _multi_conv(b, layer, inputs, outputs, name):
    kernel, bias = _numpy(layer.masked_kernel()), _numpy(layer.masked_bias())
    attrs = _conv_attrs(layer)
    return [
        _conv_node(b, f"{name}[{i}]", x, out, kernel[i], None if bias is None else bias[i], attrs, slab=i)
        for i, (x, out) in enumerate(zip(inputs, outputs))
    ]


@lowers(mann_layers.MultitaskNormalization, ops=("add", "divide"))
def _multitask_normalization(b, layer, inputs, outputs, name):
    # Every output divides by the one sum: each task's graph holds every branch it reads.
    total = b.add(f"{name}/sum", "add", inputs, outputs[0])
    return [b.add(f"{name}[{i}]", "divide", [x, total], out) for i, (x, out) in enumerate(zip(inputs, outputs))]


def _pool_attrs(layer) -> dict:
    _require_channels_last(layer)
    return {"pool_size": list(layer.pool_size), "strides": list(layer.strides), "padding": layer.padding}


# Keras pooling layer -> its op; a 1-D pool runs the 2-D op over a one-row image (`_pool1d_nodes`).
_POOLS = {
    keras.layers.MaxPooling1D: "max_pool2d",
    keras.layers.AveragePooling1D: "avg_pool2d",
    keras.layers.MaxPooling2D: "max_pool2d",
    keras.layers.AveragePooling2D: "avg_pool2d",
    keras.layers.MaxPooling3D: "max_pool3d",
    keras.layers.AveragePooling3D: "avg_pool3d",
}


@lowers(*_POOLS, ops=("avg_pool2d", "avg_pool3d", "max_pool2d", "max_pool3d", "reshape"))
def _pool(b, layer, inputs, outputs, name):
    op, attrs = _POOLS[type(layer)], _pool_attrs(layer)
    if len(layer.pool_size) == 1:
        return [_pool1d_nodes(b, name, inputs[0], outputs[0], op, attrs)]
    return [b.add(name, op, inputs, outputs[0], attrs=attrs)]


@lowers(mann_layers.MultiMaxPool2D, mann_layers.MultiMaxPool3D, ops=("max_pool2d", "max_pool3d"))
def _multi_max_pool(b, layer, inputs, outputs, name):
    op = {2: "max_pool2d", 3: "max_pool3d"}[layer.rank]
    return [
        b.add(f"{name}[{i}]", op, [x], out, attrs=_pool_attrs(layer), slab=i)
        for i, (x, out) in enumerate(zip(inputs, outputs))
    ]


_GLOBAL_POOLS = {
    keras.layers.GlobalAveragePooling1D: ("global_avg_pool", 1),
    keras.layers.GlobalAveragePooling2D: ("global_avg_pool", 2),
    keras.layers.GlobalAveragePooling3D: ("global_avg_pool", 3),
    keras.layers.GlobalMaxPooling1D: ("global_max_pool", 1),
    keras.layers.GlobalMaxPooling2D: ("global_max_pool", 2),
    keras.layers.GlobalMaxPooling3D: ("global_max_pool", 3),
}


@lowers(*_GLOBAL_POOLS, ops=("global_avg_pool", "global_max_pool"))
def _global_pool(b, layer, inputs, outputs, name):
    _require_channels_last(layer)
    op, spatial = _GLOBAL_POOLS[type(layer)]
    attrs = {"axes": list(range(1, spatial + 1)), "keepdims": bool(layer.keepdims)}
    return [b.add(name, op, inputs, outputs[0], attrs=attrs)]


@lowers(keras.layers.Flatten, ops=("flatten",))
def _flatten(b, layer, inputs, outputs, name):
    _require_channels_last(layer)
    return [b.add(name, "flatten", inputs, outputs[0])]


@lowers(keras.layers.Reshape, ops=("reshape",))
def _reshape(b, layer, inputs, outputs, name):
    return [b.add(name, "reshape", inputs, outputs[0], attrs={"shape": [int(d) for d in layer.target_shape]})]


@lowers(keras.layers.Embedding, ops=("embedding",))
def _embedding(b, layer, inputs, outputs, name):
    if layer.mask_zero:
        raise CompactionError(
            f"Embedding '{layer.name}' has mask_zero=True; Keras masks are not carried into the compact model. "
            "Train with mask_zero=False"
        )
    if getattr(layer, "quantization_mode", None):
        raise CompactionError(f"Embedding '{layer.name}' is quantized; compact the float model")
    return [b.add(name, "embedding", inputs, outputs[0], {"table": _numpy(layer.embeddings)})]


@lowers(keras.layers.BatchNormalization, ops=("scale_shift",))
def _batch_norm(b, layer, inputs, outputs, name):
    rank = len(outputs[0].shape)
    if layer.axis not in (-1, rank - 1):
        raise CompactionError(f"BatchNormalization '{layer.name}' normalises axis {layer.axis}; only the last axis is supported")
    variance = _numpy(layer.moving_variance)
    gamma = _numpy(layer.gamma) if layer.scale else np.ones_like(variance)
    beta = _numpy(layer.beta) if layer.center else np.zeros_like(variance)
    scale = gamma / np.sqrt(variance + layer.epsilon)
    shift = beta - _numpy(layer.moving_mean) * scale
    return [b.add(name, "scale_shift", inputs, outputs[0], {"scale": scale, "shift": shift})]


@lowers(keras.layers.LayerNormalization, ops=("layer_norm",))
def _layer_norm(b, layer, inputs, outputs, name):
    if getattr(layer, "rms_scaling", False):
        raise CompactionError(f"LayerNormalization '{layer.name}' uses rms_scaling, which mann-edge does not support")
    rank = len(outputs[0].shape)
    axes = sorted(a % rank for a in ([layer.axis] if isinstance(layer.axis, int) else layer.axis))
    weights = {"gamma": _numpy(layer.gamma) if layer.scale else None, "beta": _numpy(layer.beta) if layer.center else None}
    attrs = {"axes": axes, "epsilon": float(layer.epsilon)}
    return [b.add(name, "layer_norm", inputs, outputs[0], weights, attrs)]


def _activation_node(b, name, inputs, outputs, activation):
    if activation["name"] == "linear":
        return list(inputs)
    return [b.add(name, "activation", inputs, outputs[0], attrs={"activation": activation})]


@lowers(keras.layers.Activation, ops=("activation",))
def _activation_layer(b, layer, inputs, outputs, name):
    return _activation_node(b, name, inputs, outputs, _activation(layer))


@lowers(keras.layers.ReLU, ops=("activation",))
def _relu_layer(b, layer, inputs, outputs, name):
    params = {"negative_slope": float(layer.negative_slope), "threshold": float(layer.threshold),
              "max_value": None if layer.max_value is None else float(layer.max_value)}
    return _activation_node(b, name, inputs, outputs, normalize_activation({"name": "relu", **params}))


@lowers(keras.layers.LeakyReLU, ops=("activation",))
def _leaky_relu_layer(b, layer, inputs, outputs, name):
    activation = {"name": "leaky_relu", "negative_slope": float(layer.negative_slope)}
    return _activation_node(b, name, inputs, outputs, normalize_activation(activation))


@lowers(keras.layers.ELU, ops=("activation",))
def _elu_layer(b, layer, inputs, outputs, name):
    return _activation_node(b, name, inputs, outputs, normalize_activation({"name": "elu", "alpha": float(layer.alpha)}))


@lowers(keras.layers.Softmax, ops=("activation",))
def _softmax_layer(b, layer, inputs, outputs, name):
    axis = layer.axis if isinstance(layer.axis, int) else None
    if axis is None:
        raise CompactionError(f"Softmax '{layer.name}' over several axes is not supported")
    return _activation_node(b, name, inputs, outputs, normalize_activation({"name": "softmax", "axis": axis}))


@lowers(keras.layers.Add, mann_layers.SumLayer, ops=("add",))
def _add(b, layer, inputs, outputs, name):
    return [b.add(name, "add", inputs, outputs[0])]


@lowers(keras.layers.Concatenate, ops=("concat",))
def _concat(b, layer, inputs, outputs, name):
    return [b.add(name, "concat", inputs, outputs[0], attrs={"axis": layer.axis % len(outputs[0].shape)})]


@lowers(mann_layers.SelectorLayer, ops=())
def _selector(b, layer, inputs, outputs, name):
    return [inputs[layer.sel_index]]


@lowers(mann_layers.FilterLayer, ops=("zeros_like",))
def _filter(b, layer, inputs, outputs, name):
    if layer.is_on:
        return list(inputs)
    return [b.add(name, "zeros_like", inputs, outputs[0])]


@lowers(
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.GaussianDropout,
    keras.layers.GaussianNoise,
    keras.layers.AlphaDropout,
    keras.layers.Identity,
    keras.layers.ActivityRegularization,
    ops=(),
)
def _identity(b, layer, inputs, outputs, name):
    # Inference-time identities: they leave no trace in the compact model.
    return list(inputs)


# -- Keras layers lowered to the ops above, or to several of them ------------------------------


@dataclass(frozen=True)
class _Spec:
    """The shape and dtype of a tensor between the nodes of one layer (what `_Builder.add` reads of a Keras output)."""

    shape: tuple
    dtype: str = "float32"


def _conv1d_nodes(b, name: str, x: str, out, kernel: np.ndarray, bias: np.ndarray | None, attrs: dict,
                  slab: int | None = None) -> str:
    """A 1-D convolution as a `conv2d` over a one-row image; returns its output tensor (named ``name``).

    (N, steps, cin) -> reshape (N, 1, steps, cin) -> conv2d, kernel (1, k, cin, cout) -> reshape
    (N, steps', cout): every format and the runtime's CSR conv kernel take it as it is.
    ``kernel`` is (k, cin, cout); ``attrs`` are `_conv_attrs` of a Conv1D (one stride and
    dilation, padding 'same', 'valid' or 'causal': zeros before the steps, then 'valid');
    ``out`` is the layer's output (its shape and dtype).
    """
    k, cin, cout = kernel.shape
    steps = b.shape(x)[1]
    image = b.add(f"{name}/row", "reshape", [x], _Spec((None, 1, steps, cin)), attrs={"shape": [1, -1, cin]},
                  slab=slab)
    padding = attrs["padding"]
    if padding == "causal":
        before = (k - 1) * attrs["dilation"][0]
        padded = None if steps is None else steps + before
        image = b.add(f"{name}/causal", "pad", [image], _Spec((None, 1, padded, cin)),
                      attrs={"pads": [0, 0, before, 0, 0, 0]}, slab=slab)
        padding = "valid"
    conv_attrs = {**attrs, "padding": padding, "strides": [1, *attrs["strides"]], "dilation": [1, *attrs["dilation"]]}
    conv_out = _Spec((None, 1, out.shape[1], cout), out.dtype)
    y = b.add(f"{name}/conv", "conv2d", [image], conv_out, {"kernel": kernel[None], "bias": bias}, conv_attrs,
              KERNEL_LAYOUT, slab=slab)
    return b.add(name, "reshape", [y], out, attrs={"shape": [-1, b.shape(y)[-1]]}, slab=slab)


def _pool1d_nodes(b, name: str, x: str, out, op: str, attrs: dict, slab: int | None = None) -> str:
    """A 1-D pool as the 2-D ``op`` over a one-row image (as `_conv1d_nodes`); returns its output tensor."""
    _, steps, channels = b.shape(x)
    image = b.add(f"{name}/row", "reshape", [x], _Spec((None, 1, steps, channels)), attrs={"shape": [1, -1, channels]},
                  slab=slab)
    pool_attrs = {"pool_size": [1, *attrs["pool_size"]], "strides": [1, *attrs["strides"]], "padding": attrs["padding"]}
    y = b.add(f"{name}/pool", op, [image], _Spec((None, 1, out.shape[1], channels), out.dtype), attrs=pool_attrs,
              slab=slab)
    return b.add(name, "reshape", [y], out, attrs={"shape": [-1, channels]}, slab=slab)


# Keras merge layers with one elementwise op each (`Add` is `add` above).
_ELEMENTWISE = {
    keras.layers.Subtract: "subtract",
    keras.layers.Multiply: "multiply",
    keras.layers.Average: "average",
    keras.layers.Maximum: "maximum",
    keras.layers.Minimum: "minimum",
}


@lowers(*_ELEMENTWISE, ops=("average", "maximum", "minimum", "multiply", "subtract"))
def _elementwise(b, layer, inputs, outputs, name):
    return [b.add(name, _ELEMENTWISE[type(layer)], inputs, outputs[0])]


@lowers(keras.layers.DepthwiseConv2D, ops=("depthwise_conv2d",))
def _depthwise_conv2d(b, layer, inputs, outputs, name):
    kernel, bias = _kernel_and_bias(layer)
    return [b.add(name, "depthwise_conv2d", inputs, outputs[0], {"kernel": kernel, "bias": bias}, _conv_attrs(layer),
                  KERNEL_LAYOUT)]


@lowers(keras.layers.SeparableConv2D, ops=("conv2d", "depthwise_conv2d"))
def _separable_conv2d(b, layer, inputs, outputs, name):
    # a depthwise pass (no bias, no activation), then a 1x1 conv2d with the bias and activation, as Keras computes it
    attrs = _conv_attrs(layer)
    depthwise = _numpy(layer.depthwise_kernel)
    spatial = _Spec((*outputs[0].shape[:-1], depthwise.shape[2] * depthwise.shape[3]), outputs[0].dtype)
    x = b.add(f"{name}/depthwise", "depthwise_conv2d", inputs, spatial, {"kernel": depthwise},
              {**attrs, "activation": normalize_activation("linear")}, KERNEL_LAYOUT)
    pointwise = {"strides": [1, 1], "padding": "valid", "dilation": [1, 1], "activation": attrs["activation"]}
    return [b.add(name, "conv2d", [x], outputs[0], {"kernel": _numpy(layer.pointwise_kernel), "bias": _numpy(layer.bias)},
                  pointwise, KERNEL_LAYOUT)]


def _pairs(layer, value, rank: int) -> list[int]:
    """A padding or cropping of ``rank`` spatial axes as [before, after] per axis after the batch (channels: none)."""
    pairs = [value] if rank == 1 else list(value)
    return [int(v) for pair in pairs for v in pair] + [0, 0]


# Keras padding and cropping layers: (op, its attribute, the layer's attribute, spatial rank)
_PADDINGS = {
    keras.layers.ZeroPadding1D: ("pad", "pads", "padding", 1),
    keras.layers.ZeroPadding2D: ("pad", "pads", "padding", 2),
    keras.layers.ZeroPadding3D: ("pad", "pads", "padding", 3),
    keras.layers.Cropping1D: ("crop", "crops", "cropping", 1),
    keras.layers.Cropping2D: ("crop", "crops", "cropping", 2),
    keras.layers.Cropping3D: ("crop", "crops", "cropping", 3),
}


@lowers(*_PADDINGS, ops=("crop", "pad"))
def _padding(b, layer, inputs, outputs, name):
    _require_channels_last(layer)
    op, attr, source, rank = _PADDINGS[type(layer)]
    return [b.add(name, op, inputs, outputs[0], attrs={attr: _pairs(layer, getattr(layer, source), rank)})]


@lowers(keras.layers.UpSampling1D, ops=("reshape", "tile"))
def _upsampling1d(b, layer, inputs, outputs, name):
    # each step repeated: (N, T, 1, C) tiled to (N, T, size, C)
    _, steps, c = b.shape(inputs[0])
    size = int(layer.size)
    cells = b.add(f"{name}/steps", "reshape", inputs, _Spec((None, steps, 1, c)), attrs={"shape": [steps, 1, c]})
    tiled = b.add(f"{name}/tile", "tile", [cells], _Spec((None, steps, size, c)), attrs={"reps": [1, size, 1]})
    return [b.add(name, "reshape", [tiled], outputs[0], attrs={"shape": [steps * size, c]})]


@lowers(keras.layers.UpSampling2D, ops=("dense", "reshape", "tile", "transpose"))
def _upsampling2d(b, layer, inputs, outputs, name):
    _require_channels_last(layer)
    if layer.interpolation not in ("nearest", "bilinear"):
        raise CompactionError(f"UpSampling2D '{layer.name}' uses interpolation={layer.interpolation!r}; "
                              "mann-edge compacts 'nearest' and 'bilinear'")
    sh, sw = layer.size
    _, h, w, c = b.shape(inputs[0])
    if layer.interpolation == "bilinear":
        return [_bilinear_nodes(b, name, inputs[0], outputs[0], (sh, sw))]
    # nearest: rows repeated sh times, then pixels sw times, each a tile of a reshaped view; the views stay
    # within rank 5 (Core ML's limit)
    rows = b.add(f"{name}/rows", "reshape", inputs, _Spec((None, h, 1, w * c)), attrs={"shape": [h, 1, w * c]})
    rows = b.add(f"{name}/tile_rows", "tile", [rows], _Spec((None, h, sh, w * c)), attrs={"reps": [1, sh, 1]})
    pixels = b.add(f"{name}/pixels", "reshape", [rows], _Spec((None, h * sh * w, 1, c)), attrs={"shape": [h * sh * w, 1, c]})
    pixels = b.add(f"{name}/tile_pixels", "tile", [pixels], _Spec((None, h * sh * w, sw, c)), attrs={"reps": [1, sw, 1]})
    return [b.add(name, "reshape", [pixels], outputs[0], attrs={"shape": [h * sh, w * sw, c]})]


def _bilinear_matrix(size: int, scale: int) -> np.ndarray:
    """(size, size * scale): output cell j as a mix of at most two input cells, TensorFlow's half-pixel bilinear resize."""
    matrix = np.zeros((size, size * scale), np.float32)
    for j in range(size * scale):
        source = (j + 0.5) / scale - 0.5
        low = int(np.floor(source))
        weight = source - low
        matrix[min(max(low, 0), size - 1), j] += 1.0 - weight
        matrix[min(max(low + 1, 0), size - 1), j] += weight
    return matrix


def _bilinear_nodes(b, name: str, x: str, out, size: tuple[int, int]) -> str:
    """Bilinear upsampling as two dense ops (one per spatial axis, moved last) with constant, two-per-column kernels."""
    _, h, w, c = b.shape(x)
    (sh, sw), linear = size, {"activation": normalize_activation("linear")}
    y = b.add(f"{name}/rows_last", "transpose", [x], _Spec((None, w, c, h)), attrs={"perm": [0, 2, 3, 1]})
    y = b.add(f"{name}/rows", "dense", [y], _Spec((None, w, c, h * sh)), {"kernel": _bilinear_matrix(h, sh)}, linear,
              KERNEL_LAYOUT)
    y = b.add(f"{name}/columns_last", "transpose", [y], _Spec((None, h * sh, c, w)), attrs={"perm": [0, 3, 2, 1]})
    y = b.add(f"{name}/columns", "dense", [y], _Spec((None, h * sh, c, w * sw)), {"kernel": _bilinear_matrix(w, sw)},
              linear, KERNEL_LAYOUT)
    return b.add(name, "transpose", [y], out, attrs={"perm": [0, 1, 3, 2]})


@lowers(keras.layers.Permute, ops=("transpose",))
def _permute(b, layer, inputs, outputs, name):
    return [b.add(name, "transpose", inputs, outputs[0], attrs={"perm": [0, *(int(d) for d in layer.dims)]})]


@lowers(keras.layers.RepeatVector, ops=("reshape", "tile"))
def _repeat_vector(b, layer, inputs, outputs, name):
    features = b.shape(inputs[0])[-1]
    row = b.add(f"{name}/row", "reshape", inputs, _Spec((None, 1, features)), attrs={"shape": [1, -1]})
    return [b.add(name, "tile", [row], outputs[0], attrs={"reps": [int(layer.n), 1]})]


def _per_channel(layer, value, channels) -> np.ndarray:
    """A scalar or per-channel value of ``layer`` as one value per channel (the last axis)."""
    array = np.asarray(value, np.float32).reshape(-1)
    if array.size not in (1, channels):
        raise CompactionError(f"Layer '{layer.name}' ({type(layer).__name__}) scales {array.size} values; "
                              f"mann-edge takes one, or one per channel ({channels})")
    return np.broadcast_to(array, (channels,)).copy()


@lowers(keras.layers.Rescaling, ops=("scale_shift",))
def _rescaling(b, layer, inputs, outputs, name):
    channels = outputs[0].shape[-1]
    scale, offset = _per_channel(layer, layer.scale, channels), _per_channel(layer, layer.offset, channels)
    return [b.add(name, "scale_shift", inputs, outputs[0], {"scale": scale, "shift": offset})]


@lowers(keras.layers.Normalization, ops=("scale_shift",))
def _normalization(b, layer, inputs, outputs, name):
    # Keras: (x - mean) / max(sqrt(variance), epsilon), per channel of the last axis
    rank = len(outputs[0].shape)
    if tuple(a % rank for a in layer.axis) != (rank - 1,) or layer.invert:
        raise CompactionError(f"Normalization '{layer.name}' normalises axes {layer.axis} (invert={layer.invert}); "
                              "mann-edge compacts the last axis only, invert=False")
    channels = outputs[0].shape[-1]
    mean, variance = _per_channel(layer, _numpy(layer.mean), channels), _per_channel(layer, _numpy(layer.variance), channels)
    scale = 1.0 / np.maximum(np.sqrt(variance), keras.config.epsilon())
    return [b.add(name, "scale_shift", inputs, outputs[0], {"scale": scale, "shift": -mean * scale})]


def _call_argument(b, inputs, position: int, keyword: str):
    """The compact tensor a call argument (by position or keyword) of the Keras call being lowered refers to."""
    arguments = b.call.arguments
    names = {id(kt): name for kt, name in zip(arguments.keras_tensors, inputs)}
    value = arguments.args[position] if len(arguments.args) > position else arguments.kwargs.get(keyword)
    return None if value is None else names[id(value)]


def _refuse_call_options(b, layer, *options: str) -> None:
    """CompactionError when the Keras call being lowered passes any of ``options`` (masks given as [None, None] are none)."""
    for option in options:
        value = b.call.arguments.kwargs.get(option)
        if isinstance(value, (list, tuple)) and all(v is None for v in value):
            continue
        if value is not None and value is not False:
            raise CompactionError(f"Layer '{layer.name}' ({type(layer).__name__}) is called with {option}; "
                                  "mann-edge compacts it without")


@lowers(keras.layers.Attention, ops=("attention",))
def _attention(b, layer, inputs, outputs, name):
    _refuse_call_options(b, layer, "mask", "return_attention_scores")
    query, value, *key = inputs
    attrs = {
        "scale": float(_numpy(layer.scale)) if layer.use_scale else 1.0,
        "causal": bool(b.call.arguments.kwargs.get("use_causal_mask", False)),
        "score_mode": layer.score_mode,
    }
    if layer.score_mode == "concat":
        attrs["concat_weight"] = float(_numpy(layer.concat_score_weight))
    return [b.add(name, "attention", [query, value, key[0] if key else value], outputs[0], attrs=attrs)]


def _heads(b, name: str, x: str, dense, heads: int, size: int) -> str:
    """(N, T, dim) through one of MultiHeadAttention's projections, split into heads: (N, heads, T, size)."""
    steps, dim = b.shape(x)[1:]
    kernel = _numpy(dense.kernel).reshape(dim, heads * size)
    bias = None if dense.bias is None else _numpy(dense.bias).reshape(heads * size)
    y = b.add(f"{name}/dense", "dense", [x], _Spec((None, steps, heads * size)), {"kernel": kernel, "bias": bias},
              {"activation": normalize_activation("linear")}, KERNEL_LAYOUT)
    y = b.add(f"{name}/split", "reshape", [y], _Spec((None, steps, heads, size)), attrs={"shape": [steps, heads, size]})
    return b.add(name, "transpose", [y], _Spec((None, heads, steps, size)), attrs={"perm": [0, 2, 1, 3]})


@lowers(keras.layers.MultiHeadAttention, ops=("attention", "dense", "reshape", "transpose"))
def _multi_head_attention(b, layer, inputs, outputs, name):
    # The projections are dense ops (their kernels stored sparse where sparse), heads moved before the steps,
    # one attention op over (N, heads, T, size), the heads joined and projected back, as Keras computes it.
    _refuse_call_options(b, layer, "attention_mask", "query_mask", "value_mask", "key_mask", "return_attention_scores")
    query, value = _call_argument(b, inputs, 0, "query"), _call_argument(b, inputs, 1, "value")
    key = _call_argument(b, inputs, 2, "key") or value
    if len(b.shape(query)) != 3 or tuple(layer._attention_axes) != (1,) or layer._output_shape is not None:
        raise CompactionError(f"MultiHeadAttention '{layer.name}' attends over axes {layer._attention_axes} of rank-"
                              f"{len(b.shape(query))} inputs (output_shape={layer._output_shape}); mann-edge compacts "
                              "rank-3 inputs, the default attention axes and output_shape=None")
    heads, key_dim, value_dim = layer.num_heads, layer._key_dim, layer._value_dim
    tq, dim = b.shape(query)[1], outputs[0].shape[-1]
    q = _heads(b, f"{name}/query", query, layer._query_dense, heads, key_dim)
    k = _heads(b, f"{name}/key", key, layer._key_dense, heads, key_dim)
    v = _heads(b, f"{name}/value", value, layer._value_dense, heads, value_dim)
    attrs = {"scale": 1.0 / float(np.sqrt(key_dim)),
             "causal": bool(b.call.arguments.kwargs.get("use_causal_mask", False))}
    y = b.add(f"{name}/attention", "attention", [q, v, k], _Spec((None, heads, tq, value_dim)), attrs=attrs)
    y = b.add(f"{name}/heads", "transpose", [y], _Spec((None, tq, heads, value_dim)), attrs={"perm": [0, 2, 1, 3]})
    y = b.add(f"{name}/join", "reshape", [y], _Spec((None, tq, heads * value_dim)), attrs={"shape": [tq, heads * value_dim]})
    output = layer._output_dense
    kernel = _numpy(output.kernel).reshape(heads * value_dim, dim)
    bias = None if output.bias is None else _numpy(output.bias)
    return [b.add(name, "dense", [y], outputs[0], {"kernel": kernel, "bias": bias},
                  {"activation": normalize_activation("linear")}, KERNEL_LAYOUT)]


# -- the walk ------------------------------------------------------------------------------------


def _functional(model):
    if isinstance(model, keras.Sequential):
        functional = getattr(model, "_functional", None)
        if functional is None:
            raise CompactionError(
                f"Sequential model '{model.name}' is not built; give it an Input (or call build) before compacting"
            )
        return functional
    if not hasattr(model, "_nodes_by_depth"):
        raise CompactionError(
            f"Model '{model.name}' ({type(model).__name__}) is not a functional or Sequential Keras model"
        )
    return model


def _walk(model, builder: _Builder, tensors: dict[int, str] | None = None, prefix: str = "",
          path: str = "") -> dict[int, str]:
    """Lowers every layer call in graph order; returns KerasTensor id -> compact tensor name.

    A nested model (a functional or Sequential model called as a layer) is flattened into
    the graph (`_walk_nested`). ``tensors`` maps the model's inputs when it is nested,
    ``prefix`` (``"<call name>/"``) keeps its node names apart from the outer ones and
    ``path`` (``"<model name>/"``) names its layers, the same for every call.
    """
    tensors = {} if tensors is None else tensors
    for kt in model.inputs:
        if id(kt) not in tensors:
            tensors[id(kt)] = kt._keras_history.operation.name
            builder.shapes[tensors[id(kt)]] = tuple(kt.shape)
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            layer = node.operation
            if isinstance(layer, keras.layers.InputLayer):
                continue
            index = layer._inbound_nodes.index(node)
            name = prefix + (layer.name if index == 0 else f"{layer.name}@{index}")
            inputs = [tensors[id(kt)] for kt in node.arguments.keras_tensors]
            if isinstance(layer, keras.Model):
                results = _walk_nested(layer, builder, inputs, name, f"{path}{layer.name}/")
            else:
                lowering = LOWERINGS.lookup(type(layer), context=f"layer '{path}{layer.name}'")
                builder.layer, builder.call, builder.ops = path + layer.name, node, lowering.ops
                results = lowering(builder, layer, inputs, node.outputs, name)
            for kt, result in zip(node.outputs, results):
                tensors[id(kt)] = result
    return tensors


def _walk_nested(model, builder: _Builder, inputs: list[str], name: str, path: str) -> list[str]:
    """Lowers a nested model's layers in place, its inputs wired to ``inputs``; returns its outputs' tensor names.

    Its nodes are named ``<name>/<layer>`` (``name``: this call's) and record ``<path><layer>`` as their layer.
    """
    inner = _functional(model)
    if len(inner.inputs) != len(inputs):
        raise CompactionError(f"Nested model '{name}' takes {len(inner.inputs)} inputs. Received: {len(inputs)}")
    tensors = _walk(inner, builder, {id(kt): x for kt, x in zip(inner.inputs, inputs)}, prefix=f"{name}/", path=path)
    return [tensors[id(kt)] for kt in inner.outputs]


def _fold_scale_shift(nodes: list[Node], weights: dict, keep: set[str]) -> tuple[list[Node], dict[str, str]]:
    """Folds each scale_shift into the dense/conv op before it when that op's output has no other reader."""
    readers: dict[str, int] = {}
    for node in nodes:
        for tensor in node.inputs:
            readers[tensor] = readers.get(tensor, 0) + 1
    by_name = {node.name: node for node in nodes}
    folded: dict[str, str] = {}  # scale_shift node -> producer it was folded into
    result = []
    for node in nodes:
        producer = by_name.get(node.inputs[0]) if node.op == "scale_shift" else None
        if (
            producer is not None
            and producer.op in ("dense", "conv2d", "conv3d")  # kernels whose last axis is the output channel
            and producer.attrs["activation"]["name"] == "linear"
            and readers.get(producer.name) == 1
            and producer.name not in keep
        ):
            scale = _dense_of(weights[node.weights["scale"]])
            shift = _dense_of(weights[node.weights["shift"]])
            kernel = _dense_of(weights[producer.weights["kernel"]]) * scale
            bias = _dense_of(weights[producer.weights["bias"]]) if "bias" in producer.weights else np.zeros_like(shift)
            weights[producer.weights["kernel"]] = encode_weight(kernel.astype(np.float32), "oi")
            bias_key = f"{producer.name}/bias"
            weights[bias_key] = encode_weight((bias * scale + shift).astype(np.float32))
            for role in ("scale", "shift"):
                del weights[node.weights[role]]
            updated = replace(producer, weights={**producer.weights, "bias": bias_key}, shape=node.shape)
            result[result.index(by_name[producer.name])] = updated
            by_name[producer.name] = updated
            folded[node.name] = producer.name
            continue
        result.append(replace(node, inputs=tuple(folded.get(t, t) for t in node.inputs)))
    return result, folded


def _dense_of(weight) -> np.ndarray:
    return weight.to_dense() if hasattr(weight, "to_dense") else weight


@dataclass(frozen=True)
class TaskUsage:
    """What one model output is computed from.

    ``layers``: the ``(layer name, branch)`` pairs it owns, ``branch`` being the slab index
    of a multitask layer (whose output ``i`` reads only its input ``i``) and None for any
    other layer. ``reads``: those it owns and those it only reads: behind a layer whose
    output ``i`` reads every input but belongs to input ``i``'s branch
    (``reads_all_branches``: `MultitaskNormalization`), the other branches are read, not
    owned. ``inputs``: the names of the model inputs it reads.
    """

    layers: frozenset
    inputs: frozenset
    reads: frozenset = frozenset()


def task_usage(model) -> list[TaskUsage]:
    """Per model output, the layers (and slabs) and inputs it depends on, following branches as `compact` splits them.

    A nested model used as a layer is listed by its own name, and the layers inside it that
    the output reads by their path, ``"<nested model>/<layer>"`` (as `compact` records them).
    RSN2 training uses it to know whose weights are whose, without touching weights.
    """
    model = _functional(model)
    usage = []
    # (tensor, scope): a scope is (prefix, {id(nested input): (outer tensor, outer scope)}) inside a nested model
    top: tuple = ("", {})
    scopes: dict[tuple, tuple] = {}
    for output in model.outputs:
        owned, read, inputs = set(), set(), set()
        stack, seen = [(output, top, True)], set()
        while stack:
            kt, scope, owns = stack.pop()
            if (id(kt), id(scope), owns) in seen:
                continue
            seen.add((id(kt), id(scope), owns))
            layers = owned if owns else read
            prefix, bound = scope
            layer, node_index, tensor_index = kt._keras_history
            if isinstance(layer, keras.layers.InputLayer):
                if id(kt) in bound:
                    stack.append((*bound[id(kt)], owns))
                else:
                    inputs.add(layer.name)
                continue
            arguments = layer._inbound_nodes[node_index].arguments.keras_tensors
            if isinstance(layer, keras.Model):
                inner = _functional(layer)
                layers.add((prefix + layer.name, None))
                inner_scope = (f"{prefix}{layer.name}/",
                               {id(x): (outer, scope) for x, outer in zip(inner.inputs, arguments)})
                # one scope per call, so that a tensor inside it is walked once
                inner_scope = scopes.setdefault((id(layer), node_index, id(scope)), inner_scope)
                stack.append((inner.outputs[tensor_index], inner_scope, owns))
            elif getattr(layer, "multitask", False):
                layers.add((prefix + layer.name, tensor_index))
                stack.append((arguments[tensor_index], scope, owns))
            elif isinstance(layer, mann_layers.SelectorLayer):
                stack.append((arguments[layer.sel_index], scope, owns))
            elif getattr(layer, "reads_all_branches", False):
                layers.add((prefix + layer.name, None))
                stack.extend((x, scope, owns and i == tensor_index) for i, x in enumerate(arguments))
            else:
                layers.add((prefix + layer.name, None))
                stack.extend((x, scope, owns) for x in arguments)
        usage.append(TaskUsage(frozenset(owned), frozenset(inputs), frozenset(owned | read)))
    return usage


def mask_overlaps(model) -> list[dict]:
    """Per multitask layer and weight: how many positions more than one task's mask (or nonzeros) claims.

    Overlap is judged on kernels only; ``must_be_disjoint`` says which rows count. Disjoint
    masks are RSN2's promise about kernel positions: each task's subnetwork holds positions
    no other task uses. A bias is a handful of values per output unit, each task keeps its
    own bias slab in the compact model, and the original packages do not prune conv biases
    (their bias masks stay all ones while the kernel masks are disjoint), so shared bias
    positions are listed here (``must_be_disjoint`` False) but are not an overlap: they
    neither warn nor make ``strict`` fail. Nor is a layer whose slabs all serve the same tasks
    (the heads of beyondml's transformer block, a `MultiDense` whose slabs every task reads):
    its slabs are not task subnetworks.

    Returns:
        One row per weight: ``layer``, ``weight`` ('kernel' or 'bias'), ``positions`` (per
        slab), ``overlapping`` (positions more than one slab claims), ``must_be_disjoint``.

    Example:
        >>> [row for row in mask_overlaps(model) if row["overlapping"] and row["must_be_disjoint"]]
        []
    """
    usage = task_usage(model)
    rows = []
    for layer in model.layers:
        if not (getattr(layer, "multitask", False) and layer.weights):  # multitask pooling holds no slabs
            continue
        masks = layer.get_masks() if layer.masked else [_numpy(layer.w)] + ([_numpy(layer.b)] if layer.use_bias else [])
        owners = {frozenset(task for task, used in enumerate(usage) if (layer.name, slab) in used.layers)
                  for slab in range(masks[0].shape[0])}
        for role, mask in zip(("kernel", "bias"), masks):
            claimed = (mask != 0).sum(axis=0)
            overlap = int((claimed > 1).sum())
            rows.append({"layer": layer.name, "weight": role, "positions": int(claimed.size), "overlapping": overlap,
                         "must_be_disjoint": role == "kernel" and len(owners) > 1})
    return rows


def _check_overlaps(model, strict: bool) -> None:
    """Warns about every kernel overlap `mask_overlaps` finds; with ``strict`` it raises instead.

    Shared bias positions are allowed (see `mask_overlaps`), so they say nothing here;
    `mann-edge inspect` lists them.
    """
    for row in mask_overlaps(model):
        if not (row["overlapping"] and row["must_be_disjoint"]):
            continue
        message = (
            f"Multitask layer '{row['layer']}': {row['overlapping']} of {row['positions']} {row['weight']} positions "
            "are used by more than one task (masks are not disjoint)"
        )
        if strict:
            raise CompactionError(message)
        warnings.warn(message, MaskOverlapWarning, stacklevel=3)


def compact(
    model,
    task_names: Sequence[str] | None = None,
    *,
    strict: bool = False,
    labels: dict | None = None,
    source: str | None = None,
    source_sha256: str | None = None,
) -> CompactModel:
    """Turns a Keras model of MANN (and standard) layers into the compact model.

    Args:
        model: a functional or Sequential Keras 3 model (e.g. from `load_legacy`).
        task_names: one name per model output, in output order. Default: the model's
            output names, else ``task0..taskN-1``.
        strict: raise (instead of warn) when two tasks' kernel masks in a multitask layer
            overlap. Shared bias positions only warn, also with ``strict``: the original
            packages leave conv bias masks all ones (see `mask_overlaps`).
        labels: optional class names per task (task name -> list of str), kept in the manifest.
        source, source_sha256: provenance of the file the model came from.

    Raises:
        CompactionError: a layer it cannot compact (named with its class), NaN weights,
            overlapping kernel masks with ``strict``, bad task names.

    Example:
        >>> cm = compact(model, task_names=["digits", "cancer"])
        >>> cm.run("digits", x_digits)[0].shape
        (n, 10)
    """
    model = _functional(model)
    _check_overlaps(model, strict)

    builder = _Builder()
    tensors = _walk(model, builder)
    outputs = list(model.outputs)
    if not outputs:
        raise CompactionError(f"Model '{model.name}' has no outputs; nothing to compact")
    names = _task_names(model, task_names, len(outputs))
    output_tensors = [tensors[id(kt)] for kt in outputs]
    nodes, folded = _fold_scale_shift(builder.nodes, builder.weights, keep=set(output_tensors))
    output_tensors = [folded.get(t, t) for t in output_tensors]

    input_specs = [
        TensorSpec(kt._keras_history.operation.name, tuple(kt.shape), _dtype_name(kt.dtype)) for kt in model.inputs
    ]
    draft = CompactModel(input_specs, nodes, [], builder.weights)
    tasks = []
    output_names = list(getattr(model, "output_names", None) or [])
    for i, (task_name, kt, tensor) in enumerate(zip(names, outputs, output_tensors)):
        output_name = output_names[i] if i < len(output_names) else f"output_{i}"
        used = draft.ancestors([tensor])
        task_inputs = tuple(spec for spec in input_specs if spec.name in used)
        shape = draft.node(tensor).shape if tensor in used - {spec.name for spec in input_specs} else tuple(kt.shape)
        out_spec = TensorSpec(output_name, shape, _dtype_name(kt.dtype))
        task_labels = {output_name: list(labels[task_name])} if labels and task_name in labels else {}
        tasks.append(Task(task_name, task_inputs, (out_spec,), (tensor,), task_labels))

    provenance = {
        "source": source or model.name,
        "source_sha256": source_sha256,
        "mann_edge_version": __version__,
        "keras_version": keras.__version__,
    }
    if os.environ.get("SOURCE_DATE_EPOCH"):  # a build date only on request: the same source gives the same bytes
        provenance["created"] = build_time().isoformat()
    full = CompactModel(input_specs, nodes, tasks, builder.weights, provenance)
    return full.select_tasks(names)


def _task_names(model, task_names, count) -> list[str]:
    if task_names is None:
        names = list(getattr(model, "output_names", None) or [])
        if len(names) != count or len(set(names)) != count:
            names = [f"task{i}" for i in range(count)]
        return names
    names = [str(n) for n in task_names]
    if len(names) != count:
        raise CompactionError(f"Model '{model.name}' has {count} outputs, so it needs {count} task names. Received: {names}")
    if len(set(names)) != len(names) or any(not n for n in names):
        raise CompactionError(f"Task names must be unique and non-empty. Received: {names}")
    return names



# -- checking before training --------------------------------------------------------------------

# Layer classes that cannot be compacted -> the closest supported way to get the same effect.
# Consulted by `check_compactable`; a class not listed gets the most similar supported name.
ALTERNATIVES = {
    "Conv2DTranspose": "Conv2D on an upsampled input (UpSampling2D), or Dense + Reshape",
    "Conv1DTranspose": "Conv1D on an upsampled input (UpSampling1D)",
    "Conv3DTranspose": "Conv3D",
    "UpSampling3D": "UpSampling2D on a Reshape folding the depth into the rows",
    "PReLU": "LeakyReLU",
    "GroupNormalization": "LayerNormalization",
    "UnitNormalization": "LayerNormalization",
    "Lambda": "a built-in layer or an Activation layer of a named activation",
    "SimpleRNN": "Conv1D, or MultiHeadAttention with use_causal_mask=True",
    "LSTM": "Conv1D, or MultiHeadAttention with use_causal_mask=True",
    "GRU": "Conv1D, or MultiHeadAttention with use_causal_mask=True",
    "Bidirectional": "Conv1D, or MultiHeadAttention",
    "AdditiveAttention": "Attention(score_mode='concat')",
    "GroupedQueryAttention": "MultiHeadAttention",
}


class _CheckingBuilder(_Builder):
    """A `_Builder` that records node names only: checking lowers every layer without encoding any weight."""

    def add(self, name, op, inputs, out, weights=None, attrs=None, layouts=None, slab=None) -> str:
        self.shapes[name] = tuple(out.shape)
        return name


def _closest_supported(layer) -> str:
    """The supported layer to use instead of ``layer``'s class, from `ALTERNATIVES` or by name."""
    name = type(layer).__name__
    if name in ALTERNATIVES:
        return ALTERNATIVES[name]
    for base in type(layer).__mro__[1:]:
        if base in LOWERINGS:  # a subclass of a supported class: it may compute something else
            return f"{base.__name__} itself (subclasses are not compacted: they may compute something else)"
    import difflib

    close = difflib.get_close_matches(name, LOWERINGS.supported(), n=1, cutoff=0.0)
    return close[0] if close else "one of the supported layers"


def check_compactable(model) -> list[str]:
    """Every reason ``model`` cannot be compacted (and so exported), one line per layer; empty when it can.

    Each layer is lowered as `compact` would lower it, without encoding weights, so a
    layer class with no lowering and a supported class with an unsupported setting
    (``data_format``, ``groups``, a custom activation, ``mask_zero``...) are both listed,
    every one of them, not only the first. A class with no lowering comes with the closest
    supported alternative. RSN2 calls this before any training (`fit_rsn2`, `mask_model`).
    Every op a compactable model lowers to has a lowering in every export format (the
    parity tests check the formats' tables against the compact op registry).

    Example:
        >>> check_compactable(model)
        ["layer 'seq' (LSTM): mann-edge cannot compact this layer type; closest supported: Flatten + Dense ..."]
    """
    try:
        model = _functional(model)
    except CompactionError as error:
        return [str(error)]
    problems: dict[str, str] = {}  # by layer name: a layer called twice is listed once
    _check_layers(model, _CheckingBuilder(), problems, prefix="")
    return list(problems.values())


def _check_layers(model, builder: "_CheckingBuilder", problems: dict[str, str], prefix: str) -> None:
    """`check_compactable` over the layers of ``model``, and of the models nested in it (named by path)."""
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            layer = node.operation
            path = prefix + layer.name
            if isinstance(layer, keras.layers.InputLayer) or path in problems:
                continue
            where = f"layer '{path}' ({type(layer).__name__})"
            if isinstance(layer, keras.Model):
                try:
                    _check_layers(_functional(layer), builder, problems, prefix=f"{path}/")
                except CompactionError as error:
                    problems[path] = f"{where}: {error}"
                continue
            lowering = LOWERINGS.get(type(layer))
            if lowering is None:
                problems[path] = (f"{where}: mann-edge cannot compact this layer type; closest supported: "
                                  f"{_closest_supported(layer)}")
                continue
            inputs = [f"in{i}" for i in range(len(node.arguments.keras_tensors))]
            for name, kt in zip(inputs, node.arguments.keras_tensors):
                builder.shapes[name] = tuple(kt.shape)
            builder.layer, builder.call = path, node
            try:
                lowering(builder, layer, inputs, node.outputs, path)
            except CompactionError as error:
                # Most lowering errors already name the layer; only those that do not get it in front.
                named = f"'{layer.name}'" in str(error)
                problems[path] = str(error) if named else f"{where}: {error}"
