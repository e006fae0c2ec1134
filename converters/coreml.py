"""Core ML export: one ML program per task, built directly with the MIL Builder.

What stays sparse: every weight whose bitmask form is smaller than its dense form is
stored as ``constexpr_sparse_to_dense`` (a bitmask over the weight plus its nonzero
values, iOS16/macOS13 and later). ``sparse=False`` stores every weight as a dense const
(the baseline for size ratios).

What runs sparse: nothing. Core ML decompresses ``constexpr_*`` weights when it loads
the model, so each task computes dense, and only its own weights are loaded.

Choices, and why:
- The MIL program is built from the compact graph, not through the TensorFlow frontend:
  every op and its padding is explicit, and no TensorFlow graph is needed. Each compact
  op has one lowering in `LOWERINGS`, each activation one in `ACTIVATION_LOWERINGS`.
- Tensors stay NHWC as in Keras; convolution and pooling (NCHW in MIL) are wrapped in
  transposes, which Core ML's passes cancel between consecutive spatial ops. TensorFlow's
  'same' padding (the extra pixel after) is written as explicit pads.
- The batch dimension is a range (1..``max_batch``), so one package serves batch 1 and 32.
- Targets below macOS15/iOS18 (default macOS13): a directory with one ``<task>.mlpackage``
  per task. macOS15/iOS18 and later: one ``.mlpackage`` with a function per task
  (``MultiFunctionDescriptor`` + ``save_multifunction``, shared weights deduplicated),
  the first task's function being the default.
- ``dtype="float16"``: weights are stored as float16 and the program computes in float16
  (compute precision FLOAT16); inputs and outputs stay float32 at the model's interface.
  ``"float32"``: float32 weights, compute precision FLOAT32.
- Every package carries the manifest (``mann_edge_manifest``), its tasks with their
  function and feature names (``mann_edge_tasks``) and the dtype (``mann_edge_dtype``) in
  its user-defined metadata; `mann_edge.runtime.coreml` rebuilds the tasks from them.

Core ML predicts only on macOS; elsewhere `validate` evaluates the saved package's ML
program in numpy (`mann_edge.converters.mil_eval`).

Example:
    >>> from mann_edge.converters import coreml
    >>> path = coreml.export(cm, "out/coreml")                          # one package per task
    >>> path = coreml.export(cm, "out/model.mlpackage", target="macOS15")  # one multifunction package
    >>> coreml.validate(cm, path).raise_for_errors()
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from mann_edge.bundle import manifest_of
from mann_edge.converters.validation import DEFAULT_BATCHES, ValidationReport, compare, tolerances
from mann_edge.converters.lowering import check_nodes
from mann_edge.errors import ConversionError
from mann_edge.formats import METADATA_DTYPE, METADATA_MANIFEST, METADATA_TASKS
from mann_edge.files import atomic_output, file_stems
from mann_edge.graph.activations import SELU_ALPHA, SELU_SCALE, normalize_activation
from mann_edge.graph.model import CompactModel, Node
from mann_edge.graph.ops import same_padding
from mann_edge.runtime.coreml import (
    PACKAGE_SUFFIX,
    FeatureIO,
    PackageTask,
    import_coremltools,
    read_layout,
)

__all__ = [
    "FORMAT",
    "LOWERINGS",
    "ACTIVATION_LOWERINGS",
    "DEFAULT_TARGET",
    "export",
    "validate",
    "artifact_name",
    "task_files",
    "is_multifunction_target",
    "build_program",
    "TaskProgram",
    "ProgramBuilder",
    "check_lowerings",
    "lowering",
    "activation_lowering",
    "runner",
]

FORMAT = "coreml"
DEFAULT_TARGET = "macOS13"
DEFAULT_MAX_BATCH = 1024
# Below iOS16/macOS13 there is no constexpr_sparse_to_dense; iOS18/macOS15 brings multifunction packages.
_SPARSE_SPEC = 7
_MULTIFUNCTION_SPEC = 9
# Keras's selu constants.
# A weight blob in weights.bin carries a 64-byte header and is 64-byte aligned: a sparse
# weight has two blobs (mask, values), so it pays about one more blob than a dense one.
_BLOB_OVERHEAD = 64

Lowering = Callable[["ProgramBuilder", Node, list], object]
ActivationLowering = Callable[..., object]

LOWERINGS: dict[str, Lowering] = {}
ACTIVATION_LOWERINGS: dict[str, ActivationLowering] = {}


def lowering(op_type: str):
    """Registers the MIL lowering of compact op ``op_type``: ``fn(builder, node, inputs) -> Var``."""

    def register(fn: Lowering) -> Lowering:
        LOWERINGS[op_type] = fn
        return fn

    return register


def activation_lowering(name: str):
    """Registers the MIL lowering of activation ``name``: ``fn(builder, x, **params) -> Var``."""

    def register(fn: ActivationLowering) -> ActivationLowering:
        ACTIVATION_LOWERINGS[name] = fn
        return fn

    return register


# -- targets and names -------------------------------------------------------------------------


def _target(name: str):
    """The coremltools target enum for ``name`` (e.g. "macOS13", "iOS18"), or a ConversionError."""
    ct = import_coremltools()
    members = ct.target.__members__
    if name not in members or members[name] < _SPARSE_SPEC:
        supported = sorted(n for n, v in members.items() if v >= _SPARSE_SPEC)
        raise ConversionError(
            f"Core ML target must be one with sparse weights (macOS13/iOS16 or later): {supported}. Received: {name!r}"
        )
    return members[name]


def is_multifunction_target(target: str) -> bool:
    """Whether ``target`` (macOS15/iOS18 or later) gets one multifunction package instead of a package per task."""
    return int(_target(target)) >= _MULTIFUNCTION_SPEC


def artifact_name(*, target: str = DEFAULT_TARGET, **export_options) -> str:
    """The name an export with these `export` options gets inside an output directory (only ``target`` matters).

    Example:
        >>> artifact_name(target="macOS13"), artifact_name(target="macOS15")
        ('coreml', 'model.mlpackage')
    """
    return "model.mlpackage" if is_multifunction_target(target) else "coreml"


def task_files(path: "str | os.PathLike") -> dict[str, Path]:
    """task -> the package holding only that task (none for a multifunction package)."""
    return {task: entry.package for task, entry in read_layout(path).entries.items() if entry.function is None}


def _float_dtype(dtype: str) -> np.dtype:
    """The numpy dtype of weights and computation for an export ``dtype``, or a ConversionError."""
    if dtype not in ("float32", "float16"):
        raise ConversionError(f"Core ML export dtype must be 'float32' or 'float16'. Received: {dtype!r}")
    return np.dtype(dtype)


def _identifier(name: str, taken: set[str]) -> str:
    """A Core ML feature/function name for ``name``: letters, digits, underscores, not in ``taken`` (then added)."""
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
        nonzero = array != 0
        nnz = int(nonzero.sum())
        sparse_bytes = nnz * array.itemsize + math.ceil(array.size / 8) + _BLOB_OVERHEAD
        if not self.sparse or nnz == 0 or sparse_bytes >= array.nbytes:
            return mb.const(val=array)
        if self.spec_version >= _MULTIFUNCTION_SPEC:  # iOS18 takes the mask as a uint1 tensor of the weight's shape
            from coremltools.converters.mil.mil import types

            return mb.constexpr_sparse_to_dense(nonzero_data=array[nonzero], mask=nonzero.astype(types.np_uint1_dtype))
        return mb.constexpr_sparse_to_dense(
            nonzero_data=array[nonzero],
            mask=np.packbits(nonzero.reshape(-1), bitorder="little"),
            shape=np.array(array.shape, dtype=np.uint32),
        )

    def activation(self, x, activation) -> object:
        spec = normalize_activation(activation)
        params = {k: v for k, v in spec.items() if k != "name"}
        return ACTIVATION_LOWERINGS[spec["name"]](self, x, **params)


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
    check_nodes("Core ML", nodes.values(), LOWERINGS, ACTIVATION_LOWERINGS)


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
    spec = _target(target)
    spec_task = model.task(task)
    check_lowerings(model, [task])
    float_dtype = _float_dtype(dtype)
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
        feature = _identifier(spec_in.name, taken)
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
            node_inputs = [builder.values[name] for name in node.inputs]
            try:
                builder.values[node.name] = LOWERINGS[node.op](builder, node, node_inputs)
            except ConversionError:
                raise
            except (ValueError, TypeError, AssertionError, IndexError) as error:
                raise ConversionError(
                    f"Core ML export: lowering op {node.op!r} (node '{node.name}', task {task!r}) failed: {error}"
                ) from error
        # Output features are named last, clear of the names the builder gave to ops on the way.
        taken |= {var.name.lower() for op in function.operations for var in op.outputs}
        outputs = [FeatureIO(s.name, _identifier(s.name, taken), "float32") for s in spec_task.outputs]
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
    return _mb().transpose(x=x, perm=[0, 3, 1, 2])


def _nchw_to_nhwc(x):
    return _mb().transpose(x=x, perm=[0, 2, 3, 1])


def _spatial_pads(node: Node, x, kernel, strides, dilation=(1, 1)) -> list[int]:
    """Explicit [top, bottom, left, right] pads: TensorFlow's 'same' (extra pixel after) or none."""
    if node.attrs["padding"] == "valid":
        return [0, 0, 0, 0]
    if node.attrs["padding"] != "same":
        raise ConversionError(
            f"Core ML export: node '{node.name}' has padding {node.attrs['padding']!r}; expected 'same' or 'valid'"
        )
    height, width = _static_dims(x, node, "spatial")[:2]
    return [
        *same_padding(height, kernel[0], strides[0], dilation[0]),
        *same_padding(width, kernel[1], strides[1], dilation[1]),
    ]


