"""CSR weights: how the compact model stores a pruned weight.

A weight tensor is viewed as a matrix and that matrix is stored as CSR
(``indptr``, ``indices``, ``data``) with the smallest unsigned index dtype that
fits. Two views exist because ops read their weights differently:

- ``"oi"`` (dense and conv kernels): rows are output units, columns the flattened
  inputs, ``matrix = w.reshape(-1, w.shape[-1]).T``. A row holds everything one
  output unit reads, which is what a CSR mat-vec and TFLite's (out, in) layout want.
- ``"rows"`` (everything else: embedding tables, biases): ``matrix = w.reshape(w.shape[0], -1)``
  (a 1-D weight is one row), so gathering a table row is slicing a CSR row.

Numpy only: the runtime imports this.

Example:
    >>> w = np.array([[0, 2.0], [0, 0], [1.5, 0]], "float32")     # (in=3, out=2)
    >>> sw = CSRWeight.from_dense(w, "oi")
    >>> sw.nnz, sw.indices.dtype
    (2, dtype('uint8'))
    >>> np.array_equal(sw.to_dense(), w)
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["CSRWeight", "LAYOUTS", "encode_weight", "index_dtype", "weight_nbytes", "weight_nnz", "to_dense"]

LAYOUTS = ("oi", "rows")
INDEX_DTYPES = (np.dtype("uint8"), np.dtype("uint16"), np.dtype("uint32"), np.dtype("uint64"))
VALUE_DTYPES = (np.dtype("float32"), np.dtype("float16"))


def index_dtype(max_value: int) -> np.dtype:
    """The smallest unsigned dtype that holds every value in ``[0, max_value]``."""
    for dtype in INDEX_DTYPES:
        if max_value <= np.iinfo(dtype).max:
            return dtype
    raise ValueError(f"Index {max_value} does not fit in 64 bits.")


def matrix_shape(shape: tuple[int, ...], layout: str) -> tuple[int, int]:
    """The (rows, cols) of the matrix a tensor of ``shape`` is viewed as under ``layout``."""
    size = math.prod(shape)
    if layout == "oi":
        rows = shape[-1] if shape else 1
    elif layout == "rows":
        rows = shape[0] if len(shape) >= 2 else 1
    else:
        raise ValueError(f"CSR layout must be one of {LAYOUTS}. Received: {layout!r}")
    return rows, (size // rows if rows else 0)


def _as_matrix(array: np.ndarray, layout: str) -> np.ndarray:
    rows, cols = matrix_shape(array.shape, layout)
    if layout == "oi":
        return array.reshape(cols, rows).T
    return array.reshape(rows, cols)


@dataclass(frozen=True, eq=False)
class CSRWeight:
    """A weight tensor of ``shape`` stored as the CSR of its ``layout`` matrix view."""

    shape: tuple[int, ...]
    layout: str
    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        self.check()

    @classmethod
    def from_dense(cls, array: np.ndarray, layout: str) -> "CSRWeight":
        """Encodes the nonzeros of ``array`` (values keep their dtype)."""
        array = np.asarray(array)
        matrix = _as_matrix(array, layout)
        rows, cols = np.nonzero(matrix)  # row-major, so columns are sorted within a row
        counts = np.bincount(rows, minlength=matrix.shape[0])
        nnz = int(counts.sum())
        indptr = np.zeros(matrix.shape[0] + 1, dtype=index_dtype(nnz))
        np.cumsum(counts, out=indptr[1:])
        indices = cols.astype(index_dtype(max(matrix.shape[1] - 1, 0)))
        return cls(array.shape, layout, indptr, indices, np.ascontiguousarray(matrix[rows, cols]))

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return matrix_shape(self.shape, self.layout)

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def nnz(self) -> int:
        return int(self.data.size)

    @property
    def nbytes(self) -> int:
        return int(self.indptr.nbytes + self.indices.nbytes + self.data.nbytes)

    def to_dense(self) -> np.ndarray:
        rows, cols = self.matrix_shape
        matrix = np.zeros((rows, cols), dtype=self.data.dtype)
        row_of = np.repeat(np.arange(rows), np.diff(self.indptr.astype(np.int64)))
        matrix[row_of, self.indices.astype(np.int64)] = self.data
        if self.layout == "oi":
            return np.ascontiguousarray(matrix.T).reshape(self.shape)
        return matrix.reshape(self.shape)

    def to_scipy(self):
        """The matrix view as a ``scipy.sparse.csr_matrix`` (int32 indices, as scipy's kernels want)."""
        import scipy.sparse

        return scipy.sparse.csr_matrix(
            (self.data, self.indices.astype(np.int32), self.indptr.astype(np.int32)), shape=self.matrix_shape
        )

    def astype(self, dtype) -> "CSRWeight":
        return CSRWeight(self.shape, self.layout, self.indptr, self.indices, self.data.astype(dtype))

    def check(self) -> None:
        """Raises ValueError unless the arrays form a canonical CSR of ``shape``.

        Cheap (vectorised, no allocation proportional to the dense size), so it runs
        on every weight read from a file.
        """
        if self.layout not in LAYOUTS:
            raise ValueError(f"CSR layout must be one of {LAYOUTS}. Received: {self.layout!r}")
        if any(d < 0 for d in self.shape):
            raise ValueError(f"CSR shape must be non-negative. Received: {self.shape}")
        rows, cols = self.matrix_shape
        for name in ("indptr", "indices"):
            array = getattr(self, name)
            if not isinstance(array, np.ndarray) or array.ndim != 1 or array.dtype not in INDEX_DTYPES:
                raise ValueError(f"CSR {name} must be a 1-D unsigned integer array. Received: {_describe(array)}")
        if not isinstance(self.data, np.ndarray) or self.data.ndim != 1 or self.data.dtype not in VALUE_DTYPES:
            raise ValueError(f"CSR data must be a 1-D float32 or float16 array. Received: {_describe(self.data)}")
        if self.indptr.size != rows + 1:
            raise ValueError(
                f"CSR indptr must have rows+1={rows + 1} entries for shape {self.shape}. Received: {self.indptr.size}"
            )
        if self.indices.size != self.data.size:
            raise ValueError(
                f"CSR indices and data must have the same length. Received: {self.indices.size} and {self.data.size}"
            )
        # comparisons on the stored unsigned dtypes: no widened copy of the indices (this runs on every load)
        indptr = self.indptr
        if indptr[0] != 0 or indptr[-1] != self.data.size or np.any(indptr[1:] < indptr[:-1]):
            raise ValueError(
                f"CSR indptr must rise from 0 to nnz={self.data.size}. "
                f"Received: starts at {indptr[0]}, ends at {indptr[-1]}"
            )
        if self.indices.size:
            indices = self.indices
            if indices.max() >= cols:
                raise ValueError(f"CSR column index {int(indices.max())} out of range for {cols} columns")
            # Within a row, columns must strictly rise: a drop is allowed only where a new row starts.
            rises = indices[1:] > indices[:-1]
            starts = indptr[1:-1].astype(np.int64)
            rises[starts[(starts > 0) & (starts < indices.size)] - 1] = True
            if not rises.all():
                raise ValueError("CSR column indices must be sorted and unique within each row")


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__


def to_dense(weight: "np.ndarray | CSRWeight") -> np.ndarray:
    """The dense array of a stored weight."""
    return weight.to_dense() if isinstance(weight, CSRWeight) else weight


def weight_nnz(weight: "np.ndarray | CSRWeight") -> int:
    return weight.nnz if isinstance(weight, CSRWeight) else int(np.count_nonzero(weight))


def weight_nbytes(weight: "np.ndarray | CSRWeight") -> int:
    return int(weight.nbytes)


def encode_weight(array: np.ndarray, layout: str = "rows") -> "np.ndarray | CSRWeight":
    """CSR when that is smaller than the dense array, else the dense array itself."""
    array = np.ascontiguousarray(array)
    if array.size == 0:
        return array
    csr = CSRWeight.from_dense(array, layout)
    return csr if csr.nbytes < array.nbytes else array
