"""ORT-format export (ONNX Runtime Mobile) and fixed input shapes: files, operator config, what the conversion does
to the sparse encoding, loading through `mann_edge.runtime.load`, and onnxruntime's own mobile usability checker."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mann_edge
from mann_edge import samples
from mann_edge.api import convert
from mann_edge.cli import main
from mann_edge.converters import onnx as onnx_export
from mann_edge.converters import ort, validation
from mann_edge.errors import ConversionError, MannEdgeError
from mann_edge.formats import detect_format
from mann_edge.runtime.onnx import read_ort_metadata


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.ort"))


@pytest.fixture(scope="module")
def exports(tmp_path_factory, pruned_compact):
    """The 90 %-pruned model as ORT files: bitmask kept (sparse) and folded (dense), and its ONNX export."""
    out = tmp_path_factory.mktemp("ort")
    with pytest.warns(ort.SlowEncodingWarning, match=r"keep the bitmask encoding.*expands at every run.*"
                                                     r"--storage dense"):
        sparse = ort.export(pruned_compact, out / "sparse")
    return {
        "sparse": sparse,
        "dense": ort.export(pruned_compact, out / "dense", sparse=False),
        "onnx": onnx_export.export(pruned_compact, out / "onnx"),
    }


def test_each_task_gets_an_ort_file_and_the_operator_config_of_a_reduced_build(exports, pruned_compact):
    for label in ("sparse", "dense"):
        path = exports[label]
        assert detect_format(path).name == "ort"
        assert sorted(p.name for p in path.iterdir()) == ["required_operators.config", "task_a.ort", "task_b.ort"]
        config = (path / ort.CONFIG_NAME).read_text()
        assert re.search(r"^ai\.onnx;\d+;.*(MatMul|Gemm)", config, re.M), config
        assert "partial" not in config and "/" not in config.split("\n", 3)[1]  # files named, not staging paths
        assert read_ort_metadata(path / "task_a.ort")["mann_edge_task"] == "task_a"
    # the bitmask expansion's operators are needed only where the encoding is kept
    assert "CumSum" in (exports["sparse"] / ort.CONFIG_NAME).read_text()
    assert "CumSum" not in (exports["dense"] / ort.CONFIG_NAME).read_text()


def test_both_forms_load_in_the_runtime_and_match_the_compact_model(exports, pruned_compact):
    for label in ("sparse", "dense"):
        report = ort.validate(pruned_compact, exports[label]).raise_for_errors()
        assert report.format == "ort" and report.max_abs_error <= 1e-5
        session = mann_edge.runtime.load(exports[label])
        assert session.task_names == pruned_compact.task_names


def test_the_conversion_folds_the_encoding_unless_kept_and_the_kept_one_is_the_smallest(exports):
    sizes = {label: _size(exports[label]) for label in ("sparse", "dense")}
    onnx_bytes = sum(f.stat().st_size for f in exports["onnx"].glob("*.onnx"))
    dense_weights = 2 * 4 * (256 * 512 + 512 * 512 + 512 * 10)  # two tasks' float32 kernels
    print(f"\nORT sizes: {sizes}; ONNX (bitmask) {onnx_bytes}; dense float32 kernels {dense_weights}")
    assert sizes["dense"] > dense_weights  # folded: every weight dense again
    assert sizes["sparse"] < 0.3 * sizes["dense"]  # the kept encoding: what ONNX Runtime Mobile loads smallest


def test_int8_ort_from_the_qdq_export(tmp_path, pruned_compact):
    rng = np.random.default_rng(1)
    calibration = {spec.name: rng.normal(0, 1, (32, *spec.shape[1:])).astype("float32") for spec in pruned_compact.inputs}
    path = ort.export(pruned_compact, tmp_path / "int8", dtype="int8", calibration=calibration, sparse=False)
    assert "QuantizeLinear" in (path / ort.CONFIG_NAME).read_text()
    inputs = {task.name: {s.name: calibration[s.name] for s in task.inputs} for task in pruned_compact.tasks}
    report = ort.validate(pruned_compact, path, inputs=inputs).raise_for_errors()
    assert report.atol_scaled


def test_a_fixed_batch_is_checked_at_that_size_and_other_sizes_are_refused(tmp_path, pruned_compact):
    path = onnx_export.export(pruned_compact, tmp_path / "b4", batch=4)
    report = onnx_export.validate(pruned_compact, path).raise_for_errors()
    assert {check.batch for check in report.checks} == {4}
    session = mann_edge.runtime.load(path)
    task = pruned_compact.tasks[0]
    with pytest.raises(MannEdgeError, match=r"onnxruntime failed to run task 'task_a'.*"):
        session.run(task.name, validation.sample_inputs(pruned_compact, task, 2))
    with pytest.raises(ConversionError, match=r"ORT-format export option `batch` must be a positive int \(or None: free\). "
                                              r"Received: batch=0"):
        ort.export(pruned_compact, tmp_path / "b0", batch=0)
    assert not (tmp_path / "b0").exists()


def _coverage(path: Path) -> dict[str, tuple[int, int]]:
    """Execution provider -> (nodes it can take, nodes) as onnxruntime's mobile usability checker reports them."""
    result = subprocess.run([sys.executable, "-m", "onnxruntime.tools.check_onnx_model_mobile_usability", str(path)],
                            capture_output=True, text=True, check=True)
    found = re.findall(r"total of (\d+)/(\d+) nodes can be handled by the (NNAPI|CoreML NeuralNetwork|CoreML MLProgram) EP",
                       result.stdout + result.stderr)
    coverage: dict[str, tuple[int, int]] = {}
    for taken, total, provider in found:  # the first report per provider: the model as it is (then "if fixed")
        coverage.setdefault(provider, (int(taken), int(total)))
    return coverage


