"""ONNX lowering of the compact graph: one task's `onnx.ModelProto`, built node by node with `onnx.helper`.

Why direct emission rather than tf2onnx: every compact op has one small lowering function
in `LOWERINGS` (every activation one in `ACTIVATION_LOWERINGS`), registered beside it as
in ``onnx/reference/ops``. Building needs no TensorFlow, is fast, and, above all, the
weight encoding is ours: tf2onnx would write dense initializers (or sparse ones with int64
indices) and leave no say in how they are stored.

How weights are stored (``sparse=True``): a weight with zeros is stored as a packed
bitmask (uint8, one bit per element, `numpy.packbits` little-endian bit order) and its
nonzero values in row-major order, ``ceil(n / 8) + nnz * itemsize`` bytes
(`mann_edge.converters.lowering.encode_bitmask`). ONNX's own sparse initializers need
int64 indices (8 bytes per nonzero besides the value), too big. A few standard ops expand
the pair into the dense weight, all reading only initializers, so onnxruntime
constant-folds them once when a session is created and runs dense MatMul/Conv kernels
afterwards (checked in the tests on the session's optimized model). Folding costs about
50 ms per million weight elements, once, when a task's session is created:

    bits   = Mod(Div(Cast<int32>(mask)[:, None], [1, 2, 4, ..., 128]), 2)   flattened, sliced to n
    slots  = CumSum(bits) * bits                   # k for the k-th nonzero, 0 where absent
    weight = Reshape(Gather(Concat([0], values), slots), shape)

A weight whose encoding (with its ~1 kB of expansion nodes) would not be smaller than
its dense bytes is stored dense. ``sparse=False`` stores every weight dense: the baseline
for size ratios. ``dtype="float16"`` stores the values (dense or encoded) as float16 with
a Cast to float32 that folds at load too: everything computes in float32.

Opset 17 (IR version 8): run by onnxruntime 1.13 and later on desktop and mobile, and it
has every op used here (including CumSum, Shrink, Celu and Softmax over any axis).
Tensors are NHWC as in Keras; convolutions and pools transpose to NCHW and back
(onnxruntime's layout optimizer removes the pairs between consecutive ones), with
TensorFlow's 'same' padding written as explicit pads (`mann_edge.graph.windows`). The
batch dimension is dynamic.

A lowering is ``fn(g, node, inputs) -> output tensor name``: ``g`` is the task's
`GraphBuilder` (``g.op`` adds a node, ``g.weight`` gives a weight as a float32 tensor,
``g.shape``/``g.dtype_of`` describe a tensor) and ``inputs`` are the names of the node's
input tensors. An activation lowering is ``fn(g, x, shape, **params) -> tensor name``,
``shape`` being the static shape of ``x`` (batch None), for the activations along an axis.

Example:
    >>> proto = build_task_model(cm, "digits", dtype="float16")
    >>> [i.name for i in proto.graph.input]
    ['digits_in']
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import numpy as np

from mann_edge._version import __version__
from mann_edge.converters.lowering import bitmask_nbytes, check_nodes, encode_bitmask, lowering_tables, split_activation
from mann_edge.converters.options import check_dtype
from mann_edge.errors import ConversionError
from mann_edge.graph.activations import SELU_ALPHA, SELU_SCALE
from mann_edge.graph.model import CompactModel, Node, Task
from mann_edge.graph.ops import causal_bias
from mann_edge.graph.windows import output_sizes, window_pads

__all__ = [
    "OWNER",
    "OPSET",
    "IR_VERSION",
    "LOWERINGS",
    "ACTIVATION_LOWERINGS",
    "check_lowerings",
    "GraphBuilder",
    "build_task_model",
]

OWNER = "ONNX export"
OPSET = 17
IR_VERSION = 8
# Serialized bytes the expansion nodes of one encoded weight add (measured: ~700, plus ~250 for the
# constants a graph shares); an encoding must beat the dense bytes by this much to be chosen.
_EXPANSION_BYTES = 1024

LOWERINGS, ACTIVATION_LOWERINGS = lowering_tables(OWNER)


def check_lowerings(model: CompactModel) -> None:
    """Raises ConversionError naming the first op or activation of ``model`` without an ONNX lowering."""
    check_nodes(model.nodes, LOWERINGS, ACTIVATION_LOWERINGS)


# -- building one task's graph -------------------------------------------------------------------


class GraphBuilder:
    """Collects the nodes, initializers and tensor shapes of one task's ONNX graph.

    ``g.op(op_type, inputs, **attributes)`` adds a node and returns its output's name,
    ``g.const(value)`` an initializer for a small constant, ``g.weight(key)`` the model
    weight ``key`` as a float32 tensor (stored dense or bitmask-encoded, once per graph).
    """

    def __init__(self, model: CompactModel, task: Task, *, dtype: str, sparse: bool):
        import onnx.helper

        self.helper = onnx.helper
        self.model, self.task, self.dtype, self.sparse = model, task, dtype, sparse
        self.nodes: list = []
        self.initializers: list = []
        self.shapes: dict[str, tuple] = {}
        self.dtypes: dict[str, str] = {}
        self.scope = task.name
        # Output names are taken by the task's outputs: node tensors must not use them.
        self._names: set[str] = {spec.name for spec in task.inputs} | {spec.name for spec in task.outputs}
        self._constants: dict[tuple, str] = {}
        self._weights: dict[str, str] = {}

    def unique(self, hint: str) -> str:
        """A tensor or node name not used yet in this graph, ``hint`` itself when free."""
        name, count = hint, 1
        while name in self._names:
            count += 1
            name = f"{hint}_{count}"
        self._names.add(name)
        return name

    def op(self, op_type: str, inputs: Sequence[str], outputs: int = 1, **attributes) -> "str | list[str]":
        """Adds an ``op_type`` node in the current scope; returns its output name (a list if ``outputs`` > 1)."""
        names = [self.unique(f"{self.scope}/{op_type}") for _ in range(outputs)]
        # A node is named after its first output (node and tensor names are separate namespaces in ONNX).
        self.nodes.append(self.helper.make_node(op_type, list(inputs), names, name=names[0], **attributes))
        return names[0] if outputs == 1 else names

    def const(self, value, dtype: str = "float32") -> str:
        """An initializer holding ``value`` (a scalar or small array), shared by equal constants."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = self._initializer(array, f"const/{array.dtype}{list(array.shape)}")
        return self._constants[key]

    def _initializer(self, array: np.ndarray, hint: str) -> str:
        from onnx import numpy_helper

        name = self.unique(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def shape(self, tensor: str) -> tuple:
        return self.shapes[tensor]

    def dtype_of(self, tensor: str) -> str:
        return self.dtypes[tensor]

    def as_float(self, tensor: str) -> str:
        """``tensor`` cast to float32 unless it is already."""
        if self.dtypes.get(tensor, "float32") == "float32":
            return tensor
        return self.op("Cast", [tensor], to=self.helper.np_dtype_to_tensor_dtype(np.dtype("float32")))

    def weight(self, key: str) -> str:
        """Model weight ``key`` as a float32 (or, for integer weights, as stored) tensor of its shape."""
        if key not in self._weights:
            # Short scope names: an encoded weight's dozen expansion nodes each repeat it twice.
            scope, self.scope = self.scope, f"w{len(self._weights)}"
            try:
                self._weights[key] = self._weight_tensor(key, self.model.dense_weight(key))
            finally:
                self.scope = scope
        return self._weights[key]

    def _weight_tensor(self, key: str, array: np.ndarray) -> str:
        if not np.issubdtype(array.dtype, np.floating):
            return self._initializer(array, f"weight:{key}")
        array = array.astype(self.dtype)
        encoded = self.sparse and bitmask_nbytes(array) + _EXPANSION_BYTES < array.nbytes
        if not encoded:
            return self._to_float32(self._initializer(array, f"weight:{key}"))
        mask, values = encode_bitmask(array)
        if values.size == 0:  # nothing to gather: a constant of zeros
            zeros = self.helper.make_tensor("zero", self.helper.np_dtype_to_tensor_dtype(np.dtype("float32")), [1], [0.0])
            return self.op("ConstantOfShape", [self.const(array.shape, "int64")], value=zeros)
        int32 = self.helper.np_dtype_to_tensor_dtype(np.dtype("int32"))
        mask_name = self._initializer(mask, f"weight:{key}:mask")
        values_name = self._to_float32(self._initializer(values, f"weight:{key}:values"))
        column = self.op("Reshape", [self.op("Cast", [mask_name], to=int32), self.const([-1, 1], "int64")])
        bits = self.op("Mod", [self.op("Div", [column, self.const(1 << np.arange(8), "int32")]), self.const(2, "int32")])
        bits = self.op("Reshape", [bits, self.const([-1], "int64")])
        if mask.size * 8 != array.size:  # the last byte's unused bits
            bits = self.op("Slice", [bits, self.const([0], "int64"), self.const([array.size], "int64")])
        slots = self.op("Mul", [self.op("CumSum", [bits, self.const(0, "int32")]), bits])
        table = self.op("Concat", [self.const([0.0]), values_name], axis=0)
        return self.op("Reshape", [self.op("Gather", [table, slots], axis=0), self.const(array.shape, "int64")])

    def _to_float32(self, name: str) -> str:
        if self.dtype == "float32":
            return name
        return self.op("Cast", [name], to=self.helper.np_dtype_to_tensor_dtype(np.dtype("float32")))


def build_task_model(model: CompactModel, task: str, *, dtype: str = "float32", sparse: bool = True,
                     metadata: Mapping[str, str] | None = None):
    """The `onnx.ModelProto` of one task (not checked, not saved); ``metadata`` goes to metadata_props.

    Raises:
        ConversionError: an op or activation without a lowering, or a lowering that fails,
            naming the task, node and op.

    Example:
        >>> proto = build_task_model(cm, "digits", dtype="float16")
        >>> [i.name for i in proto.graph.input]
        ['digits_in']
    """
    import onnx
    from onnx import helper

    check_dtype("onnx", dtype, owner=OWNER)
    check_lowerings(model)
    spec_task = model.task(task)
    g = GraphBuilder(model, spec_task, dtype=dtype, sparse=sparse)
    values: dict[str, str] = {}
    for spec in spec_task.inputs:
        values[spec.name] = spec.name
        g.shapes[spec.name], g.dtypes[spec.name] = spec.shape, spec.dtype
    for node in model.task_nodes(task):
        g.scope = node.name
        try:
            out = LOWERINGS[node.op](g, node, [values[name] for name in node.inputs])
        except ConversionError:
            raise
        except (KeyError, ValueError, TypeError, IndexError) as error:
            raise ConversionError(
                f"ONNX export of task {task!r}: node '{node.name}' (layer '{node.attrs.get('layer')}', op {node.op}) "
                f"cannot be lowered: {type(error).__name__}: {error}"
            ) from None
        values[node.name] = out
        g.shapes[out], g.dtypes[out] = node.shape, node.dtype
    for spec, tensor in zip(spec_task.outputs, spec_task.output_tensors):
        # Identity: an output that is also an input, or listed twice, still gets its own name.
        g.nodes.append(helper.make_node("Identity", [values[tensor]], [spec.name], name=spec.name))
    graph = helper.make_graph(
        g.nodes,
        _graph_name(task),
        [_value_info(spec) for spec in spec_task.inputs],
        [_value_info(spec, output=True) for spec in spec_task.outputs],
        initializer=g.initializers,
        doc_string=f"mann-edge task {task!r}",
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="mann-edge",
        producer_version=__version__,
    )
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as error:
        raise ConversionError(f"ONNX export of task {task!r}: shape inference rejects the graph: {error}") from None
    # The outputs' sizes are what the graph computes (Keras's static shape of a glu output is its input's).
    for declared, found in zip(proto.graph.output, inferred.graph.output):
        declared.type.CopyFrom(found.type)
    helper.set_model_props(proto, dict(metadata or {}))
    return proto


def _graph_name(task: str) -> str:
    return re.sub(r"\W", "_", task) or "task"


def _value_info(spec, output: bool = False):
    """Name, dtype and shape of a graph input (an output's sizes past the batch are left to shape inference)."""
    from onnx import helper

    dims = [d if d is not None else ("batch" if i == 0 else f"{spec.name}_dim{i}") for i, d in enumerate(spec.shape)]
    if output:
        dims = dims[:1] + [None] * (len(dims) - 1)
    return helper.make_tensor_value_info(spec.name, helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype)), dims)


