"""`convert` and `verify`: the Python side of `mann-edge convert` and `mann-edge verify`.

`convert` takes a source (`.keras`, legacy `.h5`, `.mann`, a Keras model or a CompactModel)
to a `.mann` bundle and the requested exports in one output directory, verifies each
artifact against the compact model, and returns where everything is with the figures.
Every format comes from `mann_edge.formats.FORMATS`; the bundle is one of them.

Example:
    >>> result = mann_edge.convert("model.keras", "out", formats=["tflite", "onnx"])
    >>> result.artifacts["onnx"]
    PosixPath('out/onnx')
    >>> print(result.format_table())
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from mann_edge import interrupts
from mann_edge.converters.validation import ValidationReport
from mann_edge.errors import ConversionError, MannEdgeError, OutputExistsError
from mann_edge.files import check_writable_dir, size_of, staged_output
from mann_edge.formats import EXPORT_FORMATS, FORMATS, detect_format, get_format
from mann_edge.graph.model import CompactModel
from mann_edge.sources import load_source

__all__ = ["convert", "verify", "output_paths", "exported_sizes", "ConvertResult", "DEFAULT_FORMATS", "BUNDLE"]

DEFAULT_FORMATS = EXPORT_FORMATS
BUNDLE = "mann"  # `convert` always writes the bundle: the reference every export is verified against


@dataclass
class ConvertResult:
    """What `convert` wrote and measured.

    ``artifacts`` maps "mann" and each format to the path `mann_edge.runtime.load` takes.
    ``table`` has one row per task and format: task, format, nonzeros, bytes (the task's own
    file, or its share of a file that holds several tasks: a weight's bytes split evenly
    among the tasks that read it), dense_bytes (float32 dense weights of the task, shared
    ones split the same way where the file is shared), ratio (bytes / dense_bytes),
    shared (whether ``bytes`` is a share of a multi-task file) and max_error (largest
    verification error, None unverified). ``files`` has one row per format: the whole
    artifact's bytes and dense_bytes. ``reports`` holds each artifact's ValidationReport,
    ``seconds`` its export time.
    """

    out_dir: Path
    model: CompactModel
    artifacts: dict[str, Path] = field(default_factory=dict)
    table: list[dict] = field(default_factory=list)
    files: list[dict] = field(default_factory=list)
    reports: dict[str, ValidationReport] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def format_table(self) -> str:
        """The tables `mann-edge convert` prints: per task and format, then per file.

        A row whose ``pays`` is False (the task's bytes in that format are not below its dense
        float32 bytes: its sparsity is too low to pay for the sparse encoding and the file's
        overhead) is marked ``!`` and the task named below the table with what to do.
        """
        header = f"{'task':<16} {'format':<8} {'nonzeros':>10} {'bytes':>12} {'vs dense':>9} {'max error':>10}"
        lines = [header, "-" * len(header)]
        for row in self.table:
            error = "-" if row["max_error"] is None else f"{row['max_error']:.2e}"
            share = "*" if row["shared"] else " "
            flag = "" if row.get("pays", True) else "  !"
            lines.append(
                f"{row['task']:<16} {row['format']:<8} {row['nonzeros']:>10,} {row['bytes']:>11,}{share} "
                f"{100 * row['ratio']:>8.1f}% {error:>10}{flag}"
            )
        if any(row["shared"] for row in self.table):
            lines.append("* the task's share of a file holding every task (each weight split among the tasks reading it)")
        unpaid = [row for row in self.table if not row.get("pays", True)]
        for task in dict.fromkeys(row["task"] for row in unpaid):
            rows = [row for row in unpaid if row["task"] == task]
            lines.append(f"! {task}: its sparsity is too low to pay in {', '.join(r['format'] for r in rows)} "
                         f"(density {100 * rows[0]['density']:.0f} %; file overhead included, no smaller than its "
                         "dense float32 weights). Prune it further (see its RSN2 summary), or keep it dense")
        lines += ["", f"{'file':<34} {'bytes':>12} {'vs dense':>9}", "-" * 57]
        for row in self.files:
            lines.append(f"{row['file']:<34} {row['bytes']:>12,} {100 * row['ratio']:>8.1f}%")
        return "\n".join(lines)


def artifact_path(out_dir: "str | os.PathLike", format: str, options: Mapping | None = None) -> Path:
    """Where `convert` writes ``format`` (a name in `FORMATS`) inside ``out_dir``."""
    return Path(out_dir) / get_format(format).converter_module().artifact_name(**dict(options or {}))


def output_paths(out_dir: "str | os.PathLike", formats: Sequence[str], options: Mapping[str, Mapping] | None = None,
                 *, force: bool = False) -> dict[str, Path]:
    """Where `convert` writes the bundle and each format; OutputExistsError if any exists and not ``force``."""
    options = options or {}
    paths = {name: artifact_path(out_dir, name, options.get(name)) for name in dict.fromkeys([BUNDLE, *formats])}
    existing = [str(path) for path in paths.values() if path.exists()]
    if existing and not force:
        raise OutputExistsError(f"{', '.join(existing)} already exist; pass force=True (--force) to overwrite")
    return paths


def check_options(formats: Sequence[str], dtype: str, options: Mapping[str, Mapping]) -> None:
    """ConversionError naming every requested format that cannot take ``dtype`` or its options; nothing is written.

    The bundle is the exception for dtype: it keeps float32 values when ``dtype`` is one it
    cannot store (int8 is TFLite's alone), since every export is verified against it.
    """
    problems = []
    for name in formats:
        try:
            get_format(name).converter_module().check_options(dtype=_format_dtype(name, dtype), **options.get(name, {}))
        except ConversionError as error:
            problems.append(str(error))
    unused = sorted(set(options) - set(formats))
    if unused:
        problems.append(f"options were given for {unused}, which are not among the formats asked for {list(formats)}")
    if problems:
        takes = {name: FORMATS[name].dtypes for name in formats if name != BUNDLE}
        raise ConversionError("; ".join(problems) + f" (dtypes each format takes: {takes})")


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

    Every option is checked against every format, and the source and ``tasks`` are read,
    before anything is written; when a step fails, what this call wrote is removed.

    Args:
        source: a `.keras`, legacy `.h5` or `.mann` path, a Keras model or a CompactModel.
        out_dir: the output directory (made if missing; a file or an unwritable one is refused).
        formats: names in `mann_edge.formats.FORMATS` ('tflite', 'onnx', 'coreml'; the bundle is always written).
        tasks: export only these tasks (names after ``task_names``), in this order.
        task_names: names for the source's tasks, in output order.
        dtype: 'float32' or 'float16' (TFLite also 'int8') for the stored weight values.
        force: overwrite existing outputs (otherwise refused before any work starts).
        verify: run each artifact against the compact model; a mismatch raises ValidationError.
        strict: refuse a source whose tasks' kernel masks overlap (otherwise a MaskOverlapWarning).
        options: extra keyword options per format, e.g. ``{"coreml": {"target": "macOS15"}}``.
        progress: called with one line per step (the command prints them to stderr).

    Example:
        >>> result = convert("model.keras", "out", formats=["tflite"], dtype="float16")
        >>> sess = mann_edge.runtime.load(result.artifacts["tflite"])
    """
    say = progress or (lambda line: None)
    options = {name: dict(value) for name, value in (options or {}).items()}
    formats = list(dict.fromkeys([BUNDLE, *formats]))
    check_options(formats, dtype, options)
    if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir).strip():
        # Path("") is the current directory: an empty value is a mistake, not a choice of directory
        raise ConversionError(f"out_dir must name a directory. Received: {out_dir!r}")
    out_dir = Path(out_dir)
    if out_dir.exists():
        check_writable_dir(out_dir)
    paths = output_paths(out_dir, formats, options, force=force)

    steps = len(paths) + 1
    say(f"[1/{steps}] loading {source if isinstance(source, (str, os.PathLike)) else type(source).__name__}")
    with interrupts.honoured():
        model = load_source(source, task_names, strict=strict)
        if tasks:
            model = model.select_tasks(tasks)
        interrupts.check()
        made_dir = not out_dir.exists()
        check_writable_dir(out_dir, create=True)
        result = ConvertResult(out_dir, model)
        try:
            for step, (name, path) in enumerate(paths.items(), start=2):
                say(f"[{step}/{steps}] {name}: writing {path}")
                _export_verified(model, name, path, result, dtype=dtype, force=force, verify=verify,
                                 options=options.get(name, {}), say=say)
        except BaseException:
            for path in result.artifacts.values():
                _remove(path)
            if made_dir:
                shutil.rmtree(out_dir, ignore_errors=True)
            raise
    result.table, result.files = _tables(model, result)
    return result


