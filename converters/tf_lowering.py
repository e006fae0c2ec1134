"""Lowering of the compact model to TensorFlow: one `tf.function` per task, for the TFLite converter.

Every compact op has one lowering in `LOWERINGS` and every activation one in
`ACTIVATION_LOWERINGS`, each registered beside it (``@LOWERINGS.register("dense")``). A
lowering is ``fn(node, inputs, weights, options) -> tf.Tensor``: ``weights`` maps the node's
weight roles to dense weights (numpy arrays, traced as constants, or for large ones the
module's variables) and ``options`` is the build's `LoweringOptions`; an activation
lowering is ``fn(x, **params) -> tf.Tensor``. A lowering reproduces the numpy reference (`mann_edge.graph.ops`, `mann_edge.graph.activations`)
with ops that TFLite has as builtins, so the converter never needs TF Select:

- Weights are dense float32 values; the TFLite converter re-encodes the zeros
  (``EXPERIMENTAL_SPARSITY``) and stores float16 or int8 itself, so the graph stays plain. Small
  weights are graph constants. Large ones are non-trainable variables, which the
  converter freezes into constants: the SavedModel keeps them in its checkpoint instead
  of its graph, which makes saving and converting a large model 3-4 times faster (a
  variable costs a fixed overhead per signature, so small weights stay constants).
- Tensors are NHWC as in Keras, and TensorFlow's own 'same' padding is the reference's.
- Formulas follow the reference term by term where rounding could differ (softplus in
  its stable form, elu through TFLite's ELU kernel, Keras's sparsemax).

Example:
    >>> module = build_module(cm, "float32")
    >>> module.functions["digits"](tf.zeros([1, 64]))["digits"].shape   # inputs in the task's order
    TensorShape([1, 10])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import tensorflow as tf

from mann_edge.converters.lowering import check_nodes, lowering_tables, split_activation
from mann_edge.converters.options import check_dtype
from mann_edge.graph.activations import SELU_ALPHA, SELU_SCALE
from mann_edge.graph.model import CompactModel, Node, Task
from mann_edge.graph.ops import causal_bias
from mann_edge.graph.windows import output_sizes, window_pads

__all__ = [
    "OWNER",
    "LOWERINGS",
    "ACTIVATION_LOWERINGS",
    "check_lowerings",
    "build_module",
    "LoweringOptions",
    "lower_activation",
    "BLOCK_SIZES",
]

Weight = "np.ndarray | tf.Variable"

OWNER = "TFLite export"
LOWERINGS, ACTIVATION_LOWERINGS = lowering_tables(OWNER)

# From this many elements on, a weight is a variable rather than a graph constant (see the module docstring).
_VARIABLE_MIN_ELEMENTS = 1 << 16
# Inputs per block of TFLite's block-sparse FULLY_CONNECTED weights: 1x4 for float values, 1x16 for int8.
BLOCK_SIZES = {"float32": 4, "float16": 4, "int8": 16}


def check_lowerings(model: CompactModel) -> None:
    """Raises ConversionError naming the first op or activation of ``model`` that has no lowering."""
    check_nodes(model.nodes, LOWERINGS, ACTIVATION_LOWERINGS)


@dataclass(frozen=True)
class LoweringOptions:
    """What a build asks of every lowering.

    ``block_align``: give every dense kernel an input size that is a multiple of this many
    inputs (0: leave them), padding the input and the kernel with zeros where needed. The
    TFLite converter's block-sparse encoder (`EXPERIMENTAL_SPARSITY`; 1x4 blocks for float,
    1x16 for int8) reads such a kernel through a view truncated to whole blocks: it can pick
    the block encoding on a wrong estimate and drop the last inputs' weights, which gives
    wrong outputs (seen on TF 2.21 with 6 inputs in float and with 40 or 1000 in int8).
    Aligned kernels are encoded whole.
    """

    block_align: int = 0


def build_module(model: CompactModel, dtype: str = "float32", *, block_align: bool = False,
                 batch: int | None = None) -> tf.Module:
    """A `tf.Module` whose ``functions[task name]`` runs that task; weights are constants.

    Each function takes the task's inputs (signature names = input names, batch dimension
    ``batch``, None: free) and returns ``{output name: tensor}``. Weights are dense: constants, or
    non-trainable variables (``module.variables_by_key``) from 65,536 elements on.
    ``dtype="float16"`` rounds their values to float16 (they stay float32, so the
    converter's float16 encoding is lossless); ``dtype="int8"`` leaves them float32 (the
    converter quantizes them).
    ``block_align`` pads dense kernels to a multiple of the dtype's block (`BLOCK_SIZES`:
    4 inputs, 16 for int8; see `LoweringOptions`); sparse TFLite exports need it.

    Raises:
        ConversionError: an op or activation without a lowering, or an unknown dtype.

    Example:
        >>> module = build_module(cm, block_align=True)
        >>> signatures = {name: fn.get_concrete_function() for name, fn in module.functions.items()}
        >>> tf.saved_model.save(module, "saved", signatures=signatures)
    """
    check_dtype("tflite", dtype, owner=OWNER)
    check_lowerings(model)
    options = LoweringOptions(block_align=BLOCK_SIZES[dtype] if block_align else 0)
    weights = {key: _dense_weight(model.dense_weight(key), dtype) for key in model.weights}
    module = tf.Module()
    module.variables_by_key = {key: w for key, w in weights.items() if isinstance(w, tf.Variable)}
    module.functions = {task.name: _task_function(model, task, weights, options, batch) for task in model.tasks}
    return module


def _dense_weight(weight: np.ndarray, dtype: str) -> Weight:
    if np.issubdtype(weight.dtype, np.floating):
        # int8 stays float32 here: the converter quantizes the weights itself.
        weight = weight.astype("float16" if dtype == "float16" else np.float32).astype(np.float32)
    return tf.Variable(weight, trainable=False) if weight.size >= _VARIABLE_MIN_ELEMENTS else weight


def _task_function(model: CompactModel, task: Task, weights: Mapping[str, Weight], options: LoweringOptions,
                   batch: int | None = None):
    nodes = model.task_nodes(task.name)
    signature = [tf.TensorSpec((batch, *spec.shape[1:]), tf.as_dtype(spec.dtype), name=spec.name)
                 for spec in task.inputs]

    def run_task(*inputs):
        values = {spec.name: tensor for spec, tensor in zip(task.inputs, inputs)}
        for node in nodes:
            node_weights = {role: weights[key] for role, key in node.weights.items()}
            node_inputs = [values[name] for name in node.inputs]
            values[node.name] = LOWERINGS[node.op](node, node_inputs, node_weights, options)
        # identity: an output that is also an input, or listed twice, still gets its own tensor
        return {spec.name: tf.identity(values[tensor]) for spec, tensor in zip(task.outputs, task.output_tensors)}

    return tf.function(run_task, input_signature=signature, autograph=False)


def lower_activation(x: tf.Tensor, activation) -> tf.Tensor:
    """``activation`` (a name or ``{"name": ..., **params}``) applied to ``x``."""
    name, params = split_activation(activation)
    return ACTIVATION_LOWERINGS[name](x, **params)


def _activate(x: tf.Tensor, node: Node) -> tf.Tensor:
    return lower_activation(x, node.attrs.get("activation"))


def _static_size(x: tf.Tensor) -> int:
    """Elements per batch item (every dimension but the batch is known)."""
    return math.prod(int(d) for d in x.shape[1:])


# -- ops: linear algebra -------------------------------------------------------------------------


@LOWERINGS.register("dense")
def _dense(node, inputs, weights, options):
    (x,) = inputs
    kernel = weights["kernel"]
    x = tf.cast(x, tf.float32)
    # FULLY_CONNECTED (the op TFLite can keep sparse) wants a 2-D input: fold the middle axes into the batch.
    middle = [int(d) for d in x.shape[1:-1]]
    if middle:
        x = tf.reshape(x, [-1, kernel.shape[0]])
    padding = -kernel.shape[0] % options.block_align if options.block_align else 0
    if padding:
        x = tf.pad(x, [[0, 0], [0, padding]])
        kernel = tf.pad(kernel, [[0, padding], [0, 0]])  # folded into the constant by the converter
    y = tf.matmul(x, kernel)
    if "bias" in weights:
        y = y + weights["bias"]
    if middle:
        y = tf.reshape(y, [-1, *middle, kernel.shape[1]])
    return _activate(y, node)


@LOWERINGS.register("conv2d")
def _conv2d(node, inputs, weights, options):
    (x,) = inputs
    y = tf.nn.conv2d(
        tf.cast(x, tf.float32),
        weights["kernel"],
        strides=list(node.attrs["strides"]),
        padding=node.attrs["padding"].upper(),
        dilations=list(node.attrs.get("dilation", (1, 1))),
    )
    if "bias" in weights:
        y = y + weights["bias"]
    return _activate(y, node)


# TFLite's converter encodes a constant sparse from this share of zeros on (and only for FC and 2-D convolutions).
_SPARSE_MIN_ZEROS = 0.3


@LOWERINGS.register("conv3d")
def _conv3d(node, inputs, weights, options):
    (x,) = inputs
    kernel = weights["kernel"]
    if isinstance(kernel, tf.Variable):
        with tf.init_scope():  # the variable's value, read eagerly while the task function is traced
            values = kernel.numpy()
    else:
        values = kernel
    if np.count_nonzero(values) <= (1 - _SPARSE_MIN_ZEROS) * values.size:
        y = _conv3d_as_conv2d(node, tf.cast(x, tf.float32), kernel)
    else:
        y = tf.nn.conv3d(  # TFLite's CONV_3D
            tf.cast(x, tf.float32),
            kernel,
            strides=[1, *node.attrs["strides"], 1],
            padding=node.attrs["padding"].upper(),
            dilations=[1, *node.attrs.get("dilation", (1, 1, 1)), 1],
        )
    if "bias" in weights:
        y = y + weights["bias"]
    return _activate(y, node)


def _conv3d_as_conv2d(node, x, kernel):
    """A 3-D convolution as one CONV_2D per depth tap, summed: TFLite's converter keeps CONV_2D kernels sparse,
    never CONV_3D ones.

    Tap ``i`` reads depth ``d * stride + i * dilation`` of the depth-padded input for output depth ``d``:
    those slices, batched as images, go through the tap's (kh, kw, cin, cout) kernel.
    """
    (sd, sh, sw), (dd, dh, dw) = node.attrs["strides"], node.attrs.get("dilation", (1, 1, 1))
    kd = int(kernel.shape[0])
    depth, height, width, channels = (int(d) for d in x.shape[1:])
    ((before, after),) = window_pads(node.attrs["padding"], (depth,), (kd,), (sd,), (dd,))
    (out,) = output_sizes(node.attrs["padding"], (depth,), (kd,), (sd,), (dd,))
    x = tf.pad(x, [[0, 0], [before, after], [0, 0], [0, 0], [0, 0]]) if before or after else x
    total = None
    for i in range(kd):
        start = i * dd
        slices = x[:, start:start + (out - 1) * sd + 1:sd]
        y = tf.nn.conv2d(tf.reshape(slices, [-1, height, width, channels]), kernel[i], strides=[1, sh, sw, 1],
                         padding=node.attrs["padding"].upper(), dilations=[dh, dw])
        y = tf.reshape(y, [-1, out, *(int(d) for d in y.shape[1:])])
        total = y if total is None else total + y
    return total


@LOWERINGS.register("depthwise_conv2d")
def _depthwise_conv2d(node, inputs, weights, options):
    (x,) = inputs
    y = tf.nn.depthwise_conv2d(  # TFLite's DEPTHWISE_CONV_2D; output channel c * multiplier + m, as the reference
        tf.cast(x, tf.float32),
        weights["kernel"],
        strides=[1, *node.attrs["strides"], 1],
        padding=node.attrs["padding"].upper(),
        dilations=list(node.attrs.get("dilation", (1, 1))),
    )
    if "bias" in weights:
        y = y + weights["bias"]
    return _activate(y, node)


@LOWERINGS.register("attention")
def _attention(node, inputs, weights, options):
    query, value, key = inputs
    attrs = node.attrs
    scale = np.float32(attrs.get("scale", 1.0))
    if attrs.get("score_mode", "dot") == "dot":
        scores = tf.matmul(query, key, transpose_b=True) * scale  # BATCH_MATMUL
    else:
        summed = tf.reduce_sum(tf.tanh(scale * (tf.expand_dims(query, -2) + tf.expand_dims(key, -3))), axis=-1)
        scores = np.float32(attrs.get("concat_weight", 1.0)) * summed
    if attrs.get("causal", False):
        scores = scores + causal_bias(int(scores.shape[-2]), int(scores.shape[-1]))
    return tf.matmul(tf.nn.softmax(scores, axis=-1), value)


@LOWERINGS.register("embedding")
def _embedding(node, inputs, weights, options):
    (ids,) = inputs
    if ids.dtype.is_floating:
        ids = tf.cast(ids, tf.int32)
    return tf.gather(weights["table"], ids)


@LOWERINGS.register("scale_shift")
def _scale_shift(node, inputs, weights, options):
    (x,) = inputs
    return x * weights["scale"] + weights["shift"]


@LOWERINGS.register("layer_norm")
def _layer_norm(node, inputs, weights, options):
    (x,) = inputs
    axes = list(node.attrs["axes"])
    mean = tf.reduce_mean(x, axis=axes, keepdims=True)
    variance = tf.reduce_mean(tf.square(x - mean), axis=axes, keepdims=True)
    y = (x - mean) / tf.sqrt(variance + np.float32(node.attrs["epsilon"]))
    broadcast = [1] * x.shape.rank
    for axis in axes:
        broadcast[axis] = int(x.shape[axis])
    if "gamma" in weights:
        y = y * tf.reshape(weights["gamma"], broadcast)
    if "beta" in weights:
        y = y + tf.reshape(weights["beta"], broadcast)
    return y


# -- ops: pooling --------------------------------------------------------------------------------


@LOWERINGS.register("max_pool2d")
def _max_pool2d(node, inputs, weights, options):
    (x,) = inputs
    attrs = node.attrs
    return tf.nn.max_pool2d(x, list(attrs["pool_size"]), list(attrs["strides"]), attrs["padding"].upper())


@LOWERINGS.register("avg_pool2d")
def _avg_pool2d(node, inputs, weights, options):
    # TensorFlow's (and TFLite's) 'SAME' average leaves the padded cells out of the count, as the reference does.
    (x,) = inputs
    attrs = node.attrs
    return tf.nn.avg_pool2d(x, list(attrs["pool_size"]), list(attrs["strides"]), attrs["padding"].upper())


def _pool3d(x, attrs, pool2d):
    """A 3-D pool as two 2-D ones: over (H, W) per depth slice, then over D (TFLite has no builtin 3-D pool).

    Max and TensorFlow's 'same' average (which leaves padded cells out of the count) both
    separate: the count of a 3-D window is the product of its depth and (H, W) counts.
    """
    (pd, ph, pw), (sd, sh, sw), padding = attrs["pool_size"], attrs["strides"], attrs["padding"].upper()
    _, depth, height, width, channels = (int(d) if d is not None else None for d in x.shape)
    y = pool2d(tf.reshape(x, [-1, height, width, channels]), [ph, pw], [sh, sw], padding)
    ho, wo = int(y.shape[1]), int(y.shape[2])
    y = pool2d(tf.reshape(y, [-1, depth, ho * wo, channels]), [pd, 1], [sd, 1], padding)
    return tf.reshape(y, [-1, int(y.shape[1]), ho, wo, channels])


@LOWERINGS.register("max_pool3d")
def _max_pool3d(node, inputs, weights, options):
    return _pool3d(inputs[0], node.attrs, tf.nn.max_pool2d)


@LOWERINGS.register("avg_pool3d")
def _avg_pool3d(node, inputs, weights, options):
    return _pool3d(inputs[0], node.attrs, tf.nn.avg_pool2d)


@LOWERINGS.register("global_avg_pool")
def _global_avg_pool(node, inputs, weights, options):
    (x,) = inputs
    return tf.reduce_mean(x, axis=list(node.attrs["axes"]), keepdims=bool(node.attrs.get("keepdims", False)))


@LOWERINGS.register("global_max_pool")
def _global_max_pool(node, inputs, weights, options):
    (x,) = inputs
    return tf.reduce_max(x, axis=list(node.attrs["axes"]), keepdims=bool(node.attrs.get("keepdims", False)))


# -- ops: shape and wiring -----------------------------------------------------------------------


@LOWERINGS.register("flatten")
def _flatten(node, inputs, weights, options):
    (x,) = inputs
    return tf.reshape(x, [-1, _static_size(x)])


@LOWERINGS.register("reshape")
def _reshape(node, inputs, weights, options):
    (x,) = inputs
    shape = [int(d) for d in node.attrs["shape"]]
    if -1 in shape:  # resolved here so that only the batch is left for TFLite to infer
        known = math.prod(d for d in shape if d != -1)
        shape[shape.index(-1)] = _static_size(x) // known
    return tf.reshape(x, [-1, *shape])


@LOWERINGS.register("add")
def _add(node, inputs, weights, options):
    return _fold(inputs, tf.add)


def _fold(inputs, combine):
    result = inputs[0]
    for x in inputs[1:]:  # left to right, as the reference
        result = combine(result, x)
    return result


@LOWERINGS.register("subtract")
def _subtract(node, inputs, weights, options):
    return tf.subtract(*inputs)


@LOWERINGS.register("divide")
def _divide(node, inputs, weights, options):
    return tf.divide(*inputs)


@LOWERINGS.register("multiply")
def _multiply(node, inputs, weights, options):
    return _fold(inputs, tf.multiply)


@LOWERINGS.register("maximum")
def _maximum(node, inputs, weights, options):
    return _fold(inputs, tf.maximum)


@LOWERINGS.register("minimum")
def _minimum(node, inputs, weights, options):
    return _fold(inputs, tf.minimum)


@LOWERINGS.register("average")
def _average(node, inputs, weights, options):
    return _fold(inputs, tf.add) / np.float32(len(inputs))


@LOWERINGS.register("transpose")
def _transpose(node, inputs, weights, options):
    return tf.transpose(inputs[0], list(node.attrs["perm"]))


@LOWERINGS.register("tile")
def _tile(node, inputs, weights, options):
    return tf.tile(inputs[0], [1, *node.attrs["reps"]])


@LOWERINGS.register("pad")
def _pad(node, inputs, weights, options):
    pads = list(node.attrs["pads"])
    return tf.pad(inputs[0], [[0, 0], *zip(pads[0::2], pads[1::2])])


@LOWERINGS.register("crop")
def _crop(node, inputs, weights, options):
    (x,) = inputs
    crops = list(node.attrs["crops"])
    sizes = [int(d) for d in x.shape[1:]]
    return x[(slice(None), *(slice(b, d - a) for b, a, d in zip(crops[0::2], crops[1::2], sizes)))]


@LOWERINGS.register("concat")
def _concat(node, inputs, weights, options):
    return tf.concat(inputs, axis=int(node.attrs["axis"]))


@LOWERINGS.register("activation")
def _activation(node, inputs, weights, options):
    (x,) = inputs
    return _activate(x, node)


@LOWERINGS.register("zeros_like")
def _zeros_like(node, inputs, weights, options):
    (x,) = inputs
    return tf.zeros_like(x, dtype=tf.float32)


# -- activations: rectifiers ---------------------------------------------------------------------


@ACTIVATION_LOWERINGS.register("linear")
def _linear(x):
    return x


@ACTIVATION_LOWERINGS.register("relu")
def _relu(x, negative_slope=0.0, max_value=None, threshold=0.0):
    if negative_slope == 0 and threshold == 0:
        if max_value is not None and float(max_value) == 6.0:
            return tf.nn.relu6(x)
        y = tf.nn.relu(x)
    else:
        below = negative_slope * (x - threshold) if negative_slope else tf.zeros_like(x)
        y = tf.where(x >= threshold, x, below)
    if max_value is not None:
        y = tf.minimum(y, np.float32(max_value))
    return y


@ACTIVATION_LOWERINGS.register("relu6")
def _relu6(x):
    return tf.nn.relu6(x)


@ACTIVATION_LOWERINGS.register("leaky_relu")
def _leaky_relu(x, negative_slope=0.2):
    return tf.nn.leaky_relu(x, alpha=negative_slope)


def _elu(x, alpha=1.0):
    # TFLite's ELU computes expm1 exactly; a generic alpha scales its negative branch.
    if alpha == 1.0:
        return tf.nn.elu(x)
    return tf.where(x > 0, x, np.float32(alpha) * tf.nn.elu(tf.minimum(x, 0.0)))


@ACTIVATION_LOWERINGS.register("elu")
def _elu_activation(x, alpha=1.0):
    return _elu(x, alpha)


@ACTIVATION_LOWERINGS.register("selu")
def _selu(x):
    return SELU_SCALE * _elu(x, SELU_ALPHA)


def _expm1(x):
    # TFLite has no EXPM1: its ELU kernel gives expm1 exactly where it matters (x <= 0, near 0).
    return tf.where(x > 0, tf.exp(x) - 1.0, tf.nn.elu(x))


@ACTIVATION_LOWERINGS.register("celu")
def _celu(x, alpha=1.0):
    return tf.maximum(x, 0.0) + tf.minimum(0.0, alpha * _expm1(x / alpha))


@ACTIVATION_LOWERINGS.register("gelu")
def _gelu(x, approximate=False):
    return tf.nn.gelu(x, approximate=bool(approximate))  # the converter fuses it into TFLite's GELU


@ACTIVATION_LOWERINGS.register("threshold")
def _threshold(x, threshold=0.0, default_value=0.0):
    return tf.where(x > threshold, x, tf.fill(tf.shape(x), np.float32(default_value)))


# -- activations: sigmoids and smooth ------------------------------------------------------------


def _sigmoid(x):
    return tf.math.sigmoid(x)


def _hard_sigmoid(x):
    return tf.clip_by_value(x / 6.0 + 0.5, 0.0, 1.0)


def _softplus(x):
    # log(1 + exp(x)) in the stable form the reference's logaddexp(0, x) takes: no overflow for large x.
    return tf.maximum(x, 0.0) + tf.math.log(1.0 + tf.exp(-tf.abs(x)))


@ACTIVATION_LOWERINGS.register("sigmoid")
def _sigmoid_activation(x):
    return _sigmoid(x)


@ACTIVATION_LOWERINGS.register("hard_sigmoid")
def _hard_sigmoid_activation(x):
    return _hard_sigmoid(x)


@ACTIVATION_LOWERINGS.register("sparse_sigmoid")
def _sparse_sigmoid(x):
    return tf.clip_by_value((x + 1.0) / 2.0, 0.0, 1.0)


@ACTIVATION_LOWERINGS.register("log_sigmoid")
def _log_sigmoid(x):
    return -_softplus(-x)


@ACTIVATION_LOWERINGS.register("silu")
def _silu(x):
    return x * _sigmoid(x)


@ACTIVATION_LOWERINGS.register("swish")
def _swish(x):
    return x * _sigmoid(x)


@ACTIVATION_LOWERINGS.register("hard_silu")
def _hard_silu(x):
    return x * _hard_sigmoid(x)


@ACTIVATION_LOWERINGS.register("hard_swish")
def _hard_swish(x):
    return x * _hard_sigmoid(x)


@ACTIVATION_LOWERINGS.register("mish")
def _mish(x):
    return x * tf.tanh(_softplus(x))


@ACTIVATION_LOWERINGS.register("softplus")
def _softplus_activation(x):
    return _softplus(x)


@ACTIVATION_LOWERINGS.register("softsign")
def _softsign(x):
    return x / (1.0 + tf.abs(x))


@ACTIVATION_LOWERINGS.register("sparse_plus")
def _sparse_plus(x):
    middle = tf.square(x + 1.0) / 4.0
    return tf.where(x <= -1.0, tf.zeros_like(x), tf.where(x >= 1.0, x, middle))


@ACTIVATION_LOWERINGS.register("squareplus")
def _squareplus(x, b=4.0):
    return (x + tf.sqrt(x * x + np.float32(b))) / 2.0


@ACTIVATION_LOWERINGS.register("exponential")
def _exponential(x):
    return tf.exp(x)


# -- activations: tanh family and shrinkage ------------------------------------------------------


@ACTIVATION_LOWERINGS.register("tanh")
def _tanh(x):
    return tf.tanh(x)


@ACTIVATION_LOWERINGS.register("hard_tanh")
def _hard_tanh(x):
    return tf.clip_by_value(x, -1.0, 1.0)


@ACTIVATION_LOWERINGS.register("tanh_shrink")
def _tanh_shrink(x):
    return x - tf.tanh(x)


@ACTIVATION_LOWERINGS.register("hard_shrink")
def _hard_shrink(x, threshold=0.5):
    return tf.where(tf.abs(x) > threshold, x, tf.zeros_like(x))


@ACTIVATION_LOWERINGS.register("soft_shrink")
def _soft_shrink(x, threshold=0.5):
    return tf.sign(x) * tf.maximum(tf.abs(x) - threshold, 0.0)


# -- activations: along an axis ------------------------------------------------------------------


@ACTIVATION_LOWERINGS.register("softmax")
def _softmax(x, axis=-1):
    return tf.nn.softmax(x, axis=axis)


@ACTIVATION_LOWERINGS.register("log_softmax")
def _log_softmax(x, axis=-1):
    return tf.nn.log_softmax(x, axis=axis)


@ACTIVATION_LOWERINGS.register("glu")
def _glu(x, axis=-1):
    a, b = tf.split(x, 2, axis=axis)
    return a * _sigmoid(b)


@ACTIVATION_LOWERINGS.register("sparsemax")
def _sparsemax(x, axis=-1):
    # Sorting and cumulative sums run along the last axis (TOPK_V2, CUMSUM): move ``axis`` there and back.
    rank = x.shape.rank
    axis = axis % rank
    perm = [d for d in range(rank) if d != axis] + [axis]
    moved = tf.transpose(x, perm) if axis != rank - 1 else x
    y = _sparsemax_last_axis(moved)
    return tf.transpose(y, np.argsort(perm).tolist()) if axis != rank - 1 else y


def _sparsemax_last_axis(x):
    # Keras's formula, as the reference: tau sums the cumulative sums over the support.
    size = int(x.shape[-1])
    z_sorted = tf.math.top_k(x, k=size, sorted=True).values
    cumulative = tf.cumsum(z_sorted, axis=-1)
    r = tf.constant(np.arange(1, size + 1, dtype=np.float32))
    support = z_sorted - (cumulative - 1.0) / r > 0
    k = tf.reduce_sum(tf.cast(support, tf.float32), axis=-1, keepdims=True)
    total = tf.reduce_sum(tf.where(support, cumulative, tf.zeros_like(cumulative)), axis=-1, keepdims=True)
    tau = (total - 1.0) / k
    return tf.maximum(x - tau, 0.0)