# -- lowering helpers ----------------------------------------------------------------------------


def _activate(g: GraphBuilder, node: Node, x: str, shape: tuple) -> str:
    name, params = split_activation(node.attrs.get("activation"))
    return ACTIVATION_LOWERINGS[name](g, x, shape, **params)


def _static(shape: tuple, what: str) -> tuple[int, ...]:
    if any(d is None for d in shape[1:]):
        raise ValueError(f"{what} needs static sizes besides the batch. Received shape {shape}")
    return tuple(int(d) for d in shape[1:])


def _pads(node: Node, spatial: tuple[int, ...], kernel, strides, dilation=None) -> list[int]:
    """ONNX pads (all befores, then all afters: [top, left, bottom, right]) for TensorFlow's 'same' or 'valid'."""
    pads = window_pads(node.attrs["padding"], spatial, kernel, strides, dilation)
    return [before for before, _ in pads] + [after for _, after in pads]


def _nchw(g: GraphBuilder, x: str, rank: int = 4) -> str:
    """Channels-last to channels-first (NHWC -> NCHW, NDHWC -> NCDHW)."""
    return g.op("Transpose", [x], perm=[0, rank - 1, *range(1, rank - 1)])


def _nhwc(g: GraphBuilder, x: str, rank: int = 4) -> str:
    """Channels-first back to channels-last."""
    return g.op("Transpose", [x], perm=[0, *range(2, rank), 1])


