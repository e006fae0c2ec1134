"""Compiled CSR kernels (numba) for the bundle backend; optional, beside the scipy ones they replace.

Unstructured CSR weights run as sliced ELLPACK (`Sell8`, SELL-8-sigma), computing
``y = activation(W @ x + bias)`` with ``W`` the (outputs, inputs) matrix of a dense or conv
kernel, bias added and ReLU applied in the same pass:

- ``sell_matvec``: one input vector. A CSR row costs three dependent scalar loads per
  nonzero (column index, value, gathered input), about 2.5 cycles each. A slice of eight rows
  stored column by column loads eight values and eight indices contiguously and fetches the
  eight inputs with one hardware gather (`_gather_madd`, LLVM ``masked.gather``), in two
  independent 8-lane accumulators: 3-4x the CSR kernel on this machine class.
- ``sell_matmat``: a batch held transposed, ``xt`` (inputs, batch), so each nonzero adds a
  contiguous batch-wide row ``value * xt[column]``; two 16-lane tiles (`TILE`) of the output
  row stay in registers over the row's nonzeros (the batch is padded to a multiple of 16):
  on AVX-512 one load and one fused multiply-add per tile and nonzero.

Weights pruned in 1x4 blocks (RSN2's ``block_size=4``: four consecutive
inputs of one output unit kept or pruned together) have two more kernels, over
`Blocks1x4` (one block-column index per block, its four values contiguous):

- ``block_matvec``: per block one index, one 4-wide load of values and one of inputs and
  a 4-lane multiply-add, in four independent 4-lane accumulators. The 4-lane operations
  are written as LLVM vector ops (`_Lanes`): numba leaves LLVM's SLP vectoriser off,
  so four scalar sums would stay scalar.
- ``block_matmat``: as ``sell_matmat``, each block adding four contiguous batch-wide rows of
  ``xt``, in 16-lane tiles of the batch that stay in a register over the output row's
  blocks (the batch is padded to a multiple of 16); two tiles per pass share the block's loads.

Values may be float32 or float16 (passed as their uint16 bits, widened to float32 in the
kernel, so float16 weights stay half the size in memory); sums are float32, multiply-adds fused. Column
indices keep the bundle's dtype (uint8/uint16/uint32). Every kernel exists serial and
parallel (rows split over numba's threads in chunks of `CHUNK`); the product classes pick one
from ``threads``. The batch kernels run best on ``xt`` and ``out`` that start on a cache line
(`aligned_empty`; `TaskProgram` aligns every buffer to 64 bytes): with 16-lane loads across two
lines, a 1000 x 1000 product at batch 32 took 1.45x as long.
Compiled code is cached on disk (``cache=True``), so only the first process to use a
kernel pays for compiling it.

Example:
    >>> product = NumbaCSRProduct(csr_weight, bias, relu=True, threads=1)   # holds `Sell8.from_csr(csr_weight)`
    >>> y = product(x)                      # (batch, outputs) float32
    >>> blocks = Blocks1x4.from_csr(csr_weight)  # None unless the weight is 1x4-block structured
    >>> y = NumbaBlockProduct(blocks, bias, relu=True, threads=1)(x)
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic, models, overload, register_jitable, register_model

from mann_edge.sparse import CSRWeight

__all__ = [
    "NumbaCSRProduct",
    "NumbaBlockProduct",
    "Blocks1x4",
    "Sell8",
    "sell_matvec",
    "sell_matmat",
    "block_matvec",
    "block_matmat",
    "max_threads",
    "BLOCK",
    "MIN_BLOCK_FILL",
    "PARALLEL_MIN_BLOCK_LANES",
    "LANES",
    "TILE",
    "whole_tiles",
    "aligned_empty",
]

_CACHE = True


def max_threads() -> int:
    """How many threads numba's parallel kernels can use in this process."""
    return int(numba.config.NUMBA_NUM_THREADS)


