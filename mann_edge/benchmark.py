"""The paper-scale benchmark: the bundle runtime against onnxruntime and LiteRT, dense and on our exports.

The model is the paper's: 784 -> 6 x 1000 -> 10 per task, two tasks through `MultiMaskedDense`
layers, each task's slabs 90 % pruned with RSN2 (magnitude masks; random weights serve, speed
does not depend on their values), masked two ways (`MASKS`): unstructured (RSN2's default)
and in 1x4 blocks (``block_size=4``: four consecutive inputs of one output unit kept or pruned
together), which the bundle runs on its block kernels and LiteRT on TFLite's sparse
FULLY_CONNECTED kernel (no DENSIFY). Each is compacted, saved as a `.mann` bundle and exported
to TFLite and ONNX (our sparse exports, and dense baselines with ``sparse=False``) and Core ML
(conversion time only: Core ML cannot predict off Apple platforms).

Each backend is measured in a fresh subprocess through `mann_edge.runtime.load(path, threads=...)`,
what users run: the time `load` takes, the first run (which binds the task: onnxruntime opens the
task's session, the bundle compiles or loads its kernels), then per task and batch size the median
of ``repeats`` timed runs, and the process's peak resident memory (Linux ``VmHWM``, else ``getrusage`` ``ru_maxrss``),
also minus the resident memory after the runtime's imports (the model's own share).

Example:
    >>> result = run_benchmark(repeats=50, threads=(1,))
    >>> print(format_report(result))

From the command line: ``python benchmarks/paper_scale.py --repeats 200`` (``--json`` for JSON,
``--masks block4`` for one mask kind).
"""

from __future__ import annotations

import argparse
import importlib
import json as json_module
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from mann_edge.files import size_of
from mann_edge.formats import EXPORT_FORMATS, FORMATS

__all__ = ["run_benchmark", "format_report", "build_paper_model", "add_arguments", "run", "main", "BACKENDS", "MASKS"]

INPUTS = 784
HIDDEN = (1000,) * 6
CLASSES = 10
TASKS = ("task_a", "task_b")
SPARSITY = 90
BATCHES = (1, 32)
SEED = 0

# mask kind -> RSN2 block size (1: unstructured; 4: TFLite's 1x4 blocks)
MASKS = {"unstructured": 1, "block4": 4}



def _backends_and_artifacts() -> tuple[dict, dict]:
    """The backends to measure and the artifacts they run, from the format table.

    Every format is exported (its conversion time counts); every format whose runtime runs
    here is measured on our export and, for the exports, on a dense export of the same model
    (its dense peer). The bundle runtime is also measured on its scipy fallback.
    """
    backends, artifacts = {}, {}
    for format in FORMATS.values():
        artifacts[format.name] = (format.name, format.artifact, {} if format.name == "mann" else {"sparse": True})
        if format.name == "mann":
            if format.runs_here():
                backends["bundle"] = ("mann", format.runtime, {})
                backends["bundle_scipy"] = ("mann", f"{format.runtime}, scipy fallback", {"MANN_EDGE_KERNELS": "numpy"})
            continue
        if format.runs_here():
            artifacts[f"{format.name}_dense"] = (format.name, f"dense_{format.artifact}", {"sparse": False})
            backends[f"{format.name}_dense"] = (f"{format.name}_dense", f"{format.runtime}, dense {format.title}", {})
            backends[f"{format.name}_export"] = (format.name, f"{format.runtime}, our {format.title} export", {})
    return backends, artifacts


# name -> (artifact it runs, what it is, environment it runs with); artifact -> (format, file name, export options)
BACKENDS, ARTIFACTS = _backends_and_artifacts()
DENSE_PEERS = tuple(name for name in BACKENDS if name.endswith("_dense"))


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# -- the model -----------------------------------------------------------------------------------


