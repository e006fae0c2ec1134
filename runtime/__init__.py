"""The thin runtime: load an exported model, pick a task, run only that task.

It imports neither TensorFlow nor Keras: numpy, scipy and the format's own
runtime (onnxruntime, ai-edge-litert, Core ML on macOS) only.

Example:
    >>> from mann_edge import runtime
    >>> sess = runtime.load("out/model.mann")        # or model.tflite, onnx/, coreml/
    >>> sess.tasks[0].inputs
    (TensorSpec(name='digits_in', shape=(None, 64), dtype='float32'),)
    >>> probabilities = sess.run("digits", x)[0]
"""

from __future__ import annotations

import os
from pathlib import Path

from mann_edge.errors import MannEdgeError
from mann_edge.runtime.session import Session

__all__ = ["load", "detect_format", "Session", "FORMATS"]

FORMATS = ("mann", "tflite", "onnx", "coreml")


def detect_format(path: "str | os.PathLike") -> str:
    """Which format ``path`` holds: 'mann', 'tflite', 'onnx' or 'coreml' (by name and contents)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".mann" or (path.is_dir() and (path / "manifest.json").is_file() and (path / "weights.safetensors").exists()):
        return "mann"
    if suffix == ".tflite":
        return "tflite"
    if suffix == ".onnx" or (path.is_dir() and any(path.glob("*.onnx"))):
        return "onnx"
    if suffix == ".mlpackage" or (path.is_dir() and any(path.glob("*.mlpackage"))):
        return "coreml"
    raise MannEdgeError(
        f"Cannot tell the format of {path}: expected a .mann bundle, a .tflite file, an .onnx file or a directory "
        "of them, or a .mlpackage (or a directory of them)"
    )


def load(path: "str | os.PathLike", *, threads: int | None = None) -> Session:
    """Opens a model for inference and returns its Session.

    Args:
        path: a `.mann` bundle, a `.tflite` file, an ONNX export (a directory of per-task
            `.onnx` files, or one `.onnx`), or a Core ML export (`.mlpackage` or a directory of them).
        threads: intra-op threads for the backends that take a setting (None: their default).

    Example:
        >>> sess = load("out/model.tflite")
        >>> sess.run("cancer", x)[0].shape
        (1, 2)
    """
    kind = detect_format(path)
    if kind == "mann":
        from mann_edge.runtime.bundle import BundleSession

        return BundleSession(path, threads=threads)
    if kind == "tflite":
        from mann_edge.runtime.litert import LiteRTSession

        return LiteRTSession(path, threads=threads)
    if kind == "onnx":
        from mann_edge.runtime.onnx import OnnxSession

        return OnnxSession(path, threads=threads)
    from mann_edge.runtime.coreml import CoreMLSession

    return CoreMLSession(path)
