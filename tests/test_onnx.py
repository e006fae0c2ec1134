"""ONNX export and onnxruntime backend: parity with Keras and the recorded legacy outputs, the bitmask
weight encoding, the files' metadata, errors.

Every export is run by onnxruntime through `mann_edge.runtime.load`, the way users run it.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import mann_edge
import zoo
from mann_edge.bundle import manifest_of
from mann_edge.converters import onnx as onnx_export
from mann_edge.converters import onnx_lowering
from mann_edge.converters.lowering import encode_bitmask
from mann_edge.converters.metadata import manifest_text, task_manifest_text
from mann_edge.errors import ConversionError, MannEdgeError, OutputExistsError
from mann_edge.graph.model import CompactModel, Node, Task, TensorSpec
from mann_edge.formats import METADATA_DTYPE, METADATA_MANIFEST, METADATA_TASK
from mann_edge.runtime.onnx import OnnxSession, read_metadata

# What expands an encoded weight; none of it may be left once onnxruntime has folded the constants.
EXPANSION_OPS = {"Cast", "Div", "Mod", "CumSum", "Concat", "Slice"}


def _files(path: Path) -> list[Path]:
    return sorted(Path(path).glob("*.onnx"))


def _size(path: Path) -> int:
    return sum(file.stat().st_size for file in _files(path))


def _initializers(file: Path) -> dict[str, np.ndarray]:
    return {init.name: onnx.numpy_helper.to_array(init) for init in onnx.load(str(file)).graph.initializer}


def _optimized_graph(file: Path, tmp: Path) -> onnx.GraphProto:
    """The graph onnxruntime runs for ``file`` after its basic optimizations (constant folding among them)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp / f"optimized_{file.name}")
    ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath).graph


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def zoo_exports(mixed_compact, multiconv_compact, out):
    compacts = {"mixed": mixed_compact, "multiconv": multiconv_compact}
    exports, seconds = {}, {}
    for name, cm in compacts.items():
        start = time.perf_counter()
        exports[name] = onnx_export.export(cm, out / name)
        seconds[name] = round(time.perf_counter() - start, 3)
    print(f"\nONNX export seconds: {seconds}")
    return exports


@pytest.fixture(scope="module")
def activation_export(out):
    """The 18-task model of every parametrized activation, exported: (model, path)."""
    cm = zoo.parametrized_activations()
    return cm, onnx_export.export(cm, out / "activation_parameters")


@pytest.fixture(scope="module")
def pruned(out, pruned_compact):
    """The 90 %-pruned model exported sparse and dense, float32 and float16, with export times."""
    cm = pruned_compact
    exports, seconds = {}, {}
    for label, options in {
        "sparse32": {"sparse": True, "dtype": "float32"},
        "dense32": {"sparse": False, "dtype": "float32"},
        "sparse16": {"sparse": True, "dtype": "float16"},
        "dense16": {"sparse": False, "dtype": "float16"},
    }.items():
        start = time.perf_counter()
        exports[label] = onnx_export.export(cm, out / f"pruned_{label}", **options)
        seconds[label] = round(time.perf_counter() - start, 3)
    return cm, exports, seconds


# -- parity --------------------------------------------------------------------------------------


def test_dense_over_the_last_axis_of_a_sequence_and_an_all_zero_kernel(out):
    rng = np.random.default_rng(2)
    x = TensorSpec("x", (None, 3, 48))
    kernel = rng.normal(0, 1, (48, 40)).astype("float32")
    kernel[rng.random(kernel.shape) < 0.8] = 0.0
    nodes = [
        Node("proj", "dense", ("x",), {"kernel": "kernel", "bias": "bias"}, {"activation": "tanh"}, (None, 3, 40)),
        Node("off", "dense", ("proj",), {"kernel": "zeros"}, {}, (None, 3, 40)),
    ]
    tasks = [Task("seq", (x,), (TensorSpec("y", (None, 3, 40)),), ("proj",)),
             Task("off", (x,), (TensorSpec("z", (None, 3, 40)),), ("off",))]
    cm = CompactModel([x], nodes, tasks, {"kernel": kernel, "bias": rng.normal(0, 1, 40).astype("float32"),
                                          "zeros": np.zeros((40, 40), "float32")})
    path = onnx_export.export(cm, out / "sequence")
    onnx_export.validate(cm, path).raise_for_errors()
    initializers = _initializers(path / "off.onnx")
    assert "weight:zeros" not in initializers and "weight:zeros:values" not in initializers  # nothing stored
    assert initializers["weight:kernel:values"].size == np.count_nonzero(kernel)