def build_paper_model(seed: int = SEED, block_size: int = 1):
    """The paper-scale Keras model: two tasks, 784 -> 6 x 1000 (ReLU) -> 10 (softmax), RSN2 masks at 90 %.

    ``block_size`` 4 keeps or prunes 1x4 blocks (four consecutive inputs of one output unit) together;
    1 (the default) masks unstructured.

    Example:
        >>> model = build_paper_model()
        >>> [t.name for t in mann_edge.compact(model, task_names=TASKS).tasks]
        ['task_a', 'task_b']
    """
    import keras

    from mann_edge.layers import MultiMaskedDense, SelectorLayer
    from mann_edge.rsn2 import mask_model

    keras.utils.set_random_seed(seed)
    inputs = [keras.Input((INPUTS,), name=name) for name in ("input_a", "input_b")]
    h = inputs
    for i, units in enumerate(HIDDEN):
        h = MultiMaskedDense(units, activation="relu", bias_initializer="random_normal", name=f"hidden_{i + 1}")(h)
    h = MultiMaskedDense(CLASSES, activation="softmax", bias_initializer="random_normal", name="classes")(h)
    outputs = [SelectorLayer(i, name=name)(h) for i, name in enumerate(TASKS)]
    model = keras.Model(inputs, outputs, name="paper_scale")
    mask_model(model, SPARSITY, method="magnitude", block_size=block_size)
    return model


def _export_all(cm, out_dir: Path) -> tuple[dict, dict, list[str]]:
    """Saves the bundle and every export; returns artifact paths, conversion seconds, and notes."""
    from mann_edge import converters

    paths, seconds, notes = {}, {}, []
    for name, (fmt, filename, options) in ARTIFACTS.items():
        module = converters.get(fmt)
        _progress(f"exporting {name} ...")
        start = time.perf_counter()
        try:
            paths[name] = module.export(cm, out_dir / filename, force=True, **options)
        except Exception as error:  # report the failure in the table rather than losing every other figure
            notes.append(f"{name}: export failed ({type(error).__name__}: {error})")
            continue
        seconds[name] = time.perf_counter() - start
        _progress(f"exported {name} in {seconds[name]:.1f} s")
    return paths, seconds, notes


# -- one backend, in its own process -------------------------------------------------------------


def _inputs(task_inputs: int, batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed + batch).normal(0, 1, (batch, task_inputs)).astype(np.float32)


def _peak_rss_bytes() -> int:
    """Peak resident memory of this process.

    Linux: ``VmHWM`` of /proc/self/status, the peak of this address space (``ru_maxrss`` would
    carry the parent's peak across fork and exec). Elsewhere: ``getrusage`` ``ru_maxrss``.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB elsewhere


def _import_backend(kind: str) -> None:
    """Imports what the backend's session needs, so the memory baseline includes the libraries."""
    importlib.import_module(FORMATS[kind].runtime_module)
    if kind == "mann":
        from mann_edge.runtime.kernels import kernel_backend

        kernel_backend()  # imports numba and the compiled kernels, unless they are switched off


def measure(spec: dict) -> dict:
    """Measures one backend in this process (the benchmark calls it in a fresh subprocess).

    ``spec``: path, threads, repeats, batches, seed. Returns load and first-run seconds,
    per task and batch the timings (seconds), the batch-32 outputs per task, and memory.
    """
    from mann_edge import runtime

    kind = runtime.detect_format(spec["path"])
    _import_backend(kind)
    baseline = _peak_rss_bytes()
    start = time.perf_counter()
    session = runtime.load(spec["path"], threads=spec["threads"])
    load_seconds = time.perf_counter() - start
    result = {"load_s": load_seconds, "tasks": {}, "outputs": {}}
    for task in session.tasks:
        features = task.inputs[0].shape[-1]
        first = time.perf_counter()
        session.run(task.name, _inputs(features, 1, spec["seed"]))
        result.setdefault("first_run_s", time.perf_counter() - first)
        timings = {}
        for batch in spec["batches"]:
            x = _inputs(features, batch, spec["seed"])
            for _ in range(5):
                session.run(task.name, x)
            samples = []
            for _ in range(spec["repeats"]):
                tick = time.perf_counter()
                session.run(task.name, x)
                samples.append(time.perf_counter() - tick)
            timings[str(batch)] = {
                "median_s": statistics.median(samples),
                "p10_s": float(np.percentile(samples, 10)),
                "p90_s": float(np.percentile(samples, 90)),
            }
        result["tasks"][task.name] = timings
        result["outputs"][task.name] = session.run(task.name, _inputs(features, max(spec["batches"]), spec["seed"]))[0].tolist()
    result["peak_rss_bytes"] = _peak_rss_bytes()
    result["baseline_rss_bytes"] = baseline
    if kind == "mann":
        from mann_edge.runtime.kernels import kernel_backend

        result["kernels"] = kernel_backend()
    return result


