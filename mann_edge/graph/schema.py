"""What a node's attributes may hold: one declaration per attribute, checked when a node is bound or read from a file.

Each op class lists its attributes (`mann_edge.graph.ops.Op.attributes`) as `Attr` values
made by the helpers below; `check_attrs` checks a node's attributes against that list and
returns them with defaults filled in. A bundle is read from a file someone else wrote, so
nothing an op reads from its attributes may be trusted unchecked: a stride of 0 would divide
by zero, a padding of "bogus" would be taken as 'valid', a missing key would fail mid-run.

Example:
    >>> check_attrs({"strides": ints(2)}, {"strides": [0, 1]}, "conv2d", "conv")
    Traceback (most recent call last):
    ValueError: Op conv2d (node 'conv'): attribute 'strides' must be 2 positive ints. Received: [0, 1]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from mann_edge.graph.activations import ACTIVATIONS, DEFAULTS, normalize_activation

__all__ = ["Attr", "REQUIRED", "INVALID", "ints", "int_list", "integer", "number", "boolean", "one_of", "text", "activation",
           "check_attrs", "COMMON"]

REQUIRED = object()
INVALID = object()  # what an attribute's check returns for a value it refuses

# Sizes and counts in attributes (window sizes, strides, reshape dimensions) above this are
# not a model anyone trains; refusing them keeps the arithmetic on them small.
MAX_SIZE = 2**31 - 1


@dataclass(frozen=True)
class Attr:
    """One attribute: what it must be (for messages), a function returning its checked value or INVALID, its default."""

    expected: str
    check: Callable[[Any], Any]
    default: Any = REQUIRED


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ints(count: int, minimum: int):
    def check(value):
        if isinstance(value, (list, tuple)) and len(value) == count and all(
            _is_int(v) and minimum <= v <= MAX_SIZE for v in value
        ):
            return tuple(value)
        return INVALID

    return check


def ints(count: int, *, minimum: int = 1, default: Any = REQUIRED) -> Attr:
    """``count`` ints of at least ``minimum`` (window sizes, strides, dilations)."""
    what = "positive ints" if minimum == 1 else f"ints >= {minimum}"
    return Attr(f"{count} {what}", _ints(count, minimum), default)


def int_list(expected: str, valid: Callable[[list], bool], *, default: Any = REQUIRED) -> Attr:
    """A list of ints (at most 8, each within +-MAX_SIZE) for which ``valid`` holds."""

    def check(value):
        if isinstance(value, (list, tuple)) and len(value) <= 8 and all(
            _is_int(v) and -MAX_SIZE <= v <= MAX_SIZE for v in value
        ) and valid(list(value)):
            return list(value)
        return INVALID

    return Attr(expected, check, default)


def integer(minimum: int, maximum: int = MAX_SIZE, *, default: Any = REQUIRED) -> Attr:
    return Attr(f"an int in [{minimum}, {maximum}]", lambda v: v if _is_int(v) and minimum <= v <= maximum else INVALID,
                default)


def number(*, minimum: float = -math.inf, default: Any = REQUIRED) -> Attr:
    """A finite number (int or float) of at least ``minimum``."""

    def check(value):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= minimum:
            return value
        return INVALID

    return Attr(f"a finite number >= {minimum:g}" if minimum > -math.inf else "a finite number", check, default)


def boolean(*, default: Any = REQUIRED) -> Attr:
    return Attr("true or false", lambda v: v if isinstance(v, bool) else INVALID, default)


def one_of(values: Sequence[str], *, default: Any = REQUIRED) -> Attr:
    return Attr(f"one of {list(values)}", lambda v: v if isinstance(v, str) and v in values else INVALID, default)


def text(*, default: Any = REQUIRED) -> Attr:
    """A string or null (names recorded for reports)."""
    return Attr("a string or null", lambda v: v if v is None or (isinstance(v, str) and len(v) <= 4096) else INVALID,
                default)



def _activation(value):
    """The activation in normalized form, its parameters checked: numbers, bools and axes of the right type."""
    try:
        normalized = normalize_activation(value)
    except (ValueError, AttributeError, TypeError):
        return INVALID
    for key, param in normalized.items():
        if key == "name":
            continue
        default = DEFAULTS[normalized["name"]][key]
        if key == "axis":
            ok = _is_int(param) and -8 <= param < 8
        elif isinstance(default, bool):
            ok = isinstance(param, bool)
        elif key == "max_value":
            ok = param is None or (isinstance(param, (int, float)) and not isinstance(param, bool) and math.isfinite(param))
        else:
            ok = isinstance(param, (int, float)) and not isinstance(param, bool) and math.isfinite(param)
        if not ok:
            return INVALID
    return normalized


def activation() -> Attr:
    """An activation: a name, or ``{"name": ..., **parameters}`` (absent means linear)."""
    return Attr(f"an activation, a name or {{'name': ..., parameters}} with name in {sorted(ACTIVATIONS)} and "
                "number parameters", _activation, {"name": "linear"})


# Attributes every node may carry: where it came from (`mann_edge.compaction` records them for reports).
COMMON: Mapping[str, Attr] = {
    "layer": text(default=None),
    "slab": integer(0, default=None),
}


def check_attrs(declared: Mapping[str, Attr], attrs: Any, op: str, node: str) -> dict:
    """``attrs`` checked against ``declared`` (plus `COMMON`), with defaults filled in; ValueError naming the attribute.

    Example:
        >>> check_attrs(ops.Conv2D.attributes, {"strides": [1, 1], "padding": "same"}, "conv2d", "conv")["dilation"]
        (1, 1)
    """
    where = f"Op {op} (node '{node}')"
    if not isinstance(attrs, Mapping):
        raise ValueError(f"{where}: attrs must be an object. Received: {type(attrs).__name__}")
    schema = {**COMMON, **declared}
    unknown = sorted(str(key) for key in attrs if key not in schema)
    if unknown:
        raise ValueError(f"{where} takes attributes {sorted(schema)}. Received unknown attributes: {unknown}")
    checked = {}
    for key, attr in schema.items():
        if key not in attrs or (attrs[key] is None and attr.default is None):
            if attr.default is REQUIRED:
                raise ValueError(f"{where}: attribute '{key}' is missing; it must be {attr.expected}")
            checked[key] = attr.default
            continue
        value = attr.check(attrs[key])
        if value is INVALID:
            raise ValueError(f"{where}: attribute '{key}' must be {attr.expected}. Received: {_short(attrs[key])}")
        checked[key] = value
    return checked


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
