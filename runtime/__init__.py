"""The thin runtime: load an exported model, pick a task, run only that task.

It imports neither TensorFlow nor Keras: numpy, scipy and the format's own
runtime (onnxruntime, ai-edge-litert, Core ML on macOS) only. Which formats
exist and which session opens each is `mann_edge.formats.FORMATS`.

Example:
    >>> from mann_edge import runtime
    >>> sess = runtime.load("out/model.mann")        # or model.tflite, onnx/, coreml/
    >>> sess.tasks[0].inputs
    (TensorSpec(name='digits_in', shape=(None, 64), dtype='float32'),)
    >>> probabilities = sess.run("digits", x)[0]
"""

from __future__ import annotations

import os

from mann_edge.formats import FORMATS
from mann_edge.formats import detect_format as _detect
from mann_edge.runtime.session import Session

__all__ = ["load", "detect_format", "Session", "FORMATS"]


def detect_format(path: "str | os.PathLike") -> str:
    """The name of the format ``path`` holds ('mann', 'tflite', 'onnx', 'coreml'), by its name and contents.

    Example:
        >>> detect_format("out/onnx")
        'onnx'
    """
    return _detect(path).name


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
    return _detect(path).session_class()(path, threads=threads)
