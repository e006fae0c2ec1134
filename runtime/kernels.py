"""Fast kernels for the bundle backend, beside the reference ops they replace.

Each class subclasses the reference op and changes how the weights are held and
multiplied, not what is computed; tests check each against its reference.
A CSR kernel multiplies by its nonzeros only: ``y.T = W_oi @ x.T`` with ``W_oi``
the (outputs, inputs) CSR matrix the bundle stores.

The multiplication itself is a "product" chosen once per op when it is bound:

- `NumbaBlockProduct` (runtime/fast_kernels.py): compiled kernels over 1x4 blocks (four
  consecutive inputs of one output unit, RSN2's ``block_size=4``): one index and two
  4-wide loads per block instead of three loads per nonzero. Used when numba is installed
  and the weight is block structured (`Blocks1x4.from_csr`: its nonzeros fill at least
  75 % of its blocks; the rest of each block becomes explicit zeros).
- `NumbaCSRProduct` (runtime/fast_kernels.py): compiled sliced-ELLPACK kernels (`Sell8`: eight
  rows per slice, their inputs fetched by one hardware gather) with the bias and a ReLU fused
  in, float16 values kept as float16, serial or parallel by ``threads``. Used when numba is
  installed, for every other CSR weight.
- `ScipyCSRProduct`: scipy's CSR matrix product, float32 values; single-threaded.
  The fallback when numba is missing, or when ``MANN_EDGE_KERNELS=numpy``.
- `DenseProduct`: a weight the bundle keeps dense (CSR would be larger) goes to BLAS.

Convolution and pooling windows are one gather through an index built once per input
size (`Windows`), instead of the reference ops' padded strided views.

``MANN_EDGE_KERNELS`` = ``auto`` (default: numba if importable), ``numba`` (required) or
``numpy`` (the scipy fallback), read when a task's ops are bound.

Each kernel registers in `KERNELS` under the op type it replaces, with a decorator
beside its class; `runtime_ops` lays them over the reference ops. With numba, the bundle
backend runs a task through these op classes only where it cannot use its compiled program
(runtime/program.py: the whole task planned once per input shapes and run in one compiled
call): multi-threaded runs of large tasks, and ops the program does not know.

Example:
    >>> kernel_backend()
    'numba'
    >>> ops = runtime_ops(threads=1)      # the registry `BundleSession` runs with
"""

from __future__ import annotations

import functools
import os

import numpy as np

from mann_edge.errors import MannEdgeError
from mann_edge.graph import ops
from mann_edge.graph.activations import apply_activation, normalize_activation
from mann_edge.graph.windows import span, window_pads
from mann_edge.registry import Registry
from mann_edge.sparse import CSRWeight, to_dense

__all__ = [
    "RUNTIME_OPS",
    "KERNELS",
    "CSRDense",
    "CSRConv2D",
    "GatherMaxPool2D",
    "GatherAvgPool2D",
    "Windows",
    "runtime_ops",
    "kernel_backend",
    "make_product",
    "ScipyCSRProduct",
    "DenseProduct",
    "KERNELS_ENV",
    "BACKENDS",
]

KERNELS_ENV = "MANN_EDGE_KERNELS"
BACKENDS = ("auto", "numba", "numpy")
_PLAIN_RELU = normalize_activation("relu")

# The fast kernels by the op type they replace; every other op runs its reference class.
KERNELS = Registry("op", owner="The bundle runtime's kernels", verb="replace", error=ValueError)


@functools.lru_cache(maxsize=1)
def _numba_import_error() -> str | None:
    """None when the compiled kernels import, else why not (numba missing, or failing to load)."""
    try:
        import mann_edge.runtime.fast_kernels  # noqa: F401
    except ImportError as error:
        return str(error)
    return None


def kernel_backend() -> str:
    """'numba' or 'numpy': the CSR kernels ops bound now will use (see ``MANN_EDGE_KERNELS``).

    Raises:
        MannEdgeError: ``MANN_EDGE_KERNELS`` is not one of `BACKENDS`, or is 'numba' and numba does not import.

    Example:
        >>> os.environ["MANN_EDGE_KERNELS"] = "numpy"; kernel_backend()
        'numpy'
    """
    choice = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise MannEdgeError(f"{KERNELS_ENV} must be one of {list(BACKENDS)}. Received: {choice!r}")
    if choice == "numpy":
        return "numpy"
    error = _numba_import_error()
    if error is None:
        return "numba"
    if choice == "numba":
        raise MannEdgeError(f"{KERNELS_ENV}=numba, but the compiled kernels do not import: {error}")
    return "numpy"