@intrinsic
def _half_to_float(typingctx, bits):
    """float32 of the IEEE half whose bits are ``bits`` (LLVM ``fpext half``: F16C on x86, native on arm64)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


def _value(data, k):
    """The k-th stored value as float32 (the Python form is never called; numba uses the overload)."""
    raise NotImplementedError


@overload(_value, inline="always")
def _value_overload(data, k):
    if data.dtype == types.uint16:  # float16 values, passed as their bits
        return lambda data, k: _half_to_float(data[k])
    return lambda data, k: np.float32(data[k])


@numba.njit(cache=_CACHE, nogil=True, inline="always")
def _activate(value, relu):
    # as the reference relu: x >= 0 keeps x (and -0.0), anything else (NaN too) gives 0
    if relu and not value >= 0:
        return np.float32(0.0)
    return value


def aligned_empty(shape, dtype=np.float32) -> np.ndarray:
    """An uninitialised array whose first element sits on a 64-byte boundary (a cache line; numpy
    promises 16 bytes).

    Example:
        >>> aligned_empty((3, 16)).ctypes.data % 64
        0
    """
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(size + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start: start + size].view(dtype).reshape(shape)


TILE = 16
"""Lanes of a batch tile: the batch kernels read and write the batch in tiles of 16 (an AVX-512 register,
two AVX ones, four NEON ones), so their callers pad it to a multiple of 16 (`whole_tiles`)."""


@register_jitable
def whole_tiles(batch):
    """``batch`` rounded up to whole tiles (`TILE`): the lanes a batch kernel reads and writes. Plain Python,
    and inlined where compiled code calls it.

    Example:
        >>> whole_tiles(1), whole_tiles(16), whole_tiles(17)
        (16, 16, 32)
    """
    return (batch + TILE - 1) // TILE * TILE


def _as_columns(x: np.ndarray, rows: int, lanes: int) -> np.ndarray:
    """``x`` (batch, inputs) transposed into (rows, lanes), zero past the inputs and past the batch (the
    padding the kernels read); ``x.T`` itself when it needs none, free when ``x`` is the transposed output
    of the previous product."""
    batch, inputs = x.shape
    if rows == inputs and lanes == batch:
        return np.ascontiguousarray(x.T, np.float32)
    xt = aligned_empty((rows, lanes))
    xt[inputs:] = 0.0
    xt[:inputs, batch:] = 0.0
    xt[:inputs, :batch] = x.T
    return xt
CHUNK = 16
"""Rows (slices for `sell_matvec`) a parallel kernel hands to a thread at a time. Each compiled call
updates the reference counts of its array arguments (about 60 ns): a kernel that made one call per
row spent a third of a 1000 x 1000 product at batch 32 on them, so the loops over rows sit inside."""


# -- 1x4 blocks --------------------------------------------------------------------------------

BLOCK = 4
MIN_BLOCK_FILL = 0.75
"""A weight runs on the block kernels when its nonzeros fill at least this share of its blocks' lanes."""
PARALLEL_MIN_BLOCK_LANES = 1 << 16
"""Blocks times batch below which the block kernels run serial whatever ``threads`` says: a
1000 x 1000 layer of 25,000 blocks takes about 12 us at batch 1, and waking numba's threads
for it costs more than the second thread saves."""


class _Lanes(types.Type):
    """``count`` float32 lanes held as one LLVM ``<count x float>``: 4 an SSE/NEON register, 8 an AVX one,
    16 an AVX-512 one (LLVM splits a vector wider than the machine's registers into several)."""

    def __init__(self, count: int):
        self.count = count
        super().__init__(name=f"Lanes{count}")


@register_model(_Lanes)
class _LanesModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(ir.FloatType(), fe_type.count))


_LANES4, _LANES8, _LANES16 = _Lanes(4), _Lanes(8), _Lanes(16)
_VECTOR4, _VECTOR8 = ir.VectorType(ir.FloatType(), 4), ir.VectorType(ir.FloatType(), 8)


@intrinsic
def _zero4(typingctx):
    def codegen(context, builder, signature, args):
        return ir.Constant(_VECTOR4, [0.0] * 4)

    return _LANES4(), codegen


@intrinsic
def _load4(typingctx, array, start):
    """Lanes ``array[start:start + 4]`` as float32 (uint16 arrays hold float16 bits); no bounds check."""
    if not isinstance(array, types.Array) or array.dtype not in (types.float32, types.uint16):
        return None
    half = array.dtype == types.uint16

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, value=args[0]).data
        pointer = builder.gep(data, [args[1]])
        if half:
            bits = builder.load(builder.bitcast(pointer, ir.VectorType(ir.IntType(16), 4).as_pointer()), align=2)
            return builder.fpext(builder.bitcast(bits, ir.VectorType(ir.HalfType(), 4)), _VECTOR4)
        return builder.load(builder.bitcast(pointer, _VECTOR4.as_pointer()), align=4)

    return _LANES4(array, types.intp), codegen


@intrinsic
def _index(typingctx, indices, k):
    """``indices[k]`` (unsigned) widened to intp; no bounds check.

    numba's own ``indices[k]`` adds a negative-index fix-up to every load of a signed ``k``,
    which costs as much as a block's arithmetic.
    """
    if not isinstance(indices, types.Array) or not isinstance(indices.dtype, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, value=args[0]).data
        return builder.zext(builder.load(builder.gep(data, [args[1]])), ir.IntType(64))

    return types.intp(indices, types.intp), codegen


def _fma(builder: ir.IRBuilder, a, b, c):
    """LLVM ``fma(a, b, c)`` = ``a * b + c`` lane by lane, one rounding (one instruction on FMA3 and NEON)."""
    vector = a.type
    name = f"llvm.fma.v{vector.count}f32"
    function = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(vector, [vector] * 3),
                                                                name)
    return builder.call(function, [a, b, c])


@intrinsic
def _madd(typingctx, acc, a, b):
    """``acc + a * b`` lane by lane, fused (`_fma`)."""
    if not isinstance(acc, _Lanes) or a != acc or b != acc:
        return None

    def codegen(context, builder, signature, args):
        return _fma(builder, args[1], args[2], args[0])

    return acc(acc, acc, acc), codegen


@intrinsic
def _add(typingctx, a, b):
    """``a + b`` lane by lane."""
    if not isinstance(a, _Lanes) or b != a:
        return None

    def codegen(context, builder, signature, args):
        return builder.fadd(args[0], args[1])

    return a(a, a), codegen


