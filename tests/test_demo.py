"""`mann-edge demo` and `mann-edge inspect --plot` as a new user runs them."""

from __future__ import annotations

import subprocess
import sys

import matplotlib.image
import pytest

from mann_edge import samples
from mann_edge.cli import main


def test_demo_takes_the_sample_through_every_format_and_predicts_each_task(tmp_path, capsys, monkeypatch):
    from mann_edge import benchmark

    measured = []
    measure_exports = benchmark.measure_exports

    def spy(*args, **kwargs):  # the demo's latencies are the benchmark's measurement, not its own
        measured.append(measure_exports(*args, **kwargs))
        return measured[-1]

    monkeypatch.setattr(benchmark, "measure_exports", spy)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {"model.mann", "model.tflite", "onnx", "coreml"}
    tasks = samples.sample_tasks("vision_tabular")
    prediction_rows = [line.split() for line in printed.split("One prediction per task")[1].splitlines()
                       if line.split() and line.split()[0] in tasks]
    assert {(row[0], row[1]) for row in prediction_rows} == {
        (task, backend) for task in tasks for backend in ("bundle", "litert", "onnxruntime")}
    for row in prediction_rows:  # the shipped models classify these held-out examples correctly
        assert row[2] == row[3], row
    (result,) = measured
    latency = benchmark.latencies(result)  # artifact -> task -> seconds
    assert len(prediction_rows) == len(latency) * len(tasks)  # one row per task and measured export
    for row in prediction_rows:
        printed_ms = float(row[4])
        assert any(printed_ms == pytest.approx(by_task[row[0]] * 1e3, abs=5e-4) for by_task in latency.values()), row
    for task in tasks:
        assert any(line.split()[:2] == [task, "coreml"] for line in printed.splitlines())
    summary = printed.split("\n\n")[0]  # per task: accuracy dense vs pruned, sparsity reached, why pruning stopped
    assert summary.count("of its own weights pruned (target 90%)") == len(tasks)
    assert summary.count("pruning: reached the target; judged on") == len(tasks)
    assert "!" not in summary


def test_demo_train_prepares_reproducible_kernels_and_prints_the_trained_summary(tmp_path, capsys, monkeypatch):
    # The training itself is tested in test_rsn2 and by sample_models/train.py; here: what --train runs and prints.
    import shutil

    from mann_edge import determinism, sample_training

    calls = []

    def fake_train_sample(name, out_dir, *, force=False):
        calls.append((name, out_dir, force))
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(samples.sample_path(name), out_dir / f"{name}.keras")
        record = samples.sample_record(name)
        record["tasks"]["cancer"]["sparsity"] = 0.5  # as if cancer had stopped early
        return record

    monkeypatch.setattr(sample_training, "train_sample", fake_train_sample)
    monkeypatch.setattr(determinism, "prepare_environment", lambda: calls.append("prepared") or True)
    out = tmp_path / "demo"
    assert main(["demo", "--train", "--out", str(out)]) == 0
    assert calls[0] == "prepared" and calls[1] == ("vision_tabular", out, False)
    printed = capsys.readouterr().out
    assert "just trained in" in printed
    assert "! cancer is below its target sparsity" in printed


def test_demo_refuses_to_overwrite_an_earlier_run_without_force(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "model.tflite").write_bytes(b"mine")
    result = subprocess.run([sys.executable, "-m", "mann_edge.cli", "demo", "--out", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "--force" in result.stderr.splitlines()[-1]
    assert (out / "model.tflite").read_bytes() == b"mine"
    assert "absl" not in result.stderr and "oneDNN" not in result.stderr  # TensorFlow's start-up noise is filtered


def test_inspect_plot_draws_the_masks_and_the_sizes(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--sample", "vision_text"]) == 0
    picture = tmp_path / "masks.png"
    assert main(["inspect", str(out / "model.mann"), "--plot", str(picture)]) == 0
    assert "sentiment" in capsys.readouterr().out
    image = matplotlib.image.imread(picture)
    assert image.shape[0] > 300 and image.shape[1] > 300
