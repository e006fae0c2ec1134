"""Evaluates a saved Core ML package's ML program in numpy: how a Core ML export is checked off macOS.

The package is read back as Core ML would read it: its spec and weights file are loaded
into a MIL program (``coremltools.converters.mil.frontend.milproto.load``), each
``constexpr_*`` op is decompressed by a numpy function of `DECOMPRESSORS` written from
the MIL spec (the bitmask and nonzero values of ``constexpr_sparse_to_dense`` become the
dense weight; iOS18's joint forms, ``constexpr_lut_to_sparse`` and
``constexpr_sparse_blockwise_shift_scale``, first turn palette indices or int8 values
into the nonzero values),
and every other op runs through a numpy kernel, one small function per MIL op type in
`KERNELS` (registered beside it: ``@KERNELS.register("conv")``, ``fn(**inputs) -> array or
tuple of arrays``). An op type without a kernel is refused by name when the program is
opened. Padding and windows come from `mann_edge.graph.windows`, as in the reference ops.

Each op's result is cast to the dtype its output var declares, so a float16 program
rounds to float16 after every op (kernels compute in float32 from float16 inputs, as
Core ML's float16 backends accumulate wider), and a float32 program stays in float32.

This is the MIL spec's semantics in numpy, not Core ML itself: it checks that the package
holds the right program and weights, not how Core ML's backends round.

Example:
    >>> evaluator = MILEvaluator("out/coreml/digits.mlpackage")
    >>> evaluator.predict({"digits_in": x})["digits"].shape
    (1, 10)
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping

import numpy as np
from scipy import special

from mann_edge.errors import ValidationError
from mann_edge.graph.windows import sliding_windows, window_pads
from mann_edge.registry import Registry
from mann_edge.runtime.coreml import import_coremltools

__all__ = ["MILEvaluator", "KERNELS", "DECOMPRESSORS"]

KERNELS = Registry("MIL op type", owner="The numpy MIL evaluator (mann_edge.converters.mil_eval)", verb="evaluate",
                   error=ValidationError)
# Compressed weights: one numpy function per constexpr op type, ``fn(**inputs) -> array or tuple of arrays``.
DECOMPRESSORS = Registry("MIL constexpr op type", owner="The numpy MIL evaluator (mann_edge.converters.mil_eval)",
                         verb="decompress", error=ValidationError)


class MILEvaluator:
    """One function of a saved `.mlpackage`, ready to evaluate in numpy.

    Args:
        path: the `.mlpackage`.
        function: the function of a multifunction package (None: the default function).

    Raises:
        ValidationError: the program has an op type without a numpy kernel (named), or no such function.

    Example:
        >>> MILEvaluator("model.mlpackage", function="digits").predict({"x": x})
    """

    def __init__(self, path: "str | os.PathLike", *, function: str | None = None):
        ct = import_coremltools()
        from coremltools.converters.mil.frontend.milproto.load import load as load_milproto

        self.path = Path(path)
        mlmodel = ct.models.MLModel(str(self.path), skip_model_load=True)
        spec = mlmodel.get_spec()
        program = load_milproto(spec, spec.specificationVersion, mlmodel.weights_dir)
        name = function or spec.description.defaultFunctionName or "main"
        if name not in program.functions:
            raise ValidationError(
                f"Core ML package {self.path} has no function {name!r}; it has {sorted(program.functions)}"
            )
        self.function_name = name
        self.function = program.functions[name]
        self.input_names = list(self.function.inputs)
        self.output_names = [var.name for var in self.function.outputs]
        self._constants: dict[str, np.ndarray] = {}
        self._steps = []  # (op, its kernel), in program order
        for op in self.function.operations:
            if op.op_type == "const":
                self._constants[op.outputs[0].name] = np.asarray(op.outputs[0].val)
            elif op.op_type.startswith("constexpr_"):
                # decompressed here, in numpy from the MIL spec (`DECOMPRESSORS`), not by coremltools itself
                where = f"op '{op.name}' of function {name!r} in Core ML package {self.path}"
                decompress = DECOMPRESSORS.lookup(op.op_type, context=where)
                arguments = {key: self._constants[var.name] if var.name in self._constants else np.asarray(var.val)
                             for key, var in op.inputs.items()}
                try:
                    values = decompress(**arguments)
                except (ValueError, TypeError, IndexError) as error:
                    raise ValidationError(f"Core ML package {self.path}: decompressing {where} ({op.op_type}) "
                                          f"failed: {error}") from error
                values = values if isinstance(values, tuple) else (values,)
                for var, value in zip(op.outputs, values):
                    self._constants[var.name] = np.asarray(value)
            else:
                where = f"op '{op.name}' of function {name!r} in Core ML package {self.path}"
                self._steps.append((op, KERNELS.lookup(op.op_type, context=where)))

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Evaluates the function on named inputs (cast to the inputs' MIL dtypes); returns outputs by name."""
        missing = set(self.input_names) - set(inputs)
        if missing:
            raise ValidationError(
                f"Core ML package {self.path}: missing inputs {sorted(missing)}; it takes {self.input_names}"
            )
        values = dict(self._constants)
        for name, var in self.function.inputs.items():
            values[name] = np.asarray(inputs[name], dtype=_numpy_dtype(var.dtype))
        with np.errstate(all="ignore"):  # exp overflow, log(0): inf and nan are results, as on device
            for op, kernel in self._steps:
                arguments = {key: _lookup(values, var) for key, var in op.inputs.items()}
                try:
                    results = kernel(**arguments)
                except (ValueError, TypeError, IndexError) as error:
                    raise ValidationError(
                        f"Core ML package {self.path}: evaluating op '{op.name}' ({op.op_type}) failed: {error}"
                    ) from error
                results = results if isinstance(results, tuple) else (results,)
                for var, result in zip(op.outputs, results):
                    values[var.name] = np.asarray(result).astype(_numpy_dtype(var.dtype), copy=False)
        return {name: values[name] for name in self.output_names}


