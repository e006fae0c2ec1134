"""Core ML lowering of the compact graph: one task's MIL program, built directly with the MIL Builder.

Each compact op has one lowering in `LOWERINGS` and each activation one in
`ACTIVATION_LOWERINGS` (Keras 3 semantics, as in `mann_edge.graph.activations`),
registered beside it. A lowering is ``fn(builder, node, inputs) -> Var`` (``builder`` is
the task's `ProgramBuilder`, ``inputs`` the MIL vars of the node's inputs); an activation
lowering is ``fn(builder, x, **params) -> Var``.

Choices, and why:
- The MIL program is built from the compact graph, not through the TensorFlow frontend:
  every op and its padding is explicit, and no TensorFlow graph is needed.
- Tensors stay NHWC as in Keras; convolution and pooling (NCHW in MIL) are wrapped in
  transposes, which Core ML's passes cancel between consecutive spatial ops. TensorFlow's
  'same' padding (the extra pixel after) is written as explicit pads (`mann_edge.graph.windows`).
- The batch dimension is a range (1..``max_batch``), so one package serves batch 1 and 32.
- A weight whose bitmask form is smaller than its dense form is stored as
  ``constexpr_sparse_to_dense`` (iOS16/macOS13 and later: packed bits and a shape; iOS18/
  macOS15 and later: a uint1 mask shaped like the weight).
- ``dtype="float16"``: weights are float16 and the program computes in float16; inputs and
  outputs stay float32 at the model's interface.

Example:
    >>> built = build_program(cm, "digits", dtype="float16")
    >>> print(built.program)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from mann_edge.converters.lowering import bitmask_nbytes, check_nodes, encode_bitmask, lowering_tables, split_activation
from mann_edge.converters.options import check_dtype
from mann_edge.errors import ConversionError, FormatCannotExpressError
from mann_edge.graph.activations import SELU_ALPHA, SELU_SCALE
from mann_edge.graph.model import CompactModel, Node
from mann_edge.graph.ops import causal_bias
from mann_edge.graph.windows import window_pads
from mann_edge.runtime.coreml import FeatureIO, import_coremltools

__all__ = [
    "OWNER",
    "DEFAULT_TARGET",
    "DEFAULT_MAX_BATCH",
    "MULTIFUNCTION_SPEC",
    "LOWERINGS",
    "ACTIVATION_LOWERINGS",
    "deployment_target",
    "identifier",
    "check_lowerings",
    "ProgramBuilder",
    "TaskProgram",
    "build_program",
]

OWNER = "Core ML export"
DEFAULT_TARGET = "macOS13"
DEFAULT_MAX_BATCH = 1024
# Below iOS16/macOS13 there is no constexpr_sparse_to_dense; iOS18/macOS15 brings multifunction packages.
SPARSE_SPEC = 7
MULTIFUNCTION_SPEC = 9
# A weight blob in weights.bin carries a 64-byte header and is 64-byte aligned: a sparse
# weight has two blobs (mask, values), so it pays about one more blob than a dense one.
_BLOB_OVERHEAD = 64

LOWERINGS, ACTIVATION_LOWERINGS = lowering_tables(OWNER)


# -- targets and names -------------------------------------------------------------------------


def deployment_target(name: str):
    """The coremltools target enum for ``name`` (e.g. "macOS13", "iOS18"), or a ConversionError listing the valid ones.

    Example:
        >>> int(deployment_target("macOS15"))
        9
    """
    ct = import_coremltools()
    members = ct.target.__members__
    if not isinstance(name, str) or name not in members or members[name] < SPARSE_SPEC:
        supported = sorted(n for n, v in members.items() if v >= SPARSE_SPEC)
        raise ConversionError(
            f"{OWNER} takes a target with sparse weights (macOS13/iOS16 or later): {supported}. Received: {name!r}"
        )
    return members[name]


def identifier(name: str, taken: set[str]) -> str:
    """A Core ML feature/function name for ``name``: letters, digits, underscores, not in ``taken`` (then added).

    Example:
        >>> taken = set()
        >>> identifier("digits/v2", taken), identifier("Digits_v2", taken)
        ('digits_v2', 'Digits_v2_2')
    """
    base = re.sub(r"[^A-Za-z0-9_]", "_", name) or "_"
    if base[0].isdigit():
        base = f"_{base}"
    candidate, suffix = base, 2
    while candidate.lower() in taken:
        candidate, suffix = f"{base}_{suffix}", suffix + 1
    taken.add(candidate.lower())
    return candidate


# -- building one task's program ---------------------------------------------------------------


@dataclass
class ProgramBuilder:
    """State while one task is lowered: the MIL var of each tensor, and how weights are written.

    ``float_dtype`` is what weights and computation use (float32 or float16); ``sparse``
    says whether zeros go into ``constexpr_sparse_to_dense``.
    """

    model: CompactModel
    float_dtype: np.dtype
    sparse: bool
    spec_version: int
    values: dict = field(default_factory=dict)

    def scalar(self, value: float) -> np.ndarray:
        """A float constant in the program's float dtype (MIL ops want both operands of one dtype)."""
        return np.array(value, dtype=self.float_dtype)

    def weight(self, key: str, transform: Callable[[np.ndarray], np.ndarray] | None = None):
        """The weight ``key`` (after ``transform``, e.g. to MIL's layout) as a const or a sparse constexpr."""
        mb = _mb()
        array = self.model.dense_weight(key)
        if transform is not None:
            array = transform(array)
        array = np.ascontiguousarray(array, dtype=self.float_dtype)
        if not self.sparse or not array.any() or bitmask_nbytes(array) + _BLOB_OVERHEAD >= array.nbytes:
            return mb.const(val=array)
        if self.spec_version >= MULTIFUNCTION_SPEC:  # iOS18 takes the mask as a uint1 tensor of the weight's shape
            from coremltools.converters.mil.mil import types

            nonzero = array != 0
            return mb.constexpr_sparse_to_dense(nonzero_data=array[nonzero], mask=nonzero.astype(types.np_uint1_dtype))
        mask, values = encode_bitmask(array)
        return mb.constexpr_sparse_to_dense(nonzero_data=values, mask=mask, shape=np.array(array.shape, dtype=np.uint32))

    def activation(self, x, activation) -> object:
        name, params = split_activation(activation)
        return ACTIVATION_LOWERINGS[name](self, x, **params)


