"""Opening what users hand us: a `.keras` model, a legacy `.h5`, a `.mann` bundle (or objects of those)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from mann_edge.errors import MannEdgeError
from mann_edge.formats import FORMATS
from mann_edge.graph.model import CompactModel

__all__ = ["load_source", "load_keras_source", "SOURCE_SUFFIXES"]

SOURCE_SUFFIXES = (".keras", ".h5", ".mann")


def load_source(source, task_names: Sequence[str] | None = None, *, strict: bool = False) -> CompactModel:
    """The compact model of ``source``: a path (`.keras`, `.h5`, `.mann`), a Keras model or a CompactModel.

    ``strict``: refuse (instead of warn about) tasks whose masks overlap, when compacting.

    Example:
        >>> cm = load_source("mann_mlp.h5", task_names=["digits", "cancer"])
    """
    if isinstance(source, CompactModel):
        return _renamed(source, task_names)
    if not isinstance(source, (str, os.PathLike)):
        from mann_edge.compaction import compact

        return compact(source, task_names, strict=strict)
    path = Path(source)
    if not path.exists():
        raise MannEdgeError(f"Source {path} does not exist")
    if FORMATS["mann"].recognises(path):
        from mann_edge.bundle import load_compact

        return _renamed(load_compact(path), task_names)
    from mann_edge.compaction import compact
    from mann_edge.files import sha256_file

    model = load_keras_source(path)
    return compact(model, task_names, strict=strict, source=path.name, source_sha256=sha256_file(path))


def load_keras_source(path: "str | os.PathLike"):
    """The Keras model in a `.keras` file or a legacy `.h5` (not compacted), or a MannEdgeError naming the file.

    Example:
        >>> model = load_keras_source("mann_mlp.h5")
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".h5":
        from mann_edge.legacy import load_legacy

        return load_legacy(path)
    if suffix == ".keras":
        return _load_keras(path)
    raise MannEdgeError(f"Source {path}: expected a {', '.join(SOURCE_SUFFIXES)} file")


def _load_keras(path: Path):
    import zipfile

    import keras

    import mann_edge.layers  # noqa: F401  (registers the layer classes)

    if not zipfile.is_zipfile(path):
        raise MannEdgeError(f"{path} is not a .keras archive (truncated or not a Keras 3 model file)")
    try:
        # safe_mode=True: a Lambda layer's bytecode in the file is refused, never run.
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # Keras raises many kinds; report them as one
        raise MannEdgeError(f"Cannot load Keras model {path}: {error}") from None


def _renamed(model: CompactModel, task_names) -> CompactModel:
    if task_names is None:
        return model
    names = list(task_names)
    if len(names) != len(model.tasks) or len(set(names)) != len(names):
        raise MannEdgeError(f"Give {len(model.tasks)} unique task names for {model.task_names}. Received: {names}")
    from dataclasses import replace

    tasks = [replace(task, name=name) for task, name in zip(model.tasks, names)]
    return CompactModel(model.inputs, model.nodes, tasks, model.weights, model.provenance)