@lowering("dense")
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


@lowering("conv2d")
def _conv2d(b: ProgramBuilder, node: Node, inputs):
    mb = _mb()
    (x,) = inputs
    kh, kw = b.model.weights[node.weights["kernel"]].shape[:2]
    strides = list(node.attrs["strides"])
    dilation = list(node.attrs.get("dilation", (1, 1)))
    pads = _spatial_pads(node, x, (kh, kw), strides, dilation)
    options = {"bias": b.weight(node.weights["bias"])} if "bias" in node.weights else {}
    y = mb.conv(
        x=_nhwc_to_nchw(x),
        weight=b.weight(node.weights["kernel"], lambda w: w.transpose(3, 2, 0, 1)),  # (cout, cin, kh, kw)
        strides=strides,
        dilations=dilation,
        pad_type="custom",
        pad=pads,
        **options,
    )
    return b.activation(_nchw_to_nhwc(y), node.attrs.get("activation"))


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


@lowering("max_pool2d")
def _max_pool2d(b: ProgramBuilder, node: Node, inputs):
    return _pool(b, node, inputs[0], "max")


@lowering("avg_pool2d")
def _avg_pool2d(b: ProgramBuilder, node: Node, inputs):
    return _pool(b, node, inputs[0], "avg")


@lowering("global_avg_pool")
def _global_avg_pool(b: ProgramBuilder, node: Node, inputs):
    keep_dims = bool(node.attrs.get("keepdims", False))
    return _mb().reduce_mean(x=inputs[0], axes=list(node.attrs["axes"]), keep_dims=keep_dims)


