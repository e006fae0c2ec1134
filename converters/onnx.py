"""ONNX export: a directory with one ``.onnx`` graph per task, run by onnxruntime.

Why one file per task: onnxruntime runs every node of a graph whatever output is asked
for, so a graph holding several tasks would compute them all. ``export(model, out_dir)``
writes ``out_dir/<task>.onnx`` (file names sanitized). Each file's ``metadata_props``
hold the true task name, the dtype and the manifest of that task alone (its inputs,
nodes and weights, with the export's task list in its provenance: see
`mann_edge.converters.metadata`), so a file's metadata grows with its task, not with the
model; `mann_edge.runtime.onnx` rebuilds the export's tasks from its files.

Each task's graph is built by `mann_edge.converters.onnx_lowering` (one lowering per op,
weights as bitmask + nonzero values expanded at load); this module writes, names and
checks the files.

Example:
    >>> from mann_edge.converters import onnx as onnx_export
    >>> path = onnx_export.export(cm, "out/onnx")
    >>> sorted(p.name for p in path.iterdir())
    ['cancer.onnx', 'digits.onnx']
    >>> onnx_export.validate(cm, path).raise_for_errors()
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from mann_edge.converters.metadata import manifest_text, task_manifest_text
from mann_edge.converters.onnx_lowering import ACTIVATION_LOWERINGS, LOWERINGS, OWNER, build_task_model, check_lowerings
from mann_edge.converters.options import check_bool, check_dtype, check_names
from mann_edge.converters.validation import DEFAULT_BATCHES, ValidationReport, compare, tolerances
from mann_edge.errors import ConversionError
from mann_edge.files import atomic_output, file_stems
from mann_edge.formats import FORMATS, METADATA_DTYPE, METADATA_MANIFEST, METADATA_TASK
from mann_edge.graph.model import CompactModel
from mann_edge.runtime.onnx import SUFFIX, OnnxSession

__all__ = [
    "LOWERINGS",
    "ACTIVATION_LOWERINGS",
    "FORMAT",
    "check_options",
    "export",
    "validate",
    "file_names",
    "artifact_name",
    "task_files",
]

FORMAT = "onnx"


def check_options(*, dtype: str = "float32", **options) -> None:
    """ConversionError for a ``dtype`` or an `export` option the ONNX export would refuse; writes nothing.

    Options: ``sparse`` (a bool). ``force`` is not an option: it says what to do with the output path.

    Example:
        >>> check_options(dtype="int8")
        Traceback (most recent call last):
        ConversionError: ONNX export takes dtype 'float32' or 'float16'. Received: 'int8'
    """
    check_names(options, ["sparse"], owner=OWNER)
    check_dtype(FORMAT, dtype, owner=OWNER)
    check_bool("sparse", options.get("sparse", True), owner=OWNER)


def file_names(task_names: Sequence[str]) -> dict[str, str]:
    """Task name -> its file name in an export (`mann_edge.files.file_stems` + '.onnx').

    Example:
        >>> file_names(["digits", "a/b", "A/B"])
        {'digits': 'digits.onnx', 'a/b': 'a_b.onnx', 'A/B': 'A_B_2.onnx'}
    """
    return {name: stem + SUFFIX for name, stem in file_stems(task_names).items()}


def artifact_name(**export_options) -> str:
    """The directory name an ONNX export gets inside an output directory.

    Example:
        >>> artifact_name(sparse=False)
        'onnx'
    """
    return FORMATS[FORMAT].artifact


def task_files(path: "str | os.PathLike") -> dict[str, Path]:
    """task -> the ``.onnx`` file holding it.

    Example:
        >>> task_files("out/onnx")["digits"].name
        'digits.onnx'
    """
    return dict(OnnxSession(path).files)


def export(
    model: CompactModel,
    path: "str | os.PathLike",
    *,
    dtype: str = "float32",
    sparse: bool = True,
    force: bool = False,
) -> Path:
    """Writes ``model`` as a directory of per-task ``.onnx`` files at ``path`` (atomically); returns ``path``.

    Args:
        model: the compact model; every task becomes one graph in its own file.
        path: the output directory (an existing one is refused unless ``force``).
        dtype: 'float32', or 'float16' to store the weights as float16 (computing in float32).
        sparse: store weights with zeros as bitmask + nonzero values (False: all dense).
        force: replace an existing ``path``.

    Raises:
        ConversionError: an op without a lowering, a bad option, or a graph the ONNX checker rejects.
        OutputExistsError: ``path`` exists and ``force`` is False.

    Example:
        >>> export(cm, "out/onnx", dtype="float16")
        PosixPath('out/onnx')
    """
    import onnx

    check_options(dtype=dtype, sparse=sparse)
    check_lowerings(model)
    path = Path(path)
    whole = manifest_text(model)
    with atomic_output(path, force=force, directory=True) as tmp:
        for task, file_name in file_names(model.task_names).items():
            metadata = {METADATA_MANIFEST: task_manifest_text(model, task, whole=whole), METADATA_TASK: task,
                        METADATA_DTYPE: dtype}
            proto = build_task_model(model, task, dtype=dtype, sparse=sparse, metadata=metadata)
            try:
                onnx.checker.check_model(proto, full_check=True)
                data = proto.SerializeToString()
            except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as error:
                raise ConversionError(f"ONNX export of task {task!r}: the ONNX checker rejects the graph: {error}") from None
            (tmp / file_name).write_bytes(data)
    return path


def validate(
    model: CompactModel,
    path: "str | os.PathLike",
    *,
    atol: float | None = None,
    rtol: float | None = None,
    tasks: Sequence[str] | None = None,
    batches: Sequence[int] = DEFAULT_BATCHES,
) -> ValidationReport:
    """Runs the export at ``path`` through onnxruntime on sample inputs (batch 1 and 8) and compares it with ``model``.

    Default tolerances follow the dtype the files were exported with. Every task of
    ``model`` (or ``tasks``) is checked: one the export lacks fails the report, so a
    single ``.onnx`` file is checked against a model of its one task (``tasks=[...]``).

    Example:
        >>> report = validate(cm, "out/onnx")
        >>> report.raise_for_errors().max_abs_error < 1e-5
        True
    """
    session = OnnxSession(path)
    dtype = "float16" if "float16" in session.dtypes.values() else "float32"
    default_atol, default_rtol = tolerances(dtype)
    return compare(
        model,
        session.run,
        format=FORMAT,
        artifact=str(path),
        atol=default_atol if atol is None else atol,
        rtol=default_rtol if rtol is None else rtol,
        tasks=tasks,
        batches=batches,
    )