def _mb():
    import_coremltools()
    from coremltools.converters.mil import Builder

    return Builder


def _static_dims(var, node: Node, what: str) -> list[int]:
    """The non-batch dimensions of ``var``, which every lowering needs known."""
    from coremltools.converters.mil.mil.types.symbolic import is_symbolic

    dims = list(var.shape[1:])
    if any(is_symbolic(d) for d in dims):
        raise ConversionError(
            f"Core ML export: node '{node.name}' ({node.op}) needs the {what} dimensions known; got shape {var.shape}"
        )
    return [int(d) for d in dims]


def check_lowerings(model: CompactModel, tasks: Sequence[str]) -> None:
    """ConversionError naming the first op (and node) of ``tasks`` without a lowering, or activation without one."""
    nodes = {node.name: node for name in tasks for node in model.task_nodes(name)}
    check_nodes(nodes.values(), LOWERINGS, ACTIVATION_LOWERINGS)


# Core ML holds tensors of rank 5 at most.
MAX_RANK = 5


def _check_rank(node: Node) -> None:
    """ConversionError naming the node, its layer and the format when its output has more axes than Core ML holds."""
    if len(node.shape) > MAX_RANK:
        raise FormatCannotExpressError(
            f"{OWNER} cannot express layer '{node.attrs.get('layer')}' (node '{node.name}', op {node.op}): its output "
            f"has rank {len(node.shape)} and Core ML holds tensors of rank <= {MAX_RANK}"
        )


@dataclass
class TaskProgram:
    """One task's MIL program (function "main"), its features, and what `ct.convert` needs to know of its inputs."""

    task: str
    program: object
    inputs: tuple[FeatureIO, ...]
    outputs: tuple[FeatureIO, ...]
    input_types: list


