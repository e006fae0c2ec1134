"""Compiled CSR kernels (numba) for the bundle backend; optional, beside the scipy ones they replace.

Two kernels, each computing ``y = activation(W @ x + bias)`` with ``W`` the (outputs, inputs)
CSR matrix of a dense or conv kernel, bias added and ReLU applied in the same pass:

- ``matvec``: one input vector. Each row is a dot product over its nonzeros, summed in eight
  interleaved partial sums: one running sum would make every multiply-add wait for the
  previous one, so the row would run at the adder's latency instead of the load rate.
- ``matmat``: a batch held transposed, ``xt`` (inputs, batch), so each nonzero adds a
  contiguous batch-wide row ``value * xt[column]`` (vectorised over the batch); four
  nonzeros are combined before touching the output row to keep the stores off the
  critical path.

Values may be float32 or float16 (passed as their uint16 bits, widened to float32 in the
kernel, so float16 weights stay half the size in memory); sums are float32. Column
indices keep the bundle's dtype (uint8/uint16/uint32). Every kernel exists serial and
parallel (rows split over numba's threads); `csr_product` picks one from ``threads``.
Compiled code is cached on disk (``cache=True``), so only the first process to use a
kernel pays for compiling it.

Example:
    >>> product = NumbaCSRProduct(csr_weight, bias, relu=True, threads=1)
    >>> y = product(x)                      # (batch, outputs) float32
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic, overload

from mann_edge.sparse import CSRWeight

__all__ = ["NumbaCSRProduct", "matvec", "matmat", "max_threads"]

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
def _row_dot(indptr, indices, data, x, i):
    k, end = indptr[i], indptr[i + 1]
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
    while k + 8 <= end:
        a0 += _value(data, k) * x[indices[k]]
        a1 += _value(data, k + 1) * x[indices[k + 1]]
        a2 += _value(data, k + 2) * x[indices[k + 2]]
        a3 += _value(data, k + 3) * x[indices[k + 3]]
        a4 += _value(data, k + 4) * x[indices[k + 4]]
        a5 += _value(data, k + 5) * x[indices[k + 5]]
        a6 += _value(data, k + 6) * x[indices[k + 6]]
        a7 += _value(data, k + 7) * x[indices[k + 7]]
        k += 8
    while k < end:
        a0 += _value(data, k) * x[indices[k]]
        k += 1
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


@numba.njit(cache=_CACHE, nogil=True, inline="always")
def _activate(value, relu):
    # as the reference relu: x >= 0 keeps x (and -0.0), anything else (NaN too) gives 0
    if relu and not value >= 0:
        return np.float32(0.0)
    return value


@numba.njit(cache=_CACHE, nogil=True)
def _matvec_serial(indptr, indices, data, x, bias, relu, out):
    for i in range(out.size):
        out[i] = _activate(_row_dot(indptr, indices, data, x, i) + bias[i], relu)


@numba.njit(cache=_CACHE, nogil=True, parallel=True)
def _matvec_parallel(indptr, indices, data, x, bias, relu, out):
    for i in prange(out.size):
        out[i] = _activate(_row_dot(indptr, indices, data, x, i) + bias[i], relu)


@numba.njit(cache=_CACHE, nogil=True, inline="always")
def _row_axpy(indptr, indices, data, xt, bias, relu, out, i):
    row = out[i]
    batch = row.size
    for b in range(batch):
        row[b] = bias[i]
    k, end = indptr[i], indptr[i + 1]
    while k + 4 <= end:
        v0, v1, v2, v3 = _value(data, k), _value(data, k + 1), _value(data, k + 2), _value(data, k + 3)
        x0, x1, x2, x3 = xt[indices[k]], xt[indices[k + 1]], xt[indices[k + 2]], xt[indices[k + 3]]
        for b in range(batch):
            row[b] += (v0 * x0[b] + v1 * x1[b]) + (v2 * x2[b] + v3 * x3[b])
        k += 4
    while k < end:
        v, xk = _value(data, k), xt[indices[k]]
        for b in range(batch):
            row[b] += v * xk[b]
        k += 1
    if relu:
        for b in range(batch):
            row[b] = _activate(row[b], relu)


@numba.njit(cache=_CACHE, nogil=True)
def _matmat_serial(indptr, indices, data, xt, bias, relu, out):
    for i in range(out.shape[0]):
        _row_axpy(indptr, indices, data, xt, bias, relu, out, i)


@numba.njit(cache=_CACHE, nogil=True, parallel=True)
def _matmat_parallel(indptr, indices, data, xt, bias, relu, out):
    for i in prange(out.shape[0]):
        _row_axpy(indptr, indices, data, xt, bias, relu, out, i)


def matvec(indptr, indices, data, x, bias, relu: bool, out, *, parallel: bool = False) -> None:
    """``out = act(W @ x + bias)`` for one vector ``x`` (float32, contiguous); ``data`` float32 or float16 bits."""
    (_matvec_parallel if parallel else _matvec_serial)(indptr, indices, data, x, bias, relu, out)


def matmat(indptr, indices, data, xt, bias, relu: bool, out, *, parallel: bool = False) -> None:
    """``out = act(W @ xt + bias[:, None])`` with ``xt`` (inputs, batch) and ``out`` (outputs, batch), C-contiguous."""
    (_matmat_parallel if parallel else _matmat_serial)(indptr, indices, data, xt, bias, relu, out)


class NumbaCSRProduct:
    """``x (batch, inputs) -> act(x @ W.T + bias)`` for a CSR weight, with the compiled kernels.

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
        self.rows, self.cols = weight.matrix_shape
        self.indptr = weight.indptr.astype(np.int64)
        self.indices = weight.indices
        self.data = weight.data.view(np.uint16) if weight.data.dtype == np.float16 else weight.data
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
            matvec(self.indptr, self.indices, self.data, np.ascontiguousarray(x[0], np.float32), self.bias,
                   self.relu, out, parallel=self.parallel)
            return out[None]
        out = np.empty((self.rows, batch), np.float32)
        if batch:
            # x.T is free when x is the transposed output of the previous CSR op
            xt = np.ascontiguousarray(x.T, np.float32)
            matmat(self.indptr, self.indices, self.data, xt, self.bias, self.relu, out, parallel=self.parallel)
        return out.T
