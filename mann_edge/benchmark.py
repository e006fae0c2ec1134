"""Benchmarks: the bundle runtime against onnxruntime and LiteRT, dense and on our exports, on any model.

`run_benchmark` measures either the paper-scale model or a user's model (``model=``: a `.keras`,
legacy `.h5` or `.mann` file). The paper's model is 784 -> 6 x 1000 -> 10 per task, two tasks
through `MultiMaskedDense` layers, each task's slabs 90 % pruned with RSN2 (magnitude masks;
random weights serve, speed does not depend on their values), masked two ways (`MASKS`):
unstructured (RSN2's default) and in 1x4 blocks (``block_size=4``), which the bundle runs on its
block kernels and LiteRT on TFLite's sparse FULLY_CONNECTED kernel. Each model is compacted,
saved as a `.mann` bundle (float32, and float16 values as ``bundle_float16``) and exported to
TFLite and ONNX (our sparse exports, and dense baselines with ``sparse=False``) and Core ML
(conversion time only: Core ML cannot predict off Apple platforms).

Each backend is measured in a fresh subprocess through `mann_edge.runtime.load(path, threads=...)`,
what users run: the runtime's import, the time `load` takes and the first run (start-up: load to
first result; the bundle plans the task and loads its compiled kernels), then per task and batch
size the median of ``repeats`` timed runs (`time_runs`, which the demo's table uses too), the
outputs against the reference executor's, and the process's peak resident memory (Linux ``VmHWM``,
else ``getrusage`` ``ru_maxrss``), also minus the resident memory after the runtime's imports.
The bundle's first run on a fresh machine (numba compiling its kernels into an empty cache) is
measured once (``cold_start``). Per task the kernels' weight bytes per run and per nonzero, the
GB/s they reach at batch 1 and the floor those bytes set at the measured one-core memory bandwidth.
With ``rounds`` > 1 every backend is measured in that many processes, in turns with the others,
and each figure is the median over them.

Example:
    >>> result = run_benchmark(repeats=50, threads=(1,))                 # the paper-scale model
    >>> result = run_benchmark(model="my_mann.keras", task_names=["a", "b"])
    >>> print(format_report(result))

From the command line: ``mann-edge bench [MODEL] --repeats 200`` (``--json`` for JSON,
``--masks block4`` for one mask kind of the paper-scale model); ``python benchmarks/paper_scale.py``.
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

__all__ = [
    "run_benchmark", "format_report", "build_paper_model", "add_arguments", "run", "main", "BACKENDS", "MASKS",
    "measure_exports", "format_latency_table", "latencies", "time_runs", "task_inputs", "memory_bandwidth",
]

INPUTS = 784
HIDDEN = (1000,) * 6
CLASSES = 10
TASKS = ("task_a", "task_b")
SPARSITY = 90
BATCHES = (1, 32)
SEED = 0
ATOL = {"float32": 1e-5, "float16": 1e-2}  # outputs against the reference executor's (float16 values: 1e-2)

# mask kind -> RSN2 block size (1: unstructured; 4: TFLite's 1x4 blocks)
MASKS = {"unstructured": 1, "block4": 4}


def _backends_and_artifacts() -> tuple[dict, dict]:
    """The backends to measure and the artifacts they run, from the format table.

    Every format is exported (its conversion time counts); every format whose runtime runs
    here is measured on our export and, for the exports, on a dense export of the same model
    (its dense peer). The bundle runtime is also measured with float16 values and on its
    scipy fallback.
    """
    backends, artifacts = {}, {}
    for format in FORMATS.values():
        artifacts[format.name] = (format.name, format.artifact, {} if format.name == "mann" else {"sparse": True})
        if format.name == "mann":
            artifacts["mann_float16"] = ("mann", "model_float16.mann", {"dtype": "float16"})
            if format.runs_here():
                backends["bundle"] = ("mann", format.runtime, {})
                backends["bundle_float16"] = ("mann_float16", f"{format.runtime}, float16 values", {})
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


def _compiles_kernels(name: str) -> bool:
    """Whether the backend compiles kernels in a process (numba) that later processes load from numba's cache."""
    artifact, _, environment = BACKENDS[name]
    return ARTIFACTS[artifact][0] == "mann" and environment.get("MANN_EDGE_KERNELS") != "numpy"


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _dtype_of(name: str) -> str:
    return "float16" if name.endswith("_float16") else "float32"


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


def _export_all(cm, out_dir: Path, artifacts) -> tuple[dict, dict, list[str]]:
    """Saves the bundle and the ``artifacts`` exports; returns artifact paths, conversion seconds, and notes."""
    from mann_edge import converters

    paths, seconds, notes = {}, {}, []
    for name in artifacts:
        fmt, filename, options = ARTIFACTS[name]
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