def build_program(model: CompactModel, task: str, *, dtype: str = "float32", sparse: bool = True,
                  target: str = DEFAULT_TARGET, max_batch: int = DEFAULT_MAX_BATCH) -> TaskProgram:
    """The MIL program of one task, with the batch free between 1 and ``max_batch``.

    Example:
        >>> built = build_program(cm, "digits", dtype="float16")
        >>> print(built.program)
    """
    ct = import_coremltools()
    from coremltools.converters.mil.mil import Function, Program, get_new_symbol, types

    mb = _mb()
    spec = deployment_target(target)
    spec_task = model.task(task)
    check_lowerings(model, [task])
    check_dtype("coreml", dtype, owner=OWNER)
    float_dtype = np.dtype(dtype)
    builder = ProgramBuilder(model, float_dtype, sparse, int(spec))
    taken: set[str] = set()
    batch = get_new_symbol()
    placeholders, inputs = {}, []
    for spec_in in spec_task.inputs:
        if any(d is None for d in spec_in.shape[1:]):
            raise ConversionError(
                f"Core ML export: input {spec_in.describe()} of task {task!r} has an unknown non-batch dimension; "
                "only the batch may vary"
            )
        feature = identifier(spec_in.name, taken)
        is_int = spec_in.dtype.startswith("int")  # Core ML takes int32 ids (no int64 inputs)
        mil_dtype = types.int32 if is_int else types.fp32
        placeholders[feature] = mb.placeholder(shape=(batch, *spec_in.shape[1:]), dtype=mil_dtype)
        inputs.append(FeatureIO(spec_in.name, feature, "int32" if is_int else "float32"))
    with Function(placeholders, opset_version=spec) as function:
        for io_in in inputs:
            var = function.inputs[io_in.feature]
            if io_in.dtype == "float32" and float_dtype == np.float16:
                var = mb.cast(x=var, dtype="fp16")
            builder.values[io_in.name] = var
        for node in model.task_nodes(task):
            _check_rank(node)
            node_inputs = [builder.values[name] for name in node.inputs]
            try:
                builder.values[node.name] = LOWERINGS[node.op](builder, node, node_inputs)
            except ConversionError:
                raise
            except (ValueError, TypeError, AssertionError, IndexError) as error:
                raise ConversionError(
                    f"Core ML export: lowering op {node.op!r} (node '{node.name}', layer '{node.attrs.get('layer')}', "
                    f"task {task!r}) failed: {error}"
                ) from error
        # Output features are named last, clear of the names the builder gave to ops on the way.
        taken |= {var.name.lower() for op in function.operations for var in op.outputs}
        outputs = [FeatureIO(s.name, identifier(s.name, taken), "float32") for s in spec_task.outputs]
        results = []
        for io_out, tensor in zip(outputs, spec_task.output_tensors):
            var = builder.values[tensor]
            if var.dtype != types.fp32:
                results.append(mb.cast(x=var, dtype="fp32", name=io_out.feature))
            else:
                results.append(mb.identity(x=var, name=io_out.feature))
        function.set_outputs(results)
    program = Program()
    program.add_function("main", function)
    input_types = [
        ct.TensorType(
            name=io_in.feature,
            shape=ct.Shape((ct.RangeDim(1, max_batch, default=1), *spec_in.shape[1:])),
            dtype=np.int32 if io_in.dtype == "int32" else np.float32,
        )
        for io_in, spec_in in zip(inputs, spec_task.inputs)
    ]
    return TaskProgram(task, program, tuple(inputs), tuple(outputs), input_types)


# -- op lowerings ------------------------------------------------------------------------------


def _nhwc_to_nchw(x):
    """Channels-last to channels-first (NHWC -> NCHW, NDHWC -> NCDHW)."""
    return _mb().transpose(x=x, perm=[0, x.rank - 1, *range(1, x.rank - 1)])


def _nchw_to_nhwc(x):
    """Channels-first back to channels-last."""
    return _mb().transpose(x=x, perm=[0, *range(2, x.rank), 1])


def _spatial_pads(node: Node, x, kernel, strides, dilation=None) -> list[int]:
    """Explicit (before, after) pads per spatial axis for TensorFlow's 'same' (extra cell after) or 'valid' padding."""
    spatial = _static_dims(x, node, "spatial")[:len(kernel)]
    return [pad for pair in window_pads(node.attrs["padding"], spatial, kernel, strides, dilation) for pad in pair]


