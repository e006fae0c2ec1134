"""`mann-edge bench MODEL` on a user's model: the table, the JSON, the ratios and the kernels' figures.

Timings are printed, never asserted: the machine is shared. These tests check that every figure
the benchmark reports is there and consistent, on a small bundle and the bundle backends (the
exports' runtimes are measured the same way; `tests/test_demo.py` runs them through the demo).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mann_edge import benchmark
from mann_edge.cli import main
from mann_edge.graph.model import CompactModel, Node, Task, TensorSpec
from mann_edge.sparse import encode_weight


def _bundle(tmp_path):
    """Two tasks on one input: 40 -> 24 relu -> 5 softmax each, about 80 % zeros."""
    rng = np.random.default_rng(0)
    nodes, weights, tasks = [], {}, []
    spec = TensorSpec("x", (None, 40))
    for task in ("left", "right"):
        previous = "x"
        for i, (n_in, n_out, activation) in enumerate(((40, 24, "relu"), (24, 5, "softmax"))):
            name = f"{task}_{i}"
            kernel = rng.normal(0, 1, (n_in, n_out)).astype(np.float32) * (rng.random((n_in, n_out)) < 0.2)
            weights[f"{name}/kernel"] = encode_weight(kernel, "oi")
            weights[f"{name}/bias"] = encode_weight(rng.normal(0, 1, n_out).astype(np.float32))
            nodes.append(Node(name, "dense", (previous,), {"kernel": f"{name}/kernel", "bias": f"{name}/bias"},
                              {"activation": activation}, (None, n_out)))
            previous = name
        tasks.append(Task(task, (spec,), (TensorSpec(f"{task}_y", (None, 5)),), (previous,)))
    return CompactModel([spec], nodes, tasks, weights).save(tmp_path / "mine.mann")


def test_bench_measures_a_users_bundle_on_every_bundle_backend(tmp_path):
    path = _bundle(tmp_path)
    result = benchmark.run_benchmark(model=path, repeats=3, threads=(1,), batches=(1, 3), json=True,
                                     backends=["bundle", "bundle_float16", "bundle_scipy"], cold_start=False)
    part = result["models"]["mine.mann"]
    assert part["model"]["tasks"] == ["left", "right"]
    assert set(part["backends"]) == {"bundle", "bundle_float16", "bundle_scipy"}
    for name, by_threads in part["backends"].items():
        entry = by_threads["1"]
        assert entry["max_abs_error"] <= entry["tolerance"] == (1e-2 if name == "bundle_float16" else 1e-5)
        assert entry["start_s"] == pytest.approx(entry["load_s"] + entry["first_run_s"])
        assert entry["peak_rss_bytes"] >= entry["baseline_rss_bytes"] > 0
        for task in ("left", "right"):
            assert set(entry["tasks"][task]) == {"1", "3"}
            timing = entry["tasks"][task]["1"]
            assert 0 < timing["p10_s"] <= timing["median_s"] <= timing["p90_s"]
    ratios = part["ratios"]["1"]
    kernel = part["kernels"]["float32"]["left"]
    assert kernel["nonzeros"] == part["model"]["per_task"]["left"]["kernel_nonzeros"] > 0
    row = ratios["bundle/left/b1"]
    assert row["gb_per_s"] == pytest.approx(kernel["bytes"] / row["bundle_s"] / 1e9)
    assert row["floor_s"] == pytest.approx(kernel["bytes"] / result["machine"]["read_bandwidth_bytes_per_s"])
    assert row["speedup_vs_dense"] is None  # no dense peer was measured
    assert "gb_per_s" not in ratios["bundle_scipy/left/b1"]
    report = benchmark.format_report(result)
    assert "== mine.mann" in report and "mann-edge bundle runtime, float16 values" in report
    assert "bundle/right/b1: kernels read" in report


def test_bench_command_prints_json_for_scripts(tmp_path, capsys):
    path = _bundle(tmp_path)
    assert main(["bench", str(path), "--backends", "bundle", "--threads", "1", "--repeats", "2", "--batches", "1",
                 "--no-cold-start", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["batches"] == [1] and printed["threads"] == [1]
    assert printed["models"]["mine.mann"]["backends"]["bundle"]["1"]["kernels"] in ("numba", "numpy")


def test_bench_refuses_masks_with_a_model_and_unknown_backends(tmp_path):
    path = _bundle(tmp_path)
    with pytest.raises(ValueError, match="masks"):
        benchmark.run_benchmark(model=path, masks=["block4"])
    with pytest.raises(ValueError, match="Unknown backends"):
        benchmark.run_benchmark(model=path, backends=["tflite_fast"])


def test_task_inputs_draw_ids_inside_the_embedding_tables():
    task = Task("t", (TensorSpec("ids", (None, 6), "int32"), TensorSpec("x", (None, None, 3))), (), (),
                id_limits={"ids": 4})
    inputs = benchmark.task_inputs(task, 5)
    assert inputs["ids"].dtype == np.int32 and inputs["ids"].shape == (5, 6) and 0 <= inputs["ids"].min()
    assert inputs["ids"].max() < 4
    assert inputs["x"].shape == (5, 8, 3) and inputs["x"].dtype == np.float32


def test_the_bundle_is_timed_after_a_process_compiled_its_kernels(tmp_path, monkeypatch):
    # start-up is reported "with the kernels compiled once on this machine": each numba backend gets a throwaway
    # process first (which compiles into numba's cache if it is empty), then the timed one
    path = _bundle(tmp_path)
    calls = []
    real = benchmark._measure_in_subprocess

    def recording(name, artifact, threads, repeats, *args, **kwargs):
        calls.append((name, threads, repeats))
        return real(name, artifact, threads, repeats, *args, **kwargs)

    monkeypatch.setattr(benchmark, "_measure_in_subprocess", recording)
    benchmark.run_benchmark(model=path, repeats=2, threads=(1,), batches=(1,), backends=["bundle", "bundle_scipy"],
                            cold_start=False)
    assert calls == [("bundle", 1, 1), ("bundle", 1, 2), ("bundle_scipy", 1, 2)]


def test_rounds_measure_every_backend_in_turns_and_report_the_median(tmp_path, monkeypatch):
    path = _bundle(tmp_path)
    calls = []
    real = benchmark._measure_in_subprocess

    def recording(name, artifact, threads, repeats, *args, **kwargs):
        entry = real(name, artifact, threads, repeats, *args, **kwargs)
        if repeats > 1:  # a timed process: mark its load time with its turn
            calls.append(name)
            entry["load_s"] = float(len(calls))
            entry["tasks"]["left"]["1"]["median_s"] = 10.0 * len(calls)
        return entry

    monkeypatch.setattr(benchmark, "_measure_in_subprocess", recording)
    result = benchmark.run_benchmark(model=path, repeats=2, threads=(1,), batches=(1,), rounds=3,
                                     backends=["bundle", "bundle_scipy"], cold_start=False)
    assert calls == ["bundle", "bundle_scipy"] * 3
    bundle = result["models"]["mine.mann"]["backends"]["bundle"]["1"]
    assert bundle["rounds"] == 3 and bundle["load_s"] == 3.0  # turns 1, 3, 5
    assert bundle["tasks"]["left"]["1"]["median_s"] == 30.0
    assert bundle["start_s"] == pytest.approx(bundle["load_s"] + bundle["first_run_s"])
    assert "in 3 processes, in turns" in benchmark.format_report(result)
    with pytest.raises(ValueError, match="rounds"):
        benchmark.run_benchmark(model=path, rounds=0)