# -- inputs and timing (the demo's table uses these too) -----------------------------------------


def task_inputs(task, batch: int, seed: int = SEED) -> dict[str, np.ndarray]:
    """Inputs of ``batch`` examples for ``task`` (a `Task`): standard normal floats, ids in range.

    Ids are drawn below the rows of the embedding tables that read them (``task.id_limits``),
    or below 2 when no table reads them; sizes the spec leaves open besides the batch are 8.

    Example:
        >>> task_inputs(session.task("digits"), 32)["digits_image"].shape
        (32, 8, 8, 1)
    """
    rng = np.random.default_rng(seed + batch)
    inputs = {}
    for spec in task.inputs:
        shape = (batch, *(8 if d is None else d for d in spec.shape[1:]))
        if spec.dtype.startswith("float"):
            inputs[spec.name] = rng.normal(0, 1, shape).astype(spec.dtype)
        else:
            inputs[spec.name] = rng.integers(0, task.id_limits.get(spec.name, 2), shape).astype(spec.dtype)
    return inputs


def time_runs(session, task: str, inputs, repeats: int, warmup: int = 5) -> dict:
    """Median, 10th and 90th percentile seconds of ``repeats`` runs of ``task`` (after ``warmup`` runs).

    Example:
        >>> time_runs(runtime.load("model.tflite"), "digits", x, repeats=100)["median_s"]
        2.1e-05
    """
    for _ in range(warmup):
        session.run(task, inputs)
    samples = []
    for _ in range(repeats):
        tick = time.perf_counter()
        session.run(task, inputs)
        samples.append(time.perf_counter() - tick)
    return {"median_s": statistics.median(samples), "p10_s": float(np.percentile(samples, 10)),
            "p90_s": float(np.percentile(samples, 90))}


# -- one backend, in its own process -------------------------------------------------------------


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
    """Imports what the backend's session needs, so the memory baseline includes the libraries.

    The session's own module too, so that `load` times loading the model, not importing Python code.
    """
    importlib.import_module(FORMATS[kind].runtime_module)
    FORMATS[kind].session_class()
    if kind == "mann":
        from mann_edge.runtime.kernels import kernel_backend

        if kernel_backend() == "numba":  # the compiled program's module too (its kernels load on first use)
            importlib.import_module("mann_edge.runtime.program")


def measure(spec: dict) -> dict:
    """Measures one backend in this process (the benchmark calls it in a fresh subprocess).

    ``spec``: path, threads, repeats, batches, seed. Returns the runtime's import, `load` and
    first-run seconds, per task and batch the timings (seconds), the largest batch's outputs per
    task, and memory.
    """
    start = time.perf_counter()
    from mann_edge import runtime

    kind = runtime.detect_format(spec["path"])
    _import_backend(kind)
    result = {"import_s": time.perf_counter() - start, "tasks": {}, "outputs": {}}
    baseline = _peak_rss_bytes()
    start = time.perf_counter()
    session = runtime.load(spec["path"], threads=spec["threads"])
    result["load_s"] = time.perf_counter() - start
    for task in session.tasks:
        first = time.perf_counter()
        session.run(task.name, task_inputs(task, 1, spec["seed"]))
        result.setdefault("first_run_s", time.perf_counter() - first)
        result["tasks"][task.name] = {
            str(batch): time_runs(session, task.name, task_inputs(task, batch, spec["seed"]), spec["repeats"])
            for batch in spec["batches"]
        }
        largest = task_inputs(task, max(spec["batches"]), spec["seed"])
        result["outputs"][task.name] = [y.tolist() for y in session.run(task.name, largest)]
    result["start_s"] = result["load_s"] + result["first_run_s"]
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