@lowering("flatten")
def _flatten(b: ProgramBuilder, node: Node, inputs):
    (x,) = inputs
    return _mb().reshape(x=x, shape=[-1, math.prod(_static_dims(x, node, "non-batch"))])


@lowering("reshape")
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


@lowering("embedding")
def _embedding(b: ProgramBuilder, node: Node, inputs):
    mb = _mb()
    (ids,) = inputs
    from coremltools.converters.mil.mil import types

    if types.is_float(ids.dtype):  # ids computed in float (e.g. through a cast) are whole numbers
        ids = mb.cast(x=ids, dtype="int32")
    return mb.gather(x=b.weight(node.weights["table"]), indices=ids, axis=0)


@lowering("add")
def _add(b: ProgramBuilder, node: Node, inputs):
    total = inputs[0]
    for x in inputs[1:]:
        total = _mb().add(x=total, y=x)
    return total


@lowering("concat")
def _concat(b: ProgramBuilder, node: Node, inputs):
    return _mb().concat(values=list(inputs), axis=int(node.attrs["axis"]), interleave=False)


@lowering("scale_shift")
def _scale_shift(b: ProgramBuilder, node: Node, inputs):
    mb = _mb()
    return mb.add(x=mb.mul(x=inputs[0], y=b.weight(node.weights["scale"])), y=b.weight(node.weights["shift"]))


