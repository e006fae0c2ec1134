"""Fast kernels for the bundle backend, beside the reference ops they replace.

Each class subclasses the reference op and changes how the weights are held and
multiplied, not what is computed; tests check each against its reference.
A CSR kernel multiplies by its nonzeros only: ``y.T = W_oi @ x.T`` with ``W_oi``
the (outputs, inputs) CSR matrix the bundle stores.
"""

from __future__ import annotations

import numpy as np

from mann_edge.graph import ops
from mann_edge.graph.activations import apply_activation, normalize_activation
from mann_edge.sparse import CSRWeight, to_dense

__all__ = ["RUNTIME_OPS", "CSRDense", "CSRConv2D"]


def _matrix(weight):
    """(outputs, inputs) operand: a scipy CSR matrix for a CSR weight, a dense transposed array otherwise."""
    if isinstance(weight, CSRWeight):
        return weight.astype(np.float32).to_scipy()
    dense = np.asarray(weight, dtype=np.float32)
    return np.ascontiguousarray(dense.reshape(-1, dense.shape[-1]).T)


def _vector(weight):
    return None if weight is None else np.asarray(to_dense(weight), np.float32)


class CSRDense(ops.Dense):
    """`dense` with the kernel kept as CSR."""

    def prepare(self, weights):
        self.matrix = _matrix(weights["kernel"])
        self.bias = _vector(weights.get("bias"))
        self.activation = normalize_activation(self.attrs.get("activation"))

    def _run(self, x):
        flat = x.reshape(-1, x.shape[-1]).astype(np.float32, copy=False)
        y = np.asarray((self.matrix @ flat.T).T)
        if self.bias is not None:
            y += self.bias
        return apply_activation(y.reshape(*x.shape[:-1], -1), self.activation)


class CSRConv2D(ops.Conv2D):
    """`conv2d` as im2col windows times the CSR kernel."""

    def prepare(self, weights):
        kernel = weights["kernel"]
        self.kernel_shape = tuple(kernel.shape)
        self.matrix = _matrix(kernel)
        self.bias = _vector(weights.get("bias"))
        self.activation = normalize_activation(self.attrs.get("activation"))

    def _run(self, x):
        kh, kw, cin, cout = self.kernel_shape
        if x.shape[-1] != cin:
            raise ValueError(f"expected {cin} input channels, got {x.shape[-1]}")
        windows, _ = ops.conv_windows(
            x.astype(np.float32, copy=False), (kh, kw), self.attrs["strides"], self.attrs["padding"],
            self.attrs.get("dilation", (1, 1)),
        )
        n, ho, wo = windows.shape[:3]
        patches = windows.reshape(n * ho * wo, kh * kw * cin)
        y = np.asarray((self.matrix @ patches.T).T).reshape(n, ho, wo, cout)
        if self.bias is not None:
            y += self.bias
        return apply_activation(y, self.activation)


RUNTIME_OPS = {**ops.OPS, "dense": CSRDense, "conv2d": CSRConv2D}