# -- ops: linear algebra -------------------------------------------------------------------------


@LOWERINGS.register("dense")
def _dense(g, node, inputs):
    (x,) = inputs
    kernel = g.weight(node.weights["kernel"])
    units = g.model.weights[node.weights["kernel"]].shape[-1]
    y = g.op("MatMul", [g.as_float(x), kernel])  # over the last axis, any leading axes
    if "bias" in node.weights:
        y = g.op("Add", [y, g.weight(node.weights["bias"])])
    return _activate(g, node, y, (*g.shape(x)[:-1], units))


def _conv(g, node, x: str, kernel: str, taps: tuple, channels: int, group: int = 1) -> str:
    """ONNX Conv over the spatial axes of channels-last ``x``: ``kernel`` in ONNX's (out, in / group, *taps)
    layout, the node's bias, strides, dilation, TensorFlow padding and activation; ``channels`` out."""
    rank = len(taps) + 2
    spatial = _static(g.shape(x), node.op)[:len(taps)]
    strides = tuple(node.attrs["strides"])
    dilation = tuple(node.attrs.get("dilation", (1,) * len(taps)))
    conv_inputs = [_nchw(g, g.as_float(x), rank), kernel]
    if "bias" in node.weights:
        conv_inputs.append(g.weight(node.weights["bias"]))
    grouped = {"group": group} if group != 1 else {}
    y = g.op("Conv", conv_inputs, kernel_shape=list(taps), strides=list(strides), dilations=list(dilation),
             **grouped, pads=_pads(node, spatial, taps, strides, dilation))
    out = output_sizes(node.attrs["padding"], spatial, taps, strides, dilation)
    return _activate(g, node, _nhwc(g, y, rank), (None, *out, channels))


