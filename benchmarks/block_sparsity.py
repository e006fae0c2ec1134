"""Block-structured RSN2: what 1x4 / 1x16 block masks buy in LiteRT, and what they cost in accuracy.

    python benchmarks/block_sparsity.py                 # both parts, a table (a few minutes)
    python benchmarks/block_sparsity.py --json          # the same figures as JSON
    python benchmarks/block_sparsity.py --skip-accuracy --repeats 500

(a) Latency. The paper-scale model (784 -> 6 x 1000 -> 10 per task, two tasks through
    `MultiMaskedDense`, 90 % of each task's weights pruned by magnitude; random weights serve,
    speed does not depend on their values) masked three ways: unstructured (RSN2's default),
    1x4 blocks, 1x16 blocks. Each is compacted and exported to TFLite; every file is verified
    against its compact model, then run by LiteRT through `mann_edge.runtime.load(path,
    threads=1)` (what users run): per batch size the median of ``--repeats`` timed runs,
    pooled over both tasks. Rows:
      - dense float32 (``sparse=False``): the baseline every speedup is measured against;
      - unstructured float32 sparse: stored sparse, DENSIFY in front of each kernel, runs dense;
      - block-4 float32 sparse: TFLite's sparse FULLY_CONNECTED kernel;
      - dense int8 and block-16 int8 sparse (dynamic range: int8 weights, float activations);
        the block-16 file runs on the builtin kernels when its export found XNNPACK wrong.
(b) Accuracy. A small two-task MANN (the one of tests/test_rsn2.py) trained and pruned with
    `mann_edge.rsn2.fit_rsn2` on scikit-learn's digits and breast cancer sets, once per block
    size (1 = unstructured, 4) at the same target sparsity: test accuracy and the sparsity
    each task reached (RSN2 stops early when a step costs more than its tolerance).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np

INPUTS, HIDDEN, CLASSES = 784, (1000,) * 6, 10
TASKS = ("task_a", "task_b")
SPARSITY = 90
BATCHES = (1, 32)

# variant -> (mask block size, export options); the dense rows need any mask, they store every weight
VARIANTS = {
    "dense float32": (4, {"sparse": False, "dtype": "float32"}),
    "unstructured float32 sparse": (1, {"sparse": True, "dtype": "float32"}),
    "block-4 float32 sparse": (4, {"sparse": True, "dtype": "float32"}),
    "dense int8": (16, {"sparse": False, "dtype": "int8"}),
    "block-16 int8 sparse": (16, {"sparse": True, "dtype": "int8"}),
}
BASELINES = {"float32": "dense float32", "int8": "dense int8"}


def _version(*distributions: str) -> str:
    """The installed version of the first of ``distributions`` that is installed."""
    for name in distributions:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "not installed"


def _progress(message: str) -> None:
    print(f"[block_sparsity] {message}", file=sys.stderr, flush=True)


# -- (a) latency ---------------------------------------------------------------------------------


def build_paper_mann(block_size: int, seed: int = 0):
    """The paper-scale two-task MANN with RSN2 magnitude masks at 90 % per task in 1 x ``block_size`` blocks.

    Example:
        >>> model = build_paper_mann(4)
    """
    import keras

    from mann_edge.layers import MultiMaskedDense, SelectorLayer
    from mann_edge.rsn2 import mask_model

    keras.utils.set_random_seed(seed)
    h = inputs = [keras.Input((INPUTS,), name=name) for name in ("input_a", "input_b")]
    for i, units in enumerate(HIDDEN):
        h = MultiMaskedDense(units, activation="relu", bias_initializer="random_normal", name=f"hidden_{i + 1}")(h)
    h = MultiMaskedDense(CLASSES, activation="softmax", bias_initializer="random_normal", name="classes")(h)
    model = keras.Model(inputs, [SelectorLayer(i, name=name)(h) for i, name in enumerate(TASKS)], name="paper_scale")
    mask_model(model, SPARSITY, method="magnitude", block_size=block_size)
    return model


def _median_ms(session, batch: int, repeats: int) -> float:
    """Median milliseconds of one ``session.run`` at ``batch``, pooled over every task."""
    samples = []
    for task in session.tasks:
        x = np.random.default_rng(batch).normal(0, 1, (batch, task.inputs[0].shape[-1])).astype(np.float32)
        for _ in range(5):  # warm-up: the signature runner, caches, the first allocation
            session.run(task.name, x)
        for _ in range(repeats):
            tick = time.perf_counter()
            session.run(task.name, x)
            samples.append(time.perf_counter() - tick)
    return 1000.0 * statistics.median(samples)


def measure_latency(out_dir: Path, repeats: int) -> dict:
    """Exports every variant, verifies it, and times it with LiteRT on one thread; returns rows by variant."""
    import mann_edge
    from mann_edge.converters import tflite

    compacts = {}
    rows = {}
    for name, (block, options) in VARIANTS.items():
        if block not in compacts:
            _progress(f"masking the paper-scale model in 1x{block} blocks ...")
            compacts[block] = mann_edge.compact(build_paper_mann(block), task_names=list(TASKS))
        cm = compacts[block]
        path = out_dir / (name.replace(" ", "_") + ".tflite")
        _progress(f"exporting {name} ...")
        start = time.perf_counter()
        if options["dtype"] == "int8":  # full-integer: activation ranges from inputs like the ones it will see
            options = {**options, "calibration": {spec.name: np.random.default_rng(0).normal(
                size=(64, *spec.shape[1:])).astype("float32") for spec in cm.inputs}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", tflite.DenseWeightsWarning)  # the dense rows store dense on purpose
            tflite.export(cm, path, force=True, **options)
        export_s = time.perf_counter() - start
        report = tflite.validate(cm, path).raise_for_errors()
        session = mann_edge.runtime.load(path, threads=1)
        ops = tflite.operators(path)
        rows[name] = {
            "file_bytes": path.stat().st_size,
            "export_s": round(export_s, 2),
            "densify_ops": ops.count("DENSIFY"),
            "fully_connected_ops": ops.count("FULLY_CONNECTED"),
            "xnnpack": session.use_xnnpack,
            "max_abs_error": report.max_abs_error,
            "median_ms": {str(batch): _median_ms(session, batch, repeats) for batch in BATCHES},
        }
        _progress(f"{name}: " + ", ".join(f"batch {b} {ms:.3f} ms" for b, ms in rows[name]["median_ms"].items()))
    for name, row in rows.items():
        baseline = rows[BASELINES[VARIANTS[name][1]["dtype"]]]
        reference = rows[BASELINES["float32"]]
        row["speedup_vs_dense_same_dtype"] = {b: baseline["median_ms"][b] / ms for b, ms in row["median_ms"].items()}
        row["speedup_vs_dense_float32"] = {b: reference["median_ms"][b] / ms for b, ms in row["median_ms"].items()}
    return rows


# -- (b) accuracy --------------------------------------------------------------------------------


def _two_task_mlp(hidden: int = 128, seed: int = 1):
    """digits (64 inputs, 10 classes) and breast cancer (30 inputs, 2 classes) through shared MultiMaskedDense layers."""
    import keras

    from mann_edge.layers import MaskedDense, MultiMaskedDense, SelectorLayer

    keras.utils.set_random_seed(seed)
    a, b = keras.Input((64,), name="digits_in"), keras.Input((30,), name="cancer_in")
    h = MultiMaskedDense(hidden, activation="relu", name="shared_1")(
        [MaskedDense(hidden, activation="relu", name="digits_dense")(a),
         MaskedDense(hidden, activation="relu", name="cancer_dense")(b)]
    )
    h = MultiMaskedDense(hidden, activation="relu", name="shared_2")(h)
    digits = MaskedDense(10, activation="softmax", name="digits")(SelectorLayer(0)(h))
    cancer = MaskedDense(2, activation="softmax", name="cancer")(SelectorLayer(1)(h))
    return keras.Model([a, b], [digits, cancer])


def _datasets() -> dict:
    from sklearn.datasets import load_breast_cancer, load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    digits, cancer = load_digits(), load_breast_cancer()
    xd, yd = (digits.data / 16).astype("float32"), digits.target
    xc, yc = StandardScaler().fit_transform(cancer.data).astype("float32"), cancer.target
    d = train_test_split(xd, yd, test_size=0.25, random_state=0, stratify=yd)
    c = train_test_split(xc, yc, test_size=0.25, random_state=0, stratify=yc)
    return {"digits": d, "cancer": c}  # each: x_train, x_test, y_train, y_test


def measure_accuracy(block_sizes, *, epochs: int, patience: int, tolerance: float) -> dict:
    """fit_rsn2 once per block size at the same target sparsity; test accuracy and reached sparsity per task."""
    from mann_edge import rsn2

    data = _datasets()
    rows = {}
    for block in block_sizes:
        _progress(f"fit_rsn2 with block_size={block} ...")
        model = _two_task_mlp()
        start = time.perf_counter()
        report = rsn2.fit_rsn2(
            model,
            {"digits": (data["digits"][0], data["digits"][2]), "cancer": (data["cancer"][0], data["cancer"][2])},
            sparsity=SPARSITY, epochs=epochs, patience=patience, block_size=block, tolerance=tolerance,
            verbose=False,
        )
        seconds = time.perf_counter() - start
        xd, xc = data["digits"][1], data["cancer"][1]
        predicted = {
            "digits": model.predict([xd, np.zeros((len(xd), 30), "float32")], verbose=0)[0],
            "cancer": model.predict([np.zeros((len(xc), 64), "float32"), xc], verbose=0)[1],
        }
        rows[str(block)] = {
            "fit_s": round(seconds, 1),
            "tasks": {
                t.task: {
                    "test_accuracy": float((predicted[t.task].argmax(1) == data[t.task][3]).mean()),
                    "val_accuracy_dense": t.dense,
                    "val_accuracy_pruned": t.pruned,
                    "sparsity": t.sparsity,
                }
                for t in report.tasks
            },
        }
    return rows


# -- report --------------------------------------------------------------------------------------


def format_report(result: dict) -> str:
    """The result as text tables."""
    lines = []
    latency = result.get("latency")
    if latency:
        lines.append(f"(a) LiteRT, paper-scale model {INPUTS} -> 6x1000 -> {CLASSES}, 2 tasks, {SPARSITY} % per task, "
                     f"1 thread, median of {result['repeats']} runs per task")
        lines.append(f"{'variant':<30} {'file MB':>8} {'DENSIFY':>7} {'XNNPACK':>7} {'b1 ms':>8} {'b32 ms':>8} "
                     f"{'x dense b1':>10} {'x dense b32':>11}")
        for name, row in latency.items():
            ms, speedup = row["median_ms"], row["speedup_vs_dense_same_dtype"]
            lines.append(f"{name:<30} {row['file_bytes'] / 1e6:>8.2f} {row['densify_ops']:>7} "
                         f"{'on' if row['xnnpack'] else 'off':>7} {ms['1']:>8.3f} {ms['32']:>8.3f} "
                         f"{speedup['1']:>10.2f} {speedup['32']:>11.2f}")
        lines.append("(x dense: against the dense export of the same dtype; int8 rows against dense int8)")
    accuracy = result.get("accuracy")
    if accuracy:
        lines.append("")
        lines.append(f"(b) fit_rsn2 on digits + breast cancer, target {SPARSITY} % per task, tolerance "
                     f"{result['tolerance']} (sparsity: what each task reached)")
        lines.append(f"{'block':>5} {'task':<8} {'test acc':>8} {'sparsity':>9} {'val dense':>9} {'val pruned':>10} "
                     f"{'fit s':>6}")
        for block, row in accuracy.items():
            for task, figures in row["tasks"].items():
                lines.append(f"{block:>5} {task:<8} {figures['test_accuracy']:>8.4f} {figures['sparsity']:>8.1f}% "
                             f"{figures['val_accuracy_dense']:>9.4f} {figures['val_accuracy_pruned']:>10.4f} "
                             f"{row['fit_s']:>6.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--repeats", type=int, default=200, help="timed runs per task and batch (default: %(default)s)")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 4], help="block sizes for (b) (default: 1 4)")
    parser.add_argument("--epochs", type=int, default=20, help="dense epochs per task in (b) (default: %(default)s)")
    parser.add_argument("--patience", type=int, default=10,
                        help="epochs a pruning step may take to recover in (b) (default: %(default)s, fit_rsn2's)")
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="accuracy a pruning step may cost before RSN2 stops, in (b) (default: %(default)s; "
                             "1 prunes to the target whatever it costs)")
    parser.add_argument("--out", type=Path, help="keep the exports in this directory (default: a temporary one)")
    args = parser.parse_args(argv)

    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "ai_edge_litert": _version("ai-edge-litert"), "tensorflow": _version("tensorflow-cpu", "tensorflow")},
        "repeats": args.repeats,
        "tolerance": args.tolerance,
    }
    if not args.skip_latency:
        with tempfile.TemporaryDirectory(prefix="mann_edge_blocks_") as tmp:
            out_dir = args.out or Path(tmp)
            out_dir.mkdir(parents=True, exist_ok=True)
            result["latency"] = measure_latency(out_dir, args.repeats)
    if not args.skip_accuracy:
        result["accuracy"] = measure_accuracy(args.blocks, epochs=args.epochs, patience=args.patience,
                                              tolerance=args.tolerance)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
