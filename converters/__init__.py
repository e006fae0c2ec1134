"""Exports of the compact model: one module per format (`mann_edge.formats.FORMATS`), each with the same entry points.

- ``check_options(*, dtype="float32", **options)``: ConversionError for a dtype or option the
  format cannot take, before anything is written.
- ``export(model, path, *, dtype="float32", force=False, **options) -> Path`` writes the
  artifact atomically (nothing half-written under ``path``) and returns the path
  `mann_edge.runtime.load` takes.
- ``validate(model, path, *, atol=None, rtol=None, tasks=None, batches=(1, 8), inputs=None) -> ValidationReport``
  runs the artifact on sample inputs (or ``inputs``, e.g. calibration data for a quantized
  export) against the compact model's reference outputs, every task of the model (or
  ``tasks``): a task the artifact lacks fails.
- ``runner(path) -> run(task, inputs) -> outputs``: how to run the artifact here, in its
  runtime or, where that runtime cannot run on this machine, the converter's own evaluation.
- ``sparse_layers(path) -> (int, int) or None``: weights the runtime runs sparse, of the weights
  of matrix-multiplying ops (None: the runtime decides), the convert table's "runs sparse".
- ``artifact_name(**options) -> str``: the file or directory name the export gets in an
  output directory.
- ``task_files(path) -> dict[str, Path]``: which file holds which task, for formats that
  write a file per task (empty otherwise).

Example:
    >>> from mann_edge import converters
    >>> path = converters.get("onnx").export(cm, "out/onnx")
    >>> converters.get("onnx").validate(cm, path).raise_for_errors()
"""

from __future__ import annotations

from types import ModuleType

from mann_edge.errors import ConversionError, MannEdgeError
from mann_edge.formats import get_format

__all__ = ["get"]


def get(format: str) -> ModuleType:
    """The converter module of ``format`` (a name in `mann_edge.formats.FORMATS`)."""
    try:
        return get_format(format).converter_module()
    except MannEdgeError as error:
        raise ConversionError(str(error)) from None
