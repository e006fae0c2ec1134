"""The format table: every format mann-edge writes and runs, declared once.

Each `Format` says how a path of it is recognised, what its artifact is called in an output
directory, which runtime session opens it and which converter module writes and validates
it (both named as import paths, so this module needs nothing but the standard library). The
`.mann` bundle is one format among the others. `runtime.load`, `mann_edge.convert`/`verify`,
the command line, the demo and the benchmark read `FORMATS`; adding a format is one entry
here, its converter module and its runtime backend (docs/adding-a-format.md).

The metadata keys every export carries are defined here too, for writers and readers alike.

Example:
    >>> from mann_edge.formats import FORMATS, detect_format
    >>> [f.name for f in FORMATS.values()]
    ['mann', 'tflite', 'onnx', 'ort', 'coreml']
    >>> detect_format("out/model.tflite").name
    'tflite'
"""

from __future__ import annotations

import importlib
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

from mann_edge.errors import MannEdgeError

__all__ = [
    "Format",
    "FORMATS",
    "EXPORT_FORMATS",
    "get_format",
    "detect_format",
    "METADATA_MANIFEST",
    "METADATA_DTYPE",
    "METADATA_TASK",
    "METADATA_TASKS",
    "METADATA_USE_XNNPACK",
]

# Metadata entries of an export (TFLite model metadata, ONNX metadata_props, Core ML user_defined_metadata).
METADATA_MANIFEST = "mann_edge_manifest"  # the manifest (JSON) of the tasks the file holds
METADATA_DTYPE = "mann_edge_dtype"  # the dtype the weights were exported with
METADATA_TASK = "mann_edge_task"  # ONNX: the task a per-task file holds
METADATA_TASKS = "mann_edge_tasks"  # Core ML: each task's package or function and feature names (JSON)
# TFLite: b"false" when the export's verification found the XNNPACK delegate wrong on it.
METADATA_USE_XNNPACK = "mann_edge_use_xnnpack"


@dataclass(frozen=True)
class Format:
    """One format: how to recognise it, where it goes in an output directory, what writes and runs it.

    Attributes:
        name: the key used everywhere (`convert(formats=...)`, `--to`, `result.artifacts`).
        title: what people call it, for tables.
        suffix: the file (or package) suffix of one artifact.
        artifact: the file or directory name `convert` gives it in an output directory (a
            converter may pick another for some options; see `artifact_name`).
        dtypes: the `dtype` values its export takes.
        runtime: the runtime that runs it, for tables.
        runtime_module: the module that runtime lives in (imported ahead to measure memory).
        session: "module:Class" of its runtime session.
        converter: the module with ``export``, ``validate``, ``runner``, ``sparse_layers``,
            ``artifact_name``, ``task_files`` and ``check_options``.
        runs_on: platforms (`platform.system()` values) its runtime predicts on; empty: all.
        directory_marker: recognises a directory holding this format (besides the suffix).
        calibrated_dtypes: the dtypes whose export needs calibration data (representative
            inputs, one array per model input name: `convert(calibration=...)`).
        fixed_batch: its export takes a ``batch`` option fixing the inputs' batch dimension
            (`--batch N`: accelerators and mobile execution providers plan static shapes).
    """

    name: str
    title: str
    suffix: str
    artifact: str
    dtypes: tuple[str, ...]
    runtime: str
    runtime_module: str
    session: str
    converter: str
    runs_on: tuple[str, ...] = ()
    directory_marker: Callable[[Path], bool] | None = None
    calibrated_dtypes: tuple[str, ...] = ()
    fixed_batch: bool = False

    def recognises(self, path: Path) -> bool:
        """Whether ``path`` (an existing file or directory) holds this format, by its name or contents."""
        if path.suffix.lower() == self.suffix:
            return True
        return path.is_dir() and self.directory_marker is not None and self.directory_marker(path)

    def runs_here(self) -> bool:
        """Whether this machine's runtime for the format can run predictions."""
        return not self.runs_on or platform.system() in self.runs_on

    def converter_module(self) -> ModuleType:
        """The converter module (imports the format's conversion dependencies)."""
        return importlib.import_module(self.converter)

    def session_class(self) -> type:
        """The runtime session class (imports only the format's runtime)."""
        module, _, name = self.session.partition(":")
        return getattr(importlib.import_module(module), name)