@LOWERINGS.register("conv2d", "conv3d")
def _convolution(g, node, inputs):
    *taps, _, cout = g.model.weights[node.weights["kernel"]].shape
    # (*taps, cin, cout) -> (cout, cin, *taps); folded at load
    perm = [len(taps) + 1, len(taps), *range(len(taps))]
    kernel = g.op("Transpose", [g.weight(node.weights["kernel"])], perm=perm)
    return _conv(g, node, inputs[0], kernel, tuple(taps), cout)


@LOWERINGS.register("depthwise_conv2d")
def _depthwise_conv2d(g, node, inputs):
    kh, kw, cin, multiplier = g.model.weights[node.weights["kernel"]].shape
    # (kh, kw, cin, m) -> (cin * m, 1, kh, kw): group c holds output channels c * m .. c * m + m - 1; folded at load
    kernel = g.op("Transpose", [g.weight(node.weights["kernel"])], perm=[2, 3, 0, 1])
    kernel = g.op("Reshape", [kernel, g.const([cin * multiplier, 1, kh, kw], "int64")])
    return _conv(g, node, inputs[0], kernel, (kh, kw), cin * multiplier, group=int(cin))


@LOWERINGS.register("attention")
def _attention(g, node, inputs):
    query, value, key = inputs
    attrs = node.attrs
    rank = len(g.shape(query))
    scale = g.const(np.float32(attrs.get("scale", 1.0)))
    if attrs.get("score_mode", "dot") == "dot":
        swapped = [*range(rank - 2), rank - 1, rank - 2]
        scores = g.op("Mul", [g.op("MatMul", [query, g.op("Transpose", [key], perm=swapped)]), scale])
    else:
        pairs = g.op("Add", [g.op("Unsqueeze", [query, g.const([rank - 1], "int64")]),
                             g.op("Unsqueeze", [key, g.const([rank - 2], "int64")])])
        summed = g.op("ReduceSum", [g.op("Tanh", [g.op("Mul", [pairs, scale])]), g.const([-1], "int64")], keepdims=0)
        scores = g.op("Mul", [summed, g.const(np.float32(attrs.get("concat_weight", 1.0)))])
    if attrs.get("causal", False):
        scores = g.op("Add", [scores, g.const(causal_bias(g.shape(query)[-2], g.shape(key)[-2]))])
    return g.op("MatMul", [g.op("Softmax", [scores], axis=-1), value])