@lowering("layer_norm")
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


@lowering("activation")
def _activation(b: ProgramBuilder, node: Node, inputs):
    return b.activation(inputs[0], node.attrs.get("activation"))


@lowering("zeros_like")
def _zeros_like(b: ProgramBuilder, node: Node, inputs):
    return _mb().fill_like(ref_tensor=inputs[0], value=b.scalar(0.0))


# -- activation lowerings (Keras 3 semantics, as in mann_edge.graph.activations) ---------------


@activation_lowering("linear")
def _linear(b, x):
    return x


@activation_lowering("relu")
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


@activation_lowering("relu6")
def _relu6(b, x):
    return _mb().relu6(x=x)


@activation_lowering("leaky_relu")
def _leaky_relu(b, x, negative_slope=0.2):
    return _mb().leaky_relu(x=x, alpha=b.scalar(negative_slope))


@activation_lowering("elu")
def _elu(b, x, alpha=1.0):
    return _mb().elu(x=x, alpha=b.scalar(alpha))


@activation_lowering("selu")
def _selu(b, x):
    mb = _mb()
    return mb.mul(x=mb.elu(x=x, alpha=b.scalar(SELU_ALPHA)), y=b.scalar(SELU_SCALE))


@activation_lowering("celu")
def _celu(b, x, alpha=1.0):
    mb = _mb()
    negative = mb.mul(x=mb.sub(x=mb.exp(x=mb.real_div(x=x, y=b.scalar(alpha))), y=b.scalar(1.0)), y=b.scalar(alpha))
    return mb.add(x=mb.relu(x=x), y=mb.minimum(x=negative, y=b.scalar(0.0)))


@activation_lowering("gelu")
def _gelu(b, x, approximate=False):
    return _mb().gelu(x=x, mode="TANH_APPROXIMATION" if approximate else "EXACT")


@activation_lowering("sigmoid")
def _sigmoid(b, x):
    return _mb().sigmoid(x=x)


@activation_lowering("hard_sigmoid")
def _hard_sigmoid(b, x):
    return _mb().sigmoid_hard(x=x, alpha=b.scalar(1.0 / 6.0), beta=b.scalar(0.5))


@activation_lowering("sparse_sigmoid")
def _sparse_sigmoid(b, x):
    return _mb().sigmoid_hard(x=x, alpha=b.scalar(0.5), beta=b.scalar(0.5))


@activation_lowering("log_sigmoid")
def _log_sigmoid(b, x):
    mb = _mb()
    return mb.mul(x=mb.softplus(x=mb.mul(x=x, y=b.scalar(-1.0))), y=b.scalar(-1.0))


@activation_lowering("tanh")
def _tanh(b, x):
    return _mb().tanh(x=x)


@activation_lowering("hard_tanh")
def _hard_tanh(b, x):
    return _mb().clip(x=x, alpha=b.scalar(-1.0), beta=b.scalar(1.0))


@activation_lowering("tanh_shrink")
def _tanh_shrink(b, x):
    mb = _mb()
    return mb.sub(x=x, y=mb.tanh(x=x))