def _holds(pattern: str) -> Callable[[Path], bool]:
    return lambda directory: any(directory.glob(pattern))


FORMATS: dict[str, Format] = {
    format.name: format
    for format in (
        Format(
            name="mann", title="mann-edge bundle", suffix=".mann", artifact="model.mann",
            dtypes=("float32", "float16"), runtime="mann-edge bundle runtime", runtime_module="mann_edge.runtime.kernels",
            session="mann_edge.runtime.bundle:BundleSession", converter="mann_edge.converters.bundle",
            directory_marker=lambda d: (d / "manifest.json").is_file() and (d / "weights.safetensors").exists(),
        ),
        Format(
            name="tflite", title="TFLite", suffix=".tflite", artifact="model.tflite",
            # int8: full-integer (calibrated weights and activations); int8_dynamic: dynamic-range (int8 weights only)
            dtypes=("float32", "float16", "int8", "int8_dynamic"), runtime="LiteRT",
            runtime_module="ai_edge_litert.interpreter", session="mann_edge.runtime.litert:LiteRTSession",
            converter="mann_edge.converters.tflite", calibrated_dtypes=("int8",), fixed_batch=True,
        ),
        Format(
            name="onnx", title="ONNX", suffix=".onnx", artifact="onnx",
            # int8: QDQ static quantization (int8 weights and activations), calibrated
            dtypes=("float32", "float16", "int8"), runtime="onnxruntime", runtime_module="onnxruntime",
            session="mann_edge.runtime.onnx:OnnxSession", converter="mann_edge.converters.onnx",
            directory_marker=_holds("*.onnx"), calibrated_dtypes=("int8",), fixed_batch=True,
        ),
        Format(
            name="ort", title="ORT format", suffix=".ort", artifact="ort",
            dtypes=("float32", "float16", "int8"), runtime="onnxruntime", runtime_module="onnxruntime",
            session="mann_edge.runtime.onnx:OnnxSession", converter="mann_edge.converters.ort",
            directory_marker=_holds("*.ort"), calibrated_dtypes=("int8",), fixed_batch=True,
        ),
        Format(
            name="coreml", title="Core ML", suffix=".mlpackage", artifact="coreml",
            # palettizedN: sparse + N-bit palettized weights; int8_weights: sparse + int8 weights (iOS18/macOS15+)
            dtypes=("float32", "float16", "palettized2", "palettized4", "palettized6", "palettized8", "int8_weights"),
            runtime="Core ML", runtime_module="coremltools",
            session="mann_edge.runtime.coreml:CoreMLSession", converter="mann_edge.converters.coreml",
            runs_on=("Darwin",), directory_marker=_holds("*.mlpackage"),
        ),
    )
}

# What `convert` exports by default: every format but the bundle, which it always writes, and the ORT format
# (ONNX Runtime Mobile's conversion of the ONNX export, asked for by name: `--to ort`).
EXPORT_FORMATS = tuple(name for name in FORMATS if name not in ("mann", "ort"))


def get_format(name: str) -> Format:
    """The format called ``name``, or a MannEdgeError listing the formats there are.

    Example:
        >>> get_format("onnx").suffix
        '.onnx'
    """
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise MannEdgeError(f"Unknown format {name!r}. Formats: {list(FORMATS)}") from None


def detect_format(path: "str | os.PathLike") -> Format:
    """The format ``path`` holds (by its name, or a directory by its contents), or an error saying what was expected.

    Example:
        >>> detect_format("out/onnx").name
        'onnx'
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    for format in FORMATS.values():
        if format.recognises(path):
            return format
    expected = ", ".join(f"{f.title} ({f.suffix}{' or a directory of them' if f.directory_marker else ''})"
                         for f in FORMATS.values())
    raise MannEdgeError(f"Cannot tell the format of {path}: expected one of {expected}")