@LOWERINGS.register("embedding")
def _embedding(g, node, inputs):
    (ids,) = inputs
    table = g.weight(node.weights["table"])
    vocab = g.model.weights[node.weights["table"]].shape[0]
    kind = g.dtype_of(ids)
    if not kind.startswith("int"):
        ids, kind = g.op("Cast", [ids], to=g.helper.np_dtype_to_tensor_dtype(np.dtype("int64"))), "int64"
    # Gather would read a negative id from the end; send it out of range so that it is refused, as the reference
    # does: id + (vocab + 1) * -min(id, 0) is id for id >= 0 and -id * vocab >= vocab below. For int32 ids (Keras's)
    # -min(id, 0) is relu(-id), which the mobile execution providers take (NNAPI and Core ML take neither Less/Where
    # nor an integer Min); onnxruntime's CPU Relu has no int64 kernel, so other ids use Min.
    if kind == "int32":
        below = g.op("Relu", [g.op("Sub", [g.const(0, kind), ids])])
    else:
        below = g.op("Sub", [g.const(0, kind), g.op("Min", [ids, g.const(0, kind)])])
    ids = g.op("Add", [ids, g.op("Mul", [below, g.const(vocab + 1, kind)])])
    return g.op("Gather", [table, ids], axis=0)


@LOWERINGS.register("scale_shift")
def _scale_shift(g, node, inputs):
    (x,) = inputs
    return g.op("Add", [g.op("Mul", [x, g.weight(node.weights["scale"])]), g.weight(node.weights["shift"])])


@LOWERINGS.register("layer_norm")
def _layer_norm(g, node, inputs):
    """Normalization over ``axes``; over the last axis alone (Keras's default) the means are a MatMul by a
    constant column of 1/n: the mobile providers share MatMul, not a reduction (NNAPI has ReduceMean only,
    Core ML ReduceSum only)."""
    (x,) = inputs
    shape = g.shape(x)
    axes = [int(a) % len(shape) for a in node.attrs["axes"]]
    if axes == [len(shape) - 1]:
        width = int(shape[-1])
        column = g.const(np.full((width, 1), 1 / width, np.float32))

        def mean(value):
            return g.op("MatMul", [value, column])
    else:
        def mean(value):
            return g.op("ReduceMean", [value], axes=axes, keepdims=1)
    centered = g.op("Sub", [x, mean(x)])
    variance = mean(g.op("Mul", [centered, centered]))
    scale = g.op("Sqrt", [g.op("Add", [variance, g.const(np.float32(node.attrs["epsilon"]))])])
    y = g.op("Div", [centered, scale])
    broadcast = [1] * len(shape)
    for axis in axes:
        broadcast[axis] = int(shape[axis])
    for role, combine in (("gamma", "Mul"), ("beta", "Add")):
        if role in node.weights:
            weight = g.op("Reshape", [g.weight(node.weights[role]), g.const(broadcast, "int64")])  # folded at load
            y = g.op(combine, [y, weight])
    return y


# -- ops: pooling --------------------------------------------------------------------------------


def _pool(g, node, x, op_type, **attributes):
    """A 2-D or 3-D pool (by the rank of ``x``), channels-first inside."""
    rank = len(g.shape(x))
    spatial = _static(g.shape(x), node.op)[:rank - 2]
    pool, strides = tuple(node.attrs["pool_size"]), tuple(node.attrs["strides"])
    pads = _pads(node, spatial, pool, strides)
    y = g.op(op_type, [_nchw(g, x, rank)], kernel_shape=list(pool), strides=list(strides), pads=pads, **attributes)
    return _nhwc(g, y, rank)


@LOWERINGS.register("max_pool2d", "max_pool3d")
def _max_pool(g, node, inputs):
    return _pool(g, node, inputs[0], "MaxPool")  # padded cells never win, as with TensorFlow's -inf padding


@LOWERINGS.register("avg_pool2d", "avg_pool3d")
def _avg_pool(g, node, inputs):
    # count_include_pad=0: padded cells are left out of the count, as in TensorFlow and the reference.
    return _pool(g, node, inputs[0], "AveragePool", count_include_pad=0)


def _reduce(g, node, x, op_type):
    return g.op(op_type, [x], axes=[int(a) for a in node.attrs["axes"]], keepdims=int(bool(node.attrs.get("keepdims", False))))