@activation_lowering("hard_shrink")
def _hard_shrink(b, x, threshold=0.5):
    mb = _mb()
    keep = mb.greater(x=mb.abs(x=x), y=b.scalar(threshold))
    return mb.select(cond=keep, a=x, b=mb.fill_like(ref_tensor=x, value=b.scalar(0.0)))


@activation_lowering("soft_shrink")
def _soft_shrink(b, x, threshold=0.5):
    mb = _mb()
    return mb.mul(x=mb.sign(x=x), y=mb.relu(x=mb.sub(x=mb.abs(x=x), y=b.scalar(threshold))))


@activation_lowering("threshold")
def _threshold(b, x, threshold=0.0, default_value=0.0):
    mb = _mb()
    fallback = mb.fill_like(ref_tensor=x, value=b.scalar(default_value))
    return mb.select(cond=mb.greater(x=x, y=b.scalar(threshold)), a=x, b=fallback)


@activation_lowering("silu")
def _silu(b, x):
    return _mb().silu(x=x)


@activation_lowering("swish")
def _swish(b, x):
    return _mb().silu(x=x)


@activation_lowering("hard_silu")
def _hard_silu(b, x):
    return _mb().mul(x=x, y=_hard_sigmoid(b, x))


@activation_lowering("hard_swish")
def _hard_swish(b, x):
    return _hard_silu(b, x)


@activation_lowering("mish")
def _mish(b, x):
    mb = _mb()
    return mb.mul(x=x, y=mb.tanh(x=mb.softplus(x=x)))


@activation_lowering("softplus")
def _softplus(b, x):
    return _mb().softplus(x=x)


@activation_lowering("softsign")
def _softsign(b, x):
    return _mb().softsign(x=x)


@activation_lowering("sparse_plus")
def _sparse_plus(b, x):
    mb = _mb()
    quadratic = mb.mul(x=mb.square(x=mb.add(x=x, y=b.scalar(1.0))), y=b.scalar(0.25))
    upper = mb.select(cond=mb.greater_equal(x=x, y=b.scalar(1.0)), a=x, b=quadratic)
    zeros = mb.fill_like(ref_tensor=x, value=b.scalar(0.0))
    return mb.select(cond=mb.less_equal(x=x, y=b.scalar(-1.0)), a=zeros, b=upper)


@activation_lowering("squareplus")
def _squareplus(builder, x, b=4.0):
    mb = _mb()
    root = mb.sqrt(x=mb.add(x=mb.mul(x=x, y=x), y=builder.scalar(b)))
    return mb.mul(x=mb.add(x=x, y=root), y=builder.scalar(0.5))


@activation_lowering("exponential")
def _exponential(b, x):
    return _mb().exp(x=x)


@activation_lowering("softmax")
def _softmax(b, x, axis=-1):
    return _mb().softmax(x=x, axis=axis)


@activation_lowering("log_softmax")
def _log_softmax(b, x, axis=-1):
    mb = _mb()
    shifted = mb.sub(x=x, y=mb.reduce_max(x=x, axes=[axis], keep_dims=True))
    return mb.sub(x=shifted, y=mb.log(x=mb.reduce_sum(x=mb.exp(x=shifted), axes=[axis], keep_dims=True)))


@activation_lowering("sparsemax")
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


@activation_lowering("glu")
def _glu(b, x, axis=-1):
    mb = _mb()
    a, gate = mb.split(x=x, num_splits=2, axis=axis)
    return mb.mul(x=a, y=mb.sigmoid(x=gate))


# -- export --------------------------------------------------------------------------------------