@intrinsic
def _sum4(typingctx, lanes):
    def codegen(context, builder, signature, args):
        lane = [builder.extract_element(args[0], ir.Constant(ir.IntType(32), j)) for j in range(4)]
        return builder.fadd(builder.fadd(lane[0], lane[1]), builder.fadd(lane[2], lane[3]))

    return types.float32(_LANES4), codegen


@numba.njit(cache=_CACHE, nogil=True)
def _block_rows(indptr, columns, values, x, bias, relu, out, first, last):
    # four independent accumulators: one would make each block wait for the previous add
    for i in range(first, last):
        k, end = indptr[i], indptr[i + 1]
        a0 = a1 = a2 = a3 = _zero4()
        while k + 4 <= end:
            a0 = _madd(a0, _load4(values, 4 * k), _load4(x, 4 * _index(columns, k)))
            a1 = _madd(a1, _load4(values, 4 * k + 4), _load4(x, 4 * _index(columns, k + 1)))
            a2 = _madd(a2, _load4(values, 4 * k + 8), _load4(x, 4 * _index(columns, k + 2)))
            a3 = _madd(a3, _load4(values, 4 * k + 12), _load4(x, 4 * _index(columns, k + 3)))
            k += 4
        while k < end:
            a0 = _madd(a0, _load4(values, 4 * k), _load4(x, 4 * _index(columns, k)))
            k += 1
        out[i] = _activate(_sum4(_add(_add(a0, a1), _add(a2, a3))) + bias[i], relu)


@numba.njit(cache=_CACHE, nogil=True)
def _block_matvec_serial(indptr, columns, values, x, bias, relu, out):
    _block_rows(indptr, columns, values, x, bias, relu, out, 0, out.size)