def _measure_in_subprocess(name: str, path: Path, threads: int, repeats: int, seed: int, batches,
                           environment: dict | None = None) -> dict:
    environment = {**os.environ, **BACKENDS[name][2], **(environment or {})}
    if threads == 1:  # keep BLAS and OpenMP pools (numpy, onnxruntime's helpers) to one thread as well
        environment.update({key: "1" for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    spec = {"path": str(path), "threads": threads, "repeats": repeats, "batches": list(batches), "seed": seed}
    process = subprocess.run(
        [sys.executable, "-c", "from mann_edge.benchmark import _worker; _worker()"],
        input=json_module.dumps(spec), capture_output=True, text=True, env=environment, check=False,
    )
    lines = process.stdout.strip().splitlines()
    if process.returncode != 0 or not lines:
        tail = "\n".join(process.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"benchmark of {name} on {path} failed (exit {process.returncode}): {tail}")
    return json_module.loads(lines[-1])


def _median_of_rounds(entries: list[dict]) -> dict:
    """One backend's figures from its processes (rounds): the median of each; the outputs from the first."""
    merged = {**entries[0], "rounds": len(entries)}
    for key in ("import_s", "load_s", "first_run_s", "peak_rss_bytes", "baseline_rss_bytes"):
        merged[key] = statistics.median(entry[key] for entry in entries)
    merged["start_s"] = merged["load_s"] + merged["first_run_s"]
    merged["tasks"] = {
        task: {batch: {stat: statistics.median(entry["tasks"][task][batch][stat] for entry in entries)
                       for stat in timing}
               for batch, timing in by_batch.items()}
        for task, by_batch in entries[0]["tasks"].items()
    }
    return merged


def _cold_start(path: Path, seed: int) -> dict:
    """The bundle's start-up on a fresh machine: numba compiles every kernel into an empty cache."""
    with tempfile.TemporaryDirectory(prefix="mann_edge_numba_cache_") as cache:
        entry = _measure_in_subprocess("bundle", path, 1, 1, seed, (1,), {"NUMBA_CACHE_DIR": cache})
    return {"import_s": entry["import_s"], "load_s": entry["load_s"], "first_run_s": entry["first_run_s"],
            "start_s": entry["start_s"]}


# -- kernels: bytes and bandwidth -----------------------------------------------------------------


def memory_bandwidth(megabytes: int = 256) -> float:
    """Bytes per second one core reads from memory: the best of five sums of a ``megabytes`` float32 array.

    Example:
        >>> memory_bandwidth() / 1e9      # GB/s
        11.8
    """
    array = np.ones(megabytes * (1 << 20) // 4, np.float32)
    best = float("inf")
    for _ in range(5):
        tick = time.perf_counter()
        np.add.reduce(array)
        best = min(best, time.perf_counter() - tick)
    return array.nbytes / best


def _kernel_figures(cm) -> dict:
    """Per task: the kernels' stored nonzeros, the weight bytes a batch-1 run reads, and bytes per nonzero."""
    from mann_edge.runtime.kernels import kernel_backend
    from mann_edge.sparse import weight_nbytes, weight_nnz

    figures = {}
    for task in cm.tasks:
        if kernel_backend() == "numba":
            from mann_edge.runtime.program import TaskProgram

            program = TaskProgram(cm, task.name)
            figures[task.name] = {"nonzeros": program.nonzeros, "bytes": program.kernel_bytes}
        else:  # the scipy fallback reads the CSR as stored
            kernels_ = [cm.weights[n.weights["kernel"]] for n in cm.task_nodes(task.name) if "kernel" in n.weights]
            figures[task.name] = {"nonzeros": sum(weight_nnz(w) for w in kernels_),
                                  "bytes": sum(weight_nbytes(w) for w in kernels_)}
        nonzeros = figures[task.name]["nonzeros"]
        figures[task.name]["bytes_per_nonzero"] = figures[task.name]["bytes"] / nonzeros if nonzeros else None
    return figures


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


def _median(backends: dict, name: str, label: str, task: str, batch: str):
    entry = backends.get(name, {}).get(label)
    return entry["tasks"][task][batch]["median_s"] if entry else None


def _ratios(backends: dict, threads_label: str, kernels: dict, bandwidth: float | None) -> dict:
    """Per bundle backend, task and batch: its speedup over the fastest dense peer and over the fastest other
    backend; at batch 1 the kernels' GB/s and the bandwidth floor; and each runtime on our sparse export
    against the same runtime on the dense export."""
    rows = {}

    def fastest(names, task, batch):
        candidates = [(_median(backends, n, threads_label, task, batch), n) for n in names
                      if _median(backends, n, threads_label, task, batch) is not None]
        return min(candidates) if candidates else None

    for bundle in (name for name in backends if name.startswith("bundle")):
        entry = backends[bundle].get(threads_label)
        if not entry:
            continue
        for task, timings in entry["tasks"].items():
            for batch, timing in timings.items():
                dense = fastest(DENSE_PEERS, task, batch)
                others = fastest([n for n in backends if not n.startswith("bundle")], task, batch)
                exports = {name.removesuffix("_export"): (_median(backends, name.replace("_export", "_dense"), threads_label, task, batch),
                                                          _median(backends, name, threads_label, task, batch))
                           for name in backends if name.endswith("_export")}
                row = {
                    "bundle_s": timing["median_s"],
                    "fastest_dense_peer": dense[1] if dense else None,
                    "speedup_vs_dense": dense[0] / timing["median_s"] if dense else None,
                    "fastest_peer": others[1] if others else None,
                    "speedup_vs_fastest": others[0] / timing["median_s"] if others else None,
                    # per format: dense export's time / our export's time in the same runtime
                    "export_vs_dense": {fmt: d / e for fmt, (d, e) in exports.items() if d and e},
                }
                figures = kernels.get(_dtype_of(bundle), {}).get(task)
                if batch == "1" and figures and bundle != "bundle_scipy":
                    row["kernel_bytes"] = figures["bytes"]
                    row["bytes_per_nonzero"] = figures["bytes_per_nonzero"]
                    row["gb_per_s"] = figures["bytes"] / timing["median_s"] / 1e9
                    if bandwidth:
                        row["floor_s"] = figures["bytes"] / bandwidth
                rows[f"{bundle}/{task}/b{batch}"] = row
    return rows


def _check_names(names: Sequence[str], known, what: str) -> list[str]:
    names = list(names)
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        raise ValueError(f"Unknown {what} {unknown or names}. {what.capitalize()}: {list(known)}")
    return names


def _model_info(cm, label: str, **extra) -> dict:
    from mann_edge.sparse import weight_nnz

    per_task = {}
    for task in cm.tasks:
        kernels = [cm.weights[n.weights["kernel"]] for n in cm.task_nodes(task.name) if "kernel" in n.weights]
        per_task[task.name] = {"kernel_params": sum(int(np.prod(w.shape)) for w in kernels),
                               "kernel_nonzeros": sum(weight_nnz(w) for w in kernels)}
    return {"label": label, "tasks": cm.task_names, "per_task": per_task, **extra}


def _measure_model(cm, info: dict, names, settings, repeats: int, directory: Path, seed: int, batches, *,
                   paths: dict | None = None, cold_start: bool = True, bandwidth: float | None = None,
                   rounds: int = 1) -> dict:
    """Exports ``cm`` (unless ``paths`` gives the artifacts), measures ``names`` on it, checks their outputs."""
    notes: list[str] = []
    conversion: dict = {}
    if paths is None:
        needed = [BACKENDS[name][0] for name in names]
        if set(names) == set(BACKENDS):  # the full benchmark also times every format's conversion (Core ML too)
            needed += list(EXPORT_FORMATS)
        paths, conversion, notes = _export_all(cm, directory, list(dict.fromkeys(needed)))
    jobs = []
    for name in names:
        if BACKENDS[name][0] in paths:
            jobs += [(name, setting) for setting in settings]
        else:
            notes.append(f"{name}: not measured, its artifact {BACKENDS[name][0]!r} was not exported")
    runs: dict[tuple, list] = {}
    # every backend once per round: a slow spell of the shared machine then falls on all of them, not on one
    for round_number in range(1, rounds + 1):
        for name, setting in jobs:
            path = paths[BACKENDS[name][0]]
            _progress(f"measuring {name} on {info['label']} with {setting} thread(s)"
                      f"{f' (round {round_number} of {rounds})' if rounds > 1 else ''} ...")
            try:
                if round_number == 1 and _compiles_kernels(name):  # start-up is timed with the kernels compiled once
                    _measure_in_subprocess(name, path, setting, 1, seed, batches)
                runs.setdefault((name, setting), []).append(
                    _measure_in_subprocess(name, path, setting, repeats, seed, batches))
            except RuntimeError as error:
                notes.append(str(error))
    measured: dict[str, dict] = {}
    for (name, setting), entries in runs.items():
        measured.setdefault(name, {})[str(setting)] = _median_of_rounds(entries)

    references = {task.name: cm.run(task.name, task_inputs(task, max(batches), seed)) for task in cm.tasks}
    for name, by_threads in measured.items():  # how far each backend is from the reference ops
        for entry in by_threads.values():
            errors = [float(np.max(np.abs(np.asarray(got, np.float32) - expected), initial=0.0))
                      for task, outputs in entry.pop("outputs").items()
                      for got, expected in zip(outputs, references[task])]
            entry["max_abs_error"] = max(errors, default=0.0)
            entry["tolerance"] = ATOL[_dtype_of(name)]
            if entry["max_abs_error"] > entry["tolerance"]:
                notes.append(f"{name}: outputs differ from the reference by {entry['max_abs_error']:.1e} "
                             f"(tolerance {entry['tolerance']:.0e})")
    cold = None
    if cold_start and "bundle" in measured and measured["bundle"].get("1", {}).get("kernels") == "numba":
        _progress("measuring the bundle's first start on a fresh machine (numba compiles its kernels) ...")
        try:
            cold = _cold_start(paths["mann"], seed)
        except RuntimeError as error:
            notes.append(str(error))
    kernels = {"float32": _kernel_figures(cm)}
    if "bundle_float16" in measured:
        kernels["float16"] = _kernel_figures(cm.astype("float16"))
    return {
        "model": info,
        "conversion_s": conversion,
        "conversion_total_s": sum(conversion.get(k, 0.0) for k in EXPORT_FORMATS),
        "artifacts": {name: {"path": str(p), "bytes": size_of(p)} for name, p in paths.items()},
        "backends": measured,
        "kernels": kernels,
        "cold_start": cold,
        "ratios": {str(s): _ratios(measured, str(s), kernels, bandwidth) for s in settings},
        "notes": notes,
    }


def _paper_part(mask: str, names, settings, repeats, directory: Path, seed, batches, cold_start, bandwidth,
                rounds) -> dict:
    import mann_edge

    _progress(f"building the paper-scale model (784 -> 6x1000 -> 10, 2 tasks, 90 % pruned, {mask} masks) ...")
    start = time.perf_counter()
    cm = mann_edge.compact(build_paper_model(seed, MASKS[mask]), task_names=list(TASKS))
    info = _model_info(cm, f"paper-scale, {mask} masks (RSN2 block_size={MASKS[mask]})",
                       layers=f"{INPUTS} -> {len(HIDDEN)}x{HIDDEN[0]} -> {CLASSES}", sparsity_percent=SPARSITY,
                       mask=mask, build_and_compact_s=time.perf_counter() - start)
    return _measure_model(cm, info, names, settings, repeats, directory, seed, batches, cold_start=cold_start,
                          bandwidth=bandwidth, rounds=rounds)


def _settings(threads) -> list[int]:
    cores = os.cpu_count() or 1
    return list(dict.fromkeys(cores if t is None else int(t) for t in threads))


def _machine(load_before, load_after, bandwidth) -> dict:
    return {"cpu": _cpu_name(), "cores": os.cpu_count() or 1, "load_average_before": load_before,
            "load_average_after": load_after, "read_bandwidth_bytes_per_s": bandwidth, "versions": _versions()}


def _load_average():
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def run_benchmark(
    *,
    model: "str | os.PathLike | None" = None,
    task_names: Sequence[str] | None = None,
    repeats: int = 200,
    threads: Sequence[int | None] = (1, None),
    json: bool = False,
    out_dir: "str | os.PathLike | None" = None,
    backends: Sequence[str] | None = None,
    seed: int = SEED,
    masks: Sequence[str] | None = None,
    batches: Sequence[int] = BATCHES,
    cold_start: bool = True,
    rounds: int = 1,
) -> dict:
    """Measures every backend on the paper-scale model (per mask kind) or on ``model``.

    Args:
        model: a `.keras`, legacy `.h5` or `.mann` file to measure instead of the paper-scale model.
        task_names: names for ``model``'s tasks, in output order (as `mann-edge convert --task-names`).
        repeats: timed runs per task and batch size (the median is reported).
        threads: thread settings to measure; None means all cores (``os.cpu_count()``).
        json: return only JSON types (lists, not tuples): what ``--json`` prints.
        out_dir: where the bundles and exports go (kept, one folder per model); None: a temporary directory.
        backends: names from `BACKENDS` to measure (default: all).
        seed: seed of the weights, masks and inputs.
        masks: mask kinds of the paper-scale model from `MASKS` (default: all); not with ``model``.
        batches: batch sizes to time.
        cold_start: also measure the bundle's first start with an empty kernel cache (about 30 s).
        rounds: processes per backend and thread setting, measured in turns (every backend once per
            round); each figure is the median over them. On shared cores a process can run 25 %
            slower than the next: small models' ratios need a few rounds.

    Returns:
        A dict: ``models`` (label -> ``model`` (sizes), ``conversion_s``, ``artifacts`` (path, bytes),
        ``backends`` (name -> threads label -> measurements), ``kernels`` (dtype -> task -> bytes),
        ``cold_start``, ``ratios`` (threads label -> bundle/task/batch -> speedups), ``notes``),
        ``threads``, ``batches``, ``repeats``, ``machine``.

    Example:
        >>> result = run_benchmark(repeats=20, threads=(1,), backends=["bundle", "tflite_dense"], masks=["block4"])
        >>> result["models"]["block4"]["ratios"]["1"]["bundle/task_a/b1"]["speedup_vs_dense"] > 1
        True
    """
    names = _check_names(list(BACKENDS) if backends is None else backends, BACKENDS, "backends")
    if model is not None and masks is not None:
        raise ValueError("`masks` choose the paper-scale model's masks; a `model` keeps its own")
    mask_names = _check_names(list(MASKS) if masks is None else masks, MASKS, "masks")
    if repeats < 1:
        raise ValueError(f"`repeats` must be a positive int. Received: repeats={repeats!r}")
    if rounds < 1:
        raise ValueError(f"`rounds` must be a positive int. Received: rounds={rounds!r}")
    batches = sorted({int(b) for b in batches})
    if not batches or batches[0] < 1:
        raise ValueError(f"`batches` must be positive ints. Received: batches={batches!r}")
    settings = _settings(threads)
    _progress("measuring one core's memory bandwidth ...")
    bandwidth = memory_bandwidth()

    with tempfile.TemporaryDirectory(prefix="mann_edge_bench_") as scratch:
        directory = Path(out_dir) if out_dir is not None else Path(scratch)
        load_before = _load_average()
        parts = {}
        if model is None:
            for mask in mask_names:
                (directory / mask).mkdir(parents=True, exist_ok=True)
                parts[mask] = _paper_part(mask, names, settings, repeats, directory / mask, seed, batches,
                                          cold_start, bandwidth, rounds)
        else:
            from mann_edge.sources import load_source

            label = Path(model).name
            _progress(f"reading {model} ...")
            cm = load_source(model, task_names)
            (directory / "model").mkdir(parents=True, exist_ok=True)
            parts[label] = _measure_model(cm, _model_info(cm, label), names, settings, repeats, directory / "model",
                                          seed, batches, cold_start=cold_start, bandwidth=bandwidth, rounds=rounds)
        load_after = _load_average()
    if out_dir is None:  # the files are gone with the temporary directory
        for entry in (a for m in parts.values() for a in m["artifacts"].values()):
            entry["path"] = None
    result = {"models": parts, "threads": settings, "batches": batches, "repeats": repeats, "rounds": rounds,
              "machine": _machine(load_before, load_after, bandwidth)}
    return json_module.loads(json_module.dumps(result)) if json else result


def measure_exports(cm, paths: dict, *, repeats: int, threads: Sequence[int | None] = (1,),
                    batches: Sequence[int] = (1,), seed: int = SEED, label: str = "model", rounds: int = 1) -> dict:
    """Measures already exported artifacts of ``cm`` as `run_benchmark` does (the demo's table comes from here).

    Args:
        cm: the compact model (the reference for the outputs).
        paths: artifact name (a key of `ARTIFACTS`: 'mann', 'tflite', 'onnx', ...) -> its path.
        repeats, threads, batches, seed, rounds: as `run_benchmark`.

    Returns:
        A dict shaped as ``run_benchmark(...)`` (one model, ``label``); backends whose artifact is
        missing are left out.

    Example:
        >>> result = measure_exports(cm, {"mann": "out/model.mann", "tflite": "out/model.tflite"}, repeats=50)
        >>> print(format_latency_table(result))
    """
    names = [name for name, (artifact, _, _) in BACKENDS.items() if artifact in paths and name != "bundle_scipy"]
    settings = _settings(threads)
    load_before = _load_average()
    part = _measure_model(cm, _model_info(cm, label), names, settings, repeats, Path("."), seed, sorted(set(batches)),
                          paths={k: Path(v) for k, v in paths.items()}, cold_start=False, rounds=rounds)
    return {"models": {label: part}, "threads": settings, "batches": sorted(set(batches)), "repeats": repeats,
            "rounds": rounds, "machine": _machine(load_before, _load_average(), None)}


# -- the report ----------------------------------------------------------------------------------


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def _mb(size) -> str:
    return "-" if size is None else f"{size / 1e6:.1f}"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]


def _model_report(part: dict, threads: Sequence[int], batches: Sequence[int]) -> list[str]:
    """One model: sizes, conversion times, one table per thread setting, the speedups, the kernels' bytes."""
    model = part["model"]
    sizes = "; ".join(f"{task}: {figures['kernel_params']:,} kernel weights, {figures['kernel_nonzeros']:,} nonzeros"
                      for task, figures in model["per_task"].items())
    lines = [f"== {model['label']}" + (f": {model['layers']}, {model['sparsity_percent']} % pruned per task" if "layers" in model else ""),
             sizes]
    if part["conversion_s"]:
        lines.append("Conversion: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in part["conversion_s"].items())
                     + f"; {' + '.join(EXPORT_FORMATS)}: {part['conversion_total_s']:.1f} s")
    artifacts = part["artifacts"]
    labels = [str(b) for b in batches]
    for label in (str(s) for s in threads):
        header = ["backend", "file MB", "import ms", "load ms", "1st run ms"]
        header += [f"{task} b{b}" for task in model["tasks"] for b in labels]
        header += ["peak MB", "model MB", "max err"]
        rows = [header]
        for name, by_threads in part["backends"].items():
            entry = by_threads.get(label)
            if entry is None:
                continue
            artifact = artifacts.get(BACKENDS[name][0], {})
            row = [BACKENDS[name][1], _mb(artifact.get("bytes")), _ms(entry["import_s"]), _ms(entry["load_s"]),
                   _ms(entry["first_run_s"])]
            row += [_ms(entry["tasks"][task][b]["median_s"]) for task in model["tasks"] for b in labels]
            row += [_mb(entry["peak_rss_bytes"]), _mb(entry["peak_rss_bytes"] - entry["baseline_rss_bytes"]),
                    f"{entry['max_abs_error']:.1e}"]
            rows.append(row)
        lines += ["", f"threads={label}"] + _table(rows)
        for key, ratio in part["ratios"].get(label, {}).items():
            if key.startswith("bundle_scipy"):
                continue
            words = []
            if ratio["speedup_vs_dense"] is not None:
                words.append(f"x{ratio['speedup_vs_dense']:.2f} vs the fastest dense peer "
                             f"({BACKENDS[ratio['fastest_dense_peer']][1]})")
            if ratio["speedup_vs_fastest"] is not None:
                words.append(f"x{ratio['speedup_vs_fastest']:.2f} vs the fastest peer "
                             f"({BACKENDS[ratio['fastest_peer']][1]})")
            if "gb_per_s" in ratio:
                floor = f", floor {ratio['floor_s'] * 1e3:.3f} ms at the measured bandwidth" if "floor_s" in ratio else ""
                words.append(f"kernels read {ratio['kernel_bytes'] / 1e6:.2f} MB ({ratio['bytes_per_nonzero']:.2f} B per "
                             f"nonzero): {ratio['gb_per_s']:.1f} GB/s{floor}")
            if key.startswith("bundle/"):
                for fmt, speedup in ratio["export_vs_dense"].items():
                    words.append(f"{BACKENDS[fmt + '_export'][1]} x{speedup:.2f} vs its dense peer")
            if words:
                lines.append(f"  {key}: " + "; ".join(words))
    cold = part.get("cold_start")
    if cold:
        lines.append(f"Bundle start-up on a fresh machine (empty kernel cache, numba compiles): import "
                     f"{cold['import_s'] * 1e3:.0f} ms, load {cold['load_s'] * 1e3:.0f} ms, first run "
                     f"{cold['first_run_s']:.1f} s; later starts read the compiled kernels from the cache (table above)")
    if part["notes"]:
        lines += ["Notes:"] + [f"- {note}" for note in part["notes"]]
    return lines


def _summary(result: dict) -> list[str]:
    """Medians per backend and model (mean over the tasks), one column per threads and batch."""
    models = list(result["models"])
    labels = [str(s) for s in result["threads"]]
    batches = result["batches"]
    header = ["backend"] + [f"{model} t{label} b{b}" for label in labels for model in models for b in batches]
    rows = [header]
    names = [n for n in BACKENDS if any(n in part["backends"] for part in result["models"].values())]
    for name in names:
        row = [name]
        for label in labels:
            for model in models:
                entry = result["models"][model]["backends"].get(name, {}).get(label)
                for b in batches:
                    row.append("-" if entry is None
                               else _ms(statistics.fmean(t[str(b)]["median_s"] for t in entry["tasks"].values())))
        rows.append(row)
    return ["", "Summary: median ms per run, mean over the tasks (t = threads, b = batch)"] + _table(rows)


def format_report(result: dict) -> str:
    """The benchmark as text: per model conversion times, one table per thread setting and the speedups;
    then a summary of every backend on every model.

    Example:
        >>> print(format_report(run_benchmark(repeats=20)))
    """
    machine = result["machine"]
    bandwidth = machine.get("read_bandwidth_bytes_per_s")
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, load average "
        f"{machine['load_average_before']} -> {machine['load_average_after']}"
        + (f"; one core reads memory at {bandwidth / 1e9:.1f} GB/s" if bandwidth else ""),
        "Latency: median of "
        f"{result['repeats']} runs, ms. Memory: peak RSS (VmHWM; ru_maxrss off Linux) of a fresh process per backend; "
        "'model' = peak minus the RSS after the runtime's imports. Start-up = load + 1st run.",
    ]
    if result.get("rounds", 1) > 1:
        lines.append(f"Each backend ran in {result['rounds']} processes, in turns with the others; every figure is "
                     "the median over them.")
    for part in result["models"].values():
        lines += [""] + _model_report(part, result["threads"], result["batches"])
    return "\n".join(lines + _summary(result))


def latencies(result: dict, batch: int = 1) -> dict[str, dict[str, float]]:
    """Median seconds at ``batch`` per artifact ('mann', 'tflite', ...) and task, of ``result``'s first model and
    thread setting, for the backends that run our exports (the bundle, LiteRT and onnxruntime on them).

    Example:
        >>> latencies(measure_exports(cm, paths, repeats=50))["tflite"]["digits"]
        2.2e-05
    """
    part = next(iter(result["models"].values()))
    label = str(result["threads"][0])
    found = {}
    for name in part["backends"]:
        artifact = BACKENDS[name][0]
        if name in ("bundle_scipy", "bundle_float16") or name.endswith("_dense"):
            continue
        found[artifact] = {task: _median(part["backends"], name, label, task, str(batch)) for task in part["model"]["tasks"]}
    return found


def format_latency_table(result: dict, batch: int = 1) -> str:
    """Per task and backend: the median latency at ``batch`` and the ratio to the fastest other backend
    (the first model and thread setting of ``result``; what `mann-edge demo` prints).

    Example:
        >>> print(format_latency_table(measure_exports(cm, paths, repeats=50)))
    """
    part = next(iter(result["models"].values()))
    label = str(result["threads"][0])
    rows = [["task", "backend", f"batch-{batch} median ms", "vs fastest other"]]
    for task in part["model"]["tasks"]:
        times = {name: _median(part["backends"], name, label, task, str(batch)) for name in part["backends"]}
        times = {name: t for name, t in times.items() if t is not None}
        for name, seconds in times.items():
            others = [t for other, t in times.items() if other != name]
            rows.append([task, BACKENDS[name][1], _ms(seconds), f"x{min(others) / seconds:.2f}" if others else "-"])
    return "\n".join(_table(rows))


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


def _batch_list(value: str) -> list[int]:
    items = [item.strip() for item in value.split(",")]
    if not items or not all(item.isdigit() and int(item) > 0 for item in items):
        raise argparse.ArgumentTypeError(f"batches must be positive ints, comma-separated. Received: {value!r}")
    return [int(item) for item in items]


def _nonempty(value: str) -> str:
    from mann_edge.cli import nonempty  # the command's one rule for path arguments

    return nonempty(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (`mann-edge bench` and benchmarks/paper_scale.py share them)."""
    parser.add_argument("model", nargs="?", type=_nonempty, default=None,
                        help="a .keras, .h5 or .mann model to measure (default: the paper-scale model)")
    parser.add_argument("--task-names", default=None, help="names for the model's tasks, comma-separated, in output order")
    parser.add_argument("--repeats", type=int, default=200, help="timed runs per task and batch size (default 200)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="processes per backend, measured in turns; figures are their medians (default 1)")
    parser.add_argument("--threads", type=_threads_list, default=[1, None],
                        help="thread settings, comma-separated; 'all' = every core (default: 1,all)")
    parser.add_argument("--batches", type=_batch_list, default=list(BATCHES),
                        help="batch sizes, comma-separated (default: 1,32)")
    parser.add_argument("--backends", default=None,
                        help=f"backends to measure, comma-separated (default: all of {', '.join(BACKENDS)})")
    parser.add_argument("--masks", default=None,
                        help=f"mask kinds of the paper-scale model, comma-separated (default: all of {', '.join(MASKS)})")
    parser.add_argument("--no-cold-start", action="store_true",
                        help="skip measuring the bundle's first start with an empty kernel cache (about 30 s)")
    parser.add_argument("--out", type=_nonempty, default=None, help="keep the bundles and exports in this directory")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark for parsed ``args``; prints the report (or JSON) to stdout; returns the exit code."""
    def names(value):
        return None if value is None else [item.strip() for item in value.split(",") if item.strip()]

    result = run_benchmark(model=getattr(args, "model", None), task_names=names(getattr(args, "task_names", None)),
                           repeats=args.repeats, threads=tuple(args.threads), json=args.json, out_dir=args.out,
                           backends=names(args.backends), masks=names(getattr(args, "masks", None)),
                           batches=getattr(args, "batches", BATCHES), cold_start=not getattr(args, "no_cold_start", False),
                           rounds=getattr(args, "rounds", 1))
    print(json_module.dumps(result, indent=1) if args.json else format_report(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python benchmarks/paper_scale.py [MODEL] [--repeats N] [--threads 1,all] [--masks unstructured,block4] [--json]``."""
    parser = argparse.ArgumentParser(prog="paper_scale", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