@LOWERINGS.register("dense")
def _dense(b: ProgramBuilder, node: Node, inputs):
    mb = _mb()
    (x,) = inputs
    weight = b.weight(node.weights["kernel"], lambda w: w.T)  # MIL's linear wants (out, in)
    bias = b.weight(node.weights["bias"]) if "bias" in node.weights else None
    if x.rank <= 3:
        y = mb.linear(x=x, weight=weight, bias=bias) if bias is not None else mb.linear(x=x, weight=weight)
    else:  # linear takes rank <= 3
        y = mb.matmul(x=x, y=weight, transpose_y=True)
        if bias is not None:
            y = mb.add(x=y, y=bias)
    return b.activation(y, node.attrs.get("activation"))


def _conv(b: ProgramBuilder, node: Node, x, weight, taps: tuple, groups: int = 1):
    """MIL conv over the spatial axes of channels-last ``x``: ``weight`` in MIL's (out, in / groups, *taps)
    layout, the node's bias, strides, dilation, TensorFlow padding and activation."""
    mb = _mb()
    strides = list(node.attrs["strides"])
    dilation = list(node.attrs.get("dilation", (1,) * len(taps)))
    options = {"bias": b.weight(node.weights["bias"])} if "bias" in node.weights else {}
    if groups != 1:
        options["groups"] = groups
    y = mb.conv(x=_nhwc_to_nchw(x), weight=weight, strides=strides, dilations=dilation, pad_type="custom",
                pad=_spatial_pads(node, x, taps, strides, dilation), **options)
    return b.activation(_nchw_to_nhwc(y), node.attrs.get("activation"))


@LOWERINGS.register("conv2d", "conv3d")
def _convolution(b: ProgramBuilder, node: Node, inputs):
    taps = b.model.weights[node.weights["kernel"]].shape[:-2]
    perm = (len(taps) + 1, len(taps), *range(len(taps)))  # (*taps, cin, cout) -> (cout, cin, *taps)
    return _conv(b, node, inputs[0], b.weight(node.weights["kernel"], lambda w: w.transpose(perm)), tuple(taps))


@LOWERINGS.register("depthwise_conv2d")
def _depthwise_conv2d(b: ProgramBuilder, node: Node, inputs):
    kh, kw, cin, multiplier = b.model.weights[node.weights["kernel"]].shape
    # (kh, kw, cin, m) -> (cin * m, 1, kh, kw): group c holds output channels c * m .. c * m + m - 1
    weight = b.weight(node.weights["kernel"], lambda w: w.transpose(2, 3, 0, 1).reshape(cin * multiplier, 1, kh, kw))
    return _conv(b, node, inputs[0], weight, (kh, kw), groups=int(cin))


def _pool(b: ProgramBuilder, node: Node, x, kind: str):
    mb = _mb()
    kernel, strides = list(node.attrs["pool_size"]), list(node.attrs["strides"])
    pads = _spatial_pads(node, x, kernel, strides)
    if kind == "max":  # MIL's max_pool never takes a padded cell (it pads with -inf)
        y = mb.max_pool(x=_nhwc_to_nchw(x), kernel_sizes=kernel, strides=strides, pad_type="custom", pad=pads)
    else:  # TensorFlow's 'same' average leaves padded cells out of the count
        y = mb.avg_pool(x=_nhwc_to_nchw(x), kernel_sizes=kernel, strides=strides, pad_type="custom", pad=pads,
                        exclude_padding_from_average=True)
    return _nchw_to_nhwc(y)


@LOWERINGS.register("max_pool2d", "max_pool3d")
def _max_pool(b: ProgramBuilder, node: Node, inputs):
    return _pool(b, node, inputs[0], "max")


@LOWERINGS.register("avg_pool2d", "avg_pool3d")
def _avg_pool(b: ProgramBuilder, node: Node, inputs):
    return _pool(b, node, inputs[0], "avg")


