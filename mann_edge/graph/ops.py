"""The compact model's ops in plain numpy: the reference every backend and export is checked against.

One small class per op, registered by its type name. Each class declares what a node
of it may be: its weight roles, its number of inputs, its attributes (`attributes`, see
`mann_edge.graph.schema`) and how its output shape follows from its inputs' and weights'
shapes (`infer`), with the temporary arrays a run of it makes (`temporaries`). A bundle
is checked against these declarations when it loads (`mann_edge.graph.plan`), so no op,
and no compiled kernel of the runtime, ever runs on inconsistent shapes. The base class
checks weights, arity and attributes when a node is bound, and names the op and node
when a run fails. Adding an op touches its class here and one lowering per format.

Tensors are channels-last (NHWC) as in Keras. Values compute in float32, also
when weights are stored as float16.
"""

from __future__ import annotations

import math
from typing import ClassVar, Mapping, Sequence

import numpy as np

from mann_edge.errors import InputError
from mann_edge.graph import schema
from mann_edge.graph.activations import apply_activation, normalize_activation
from mann_edge.graph.model import Node
from mann_edge.graph.windows import PADDINGS, conv_windows, output_sizes, window_pads
from mann_edge.registry import Registry
from mann_edge.sparse import CSRWeight

__all__ = ["Op", "OPS", "register", "bind", "Shape"]

# A tensor's shape as far as it is known: None where a size is left to the caller (the batch).
Shape = tuple

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
    their attributes (``attributes``), and implement ``infer`` and ``_run``. ``prepare``
    turns stored weights into what ``_run`` uses; ``self.attrs`` holds the checked
    attributes with their defaults.
    """

    type: ClassVar[str]
    weights: ClassVar[tuple[str, ...]] = ()
    optional_weights: ClassVar[tuple[str, ...]] = ()
    arity: ClassVar[int | None] = 1
    attributes: ClassVar[Mapping[str, schema.Attr]] = {}

    def __init__(self, node: Node, weights: Mapping[str, "np.ndarray | CSRWeight"]):
        self.attrs = self.check(node)
        self.node = node
        self.prepare(dict(weights))

    @classmethod
    def check(cls, node: Node) -> dict:
        """``node``'s attributes checked, defaults filled in; ValueError unless it has the weight roles,
        number of inputs and attributes this op takes."""
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
        return schema.check_attrs(cls.attributes, node.attrs, cls.type, node.name)

    @classmethod
    def infer(cls, attrs: Mapping, inputs: Sequence[Shape], weights: Mapping[str, "np.ndarray | CSRWeight"]) -> Shape:
        """The output shape for inputs of ``inputs`` shapes (None: any size); ValueError naming what does not fit.

        ``attrs`` are the checked attributes (`check`), ``weights`` the node's weights by role.
        """
        raise NotImplementedError

    @classmethod
    def temporaries(cls, attrs: Mapping, inputs: Sequence[Shape], output: Shape, weights: Mapping) -> dict[str, int]:
        """Bytes of the largest arrays a run makes besides its output (by what they are), where the shapes tell."""
        return {}

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


# -- shape rules -----------------------------------------------------------------------------------
# Each raises ValueError("...") with what was expected and what came; `mann_edge.graph.plan` adds the
# op and node. A None size matches any size.


def _same(a, b) -> bool:
    return a is None or b is None or a == b


def _rank(shape: Shape, ranks, what: str = "input") -> None:
    if len(shape) not in ranks:
        expected = " or ".join(str(r) for r in ranks) if len(ranks) < 4 else f"at least {min(ranks)}"
        raise ValueError(f"expected a rank-{expected} {what}, got shape {_text(shape)}")


def _text(shape) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"


def _weight_shape(weights: Mapping, role: str, rank: int) -> tuple[int, ...]:
    shape = tuple(weights[role].shape)
    if len(shape) != rank:
        raise ValueError(f"weight '{role}' must be rank {rank}, got shape {list(shape)}")
    return shape


def _kernel_shape(weights: Mapping, rank: int) -> tuple[int, ...]:
    """The kernel's shape; a CSR kernel must be stored as (outputs, inputs) rows, which the kernels multiply by."""
    kernel = weights["kernel"]
    if isinstance(kernel, CSRWeight) and kernel.layout != "oi":
        raise ValueError(f"a CSR kernel must have layout 'oi', got {kernel.layout!r}")
    return _weight_shape(weights, "kernel", rank)


