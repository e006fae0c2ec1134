"""What every format's ``check_options`` shares: one message shape for a refused dtype or option.

The dtypes a format takes are declared once, in `mann_edge.formats.FORMATS`; these helpers
read them there, so a format module never lists its dtypes again.

Example:
    >>> check_dtype("onnx", "int8", owner="ONNX export")
    Traceback (most recent call last):
    ConversionError: ONNX export takes dtype 'float32' or 'float16'. Received: 'int8'
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from mann_edge.errors import ConversionError
from mann_edge.formats import FORMATS

__all__ = ["check_dtype", "check_names", "check_bool"]


def check_dtype(format: str, dtype: Any, *, owner: str) -> None:
    """ConversionError unless ``dtype`` is one the format ``format`` (a `FORMATS` name) takes.

    Example:
        >>> check_dtype("tflite", "int8", owner="TFLite export")   # silent
    """
    dtypes = FORMATS[format].dtypes
    if not isinstance(dtype, str) or dtype not in dtypes:
        raise ConversionError(f"{owner} takes dtype {_alternatives(dtypes)}. Received: {dtype!r}")


def check_names(options: Mapping[str, Any], allowed: Sequence[str], *, owner: str) -> None:
    """ConversionError naming the options that are not among ``allowed`` (the export's keyword options).

    Example:
        >>> check_names({"sparse": True, "sprase": True}, ["sparse"], owner="ONNX export")
        Traceback (most recent call last):
        ConversionError: ONNX export takes options ['sparse']. Received unknown options: ['sprase']
    """
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConversionError(f"{owner} takes options {list(allowed)}. Received unknown options: {unknown}")


def check_bool(name: str, value: Any, *, owner: str) -> None:
    """ConversionError unless ``value`` is a bool (a string such as "false" would otherwise count as true).

    Example:
        >>> check_bool("sparse", "no", owner="ONNX export")
        Traceback (most recent call last):
        ConversionError: ONNX export option `sparse` must be True or False. Received: sparse='no'
    """
    if not isinstance(value, (bool, np.bool_)):
        raise ConversionError(f"{owner} option `{name}` must be True or False. Received: {name}={value!r}")


def _alternatives(values: Sequence[str]) -> str:
    quoted = [repr(value) for value in values]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