def test_float16_export_stays_within_1e_2_and_stores_float16_weights(mixed_compact, out):
    path = onnx_export.export(mixed_compact, out / "mixed_fp16", dtype="float16")
    report = onnx_export.validate(mixed_compact, path, atol=0.0, rtol=1e-2).raise_for_errors()  # purely relative
    assert report.atol == 0.0
    for file in _files(path):
        weights = {name: array for name, array in _initializers(file).items() if name.startswith("weight:")}
        assert weights, file
        assert {array.dtype for name, array in weights.items() if not name.endswith(":mask")} == {np.dtype("float16")}
        assert read_metadata(file)[METADATA_DTYPE] == "float16"


# -- what the files hold -------------------------------------------------------------------------


def test_one_checked_file_per_task_with_the_task_inputs_and_outputs(zoo_exports, mixed_compact):
    files = {read_metadata(file)[METADATA_TASK]: file for file in _files(zoo_exports["mixed"])}
    assert sorted(files) == sorted(mixed_compact.task_names)
    for task in mixed_compact.tasks:
        proto = onnx.load(str(files[task.name]))
        onnx.checker.check_model(proto, full_check=True)
        assert proto.opset_import[0].version == onnx_lowering.OPSET
        assert [i.name for i in proto.graph.input] == [spec.name for spec in task.inputs]
        assert [o.name for o in proto.graph.output] == [spec.name for spec in task.outputs]
        for value in [*proto.graph.input, *proto.graph.output]:
            assert value.type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch
        # a task's graph holds only its own weights
        weight_keys = {name.split(":")[1] for name in _initializers(files[task.name]) if name.startswith("weight:")}
        assert weight_keys == set(mixed_compact.task_weight_keys(task.name))


def test_manifest_task_and_dtype_are_in_the_metadata_and_the_runtime_rebuilds_the_tasks(zoo_exports, mixed_compact):
    whole = manifest_text(mixed_compact)
    for file in _files(zoo_exports["mixed"]):
        props = {entry.key: entry.value for entry in onnx.load(str(file)).metadata_props}
        assert props == read_metadata(file)  # the runtime's own reader agrees with onnx
        assert props[METADATA_TASK] in mixed_compact.task_names
        assert json.loads(props[METADATA_MANIFEST]) == json.loads(task_manifest_text(mixed_compact, props[METADATA_TASK],
                                                                                     whole=whole))
        assert props[METADATA_DTYPE] == "float32"
    session = mann_edge.runtime.load(zoo_exports["mixed"])
    assert session.tasks == list(mixed_compact.tasks)
    assert mann_edge.runtime.detect_format(zoo_exports["mixed"]) == "onnx"


def test_each_file_embeds_the_manifest_of_its_own_task_only(activation_export):
    cm, path = activation_export
    whole = json.dumps(manifest_of(cm))
    for file in _files(path):
        metadata = read_metadata(file)
        manifest = json.loads(metadata[METADATA_MANIFEST])
        assert [task["name"] for task in manifest["tasks"]] == [metadata[METADATA_TASK]]
        assert set(manifest["weights"]) == set(cm.task_weight_keys(metadata[METADATA_TASK]))
        assert len(metadata[METADATA_MANIFEST]) < len(whole) / 4, file.name  # 18 tasks: about 1/6 of the whole
    assert mann_edge.runtime.load(path).task_names == cm.task_names  # rebuilt from the files, in the model's order


