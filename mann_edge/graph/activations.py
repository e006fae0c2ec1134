"""Every Keras activation in numpy, with Keras 3's formulas and defaults.

An activation travels in the graph as a dict: ``{"name": "leaky_relu", "negative_slope": 0.1}``;
parameters left out take the defaults below. These are the reference every
format's lowering is checked against.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
from scipy import special

__all__ = ["ACTIVATIONS", "DEFAULTS", "SELU_ALPHA", "SELU_SCALE", "apply_activation", "normalize_activation"]

SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


def _softplus(x):
    return np.logaddexp(np.zeros((), x.dtype), x)


def _sigmoid(x):
    return special.expit(x)


def _hard_sigmoid(x):
    return np.clip(x / 6.0 + 0.5, 0.0, 1.0).astype(x.dtype)


def _relu(x, negative_slope=0.0, max_value=None, threshold=0.0):
    y = np.where(x >= threshold, x, negative_slope * (x - threshold) if negative_slope else 0.0).astype(x.dtype)
    if max_value is not None:
        y = np.minimum(y, np.asarray(max_value, x.dtype))
    return y


def _softmax(x, axis=-1):
    z = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


def _log_softmax(x, axis=-1):
    z = x - np.max(x, axis=axis, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))


def _elu(x, alpha=1.0):
    return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0))).astype(x.dtype)


def _gelu(x, approximate=False):
    if approximate:
        return (0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))).astype(x.dtype)
    return (0.5 * x * (1.0 + special.erf(x / np.sqrt(2.0)))).astype(x.dtype)


def _sparsemax(x, axis=-1):
    # Keras's formula, kept as is so exports match the trained model: tau sums the cumulative
    # sums over the support (Martins & Astudillo take the one at k), so rows need not sum to 1.
    z_sorted = -np.sort(-x, axis=axis)
    cumulative = np.cumsum(z_sorted, axis=axis)
    shape = [1] * x.ndim
    shape[axis] = -1
    r = np.arange(1, x.shape[axis] + 1, dtype=x.dtype).reshape(shape)
    support = z_sorted - (cumulative - 1) / r > 0
    k = np.sum(support, axis=axis, keepdims=True)
    tau = (np.sum(np.where(support, cumulative, 0.0), axis=axis, keepdims=True) - 1) / k
    return np.maximum(x - tau, 0.0).astype(x.dtype)


def _glu(x, axis=-1):
    a, b = np.split(x, 2, axis=axis)
    return a * _sigmoid(b)


ACTIVATIONS: dict[str, Callable] = {
    "linear": lambda x: x,
    "relu": _relu,
    "relu6": lambda x: np.clip(x, 0.0, 6.0).astype(x.dtype),
    "leaky_relu": lambda x, negative_slope=0.2: np.where(x >= 0, x, negative_slope * x).astype(x.dtype),
    "elu": _elu,
    "selu": lambda x: (SELU_SCALE * _elu(x, SELU_ALPHA)).astype(x.dtype),
    "celu": lambda x, alpha=1.0: (np.maximum(x, 0) + np.minimum(0, alpha * np.expm1(x / alpha))).astype(x.dtype),
    "gelu": _gelu,
    "sigmoid": _sigmoid,
    "hard_sigmoid": _hard_sigmoid,
    "sparse_sigmoid": lambda x: np.clip((x + 1.0) / 2.0, 0.0, 1.0).astype(x.dtype),
    "log_sigmoid": lambda x: -_softplus(-x),
    "tanh": np.tanh,
    "hard_tanh": lambda x: np.clip(x, -1.0, 1.0).astype(x.dtype),
    "tanh_shrink": lambda x: x - np.tanh(x),
    "hard_shrink": lambda x, threshold=0.5: np.where(np.abs(x) > threshold, x, 0.0).astype(x.dtype),
    "soft_shrink": lambda x, threshold=0.5: (np.sign(x) * np.maximum(np.abs(x) - threshold, 0.0)).astype(x.dtype),
    "threshold": lambda x, threshold=0.0, default_value=0.0: np.where(x > threshold, x, default_value).astype(x.dtype),
    "silu": lambda x: x * _sigmoid(x),
    "swish": lambda x: x * _sigmoid(x),
    "hard_silu": lambda x: x * _hard_sigmoid(x),
    "hard_swish": lambda x: x * _hard_sigmoid(x),
    "mish": lambda x: x * np.tanh(_softplus(x)),
    "softplus": _softplus,
    "softsign": lambda x: x / (1.0 + np.abs(x)),
    "sparse_plus": lambda x: np.where(x <= -1, 0.0, np.where(x >= 1, x, (x + 1.0) ** 2 / 4.0)).astype(x.dtype),
    "squareplus": lambda x, b=4.0: ((x + np.sqrt(x * x + b)) / 2.0).astype(x.dtype),
    "exponential": np.exp,
    "softmax": _softmax,
    "log_softmax": _log_softmax,
    "sparsemax": _sparsemax,
    "glu": _glu,
}

# Parameters each activation takes, with Keras 3's defaults. Only these are accepted.
DEFAULTS: dict[str, dict] = {
    "relu": {"negative_slope": 0.0, "max_value": None, "threshold": 0.0},
    "leaky_relu": {"negative_slope": 0.2},
    "elu": {"alpha": 1.0},
    "celu": {"alpha": 1.0},
    "gelu": {"approximate": False},
    "hard_shrink": {"threshold": 0.5},
    "soft_shrink": {"threshold": 0.5},
    "threshold": {"threshold": 0.0, "default_value": 0.0},
    "squareplus": {"b": 4.0},
    "softmax": {"axis": -1},
    "log_softmax": {"axis": -1},
    "sparsemax": {"axis": -1},
    "glu": {"axis": -1},
}


def normalize_activation(activation) -> dict:
    """``{"name": ..., **params}`` with every parameter filled in; accepts a name or such a dict."""
    if activation is None:
        activation = {"name": "linear"}
    if isinstance(activation, str):
        activation = {"name": activation}
    name = activation.get("name")
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}. Supported: {sorted(ACTIVATIONS)}")
    params = {k: v for k, v in activation.items() if k != "name"}
    allowed = DEFAULTS.get(name, {})
    unknown = set(params) - set(allowed)
    if unknown:
        raise ValueError(f"Activation {name!r} takes {sorted(allowed) or 'no parameters'}. Received: {sorted(unknown)}")
    return {"name": name, **allowed, **params}


def apply_activation(x: np.ndarray, activation: Mapping) -> np.ndarray:
    params = {k: v for k, v in activation.items() if k != "name"}
    return ACTIVATIONS[activation["name"]](x, **params)
