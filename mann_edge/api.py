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
import platform
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from mann_edge import interrupts
from mann_edge.converters.options import Arrays, read_arrays, task_arrays
from mann_edge.converters.validation import METRICS, ValidationReport, evaluate, scaled_atol
from mann_edge.errors import (
    ConversionError,
    FormatCannotExpressError,
    InputError,
    MannEdgeError,
    OutputExistsError,
    SkippedFormatWarning,
)
from mann_edge.files import check_writable_dir, size_of, staged_output
from mann_edge.formats import EXPORT_FORMATS, FORMATS, detect_format, get_format
from mann_edge.graph.model import CompactModel
from mann_edge.sources import load_source

__all__ = [
    "convert",
    "verify",
    "output_paths",
    "exported_sizes",
    "measure_export",
    "ConvertResult",
    "DEFAULT_FORMATS",
    "BUNDLE",
    "STORAGES",
]

DEFAULT_FORMATS = EXPORT_FORMATS
BUNDLE = "mann"  # `convert` always writes the bundle: the reference every export is verified against
# How exports store sparse weights: each format's sparse encoding, dense, or whichever runs at least as fast as dense.
STORAGES = ("sparse", "dense", "auto")
# `storage="auto"`: the sparse form is kept when it is smaller and its latency and peak memory are within this
# share of the dense form's (medians of a shared machine move by a few percent between runs), plus a floor
# below which a difference is timer or allocator noise.
STORAGE_MARGIN = 0.05
LATENCY_FLOOR_MS = 0.005
MEMORY_FLOOR_BYTES = 2**20
# Timed runs per task when measuring an export (batch 1, one thread), after 5 warm-up runs.
MEASURE_REPEATS = 50


@dataclass
class ConvertResult:
    """What `convert` wrote and measured.

    ``artifacts`` maps "mann" and each format to the path `mann_edge.runtime.load` takes.
    ``table`` has one row per task and format: task, format, nonzeros, bytes (the task's own
    file, or its share of a file that holds several tasks: a weight's bytes split evenly
    among the tasks that read it), dense_bytes (float32 dense weights of the task, shared
    ones split the same way where the file is shared), ratio (bytes / dense_bytes),
    shared (whether ``bytes`` is a share of a multi-task file) and max_error (largest
    verification error, None unverified); with evaluation data, also metric (its name),
    score (the export's, None for a task without labels) and float32_score (the compact
    model's, in float32: the figure a compressed export is judged against). ``files`` has
    one row per format: the whole artifact's bytes and dense_bytes. ``reports`` holds each
    artifact's ValidationReport, ``seconds`` its export time, ``scores`` format -> task ->
    the ``metric`` ("float32": the compact model's). ``storage`` holds, per format, what ``storage="auto"``
    measured and chose (`measure_export` figures of both forms, and the reason). ``skipped`` maps
    each format that cannot express the model to why (nothing of it is written).
    """

    out_dir: Path
    model: CompactModel
    artifacts: dict[str, Path] = field(default_factory=dict)
    table: list[dict] = field(default_factory=list)
    files: list[dict] = field(default_factory=list)
    reports: dict[str, ValidationReport] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    metric: str = "accuracy"
    storage: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def format_table(self) -> str:
        """The tables `mann-edge convert` prints: per task and format, then per file.

        A row whose ``pays`` is False (the task's bytes in that format are not below its dense
        float32 bytes: its sparsity is too low to pay for the sparse encoding and the file's
        overhead) is marked ``!`` and the task named below the table with what to do.
        """
        evaluated = bool(self.scores)
        header = f"{'task':<16} {'format':<8} {'dtype':<12} {'nonzeros':>10} {'bytes':>12} {'vs dense':>9} {'max error':>10}"
        header += f" {self.metric:>9} {'float32':>8}" if evaluated else ""
        lines = [header, "-" * len(header)]
        for row in self.table:
            error = "-" if row["max_error"] is None else f"{row['max_error']:.2e}"
            share = "*" if row["shared"] else " "
            flag = "" if row.get("pays", True) else "  !"
            scores = ""
            if evaluated:
                scores = " ".join(f"{_score_text(value, self.metric):>{width}}"
                                  for value, width in ((row["score"], 9), (row["float32_score"], 8)))
                scores = " " + scores
            lines.append(
                f"{row['task']:<16} {row['format']:<8} {row['dtype']:<12} {row['nonzeros']:>10,} {row['bytes']:>11,}"
                f"{share} {100 * row['ratio']:>8.1f}% {error:>10}{scores}{flag}"
            )
        if any(row["shared"] for row in self.table):
            lines.append("* the task's share of a file holding every task (each weight split among the tasks reading it)")
        unpaid = [row for row in self.table if not row.get("pays", True)]
        for task in dict.fromkeys(row["task"] for row in unpaid):
            rows = [row for row in unpaid if row["task"] == task]
            lines.append(f"! {task}: its sparsity is too low to pay in {', '.join(r['format'] for r in rows)} "
                         f"(density {100 * rows[0]['density']:.0f} %; file overhead included, no smaller than its "
                         "dense float32 weights). Prune it further (see its RSN2 summary), or keep it dense")
        lines += ["", f"{'file':<34} {'bytes':>12} {'vs dense':>9} {'runs sparse':>12}", "-" * 70]
        for row in self.files:
            layers = row.get("sparse_layers")
            runs = "?" if layers is None else f"{layers[0]}/{layers[1]} layers"
            lines.append(f"{row['file']:<34} {row['bytes']:>12,} {100 * row['ratio']:>8.1f}% {runs:>12}")
        if any(layers is None for layers in (row.get("sparse_layers") for row in self.files)):
            lines.append("? the runtime decides (Core ML: per compute unit)")
        for name, record in self.storage.items():
            lines.append(f"storage {name}: {record['chosen']} ({record['why']})")
        for name, why in self.skipped.items():
            lines.append(f"not written: {get_format(name).title}: {why}")
        return "\n".join(lines)


