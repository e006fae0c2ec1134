"""Exports of the compact model: one module per format, each with the same two entry points.

- ``export(model, path, *, dtype="float32", sparse=True, force=False, **options) -> Path``
  writes the artifact atomically (nothing half-written under ``path``) and returns the
  path `mann_edge.runtime.load` takes.
- ``validate(model, path, *, atol=None, rtol=None, tasks=None) -> ValidationReport``
  runs the artifact on sample inputs against the compact model's reference outputs.
- ``artifact_name(**options) -> str``: the file or directory name the export gets in an
  output directory (`mann_edge.convert` uses it).
- ``task_files(path) -> dict[str, Path]`` (formats that write a file per task): which file
  holds which task, for per-task sizes.

Example:
    >>> from mann_edge import converters
    >>> path = converters.get("onnx").export(cm, "out/onnx")
    >>> converters.get("onnx").validate(cm, path).raise_for_errors()
"""

from __future__ import annotations

import importlib
from types import ModuleType

from mann_edge.errors import ConversionError

__all__ = ["FORMATS", "get", "artifact_name"]

# format -> its module
FORMATS = {
    "tflite": "mann_edge.converters.tflite",
    "onnx": "mann_edge.converters.onnx",
    "coreml": "mann_edge.converters.coreml",
}


def get(format: str) -> ModuleType:
    """The converter module of ``format`` ('tflite', 'onnx' or 'coreml')."""
    if format not in FORMATS:
        raise ConversionError(f"Unknown export format {format!r}. Formats: {sorted(FORMATS)}")
    return importlib.import_module(FORMATS[format])


def artifact_name(format: str, **options) -> str:
    """The file or directory name an export of ``format`` with these `export` options gets in an output directory."""
    return get(format).artifact_name(**options)