def test_task_names_are_sanitized_into_file_names_and_kept_in_the_metadata(out):
    x = TensorSpec("x", (None, 4))
    names = ["digits/v2", "Digits:v2", "../up", "ünï cödé"]
    nodes = [Node(f"n{i}", "dense", ("x",), {"kernel": "kernel"}, {"activation": "relu"}, (None, 3)) for i in range(4)]
    tasks = [Task(name, (x,), (TensorSpec(f"y{i}", (None, 3)),), (f"n{i}",)) for i, name in enumerate(names)]
    cm = CompactModel([x], nodes, tasks, {"kernel": np.arange(12, dtype="float32").reshape(4, 3) - 5})
    path = onnx_export.export(cm, out / "odd_names")
    assert sorted(f.name for f in path.iterdir()) == ["Digits_v2_2.onnx", "_n__c_d_.onnx", "_up.onnx", "digits_v2.onnx"]
    session = mann_edge.runtime.load(path)
    assert session.task_names == names
    onnx_export.validate(cm, path).raise_for_errors()


def test_a_single_task_file_loads_that_task(zoo_exports, multiconv_compact):
    file = zoo_exports["multiconv"] / "parity.onnx"
    session = mann_edge.runtime.load(file)
    assert session.task_names == ["parity"]
    report = onnx_export.validate(multiconv_compact, file, tasks=["parity"]).raise_for_errors()
    assert not onnx_export.validate(multiconv_compact, file).ok  # the other task is missing from this file
    assert {check.task for check in report.checks} == {"parity"}


def test_dynamic_batch_runs_batch_1_then_32_then_1(zoo_exports, multiconv_compact):
    session = mann_edge.runtime.load(zoo_exports["multiconv"])
    for batch in (1, 32, 1):
        for task in multiconv_compact.tasks:
            inputs = {spec.name: np.ones((batch, 8, 8, 1), "float32") for spec in task.inputs}
            (got,) = session.run(task.name, inputs)
            np.testing.assert_allclose(got, multiconv_compact.run(task.name, inputs)[0], atol=1e-5)


def test_sessions_open_lazily_one_per_task_with_the_threads_asked(zoo_exports, multiconv_compact):
    session = mann_edge.runtime.load(zoo_exports["multiconv"], threads=1)
    assert session._sessions == {}
    session.run("digit", np.zeros((1, 8, 8, 1), "float32"))
    assert list(session._sessions) == ["digit"]
    assert session.session("digit").get_session_options().intra_op_num_threads == 1


def test_sparse_export_is_at_most_a_fifth_of_dense(pruned):
    cm, exports, seconds = pruned
    sizes = {label: _size(path) for label, path in exports.items()}
    ratios = {label: round(size / sizes["dense32"], 3) for label, size in sizes.items()}
    print(f"\nONNX sizes (bytes): {sizes}; ratio to dense float32: {ratios}; export seconds: {seconds}")
    assert ratios["sparse32"] <= 0.20
    assert ratios["sparse16"] <= 0.12
    for label, path in exports.items():
        report = onnx_export.validate(cm, path).raise_for_errors()
        print(f"{label}: max abs error {report.max_abs_error:.3g}")


def test_sparse_weights_are_stored_as_bitmask_and_values(pruned):
    cm, exports, _ = pruned
    for label, value_dtype in (("sparse32", "float32"), ("sparse16", "float16")):
        for file in _files(exports[label]):
            task = read_metadata(file)[METADATA_TASK]
            initializers = _initializers(file)
            for key in cm.task_weight_keys(task):
                dense = cm.dense_weight(key)
                if dense.size < 1024:
                    continue  # biases: small, stored dense or encoded as the bytes decide
                mask, values = initializers[f"weight:{key}:mask"], initializers[f"weight:{key}:values"]
                assert mask.dtype == np.uint8 and mask.size == math.ceil(dense.size / 8)
                assert values.dtype == value_dtype and values.size == np.count_nonzero(dense)
                assert f"weight:{key}" not in initializers
            largest = max(array.size for array in initializers.values() if array.dtype.kind == "f")
            assert largest <= 0.15 * 512 * 512  # no dense kernel anywhere
    for file in _files(exports["dense32"]):
        assert not any(name.endswith(":mask") for name in _initializers(file))


