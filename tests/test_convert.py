"""`mann_edge.convert` and the `convert` / `verify` commands: every format, verified, loadable, with its figures."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mann_edge
import zoo
from mann_edge.api import convert, verify
from mann_edge.cli import main
from mann_edge.converters import validation
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
    # ONNX and Core ML write one file per task: its own bytes; TFLite holds every task in one file: a share of it.
    assert rows[("vision", "onnx")]["bytes"] != rows[("text", "onnx")]["bytes"]
    assert rows[("vision", "tflite")]["shared"] and not rows[("vision", "onnx")]["shared"]
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
    with pytest.raises(mann_edge.errors.MannEdgeError, match=r"'tfjs'.*mann.*tflite.*onnx.*coreml"):
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
    report = verify(path, zoo.LEGACY / "mann_conv.h5", task_names=["task0", "task1"])
    assert report.ok and {c.task for c in report.checks} == {"task0", "task1"}


def test_overlapping_masks_warn_in_one_line_and_strict_refuses(tmp_path, capsys):
    model = mann_edge.load_legacy(zoo.LEGACY / "mann_conv.h5")
    layer = model.get_layer("multi_masked_conv2d")
    kernel, bias = layer.get_masks()
    kernel[1] = np.maximum(kernel[0], kernel[1])  # slab 1 also claims slab 0's kernel positions
    layer.set_masks([kernel, bias])
    source = str(tmp_path / "overlap.keras")
    model.save(source)
    assert main(["convert", source, "-o", str(tmp_path / "warned"), "--to", "onnx"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warned and all(line.startswith("mann-edge: warning: Multitask layer") for line in warned)
    assert main(["convert", source, "-o", str(tmp_path / "strict"), "--to", "onnx", "--strict"]) == 1
    assert "not disjoint" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "strict").exists()
    # the original packages' own files: kernels disjoint, bias masks all ones: --strict takes them
    assert main(["convert", str(zoo.LEGACY / "mann_conv.h5"), "-o", str(tmp_path / "legacy"), "--to", "onnx",
                 "--strict"]) == 0


# -- defects of the first release, each with the test that failed before its fix --------------------


def test_an_option_a_format_cannot_take_is_refused_before_anything_is_written(tmp_path, multiconv_compact):
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"TFLite.*'int8'.*needs calibration data.*ONNX.*int8.*Core ML.*int8"):
        convert(multiconv_compact, out, formats=["tflite", "onnx", "coreml"], dtype="int8")
    assert not out.exists()
    with pytest.raises(ConversionError, match=r"target"):
        convert(multiconv_compact, out, formats=["coreml"], options={"coreml": {"target": "iOS9"}})
    assert not out.exists()
    # nothing was left behind, so the same directory takes the corrected command
    with pytest.warns(UserWarning, match="int8_dynamic' stores every weight dense"):
        result = convert(multiconv_compact, out, formats=["tflite"], dtype="int8_dynamic")
    assert set(result.artifacts) == {"mann", "tflite"}


def test_an_unknown_task_leaves_nothing_behind(tmp_path, multiconv_compact, capsys):
    out = tmp_path / "out"
    with pytest.raises(mann_edge.errors.TaskError, match=r"'nope'.*digit.*parity"):
        convert(multiconv_compact, out, formats=["onnx"], tasks=["nope"])
    assert not out.exists()
    source = multiconv_compact.save(tmp_path / "m.mann")
    assert main(["convert", str(source), "-o", str(out), "--to", "onnx", "--tasks", "nope"]) == 1
    assert "'nope'" in capsys.readouterr().err and not out.exists()


def test_a_failing_step_removes_what_the_call_wrote(tmp_path, multiconv_compact, monkeypatch):
    from mann_edge.converters import onnx as onnx_export

    def broken(*args, **kwargs):
        raise ConversionError("onnx export broke")

    monkeypatch.setattr(onnx_export, "export", broken)
    (tmp_path / "out").mkdir()
    with pytest.raises(ConversionError, match="broke"):
        convert(multiconv_compact, tmp_path / "out", formats=["tflite", "onnx"])
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("format", FORMATS)
def test_verify_fails_an_export_that_lacks_a_task_of_the_source(format, tmp_path, multiconv_compact, capsys):
    result = convert(multiconv_compact, tmp_path, formats=[format], tasks=["digit"])
    source = multiconv_compact.save(tmp_path / "both.mann")
    for artifact in (result.artifacts[format], result.artifacts["mann"]):
        report = verify(artifact, source)
        assert not report.ok
        assert any(check.task == "parity" and not check.ok for check in report.checks)
        assert verify(artifact, source, tasks=["digit"]).ok
        assert main(["verify", str(artifact), "--against", str(source)]) == 1
        assert "parity" in capsys.readouterr().err


def test_inputs_of_different_batch_sizes_are_refused_by_every_backend(converted, mixed_compact):
    result, _ = converted
    task = mixed_compact.task("both")
    feed = dict(zip(["image", "tokens"], zoo.sample_batch(zoo.build_mixed(), 3, seed=1)))
    feed["tokens"] = feed["tokens"][:2]
    for format, path in result.artifacts.items():
        if not mann_edge.formats.FORMATS[format].runs_here():
            continue
        session = mann_edge.runtime.load(path)
        with pytest.raises(mann_edge.errors.InputError, match=r"'both'.*same batch size.*'image': 3.*'tokens': 2"):
            session.run(task.name, {spec.name: feed[spec.name] for spec in task.inputs})


def test_two_conversions_of_the_same_source_are_byte_identical(tmp_path, legacy_compacts, monkeypatch):
    from mann_edge.files import sha256_file

    source = tmp_path / "mlp.h5"
    source.write_bytes((zoo.LEGACY / "mann_mlp.h5").read_bytes())
    every = [*mann_edge.formats.EXPORT_FORMATS, "ort"]
    first = convert(str(source), tmp_path / "a", formats=every, task_names=["digits", "cancer"])
    second = convert(str(source), tmp_path / "b", formats=every, task_names=["digits", "cancer"])
    for format, path in first.artifacts.items():
        if format == "ort":  # onnxruntime writes some ORT-format tables in hash order: same model, other bytes
            assert (path / "required_operators.config").read_text() == \
                (second.artifacts[format] / "required_operators.config").read_text()
            for task in first.model.tasks:
                feed = validation.sample_inputs(first.model, task, 4)
                np.testing.assert_array_equal(mann_edge.runtime.load(path).run(task.name, feed)[0],
                                              mann_edge.runtime.load(second.artifacts[format]).run(task.name, feed)[0])
            continue
        assert sha256_file(path) == sha256_file(second.artifacts[format]), format
    assert "created" not in mann_edge.load_compact(first.artifacts["mann"]).provenance
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    stamped = convert(str(source), tmp_path / "c", formats=[], task_names=["digits", "cancer"])
    assert mann_edge.load_compact(stamped.artifacts["mann"]).provenance["created"] == "2023-11-14T22:13:20+00:00"


def test_the_table_shows_per_task_bytes_for_every_format_and_file_totals_once(converted, mixed_compact):
    result, _ = converted
    rows = {(row["task"], row["format"]): row for row in result.table}
    files = {row["format"]: row for row in result.files}
    assert set(files) == {"mann", *FORMATS}
    for format in ("mann", "tflite"):  # one file holds every task: the tasks' shares add up to it
        shares = [rows[(task, format)] for task in mixed_compact.task_names]
        assert all(row["shared"] for row in shares)
        assert sum(row["bytes"] for row in shares) == pytest.approx(files[format]["bytes"], abs=len(shares))
        assert sum(row["dense_bytes"] for row in shares) == pytest.approx(files[format]["dense_bytes"])
    for task in mixed_compact.task_names:  # a file per task: its own bytes
        assert not rows[(task, "onnx")]["shared"]
    table = result.format_table()
    assert table.count("model.tflite") == 1 and "share of a file" in table


def test_every_format_has_the_converter_entry_points_convert_calls():
    from mann_edge.formats import FORMATS as ALL

    for format in ALL.values():
        module = format.converter_module()
        missing = [name for name in ("check_options", "export", "validate", "runner", "sparse_layers",
                                     "artifact_name", "task_files") if not callable(getattr(module, name, None))]
        assert not missing, (format.name, missing)
        assert set(format.calibrated_dtypes) <= set(format.dtypes), format.name


def _rank6_model():
    """A model Core ML cannot hold (a rank-6 tensor) and every other format can."""
    import keras

    x = keras.Input((32,), name="x")
    deep = keras.layers.Reshape((2, 2, 2, 2, 2), name="deep")(x)
    return keras.Model(x, keras.layers.Dense(2, name="y")(keras.layers.Reshape((32,))(deep)))


def test_a_format_that_cannot_express_the_model_is_named_and_the_others_are_written(tmp_path):
    from mann_edge.errors import SkippedFormatWarning

    with pytest.warns(SkippedFormatWarning, match=r"Core ML not written: .*cannot express layer 'deep'"):
        result = mann_edge.convert(_rank6_model(), tmp_path / "o", formats=["tflite", "coreml"])
    assert set(result.artifacts) == {"mann", "tflite"} and list(result.skipped) == ["coreml"]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["model.mann", "model.tflite"]
    assert "not written: Core ML: Core ML export cannot express layer 'deep'" in result.format_table()


def test_when_no_format_asked_for_can_express_the_model_nothing_is_written(tmp_path):
    from mann_edge.errors import ConversionError

    with pytest.raises(ConversionError, match=r"cannot express layer 'deep'"):
        mann_edge.convert(_rank6_model(), tmp_path / "o", formats=["coreml"])
    assert not (tmp_path / "o").exists()