def _score_text(value: float | None, metric: str) -> str:
    """A score as the table shows it: accuracy in percent, other metrics as numbers."""
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if metric == "accuracy" else f"{value:.4g}"


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
    cannot store (the int8 dtypes), since every export is verified against it. Calibration
    data reaches the formats whose dtype calibrates among their options (see `convert`).
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
    calibration: "str | os.PathLike | Mapping | None" = None,
    evaluation: "str | os.PathLike | Mapping | None" = None,
    metric: str = "accuracy",
    storage: str | None = None,
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
        dtype: 'float32' or 'float16' for the stored weight values; TFLite also 'int8'
            (full-integer, needs ``calibration``) and 'int8_dynamic' (int8 weights only).
        force: overwrite existing outputs (otherwise refused before any work starts).
        verify: run each artifact against the compact model; a mismatch raises ValidationError.
        strict: refuse a source whose tasks' kernel masks overlap (otherwise a MaskOverlapWarning).
        options: extra keyword options per format, e.g. ``{"coreml": {"target": "macOS15"}}``.
        calibration: representative inputs for the quantized dtypes: an ``.npz`` path or a
            mapping with one array per model input name, batch first. Given to every requested
            format whose dtype calibrates on it (`Format.calibrated_dtypes`: TFLite 'int8'), and
            every lossy export (int8, palettized) is verified on it rather than on random
            inputs (the range its values were quantized for).
        evaluation: labelled data (an ``.npz`` path or a mapping): one array per model input
            name and, per task, its labels under the name of its first output (class ids or
            one-hot rows; targets for 'mae'). Each export's ``metric`` per task is measured next
            to the compact model's float32 one (``result.scores``, the table's last columns).
        metric: what ``evaluation`` measures, a name in
            `mann_edge.converters.validation.METRICS`: 'accuracy' (default) or 'mae'.
        storage: how the exports store sparse weights: 'sparse' (each format's sparse
            encoding; the default), 'dense', or 'auto': each format whose runtime runs here is
            exported both ways and measured (`measure_export`: batch 1, one thread, latency
            per task and peak memory); the sparse form is kept when it is smaller and within
            `STORAGE_MARGIN` of dense on both, else the dense one (``result.storage`` says why).
            Sets each format's ``sparse`` option, so the two are not given together.
        progress: called with one line per step (the command prints them to stderr).

    Example:
        >>> result = convert("model.keras", "out", formats=["tflite"], dtype="float16")
        >>> sess = mann_edge.runtime.load(result.artifacts["tflite"])
    """
    say = progress or (lambda line: None)
    options = {name: dict(value) for name, value in (options or {}).items()}
    formats = list(dict.fromkeys([BUNDLE, *formats]))
    if calibration is not None:
        calibration = read_arrays(calibration, what="calibration data")
        calibrated = [name for name in formats if name in FORMATS and dtype in FORMATS[name].calibrated_dtypes]
        if not any(scaled_atol(_format_dtype(name, dtype)) for name in formats):
            takes = {name: list(FORMATS[name].calibrated_dtypes) for name in FORMATS if FORMATS[name].calibrated_dtypes}
            raise ConversionError(f"calibration data is read only by quantized dtypes: to calibrate ({takes}) and to "
                                  f"verify the lossy ones (int8, palettized) on representative inputs. "
                                  f"Received: dtype={dtype!r}, formats={formats}")
        for name in calibrated:
            options.setdefault(name, {})["calibration"] = calibration
    evaluation = None if evaluation is None else read_arrays(evaluation, what="evaluation data")
    if metric not in METRICS:
        raise ConversionError(f"metric must be one of {sorted(METRICS)}. Received: {metric!r}")
    if storage is not None:
        if storage not in STORAGES:
            raise ConversionError(f"storage must be one of {list(STORAGES)}. Received: {storage!r}")
        clashing = [name for name in formats if "sparse" in options.get(name, {})]
        if clashing:
            raise ConversionError(f"storage={storage!r} sets the `sparse` option of every format; it was also given "
                                  f"for {clashing}. Give one of the two")
        for name in formats:
            if name != BUNDLE:  # the bundle is CSR by design: its runtime runs it sparse
                options.setdefault(name, {})["sparse"] = storage != "dense"
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
        if calibration is not None:  # checked against the model's inputs before anything is written
            for task in model.task_names:
                task_arrays(model, task, calibration, what="calibration data")
        eval_sets = None if evaluation is None else _evaluation_sets(model, evaluation)
        interrupts.check()
        made_dir = not out_dir.exists()
        check_writable_dir(out_dir, create=True)
        result = ConvertResult(out_dir, model)
        try:
            for step, (name, path) in enumerate(paths.items(), start=2):
                say(f"[{step}/{steps}] {name}: writing {path}")
                # a lossy export is verified on the calibration inputs when given: random ones can lie far
                # outside the range its values were quantized for, where quantized outputs drift
                verify_on = {task: task_arrays(model, task, calibration, what="calibration data")
                             for task in model.task_names} \
                    if calibration is not None and scaled_atol(_format_dtype(name, dtype)) else None
                try:
                    _export_verified(model, name, path, result, dtype=dtype, force=force, verify=verify,
                                     options=options.get(name, {}), say=say,
                                     auto=storage == "auto" and name != BUNDLE, verify_on=verify_on)
                except FormatCannotExpressError as error:
                    # a layer this format cannot hold: the other formats are still written
                    if name == BUNDLE or len(result.skipped) + 1 == len(paths) - 1:
                        raise  # the bundle, or the last export format asked for: nothing useful is left
                    result.skipped[name] = str(error)
                    warnings.warn(f"{get_format(name).title} not written: {error}", SkippedFormatWarning, stacklevel=2)
        except BaseException:
            for path in result.artifacts.values():
                _remove(path)
            if made_dir:
                shutil.rmtree(out_dir, ignore_errors=True)
            raise
    if eval_sets is not None:
        say(f"evaluating {metric} per task")
        result.metric = metric
        result.scores = _scores(model, result, eval_sets, metric)
    result.table, result.files = _tables(model, result, dtype)
    return result


def _evaluation_sets(model: CompactModel, arrays: Arrays) -> dict[str, tuple[Arrays, np.ndarray]]:
    """task -> (its inputs, its labels) from evaluation data; tasks without labels are left out (none: an error).

    Labels sit under the name of the task's first output.
    """
    sets = {}
    for task in model.tasks:
        label_name = task.outputs[0].name
        if label_name in arrays:
            inputs = task_arrays(model, task.name, arrays, what="evaluation data")
            labels = arrays[label_name]
            count = len(next(iter(inputs.values())))
            if len(labels) != count:
                raise InputError(f"evaluation data labels '{label_name}' of task {task.name!r} hold {len(labels)} "
                                 f"examples; its inputs hold {count}")
            sets[task.name] = (inputs, labels)
    if not sets:
        wanted = {task.name: task.outputs[0].name for task in model.tasks}
        raise InputError(f"evaluation data has labels for no task: expected an array named after a task's first "
                         f"output ({wanted}) beside the inputs. Received: {sorted(arrays)}")
    return sets


def _scores(model: CompactModel, result: ConvertResult, sets, metric: str) -> dict[str, dict[str, float]]:
    """format -> task -> ``metric`` of each artifact of ``result``, and "float32" -> the compact model's own."""
    runners = {"float32": model.run}
    for name, path in result.artifacts.items():
        runners[name] = get_format(name).converter_module().runner(path)
    return {name: {task: evaluate(run, model, task, inputs, labels, metric=metric)
                   for task, (inputs, labels) in sets.items()}
            for name, run in runners.items()}