def _numpy_dtype(mil_dtype) -> np.dtype:
    from coremltools.converters.mil.mil import types

    return np.dtype(types.nptype_from_builtin(mil_dtype))


def _lookup(values: dict, var):
    """An op input's value: a tensor (float16 widened to float32 for the kernel), a tuple for variadic inputs."""
    if isinstance(var, (list, tuple)):
        return [_lookup(values, v) for v in var]
    value = values[var.name] if var.name in values else np.asarray(var.val)
    if value.dtype == np.float16:
        return value.astype(np.float32)
    if value.dtype.kind in "SUO" and value.ndim == 0:  # string attributes such as pad_type
        return str(value)
    return value


def _axes(axes, rank: int):
    return tuple(range(rank)) if axes is None else tuple(int(a) % rank for a in np.atleast_1d(axes))


# -- elementwise ---------------------------------------------------------------------------------

_BINARY = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "real_div": np.divide,
    "maximum": np.maximum,
    "minimum": np.minimum,
    "pow": np.power,
    "greater": np.greater,
    "greater_equal": np.greater_equal,
    "less": np.less,
    "less_equal": np.less_equal,
    "equal": np.equal,
    "not_equal": np.not_equal,
}

_UNARY = {
    "abs": np.abs,
    "sign": np.sign,
    "exp": np.exp,
    "sqrt": np.sqrt,
    "square": np.square,
    "tanh": np.tanh,
    "erf": special.erf,
    "sigmoid": special.expit,
    "relu": lambda x: np.maximum(x, 0),
    "relu6": lambda x: np.clip(x, 0, 6),
    "softplus": lambda x: np.logaddexp(np.zeros((), x.dtype), x),
    "softsign": lambda x: x / (1 + np.abs(x)),
    "silu": lambda x: x * special.expit(x),
    "identity": lambda x: x,
}


def _binary(fn):
    def run(x, y):
        return fn(x, y)

    return run


def _unary(fn):
    def run(x):
        return fn(x)

    return run


for _name, _fn in _BINARY.items():
    KERNELS.register(_name)(_binary(_fn))
for _name, _fn in _UNARY.items():
    KERNELS.register(_name)(_unary(_fn))


@KERNELS.register("log")
def _log(x, epsilon=1e-45):
    return np.log(x + epsilon)


@KERNELS.register("rsqrt")
def _rsqrt(x, epsilon=1e-12):
    return 1.0 / np.sqrt(x + epsilon)


@KERNELS.register("cast")
def _cast(x, dtype):
    return x  # the output var's declared dtype does the cast


@KERNELS.register("select")
def _select(cond, a, b):
    return np.where(cond, a, b)


@KERNELS.register("clip")
def _clip(x, alpha, beta):
    return np.minimum(np.maximum(x, alpha), beta)


@KERNELS.register("leaky_relu")
def _leaky_relu(x, alpha=0.01):
    return np.where(x >= 0, x, alpha * x)


@KERNELS.register("elu")
def _elu(x, alpha=1.0):
    return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0)))


@KERNELS.register("sigmoid_hard")
def _sigmoid_hard(x, alpha=0.2, beta=0.5):
    return np.minimum(np.maximum(alpha * x + beta, 0), 1)


