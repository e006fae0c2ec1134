"""The compact model's ops in plain numpy: the reference every backend and export is checked against.

One small class per op, registered by its type name. The base class checks
weights and arity when a node is bound, and names the op and node when a run
fails. Adding an op touches its class here and one lowering per format.

Tensors are channels-last (NHWC) as in Keras. Values compute in float32, also
when weights are stored as float16.
"""

from __future__ import annotations

from typing import ClassVar, Mapping

import numpy as np

from mann_edge.errors import InputError
from mann_edge.graph.activations import apply_activation, normalize_activation
from mann_edge.graph.model import Node
from mann_edge.graph.windows import conv_windows
from mann_edge.registry import Registry
from mann_edge.sparse import CSRWeight

__all__ = ["Op", "OPS", "register", "bind"]

OPS = Registry("op", owner="The reference executor", verb="run", error=ValueError)


def register(cls: type["Op"]) -> type["Op"]:
    """Registers an op class in `OPS` under its ``type`` (the decorator beside each op below)."""
    return OPS.register(cls.type)(cls)


def bind(node: Node, weights: Mapping[str, "np.ndarray | CSRWeight"], registry: Registry | None = None) -> "Op":
    """The op instance that runs ``node`` (from ``registry``, the reference ops by default).

    Raises:
        ValueError: ``node.op`` is not in the registry (naming the node and the supported ops),
            or the node lacks the weights or inputs its op takes.

    Example:
        >>> bind(Node("h", "dense", ("x",), {"kernel": "h/kernel"}, {"activation": "relu"}), weights).run(x)
    """
    registry = OPS if registry is None else registry
    op_class = registry.lookup(node.op, context=f"node '{node.name}'")
    return op_class(node, {role: weights[key] for role, key in node.weights.items()})


class Op:
    """Base of every op: one instance per node.

    Subclasses set ``type``, the weight roles they need (``weights``) or may have
    (``optional_weights``), their number of inputs (``arity``, None for one or more),
    and implement ``_run``. ``prepare`` turns stored weights into what ``_run`` uses.
    """

    type: ClassVar[str]
    weights: ClassVar[tuple[str, ...]] = ()
    optional_weights: ClassVar[tuple[str, ...]] = ()
    arity: ClassVar[int | None] = 1

    def __init__(self, node: Node, weights: Mapping[str, "np.ndarray | CSRWeight"]):
        self.check(node)
        self.node = node
        self.attrs = dict(node.attrs)
        self.prepare(dict(weights))

    @classmethod
    def check(cls, node: Node) -> None:
        """ValueError unless ``node`` has the weight roles and number of inputs this op takes."""
        roles = set(node.weights)
        missing = set(cls.weights) - roles
        unknown = roles - set(cls.weights) - set(cls.optional_weights)
        if missing or unknown:
            optional = f" and optionally {list(cls.optional_weights)}" if cls.optional_weights else ""
            raise ValueError(
                f"Op {cls.type} (node '{node.name}') takes weights {list(cls.weights)}{optional}. "
                f"Received: {sorted(roles)}"
            )
        if cls.arity is not None and len(node.inputs) != cls.arity:
            raise ValueError(f"Op {cls.type} (node '{node.name}') takes {cls.arity} input(s). Received: {len(node.inputs)}")
        if cls.arity is None and not node.inputs:
            raise ValueError(f"Op {cls.type} (node '{node.name}') takes at least one input. Received: none")

    def prepare(self, weights: dict) -> None:
        """Keeps every weight as a dense float32 (or integer) array under its role name."""
        for role, weight in weights.items():
            dense = weight.to_dense() if isinstance(weight, CSRWeight) else np.asarray(weight)
            setattr(self, role, dense.astype(np.float32) if dense.dtype == np.float16 else dense)
        for role in self.optional_weights:
            if role not in weights:
                setattr(self, role, None)

    def run(self, *inputs: np.ndarray) -> np.ndarray:
        try:
            return self._run(*inputs)
        except InputError:
            raise
        except (ValueError, IndexError, TypeError) as error:
            shapes = ", ".join(str(getattr(x, "shape", "?")) for x in inputs)
            raise InputError(f"Op {self.type} (node '{self.node.name}') failed on inputs of shape {shapes}: {error}")

    def _run(self, *inputs):
        raise NotImplementedError


def _activate(y: np.ndarray, attrs: Mapping) -> np.ndarray:
    return apply_activation(y, normalize_activation(attrs.get("activation")))


@register
class Dense(Op):
    """``activation(x @ kernel + bias)`` over the last axis; kernel (in, out)."""

    type = "dense"
    weights = ("kernel",)
    optional_weights = ("bias",)

    def _run(self, x):
        y = np.matmul(x.astype(np.float32, copy=False), self.kernel)
        if self.bias is not None:
            y = y + self.bias
        return _activate(y, self.attrs)