@LOWERINGS.register("global_avg_pool")
def _global_avg_pool(b: ProgramBuilder, node: Node, inputs):
    keep_dims = bool(node.attrs.get("keepdims", False))
    return _mb().reduce_mean(x=inputs[0], axes=list(node.attrs["axes"]), keep_dims=keep_dims)


@LOWERINGS.register("global_max_pool")
def _global_max_pool(b: ProgramBuilder, node: Node, inputs):
    keep_dims = bool(node.attrs.get("keepdims", False))
    return _mb().reduce_max(x=inputs[0], axes=list(node.attrs["axes"]), keep_dims=keep_dims)


@LOWERINGS.register("flatten")
def _flatten(b: ProgramBuilder, node: Node, inputs):
    (x,) = inputs
    return _mb().reshape(x=x, shape=[-1, math.prod(_static_dims(x, node, "non-batch"))])


@LOWERINGS.register("reshape")
def _reshape(b: ProgramBuilder, node: Node, inputs):
    (x,) = inputs
    size = math.prod(_static_dims(x, node, "non-batch"))
    shape = list(node.attrs["shape"])
    if shape.count(-1) == 1:  # resolve it here: MIL allows one -1, and the batch takes it
        known = math.prod(d for d in shape if d != -1)
        shape[shape.index(-1)] = size // known if known else 0
    if math.prod(shape) != size:
        raise ConversionError(
            f"Core ML export: node '{node.name}' reshapes {size} values per sample into {node.attrs['shape']}"
        )
    return _mb().reshape(x=x, shape=[-1, *shape])


@LOWERINGS.register("embedding")
def _embedding(b: ProgramBuilder, node: Node, inputs):
    mb = _mb()
    (ids,) = inputs
    from coremltools.converters.mil.mil import types

    if types.is_float(ids.dtype):  # ids computed in float (e.g. through a cast) are whole numbers
        ids = mb.cast(x=ids, dtype="int32")
    return mb.gather(x=b.weight(node.weights["table"]), indices=ids, axis=0)


@LOWERINGS.register("add")
def _add(b: ProgramBuilder, node: Node, inputs):
    return _fold(inputs, _mb().add)


def _fold(inputs, combine):
    result = inputs[0]
    for x in inputs[1:]:  # left to right, as the reference
        result = combine(x=result, y=x)
    return result


@LOWERINGS.register("subtract")
def _subtract(b: ProgramBuilder, node: Node, inputs):
    return _mb().sub(x=inputs[0], y=inputs[1])


@LOWERINGS.register("divide")
def _divide(b: ProgramBuilder, node: Node, inputs):
    return _mb().real_div(x=inputs[0], y=inputs[1])


@LOWERINGS.register("multiply")
def _multiply(b: ProgramBuilder, node: Node, inputs):
    return _fold(inputs, _mb().mul)


@LOWERINGS.register("maximum")
def _maximum(b: ProgramBuilder, node: Node, inputs):
    return _fold(inputs, _mb().maximum)


@LOWERINGS.register("minimum")
def _minimum(b: ProgramBuilder, node: Node, inputs):
    return _fold(inputs, _mb().minimum)


@LOWERINGS.register("average")
def _average(b: ProgramBuilder, node: Node, inputs):
    return _mb().real_div(x=_fold(inputs, _mb().add), y=b.scalar(len(inputs)))


@LOWERINGS.register("transpose")
def _transpose(b: ProgramBuilder, node: Node, inputs):
    return _mb().transpose(x=inputs[0], perm=list(node.attrs["perm"]))


@LOWERINGS.register("tile")
def _tile(b: ProgramBuilder, node: Node, inputs):
    return _mb().tile(x=inputs[0], reps=[1, *node.attrs["reps"]])


@LOWERINGS.register("pad")
def _pad(b: ProgramBuilder, node: Node, inputs):
    pads = [0, 0, *node.attrs["pads"]]  # MIL: (before, after) per axis, the batch's included
    return _mb().pad(x=inputs[0], pad=np.array(pads, np.int32), mode="constant", constant_val=b.scalar(0.0))