@KERNELS.register("gelu")
def _gelu(x, mode="EXACT"):
    if mode == "EXACT":
        return 0.5 * x * (1.0 + special.erf(x / np.sqrt(np.float32(2.0))))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(np.float32(2.0 / np.pi)) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x * special.expit(1.702 * x)
    raise ValueError(f"unknown gelu mode {mode!r}")


@KERNELS.register("fill_like")
def _fill_like(ref_tensor, value=0.0):
    return np.full(ref_tensor.shape, value)


# -- reductions, softmax, sorting ----------------------------------------------------------------


def _reduction(fn):
    def run(x, axes=None, keep_dims=False):
        return fn(x, axis=_axes(axes, x.ndim), keepdims=bool(keep_dims))

    return run


for _name, _fn in {"reduce_mean": np.mean, "reduce_sum": np.sum, "reduce_max": np.max, "reduce_min": np.min}.items():
    KERNELS.register(_name)(_reduction(_fn))


@KERNELS.register("softmax")
def _softmax(x, axis=-1):
    shifted = x - np.max(x, axis=int(axis), keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=int(axis), keepdims=True)


@KERNELS.register("topk")
def _topk(x, k=1, axis=-1, ascending=False, sort=True, return_indices=True):
    axis = int(axis)
    order = np.argsort(x if ascending else -x, axis=axis, kind="stable")
    order = np.take(order, np.arange(int(k)), axis=axis)
    values = np.take_along_axis(x, order, axis=axis)
    return (values, order.astype(np.int32)) if return_indices else values


@KERNELS.register("cumsum")
def _cumsum(x, axis=0, exclusive=False, reverse=False):
    axis = int(axis)
    data = np.flip(x, axis) if reverse else x
    total = np.cumsum(data, axis=axis)
    if exclusive:
        total = total - data
    return np.flip(total, axis) if reverse else total


@KERNELS.register("layer_norm")
def _layer_norm(x, axes=None, gamma=None, beta=None, epsilon=1e-5):
    axes = _axes(axes, x.ndim)
    mean = x.mean(axis=axes, keepdims=True)
    variance = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(variance + epsilon)
    broadcast = [x.shape[a] if a in axes else 1 for a in range(x.ndim)]
    if gamma is not None:
        y = y * gamma.reshape(broadcast)
    if beta is not None:
        y = y + beta.reshape(broadcast)
    return y


# -- linear algebra ------------------------------------------------------------------------------


@KERNELS.register("linear")
def _linear(x, weight, bias=None):
    y = np.matmul(x, weight.T)
    return y if bias is None else y + bias


@KERNELS.register("matmul")
def _matmul(x, y, transpose_x=False, transpose_y=False):
    if transpose_x:
        x = np.swapaxes(x, -1, -2)
    if transpose_y:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _spatial_pads(pad_type: str, pad, spatial, kernel_sizes, strides, dilations) -> list[tuple[int, int]]:
    """(before, after) per spatial axis for MIL's pad types ('same' puts the extra cell after, 'same_lower' before)."""
    if pad_type == "custom":
        pad = [int(p) for p in pad]
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(len(spatial))]
    if pad_type == "same_lower":
        return [(after, before) for before, after in window_pads("same", spatial, kernel_sizes, strides, dilations)]
    if pad_type in ("same", "valid"):
        return window_pads(pad_type, spatial, kernel_sizes, strides, dilations)
    raise ValueError(f"unknown pad_type {pad_type!r}")


def _windows(x, kernel_sizes, strides, dilations, pads, pad_value):
    """Sliding windows of a channels-first batch: (N, C, Ho, Wo, kh, kw), or (N, C, Do, Ho, Wo, kd, kh, kw) in 3-D."""
    axes = tuple(range(2, x.ndim))
    return sliding_windows(x, kernel_sizes, strides, pads, dilation=dilations, axes=axes, pad_value=pad_value)