def _convert(task_program: TaskProgram, *, target, dtype: str):
    """The MLModel of a task's MIL program (not loaded: Core ML may not exist here), progress bars silenced."""
    ct = import_coremltools()
    precision = ct.precision.FLOAT16 if dtype == "float16" else ct.precision.FLOAT32
    # The pass pipelines draw progress bars on stderr; keep them out of a command's output.
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return ct.convert(
                task_program.program,
                convert_to="mlprogram",
                inputs=task_program.input_types,
                minimum_deployment_target=target,
                compute_precision=precision,
                skip_model_load=True,
            )
    except (ValueError, TypeError, AssertionError, NotImplementedError, RuntimeError) as error:
        raise ConversionError(f"Core ML export: converting task {task_program.task!r} failed: {error}") from error


@contextlib.contextmanager
def _gc_frozen():
    """Keeps the objects alive now out of garbage collection while converting.

    ``ct.convert`` ends with a full ``gc.collect()``; in a process holding a Keras model
    that costs about 0.2 s per task, most of an export's time. Frozen objects are skipped
    by collections; they are handed back to the collector afterwards.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _describe(mlmodel, manifest_text: str, dtype: str, entries: list[PackageTask], summary: str) -> None:
    mlmodel.short_description = summary
    mlmodel.user_defined_metadata[METADATA_MANIFEST] = manifest_text
    mlmodel.user_defined_metadata[METADATA_TASKS] = json.dumps([entry.to_json() for entry in entries])
    mlmodel.user_defined_metadata[METADATA_DTYPE] = dtype


def export(model: CompactModel, path: "str | os.PathLike", *, dtype: str = "float32", sparse: bool = True,
           force: bool = False, target: str = DEFAULT_TARGET, max_batch: int = DEFAULT_MAX_BATCH) -> Path:
    """Writes the Core ML export of ``model`` at ``path`` (atomically) and returns ``path``.

    Args:
        model: the compact model.
        path: for targets below macOS15/iOS18, a directory to hold one ``<task>.mlpackage`` per task;
            for macOS15/iOS18 and later, the multifunction ``.mlpackage`` itself.
        dtype: "float32" (float32 weights and compute) or "float16" (float16 weights and compute).
        sparse: store zeros as ``constexpr_sparse_to_dense`` (False: dense consts, the baseline).
        force: overwrite an existing ``path``.
        target: a coremltools target name, "macOS13"/"iOS16" or later.
        max_batch: the largest batch the packages accept (Core ML ML programs need a bound).

    Raises:
        ConversionError: an op or activation without a lowering (named), a bad option, a failed conversion.
        OutputExistsError: ``path`` exists and ``force`` is False.

    Example:
        >>> export(cm, "out/coreml", dtype="float16")
        PosixPath('out/coreml')
    """
    _float_dtype(dtype)
    path = Path(path)
    ct_target = _target(target)
    multifunction = int(ct_target) >= _MULTIFUNCTION_SPEC
    if multifunction and path.suffix != PACKAGE_SUFFIX:
        raise ConversionError(
            f"Core ML target {target} writes one multifunction package: its path must end in {PACKAGE_SUFFIX}. "
            f"Received: {path}"
        )
    if not multifunction and path.suffix == PACKAGE_SUFFIX:
        raise ConversionError(
            f"Core ML target {target} writes a directory of per-task packages: give a directory path, not a "
            f"{PACKAGE_SUFFIX} (or use target='macOS15' for one package). Received: {path}"
        )
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ConversionError(f"Core ML export max_batch must be a positive int. Received: {max_batch!r}")
    names = model.task_names
    check_lowerings(model, names)
    manifest_text = json.dumps(manifest_of(model))

    with atomic_output(path, force=force, directory=True) as tmp, tempfile.TemporaryDirectory(
        prefix="mann_edge_coreml_"
    ) as staging, _gc_frozen():
        stems = file_stems(names)
        functions: set[str] = set()
        built = []
        for name in names:
            task_program = build_program(model, name, dtype=dtype, sparse=sparse, target=target, max_batch=max_batch)
            mlmodel = _convert(task_program, target=ct_target, dtype=dtype)
            if multifunction:
                function = _identifier(name, functions)
                entry = PackageTask(name, path, function, task_program.inputs, task_program.outputs)
                package = Path(staging) / f"{len(built)}{PACKAGE_SUFFIX}"
            else:
                package = tmp / f"{stems[name]}{PACKAGE_SUFFIX}"
                entry = PackageTask(name, path / package.name, None, task_program.inputs, task_program.outputs)
                _describe(mlmodel, manifest_text, dtype, [entry], f"mann-edge task {name!r} ({dtype})")
            mlmodel.save(str(package))
            built.append((entry, package))
        if multifunction:
            _save_multifunction(built, tmp, Path(staging), manifest_text, dtype)
    return path


def _save_multifunction(built: list[tuple[PackageTask, Path]], tmp: Path, staging: Path, manifest_text: str,
                        dtype: str) -> None:
    """Combines the per-task packages into one with a function per task (the first is the default)."""
    ct = import_coremltools()
    descriptor = ct.utils.MultiFunctionDescriptor()
    for entry, package in built:
        descriptor.add_function(str(package), src_function_name="main", target_function_name=entry.function)
    descriptor.default_function_name = built[0][0].function
    combined = staging / f"combined{PACKAGE_SUFFIX}"
    with contextlib.redirect_stderr(io.StringIO()):
        ct.utils.save_multifunction(descriptor, str(combined))
    mlmodel = ct.models.MLModel(str(combined), skip_model_load=True)
    _describe(mlmodel, manifest_text, dtype, [entry for entry, _ in built],
              f"mann-edge tasks {[entry.task for entry, _ in built]} ({dtype}), one function each")
    described = staging / f"model{PACKAGE_SUFFIX}"
    mlmodel.save(str(described))
    shutil.copytree(described, tmp, dirs_exist_ok=True)


# -- validation ----------------------------------------------------------------------------------


def runner(path: "str | os.PathLike") -> Callable[[str, Mapping[str, np.ndarray]], list[np.ndarray]]:
    """A function running one task of the export at ``path`` on inputs given by name.

    On macOS it predicts with Core ML (`CoreMLSession`). Elsewhere Core ML cannot run, so it
    reads each task's saved ML program back from its package, decompresses the weights and
    evaluates the ops in numpy (`mann_edge.converters.mil_eval.MILEvaluator`), float16
    programs rounding to float16 after every op. Each task's program is opened on first use.

    Example:
        >>> run = runner("out/coreml")
        >>> probabilities = run("digits", {"digits_in": x})[0]
    """
    if sys.platform == "darwin":
        from mann_edge.runtime.coreml import CoreMLSession

        return CoreMLSession(path).run

    from mann_edge.converters.mil_eval import MILEvaluator

    layout = read_layout(path)
    evaluators: dict[str, MILEvaluator] = {}

    def evaluate(task: str, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if task not in layout.entries:
            raise ConversionError(f"Core ML export {path} has no task {task!r}; it has {sorted(layout.entries)}")
        entry = layout.entries[task]
        if task not in evaluators:
            evaluators[task] = MILEvaluator(entry.package, function=entry.function)
        return entry.outputs_of(evaluators[task].predict(entry.feed(inputs)))

    return evaluate


def validate(model: CompactModel, path: "str | os.PathLike", *, atol: float | None = None, rtol: float | None = None,
             tasks: Sequence[str] | None = None, batches: Sequence[int] = DEFAULT_BATCHES) -> ValidationReport:
    """Runs the export at ``path`` on sample inputs (batch 1 and 8) and compares it with the compact model.

    Every task of ``model`` (or ``tasks``) is checked: one the export lacks fails the report.

    The export runs through `runner`: Core ML on macOS, the numpy evaluation of the saved
    ML programs elsewhere. Default tolerances follow the dtype recorded in the packages.

    Example:
        >>> validate(cm, "out/coreml").raise_for_errors()
    """
    layout = read_layout(path)
    default_atol, default_rtol = tolerances(layout.dtype)
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    return compare(model, runner(path), format=FORMAT, artifact=str(path), atol=atol, rtol=rtol, tasks=tasks,
                   batches=batches)
