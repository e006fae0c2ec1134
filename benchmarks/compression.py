"""Compression figures, one run: bytes per format and dtype as a fraction of the dense float32 export, accuracy per
task next to float32 on the samples, and batch-1 latency (one thread) in LiteRT's default interpreter and onnxruntime.

Two parts:

- the paper-scale model (`mann_edge.benchmark.build_paper_model`: 784 -> 6 x 1000 -> 10, two tasks, 90 % pruned
  per task; random weights, so no accuracy), masked unstructured and in 1x16 blocks (RSN2 ``block_size=16``, what
  TFLite's sparse int8 kernel runs), calibrated on standard normal inputs;
- the shipped samples, converted with their calibration and test sets (`mann_edge.samples`): accuracy per task.

Every export goes through `mann_edge.convert` (verified), every latency through `mann_edge.api.measure_export`
(a fresh process, batch 1, one thread). Core ML: sizes only (it cannot predict off Apple platforms).

Usage: ``python benchmarks/compression.py [--json out.json] [--repeats 200] [--part paper|samples]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

import mann_edge
from mann_edge import samples
from mann_edge.api import convert, measure_export
from mann_edge.converters.validation import scaled_atol
from mann_edge.files import size_of

# (label, format, dtype, storage, mask): the exports measured on the paper-scale model
PAPER_EXPORTS = [
    ("TFLite float32 dense", "tflite", "float32", "dense", "unstructured"),
    ("TFLite float32 sparse", "tflite", "float32", "sparse", "unstructured"),
    ("TFLite float16 sparse", "tflite", "float16", "sparse", "unstructured"),
    ("TFLite int8 dense", "tflite", "int8", "dense", "block16"),
    ("TFLite int8 block-16 sparse", "tflite", "int8", "sparse", "block16"),
    ("TFLite int8 unstructured (stored dense)", "tflite", "int8", "sparse", "unstructured"),
    ("TFLite int8_dynamic", "tflite", "int8_dynamic", "sparse", "unstructured"),
    ("ONNX float32 dense", "onnx", "float32", "dense", "unstructured"),
    ("ONNX float32 sparse", "onnx", "float32", "sparse", "unstructured"),
    ("ONNX int8 dense", "onnx", "int8", "dense", "unstructured"),
    ("ONNX int8 sparse", "onnx", "int8", "sparse", "unstructured"),
    ("ORT float32 dense (folded)", "ort", "float32", "dense", "unstructured"),
    ("ORT float32 sparse (kept)", "ort", "float32", "sparse", "unstructured"),
    ("ORT int8 dense (folded)", "ort", "int8", "dense", "unstructured"),
    ("ORT int8 sparse (kept)", "ort", "int8", "sparse", "unstructured"),
    ("Core ML float32 sparse", "coreml", "float32", "sparse", "unstructured"),
    ("Core ML palettized4 sparse", "coreml", "palettized4", "sparse", "unstructured"),
    ("Core ML palettized2 sparse", "coreml", "palettized2", "sparse", "unstructured"),
    ("Core ML int8_weights sparse", "coreml", "int8_weights", "sparse", "unstructured"),
]
SAMPLE_DTYPES = [("tflite", "int8"), ("onnx", "int8"), ("tflite", "float16"), ("coreml", "palettized8"),
                 ("coreml", "palettized6"), ("coreml", "palettized4"), ("coreml", "palettized2"),
                 ("coreml", "int8_weights")]


def _say(line: str) -> None:
    print(f"[compression] {line}", file=sys.stderr, flush=True)


def paper_scale(directory: Path, repeats: int) -> dict:
    """Sizes (fraction of the dense float32 export of the same format) and latencies of `PAPER_EXPORTS`."""
    from mann_edge.benchmark import TASKS, build_paper_model

    models = {mask: mann_edge.compact(build_paper_model(block_size=block), task_names=TASKS)
              for mask, block in (("unstructured", 1), ("block16", 16))}
    rng = np.random.default_rng(0)
    calibration = {spec.name: rng.normal(0, 1, (200, *spec.shape[1:])).astype("float32")
                   for spec in models["unstructured"].inputs}
    rows = []
    for index, (label, format, dtype, storage, mask) in enumerate(PAPER_EXPORTS):
        _say(f"{label} ({mask})")
        options = {"coreml": {"target": "macOS15"}} if format == "coreml" else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = convert(models[mask], directory / f"{index}", formats=[format], dtype=dtype, storage=storage,
                             options=options, calibration=calibration if scaled_atol(dtype) else None)
        path = result.artifacts[format]
        row = {"label": label, "format": format, "dtype": dtype, "storage": storage, "mask": mask,
               "bytes": size_of(path), "max_error": result.reports[format].max_abs_error,
               "sparse_layers": next(r["sparse_layers"] for r in result.files if r["format"] == format)}
        if mann_edge.formats.FORMATS[format].runs_here():
            row["latency_ms"] = measure_export(path, repeats=repeats)["latency_ms"]
        rows.append(row)
    baseline = {row["format"]: row["bytes"] for row in rows if row["dtype"] == "float32" and row["storage"] == "dense"}
    dense32 = baseline["tflite"]  # the dense float32 weights, in TFLite's flatbuffer: 23.2 MB
    for row in rows:
        row["fraction_of_dense_float32"] = row["bytes"] / baseline.get(row["format"], dense32)
    return {"rows": rows, "dense_float32_bytes": baseline}


def sample_accuracy(directory: Path) -> list[dict]:
    """Each sample task's accuracy per compressed export, next to float32, with the export's bytes."""
    rows = []
    for name in ("vision_tabular", "vision_text"):
        for format, dtype in SAMPLE_DTYPES:
            _say(f"{name}: {format} {dtype}")
            options = {"coreml": {"target": "macOS15"}} if format == "coreml" else {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                calibration = None if dtype == "float16" else samples.calibration_path(name)  # for quantized dtypes
                result = convert(samples.sample_path(name), directory / f"{name}_{format}_{dtype}", formats=[format],
                                 dtype=dtype, options=options, calibration=calibration,
                                 evaluation=samples.evaluation_path(name))
            for task in samples.sample_tasks(name):
                rows.append({"sample": name, "task": task, "format": format, "dtype": dtype,
                             "accuracy": result.scores[format][task], "float32": result.scores["float32"][task],
                             "file_fraction": next(r["ratio"] for r in result.files if r["format"] == format)})
    return rows


def format_report(result: dict) -> str:
    lines = []
    if "paper" in result:
        lines += ["Paper-scale model (784 -> 6x1000 -> 10, two tasks, 90 % pruned), batch 1, one thread:", "",
                  "| export | mask | bytes | of dense float32 | runs sparse | task_a ms | task_b ms |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for row in result["paper"]["rows"]:
            latency = row.get("latency_ms", {})
            layers = row["sparse_layers"]
            lines.append(f"| {row['label']} | {row['mask']} | {row['bytes'] / 1e6:.2f} MB | "
                         f"{100 * row['fraction_of_dense_float32']:.1f} % | "
                         f"{'?' if layers is None else f'{layers[0]}/{layers[1]}'} | "
                         + " | ".join(f"{latency[t]:.3f}" if t in latency else "-" for t in ("task_a", "task_b"))
                         + " |")
    if "samples" in result:
        lines += ["", "Samples, accuracy on their test sets (float32 in brackets):", "",
                  "| sample | task | export | accuracy | float32 | file vs dense float32 |", "|---|---|---|---:|---:|---:|"]
        for row in result["samples"]:
            lines.append(f"| {row['sample']} | {row['task']} | {row['format']} {row['dtype']} | "
                         f"{100 * row['accuracy']:.1f} % | {100 * row['float32']:.1f} % | "
                         f"{100 * row['file_fraction']:.1f} % |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures as JSON here")
    parser.add_argument("--repeats", type=int, default=200, help="timed runs per task (default: %(default)s)")
    parser.add_argument("--part", choices=("paper", "samples", "both"), default="both")
    args = parser.parse_args(argv)
    result = {}
    with tempfile.TemporaryDirectory(prefix="mann_edge_compression_") as work:
        if args.part in ("paper", "both"):
            result["paper"] = paper_scale(Path(work) / "paper", args.repeats)
        if args.part in ("samples", "both"):
            result["samples"] = sample_accuracy(Path(work) / "samples")
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