def test_the_expansion_is_folded_once_when_onnxruntime_opens_the_file(pruned, out):
    cm, exports, _ = pruned
    for label in ("sparse32", "sparse16", "dense16"):
        for file in _files(exports[label]):
            graph = _optimized_graph(file, out)
            ops = Counter(node.op_type for node in graph.node)
            assert not EXPANSION_OPS & set(ops), (label, ops)
            assert ops["Gemm"] + ops["MatMul"] == 3
            dense_kernels = [init for init in graph.initializer if tuple(init.dims) in {(256, 512), (512, 512), (512, 10)}]
            assert len(dense_kernels) == 3 and all(init.data_type == onnx.TensorProto.FLOAT for init in dense_kernels)


# -- runtime -------------------------------------------------------------------------------------


def test_runtime_imports_neither_tensorflow_nor_keras_nor_onnx(zoo_exports):
    code = (
        "import sys\n"
        "import numpy as np\n"
        "import mann_edge.runtime\n"
        "session = mann_edge.runtime.load(sys.argv[1], threads=1)\n"
        "(y,) = session.run('digit', np.zeros((2, 8, 8, 1), 'float32'))\n"
        "assert y.shape == (2, 10), y.shape\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras', 'onnx')]\n"
        "assert not heavy, heavy[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(zoo_exports["multiconv"])],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_a_file_that_is_not_onnx_is_refused_naming_it(out):
    folder = out / "not_onnx"
    folder.mkdir()
    path = folder / "zip.onnx"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a protobuf")
    with pytest.raises(MannEdgeError, match=r"zip\.onnx is not an ONNX model"):
        mann_edge.runtime.load(path)
    with pytest.raises(MannEdgeError, match=r"zip\.onnx is not an ONNX model"):
        mann_edge.runtime.load(folder)
    empty = out / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(MannEdgeError, match=r"empty\.onnx is not an ONNX model: the file is empty"):
        OnnxSession(empty)


def test_a_truncated_file_is_refused_naming_it(zoo_exports, out):
    data = (zoo_exports["multiconv"] / "digit.onnx").read_bytes()
    for keep in (len(data) // 2, len(data) - 3):
        path = out / f"truncated_{keep}.onnx"
        path.write_bytes(data[:keep])
        with pytest.raises(MannEdgeError, match=rf"truncated_{keep}\.onnx is a truncated ONNX model"):
            mann_edge.runtime.load(path)


def test_an_onnx_file_without_the_manifest_is_refused_naming_it(out):
    from onnx import helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "foreign",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 2])])
    path = out / "foreign.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    with pytest.raises(MannEdgeError, match=r"foreign\.onnx is an ONNX model without the 'mann_edge_manifest'"):
        mann_edge.runtime.load(path)


def test_a_directory_missing_a_task_file_is_refused_naming_the_task(zoo_exports, out):
    partial = out / "partial"
    shutil.copytree(zoo_exports["multiconv"], partial)
    (partial / "parity.onnx").unlink()
    with pytest.raises(MannEdgeError, match=r"partial lacks the \.onnx files of tasks \['parity'\]"):
        mann_edge.runtime.load(partial)


def test_a_directory_mixing_two_exports_is_refused(zoo_exports, out):
    mixed = out / "two_models"
    shutil.copytree(zoo_exports["multiconv"], mixed)
    shutil.copy(zoo_exports["mixed"] / "text.onnx", mixed / "text.onnx")
    with pytest.raises(MannEdgeError, match=r"two_models: .*\.onnx and .*\.onnx come from different models"):
        mann_edge.runtime.load(mixed)


# -- errors --------------------------------------------------------------------------------------


def test_existing_output_is_refused_without_force(multiconv_compact, out):
    path = out / "existing"
    path.mkdir()
    (path / "notes.txt").write_text("user data")
    with pytest.raises(OutputExistsError):
        onnx_export.export(multiconv_compact, path)
    assert (path / "notes.txt").read_text() == "user data"
    onnx_export.export(multiconv_compact, path, force=True)
    assert sorted(f.name for f in path.iterdir()) == ["digit.onnx", "parity.onnx"]
    assert mann_edge.runtime.load(path).task_names == multiconv_compact.task_names


