"""`mann-edge demo` and `mann-edge inspect --plot` as a new user runs them."""

from __future__ import annotations

import subprocess
import sys

import matplotlib.image

from mann_edge import samples
from mann_edge.cli import main


def test_demo_takes_the_sample_through_every_format_and_predicts_each_task(tmp_path, capsys):
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
    for task in tasks:
        assert any(line.split()[:2] == [task, "coreml"] for line in printed.splitlines())


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