@KERNELS.register("conv")
def _conv(x, weight, bias=None, strides=None, pad_type="valid", pad=None, dilations=None, groups=1):
    rank = x.ndim - 2  # 2-D (NCHW) or 3-D (NCDHW)
    if rank not in (2, 3):
        raise ValueError(f"conv evaluates 2-D and 3-D convolutions only; input rank {x.ndim}")
    kernel_sizes = weight.shape[2:]
    strides = [1] * rank if strides is None else [int(s) for s in strides]
    dilations = [1] * rank if dilations is None else [int(d) for d in dilations]
    pads = _spatial_pads(pad_type, pad, x.shape[2:], kernel_sizes, strides, dilations)
    windows = _windows(x, kernel_sizes, strides, dilations, pads, 0.0)  # N, C, *out, *taps
    out = windows.shape[2:2 + rank]
    # (N, *out, C, *taps): each output cell's window as one row
    rows = windows.transpose(0, *range(2, 2 + rank), 1, *range(2 + rank, 2 + 2 * rank))
    groups = int(groups)
    cin, cout = x.shape[1] // groups, weight.shape[0] // groups
    outputs = [
        rows[..., g * cin:(g + 1) * cin, *([slice(None)] * rank)].reshape(-1, cin * math.prod(kernel_sizes))
        @ weight[g * cout:(g + 1) * cout].reshape(cout, -1).T
        for g in range(groups)
    ]
    y = np.concatenate(outputs, axis=1).reshape(x.shape[0], *out, -1)
    y = y.transpose(0, rank + 1, *range(1, rank + 1))
    return y if bias is None else y + bias.reshape(1, -1, *([1] * rank))


def _pool(x, kernel_sizes, strides, pad_type, pad, ceil_mode, pad_value):
    if bool(ceil_mode):
        raise ValueError("ceil_mode pooling is not evaluated here")
    kernel_sizes = [int(k) for k in kernel_sizes]
    rank = len(kernel_sizes)
    strides = [1] * rank if strides is None else [int(s) for s in strides]
    pads = _spatial_pads(pad_type, pad, x.shape[2:], kernel_sizes, strides, [1] * rank)
    return _windows(x, kernel_sizes, strides, [1] * rank, pads, pad_value), pads


@KERNELS.register("max_pool")
def _max_pool(x, kernel_sizes, strides=None, pad_type="valid", pad=None, ceil_mode=False):
    windows, _ = _pool(x, kernel_sizes, strides, pad_type, pad, ceil_mode, -np.inf)
    return windows.max(axis=tuple(range(-len(kernel_sizes), 0)))


@KERNELS.register("avg_pool")
def _avg_pool(x, kernel_sizes, strides=None, pad_type="valid", pad=None, exclude_padding_from_average=False,
              ceil_mode=False):
    windows, pads = _pool(x, kernel_sizes, strides, pad_type, pad, ceil_mode, 0.0)
    taps = tuple(range(-len(kernel_sizes), 0))
    total = windows.sum(axis=taps)
    if not bool(exclude_padding_from_average):
        return total / float(np.prod([int(k) for k in kernel_sizes]))
    ones = np.ones((1, 1, *x.shape[2:]), x.dtype)
    counts, _ = _pool(ones, kernel_sizes, strides, pad_type, pad, ceil_mode, 0.0)
    return total / counts.sum(axis=taps)


# -- shapes and data movement ----------------------------------------------------------------------


@KERNELS.register("transpose")
def _transpose(x, perm):
    return np.transpose(x, [int(p) for p in perm])


@KERNELS.register("reshape")
def _reshape(x, shape):
    shape = [int(x.shape[i]) if int(d) == 0 else int(d) for i, d in enumerate(shape)]
    return np.reshape(x, shape)


@KERNELS.register("concat")
def _concat(values, axis, interleave=False):
    if bool(interleave):
        raise ValueError("interleaved concat is not evaluated here")
    return np.concatenate(values, axis=int(axis))


@KERNELS.register("split")
def _split(x, num_splits=None, split_sizes=None, axis=0):
    axis = int(axis)
    if split_sizes is not None:
        return tuple(np.split(x, np.cumsum([int(s) for s in split_sizes])[:-1], axis=axis))
    return tuple(np.split(x, int(num_splits), axis=axis))


@KERNELS.register("gather")
def _gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    if int(batch_dims) != 0:
        raise ValueError("gather with batch_dims is not evaluated here")
    axis = int(axis)
    size = x.shape[axis]
    indices = np.asarray(indices).astype(np.int64)
    if indices.size and (indices.min() < -size or indices.max() >= size):
        raise IndexError(f"gather index out of range [{-size}, {size}): min {indices.min()}, max {indices.max()}")
    return np.take(x, indices, axis=axis)


@KERNELS.register("shape")
def _shape(x):
    return np.array(x.shape, dtype=np.int32)


@KERNELS.register("expand_dims")
def _expand_dims(x, axes):
    return np.expand_dims(x, tuple(int(a) for a in np.atleast_1d(axes)))


@KERNELS.register("tile")
def _tile(x, reps):
    return np.tile(x, [int(r) for r in reps])