@register
class Conv2D(Op):
    """NHWC convolution with kernel (kh, kw, cin, cout), TensorFlow 'same'/'valid' padding."""

    type = "conv2d"
    weights = ("kernel",)
    optional_weights = ("bias",)

    def _run(self, x):
        kh, kw, cin, cout = self.kernel.shape
        if x.shape[-1] != cin:
            raise ValueError(f"expected {cin} input channels, got {x.shape[-1]}")
        windows, _ = conv_windows(
            x.astype(np.float32, copy=False),
            (kh, kw),
            self.attrs["strides"],
            self.attrs["padding"],
            self.attrs.get("dilation", (1, 1)),
        )
        n, ho, wo = windows.shape[:3]
        y = windows.reshape(n * ho * wo, kh * kw * cin) @ self.kernel.reshape(kh * kw * cin, cout)
        y = y.reshape(n, ho, wo, cout)
        if self.bias is not None:
            y = y + self.bias
        return _activate(y, self.attrs)


@register
class MaxPool2D(Op):
    """NHWC max pooling."""

    type = "max_pool2d"

    def _run(self, x):
        windows, _ = conv_windows(x, self.attrs["pool_size"], self.attrs["strides"], self.attrs["padding"], pad_value=-np.inf)
        return windows.max(axis=(3, 4)).astype(x.dtype)


@register
class AvgPool2D(Op):
    """NHWC average pooling; with 'same' padding the padded cells are not counted (as in TensorFlow)."""

    type = "avg_pool2d"

    def _run(self, x):
        args = (self.attrs["pool_size"], self.attrs["strides"], self.attrs["padding"])
        windows, _ = conv_windows(x, *args)
        counts, _ = conv_windows(np.ones((1, *x.shape[1:3], 1), x.dtype), *args)
        return (windows.sum(axis=(3, 4)) / counts.sum(axis=(3, 4))).astype(x.dtype)


@register
class GlobalAvgPool(Op):
    """Mean over ``axes`` (e.g. [1] for sequences, [1, 2] for images), optionally keeping them."""

    type = "global_avg_pool"

    def _run(self, x):
        return np.mean(x, axis=tuple(self.attrs["axes"]), keepdims=bool(self.attrs.get("keepdims", False)))


@register
class Flatten(Op):
    """(N, ...) -> (N, prod(...)) in row-major (channels-last) order."""

    type = "flatten"

    def _run(self, x):
        return x.reshape(x.shape[0], -1)


@register
class Reshape(Op):
    """(N, ...) -> (N, *shape); ``shape`` may hold one -1."""

    type = "reshape"

    def _run(self, x):
        return x.reshape(x.shape[0], *self.attrs["shape"])


@register
class Embedding(Op):
    """Rows of ``table`` (vocab, dim) at integer ids; ids outside the table are refused."""

    type = "embedding"
    weights = ("table",)

    def _run(self, ids):
        ids = np.asarray(ids)
        if np.issubdtype(ids.dtype, np.floating):
            if not np.all(np.isfinite(ids)) or np.any(ids != np.round(ids)):
                raise InputError(f"Embedding '{self.node.name}' takes integer ids. Received non-integer values.")
        ids = ids.astype(np.int64)
        vocab = self.table.shape[0]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise InputError(
                f"Embedding '{self.node.name}' ids must be in [0, {vocab}). Received: min {ids.min()}, max {ids.max()}"
            )
        return self.table[ids].astype(np.float32, copy=False)


@register
class Add(Op):
    """Elementwise sum of one or more inputs of the same shape."""

    type = "add"
    arity = None

    def _run(self, *xs):
        total = xs[0]
        for x in xs[1:]:
            total = total + x
        return total


@register
class Concat(Op):
    """Concatenation along ``axis`` (counted with the batch axis as 0)."""

    type = "concat"
    arity = None

    def _run(self, *xs):
        return np.concatenate(xs, axis=self.attrs["axis"])


@register
class ScaleShift(Op):
    """``x * scale + shift`` per channel (last axis): a batch normalisation that could not be folded."""

    type = "scale_shift"
    weights = ("scale", "shift")

    def _run(self, x):
        return x * self.scale + self.shift


@register
class LayerNorm(Op):
    """Layer normalisation over ``axes`` with ``epsilon``; optional ``gamma``/``beta`` over those axes."""

    type = "layer_norm"
    optional_weights = ("gamma", "beta")

    def _run(self, x):
        axes = tuple(self.attrs["axes"])
        mean = x.mean(axis=axes, keepdims=True)
        variance = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
        y = (x - mean) / np.sqrt(variance + np.float32(self.attrs["epsilon"]))
        broadcast = [1] * x.ndim
        for axis in axes:
            broadcast[axis] = x.shape[axis]
        if self.gamma is not None:
            y = y * self.gamma.reshape(broadcast)
        if self.beta is not None:
            y = y + self.beta.reshape(broadcast)
        return y.astype(np.float32)


@register
class Activation(Op):
    """An activation on its own (``attrs["activation"]``)."""

    type = "activation"

    def _run(self, x):
        return _activate(x, self.attrs)


@register
class ZerosLike(Op):
    """Zeros shaped like the input: a `FilterLayer` that is off."""

    type = "zeros_like"

    def _run(self, x):
        return np.zeros_like(x, dtype=np.float32)