def _bias(weights: Mapping, channels: int) -> None:
    """The bias (if any) must hold one value per output channel: the compiled kernels read ``bias[i]`` unchecked."""
    if weights.get("bias") is not None and tuple(weights["bias"].shape) != (channels,):
        raise ValueError(f"bias must have shape [{channels}] (one value per output channel), "
                         f"got {list(weights['bias'].shape)}")


def _activated(shape: Shape, activation: Mapping) -> Shape:
    """The shape after ``activation``: its axis must exist, and glu halves that axis (which must be even)."""
    if "axis" not in activation:
        return shape
    axis = activation["axis"]
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"activation {activation['name']!r} axis {axis} is outside a rank-{len(shape)} tensor")
    if activation["name"] != "glu":
        return shape
    axis %= len(shape)
    size = shape[axis]
    if size is not None and size % 2:
        raise ValueError(f"activation 'glu' splits axis {axis} in two halves; its size {size} is odd")
    return shape[:axis] + (None if size is None else size // 2,) + shape[axis + 1:]


def _window_output(attrs: Mapping, x: Shape, kernel: Sequence[int], dilation=None) -> tuple:
    """The spatial output sizes of a window of ``len(kernel)`` axes sliding over channels-last ``x``.

    None where an input size is not known; ValueError for an empty output.
    """
    dilation = (1,) * len(kernel) if dilation is None else dilation
    sizes = []
    for axis, size in enumerate(x[1:1 + len(kernel)]):
        if size is None:
            sizes.append(None)
            continue
        (out,) = output_sizes(attrs["padding"], (size,), (kernel[axis],), (attrs["strides"][axis],), (dilation[axis],))
        if out < 1:
            raise ValueError(f"a window of {tuple(kernel)} taps (dilation {tuple(dilation)}) does not fit an input of "
                             f"shape {_text(x)} with padding {attrs['padding']!r}")
        sizes.append(out)
    return tuple(sizes)


def _window_temporaries(attrs: Mapping, x: Shape, out: Shape, kernel, dilation=None) -> dict[str, int]:
    """What sliding a window allocates: the padded input, the gathered windows and (the runtime's) their index."""
    if None in x or None in out:
        return {}
    rank = len(kernel)
    n, spatial, c = x[0], x[1:1 + rank], x[-1]
    pads = window_pads(attrs["padding"], spatial, kernel, attrs["strides"], dilation)
    cells = math.prod(out[1:1 + rank]) * math.prod(int(k) for k in kernel) * c
    return {
        "padded input": 4 * n * math.prod(size + before + after for size, (before, after) in zip(spatial, pads)) * c,
        "windows": 4 * n * cells,
        "window index": 8 * cells,
    }


_ACTIVATION = {"activation": schema.activation()}
_WINDOW = {"strides": schema.ints(2), "padding": schema.one_of(PADDINGS)}
_WINDOW_3D = {"strides": schema.ints(3), "padding": schema.one_of(PADDINGS)}


@register
class Dense(Op):
    """``activation(x @ kernel + bias)`` over the last axis; kernel (in, out)."""

    type = "dense"
    weights = ("kernel",)
    optional_weights = ("bias",)
    attributes = _ACTIVATION

    @classmethod
    def infer(cls, attrs, inputs, weights):
        (x,) = inputs
        _rank(x, range(2, 9))
        units_in, units = _kernel_shape(weights, 2)
        if not _same(x[-1], units_in):
            raise ValueError(f"kernel {[units_in, units]} takes {units_in} input features, the input has shape {_text(x)}")
        _bias(weights, units)
        return _activated(x[:-1] + (units,), attrs["activation"])

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
    attributes = {**_WINDOW, "dilation": schema.ints(2, default=(1, 1)), **_ACTIVATION}

    @classmethod
    def infer(cls, attrs, inputs, weights):
        (x,) = inputs
        _rank(x, (4,))
        kh, kw, cin, cout = _kernel_shape(weights, 4)
        if not _same(x[3], cin):
            raise ValueError(f"kernel {[kh, kw, cin, cout]} takes {cin} input channels, the input has shape {_text(x)}")
        if min(kh, kw, cin, cout) < 1:
            raise ValueError(f"kernel shape {[kh, kw, cin, cout]} has an empty axis")
        _bias(weights, cout)
        ho, wo = _window_output(attrs, x, (kh, kw), attrs["dilation"])
        return _activated((x[0], ho, wo, cout), attrs["activation"])

    @classmethod
    def temporaries(cls, attrs, inputs, output, weights):
        return _window_temporaries(attrs, inputs[0], output, weights["kernel"].shape[:2], attrs["dilation"])

    def _run(self, x):
        kh, kw, cin, cout = self.kernel.shape
        if x.shape[-1] != cin:
            raise ValueError(f"expected {cin} input channels, got {x.shape[-1]}")
        windows, _ = conv_windows(
            x.astype(np.float32, copy=False),
            (kh, kw),
            self.attrs["strides"],
            self.attrs["padding"],
            self.attrs["dilation"],
        )
        n, ho, wo = windows.shape[:3]
        y = windows.reshape(n * ho * wo, kh * kw * cin) @ self.kernel.reshape(kh * kw * cin, cout)
        y = y.reshape(n, ho, wo, cout)
        if self.bias is not None:
            y = y + self.bias
        return _activate(y, self.attrs)


@register
class Conv3D(Op):
    """NDHWC convolution with kernel (kd, kh, kw, cin, cout), TensorFlow 'same'/'valid' padding."""

    type = "conv3d"
    weights = ("kernel",)
    optional_weights = ("bias",)
    attributes = {**_WINDOW_3D, "dilation": schema.ints(3, default=(1, 1, 1)), **_ACTIVATION}

    @classmethod
    def infer(cls, attrs, inputs, weights):
        (x,) = inputs
        _rank(x, (5,))
        kd, kh, kw, cin, cout = _kernel_shape(weights, 5)
        if not _same(x[4], cin):
            raise ValueError(f"kernel {[kd, kh, kw, cin, cout]} takes {cin} input channels, the input has shape {_text(x)}")
        if min(kd, kh, kw, cin, cout) < 1:
            raise ValueError(f"kernel shape {[kd, kh, kw, cin, cout]} has an empty axis")
        _bias(weights, cout)
        spatial = _window_output(attrs, x, (kd, kh, kw), attrs["dilation"])
        return _activated((x[0], *spatial, cout), attrs["activation"])

    @classmethod
    def temporaries(cls, attrs, inputs, output, weights):
        return _window_temporaries(attrs, inputs[0], output, weights["kernel"].shape[:3], attrs["dilation"])

    def _run(self, x):
        *taps, cin, cout = self.kernel.shape
        if x.shape[-1] != cin:
            raise ValueError(f"expected {cin} input channels, got {x.shape[-1]}")
        windows, _ = conv_windows(x.astype(np.float32, copy=False), taps, self.attrs["strides"], self.attrs["padding"],
                                  self.attrs["dilation"])
        out = windows.shape[:4]
        y = windows.reshape(math.prod(out), -1) @ self.kernel.reshape(-1, cout)
        y = y.reshape(*out, cout)
        if self.bias is not None:
            y = y + self.bias
        return _activate(y, self.attrs)


@register
class DepthwiseConv2D(Op):
    """NHWC depthwise convolution, kernel (kh, kw, cin, multiplier): output channel ``c * multiplier + m`` reads channel c."""

    type = "depthwise_conv2d"
    weights = ("kernel",)
    optional_weights = ("bias",)
    attributes = Conv2D.attributes

    @classmethod
    def infer(cls, attrs, inputs, weights):
        (x,) = inputs
        _rank(x, (4,))
        kh, kw, cin, multiplier = _kernel_shape(weights, 4)
        if not _same(x[3], cin):
            raise ValueError(f"kernel {[kh, kw, cin, multiplier]} takes {cin} input channels, the input has shape {_text(x)}")
        if min(kh, kw, cin, multiplier) < 1:
            raise ValueError(f"kernel shape {[kh, kw, cin, multiplier]} has an empty axis")
        _bias(weights, cin * multiplier)
        ho, wo = _window_output(attrs, x, (kh, kw), attrs["dilation"])
        return _activated((x[0], ho, wo, cin * multiplier), attrs["activation"])

    @classmethod
    def temporaries(cls, attrs, inputs, output, weights):
        return _window_temporaries(attrs, inputs[0], output, weights["kernel"].shape[:2], attrs["dilation"])

    def _run(self, x):
        kh, kw, cin, multiplier = self.kernel.shape
        if x.shape[-1] != cin:
            raise ValueError(f"expected {cin} input channels, got {x.shape[-1]}")
        windows, _ = conv_windows(x.astype(np.float32, copy=False), (kh, kw), self.attrs["strides"],
                                  self.attrs["padding"], self.attrs["dilation"])
        y = np.einsum("nhwijc,ijcm->nhwcm", windows, self.kernel)  # each channel with its own taps
        y = y.reshape(*y.shape[:3], cin * multiplier)
        if self.bias is not None:
            y = y + self.bias
        return _activate(y, self.attrs)


class _Pool(Op):
    """What the two pools share: their attributes and shapes."""

    attributes = {"pool_size": schema.ints(2), **_WINDOW}

    @classmethod
    def infer(cls, attrs, inputs, weights):
        (x,) = inputs
        _rank(x, (4,))
        ho, wo = _window_output(attrs, x, attrs["pool_size"])
        return (x[0], ho, wo, x[3])

    @classmethod
    def temporaries(cls, attrs, inputs, output, weights):
        return _window_temporaries(attrs, inputs[0], output, attrs["pool_size"])


@register
class MaxPool2D(_Pool):
    """NHWC max pooling."""

    type = "max_pool2d"

    def _run(self, x):
        windows, _ = conv_windows(x, self.attrs["pool_size"], self.attrs["strides"], self.attrs["padding"], pad_value=-np.inf)
        return windows.max(axis=(3, 4)).astype(x.dtype)


@register
class AvgPool2D(_Pool):
    """NHWC average pooling; with 'same' padding the padded cells are not counted (as in TensorFlow)."""

    type = "avg_pool2d"

    def _run(self, x):
        args = (self.attrs["pool_size"], self.attrs["strides"], self.attrs["padding"])
        windows, _ = conv_windows(x, *args)
        counts, _ = conv_windows(np.ones((1, *x.shape[1:3], 1), x.dtype), *args)
        return (windows.sum(axis=(3, 4)) / counts.sum(axis=(3, 4))).astype(x.dtype)


class _Pool3D(Op):
    """What the two 3-D pools share: their attributes and shapes (NDHWC)."""

    attributes = {"pool_size": schema.ints(3), **_WINDOW_3D}

    @classmethod
    def infer(cls, attrs, inputs, weights):
        (x,) = inputs
        _rank(x, (5,))
        return (x[0], *_window_output(attrs, x, attrs["pool_size"]), x[4])

    @classmethod
    def temporaries(cls, attrs, inputs, output, weights):
        return _window_temporaries(attrs, inputs[0], output, attrs["pool_size"])


@register
class MaxPool3D(_Pool3D):
    """NDHWC max pooling."""

    type = "max_pool3d"

    def _run(self, x):
        windows, _ = conv_windows(x, self.attrs["pool_size"], self.attrs["strides"], self.attrs["padding"],
                                  pad_value=-np.inf)
        return windows.max(axis=(4, 5, 6)).astype(x.dtype)


@register
class AvgPool3D(_Pool3D):
    """NDHWC average pooling; with 'same' padding the padded cells are not counted (as in TensorFlow)."""

    type = "avg_pool3d"

    def _run(self, x):
        args = (self.attrs["pool_size"], self.attrs["strides"], self.attrs["padding"])
        windows, _ = conv_windows(x, *args)
        counts, _ = conv_windows(np.ones((1, *x.shape[1:4], 1), x.dtype), *args)
        return (windows.sum(axis=(4, 5, 6)) / counts.sum(axis=(4, 5, 6))).astype(x.dtype)


def _axes(axes: list) -> bool:
    return 0 < len(axes) == len(set(axes)) and all(0 < a < 8 for a in axes)


def _axes_within(axes: list[int], shape: tuple) -> list[int]:
    """``axes``, or a ValueError when one is outside an input of ``shape``."""
    if max(axes) >= len(shape):
        raise ValueError(f"axes {axes} are outside an input of shape {_text(shape)}")
    return axes


class _GlobalPool(Op):
    """A reduction over ``axes`` (e.g. [1] for sequences, [1, 2] for images), optionally keeping them."""

    attributes = {"axes": schema.int_list("distinct axes in [1, 7] (not the batch)", _axes),
                  "keepdims": schema.boolean(default=False)}
    reduce = staticmethod(np.mean)

    @classmethod
    def infer(cls, attrs, inputs, weights):
        (x,) = inputs
        axes = _axes_within(attrs["axes"], x)
        if attrs["keepdims"]:
            return tuple(1 if i in axes else d for i, d in enumerate(x))
        return tuple(d for i, d in enumerate(x) if i not in axes)

    def _run(self, x):
        return self.reduce(x, axis=tuple(self.attrs["axes"]), keepdims=self.attrs["keepdims"])


@register
class GlobalAvgPool(_GlobalPool):
    """Mean over ``axes``."""

    type = "global_avg_pool"
    reduce = staticmethod(np.mean)


@register
class GlobalMaxPool(_GlobalPool):
    """Maximum over ``axes``."""

    type = "global_max_pool"
    reduce = staticmethod(np.max)


def _product(dims) -> "int | None":
    return None if any(d is None for d in dims) else math.prod(dims)


@register
class Flatten(Op):
    """(N, ...) -> (N, prod(...)) in row-major (channels-last) order."""

    type = "flatten"

    @classmethod
    def infer(cls, attrs, inputs, weights):
        (x,) = inputs
        _rank(x, range(2, 9))
        return (x[0], _product(x[1:]))

    def _run(self, x):
        return x.reshape(x.shape[0], -1)


def _target_shape(shape: list) -> bool:
    return 0 < len(shape) and all(d >= 1 or d == -1 for d in shape) and shape.count(-1) <= 1


@register
class Reshape(Op):
    """(N, ...) -> (N, *shape); ``shape`` may hold one -1."""

    type = "reshape"
    attributes = {"shape": schema.int_list("a list of positive ints with at most one -1", _target_shape)}

    @classmethod
    def infer(cls, attrs, inputs, weights):
        (x,) = inputs
        _rank(x, range(1, 9))
        target = list(attrs["shape"])
        size, known = _product(x[1:]), math.prod(d for d in target if d != -1)
        if size is not None:
            if -1 in target:
                if size % known:
                    raise ValueError(f"cannot reshape {_text(x)} to {target}: {size} values per example")
                target[target.index(-1)] = size // known
            elif size != known:
                raise ValueError(f"cannot reshape {_text(x)} to {target}: {size} values per example, {known} wanted")
        return (x[0], *(None if d == -1 else d for d in target))

    def _run(self, x):
        return x.reshape(x.shape[0], *self.attrs["shape"])


def _permutation(perm: list) -> bool:
    return sorted(perm) == list(range(len(perm))) and len(perm) >= 2 and perm[0] == 0


@register
class Transpose(Op):
    """Axes reordered by ``perm`` (counted with the batch, which stays first: ``perm[0] == 0``)."""

    type = "transpose"
    attributes = {"perm": schema.int_list("a permutation of 0..rank-1 that keeps the batch (0) first", _permutation)}

    @classmethod
    def infer(cls, attrs, inputs, weights):
        (x,) = inputs
        perm = attrs["perm"]
        if len(perm) != len(x):
            raise ValueError(f"perm {perm} does not fit an input of shape {_text(x)}")
        return tuple(x[p] for p in perm)

    def _run(self, x):
        return np.transpose(x, self.attrs["perm"])


def _per_axis(minimum: int) -> schema.Attr:
    """One int of at least ``minimum`` per axis after the batch (its length is checked against the input in `infer`)."""
    return schema.int_list(f"one int >= {minimum} per axis after the batch", lambda v: 0 < len(v) and min(v) >= minimum)


def _pairs() -> schema.Attr:
    """(before, after) ints >= 0 per axis after the batch, flattened: [before_1, after_1, before_2, ...]."""
    return schema.int_list("(before, after) ints >= 0 per axis after the batch, flattened",
                           lambda v: 0 < len(v) and len(v) % 2 == 0 and min(v) >= 0)


def _fits_axes(values: list, x: Shape, per_axis: int, what: str) -> None:
    if len(values) != per_axis * (len(x) - 1):
        raise ValueError(f"{what} {values} must hold {per_axis} value(s) per axis after the batch of an input of shape "
                         f"{_text(x)}")


@register
class Tile(Op):
    """Each axis after the batch repeated ``reps`` times (whole copies, as numpy's tile)."""

    type = "tile"
    attributes = {"reps": _per_axis(1)}

    @classmethod
    def infer(cls, attrs, inputs, weights):
        (x,) = inputs
        _fits_axes(attrs["reps"], x, 1, "reps")
        return (x[0], *(None if d is None else d * r for d, r in zip(x[1:], attrs["reps"])))

    def _run(self, x):
        return np.tile(x, (1, *self.attrs["reps"]))


@register
class Pad(Op):
    """Zeros added before and after each axis after the batch: ``pads`` = [before_1, after_1, before_2, ...]."""

    type = "pad"
    attributes = {"pads": _pairs()}

    @classmethod
    def infer(cls, attrs, inputs, weights):
        (x,) = inputs
        pads = attrs["pads"]
        _fits_axes(pads, x, 2, "pads")
        return (x[0], *(None if d is None else d + pads[2 * i] + pads[2 * i + 1] for i, d in enumerate(x[1:])))

    def _run(self, x):
        pads = self.attrs["pads"]
        return np.pad(x, [(0, 0), *zip(pads[0::2], pads[1::2])])


@register
class Crop(Op):
    """Cells removed before and after each axis after the batch: ``crops`` = [before_1, after_1, before_2, ...]."""

    type = "crop"
    attributes = {"crops": _pairs()}

    @classmethod
    def infer(cls, attrs, inputs, weights):
        (x,) = inputs
        crops = attrs["crops"]
        _fits_axes(crops, x, 2, "crops")
        sizes = []
        for i, d in enumerate(x[1:]):
            if d is not None and d - crops[2 * i] - crops[2 * i + 1] < 1:
                raise ValueError(f"crops {crops} leave nothing of axis {i + 1} of an input of shape {_text(x)}")
            sizes.append(None if d is None else d - crops[2 * i] - crops[2 * i + 1])
        return (x[0], *sizes)

    def _run(self, x):
        crops = self.attrs["crops"]
        return x[(slice(None), *(slice(b, d - a) for b, a, d in zip(crops[0::2], crops[1::2], x.shape[1:])))]


@register
class Embedding(Op):
    """Rows of ``table`` (vocab, dim) at integer ids; ids outside the table are refused."""

    type = "embedding"
    weights = ("table",)

    @classmethod
    def infer(cls, attrs, inputs, weights):
        (ids,) = inputs
        _rank(ids, range(1, 8))
        _, dim = _weight_shape(weights, "table", 2)
        return (*ids, dim)

    def _run(self, ids):
        ids = np.asarray(ids)
        if np.issubdtype(ids.dtype, np.floating):
            if not np.all(np.isfinite(ids)) or np.any(ids != np.round(ids)):
                raise InputError(f"Embedding '{self.node.name}' takes integer ids. Received non-integer values.")
        vocab = self.table.shape[0]
        # the range is checked before any cast: a cast would wrap ids past int64 (uint64) into the table
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise InputError(
                f"Embedding '{self.node.name}' ids must be in [0, {vocab}). Received: min {ids.min()}, max {ids.max()}"
            )
        return self.table[ids.astype(np.int64)].astype(np.float32, copy=False)


def _merge(shapes: Sequence[Shape], skip: int | None = None) -> Shape:
    """One shape from shapes that must agree (except on axis ``skip``); ValueError naming them otherwise."""
    first = shapes[0]
    for other in shapes[1:]:
        if len(other) != len(first) or not all(_same(a, b) for i, (a, b) in enumerate(zip(first, other)) if i != skip):
            raise ValueError(f"inputs of shapes {', '.join(_text(s) for s in shapes)} do not agree")
    return tuple(next((s[i] for s in shapes if s[i] is not None), None) for i in range(len(first)))


@register
class Add(Op):
    """Elementwise sum of one or more inputs of the same shape."""

    type = "add"
    arity = None

    @classmethod
    def infer(cls, attrs, inputs, weights):
        return _merge(inputs)

    def _run(self, *xs):
        total = xs[0]
        for x in xs[1:]:
            total = total + x
        return total


def _broadcast(shapes: Sequence[Shape]) -> Shape:
    """The numpy broadcast of ``shapes`` (None: any size); ValueError naming them when they do not broadcast."""
    rank = max(len(s) for s in shapes)
    result = []
    for axis in range(rank):
        sizes = {s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0} - {1}
        known = sizes - {None}
        if len(known) > 1:
            raise ValueError(f"inputs of shapes {', '.join(_text(s) for s in shapes)} do not broadcast")
        result.append(known.pop() if known else (None if None in sizes else 1))
    return tuple(result)


class _Elementwise(Op):
    """An elementwise combination of its inputs with numpy broadcasting: ``combine`` folds them left to right."""

    arity = None

    @classmethod
    def infer(cls, attrs, inputs, weights):
        return _broadcast(inputs)

    @staticmethod
    def combine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _run(self, *xs):
        result = xs[0]
        for x in xs[1:]:
            result = self.combine(result, x)
        return result


@register
class Subtract(_Elementwise):
    """``a - b``."""

    type = "subtract"
    arity = 2
    combine = staticmethod(np.subtract)


@register
class Divide(_Elementwise):
    """``a / b`` (a zero divisor gives inf or nan, as in every format)."""

    type = "divide"
    arity = 2
    combine = staticmethod(np.divide)


@register
class Multiply(_Elementwise):
    """The product of one or more inputs."""

    type = "multiply"
    combine = staticmethod(np.multiply)


@register
class Maximum(_Elementwise):
    """The elementwise maximum of one or more inputs."""

    type = "maximum"
    combine = staticmethod(np.maximum)


@register
class Minimum(_Elementwise):
    """The elementwise minimum of one or more inputs."""

    type = "minimum"
    combine = staticmethod(np.minimum)


@register
class Average(_Elementwise):
    """The mean of one or more inputs: their sum (left to right) divided by their count, as Keras computes it."""

    type = "average"

    def _run(self, *xs):
        total = xs[0]
        for x in xs[1:]:
            total = total + x
        return total / np.float32(len(xs))


@register
class Concat(Op):
    """Concatenation along ``axis`` (counted with the batch axis as 0)."""

    type = "concat"
    arity = None
    attributes = {"axis": schema.integer(1, 7)}

    @classmethod
    def infer(cls, attrs, inputs, weights):
        axis = attrs["axis"]
        if any(len(x) <= axis for x in inputs):
            raise ValueError(f"axis {axis} is outside inputs of shapes {', '.join(_text(x) for x in inputs)}")
        merged = _merge(inputs, skip=axis)
        sizes = [x[axis] for x in inputs]
        return merged[:axis] + (None if None in sizes else sum(sizes),) + merged[axis + 1:]

    def _run(self, *xs):
        return np.concatenate(xs, axis=self.attrs["axis"])


@register
class ScaleShift(Op):
    """``x * scale + shift`` per channel (last axis): a batch normalisation that could not be folded."""

    type = "scale_shift"
    weights = ("scale", "shift")

    @classmethod
    def infer(cls, attrs, inputs, weights):
        (x,) = inputs
        _rank(x, range(2, 9))
        for role in cls.weights:
            if tuple(weights[role].shape) != (x[-1],) and not (x[-1] is None and len(weights[role].shape) == 1):
                raise ValueError(f"weight '{role}' must have shape [{x[-1]}] (one value per channel of the input "
                                 f"{_text(x)}), got {list(weights[role].shape)}")
        return x

    def _run(self, x):
        return x * self.scale + self.shift


@register
class LayerNorm(Op):
    """Layer normalisation over ``axes`` with ``epsilon``; optional ``gamma``/``beta`` over those axes."""

    type = "layer_norm"
    optional_weights = ("gamma", "beta")
    attributes = {"axes": schema.int_list("distinct axes in [1, 7] (not the batch)", _axes),
                  "epsilon": schema.number(minimum=0.0)}

    @classmethod
    def infer(cls, attrs, inputs, weights):
        (x,) = inputs
        axes = _axes_within(attrs["axes"], x)
        size = _product([x[a] for a in axes])
        for role in cls.optional_weights:
            if weights.get(role) is not None and size is not None and math.prod(weights[role].shape) != size:
                raise ValueError(f"weight '{role}' must hold {size} values (the input's axes {axes} of "
                                 f"{_text(x)}), got shape {list(weights[role].shape)}")
        return x

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


# The score a masked position gets, as Keras's Attention and MultiHeadAttention subtract it (float32).
MASKED_SCORE = 1e9


def causal_bias(tq: int, tv: int) -> np.ndarray:
    """(tq, tv) additive mask: 0 where query i may see value j (j <= i), -1e9 elsewhere, as Keras's causal masks."""
    return np.where(np.tril(np.ones((tq, tv), bool)), 0.0, -MASKED_SCORE).astype(np.float32)


@register
class Attention(Op):
    """Dot-product attention over the last two axes of (query, value, key), leading axes batched.

    ``scores = scale * query @ key^T`` (score_mode 'dot') or ``concat_weight * sum(tanh(scale *
    (query_i + key_j)))`` ('concat'), a causal mask subtracting 1e9 where ``j > i``, softmax over
    the values, then ``softmax @ value``: Keras's `Attention` and the core of `MultiHeadAttention`.
    """

    type = "attention"
    arity = 3
    attributes = {"scale": schema.number(default=1.0), "causal": schema.boolean(default=False),
                  "score_mode": schema.one_of(("dot", "concat"), default="dot"),
                  "concat_weight": schema.number(default=1.0)}

    @classmethod
    def infer(cls, attrs, inputs, weights):
        query, value, key = inputs
        for shape, what in ((query, "query"), (value, "value"), (key, "key")):
            _rank(shape, range(3, 9), what)
        if not (len(query) == len(value) == len(key)):
            raise ValueError(f"query {_text(query)}, value {_text(value)} and key {_text(key)} must have one rank")
        if not (_same(query[-1], key[-1]) and _same(value[-2], key[-2])):
            raise ValueError(f"query {_text(query)} and key {_text(key)} must share their last axis, value "
                             f"{_text(value)} and key their next to last")
        _merge([query[:-2], value[:-2], key[:-2]])
        return (*query[:-1], value[-1])

    @classmethod
    def temporaries(cls, attrs, inputs, output, weights):
        query, value, key = inputs
        if None in query or None in key:
            return {}
        scores = 4 * math.prod(query[:-1]) * key[-2]
        return {"scores": scores * (query[-1] if attrs["score_mode"] == "concat" else 1)}

    def _run(self, query, value, key):
        scale = np.float32(self.attrs["scale"])
        if self.attrs["score_mode"] == "dot":
            scores = np.matmul(query, np.swapaxes(key, -1, -2)) * scale
        else:
            summed = np.tanh(scale * (query[..., :, None, :] + key[..., None, :, :])).sum(axis=-1)
            scores = np.float32(self.attrs["concat_weight"]) * summed
        if self.attrs["causal"]:
            scores = scores + causal_bias(scores.shape[-2], scores.shape[-1])
        weights = apply_activation(scores.astype(np.float32), normalize_activation({"name": "softmax", "axis": -1}))
        return np.matmul(weights, value).astype(np.float32)


@register
class Activation(Op):
    """An activation on its own (``attrs["activation"]``)."""

    type = "activation"
    attributes = _ACTIVATION

    @classmethod
    def infer(cls, attrs, inputs, weights):
        return _activated(inputs[0], attrs["activation"])

    def _run(self, x):
        return _activate(x, self.attrs)


@register
class ZerosLike(Op):
    """Zeros shaped like the input: a `FilterLayer` that is off."""

    type = "zeros_like"

    @classmethod
    def infer(cls, attrs, inputs, weights):
        return inputs[0]

    def _run(self, x):
        return np.zeros_like(x, dtype=np.float32)