def _export_verified(model: CompactModel, name: str, path: Path, result: ConvertResult, *, dtype: str, force: bool,
                     verify: bool, options: Mapping, say: Callable[[str], None], auto: bool = False,
                     verify_on: Mapping[str, Arrays] | None = None) -> None:
    """Exports ``model`` as format ``name`` to a staging path beside ``path``, verifies what is there, then renames it.

    So a file under its final name has always passed verification: a failure or an interrupt
    (at any point, even one a library swallowed: `mann_edge.interrupts`) leaves only the
    staging path, which is removed. ``auto``: also export the dense form beside it, measure
    both and keep the one `_choose_storage` picks. ``verify_on``: task -> inputs to verify on
    instead of random ones.
    """
    module = get_format(name).converter_module()
    with staged_output(path, force=force) as staging:
        start = time.perf_counter()
        caught = _export_catching_warnings(module, model, staging, dtype=_format_dtype(name, dtype), options=options)
        result.seconds[name] = time.perf_counter() - start
        interrupts.check()
        if auto:
            dense = staging.parent / "dense" / staging.name
            dense.parent.mkdir()
            dense_warnings = _export_catching_warnings(module, model, dense, dtype=_format_dtype(name, dtype),
                                                       options={**options, "sparse": False})
            if _choose_storage(name, staging, dense, result, say, batch=options.get("batch") or 1) == "dense":
                _remove(staging)
                shutil.move(str(dense), str(staging))
                caught = dense_warnings
        for warning in caught:  # re-issued naming the artifact as the caller knows it, not the staging path
            warnings.warn(str(warning.message).replace(str(staging), str(path)), warning.category, stacklevel=2)
        if verify:
            checked_on = {} if verify_on is None else {"inputs": verify_on}
            try:
                report = module.validate(model, staging, **checked_on)
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