def _export_verified(model: CompactModel, name: str, path: Path, result: ConvertResult, *, dtype: str, force: bool,
                     verify: bool, options: Mapping, say: Callable[[str], None]) -> None:
    """Exports ``model`` as format ``name`` to a staging path beside ``path``, verifies what is there, then renames it.

    So a file under its final name has always passed verification: a failure or an interrupt
    (at any point, even one a library swallowed: `mann_edge.interrupts`) leaves only the
    staging path, which is removed.
    """
    module = get_format(name).converter_module()
    with staged_output(path, force=force) as staging:
        start = time.perf_counter()
        module.export(model, staging, dtype=_format_dtype(name, dtype), **options)
        result.seconds[name] = time.perf_counter() - start
        interrupts.check()
        if verify:
            try:
                report = module.validate(model, staging)
            except MannEdgeError as error:  # name the artifact as the caller knows it, not the staging path
                raise type(error)(str(error).replace(str(staging), str(path))) from None
            report.artifact = str(path)
            result.reports[name] = report
            say(f"    verified {len(model.tasks)} task(s): max error {report.max_abs_error:.2e}"
                + ("" if report.ok else " MISMATCH"))
            report.raise_for_errors()
        interrupts.check()
        # renamed when the block ends; from here the artifact is this call's to remove on a later failure
        result.artifacts[name] = path