def test_fixed_shapes_let_the_mobile_providers_take_the_sample_tasks(tmp_path):
    result = convert(samples.sample_path("vision_tabular"), tmp_path / "o", formats=["onnx"],
                     options={"onnx": {"batch": 1}})
    for task, file in onnx_export.task_files(result.artifacts["onnx"]).items():
        coverage = _coverage(file)
        assert set(coverage) == {"NNAPI", "CoreML NeuralNetwork", "CoreML MLProgram"}, coverage
        assert all(taken == total for taken, total in coverage.values()), (task, coverage)
    # token ids (the embedding's guard against negative ids, in ops both providers take), global pools over a
    # sequence (GlobalMaxPool over a one-column image, not ReduceMax) and layer normalization (means as a MatMul,
    # not ReduceMean): every node of the text tasks, but for Core ML's ML Program provider the embedding's Gather
    # (it takes GatherND only, which the others lack)
    for name, tasks in (("vision_text", ["sentiment"]), ("vision_sequence", ["sentiment", "negation"])):
        text = convert(samples.sample_path(name), tmp_path / name, formats=["onnx"], options={"onnx": {"batch": 1}})
        for task in tasks:
            coverage = _coverage(onnx_export.task_files(text.artifacts["onnx"])[task])
            missing = {provider: total - taken for provider, (taken, total) in coverage.items()}
            assert missing == {"NNAPI": 0, "CoreML NeuralNetwork": 0, "CoreML MLProgram": 1}, (name, task, coverage)
    free = convert(samples.sample_path("vision_tabular"), tmp_path / "free", formats=["onnx"])
    file = onnx_export.task_files(free.artifacts["onnx"])["digits"]
    assert _coverage(file)["NNAPI"][0] == 0  # a dynamic batch dimension: nothing for NNAPI


def test_the_command_takes_ort_and_batch(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["convert", str(samples.sample_path("vision_tabular")), "-o", str(out), "--to", "ort",
                 "--batch", "1", "--storage", "dense"]) == 0
    assert sorted(p.name for p in (out / "ort").iterdir()) == ["cancer.ort", "digits.ort", "required_operators.config"]
    session = mann_edge.runtime.load(out / "ort")
    assert session.run("cancer", np.zeros((1, 30), "float32"))[0].shape == (1, 2)
    assert main(["convert", str(samples.sample_path("vision_tabular")), "-o", str(tmp_path / "x"), "--to", "coreml",
                 "--batch", "1"]) == 1
    assert "--batch fixes the input shapes of the tflite, onnx, ort exports" in capsys.readouterr().err