def _global_pool(g, node, x, pool: str, reduce: str) -> str:
    """A pool over every spatial axis of a channels-last tensor as ONNX's global pool, other axes as a reduction.

    The mobile execution providers (NNAPI, Core ML) take GlobalMaxPool/GlobalAveragePool over an
    image, not ReduceMax (nor, Core ML, ReduceMean): a sequence pools as a one-column image.
    """
    rank = len(g.shape(x))
    if sorted(int(a) for a in node.attrs["axes"]) != list(range(1, rank - 1)) or rank > 4:
        return _reduce(g, node, x, reduce)
    y = _nchw(g, x, rank)
    if rank == 3:
        y = g.op("Reshape", [y, g.const([0, 0, -1, 1], "int64")])
    y = g.op(pool, [y])
    keep = [0, *[1] * (rank - 2), -1] if node.attrs.get("keepdims", False) else [0, -1]
    return g.op("Reshape", [y, g.const(keep, "int64")])


@LOWERINGS.register("global_avg_pool")
def _global_avg_pool(g, node, inputs):
    return _global_pool(g, node, inputs[0], "GlobalAveragePool", "ReduceMean")


@LOWERINGS.register("global_max_pool")
def _global_max_pool(g, node, inputs):
    return _global_pool(g, node, inputs[0], "GlobalMaxPool", "ReduceMax")


# -- ops: shape and wiring -----------------------------------------------------------------------


@LOWERINGS.register("flatten")
def _flatten(g, node, inputs):
    # a Reshape: Core ML's ML Program provider has no Flatten (NNAPI and its NeuralNetwork provider take both)
    return g.op("Reshape", [inputs[0], g.const([0, -1], "int64")])


@LOWERINGS.register("reshape")
def _reshape(g, node, inputs):
    (x,) = inputs
    shape = [int(d) for d in node.attrs["shape"]]
    if -1 in shape:  # resolved here, so that the batch (0: copied from the input) is the only free size
        known = math.prod(d for d in shape if d != -1)
        shape[shape.index(-1)] = math.prod(_static(g.shape(x), "reshape")) // known
    return g.op("Reshape", [x, g.const([0, *shape], "int64")])


@LOWERINGS.register("add")
def _add(g, node, inputs):
    return _fold(g, inputs, "Add")


def _fold(g, inputs, op_type: str) -> str:
    result = inputs[0]
    for x in inputs[1:]:  # left to right, as the reference
        result = g.op(op_type, [result, x])
    return result


@LOWERINGS.register("subtract")
def _subtract(g, node, inputs):
    return g.op("Sub", list(inputs))


@LOWERINGS.register("divide")
def _divide(g, node, inputs):
    return g.op("Div", list(inputs))


@LOWERINGS.register("multiply")
def _multiply(g, node, inputs):
    return _fold(g, inputs, "Mul")


@LOWERINGS.register("maximum")
def _maximum(g, node, inputs):
    return _fold(g, inputs, "Max")


@LOWERINGS.register("minimum")
def _minimum(g, node, inputs):
    return _fold(g, inputs, "Min")


@LOWERINGS.register("average")
def _average(g, node, inputs):
    return g.op("Div", [_fold(g, inputs, "Add"), g.const(np.float32(len(inputs)))])


@LOWERINGS.register("transpose")
def _transpose(g, node, inputs):
    return g.op("Transpose", [inputs[0]], perm=[int(p) for p in node.attrs["perm"]])


@LOWERINGS.register("tile")
def _tile(g, node, inputs):
    return g.op("Tile", [inputs[0], g.const([1, *node.attrs["reps"]], "int64")])


@LOWERINGS.register("pad")
def _pad(g, node, inputs):
    pads = list(node.attrs["pads"])
    return g.op("Pad", [inputs[0], g.const([0, *pads[0::2], 0, *pads[1::2]], "int64")], mode="constant")


@LOWERINGS.register("crop")
def _crop(g, node, inputs):
    (x,) = inputs
    crops = list(node.attrs["crops"])
    sizes = _static(g.shape(x), "crop")
    ends = [d - a for d, a in zip(sizes, crops[1::2])]
    axes = list(range(1, len(sizes) + 1))
    return g.op("Slice", [x, g.const(crops[0::2], "int64"), g.const(ends, "int64"), g.const(axes, "int64")])


@LOWERINGS.register("concat")
def _concat(g, node, inputs):
    return g.op("Concat", list(inputs), axis=int(node.attrs["axis"]))


@LOWERINGS.register("activation")
def _activation(g, node, inputs):
    (x,) = inputs
    return _activate(g, node, x, g.shape(x))


@LOWERINGS.register("zeros_like")
def _zeros_like(g, node, inputs):
    zero = g.helper.make_tensor("zero", g.helper.np_dtype_to_tensor_dtype(np.dtype("float32")), [1], [0.0])
    return g.op("ConstantOfShape", [g.op("Shape", [inputs[0]])], value=zero)


# -- activations: rectifiers ---------------------------------------------------------------------


@ACTIVATION_LOWERINGS.register("linear")
def _linear(g, x, shape):
    return x


