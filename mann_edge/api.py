"""`convert` and `verify`: the Python side of `mann-edge convert` and `mann-edge verify`.

`convert` takes a source (`.keras`, legacy `.h5`, `.mann`, a Keras model or a CompactModel)
to a `.mann` bundle and the requested exports in one output directory, verifies each
artifact against the compact model, and returns where everything is with the figures.

Example:
    >>> result = mann_edge.convert("model.keras", "out", formats=["tflite", "onnx"])
    >>> result.artifacts["onnx"]
    PosixPath('out/onnx')
    >>> print(result.format_table())
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from mann_edge import converters
from mann_edge.converters.validation import ValidationReport, compare, tolerances
from mann_edge.errors import OutputExistsError
from mann_edge.files import check_writable_dir
from mann_edge.graph.model import CompactModel
from mann_edge.sources import load_source

__all__ = ["convert", "verify", "output_paths", "ConvertResult", "DEFAULT_FORMATS", "BUNDLE_NAME"]

DEFAULT_FORMATS = ("tflite", "onnx", "coreml")
BUNDLE_NAME = "model.mann"


@dataclass
class ConvertResult:
    """What `convert` wrote and measured.

    ``artifacts`` maps "mann" and each format to the path `mann_edge.runtime.load` takes;
    ``table`` has one row per task and artifact: task, format, nonzeros, bytes (the file or
    package holding the task), dense_bytes (float32 dense weights of the tasks in that file),
    ratio (bytes / dense_bytes) and max_error (largest verification error, None unverified);
    ``reports`` holds each artifact's ValidationReport, ``seconds`` its export time.
    """

    out_dir: Path
    model: CompactModel
    artifacts: dict[str, Path] = field(default_factory=dict)
    table: list[dict] = field(default_factory=list)
    reports: dict[str, ValidationReport] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def format_table(self) -> str:
        """The table `mann-edge convert` prints."""
        header = f"{'task':<16} {'format':<8} {'nonzeros':>10} {'bytes':>12} {'vs dense':>9} {'max error':>10}"
        lines = [header, "-" * len(header)]
        for row in self.table:
            error = "-" if row["max_error"] is None else f"{row['max_error']:.2e}"
            lines.append(
                f"{row['task']:<16} {row['format']:<8} {row['nonzeros']:>10,} {row['bytes']:>12,} "
                f"{100 * row['ratio']:>8.1f}% {error:>10}"
            )
        return "\n".join(lines)


def artifact_path(out_dir: "str | os.PathLike", format: str, options: Mapping | None = None) -> Path:
    """Where `convert` writes ``format`` inside ``out_dir`` ('mann' for the bundle)."""
    if format == "mann":
        return Path(out_dir) / BUNDLE_NAME
    return Path(out_dir) / converters.artifact_name(format, **dict(options or {}))


def output_paths(out_dir: "str | os.PathLike", formats: Sequence[str], options: Mapping[str, Mapping] | None = None,
                 *, force: bool = False) -> dict[str, Path]:
    """Where `convert` writes the bundle and each format; OutputExistsError if any exists and not ``force``."""
    options = options or {}
    paths = {name: artifact_path(out_dir, name, options.get(name)) for name in ["mann", *formats]}
    existing = [str(path) for path in paths.values() if path.exists()]
    if existing and not force:
        raise OutputExistsError(f"{', '.join(existing)} already exist; pass force=True (--force) to overwrite")
    return paths


def convert(
    source,
    out_dir: "str | os.PathLike",
    *,
    formats: Sequence[str] = DEFAULT_FORMATS,
    tasks: Sequence[str] | None = None,
    task_names: Sequence[str] | None = None,
    dtype: str = "float32",
    force: bool = False,
    verify: bool = True,
    strict: bool = False,
    options: Mapping[str, Mapping] | None = None,
    progress: Callable[[str], None] | None = None,
) -> ConvertResult:
    """Writes ``source`` as a `.mann` bundle and each of ``formats`` into ``out_dir``, verified.

    Args:
        source: a `.keras`, legacy `.h5` or `.mann` path, a Keras model or a CompactModel.
        out_dir: the output directory (made if missing; a file or an unwritable one is refused).
        formats: any of 'tflite', 'onnx', 'coreml'.
        tasks: export only these tasks (names after ``task_names``), in this order.
        task_names: names for the source's tasks, in output order.
        dtype: 'float32' or 'float16' (TFLite also 'int8') for the stored weight values.
        force: overwrite existing outputs (otherwise refused before any work starts).
        verify: run each artifact against the compact model; a mismatch raises ValidationError
            and removes the artifact.
        strict: refuse a source whose tasks' masks overlap (otherwise a MaskOverlapWarning).
        options: extra keyword options per format, e.g. ``{"coreml": {"target": "macOS15"}}``.
        progress: called with one line per step (the command prints them to stderr).

    Example:
        >>> result = convert("model.keras", "out", formats=["tflite"], dtype="float16")
        >>> sess = mann_edge.runtime.load(result.artifacts["tflite"])
    """
    say = progress or (lambda line: None)
    options = {name: dict(value) for name, value in (options or {}).items()}
    formats = list(dict.fromkeys(formats))
    for name in [*formats, *options]:
        converters.get(name)  # unknown formats fail here, before any work
    out_dir = check_writable_dir(out_dir, create=True)
    paths = output_paths(out_dir, formats, options, force=force)

    steps = len(paths) + 1
    say(f"[1/{steps}] loading {source if isinstance(source, (str, os.PathLike)) else type(source).__name__}")
    model = load_source(source, task_names, strict=strict)
    if tasks:
        model = model.select_tasks(tasks)
    result = ConvertResult(out_dir, model)
    for step, (name, path) in enumerate(paths.items(), start=2):
        say(f"[{step}/{steps}] {name}: writing {path}")
        start = time.perf_counter()
        if name == "mann":  # the bundle holds float16 values too; int8 is TFLite's alone
            (model.astype(dtype) if dtype == "float16" else model).save(path, force=force)
        else:
            converters.get(name).export(model, path, dtype=dtype, force=force, **options.get(name, {}))
        result.seconds[name] = time.perf_counter() - start
        result.artifacts[name] = path
        if verify:
            report = verify_artifact(model, path, name)
            result.reports[name] = report
            say(f"    verified {len(model.tasks)} task(s): max error {report.max_abs_error:.2e}"
                + ("" if report.ok else " MISMATCH"))
            if not report.ok:
                _remove(path)
                report.raise_for_errors()
    result.table = _table(model, result)
    return result


def verify(artifact: "str | os.PathLike", against, *, tasks: Sequence[str] | None = None,
           task_names: Sequence[str] | None = None) -> ValidationReport:
    """Runs ``artifact`` (any format `runtime.load` takes) against the compact model of ``against``.

    Example:
        >>> report = verify("out/model.tflite", "model.keras")
        >>> report.ok, report.max_abs_error
        (True, 4.2e-07)
    """
    from mann_edge.runtime import detect_format

    model = load_source(against, task_names)
    return verify_artifact(model, artifact, detect_format(artifact), tasks=tasks)


def verify_artifact(model: CompactModel, path: "str | os.PathLike", format: str, *,
                    tasks: Sequence[str] | None = None) -> ValidationReport:
    """The ValidationReport of the artifact at ``path`` (of ``format``) against ``model``."""
    if tasks:
        missing = [name for name in tasks if name not in model.task_names]
        if missing:
            model.task(missing[0])  # raises TaskError listing the tasks there are
    if format != "mann":
        return converters.get(format).validate(model, path, tasks=tasks)
    from mann_edge.runtime.bundle import BundleSession

    session = BundleSession(path)
    halves = any(np.dtype(weight.dtype) == np.float16 for weight in session.model.weights.values())
    atol, rtol = tolerances("float16" if halves else "float32")
    return compare(model, session.run, format="mann", artifact=str(path), atol=atol, rtol=rtol, tasks=tasks)


def exported_sizes(out_dir: "str | os.PathLike") -> dict[str, int]:
    """Bytes of each format's export that `convert` left in ``out_dir`` (default names), by format."""
    sizes = {}
    for format in DEFAULT_FORMATS:
        names = {converters.artifact_name(format)}
        if format == "coreml":
            names.add(converters.artifact_name(format, target="macOS15"))
        for name in sorted(names):
            path = Path(out_dir) / name
            if path.exists():
                sizes[format] = _bytes(path)
    return sizes


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _table(model: CompactModel, result: ConvertResult) -> list[dict]:
    stats = {row["task"]: row for row in model.task_stats()}
    all_dense = sum(row["dense_bytes"] for row in model.node_stats())
    rows = []
    for task in model.task_names:
        for name, path in result.artifacts.items():
            per_task = _task_files(name, path).get(task)
            size, dense = (_bytes(per_task), stats[task]["dense_bytes"]) if per_task else (_bytes(path), all_dense)
            report = result.reports.get(name)
            errors = [c.max_abs_error for c in report.checks if c.task == task] if report else []
            rows.append({
                "task": task,
                "format": name,
                "nonzeros": stats[task]["nonzeros"],
                "bytes": size,
                "dense_bytes": dense,
                "ratio": size / dense if dense else float("nan"),
                "max_error": max(errors) if errors else None,
            })
    return rows


def _task_files(format: str, path: Path) -> dict[str, Path]:
    """task -> the file holding only that task, for formats that write one per task."""
    if format == "mann":
        return {}
    module = converters.get(format)
    return module.task_files(path) if hasattr(module, "task_files") else {}


def print_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