def test_failure_mid_export_leaves_nothing(multiconv_compact, out, monkeypatch):
    target = out / "failing"
    before = sorted(out.iterdir())
    calls = []
    check_model = onnx.checker.check_model

    def failing_on_the_second_task(model, *args, **kwargs):
        calls.append(model.graph.name)
        if len(calls) == 2:
            raise onnx.checker.ValidationError("simulated checker failure")
        return check_model(model, *args, **kwargs)

    monkeypatch.setattr(onnx.checker, "check_model", failing_on_the_second_task)
    with pytest.raises(ConversionError, match=r"task 'parity'.*simulated checker failure"):
        onnx_export.export(multiconv_compact, target)
    assert calls == ["digit", "parity"]  # the first task's file had been written
    assert not target.exists()
    assert sorted(out.iterdir()) == before


def test_unsupported_op_is_named_with_the_supported_ones(out):
    x = TensorSpec("x", (None, 4))
    node = Node("mystery", "fft", ("x",), {}, {}, (None, 4))
    cm = CompactModel([x], [node], [Task("t", (x,), (TensorSpec("y", (None, 4)),), ("mystery",))], {})
    with pytest.raises(ConversionError, match=r"'fft'.*mystery.*Supported ops: \[.*'conv2d'"):
        onnx_export.export(cm, out / "unsupported")
    assert not (out / "unsupported").exists()


def test_a_lowering_that_fails_is_named_with_its_task_and_node(out):
    x = TensorSpec("x", (None, 8, None, 1))  # a convolution needs static sizes
    node = Node("conv", "conv2d", ("x",), {"kernel": "kernel"}, {"strides": [1, 1], "padding": "same"}, (None, 8, None, 2))
    cm = CompactModel([x], [node], [Task("t", (x,), (TensorSpec("y", (None, 8, None, 2)),), ("conv",))],
                      {"kernel": np.ones((3, 3, 1, 2), "float32")})
    with pytest.raises(ConversionError, match=r"task 't': node 'conv' \(.*op conv2d\).*static sizes"):
        onnx_export.export(cm, out / "dynamic_conv")
    assert not (out / "dynamic_conv").exists()


def test_bad_dtype_is_refused(multiconv_compact, out):
    with pytest.raises(ConversionError, match="'float32', 'float16' or 'int8'. Received: 'int4'"):
        onnx_export.export(multiconv_compact, out / "int4", dtype="int4")
    assert not (out / "int4").exists()
    with pytest.raises(ConversionError, match=r"dtype 'int8' \(QDQ.*needs calibration data"):
        onnx_export.export(multiconv_compact, out / "int8", dtype="int8")
    assert not (out / "int8").exists()


def test_check_options_refuses_what_export_would_and_writes_nothing(multiconv_compact, out):
    before = sorted(out.iterdir())
    onnx_export.check_options(dtype="float16", sparse=False)
    for options, message in (
        ({"dtype": "int4"}, r"ONNX export takes dtype 'float32', 'float16' or 'int8'. Received: 'int4'"),
        ({"dtype": "float16", "calibration": {}}, r"calibration data for dtype 'int8' only"),
        ({"sprase": False}, r"ONNX export takes options \['sparse', 'calibration', 'batch'\]. "
                            r"Received unknown options: \['sprase'\]"),
        ({"force": True}, r"Received unknown options: \['force'\]"),
        ({"sparse": "no"}, r"`sparse` must be True or False. Received: sparse='no'"),
    ):
        with pytest.raises(ConversionError, match=message):
            onnx_export.check_options(**options)
    with pytest.raises(ConversionError, match=r"`sparse` must be True or False"):
        onnx_export.export(multiconv_compact, out / "sparse_no", sparse="no")  # export checks through check_options
    assert sorted(out.iterdir()) == before


def test_bitmask_encoding_round_trips():
    rng = np.random.default_rng(5)
    array = rng.normal(size=(3, 5, 7)).astype("float32")
    array[rng.random(array.shape) < 0.7] = 0.0
    mask, values = encode_bitmask(array)
    assert mask.size == math.ceil(array.size / 8) and values.size == np.count_nonzero(array)
    present = np.unpackbits(mask, bitorder="little")[: array.size].astype(bool)
    rebuilt = np.zeros(array.size, "float32")
    rebuilt[present] = values
    np.testing.assert_array_equal(rebuilt.reshape(array.shape), array)