@KERNELS.register("pad")
def _pad(x, pad, mode="constant", constant_val=0.0):
    if mode != "constant":
        raise ValueError(f"pad mode {mode!r} is not evaluated here")
    pad = [int(p) for p in pad]
    widths = [(0, 0)] * (x.ndim - len(pad) // 2) + list(zip(pad[0::2], pad[1::2]))  # pads cover the last axes
    return np.pad(x, widths, constant_values=constant_val)


@KERNELS.register("slice_by_index")
def _slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    if squeeze_mask is not None and np.any(squeeze_mask):
        raise ValueError("slice_by_index with squeeze_mask is not evaluated here")
    stride = [1] * x.ndim if stride is None else [int(s) for s in stride]
    begin_mask = [False] * x.ndim if begin_mask is None else [bool(m) for m in begin_mask]
    end_mask = [False] * x.ndim if end_mask is None else [bool(m) for m in end_mask]
    index = tuple(slice(None if bm else int(b), None if em else int(e), s)
                  for b, e, s, bm, em in zip(begin, end, stride, begin_mask, end_mask))
    return x[index]


# -- compressed weights (constexpr ops) ------------------------------------------------------------
# Each follows the op's definition in the MIL spec (coremltools' iOS16/iOS18 op docs); the tests check
# them against coremltools' own decompression of the same packages. Masks arrive as 0/1 arrays (uint1),
# palette indices as small unsigned integers, one per element.


def _block_coordinates(shape, mask_or_none, groups) -> tuple:
    """Per axis, the block (group) coordinate of each nonzero position of ``mask_or_none`` (or of every position)."""
    positions = np.nonzero(mask_or_none) if mask_or_none is not None else np.indices(shape).reshape(len(shape), -1)
    for axis, (size, count) in enumerate(zip(shape, groups)):
        if count == 0 or size % count:
            raise ValueError(f"{count} blocks do not divide axis {axis} of size {size}")
    return tuple(position // (size // count) for position, size, count in zip(positions, shape, groups))


def _palette(lut: np.ndarray, shape, mask, indices: np.ndarray) -> np.ndarray:
    """Values of ``indices`` (flat, one per position) in the palettes of their blocks; scalar palettes only."""
    if lut.shape[-1] != 1:
        raise ValueError(f"vector palettization (vector size {lut.shape[-1]}) is not evaluated here")
    blocks = _block_coordinates(shape, mask, lut.shape[:-2])
    return lut[(*blocks, indices.reshape(-1).astype(np.intp), 0)]


def _shift_scale(values: np.ndarray, shape, mask, scale: np.ndarray, offset) -> np.ndarray:
    """``scale * (values - offset)`` for flat ``values``, each with its block's scale and offset."""
    blocks = _block_coordinates(shape, mask, scale.shape)
    values = values.reshape(-1).astype(scale.dtype)
    if offset is not None:
        values = values - np.asarray(offset)[blocks].astype(scale.dtype)
    return scale[blocks] * values


@DECOMPRESSORS.register("constexpr_sparse_to_dense")
def _sparse_to_dense(nonzero_data, mask, shape=None):
    if shape is not None:  # iOS16: the mask is packed bits (little-endian), the shape given apart
        shape = tuple(int(d) for d in shape)
        bits = np.unpackbits(mask.astype(np.uint8), bitorder="little")[: math.prod(shape)].reshape(shape)
    else:  # iOS18: one uint1 per element, in the weight's shape
        bits = mask
    dense = np.zeros(bits.shape, nonzero_data.dtype)
    dense[bits != 0] = nonzero_data
    return dense


@DECOMPRESSORS.register("constexpr_lut_to_sparse")
def _lut_to_sparse(indices_mask, indices_nonzero_data, lut, vector_axis=None):
    return indices_mask, _palette(lut, indices_mask.shape, indices_mask, indices_nonzero_data)


@DECOMPRESSORS.register("constexpr_sparse_blockwise_shift_scale")
def _sparse_blockwise_shift_scale(data_mask, nonzero_data, scale, offset=None):
    return data_mask, _shift_scale(nonzero_data, data_mask.shape, data_mask, scale, offset)


@DECOMPRESSORS.register("constexpr_lut_to_dense")
def _lut_to_dense(indices, lut, vector_axis=None):
    return _palette(lut, indices.shape, None, indices).reshape(indices.shape)


@DECOMPRESSORS.register("constexpr_blockwise_shift_scale")
def _blockwise_shift_scale(data, scale, offset=None):
    return _shift_scale(data, data.shape, None, scale, offset).reshape(data.shape)
