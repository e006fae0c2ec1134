"""The `.mann` bundle as an export: the compact model saved as it is, validated through the bundle runtime.

It has the same entry points as every other format's module, so `mann_edge.convert` and
`mann_edge.api.verify` treat it like the others.

Example:
    >>> from mann_edge.converters import bundle
    >>> path = bundle.export(cm, "out/model.mann", dtype="float16")
    >>> bundle.validate(cm, path).raise_for_errors()
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from mann_edge.converters.options import check_dtype, check_names
from mann_edge.converters.validation import DEFAULT_BATCHES, ValidationReport, compare, tolerances
from mann_edge.formats import FORMATS
from mann_edge.graph.activations import ACTIVATIONS
from mann_edge.graph.model import CompactModel
from mann_edge.runtime.kernels import RUNTIME_OPS

__all__ = ["sparse_layers", "LOWERINGS", "ACTIVATION_LOWERINGS", "FORMAT", "export", "validate", "runner", "artifact_name", "task_files", "check_options"]

FORMAT = "mann"
OWNER = "The .mann bundle"
# The bundle is not lowered: the runtime's ops and the reference activations run it as it is.
LOWERINGS = RUNTIME_OPS
ACTIVATION_LOWERINGS = ACTIVATIONS


def check_options(*, dtype: str = "float32", **options) -> None:
    """ConversionError unless the bundle takes ``dtype`` and ``options`` (it takes no options)."""
    check_names(options, [], owner=OWNER)
    check_dtype(FORMAT, dtype, owner=OWNER)


def artifact_name(**options) -> str:
    """The bundle's name in an output directory."""
    return FORMATS[FORMAT].artifact


def task_files(path: "str | os.PathLike") -> dict[str, Path]:
    """The bundle holds every task in one file: no per-task files."""
    return {}


def export(model: CompactModel, path: "str | os.PathLike", *, dtype: str = "float32", force: bool = False) -> Path:
    """Saves ``model`` as a `.mann` bundle at ``path`` (float16: values stored as float16); returns the path.

    Example:
        >>> export(cm, "out/model.mann")
        PosixPath('out/model.mann')
    """
    check_options(dtype=dtype)
    model = model.astype(dtype) if dtype == "float16" else model
    return Path(model.save(path, force=force))


def sparse_layers(path: "str | os.PathLike") -> tuple[int, int]:
    """(nodes whose kernel the bundle runtime runs as CSR, nodes with a dense, conv2d or embedding weight).

    Example:
        >>> sparse_layers("out/model.mann")
        (10, 10)
    """
    from mann_edge.bundle import load_compact
    from mann_edge.sparse import CSRWeight

    model = load_compact(path)
    nodes = [node for node in model.nodes if node.op in ("dense", "conv2d", "embedding")]
    runs_csr = sum(any(isinstance(model.weights[key], CSRWeight) for key in node.weights.values()) for node in nodes)
    return runs_csr, len(nodes)


def runner(path: "str | os.PathLike") -> Callable[[str, Mapping[str, np.ndarray]], list[np.ndarray]]:
    """A function running one task of the bundle at ``path`` with the bundle runtime.

    Example:
        >>> probabilities = runner("out/model.mann")("digits", {"digits_image": x})[0]
    """
    from mann_edge.runtime.bundle import BundleSession

    return BundleSession(path).run


def validate(model: CompactModel, path: "str | os.PathLike", *, atol: float | None = None, rtol: float | None = None,
             tasks: Sequence[str] | None = None, batches: Sequence[int] = DEFAULT_BATCHES,
             inputs: "Mapping[str, Mapping[str, np.ndarray]] | None" = None) -> ValidationReport:
    """Runs the bundle at ``path`` with the bundle runtime against ``model``, every task (or ``tasks``).

    Default tolerances follow the stored values (float16 values get the float16 tolerance).
    ``inputs``: task -> input arrays to check on instead of random ones.

    Example:
        >>> validate(cm, "out/model.mann").ok
        True
    """
    from mann_edge.runtime.bundle import BundleSession

    session = BundleSession(path)
    halves = any(np.dtype(weight.dtype) == np.float16 for weight in session.model.weights.values())
    default_atol, default_rtol = tolerances("float16" if halves else "float32")
    return compare(model, session.run, format=FORMAT, artifact=str(path),
                   atol=default_atol if atol is None else atol, rtol=default_rtol if rtol is None else rtol,
                   tasks=tasks, batches=batches, inputs=inputs)