@ACTIVATION_LOWERINGS.register("relu")
def _relu(g, x, shape, negative_slope=0.0, max_value=None, threshold=0.0):
    if negative_slope == 0 and threshold == 0:
        y = g.op("Relu", [x])
    else:
        below = g.op("Mul", [g.const(negative_slope), g.op("Sub", [x, g.const(threshold)])]) if negative_slope else g.const(0.0)
        y = g.op("Where", [g.op("GreaterOrEqual", [x, g.const(threshold)]), x, below])
    if max_value is not None:
        y = g.op("Min", [y, g.const(max_value)])
    return y


@ACTIVATION_LOWERINGS.register("relu6")
def _relu6(g, x, shape):
    return g.op("Clip", [x, g.const(0.0), g.const(6.0)])


@ACTIVATION_LOWERINGS.register("leaky_relu")
def _leaky_relu(g, x, shape, negative_slope=0.2):
    return g.op("LeakyRelu", [x], alpha=float(negative_slope))


@ACTIVATION_LOWERINGS.register("elu")
def _elu(g, x, shape, alpha=1.0):
    return g.op("Elu", [x], alpha=float(alpha))


@ACTIVATION_LOWERINGS.register("selu")
def _selu(g, x, shape):
    return g.op("Selu", [x], alpha=SELU_ALPHA, gamma=SELU_SCALE)


@ACTIVATION_LOWERINGS.register("celu")
def _celu(g, x, shape, alpha=1.0):
    return g.op("Celu", [x], alpha=float(alpha))


@ACTIVATION_LOWERINGS.register("gelu")
def _gelu(g, x, shape, approximate=False):
    half_x = g.op("Mul", [x, g.const(0.5)])
    if approximate:
        cube = g.op("Mul", [g.op("Mul", [x, x]), x])
        inner = g.op("Mul", [g.const(np.sqrt(2.0 / np.pi)), g.op("Add", [x, g.op("Mul", [g.const(0.044715), cube])])])
        return g.op("Mul", [half_x, g.op("Add", [g.const(1.0), g.op("Tanh", [inner])])])
    erf = g.op("Erf", [g.op("Div", [x, g.const(np.sqrt(2.0))])])
    return g.op("Mul", [half_x, g.op("Add", [g.const(1.0), erf])])


@ACTIVATION_LOWERINGS.register("threshold")
def _threshold(g, x, shape, threshold=0.0, default_value=0.0):
    return g.op("Where", [g.op("Greater", [x, g.const(threshold)]), x, g.const(default_value)])


# -- activations: sigmoids and smooth ------------------------------------------------------------


def _softplus(g, x):
    # log(1 + exp(x)) in the stable form the reference's logaddexp(0, x) takes: no overflow for large x.
    tail = g.op("Log", [g.op("Add", [g.const(1.0), g.op("Exp", [g.op("Neg", [g.op("Abs", [x])])])])])
    return g.op("Add", [g.op("Relu", [x]), tail])


def _hard_sigmoid(g, x):
    return g.op("HardSigmoid", [x], alpha=1.0 / 6.0, beta=0.5)


@ACTIVATION_LOWERINGS.register("sigmoid")
def _sigmoid(g, x, shape):
    return g.op("Sigmoid", [x])


@ACTIVATION_LOWERINGS.register("hard_sigmoid")
def _hard_sigmoid_activation(g, x, shape):
    return _hard_sigmoid(g, x)


@ACTIVATION_LOWERINGS.register("sparse_sigmoid")
def _sparse_sigmoid(g, x, shape):
    return g.op("Clip", [g.op("Div", [g.op("Add", [x, g.const(1.0)]), g.const(2.0)]), g.const(0.0), g.const(1.0)])


@ACTIVATION_LOWERINGS.register("log_sigmoid")
def _log_sigmoid(g, x, shape):
    return g.op("Neg", [_softplus(g, g.op("Neg", [x]))])


@ACTIVATION_LOWERINGS.register("silu")
def _silu(g, x, shape):
    return g.op("Mul", [x, g.op("Sigmoid", [x])])


@ACTIVATION_LOWERINGS.register("swish")
def _swish(g, x, shape):
    return _silu(g, x, shape)


@ACTIVATION_LOWERINGS.register("hard_silu")
def _hard_silu(g, x, shape):
    return g.op("HardSwish", [x])  # x * max(0, min(1, x / 6 + 0.5))


@ACTIVATION_LOWERINGS.register("hard_swish")
def _hard_swish(g, x, shape):
    return _hard_silu(g, x, shape)