@LOWERINGS.register("crop")
def _crop(b: ProgramBuilder, node: Node, inputs):
    (x,) = inputs
    crops = list(node.attrs["crops"])
    sizes = _static_dims(x, node, "cropped")
    ends = [d - a for d, a in zip(sizes, crops[1::2])]
    masks = [True] + [False] * len(sizes)  # the batch is taken whole
    return _mb().slice_by_index(x=x, begin=[0, *crops[0::2]], end=[0, *ends], begin_mask=masks, end_mask=masks)


@LOWERINGS.register("attention")
def _attention(b: ProgramBuilder, node: Node, inputs):
    mb = _mb()
    query, value, key = inputs
    attrs = node.attrs
    scale = b.scalar(attrs.get("scale", 1.0))
    if attrs.get("score_mode", "dot") == "dot":
        scores = mb.mul(x=mb.matmul(x=query, y=key, transpose_y=True), y=scale)
    else:
        pairs = mb.add(x=mb.expand_dims(x=query, axes=[-2]), y=mb.expand_dims(x=key, axes=[-3]))
        summed = mb.reduce_sum(x=mb.tanh(x=mb.mul(x=pairs, y=scale)), axes=[-1], keep_dims=False)
        scores = mb.mul(x=summed, y=b.scalar(attrs.get("concat_weight", 1.0)))
    if attrs.get("causal", False):
        bias = causal_bias(int(query.shape[-2]), int(key.shape[-2]))
        # -1e9 is below float16's range: its lowest finite value masks as well
        scores = mb.add(x=scores, y=np.maximum(bias, np.finfo(b.float_dtype).min).astype(b.float_dtype))
    return mb.matmul(x=mb.softmax(x=scores, axis=-1), y=value)


@LOWERINGS.register("concat")
def _concat(b: ProgramBuilder, node: Node, inputs):
    return _mb().concat(values=list(inputs), axis=int(node.attrs["axis"]), interleave=False)


@LOWERINGS.register("scale_shift")
def _scale_shift(b: ProgramBuilder, node: Node, inputs):
    mb = _mb()
    return mb.add(x=mb.mul(x=inputs[0], y=b.weight(node.weights["scale"])), y=b.weight(node.weights["shift"]))


@LOWERINGS.register("layer_norm")
def _layer_norm(b: ProgramBuilder, node: Node, inputs):
    (x,) = inputs
    axes = [a % x.rank for a in node.attrs["axes"]]
    dims = [None, *_static_dims(x, node, "normalised")]
    normalised = tuple(dims[a] for a in axes)  # MIL wants gamma/beta shaped like x over the axes
    options = {
        role: b.weight(node.weights[role], lambda w: w.reshape(normalised))
        for role in ("gamma", "beta") if role in node.weights
    }
    return _mb().layer_norm(x=x, axes=axes, epsilon=b.scalar(node.attrs["epsilon"]), **options)


@LOWERINGS.register("activation")
def _activation(b: ProgramBuilder, node: Node, inputs):
    return b.activation(inputs[0], node.attrs.get("activation"))


@LOWERINGS.register("zeros_like")
def _zeros_like(b: ProgramBuilder, node: Node, inputs):
    return _mb().fill_like(ref_tensor=inputs[0], value=b.scalar(0.0))


# -- activation lowerings (Keras 3 semantics, as in mann_edge.graph.activations) ---------------


@ACTIVATION_LOWERINGS.register("linear")
def _linear(b, x):
    return x


@ACTIVATION_LOWERINGS.register("relu")
def _relu(b, x, negative_slope=0.0, max_value=None, threshold=0.0):
    mb = _mb()
    if threshold == 0.0 and negative_slope == 0.0:
        y = mb.relu(x=x)
    elif threshold == 0.0:
        y = mb.leaky_relu(x=x, alpha=b.scalar(negative_slope))
    else:
        if negative_slope:
            below = mb.mul(x=mb.sub(x=x, y=b.scalar(threshold)), y=b.scalar(negative_slope))
        else:
            below = mb.fill_like(ref_tensor=x, value=b.scalar(0.0))
        y = mb.select(cond=mb.greater_equal(x=x, y=b.scalar(threshold)), a=x, b=below)
    if max_value is not None:
        y = mb.minimum(x=y, y=b.scalar(max_value))
    return y