@numba.njit(cache=_CACHE, nogil=True, parallel=True)
def _block_matvec_parallel(indptr, columns, values, x, bias, relu, out):
    for c in prange((out.size + CHUNK - 1) // CHUNK):
        _block_rows(indptr, columns, values, x, bias, relu, out, c * CHUNK, min(out.size, (c + 1) * CHUNK))


def _vector_ops(lanes: _Lanes):
    """Intrinsics over ``lanes``: splat (one float32 in every lane), load and store (``array[start:start +
    count]``, float32, no bounds check) and relu (as `_activate`: a lane >= 0 keeps its value and -0.0,
    anything else, NaN too, gives 0)."""
    vector = ir.VectorType(ir.FloatType(), lanes.count)

    @intrinsic
    def splat(typingctx, value):
        def codegen(context, builder, signature, args):
            one = builder.insert_element(ir.Constant(vector, None), args[0], ir.Constant(ir.IntType(32), 0))
            return builder.shuffle_vector(one, ir.Constant(vector, None),
                                          ir.Constant(ir.VectorType(ir.IntType(32), lanes.count), [0] * lanes.count))

        return lanes(types.float32), codegen

    @intrinsic
    def load(typingctx, array, start):
        if not isinstance(array, types.Array) or array.dtype != types.float32:
            return None

        def codegen(context, builder, signature, args):
            data = context.make_array(signature.args[0])(context, builder, value=args[0]).data
            return builder.load(builder.bitcast(builder.gep(data, [args[1]]), vector.as_pointer()), align=4)

        return lanes(array, types.intp), codegen

    @intrinsic
    def store(typingctx, array, start, values):
        if not isinstance(array, types.Array) or array.dtype != types.float32 or values != lanes:
            return None

        def codegen(context, builder, signature, args):
            data = context.make_array(signature.args[0])(context, builder, value=args[0]).data
            builder.store(args[2], builder.bitcast(builder.gep(data, [args[1]]), vector.as_pointer()), align=4)
            return context.get_dummy_value()

        return types.none(array, types.intp, lanes), codegen

    @intrinsic
    def relu(typingctx, values):
        def codegen(context, builder, signature, args):
            keep = builder.fcmp_ordered(">=", args[0], ir.Constant(vector, [0.0] * lanes.count))
            return builder.select(keep, args[0], ir.Constant(vector, [0.0] * lanes.count))

        return lanes(lanes), codegen

    return splat, load, store, relu


_splat8, _, _, _ = _vector_ops(_LANES8)
_splat16, _load16, _store16, _relu16 = _vector_ops(_LANES16)


@intrinsic
def _spread(typingctx, values, j):
    """Lane ``j`` (a constant) of four, in every lane of a 16-lane vector."""
    if values != _LANES4 or not isinstance(j, types.IntegerLiteral):
        return None
    lane = j.literal_value

    def codegen(context, builder, signature, args):
        return builder.shuffle_vector(args[0], args[0], ir.Constant(ir.VectorType(ir.IntType(32), 16), [lane] * 16))

    return _LANES16(_LANES4, j), codegen


@numba.njit(cache=_CACHE, nogil=True)
def _block_tiles(indptr, columns, values, xt, batch, bias, relu, out, first, last):
    # ``xt`` and ``out`` flat, ``batch`` a multiple of TILE: two tiles of an output row stay in registers over
    # the row's blocks, sharing the block's loads; each of a block's four values adds into its own accumulator,
    # so that no add waits on the previous one
    for i in range(first, last):
        start, end = indptr[i], indptr[i + 1]
        t = 0
        while t < batch:
            two = t + 2 * TILE <= batch
            a0 = a1 = _splat16(bias[i])
            b0 = b1 = c0 = c1 = d0 = d1 = _splat16(np.float32(0.0))
            for k in range(start, end):
                v = _load4(values, 4 * k)
                v0, v1, v2, v3 = _spread(v, 0), _spread(v, 1), _spread(v, 2), _spread(v, 3)
                c = 4 * _index(columns, k) * batch + t
                a0 = _madd(a0, v0, _load16(xt, c))
                b0 = _madd(b0, v1, _load16(xt, c + batch))
                c0 = _madd(c0, v2, _load16(xt, c + 2 * batch))
                d0 = _madd(d0, v3, _load16(xt, c + 3 * batch))
                if two:
                    a1 = _madd(a1, v0, _load16(xt, c + TILE))
                    b1 = _madd(b1, v1, _load16(xt, c + batch + TILE))
                    c1 = _madd(c1, v2, _load16(xt, c + 2 * batch + TILE))
                    d1 = _madd(d1, v3, _load16(xt, c + 3 * batch + TILE))
            a0 = _add(_add(a0, b0), _add(c0, d0))
            _store16(out, i * batch + t, _relu16(a0) if relu else a0)
            if two:
                a1 = _add(_add(a1, b1), _add(c1, d1))
                _store16(out, i * batch + t + TILE, _relu16(a1) if relu else a1)
            t += 2 * TILE if two else TILE


@numba.njit(cache=_CACHE, nogil=True)
def _block_matmat_serial(indptr, columns, values, xt, batch, bias, relu, out):
    _block_tiles(indptr, columns, values, xt, batch, bias, relu, out, 0, bias.size)


@numba.njit(cache=_CACHE, nogil=True, parallel=True)
def _block_matmat_parallel(indptr, columns, values, xt, batch, bias, relu, out):
    for c in prange((bias.size + CHUNK - 1) // CHUNK):
        _block_tiles(indptr, columns, values, xt, batch, bias, relu, out, c * CHUNK, min(bias.size, (c + 1) * CHUNK))


def block_matvec(indptr, columns, values, x, bias, relu: bool, out, *, parallel: bool = False) -> None:
    """``out = act(W @ x + bias)`` for 1x4 blocks; ``x`` float32, contiguous, of size ``4 * block columns``.

    ``values`` holds four values per block (float32, or float16 as uint16 bits); the
    kernel reads ``x`` unchecked, so its size must cover every block (`NumbaBlockProduct` pads it).
    """
    (_block_matvec_parallel if parallel else _block_matvec_serial)(indptr, columns, values, x, bias, relu, out)


def block_matmat(indptr, columns, values, xt, bias, relu: bool, out, *, parallel: bool = False) -> None:
    """``out = act(W @ xt + bias[:, None])`` for 1x4 blocks, ``xt`` (4 * block columns, batch), C-contiguous.

    The kernel reads and writes whole tiles, unchecked: ``batch`` must be a multiple of `TILE`
    (`NumbaBlockProduct` pads it with zero columns).
    """
    if xt.shape[1] % TILE or out.shape != (bias.size, xt.shape[1]):
        raise ValueError(f"block_matmat needs xt (4 * block columns, {TILE}k) and out (outputs, {TILE}k); "
                         f"got {xt.shape}, {out.shape}")
    (_block_matmat_parallel if parallel else _block_matmat_serial)(
        indptr, columns, values, xt.reshape(-1), xt.shape[1], bias, relu, out.reshape(-1)
    )


# -- sliced ELLPACK (SELL-8-sigma) -------------------------------------------------------------

LANES = 8
"""Rows per slice of `Sell8`: one 8-lane gather (an AVX2 register; two NEON ones) per step."""

_INDEX8 = {8: ir.VectorType(ir.IntType(8), 8), 16: ir.VectorType(ir.IntType(16), 8), 32: ir.VectorType(ir.IntType(32), 8)}
_I64X8 = ir.VectorType(ir.IntType(64), 8)
_PTRX8 = ir.VectorType(ir.FloatType().as_pointer(), 8)


@intrinsic
def _gather_madd(typingctx, acc, values, indices, x, k):
    """``acc + values[k:k+8] * x[indices[k:k+8]]`` lane by lane, the eight inputs fetched by one gather.

    A CSR row costs three dependent scalar loads per nonzero; a slice of eight rows stored
    column by column loads eight values and eight indices contiguously and fetches the eight
    inputs with LLVM's ``masked.gather`` (``vgatherdps`` on AVX2/AVX-512). No bounds checks.
    """
    if not (isinstance(values, types.Array) and values.dtype in (types.float32, types.uint16)
            and isinstance(indices, types.Array) and indices.dtype in (types.uint8, types.uint16, types.uint32)
            and isinstance(x, types.Array) and x.dtype == types.float32):
        return None
    half = values.dtype == types.uint16
    bits = indices.dtype.bitwidth

    def codegen(context, builder, signature, args):
        acc, values_arg, indices_arg, x_arg, k = args
        data = context.make_array(signature.args[1])(context, builder, value=values_arg).data
        index_data = context.make_array(signature.args[2])(context, builder, value=indices_arg).data
        x_data = context.make_array(signature.args[3])(context, builder, value=x_arg).data
        if half:
            raw = builder.load(builder.bitcast(builder.gep(data, [k]), _INDEX8[16].as_pointer()), align=2)
            v = builder.fpext(builder.bitcast(raw, ir.VectorType(ir.HalfType(), 8)), _VECTOR8)
        else:
            v = builder.load(builder.bitcast(builder.gep(data, [k]), _VECTOR8.as_pointer()), align=4)
        index = builder.load(builder.bitcast(builder.gep(index_data, [k]), _INDEX8[bits].as_pointer()), align=bits // 8)
        # addresses x + 4 * index, as a vector of pointers (llvmlite builds no vector GEP)
        base = builder.ptrtoint(x_data, ir.IntType(64))
        splat = builder.insert_element(ir.Constant(_I64X8, None), base, ir.Constant(ir.IntType(32), 0))
        splat = builder.shuffle_vector(splat, ir.Constant(_I64X8, None), ir.Constant(ir.VectorType(ir.IntType(32), 8), [0] * 8))
        offsets = builder.shl(builder.zext(index, _I64X8), ir.Constant(_I64X8, [2] * 8))
        pointers = builder.inttoptr(builder.add(splat, offsets), _PTRX8)
        name = "llvm.masked.gather.v8f32.v8p0"
        gather = builder.module.globals.get(name) or ir.Function(
            builder.module, ir.FunctionType(_VECTOR8, [_PTRX8, ir.IntType(32), ir.VectorType(ir.IntType(1), 8), _VECTOR8]),
            name)
        fetched = builder.call(gather, [pointers, ir.Constant(ir.IntType(32), 4),
                                        ir.Constant(ir.VectorType(ir.IntType(1), 8), [1] * 8), ir.Constant(_VECTOR8, None)])
        return _fma(builder, v, fetched, acc)

    return _LANES8(_LANES8, values, indices, x, types.intp), codegen


@intrinsic
def _lane8(typingctx, lanes, j):
    """Lane ``j`` of eight."""
    def codegen(context, builder, signature, args):
        return builder.extract_element(args[0], builder.trunc(args[1], ir.IntType(32)))

    return types.float32(_LANES8, types.intp), codegen


@numba.njit(cache=_CACHE, nogil=True)
def _sell_slices(sptr, indices, values, perm, x, bias, relu, out, first, last):
    # two accumulators: each gather waits on memory, the next one need not wait on its add
    for s in range(first, last):
        k, end = sptr[s], sptr[s + 1]
        a = b = _splat8(np.float32(0.0))
        while k + 2 * LANES <= end:
            a = _gather_madd(a, values, indices, x, k)
            b = _gather_madd(b, values, indices, x, k + LANES)
            k += 2 * LANES
        if k < end:
            a = _gather_madd(a, values, indices, x, k)
        a = _add(a, b)
        for j in range(LANES):
            row = perm[s * LANES + j]
            if row >= 0:
                out[row] = _activate(_lane8(a, j) + bias[row], relu)


@numba.njit(cache=_CACHE, nogil=True)
def _sell_matvec_serial(sptr, indices, values, perm, x, bias, relu, out):
    _sell_slices(sptr, indices, values, perm, x, bias, relu, out, 0, sptr.size - 1)


@numba.njit(cache=_CACHE, nogil=True, parallel=True)
def _sell_matvec_parallel(sptr, indices, values, perm, x, bias, relu, out):
    slices = sptr.size - 1
    for c in prange((slices + CHUNK - 1) // CHUNK):
        _sell_slices(sptr, indices, values, perm, x, bias, relu, out, c * CHUNK, min(slices, (c + 1) * CHUNK))


@numba.njit(cache=_CACHE, nogil=True)
def _sell_tiles(sptr, indices, values, perm, lengths, xt, batch, bias, relu, out, first, last):
    # rows of slices (a row's entries sit LANES apart) times ``xt`` (inputs, batch) flat, ``batch`` a multiple
    # of TILE: two tiles of the output row stay in registers over the row's entries, sharing each entry's
    # value and index; even and odd entries sum apart, so that a tile's adds need not wait on each other
    for position in range(first, last):
        row = perm[position]
        if row < 0:
            continue
        start = sptr[position // LANES] + position % LANES
        count = lengths[position]
        t = 0
        while t < batch:
            two = t + 2 * TILE <= batch
            a0 = a1 = _splat16(bias[row])
            b0 = b1 = _splat16(np.float32(0.0))
            k, j = start, 0
            while j + 2 <= count:
                v, w = _splat16(_value(values, k)), _splat16(_value(values, k + LANES))
                c, d = _index(indices, k) * batch + t, _index(indices, k + LANES) * batch + t
                a0 = _madd(a0, v, _load16(xt, c))
                b0 = _madd(b0, w, _load16(xt, d))
                if two:
                    a1 = _madd(a1, v, _load16(xt, c + TILE))
                    b1 = _madd(b1, w, _load16(xt, d + TILE))
                k += 2 * LANES
                j += 2
            if j < count:
                v = _splat16(_value(values, k))
                c = _index(indices, k) * batch + t
                a0 = _madd(a0, v, _load16(xt, c))
                if two:
                    a1 = _madd(a1, v, _load16(xt, c + TILE))
            a0 = _add(a0, b0)
            _store16(out, row * batch + t, _relu16(a0) if relu else a0)
            if two:
                a1 = _add(a1, b1)
                _store16(out, row * batch + t + TILE, _relu16(a1) if relu else a1)
            t += 2 * TILE if two else TILE


@numba.njit(cache=_CACHE, nogil=True)
def _sell_matmat_serial(sptr, indices, values, perm, lengths, xt, batch, bias, relu, out):
    _sell_tiles(sptr, indices, values, perm, lengths, xt, batch, bias, relu, out, 0, perm.size)


@numba.njit(cache=_CACHE, nogil=True, parallel=True)
def _sell_matmat_parallel(sptr, indices, values, perm, lengths, xt, batch, bias, relu, out):
    for c in prange((perm.size + CHUNK - 1) // CHUNK):
        _sell_tiles(sptr, indices, values, perm, lengths, xt, batch, bias, relu, out, c * CHUNK,
                    min(perm.size, (c + 1) * CHUNK))


def sell_matvec(sell: "Sell8", x, bias, relu: bool, out, *, parallel: bool = False) -> None:
    """``out = act(W @ x + bias)`` for one vector ``x`` (float32, contiguous, ``sell.cols`` long)."""
    (_sell_matvec_parallel if parallel else _sell_matvec_serial)(
        sell.sptr, sell.indices, sell.kernel_values, sell.perm, x, bias, relu, out)


def sell_matmat(sell: "Sell8", xt, bias, relu: bool, out, *, parallel: bool = False) -> None:
    """``out = act(W @ xt + bias[:, None])`` with ``xt`` (inputs, batch) and ``out`` (outputs, batch), C-contiguous.

    The kernel reads and writes whole tiles, unchecked: ``batch`` must be a multiple of `TILE`
    (`NumbaCSRProduct` pads it with zero columns).
    """
    if xt.shape[1] % TILE or out.shape != (sell.rows, xt.shape[1]) or xt.shape[0] != sell.cols:
        raise ValueError(f"sell_matmat needs xt ({sell.cols}, {TILE}k) and out ({sell.rows}, {TILE}k); "
                         f"got {xt.shape}, {out.shape}")
    (_sell_matmat_parallel if parallel else _sell_matmat_serial)(
        sell.sptr, sell.indices, sell.kernel_values, sell.perm, sell.lengths, xt.reshape(-1), xt.shape[1], bias, relu,
        out.reshape(-1))


class Sell8:
    """An (outputs, inputs) CSR weight as sliced ELLPACK: slices of 8 rows, stored column by column.

    Rows are sorted by their number of nonzeros (longest first, the "sigma" of SELL-C-sigma taken
    over the whole matrix), so the eight rows of a slice are about as long; each slice is as
    wide as its longest row, the shorter rows padded with zero values at input 0. Step ``j`` of
    slice ``s`` holds entry ``j`` of its eight rows at ``sptr[s] + 8 * j + lane``.

    Attributes:
        rows, cols: the matrix shape.
        sptr: int64 (slices + 1,), where each slice's entries start.
        indices: uint16 (or uint32 past 65,536 inputs), each entry's input.
        values: float32 or float16, each entry's value (0 in the padding).
        perm: int64 (slices * 8,), the row each lane holds (-1: none, past the last row).
        lengths: int64 (slices * 8,), the nonzeros of that row (the batch kernel skips the padding).
        nnz: the CSR's nonzeros; ``values.size / nnz`` - 1 is the padding's share.

    Example:
        >>> w = CSRWeight.from_dense(np.array([[1, 0], [0, 2], [3, 4]], "float32"), "oi")  # 2 outputs, 3 inputs
        >>> s = Sell8.from_csr(w)
        >>> s.perm[:2].tolist(), s.sptr.tolist(), s.values.reshape(-1, 8)[:, :2].tolist()
        ([1, 0], [0, 16], [[2.0, 1.0], [4.0, 3.0]])
    """

    def __init__(self, rows: int, cols: int, sptr, indices, values, perm, lengths, nnz: int):
        self.rows, self.cols, self.nnz = int(rows), int(cols), int(nnz)
        self.sptr, self.indices, self.values, self.perm, self.lengths = sptr, indices, values, perm, lengths

    @property
    def kernel_values(self) -> np.ndarray:
        """The values as the kernels take them: float32, or float16 as their uint16 bits."""
        return self.values.view(np.uint16) if self.values.dtype == np.float16 else self.values

    @property
    def padding(self) -> float:
        """Padded entries per nonzero (0.0: none)."""
        return self.values.size / self.nnz - 1 if self.nnz else 0.0

    @property
    def bytes_per_nonzero(self) -> float:
        """Bytes of values and indices a mat-vec streams per nonzero, padding included (the gathered inputs aside)."""
        return (self.values.itemsize + self.indices.itemsize) * (1 + self.padding)

    @classmethod
    def from_csr(cls, weight: CSRWeight) -> "Sell8":
        """The slices of a layout-'oi' CSR weight (any sparsity; rows may be empty)."""
        if weight.layout != "oi":
            raise ValueError(f"Sell8 takes a CSR weight of layout 'oi'. Received: layout {weight.layout!r}")
        rows, cols = weight.matrix_shape
        indptr = weight.indptr.astype(np.int64)
        lengths = np.diff(indptr)
        order = np.argsort(-lengths, kind="stable")  # longest rows first: a slice's rows are about as long
        slices = -(-rows // LANES)
        perm = np.full(slices * LANES, -1, np.int64)
        perm[:rows] = order
        lane_lengths = np.zeros(slices * LANES, np.int64)
        lane_lengths[:rows] = lengths[order]
        widths = lane_lengths.reshape(slices, LANES).max(axis=1) if slices else np.zeros(0, np.int64)
        sptr = np.zeros(slices + 1, np.int64)
        np.cumsum(widths * LANES, out=sptr[1:])
        position = np.empty(rows, np.int64)
        position[order] = np.arange(rows)
        # entry j of row r goes to sptr[slice] + lane + LANES * j, j = (its CSR index) - indptr[r]: one offset per
        # row, repeated over its entries, plus LANES times the CSR index
        offset = sptr[position // LANES] + position % LANES - LANES * indptr[:-1]
        destination = np.repeat(offset, lengths) + LANES * np.arange(weight.nnz, dtype=np.int64)
        index_dtype = np.uint16 if cols <= 1 << 16 else np.uint32
        indices = np.zeros(int(sptr[-1]), index_dtype)
        indices[destination] = weight.indices
        values = np.zeros(int(sptr[-1]), weight.data.dtype)
        values[destination] = weight.data
        return cls(rows, cols, sptr, indices, values, perm, lane_lengths, weight.nnz)


class Blocks1x4:
    """An (outputs, inputs) CSR weight regrouped in 1x4 blocks: four consecutive inputs of one output.

    Attributes:
        rows, cols: the matrix shape; the kernels read inputs padded with zeros to ``padded_cols``.
        indptr: int64 (rows + 1,), where each row's blocks start.
        columns: uint16 or uint32 (blocks,), each block's column divided by 4 (sorted within a row).
        values: (blocks * 4,) float32 or float16, each block's four values; inputs the CSR
            does not store are explicit zeros (the fill).
        nnz: the CSR's stored values, ``nnz / (4 * blocks)`` the fill.

    Example:
        >>> w = CSRWeight.from_dense(np.array([[1, 0], [2, 0], [3, 0], [4, 0], [0, 5]], "float32"), "oi")
        >>> b = Blocks1x4.from_csr(w, min_fill=0.5)   # matrix (2 outputs, 5 inputs), fill 5/8
        >>> b.columns.tolist(), b.values.tolist(), b.padded_cols
        ([0, 1], [1.0, 2.0, 3.0, 4.0, 5.0, 0.0, 0.0, 0.0], 8)
    """

    def __init__(self, rows: int, cols: int, indptr, columns, values, nnz: int):
        self.rows, self.cols = int(rows), int(cols)
        self.indptr, self.columns, self.values, self.nnz = indptr, columns, values, int(nnz)
        self.padded_cols = -(-self.cols // BLOCK) * BLOCK

    @property
    def blocks(self) -> int:
        return int(self.columns.size)

    @property
    def fill(self) -> float:
        """Share of the blocks' lanes the CSR stores (1.0: no explicit zero was added)."""
        return self.nnz / (BLOCK * self.blocks) if self.blocks else 1.0

    @classmethod
    def from_csr(cls, weight: CSRWeight, min_fill: float = MIN_BLOCK_FILL) -> "Blocks1x4 | None":
        """The blocks of a layout-'oi' CSR weight, or None when it is not 1x4-block structured.

        Not structured: another layout, no nonzero, or nonzeros filling less than
        ``min_fill`` of their blocks (each explicit zero costs a multiply the CSR skips).
        """
        if weight.layout != "oi" or weight.nnz == 0:
            return None
        rows, cols = weight.matrix_shape
        # CSR columns rise within a row, so a block's nonzeros are neighbours in CSR order: a block starts where
        # the block column changes or a row starts (counted on the stored dtype first: most weights are not blocks)
        block_column = weight.indices // BLOCK
        starts = np.ones(block_column.size, dtype=bool)
        starts[1:] = block_column[1:] != block_column[:-1]
        row_starts = weight.indptr[:-1].astype(np.int64)
        starts[row_starts[row_starts < block_column.size]] = True
        blocks = int(np.count_nonzero(starts))
        if weight.nnz < min_fill * BLOCK * blocks:
            return None
        index_dtype = np.uint16 if (cols - 1) // BLOCK <= 0xFFFF else np.uint32
        if weight.nnz == BLOCK * blocks:
            # every block full (RSN2's block masks): a block is four consecutive CSR entries, columns rising, so
            # the values are the CSR's in its order, and a row's blocks are a quarter of its entries
            return cls(rows, cols, weight.indptr.astype(np.int64) // BLOCK,
                       block_column[::BLOCK].astype(index_dtype), weight.data.copy(), weight.nnz)
        row_of = np.repeat(np.arange(rows, dtype=np.int64), np.diff(weight.indptr.astype(np.int64)))
        column = weight.indices.astype(np.int64)
        block_of = np.cumsum(starts) - 1
        indptr = np.zeros(rows + 1, np.int64)
        np.cumsum(np.bincount(row_of[starts], minlength=rows), out=indptr[1:])
        columns = (column[starts] // BLOCK).astype(index_dtype)
        values = np.zeros(blocks * BLOCK, weight.data.dtype)
        values[block_of * BLOCK + column % BLOCK] = weight.data
        return cls(rows, cols, indptr, columns, values, weight.nnz)


class NumbaBlockProduct:
    """``x (batch, inputs) -> act(x @ W.T + bias)`` for a 1x4-block weight, with the block kernels.

    Args:
        blocks: the weight's `Blocks1x4`.
        bias, relu, threads: as `NumbaCSRProduct`; small products (fewer than
            `PARALLEL_MIN_BLOCK_LANES` blocks times batch) run serial.

    Example:
        >>> blocks = Blocks1x4.from_csr(w)
        >>> NumbaBlockProduct(blocks, None, relu=False, threads=1)(np.ones((2, blocks.cols), "float32")).shape
        (2, blocks.rows)
    """

    def __init__(self, blocks: Blocks1x4, bias: np.ndarray | None, *, relu: bool, threads: int | None):
        self.rows, self.cols, self.padded_cols = blocks.rows, blocks.cols, blocks.padded_cols
        self.indptr = blocks.indptr
        self.columns = blocks.columns
        values = blocks.values
        self.values = values.view(np.uint16) if values.dtype == np.float16 else values
        self.bias = np.zeros(self.rows, np.float32) if bias is None else np.ascontiguousarray(bias, np.float32)
        self.relu = bool(relu)
        self.threads = max_threads() if threads is None else min(int(threads), max_threads())
        self.blocks = blocks.blocks

    def __call__(self, x: np.ndarray) -> np.ndarray:
        batch = x.shape[0]
        parallel = self.threads > 1 and self.blocks * batch >= PARALLEL_MIN_BLOCK_LANES
        if parallel:
            numba.set_num_threads(self.threads)
        padding = self.padded_cols - self.cols
        if batch == 1:
            vector = np.ascontiguousarray(x[0], np.float32)
            if padding:  # the last block reads past the inputs: zeros there, against its zero values
                vector = np.concatenate([vector, np.zeros(padding, np.float32)])
            out = np.empty(self.rows, np.float32)
            block_matvec(self.indptr, self.columns, self.values, vector, self.bias, self.relu, out, parallel=parallel)
            return out[None]
        lanes = whole_tiles(batch)
        out = aligned_empty((self.rows, lanes))
        if batch:
            block_matmat(self.indptr, self.columns, self.values, _as_columns(x, self.padded_cols, lanes), self.bias,
                         self.relu, out, parallel=parallel)
        return out[:, :batch].T


class NumbaCSRProduct:
    """``x (batch, inputs) -> act(x @ W.T + bias)`` for a CSR weight, on the sliced-ELLPACK kernels (`Sell8`).

    Args:
        weight: the (outputs, inputs) CSR matrix (layout "oi"), float32 or float16 values.
        bias: float32 (outputs,) or None.
        relu: apply ReLU in the same pass.
        threads: 1 runs serial kernels; N > 1 the parallel ones on N threads (capped at
            `max_threads()`); None all of numba's threads.

    Example:
        >>> NumbaCSRProduct(w, None, relu=False, threads=1)(np.ones((2, w.matrix_shape[1]), "float32")).shape
        (2, w.matrix_shape[0])
    """

    def __init__(self, weight: CSRWeight, bias: np.ndarray | None, *, relu: bool, threads: int | None):
        self.sell = Sell8.from_csr(weight)
        self.rows, self.cols = weight.matrix_shape
        self.bias = np.zeros(self.rows, np.float32) if bias is None else np.ascontiguousarray(bias, np.float32)
        self.relu = bool(relu)
        self.threads = max_threads() if threads is None else min(int(threads), max_threads())
        self.parallel = self.threads > 1

    def __call__(self, x: np.ndarray) -> np.ndarray:
        batch = x.shape[0]
        if self.parallel:
            numba.set_num_threads(self.threads)
        if batch == 1:
            out = np.empty(self.rows, np.float32)
            sell_matvec(self.sell, np.ascontiguousarray(x[0], np.float32), self.bias, self.relu, out,
                        parallel=self.parallel)
            return out[None]
        lanes = whole_tiles(batch)
        out = aligned_empty((self.rows, lanes))
        if batch:
            sell_matmat(self.sell, _as_columns(x, self.cols, lanes), self.bias, self.relu, out, parallel=self.parallel)
        return out[:, :batch].T