def _worker() -> None:
    """Entry of the measuring subprocess: a JSON spec on stdin, a JSON result on the last stdout line."""
    spec = json_module.loads(sys.stdin.read())
    print(json_module.dumps(measure(spec)))


def _measure_in_subprocess(name: str, path: Path, threads: int, repeats: int, seed: int) -> dict:
    environment = {**os.environ, **BACKENDS[name][2]}
    if threads == 1:  # keep BLAS and OpenMP pools (numpy, onnxruntime's helpers) to one thread as well
        environment.update({key: "1" for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    spec = {"path": str(path), "threads": threads, "repeats": repeats, "batches": list(BATCHES), "seed": seed}
    process = subprocess.run(
        [sys.executable, "-c", "from mann_edge.benchmark import _worker; _worker()"],
        input=json_module.dumps(spec), capture_output=True, text=True, env=environment, check=False,
    )
    lines = process.stdout.strip().splitlines()
    if process.returncode != 0 or not lines:
        tail = "\n".join(process.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"benchmark of {name} on {path} failed (exit {process.returncode}): {tail}")
    return json_module.loads(lines[-1])


# -- the whole benchmark -------------------------------------------------------------------------


def _versions() -> dict:
    import importlib.metadata

    versions = {"python": platform.python_version()}
    for package in ("numpy", "scipy", "numba", "onnxruntime", "ai-edge-litert", "tensorflow-cpu", "tensorflow", "coremltools"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ratios(backends: dict, threads_label: str) -> dict:
    """Per task and batch: the bundle's speedup over the fastest dense peer and over the fastest other
    backend, and each runtime on our sparse export against the same runtime on the dense export."""
    rows = {}

    def median(name, task, batch):
        entry = backends.get(name, {}).get(threads_label)
        return entry["tasks"][task][batch]["median_s"] if entry else None

    def fastest(names, task, batch):
        candidates = [(median(n, task, batch), n) for n in names if median(n, task, batch) is not None]
        return min(candidates) if candidates else None

    bundle = backends.get("bundle", {}).get(threads_label)
    if not bundle:
        return rows
    for task, timings in bundle["tasks"].items():
        for batch, timing in timings.items():
            dense = fastest(DENSE_PEERS, task, batch)
            others = fastest([n for n in backends if not n.startswith("bundle")], task, batch)
            exports = {name.removesuffix("_export"): (median(name.replace("_export", "_dense"), task, batch), median(name, task, batch))
                       for name in backends if name.endswith("_export")}
            rows[f"{task}/b{batch}"] = {
                "bundle_s": timing["median_s"],
                "fastest_dense_peer": dense[1] if dense else None,
                "speedup_vs_dense": dense[0] / timing["median_s"] if dense else None,
                "fastest_peer": others[1] if others else None,
                "speedup_vs_fastest": others[0] / timing["median_s"] if others else None,
                # per format: dense export's time / our export's time in the same runtime
                "export_vs_dense": {fmt: dense_s / export_s for fmt, (dense_s, export_s) in exports.items() if dense_s and export_s},
            }
    return rows


def _check_names(names: Sequence[str], known, what: str) -> list[str]:
    names = list(names)
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        raise ValueError(f"Unknown {what} {unknown or names}. {what.capitalize()}: {list(known)}")
    return names


def _measure_mask(mask: str, names, settings, repeats: int, directory: Path, seed: int) -> dict:
    """Builds, compacts and exports the model masked as ``mask``, then measures ``names`` on it."""
    import mann_edge
    from mann_edge.sparse import weight_nnz

    _progress(f"building the paper-scale model (784 -> 6x1000 -> 10, 2 tasks, 90 % pruned, {mask} masks) ...")
    start = time.perf_counter()
    cm = mann_edge.compact(build_paper_model(seed, MASKS[mask]), task_names=list(TASKS))
    build_s = time.perf_counter() - start
    paths, conversion, notes = _export_all(cm, directory)
    kernel_nodes = [n for n in cm.task_nodes(TASKS[0]) if n.op == "dense"]
    kernel_params = sum(int(np.prod(cm.weights[n.weights["kernel"]].shape)) for n in kernel_nodes)
    kernel_nnz = sum(weight_nnz(cm.weights[n.weights["kernel"]]) for n in kernel_nodes)

    measured: dict[str, dict] = {}
    for name in names:
        artifact = BACKENDS[name][0]
        if artifact not in paths:
            notes.append(f"{name}: not measured, its artifact {artifact!r} was not exported")
            continue
        for setting in settings:
            _progress(f"measuring {name} on the {mask} model with {setting} thread(s) ...")
            try:
                measured.setdefault(name, {})[str(setting)] = _measure_in_subprocess(
                    name, paths[artifact], setting, repeats, seed
                )
            except RuntimeError as error:
                notes.append(str(error))

    for by_threads in measured.values():  # how far each backend is from the reference ops
        for entry in by_threads.values():
            errors = []
            for task in TASKS:
                reference = cm.run(task, _inputs(INPUTS, max(BATCHES), seed))[0]
                errors.append(float(np.max(np.abs(np.asarray(entry["outputs"][task]) - reference))))
            entry["max_abs_error"] = max(errors)
            del entry["outputs"]

    return {
        "model": {
            "layers": f"{INPUTS} -> {len(HIDDEN)}x{HIDDEN[0]} -> {CLASSES}",
            "tasks": list(TASKS),
            "sparsity_percent": SPARSITY,
            "mask": mask,
            "block_size": MASKS[mask],
            "kernel_params_per_task": kernel_params,
            "kernel_nonzeros_per_task": kernel_nnz,
            "task_stats": cm.task_stats(),
            "build_and_compact_s": build_s,
        },
        "conversion_s": conversion,
        "conversion_total_s": sum(conversion.get(k, 0.0) for k in EXPORT_FORMATS),
        "artifacts": {name: {"path": str(p), "bytes": size_of(p)} for name, p in paths.items()},
        "backends": measured,
        "ratios": {str(s): _ratios(measured, str(s)) for s in settings},
        "notes": notes,
    }


def run_benchmark(
    *,
    repeats: int = 200,
    threads: Sequence[int | None] = (1, None),
    json: bool = False,
    out_dir: "str | os.PathLike | None" = None,
    backends: Sequence[str] | None = None,
    seed: int = SEED,
    masks: Sequence[str] | None = None,
) -> dict:
    """Builds, compacts and exports the paper-scale model per mask kind, then measures every backend on each.

    Args:
        repeats: timed runs per task and batch size (the median is reported).
        threads: thread settings to measure; None means all cores (``os.cpu_count()``).
        json: return only JSON types (lists, not tuples): what ``--json`` prints.
        out_dir: where the bundles and exports go (kept, one folder per mask kind); None: a temporary directory.
        backends: names from `BACKENDS` to measure (default: all).
        seed: seed of the weights, masks and inputs.
        masks: mask kinds from `MASKS` (default: all, unstructured and block4).

    Returns:
        A dict: ``masks`` (mask kind -> ``model`` (sizes), ``conversion_s``, ``artifacts`` (path,
        bytes), ``backends`` (name -> threads label -> measurements), ``ratios`` (threads label ->
        task/batch -> speedups), ``notes``), ``threads``, ``repeats``, ``machine``.

    Example:
        >>> result = run_benchmark(repeats=20, threads=(1,), backends=["bundle", "tflite_dense"], masks=["block4"])
        >>> result["masks"]["block4"]["ratios"]["1"]["task_a/b1"]["speedup_vs_dense"] > 1
        True
    """
    names = _check_names(list(BACKENDS) if backends is None else backends, BACKENDS, "backends")
    mask_names = _check_names(list(MASKS) if masks is None else masks, MASKS, "masks")
    if repeats < 1:
        raise ValueError(f"`repeats` must be a positive int. Received: repeats={repeats!r}")
    cores = os.cpu_count() or 1
    settings = [(cores if t is None else int(t)) for t in threads]

    with tempfile.TemporaryDirectory(prefix="mann_edge_bench_") as scratch:
        directory = Path(out_dir) if out_dir is not None else Path(scratch)
        load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
        by_mask = {}
        for mask in mask_names:
            (directory / mask).mkdir(parents=True, exist_ok=True)
            by_mask[mask] = _measure_mask(mask, names, settings, repeats, directory / mask, seed)
        load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    if out_dir is None:  # the files are gone with the temporary directory
        for entry in (a for m in by_mask.values() for a in m["artifacts"].values()):
            entry["path"] = None
    result = {
        "masks": by_mask,
        "threads": settings,
        "repeats": repeats,
        "machine": {
            "cpu": _cpu_name(),
            "cores": cores,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "versions": _versions(),
        },
    }
    return json_module.loads(json_module.dumps(result)) if json else result


# -- the report ----------------------------------------------------------------------------------


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def _mb(size) -> str:
    return "-" if size is None else f"{size / 1e6:.1f}"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]


def _mask_report(part: dict, threads: Sequence[int]) -> list[str]:
    """One mask kind: conversion times, one table per thread setting, then the speedups."""
    model = part["model"]
    lines = [
        f"== {model['mask']} masks (RSN2 block_size={model['block_size']}): {model['layers']}, "
        f"{len(model['tasks'])} tasks, {model['sparsity_percent']} % pruned per task: "
        f"{model['kernel_params_per_task']:,} dense kernel weights, {model['kernel_nonzeros_per_task']:,} nonzeros per task",
        "Conversion: "
        + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in part["conversion_s"].items())
        + f"; {' + '.join(EXPORT_FORMATS)}: {part['conversion_total_s']:.1f} s (target < 60 s)",
    ]
    artifacts = part["artifacts"]
    batches = [str(b) for b in BATCHES]
    for label in (str(s) for s in threads):
        header = ["backend", "file MB", "load ms", "1st run ms"]
        header += [f"{task} b{b}" for task in model["tasks"] for b in batches]
        header += ["peak MB", "model MB", "max err"]
        rows = [header]
        for name, by_threads in part["backends"].items():
            entry = by_threads.get(label)
            if entry is None:
                continue
            artifact = artifacts.get(BACKENDS[name][0], {})
            row = [BACKENDS[name][1], _mb(artifact.get("bytes")), _ms(entry["load_s"]), _ms(entry["first_run_s"])]
            row += [_ms(entry["tasks"][task][b]["median_s"]) for task in model["tasks"] for b in batches]
            row += [
                _mb(entry["peak_rss_bytes"]),
                _mb(entry["peak_rss_bytes"] - entry["baseline_rss_bytes"]),
                f"{entry['max_abs_error']:.1e}",
            ]
            rows.append(row)
        lines += ["", f"threads={label}"] + _table(rows)
        for key, ratio in part["ratios"].get(label, {}).items():
            words = []
            if ratio["speedup_vs_dense"] is not None:
                words.append(
                    f"bundle x{ratio['speedup_vs_dense']:.2f} vs the fastest dense peer "
                    f"({BACKENDS[ratio['fastest_dense_peer']][1]}), x{ratio['speedup_vs_fastest']:.2f} vs the fastest "
                    f"peer ({BACKENDS[ratio['fastest_peer']][1]})"
                )
            for fmt, speedup in ratio["export_vs_dense"].items():
                runtime = FORMATS[fmt].runtime
                words.append(f"{runtime} on our export x{speedup:.2f} vs {runtime} dense")
            if words:
                lines.append(f"  {key}: " + "; ".join(words))
    if part["notes"]:
        lines += ["Notes:"] + [f"- {note}" for note in part["notes"]]
    return lines


def _summary(result: dict) -> list[str]:
    """Medians per backend and mask kind (mean over the tasks), one column per threads and batch."""
    masks = list(result["masks"])
    labels = [str(s) for s in result["threads"]]
    header = ["backend"] + [f"{mask} t{label} b{b}" for label in labels for mask in masks for b in BATCHES]
    rows = [header]
    names = [n for n in BACKENDS if any(n in part["backends"] for part in result["masks"].values())]
    for name in names:
        row = [name]
        for label in labels:
            for mask in masks:
                entry = result["masks"][mask]["backends"].get(name, {}).get(label)
                for b in BATCHES:
                    row.append(
                        "-" if entry is None
                        else _ms(statistics.fmean(t[str(b)]["median_s"] for t in entry["tasks"].values()))
                    )
        rows.append(row)
    return ["", "Summary: median ms per run, mean over the tasks (t = threads, b = batch)"] + _table(rows)


def format_report(result: dict) -> str:
    """The benchmark as text: per mask kind conversion times, one table per thread setting and the
    speedups; then a summary of every backend on every mask kind.

    Example:
        >>> print(format_report(run_benchmark(repeats=20)))
    """
    machine = result["machine"]
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, load average "
        f"{machine['load_average_before']} -> {machine['load_average_after']}",
        "Latency: median of "
        f"{result['repeats']} runs, ms. Memory: peak RSS (VmHWM; ru_maxrss off Linux) of a fresh process per backend; "
        "'model' = peak minus the RSS after the runtime's imports.",
    ]
    for part in result["masks"].values():
        lines += [""] + _mask_report(part, result["threads"])
    return "\n".join(lines + _summary(result))