@ACTIVATION_LOWERINGS.register("relu6")
def _relu6(b, x):
    return _mb().relu6(x=x)


@ACTIVATION_LOWERINGS.register("leaky_relu")
def _leaky_relu(b, x, negative_slope=0.2):
    return _mb().leaky_relu(x=x, alpha=b.scalar(negative_slope))


@ACTIVATION_LOWERINGS.register("elu")
def _elu(b, x, alpha=1.0):
    return _mb().elu(x=x, alpha=b.scalar(alpha))


@ACTIVATION_LOWERINGS.register("selu")
def _selu(b, x):
    mb = _mb()
    return mb.mul(x=mb.elu(x=x, alpha=b.scalar(SELU_ALPHA)), y=b.scalar(SELU_SCALE))


@ACTIVATION_LOWERINGS.register("celu")
def _celu(b, x, alpha=1.0):
    mb = _mb()
    negative = mb.mul(x=mb.sub(x=mb.exp(x=mb.real_div(x=x, y=b.scalar(alpha))), y=b.scalar(1.0)), y=b.scalar(alpha))
    return mb.add(x=mb.relu(x=x), y=mb.minimum(x=negative, y=b.scalar(0.0)))


@ACTIVATION_LOWERINGS.register("gelu")
def _gelu(b, x, approximate=False):
    return _mb().gelu(x=x, mode="TANH_APPROXIMATION" if approximate else "EXACT")


@ACTIVATION_LOWERINGS.register("sigmoid")
def _sigmoid(b, x):
    return _mb().sigmoid(x=x)


@ACTIVATION_LOWERINGS.register("hard_sigmoid")
def _hard_sigmoid(b, x):
    return _mb().sigmoid_hard(x=x, alpha=b.scalar(1.0 / 6.0), beta=b.scalar(0.5))


@ACTIVATION_LOWERINGS.register("sparse_sigmoid")
def _sparse_sigmoid(b, x):
    return _mb().sigmoid_hard(x=x, alpha=b.scalar(0.5), beta=b.scalar(0.5))


@ACTIVATION_LOWERINGS.register("log_sigmoid")
def _log_sigmoid(b, x):
    mb = _mb()
    return mb.mul(x=mb.softplus(x=mb.mul(x=x, y=b.scalar(-1.0))), y=b.scalar(-1.0))


@ACTIVATION_LOWERINGS.register("tanh")
def _tanh(b, x):
    return _mb().tanh(x=x)


@ACTIVATION_LOWERINGS.register("hard_tanh")
def _hard_tanh(b, x):
    return _mb().clip(x=x, alpha=b.scalar(-1.0), beta=b.scalar(1.0))


@ACTIVATION_LOWERINGS.register("tanh_shrink")
def _tanh_shrink(b, x):
    mb = _mb()
    return mb.sub(x=x, y=mb.tanh(x=x))


@ACTIVATION_LOWERINGS.register("hard_shrink")
def _hard_shrink(b, x, threshold=0.5):
    mb = _mb()
    keep = mb.greater(x=mb.abs(x=x), y=b.scalar(threshold))
    return mb.select(cond=keep, a=x, b=mb.fill_like(ref_tensor=x, value=b.scalar(0.0)))


@ACTIVATION_LOWERINGS.register("soft_shrink")
def _soft_shrink(b, x, threshold=0.5):
    mb = _mb()
    return mb.mul(x=mb.sign(x=x), y=mb.relu(x=mb.sub(x=mb.abs(x=x), y=b.scalar(threshold))))


@ACTIVATION_LOWERINGS.register("threshold")
def _threshold(b, x, threshold=0.0, default_value=0.0):
    mb = _mb()
    fallback = mb.fill_like(ref_tensor=x, value=b.scalar(default_value))
    return mb.select(cond=mb.greater(x=x, y=b.scalar(threshold)), a=x, b=fallback)


@ACTIVATION_LOWERINGS.register("silu")
def _silu(b, x):
    return _mb().silu(x=x)


@ACTIVATION_LOWERINGS.register("swish")
def _swish(b, x):
    return _mb().silu(x=x)