@ACTIVATION_LOWERINGS.register("mish")
def _mish(g, x, shape):
    return g.op("Mul", [x, g.op("Tanh", [_softplus(g, x)])])


@ACTIVATION_LOWERINGS.register("softplus")
def _softplus_activation(g, x, shape):
    return _softplus(g, x)


@ACTIVATION_LOWERINGS.register("softsign")
def _softsign(g, x, shape):
    return g.op("Softsign", [x])


@ACTIVATION_LOWERINGS.register("sparse_plus")
def _sparse_plus(g, x, shape):
    shifted = g.op("Add", [x, g.const(1.0)])
    middle = g.op("Div", [g.op("Mul", [shifted, shifted]), g.const(4.0)])
    upper = g.op("Where", [g.op("GreaterOrEqual", [x, g.const(1.0)]), x, middle])
    return g.op("Where", [g.op("LessOrEqual", [x, g.const(-1.0)]), g.const(0.0), upper])


@ACTIVATION_LOWERINGS.register("squareplus")
def _squareplus(g, x, shape, b=4.0):
    root = g.op("Sqrt", [g.op("Add", [g.op("Mul", [x, x]), g.const(b)])])
    return g.op("Div", [g.op("Add", [x, root]), g.const(2.0)])


@ACTIVATION_LOWERINGS.register("exponential")
def _exponential(g, x, shape):
    return g.op("Exp", [x])


# -- activations: tanh family and shrinkage ------------------------------------------------------


@ACTIVATION_LOWERINGS.register("tanh")
def _tanh(g, x, shape):
    return g.op("Tanh", [x])


@ACTIVATION_LOWERINGS.register("hard_tanh")
def _hard_tanh(g, x, shape):
    return g.op("Clip", [x, g.const(-1.0), g.const(1.0)])


@ACTIVATION_LOWERINGS.register("tanh_shrink")
def _tanh_shrink(g, x, shape):
    return g.op("Sub", [x, g.op("Tanh", [x])])


@ACTIVATION_LOWERINGS.register("hard_shrink")
def _hard_shrink(g, x, shape, threshold=0.5):
    return g.op("Shrink", [x], lambd=float(threshold), bias=0.0)  # x where |x| > threshold, else 0


@ACTIVATION_LOWERINGS.register("soft_shrink")
def _soft_shrink(g, x, shape, threshold=0.5):
    return g.op("Shrink", [x], lambd=float(threshold), bias=float(threshold))  # sign(x) * max(|x| - t, 0)


# -- activations: along an axis ------------------------------------------------------------------


@ACTIVATION_LOWERINGS.register("softmax")
def _softmax(g, x, shape, axis=-1):
    return g.op("Softmax", [x], axis=int(axis))


@ACTIVATION_LOWERINGS.register("log_softmax")
def _log_softmax(g, x, shape, axis=-1):
    return g.op("LogSoftmax", [x], axis=int(axis))


@ACTIVATION_LOWERINGS.register("glu")
def _glu(g, x, shape, axis=-1):
    a, b = g.op("Split", [x], outputs=2, axis=int(axis))  # two equal halves
    return g.op("Mul", [a, g.op("Sigmoid", [b])])


@ACTIVATION_LOWERINGS.register("sparsemax")
def _sparsemax(g, x, shape, axis=-1):
    # Keras's formula, as the reference: tau sums the cumulative sums over the support.
    rank = len(shape)
    axis = int(axis) % rank
    size = shape[axis]
    if size is None:
        raise ValueError(f"sparsemax needs a static size along axis {axis}. Received shape {shape}")
    z_sorted, _ = g.op("TopK", [x, g.const([size], "int64")], outputs=2, axis=axis, largest=1, sorted=1)
    cumulative = g.op("CumSum", [z_sorted, g.const(axis, "int64")])
    r = np.arange(1, size + 1, dtype=np.float32).reshape([size if d == axis else 1 for d in range(rank)])
    threshold = g.op("Div", [g.op("Sub", [cumulative, g.const(1.0)]), g.const(r)])
    support = g.op("Greater", [g.op("Sub", [z_sorted, threshold]), g.const(0.0)])
    axes = g.const([axis], "int64")
    k = g.op("ReduceSum", [g.op("Cast", [support], to=g.helper.np_dtype_to_tensor_dtype(np.dtype("float32"))), axes], keepdims=1)
    total = g.op("ReduceSum", [g.op("Where", [support, cumulative, g.const(0.0)]), axes], keepdims=1)
    tau = g.op("Div", [g.op("Sub", [total, g.const(1.0)]), k])
    return g.op("Relu", [g.op("Sub", [x, tau])])
