"""What every format's ``check_options`` shares: one message shape for a refused dtype or option.

The dtypes a format takes are declared once, in `mann_edge.formats.FORMATS`; these helpers
read them there, so a format module never lists its dtypes again.

Data given with an export (calibration inputs for int8, labelled data for ``--eval``) is
read here too, once, with one error shape: `read_arrays` takes an ``.npz`` file or a
mapping of name -> array, `task_arrays` picks and checks one task's inputs by name.

Example:
    >>> check_dtype("onnx", "int8", owner="ONNX export")
    Traceback (most recent call last):
    ConversionError: ONNX export takes dtype 'float32' or 'float16'. Received: 'int8'
"""

from __future__ import annotations

import os
import zipfile
from typing import Any, Mapping, Sequence

import numpy as np

from mann_edge.errors import ConversionError, InputError
from mann_edge.formats import FORMATS
from mann_edge.graph.model import CompactModel

__all__ = ["check_dtype", "check_names", "check_bool", "read_arrays", "task_arrays", "Arrays"]

# Named arrays given with an export: what `read_arrays` returns.
Arrays = dict[str, np.ndarray]


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


def check_batch(batch: Any, *, owner: str) -> None:
    """ConversionError unless ``batch`` (the fixed batch size of an export's inputs) is a positive int or None (free)."""
    if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
        raise ConversionError(f"{owner} option `batch` must be a positive int (or None: free). Received: batch={batch!r}")


def _alternatives(values: Sequence[str]) -> str:
    quoted = [repr(value) for value in values]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def read_arrays(source: "str | os.PathLike | Mapping[str, Any]", *, what: str) -> Arrays:
    """Named arrays from an ``.npz`` file (read without pickle) or a mapping; InputError naming the file otherwise.

    ``what`` says what the data is for, in errors ("calibration data", "evaluation data").

    Example:
        >>> sorted(read_arrays("calibration.npz", what="calibration data"))
        ['cancer_features', 'digits_image']
    """
    if isinstance(source, Mapping):
        arrays = {str(name): np.asarray(value) for name, value in source.items()}
        where = f"{what} (a mapping)"
    elif isinstance(source, (str, os.PathLike)) and str(source).strip():
        where = f"{what} {source}"
        if not os.path.isfile(source):
            raise InputError(f"{where} does not exist or is not a file (expected an .npz of arrays by input name)")
        try:
            with np.load(source, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
            raise InputError(f"{where} is not a readable .npz file of arrays ({error})") from None
    else:
        raise InputError(f"{what} must be an .npz path or a mapping of name -> array. Received: {source!r}")
    if not arrays:
        raise InputError(f"{where} holds no arrays; expected one per model input name")
    return arrays


def task_arrays(model: CompactModel, task: str, arrays: Mapping[str, np.ndarray], *, what: str) -> Arrays:
    """The arrays of ``task``'s inputs, checked: every input present, its shape (batch first) and kind, one length.

    Example:
        >>> task_arrays(cm, "cancer", read_arrays("cal.npz", what="calibration data"), what="calibration data")
        {'cancer_features': array(...)}
    """
    picked = {}
    for spec in model.task(task).inputs:
        if spec.name not in arrays:
            raise InputError(f"{what} has no array for input '{spec.name}' of task {task!r}. "
                             f"Expected one array per input name; received {sorted(arrays)}")
        array = np.asarray(arrays[spec.name])
        expected = tuple(spec.shape)
        fits = array.ndim == len(expected) and all(d is None or d == n for d, n in zip(expected, array.shape))
        if not fits or array.shape[0] == 0:
            shown = ["N" if d is None else d for d in expected]
            raise InputError(f"{what} input '{spec.name}' of task {task!r} must have shape {shown} with N >= 1. "
                             f"Received: {list(array.shape)}")
        wants_integers = spec.dtype.startswith("int")
        if wants_integers != np.issubdtype(array.dtype, np.integer) or array.dtype.kind not in "iuf":
            raise InputError(f"{what} input '{spec.name}' of task {task!r} must hold {spec.dtype} values. "
                             f"Received: {array.dtype}")
        picked[spec.name] = array.astype(spec.dtype)
    lengths = {name: len(array) for name, array in picked.items()}
    if len(set(lengths.values())) > 1:
        raise InputError(f"{what} inputs of task {task!r} must have one length (examples). Received: {lengths}")
    return picked