@ACTIVATION_LOWERINGS.register("hard_silu")
def _hard_silu(b, x):
    return _mb().mul(x=x, y=_hard_sigmoid(b, x))


@ACTIVATION_LOWERINGS.register("hard_swish")
def _hard_swish(b, x):
    return _hard_silu(b, x)


@ACTIVATION_LOWERINGS.register("mish")
def _mish(b, x):
    mb = _mb()
    return mb.mul(x=x, y=mb.tanh(x=mb.softplus(x=x)))


@ACTIVATION_LOWERINGS.register("softplus")
def _softplus(b, x):
    return _mb().softplus(x=x)


@ACTIVATION_LOWERINGS.register("softsign")
def _softsign(b, x):
    return _mb().softsign(x=x)


@ACTIVATION_LOWERINGS.register("sparse_plus")
def _sparse_plus(b, x):
    mb = _mb()
    quadratic = mb.mul(x=mb.square(x=mb.add(x=x, y=b.scalar(1.0))), y=b.scalar(0.25))
    upper = mb.select(cond=mb.greater_equal(x=x, y=b.scalar(1.0)), a=x, b=quadratic)
    zeros = mb.fill_like(ref_tensor=x, value=b.scalar(0.0))
    return mb.select(cond=mb.less_equal(x=x, y=b.scalar(-1.0)), a=zeros, b=upper)


@ACTIVATION_LOWERINGS.register("squareplus")
def _squareplus(builder, x, b=4.0):
    mb = _mb()
    root = mb.sqrt(x=mb.add(x=mb.mul(x=x, y=x), y=builder.scalar(b)))
    return mb.mul(x=mb.add(x=x, y=root), y=builder.scalar(0.5))


@ACTIVATION_LOWERINGS.register("exponential")
def _exponential(b, x):
    return _mb().exp(x=x)


@ACTIVATION_LOWERINGS.register("softmax")
def _softmax(b, x, axis=-1):
    return _mb().softmax(x=x, axis=axis)


@ACTIVATION_LOWERINGS.register("log_softmax")
def _log_softmax(b, x, axis=-1):
    mb = _mb()
    shifted = mb.sub(x=x, y=mb.reduce_max(x=x, axes=[axis], keep_dims=True))
    return mb.sub(x=shifted, y=mb.log(x=mb.reduce_sum(x=mb.exp(x=shifted), axes=[axis], keep_dims=True)))


@ACTIVATION_LOWERINGS.register("sparsemax")
def _sparsemax(b, x, axis=-1):
    # Keras's formula (see mann_edge.graph.activations): tau sums the cumulative sums over the support.
    mb = _mb()
    axis = axis % x.rank
    size = int(x.shape[axis])
    ranks_shape = [1] * x.rank
    ranks_shape[axis] = size
    ranks = np.arange(1, size + 1, dtype=b.float_dtype).reshape(ranks_shape)
    z_sorted = mb.topk(x=x, k=size, axis=axis, ascending=False, sort=True, return_indices=False)
    cumulative = mb.cumsum(x=z_sorted, axis=axis)
    support = mb.greater(x=mb.sub(x=z_sorted, y=mb.real_div(x=mb.sub(x=cumulative, y=b.scalar(1.0)), y=ranks)),
                         y=b.scalar(0.0))
    count = mb.reduce_sum(x=mb.cast(x=support, dtype="fp16" if b.float_dtype == np.float16 else "fp32"), axes=[axis],
                          keep_dims=True)
    support_sum = mb.reduce_sum(x=mb.select(cond=support, a=cumulative, b=mb.fill_like(ref_tensor=cumulative,
                                                                                        value=b.scalar(0.0))),
                                axes=[axis], keep_dims=True)
    tau = mb.real_div(x=mb.sub(x=support_sum, y=b.scalar(1.0)), y=count)
    return mb.relu(x=mb.sub(x=x, y=tau))


@ACTIVATION_LOWERINGS.register("glu")
def _glu(b, x, axis=-1):
    mb = _mb()
    a, gate = mb.split(x=x, num_splits=2, axis=axis)
    return mb.mul(x=a, y=mb.sigmoid(x=gate))