def verify(artifact: "str | os.PathLike", against, *, tasks: Sequence[str] | None = None,
           task_names: Sequence[str] | None = None) -> ValidationReport:
    """Runs ``artifact`` (any format `runtime.load` takes) against the compact model of ``against``.

    Every task of ``against`` (or ``tasks``) is checked; one the artifact lacks fails the report.

    Example:
        >>> report = verify("out/model.tflite", "model.keras")
        >>> report.ok, report.max_abs_error
        (True, 4.2e-07)
    """
    format = detect_format(artifact)
    model = load_source(against, task_names)
    for name in tasks or ():
        model.task(name)  # an unknown task raises TaskError listing the tasks there are
    return format.converter_module().validate(model, artifact, tasks=tasks)


def _format_dtype(name: str, dtype: str) -> str:
    """The dtype format ``name`` is written with: ``dtype``, except the bundle keeps float32 where it cannot store it."""
    return "float32" if name == BUNDLE and dtype not in FORMATS[BUNDLE].dtypes else dtype


def exported_sizes(out_dir: "str | os.PathLike") -> dict[str, int]:
    """Bytes of each export `convert` left in ``out_dir``, by format (the first artifact of each, by name)."""
    sizes = {}
    for path in sorted(Path(out_dir).iterdir()) if Path(out_dir).is_dir() else []:
        name = _format_of(path)
        if name not in (None, BUNDLE) and name not in sizes:
            sizes[name] = size_of(path)
    return sizes


def _format_of(path: Path) -> str | None:
    try:
        return detect_format(path).name
    except Exception:  # anything that is not an export of a known format
        return None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _task_shares(model: CompactModel) -> dict[str, dict[str, float]]:
    """task -> {"bytes": its share of the stored weight bytes, "dense_bytes": of the float32 dense bytes}.

    A weight read by several tasks is split evenly among them, so the shares add up to the
    whole model and a file holding every task can be divided by them.
    """
    readers: dict[str, int] = {}
    for task in model.task_names:
        for node in model.task_nodes(task):
            readers[node.name] = readers.get(node.name, 0) + 1
    by_node = {row["node"]: row for row in model.node_stats()}
    shares = {}
    for task in model.task_names:
        nodes = [node.name for node in model.task_nodes(task)]
        shares[task] = {key: sum(by_node[n][key] / readers[n] for n in nodes) for key in ("bytes", "dense_bytes")}
    return shares


def _tables(model: CompactModel, result: ConvertResult) -> tuple[list[dict], list[dict]]:
    stats = {row["task"]: row for row in model.task_stats()}
    shares = _task_shares(model)
    stored_total = sum(share["bytes"] for share in shares.values()) or 1.0
    dense_total = sum(row["dense_bytes"] for row in model.node_stats())
    rows, files = [], []
    for name, path in result.artifacts.items():
        own_files = get_format(name).converter_module().task_files(path)
        total = size_of(path)
        files.append({"format": name, "file": str(path.relative_to(result.out_dir)), "bytes": total,
                      "dense_bytes": dense_total, "ratio": total / dense_total if dense_total else float("nan")})
        report = result.reports.get(name)
        for task in model.task_names:
            if task in own_files:
                size, dense = size_of(own_files[task]), stats[task]["dense_bytes"]
            else:  # a file of every task: the task's share of it
                size, dense = round(total * shares[task]["bytes"] / stored_total), shares[task]["dense_bytes"]
            errors = [c.max_abs_error for c in report.checks if c.task == task] if report else []
            rows.append({
                "task": task,
                "format": name,
                "nonzeros": stats[task]["nonzeros"],
                "bytes": size,
                "dense_bytes": dense,
                "ratio": size / dense if dense else float("nan"),
                "shared": task not in own_files,
                "max_error": max(errors) if errors else None,
                # Sparsity pays when the task's stored bytes are below its dense float32 bytes.
                "pays": bool(dense) and size < dense,
                "density": stats[task]["density"],
            })
    rows.sort(key=lambda row: model.task_names.index(row["task"]))
    return rows, files


def print_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