def _export_catching_warnings(module, model: CompactModel, path: Path, *, dtype: str, options: Mapping) -> list:
    """Exports with ``module``; returns the warnings it gave (the caller re-issues the kept export's)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module.export(model, path, dtype=dtype, **options)
    return list(caught)


def _choose_storage(name: str, sparse: Path, dense: Path, result: ConvertResult, say: Callable[[str], None], *,
                    batch: int = 1) -> str:
    """'sparse' or 'dense' for format ``name``, measured: the sparse export is kept when it is smaller and within
    `STORAGE_MARGIN` of the dense one's latency (every task) and peak memory. Records the figures in ``result``.
    ``batch``: the batch measured at (1, or the export's fixed batch)."""
    format = get_format(name)
    record: dict = {"sparse_bytes": size_of(sparse), "dense_bytes": size_of(dense)}
    if not format.runs_here():
        record.update(chosen="sparse", why=f"{format.runtime} cannot run on {platform.system()}: not measured, "
                                           "the smaller form kept")
        result.storage[name] = record
        return "sparse"
    say(f"    measuring {name} sparse against dense ({format.runtime}, batch {batch}, one thread)")
    record["sparse"], record["dense"] = measure_export(sparse, batch=batch), measure_export(dense, batch=batch)
    limit = 1 + STORAGE_MARGIN
    slower = [task for task, ms in record["sparse"]["latency_ms"].items()
              if ms > record["dense"]["latency_ms"][task] * limit + LATENCY_FLOOR_MS]
    heavier = record["sparse"]["peak_bytes"] > record["dense"]["peak_bytes"] * limit + MEMORY_FLOOR_BYTES
    costs = ([f"slower on {slower}"] if slower else []) + (["more peak memory"] if heavier else []) + \
        (["not smaller"] if record["sparse_bytes"] >= record["dense_bytes"] else [])
    record["chosen"] = "dense" if costs else "sparse"
    record["why"] = (f"sparse is {', '.join(costs)}" if costs else "sparse is smaller, as fast and as light") + \
        f"; {_figures(record)}"
    say(f"    {name}: keeping {record['chosen']} ({record['why']})")
    result.storage[name] = record
    return record["chosen"]


def _figures(record: dict) -> str:
    """Both forms' bytes, per-task latency and peak memory, in a few words."""
    parts = []
    for form in ("sparse", "dense"):
        latency = ", ".join(f"{task} {ms:.3f} ms" for task, ms in record[form]["latency_ms"].items())
        parts.append(f"{form} {record[form + '_bytes']:,} B, {latency}, peak +{record[form]['peak_bytes'] / 2**20:.1f} MB")
    return "; ".join(parts)


def measure_export(path: "str | os.PathLike", *, repeats: int = MEASURE_REPEATS, batch: int = 1) -> dict:
    """Latency per task (batch 1, or ``batch``) and peak memory of an export in its runtime, in a fresh process.

    One thread (the runtime's setting and the BLAS/OpenMP pools). Returns ``latency_ms``
    (task -> median of ``repeats`` runs after 5 warm-up runs) and ``peak_bytes`` (the
    process's peak resident memory, Linux ``VmHWM``, above what it held after importing
    the runtime: what loading and running the export cost).

    Example:
        >>> measure_export("out/model.tflite")["latency_ms"]
        {'digits': 0.021, 'cancer': 0.008}
    """
    import json
    import subprocess

    environment = {**os.environ, **{key: "1" for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
    process = subprocess.run(
        [sys.executable, "-c", "from mann_edge.api import _measure_worker; _measure_worker()"],
        input=json.dumps({"path": str(path), "repeats": repeats, "batch": batch}), capture_output=True, text=True,
        env=environment, check=False,
    )
    lines = process.stdout.strip().splitlines()
    if process.returncode != 0 or not lines:
        tail = " ".join(process.stderr.strip().splitlines()[-3:])
        raise MannEdgeError(f"measuring {path} failed (exit {process.returncode}): {tail}")
    return json.loads(lines[-1])


def _measure_worker() -> None:
    """The measuring process of `measure_export`: a JSON spec on stdin, the figures as JSON on stdout."""
    import json
    import statistics

    from mann_edge import runtime
    from mann_edge.benchmark import _import_backend, _peak_rss_bytes  # the benchmark's measures, so the figures compare

    spec = json.loads(sys.stdin.read())
    _import_backend(runtime.detect_format(spec["path"]))
    baseline = _peak_rss_bytes()
    session = runtime.load(spec["path"], threads=1)
    spec_batch = int(spec.get("batch", 1))
    rng = np.random.default_rng(0)
    latency = {}
    for task in session.tasks:
        inputs = {}
        for spec_in in task.inputs:
            shape = (spec_batch, *spec_in.shape[1:])
            # id inputs get 0, a valid row of any embedding table; float inputs standard normal values
            inputs[spec_in.name] = np.zeros(shape, spec_in.dtype) if spec_in.dtype.startswith("int") else \
                rng.normal(0, 1, shape).astype(spec_in.dtype)
        for _ in range(5):
            session.run(task.name, inputs)
        samples = []
        for _ in range(spec["repeats"]):
            tick = time.perf_counter()
            session.run(task.name, inputs)
            samples.append(time.perf_counter() - tick)
        latency[task.name] = 1000 * statistics.median(samples)
    print(json.dumps({"latency_ms": latency, "peak_bytes": _peak_rss_bytes() - baseline}))


def verify(artifact: "str | os.PathLike", against, *, tasks: Sequence[str] | None = None,
           task_names: Sequence[str] | None = None,
           calibration: "str | os.PathLike | Mapping | None" = None) -> ValidationReport:
    """Runs ``artifact`` (any format `runtime.load` takes) against the compact model of ``against``.

    Every task of ``against`` (or ``tasks``) is checked; one the artifact lacks fails the report.
    ``calibration``: representative inputs (as for `convert`) to check on instead of random
    ones: a quantized export is only expected to match in the range it was quantized for.

    Example:
        >>> report = verify("out/model.tflite", "model.keras")
        >>> report.ok, report.max_abs_error
        (True, 4.2e-07)
    """
    format = detect_format(artifact)
    model = load_source(against, task_names)
    for name in tasks or ():
        model.task(name)  # an unknown task raises TaskError listing the tasks there are
    checked_on = {}
    if calibration is not None:
        arrays = read_arrays(calibration, what="calibration data")
        checked_on["inputs"] = {task: task_arrays(model, task, arrays, what="calibration data")
                                for task in tasks or model.task_names}
    return format.converter_module().validate(model, artifact, tasks=tasks, **checked_on)


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


def _tables(model: CompactModel, result: ConvertResult, dtype: str) -> tuple[list[dict], list[dict]]:
    stats = {row["task"]: row for row in model.task_stats()}
    shares = _task_shares(model)
    stored_total = sum(share["bytes"] for share in shares.values()) or 1.0
    dense_total = sum(row["dense_bytes"] for row in model.node_stats())
    rows, files = [], []
    for name, path in result.artifacts.items():
        own_files = get_format(name).converter_module().task_files(path)
        total = size_of(path)
        module = get_format(name).converter_module()
        files.append({"format": name, "file": str(path.relative_to(result.out_dir)), "bytes": total,
                      "dense_bytes": dense_total, "ratio": total / dense_total if dense_total else float("nan"),
                      "sparse_layers": module.sparse_layers(path)})
        report = result.reports.get(name)
        for task in model.task_names:
            if task in own_files:
                size, dense = size_of(own_files[task]), stats[task]["dense_bytes"]
            else:  # a file of every task: the task's share of it
                size, dense = round(total * shares[task]["bytes"] / stored_total), shares[task]["dense_bytes"]
            errors = [c.max_abs_error for c in report.checks if c.task == task] if report else []
            scores = result.scores.get(name, {})
            rows.append({
                "task": task,
                "format": name,
                "dtype": _format_dtype(name, dtype),
                "nonzeros": stats[task]["nonzeros"],
                "bytes": size,
                "dense_bytes": dense,
                "ratio": size / dense if dense else float("nan"),
                "shared": task not in own_files,
                "max_error": max(errors) if errors else None,
                # Sparsity pays when the task's stored bytes are below its dense float32 bytes (a question
                # only for a sparse encoding: a dense one chosen by storage="auto" is dense on purpose).
                "pays": (bool(dense) and size < dense) or result.storage.get(name, {}).get("chosen") == "dense",
                "density": stats[task]["density"],
                **({"metric": result.metric, "score": scores.get(task),
                    "float32_score": result.scores["float32"].get(task)} if result.scores else {}),
            })
    rows.sort(key=lambda row: model.task_names.index(row["task"]))
    return rows, files


def print_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