# -- int8: QDQ static quantization ---------------------------------------------------------------------


def _calibration(cm, examples: int = 64, seed: int = 11) -> dict:
    rng = np.random.default_rng(seed)
    return {spec.name: rng.normal(0, 1, (examples, *spec.shape[1:])).astype("float32") for spec in cm.inputs}


def test_int8_export_is_qdq_with_bitmask_encoded_int8_weights_and_matches_on_calibration_data(out, pruned_compact):
    import onnx
    from onnx import numpy_helper

    calibration = _calibration(pruned_compact)
    path = onnx_export.export(pruned_compact, out / "pruned_int8", dtype="int8", calibration=calibration)
    dense = onnx_export.export(pruned_compact, out / "pruned_int8_dense", dtype="int8", calibration=calibration,
                               sparse=False)
    for task, file in onnx_export.task_files(path).items():
        proto = onnx.load(str(file))
        ops = [node.op_type for node in proto.graph.node]
        assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 6  # activations and weights
        values = [i for i in proto.graph.initializer if i.name.endswith(":bitmask:values")]
        assert len(values) == 3 and {numpy_helper.to_array(v).dtype for v in values} == {np.dtype(np.int8)}
        assert {p.key: p.value for p in proto.metadata_props}[METADATA_TASK] == task
    sizes = {label: sum(f.stat().st_size for f in Path(p).glob("*.onnx")) for label, p in
             (("sparse", path), ("dense", dense))}
    assert sizes["sparse"] < 0.5 * sizes["dense"], sizes  # 90 % zeros: bitmask + int8 values
    report = onnx_export.validate(pruned_compact, path, inputs={task.name: {s.name: calibration[s.name] for s in
                                                                            task.inputs}
                                                                for task in pruned_compact.tasks})
    report.raise_for_errors()
    assert report.atol_scaled and 0 < report.max_abs_error
    # the dense and the bitmask forms are the same int8 model
    for task in pruned_compact.tasks:
        feed = {s.name: calibration[s.name][:8] for s in task.inputs}
        np.testing.assert_array_equal(mann_edge.runtime.load(path).run(task.name, feed)[0],
                                      mann_edge.runtime.load(dense).run(task.name, feed)[0])


def test_a_raw_onnxruntime_session_refuses_a_negative_id_instead_of_reading_from_the_end(zoo_exports):
    """An app calling onnxruntime itself gets no input checks from mann-edge: the graph refuses what Gather would wrap."""
    files = {read_metadata(file)[METADATA_TASK]: file for file in _files(zoo_exports["mixed"])}
    session = ort.InferenceSession(str(files["text"]), providers=["CPUExecutionProvider"])
    ids = np.zeros((1, zoo.TOKENS), np.int32)
    session.run(None, {"tokens": ids})
    for bad in (-1, -zoo.VOCAB, zoo.VOCAB):
        ids[0, 3] = bad
        with pytest.raises(Exception, match=r"(?i)out of (range|bounds)|indices"):
            session.run(None, {"tokens": ids})


@pytest.mark.parametrize("dtype", ["int64", "float32"])
def test_negative_ids_of_other_dtypes_are_refused_by_a_raw_session_too(dtype, tmp_path):
    import keras

    tokens = keras.Input((4,), dtype=dtype, name="tokens")
    model = keras.Model(tokens, keras.layers.Dense(2)(keras.layers.Flatten()(keras.layers.Embedding(7, 3)(tokens))))
    path = onnx_export.export(mann_edge.compact(model), tmp_path / "onnx")
    (file,) = _files(path)
    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    ids = np.zeros((1, 4), dtype)
    session.run(None, {"tokens": ids})
    ids[0, 1] = -1
    with pytest.raises(Exception, match=r"(?i)out of (range|bounds)|indices"):
        session.run(None, {"tokens": ids})
