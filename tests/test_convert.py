"""`mann_edge.convert` and the `convert` / `verify` commands: every format, verified, loadable, with its figures."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import mann_edge
import zoo
from mann_edge.api import convert, verify
from mann_edge.cli import main
from mann_edge.compaction import MaskOverlapWarning
from mann_edge.errors import ConversionError, OutputExistsError, ValidationError
from mann_edge.graph.model import CompactModel
from mann_edge.sparse import CSRWeight

FORMATS = ("tflite", "onnx", "coreml")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, mixed_compact):
    out = tmp_path_factory.mktemp("convert")
    lines: list[str] = []
    result = convert(mixed_compact, out / "mixed", progress=lines.append)
    return result, lines


def test_convert_writes_the_bundle_and_every_format_into_the_directory(converted, mixed_compact):
    result, lines = converted
    assert set(result.artifacts) == {"mann", *FORMATS}
    names = {format: path.name for format, path in result.artifacts.items()}
    assert names == {"mann": "model.mann", "tflite": "model.tflite", "onnx": "onnx", "coreml": "coreml"}
    assert all(path.parent == result.out_dir for path in result.artifacts.values())
    assert any("tflite" in line for line in lines) and lines[0].startswith("[1/")


def test_every_artifact_was_verified_for_every_task(converted, mixed_compact):
    result, _ = converted
    for format, report in result.reports.items():
        assert report.ok, format
        assert {check.task for check in report.checks} == set(mixed_compact.task_names)
        assert report.max_abs_error <= 1e-5


def test_artifacts_load_in_the_runtime_and_match_the_compact_model(converted, mixed_compact):
    result, _ = converted
    inputs = zoo.sample_batch(zoo.build_mixed(), 4, seed=7)
    by_name = dict(zip(["image", "tokens"], inputs))
    for format in ("mann", "tflite", "onnx"):
        session = mann_edge.runtime.load(result.artifacts[format])
        for task in mixed_compact.tasks:
            feed = {spec.name: by_name[spec.name] for spec in task.inputs}
            for got, want in zip(session.run(task.name, feed), mixed_compact.run(task.name, feed)):
                np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"{format} {task.name}")


def test_table_has_a_row_per_task_and_artifact_with_its_figures(converted, mixed_compact):
    result, _ = converted
    rows = {(row["task"], row["format"]): row for row in result.table}
    assert set(rows) == {(task, format) for task in mixed_compact.task_names for format in ("mann", *FORMATS)}
    stats = {row["task"]: row for row in mixed_compact.task_stats()}
    for (task, format), row in rows.items():
        assert row["nonzeros"] == stats[task]["nonzeros"]
        assert row["bytes"] > 0 and row["ratio"] == pytest.approx(row["bytes"] / row["dense_bytes"])
        assert row["max_error"] is not None and row["max_error"] <= 1e-5
    # ONNX and Core ML write one file per task: its own bytes; TFLite holds every task in one file.
    assert rows[("vision", "onnx")]["bytes"] != rows[("text", "onnx")]["bytes"]
    assert rows[("vision", "tflite")]["bytes"] == rows[("text", "tflite")]["bytes"]
    assert "vs dense" in result.format_table()


def test_convert_refuses_existing_outputs_before_any_work(converted, mixed_compact):
    result, _ = converted
    before = result.artifacts["mann"].stat().st_mtime_ns
    with pytest.raises(OutputExistsError, match="model.mann"):
        convert(mixed_compact, result.out_dir, formats=["tflite"])
    assert result.artifacts["mann"].stat().st_mtime_ns == before


def test_tasks_subset_and_float16(tmp_path, legacy_compacts):
    result = convert(legacy_compacts["mann_mlp"], tmp_path, formats=["tflite", "onnx"], tasks=["task1"], dtype="float16")
    for format in ("tflite", "onnx"):
        session = mann_edge.runtime.load(result.artifacts[format])
        assert session.task_names == ["task1"]
    ref = zoo.legacy_reference("mann_mlp")
    (got,) = mann_edge.runtime.load(result.artifacts["onnx"]).run("task1", ref["x1"])
    np.testing.assert_allclose(got, ref["out1"], atol=1e-2, rtol=1e-2)
    assert all(report.atol == 1e-2 and report.ok for report in result.reports.values())
    bundle = mann_edge.load_compact(result.artifacts["mann"])  # the bundle stores float16 values too
    assert {str(w.dtype) for w in bundle.weights.values()} == {"float16"}


def test_unknown_format_is_refused_before_any_work(tmp_path, multiconv_compact):
    with pytest.raises(ConversionError, match=r"'tfjs'.*coreml.*onnx.*tflite"):
        convert(multiconv_compact, tmp_path / "out", formats=["tfjs"])
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _perturbed(model: CompactModel) -> CompactModel:
    """The same graph with every weight value scaled: what a converter bug would export."""
    weights = {
        key: CSRWeight(w.shape, w.layout, w.indptr, w.indices, w.data * 1.5) if isinstance(w, CSRWeight)
        else (w * 1.5 if np.issubdtype(w.dtype, np.floating) else w)
        for key, w in model.weights.items()
    }
    return CompactModel(model.inputs, model.nodes, model.tasks, weights, model.provenance)


def test_a_mismatching_export_fails_and_is_removed(tmp_path, multiconv_compact, monkeypatch):
    from mann_edge.converters import tflite

    real_export = tflite.export
    monkeypatch.setattr(tflite, "export", lambda model, path, **kw: real_export(_perturbed(model), path, **kw))
    with pytest.raises(ValidationError, match=r"tflite export .*model.tflite does not match.*task 'digit'"):
        convert(multiconv_compact, tmp_path, formats=["tflite"])
    assert not (tmp_path / "model.tflite").exists()


def test_coreml_multifunction_target_through_convert(tmp_path, multiconv_compact):
    result = convert(multiconv_compact, tmp_path, formats=["coreml"], options={"coreml": {"target": "macOS15"}})
    assert result.artifacts["coreml"].name == "model.mlpackage" and result.reports["coreml"].ok


# -- the commands --------------------------------------------------------------------------------


def test_convert_command_from_a_legacy_file(tmp_path, capsys):
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MaskOverlapWarning)
        code = main(["convert", str(zoo.LEGACY / "beyondml_conv.h5"), "-o", str(out), "--to", "tflite,onnx",
                     "--task-names", "digits,fashion", "--json"])
    assert code == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert set(printed["artifacts"]) == {"mann", "tflite", "onnx"}
    assert {row["task"] for row in printed["table"]} == {"digits", "fashion"}
    assert "[1/4]" in captured.err
    ref = zoo.legacy_reference("beyondml_conv")
    session = mann_edge.runtime.load(printed["artifacts"]["tflite"])
    (got,) = session.run("fashion", ref["x1"])
    np.testing.assert_allclose(got, ref["out1"], atol=1e-5)


def test_convert_command_from_a_keras_file_prints_the_table(tmp_path, capsys, multiconv_model):
    source = tmp_path / "multiconv.keras"
    multiconv_model.save(source)
    assert main(["convert", str(source), "-o", str(tmp_path / "out"), "--to", "onnx"]) == 0
    table = capsys.readouterr().out
    assert "digit" in table and "parity" in table and "onnx" in table and "vs dense" in table


def test_verify_command_passes_on_a_matching_artifact_and_fails_on_another_model(tmp_path, capsys, legacy_compacts):
    from mann_edge.converters import tflite

    mann_path = legacy_compacts["mann_mlp"].save(tmp_path / "mann_mlp.mann")
    other = legacy_compacts["beyondml_mlp"].save(tmp_path / "beyondml_mlp.mann")
    artifact = tflite.export(legacy_compacts["mann_mlp"], tmp_path / "mann_mlp.tflite")
    assert main(["verify", str(artifact), "--against", str(mann_path)]) == 0
    assert "every task matches" in capsys.readouterr().out
    assert main(["verify", str(artifact), "--against", str(other)]) == 1
    captured = capsys.readouterr()
    assert "MISMATCH" in captured.out and "does not match" in captured.err


def test_verify_api_reports_every_task(tmp_path, legacy_compacts):
    path = legacy_compacts["mann_conv"].save(tmp_path / "conv.mann")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MaskOverlapWarning)
        report = verify(path, zoo.LEGACY / "mann_conv.h5", task_names=["task0", "task1"])
    assert report.ok and {c.task for c in report.checks} == {"task0", "task1"}


@pytest.mark.parametrize("name", ["vision_tabular", "vision_text"])
def test_trained_sample_models_match_keras_on_every_backend(name, tmp_path):
    """The shipped RSN2-trained samples (convolutions, pooling, an embedding): every backend equals Keras."""
    import keras

    from mann_edge import samples

    model = keras.models.load_model(samples.sample_path(name))
    result = convert(samples.sample_path(name), tmp_path, task_names=samples.sample_tasks(name))
    data = samples.sample_data(name)
    for index, task in enumerate(samples.sample_tasks(name)):
        for batch in (1, 32):
            x = data[task].x_test[:batch]
            feed = [np.zeros((batch, *kt.shape[1:]), kt.dtype) for kt in model.inputs]
            feed[[kt.name for kt in model.inputs].index(result.model.task(task).inputs[0].name)] = x
            expected = zoo.keras_outputs(model, feed)[index]
            for format in ("mann", "tflite", "onnx"):
                (got,) = mann_edge.runtime.load(result.artifacts[format]).run(task, x)
                np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0, err_msg=f"{name} {task} {format}")
    assert result.reports["coreml"].ok


def test_overlapping_masks_warn_in_one_line_and_strict_refuses(tmp_path, capsys):
    source = str(zoo.LEGACY / "mann_conv.h5")  # the original's conv bias masks overlap
    assert main(["convert", source, "-o", str(tmp_path / "warned"), "--to", "onnx"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warned and all(line.startswith("mann-edge: warning: Multitask layer") for line in warned)
    assert main(["convert", source, "-o", str(tmp_path / "strict"), "--to", "onnx", "--strict"]) == 1
    assert "not disjoint" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "strict" / "model.mann").exists()