# -- command line --------------------------------------------------------------------------------


def _threads_list(value: str) -> list[int | None]:
    settings = []
    for item in value.split(","):
        item = item.strip().lower()
        if item in ("all", "none"):
            settings.append(None)
        elif item.isdigit() and int(item) > 0:
            settings.append(int(item))
        else:
            raise argparse.ArgumentTypeError(f"threads must be positive ints or 'all', comma-separated. Received: {value!r}")
    return settings


def _nonempty(value: str) -> str:
    from mann_edge.cli import nonempty  # the command's one rule for path arguments

    return nonempty(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (`mann-edge bench` and benchmarks/paper_scale.py share them)."""
    parser.add_argument("--repeats", type=int, default=200, help="timed runs per task and batch size (default 200)")
    parser.add_argument("--threads", type=_threads_list, default=[1, None],
                        help="thread settings, comma-separated; 'all' = every core (default: 1,all)")
    parser.add_argument("--backends", default=None,
                        help=f"backends to measure, comma-separated (default: all of {', '.join(BACKENDS)})")
    parser.add_argument("--masks", default=None,
                        help=f"mask kinds, comma-separated (default: all of {', '.join(MASKS)})")
    parser.add_argument("--out", type=_nonempty, default=None, help="keep the bundles and exports in this directory")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark for parsed ``args``; prints the report (or JSON) to stdout; returns the exit code."""
    def names(value):
        return None if value is None else [item.strip() for item in value.split(",") if item.strip()]

    result = run_benchmark(repeats=args.repeats, threads=tuple(args.threads), json=args.json, out_dir=args.out,
                           backends=names(args.backends), masks=names(getattr(args, "masks", None)))
    print(json_module.dumps(result, indent=1) if args.json else format_report(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python benchmarks/paper_scale.py [--repeats N] [--threads 1,all] [--masks unstructured,block4] [--json]``."""
    parser = argparse.ArgumentParser(prog="paper_scale", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