class ScipyCSRProduct:
    """``x (batch, inputs) -> act(x @ W.T + bias)`` with scipy's CSR product (float32 values)."""

    def __init__(self, weight: CSRWeight, bias: np.ndarray | None, *, relu: bool, threads: int | None = None):
        self.rows, self.cols = weight.matrix_shape
        self.matrix = weight.astype(np.float32).to_scipy()
        self.bias = bias
        self.relu = relu

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = np.asarray((self.matrix @ x.T).T, dtype=np.float32)
        if self.bias is not None:
            y += self.bias
        return apply_activation(y, _PLAIN_RELU) if self.relu else y


class DenseProduct:
    """``x (batch, inputs) -> act(x @ W + bias)`` for a weight kept dense: BLAS does it best."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, *, relu: bool, threads: int | None = None):
        dense = np.asarray(weight, dtype=np.float32)
        self.matrix = np.ascontiguousarray(dense.reshape(-1, dense.shape[-1]))
        self.cols, self.rows = self.matrix.shape
        self.bias = bias
        self.relu = relu

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = x @ self.matrix
        if self.bias is not None:
            y += self.bias
        return apply_activation(y, _PLAIN_RELU) if self.relu else y


def make_product(weight, bias: np.ndarray | None, *, relu: bool, threads: int | None):
    """The product for one kernel weight: numba (blocks or CSR) or scipy for CSR (per `kernel_backend`), BLAS for dense."""
    if not isinstance(weight, CSRWeight):
        return DenseProduct(weight, bias, relu=relu, threads=threads)
    if kernel_backend() == "numba":
        from mann_edge.runtime.fast_kernels import Blocks1x4, NumbaBlockProduct, NumbaCSRProduct

        blocks = Blocks1x4.from_csr(weight)
        if blocks is not None:
            return NumbaBlockProduct(blocks, bias, relu=relu, threads=threads)
        return NumbaCSRProduct(weight, bias, relu=relu, threads=threads)
    return ScipyCSRProduct(weight, bias, relu=relu, threads=threads)


def _vector(weight):
    return None if weight is None else np.ascontiguousarray(to_dense(weight), np.float32)


def _check_threads(threads) -> int | None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"`threads` must be a positive int or None. Received: threads={threads!r}")
    return threads


class _ProductOp:
    """What CSRDense and CSRConv2D share: a product with the bias and (if plain) the ReLU fused in."""

    threaded = True  # takes ``threads``: `runtime_ops` binds it

    def __init__(self, node, weights, threads: int | None = None):
        self.threads = _check_threads(threads)
        super().__init__(node, weights)

    def prepare(self, weights):
        activation = normalize_activation(self.attrs.get("activation"))
        fused = activation == _PLAIN_RELU or activation["name"] == "linear"
        # an activation the kernels cannot fuse runs afterwards, as in the reference op
        self.activation = None if fused else activation
        self.product = make_product(
            weights["kernel"], _vector(weights.get("bias")), relu=activation == _PLAIN_RELU, threads=self.threads
        )

    def _finish(self, y):
        return y if self.activation is None else apply_activation(y, self.activation)


@KERNELS.register("dense")
class CSRDense(_ProductOp, ops.Dense):
    """`dense` with the kernel kept as CSR."""

    def _run(self, x):
        if x.shape[-1] != self.product.cols:
            raise ValueError(f"expected {self.product.cols} input features, got {x.shape[-1]}")
        flat = x.reshape(-1, x.shape[-1]).astype(np.float32, copy=False)
        return self._finish(self.product(flat).reshape(*x.shape[:-1], self.product.rows))


class Windows:
    """Every window of an NHWC input as one gather, the index built once per input size.

    The reference ops pad the input and take strided views of it, which costs tens of
    microseconds of numpy calls per op on a small image; here window cell ``(kh, kw, c)``
    of output pixel ``(ho, wo)`` is a precomputed flat index into the input, and cells in
    the padding point one past its end, at a fill value appended to each sample.

    Example:
        >>> windows = Windows((3, 3), strides=(1, 1), padding="same")
        >>> windows(x, fill=0.0).shape          # (N, Ho * Wo, kh * kw, C)
        (2, 64, 9, 16)
    """

    def __init__(self, kernel, strides, padding: str, dilation=(1, 1)):
        self.kernel, self.strides, self.padding, self.dilation = tuple(kernel), tuple(strides), padding, tuple(dilation)
        self._index: dict[tuple[int, int, int], tuple[np.ndarray, tuple[int, int], np.ndarray]] = {}

    def index(self, height: int, width: int, channels: int):
        """(flat index (Ho * Wo, kh * kw, C), output size (Ho, Wo), valid cells per window (Ho * Wo,))."""
        key = (height, width, channels)
        if key not in self._index:
            self._index[key] = self._build(height, width, channels)
        return self._index[key]

    def _build(self, height: int, width: int, channels: int):
        axes = []
        pads = window_pads(self.padding, (height, width), self.kernel, self.strides, self.dilation)
        for size, kernel, stride, dilation, (before, after) in zip((height, width), self.kernel, self.strides,
                                                                   self.dilation, pads):
            if size + before + after < span(kernel, dilation):
                raise ValueError(f"window {span(kernel, dilation)} larger than the padded input {size + before + after}")
            out = (size + before + after - span(kernel, dilation)) // stride + 1
            cells = np.arange(out)[:, None] * stride - before + np.arange(kernel)[None, :] * dilation  # (out, kernel)
            axes.append((out, cells, (cells >= 0) & (cells < size)))
        (ho, rows, rows_ok), (wo, cols, cols_ok) = axes
        pixel = rows[:, None, :, None] * width + cols[None, :, None, :]  # (Ho, Wo, kh, kw)
        valid = rows_ok[:, None, :, None] & cols_ok[None, :, None, :]
        flat = pixel[..., None] * channels + np.arange(channels)  # (Ho, Wo, kh, kw, C)
        flat = np.where(valid[..., None], flat, height * width * channels)
        kh, kw = self.kernel
        counts = valid.reshape(ho * wo, kh * kw).sum(axis=1)
        return flat.reshape(ho * wo, kh * kw, channels).astype(np.intp), (ho, wo), counts

    def __call__(self, x: np.ndarray, fill: float) -> tuple[np.ndarray, tuple[int, int], np.ndarray]:
        """The windows of ``x`` (N, Ho * Wo, kh * kw, C), the output size and the valid cells per window."""
        n, height, width, channels = x.shape
        index, size, counts = self.index(height, width, channels)
        flat = np.empty((n, height * width * channels + 1), x.dtype)
        flat[:, :-1] = x.reshape(n, -1)
        flat[:, -1] = fill
        return flat[:, index], size, counts


@KERNELS.register("conv2d")
class CSRConv2D(_ProductOp, ops.Conv2D):
    """`conv2d` as gathered windows (`Windows`) times the CSR kernel."""

    def prepare(self, weights):
        self.kernel_shape = tuple(weights["kernel"].shape)
        self.windows = Windows(self.kernel_shape[:2], self.attrs["strides"], self.attrs["padding"],
                               self.attrs.get("dilation", (1, 1)))
        super().prepare(weights)

    def _run(self, x):
        kh, kw, cin, cout = self.kernel_shape
        if x.shape[-1] != cin:
            raise ValueError(f"expected {cin} input channels, got {x.shape[-1]}")
        patches, (ho, wo), _ = self.windows(x.astype(np.float32, copy=False), fill=0.0)
        n = x.shape[0]
        return self._finish(self.product(patches.reshape(n * ho * wo, kh * kw * cin)).reshape(n, ho, wo, cout))


@KERNELS.register("max_pool2d")
class GatherMaxPool2D(ops.MaxPool2D):
    """`max_pool2d` over gathered windows; padding cells hold -inf, as in the reference."""

    def prepare(self, weights):
        self.windows = Windows(self.attrs["pool_size"], self.attrs["strides"], self.attrs["padding"])

    def _run(self, x):
        patches, (ho, wo), _ = self.windows(x, fill=-np.inf)
        return patches.max(axis=2).reshape(x.shape[0], ho, wo, x.shape[-1])


@KERNELS.register("avg_pool2d")
class GatherAvgPool2D(ops.AvgPool2D):
    """`avg_pool2d` over gathered windows; the mean counts only cells inside the input, as in the reference."""

    def prepare(self, weights):
        self.windows = Windows(self.attrs["pool_size"], self.attrs["strides"], self.attrs["padding"])

    def _run(self, x):
        patches, (ho, wo), counts = self.windows(x, fill=0.0)
        means = patches.sum(axis=2) / counts[:, None].astype(x.dtype)
        return means.astype(x.dtype, copy=False).reshape(x.shape[0], ho, wo, x.shape[-1])


def runtime_ops(threads: int | None = None) -> Registry:
    """The op registry of the bundle backend: the reference ops, with `KERNELS` in place of theirs.

    Args:
        threads: threads the CSR kernels may use (1: serial; None: all numba's threads).
            The scipy fallback is single-threaded whatever this says.

    Raises:
        ValueError: ``threads`` is not a positive int or None.

    Example:
        >>> Executor(model, "digits", runtime_ops(threads=1)).run({"x": x})
    """
    _check_threads(threads)
    table = Registry("op", owner="The bundle runtime", verb="run", error=ValueError)
    for op_type, reference in ops.OPS.items():
        kernel = KERNELS.get(op_type, reference)
        if getattr(kernel, "threaded", False):
            kernel = functools.partial(kernel, threads=threads)
        table.register(op_type)(kernel)
    return table


RUNTIME_OPS = runtime_ops()
