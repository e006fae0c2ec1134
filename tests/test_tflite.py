"""TFLite export and LiteRT runtime: parity with Keras and the recorded legacy outputs, sparse storage, errors.

Every file is run by `ai_edge_litert` through `mann_edge.runtime.load`, the way users run it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import mann_edge
import zoo
from mann_edge.bundle import manifest_of
from mann_edge.converters import tflite
from mann_edge.errors import ConversionError, InputError, MannEdgeError, OutputExistsError, ValidationError
from mann_edge.graph.model import CompactModel, Node, Task, TensorSpec
from mann_edge.converters import validation
from mann_edge.formats import METADATA_DTYPE, METADATA_MANIFEST, METADATA_USE_XNNPACK
from mann_edge.runtime.litert import LiteRTSession, read_metadata



def _calibration(cm: CompactModel, examples: int = 64, seed: int = 11) -> dict[str, np.ndarray]:
    """Standard normal calibration inputs for every input of ``cm`` (the range `sample_inputs` draws from)."""
    rng = np.random.default_rng(seed)
    return {spec.name: rng.normal(0, 1, (examples, *spec.shape[1:])).astype("float32") for spec in cm.inputs}


def _default_interpreter(path):
    """``path`` opened the way a new user opens it: ai_edge_litert's Interpreter with its default settings."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()  # raised "TfLiteXNNPackDelegate failed to prepare" on int8 behind DENSIFY
    return interpreter


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("tflite")


@pytest.fixture(scope="module")
def zoo_exports(mixed_compact, multiconv_compact, out):
    compacts = {"mixed": mixed_compact, "multiconv": multiconv_compact}
    exports, seconds = {}, {}
    for name, cm in compacts.items():
        start = time.perf_counter()
        exports[name] = tflite.export(cm, out / f"{name}.tflite")
        seconds[name] = round(time.perf_counter() - start, 2)
    print(f"\nTFLite conversion seconds: {seconds}")
    return exports


@pytest.fixture(scope="module")
def pruned(out, pruned_compact):
    """The 90 %-pruned model exported sparse and dense, float32, float16, int8 and int8_dynamic, with conversion times."""
    cm = pruned_compact
    exports, seconds = {}, {}
    for label, options in {
        "sparse32": {"sparse": True, "dtype": "float32"},
        "dense32": {"sparse": False, "dtype": "float32"},
        "sparse16": {"sparse": True, "dtype": "float16"},
        "dense16": {"sparse": False, "dtype": "float16"},
        "sparse8": {"sparse": True, "dtype": "int8", "calibration": _calibration(cm)},
        "dense8": {"sparse": False, "dtype": "int8", "calibration": _calibration(cm)},
        "sparse8d": {"sparse": True, "dtype": "int8_dynamic"},
    }.items():
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", tflite.DenseWeightsWarning)  # asserted in the int8 tests
            exports[label] = tflite.export(cm, out / f"pruned_{label}.tflite", **options)
        seconds[label] = round(time.perf_counter() - start, 2)
    return cm, exports, seconds


# -- parity --------------------------------------------------------------------------------------


def test_builtin_kernels_without_xnnpack_match_too(zoo_exports, mixed_compact):
    report = tflite.validate(mixed_compact, zoo_exports["mixed"], use_xnnpack=False).raise_for_errors()
    assert report.max_abs_error <= 1e-5
    assert {check.task for check in report.checks} == set(mixed_compact.task_names)


def test_dense_over_the_last_axis_of_a_sequence(out):
    rng = np.random.default_rng(2)
    x = TensorSpec("x", (None, 3, 6))
    nodes = [Node("proj", "dense", ("x",), {"kernel": "kernel", "bias": "bias"}, {"activation": "tanh"}, (None, 3, 5))]
    kernel = rng.normal(0, 1, (6, 5)).astype("float32")
    kernel[rng.random(kernel.shape) < 0.6] = 0.0
    cm = CompactModel([x], nodes, [Task("seq", (x,), (TensorSpec("y", (None, 3, 5)),), ("proj",))],
                      {"kernel": kernel, "bias": rng.normal(0, 1, 5).astype("float32")})
    tflite.validate(cm, tflite.export(cm, out / "sequence.tflite")).raise_for_errors()


def test_sparse_kernels_whose_input_size_is_not_a_multiple_of_4_stay_exact(out):
    # The converter's 1x4-block encoder truncates such kernels to whole blocks and can drop the
    # last inputs' weights; these weights sit only there, which made it pick that encoding.
    kernel = np.zeros((6, 8), "float32")
    kernel[4:] = np.random.default_rng(3).normal(0, 1, (2, 8))
    x = TensorSpec("x", (None, 6))
    node = Node("tail", "dense", ("x",), {"kernel": "kernel"}, {}, (None, 8))
    cm = CompactModel([x], [node], [Task("tail", (x,), (TensorSpec("y", (None, 8)),), ("tail",))], {"kernel": kernel})
    path = tflite.export(cm, out / "unaligned.tflite")
    tflite.validate(cm, path).raise_for_errors()
    tflite.validate(cm, path, use_xnnpack=False).raise_for_errors()


def test_1x4_block_sparse_kernels_run_the_sparse_fully_connected_kernel(out):
    # Four consecutive inputs of an output unit are zero or not together: TFLite keeps the weight
    # sparse at run time (no DENSIFY); XNNPACK leaves that node to the builtin kernel.
    rng = np.random.default_rng(4)
    kernel = rng.normal(0, 1, (16, 8)).astype("float32")
    kernel[np.repeat(rng.random((4, 8)) < 0.75, 4, axis=0)] = 0.0
    x = TensorSpec("x", (None, 16))
    node = Node("blocks", "dense", ("x",), {"kernel": "kernel", "bias": "bias"}, {"activation": "relu"}, (None, 8))
    cm = CompactModel([x], [node], [Task("blocks", (x,), (TensorSpec("y", (None, 8)),), ("blocks",))],
                      {"kernel": kernel, "bias": rng.normal(0, 1, 8).astype("float32")})
    path = tflite.export(cm, out / "blocks.tflite")
    assert tflite.operators(path) == ["FULLY_CONNECTED"]
    assert sorted(block is not None for _, block in zoo.tflite_constants(path)) == [False, True]  # kernel sparse, bias dense
    tflite.validate(cm, path).raise_for_errors()
    tflite.validate(cm, path, use_xnnpack=False).raise_for_errors()


def test_float16_export_stays_within_1e_2_and_stores_float16_weights(mixed_compact, out):
    path = tflite.export(mixed_compact, out / "mixed_fp16.tflite", dtype="float16")
    report = tflite.validate(mixed_compact, path, atol=0.0, rtol=1e-2).raise_for_errors()  # purely relative
    assert report.atol == 0.0
    float_constants = {kind for kind, _ in zoo.tflite_constants(path) if kind.startswith("FLOAT")}
    assert float_constants == {"FLOAT16"}
    assert read_metadata(path)[METADATA_DTYPE] == b"float16"


def _block_sparse_compact(block: int, seed: int = 5) -> CompactModel:
    """x(64) -> dense 32 relu -> dense 32, kernels pruned in 1 x ``block`` blocks to 25 % (>= 1024 weights: quantized)."""
    rng = np.random.default_rng(seed)

    def kernel(inputs, outputs):
        values = rng.normal(0, 1, (inputs, outputs)).astype("float32")
        values[np.repeat(rng.random((inputs // block, outputs)) < 0.75, block, axis=0)] = 0.0
        return values

    x = TensorSpec("x", (None, 64))
    nodes = [
        Node("hidden", "dense", ("x",), {"kernel": "k1", "bias": "b1"}, {"activation": "relu"}, (None, 32)),
        Node("logits", "dense", ("hidden",), {"kernel": "k2"}, {}, (None, 32)),
    ]
    weights = {"k1": kernel(64, 32), "b1": rng.normal(0, 1, 32).astype("float32"), "k2": kernel(32, 32)}
    return CompactModel([x], nodes, [Task("blocks", (x,), (TensorSpec("y", (None, 32)),), ("logits",))], weights)


def _export_recording_warnings(cm, path, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tflite.export(cm, path, **options)
    return [w for w in caught if issubclass(w.category, tflite.DenseWeightsWarning)]


def test_int8_block16_export_runs_the_sparse_kernel_in_the_default_interpreter(out):
    cm = _block_sparse_compact(16)
    path = out / "blocks_int8.tflite"
    assert _export_recording_warnings(cm, path, dtype="int8", calibration=_calibration(cm)) == []
    # full integer: quantized at the float boundary, the sparse int8 kernel reads each weight (no DENSIFY)
    assert tflite.operators(path) == ["QUANTIZE", "FULLY_CONNECTED", "FULLY_CONNECTED", "DEQUANTIZE"]
    assert zoo.tflite_sparse_blocks(path) == [("INT8", 16), ("INT8", 16)]
    assert [(row["stored"], row["runs"]) for row in tflite.kernel_report(path)] == [("block 1x16", "sparse")] * 2
    metadata = read_metadata(path)
    assert metadata[METADATA_DTYPE] == b"int8" and METADATA_USE_XNNPACK not in metadata
    batch = _calibration(cm, 32, seed=6)["x"]
    (want,) = cm.run("blocks", {"x": batch})
    (got,) = _default_interpreter(path).get_signature_runner("blocks")(x=batch).values()
    assert got.dtype == np.float32
    assert np.abs(got - want).max() <= validation.FULL_INT8_ATOL * np.abs(want).max()
    assert np.abs(got - want).max() > 0  # the weights and activations really are 8-bit
    session = mann_edge.runtime.load(path)
    assert session.use_xnnpack  # nothing to switch off
    np.testing.assert_array_equal(session.run("blocks", batch)[0], got)
    report = tflite.validate(cm, path, inputs={"blocks": {"x": batch}}).raise_for_errors()
    assert report.atol_scaled and report.atol == validation.FULL_INT8_ATOL


def test_int8_unstructured_weights_are_stored_dense_so_xnnpack_runs_them_and_the_export_says_so(out, pruned_compact):
    # Behind DENSIFY, int8 weights made the default interpreter fail ("failed to delegate
    # FULLY_CONNECTED ... TfLiteXNNPackDelegate failed to prepare"): the issue's reproduction.
    path = out / "pruned_unstructured_int8.tflite"
    warned = _export_recording_warnings(pruned_compact, path, dtype="int8", calibration=_calibration(pruned_compact))
    assert len(warned) == 1
    assert "6 of 6 int8 weights are stored and run dense" in str(warned[0].message)
    assert "block_size=16" in str(warned[0].message) and str(path) in str(warned[0].message)
    assert "DENSIFY" not in tflite.operators(path) and not zoo.tflite_sparse_blocks(path)
    assert {row["runs"] for row in tflite.kernel_report(path)} == {"dense"}
    interpreter = _default_interpreter(path)
    batch = _calibration(pruned_compact, 8, seed=3)
    for task in pruned_compact.tasks:
        inputs = {spec.name: batch[spec.name] for spec in task.inputs}
        got = interpreter.get_signature_runner(task.name)(**inputs)[task.outputs[0].name]
        (want,) = pruned_compact.run(task.name, inputs)
        assert np.abs(got - want).max() <= validation.FULL_INT8_ATOL * np.abs(want).max(), task.name


def test_int8_dynamic_is_written_dense_and_runs_in_the_default_interpreter(out, pruned_compact):
    path = out / "pruned_int8_dynamic.tflite"
    warned = _export_recording_warnings(pruned_compact, path, dtype="int8_dynamic")
    assert len(warned) == 1 and "int8_dynamic' stores every weight dense" in str(warned[0].message)
    assert read_metadata(path)[METADATA_DTYPE] == b"int8_dynamic"
    assert "QUANTIZE" not in tflite.operators(path)  # float activations: the hybrid kernels
    assert {kind for kind, _ in zoo.tflite_constants(path)} >= {"INT8"}
    _default_interpreter(path)
    report = tflite.validate(pruned_compact, path).raise_for_errors()
    assert report.atol == validation.INT8_ATOL


def test_int8_io_gives_int8_tensors_and_the_session_keeps_the_float_interface(out):
    cm = _block_sparse_compact(16, seed=7)
    path = out / "blocks_int8_io.tflite"
    calibration = _calibration(cm)
    tflite.export(cm, path, dtype="int8", calibration=calibration, int8_io=True)
    runner = _default_interpreter(path).get_signature_runner("blocks")
    (detail,) = runner.get_input_details().values()
    (output,) = runner.get_output_details().values()
    assert detail["dtype"] == np.int8 and output["dtype"] == np.int8
    scale, zero_point = detail["quantization"]
    x = calibration["x"][:4]
    raw = runner(x=np.clip(np.round(x / scale) + zero_point, -128, 127).astype(np.int8))["y"]
    assert raw.dtype == np.int8
    (got,) = mann_edge.runtime.load(path).run("blocks", x)
    assert got.dtype == np.float32
    out_scale, out_zero = output["quantization"]
    np.testing.assert_allclose(got, (raw.astype(np.float32) - out_zero) * out_scale, rtol=1e-6)
    (want,) = cm.run("blocks", {"x": x})
    assert np.abs(got - want).max() <= validation.FULL_INT8_ATOL * np.abs(want).max()


def test_int8_export_that_the_default_interpreter_does_not_run_within_tolerance_is_refused(out, monkeypatch):
    # A tolerance no 8-bit export can meet stands in for a quantization too coarse for the model.
    monkeypatch.setattr(validation, "FULL_INT8_ATOL", 1e-9)
    target = out / "too_coarse_int8.tflite"
    cm = _block_sparse_compact(16)
    with pytest.raises(ConversionError, match=r"int8 export .*too_coarse_int8\.tflite does not run right in LiteRT's "
                                              r"default interpreter \(XNNPACK on\): task 'blocks' output 'y'.*float16"):
        tflite.export(cm, target, dtype="int8", calibration=_calibration(cm))
    assert not target.exists()
    assert not list(out.glob(".too_coarse_int8.tflite.*"))


@pytest.mark.parametrize("options, error, message", [
    ({"dtype": "int8"}, ConversionError, r"dtype 'int8' \(full-integer.*needs calibration data.*'int8_dynamic'"),
    ({"dtype": "float16", "calibration": {"x": np.zeros((2, 64), "float32")}}, ConversionError,
     r"calibration data for dtype 'int8' only. Received: dtype='float16'"),
    ({"dtype": "int8_dynamic", "int8_io": True}, ConversionError, r"`int8_io`.*needs dtype 'int8'"),
    ({"dtype": "int8", "calibration": {"y": np.zeros((2, 64), "float32")}}, InputError,
     r"calibration data has no array for input 'x' of task 'blocks'.*\['y'\]"),
    ({"dtype": "int8", "calibration": {"x": np.zeros((2, 63), "float32")}}, InputError,
     r"calibration data input 'x' of task 'blocks' must have shape \['N', 64\].*Received: \[2, 63\]"),
    ({"dtype": "int8", "calibration": "missing.npz"}, InputError, r"calibration data missing.npz does not exist"),
])
def test_bad_int8_options_and_calibration_are_refused_naming_what_is_wrong(out, options, error, message):
    target = out / "refused_int8.tflite"
    with pytest.raises(error, match=message):
        tflite.export(_block_sparse_compact(16), target, **options)
    assert not target.exists()


def test_int8_tolerance_is_relative_to_each_outputs_scale():
    cm = _block_sparse_compact(16)
    for share, ok in ((0.04, True), (0.06, False)):
        def run(task, inputs):
            (want,) = cm.run(task, inputs)
            return [want + share * np.abs(want).max()]

        atol, rtol = validation.tolerances("int8_dynamic")
        report = validation.compare(cm, run, format="tflite", artifact="shifted", atol=atol, rtol=rtol,
                                    scaled_atol=validation.scaled_atol("int8_dynamic"))
        assert report.ok == ok, share
    assert (atol, rtol) == (0.05, 0.0)
    # full integer also rounds the activations: twice the share, still scaled
    assert validation.tolerances("int8") == (0.1, 0.0) and validation.scaled_atol("int8")
    with pytest.raises(ValidationError, match=r"atol 0.05 x output scale"):
        report.raise_for_errors()


# -- what the file holds -------------------------------------------------------------------------


def test_signatures_are_the_tasks_with_their_input_and_output_names(zoo_exports, mixed_compact):
    session = mann_edge.runtime.load(zoo_exports["mixed"])
    signatures = session.interpreter.get_signature_list()
    assert sorted(signatures) == sorted(mixed_compact.task_names)
    for task in mixed_compact.tasks:
        assert sorted(signatures[task.name]["inputs"]) == sorted(spec.name for spec in task.inputs)
        assert signatures[task.name]["outputs"] == [spec.name for spec in task.outputs]


def test_manifest_is_embedded_and_the_runtime_rebuilds_the_tasks(zoo_exports, mixed_compact):
    metadata = read_metadata(zoo_exports["mixed"])
    assert json.loads(metadata[METADATA_MANIFEST]) == json.loads(json.dumps(manifest_of(mixed_compact)))
    assert metadata[METADATA_DTYPE] == b"float32"
    session = mann_edge.runtime.load(zoo_exports["mixed"])
    assert session.tasks == list(mixed_compact.tasks)
    assert mann_edge.runtime.detect_format(zoo_exports["mixed"]) == "tflite"


def test_dynamic_batch_runs_batch_1_then_32_then_1(zoo_exports, multiconv_compact):
    session = mann_edge.runtime.load(zoo_exports["multiconv"])
    for batch in (1, 32, 1):
        for task in multiconv_compact.tasks:
            inputs = {spec.name: np.ones((batch, 8, 8, 1), "float32") for spec in task.inputs}
            (got,) = session.run(task.name, inputs)
            np.testing.assert_allclose(got, multiconv_compact.run(task.name, inputs)[0], atol=1e-5)


def test_sparse_export_is_at_most_a_fifth_of_dense(pruned):
    cm, exports, seconds = pruned
    sizes = {label: Path(path).stat().st_size for label, path in exports.items()}
    ratios = {label: round(size / sizes["dense32"], 3) for label, size in sizes.items()}
    print(f"\nTFLite sizes (bytes): {sizes}; ratio to dense float32: {ratios}; conversion seconds: {seconds}")
    assert ratios["sparse32"] <= 0.20
    assert ratios["sparse16"] <= 0.12
    # int8 with unstructured masks is stored dense: what LiteRT's default interpreter runs
    assert ratios["sparse8"] <= 0.27 and ratios["dense8"] <= 0.27 and ratios["sparse8d"] <= 0.27
    for label, path in exports.items():
        tflite.validate(cm, path).raise_for_errors()


def test_sparse_weights_are_encoded_sparse_and_densified_for_fully_connected(pruned):
    _, exports, _ = pruned
    for label in ("sparse32", "sparse16"):
        ops = tflite.operators(exports[label])
        assert ops.count("FULLY_CONNECTED") == 2 * 3
        assert ops.count("DENSIFY") == 2 * 3  # random (not 1x4-block) sparsity runs dense
        assert len(zoo.tflite_sparse_blocks(exports[label])) == 2 * 3
    assert {kind for kind, _ in zoo.tflite_sparse_blocks(exports["sparse16"])} == {"FLOAT16"}
    for label in ("dense32", "dense16", "dense8", "sparse8", "sparse8d"):
        assert "FULLY_CONNECTED" in tflite.operators(exports[label])
        assert "DENSIFY" not in tflite.operators(exports[label])
        assert not zoo.tflite_sparse_blocks(exports[label])


# -- runtime -------------------------------------------------------------------------------------


def test_runtime_module_imports_neither_tensorflow_nor_keras(zoo_exports):
    code = (
        "import sys\n"
        "import numpy as np\n"
        "import mann_edge.runtime\n"
        "session = mann_edge.runtime.load(sys.argv[1], threads=1)\n"
        "(y,) = session.run('digit', np.zeros((2, 8, 8, 1), 'float32'))\n"
        "assert y.shape == (2, 10), y.shape\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras')]\n"
        "assert not heavy, heavy[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(zoo_exports["multiconv"])],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_a_file_that_is_not_tflite_is_refused_naming_it(out):
    path = out / "not_a_model.tflite"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a flatbuffer")
    with pytest.raises(MannEdgeError, match=r"not_a_model\.tflite is not a TFLite model.*TFL3"):
        mann_edge.runtime.load(path)
    short = out / "short.tflite"
    short.write_bytes(b"TFL")
    with pytest.raises(MannEdgeError, match=r"short\.tflite is not a TFLite model"):
        LiteRTSession(short)


def test_a_tflite_file_without_the_manifest_is_refused_naming_it(out):
    import tensorflow as tf

    function = tf.function(lambda x: {"y": x * 2.0}, input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function.get_concrete_function()])
    path = out / "foreign.tflite"
    path.write_bytes(converter.convert())
    with pytest.raises(MannEdgeError, match=r"foreign\.tflite is a TFLite model without the 'mann_edge_manifest'"):
        mann_edge.runtime.load(path)


# -- errors --------------------------------------------------------------------------------------


def test_existing_output_is_refused_without_force(multiconv_compact, out):
    path = out / "existing.tflite"
    path.write_bytes(b"user data")
    with pytest.raises(OutputExistsError):
        tflite.export(multiconv_compact, path)
    assert path.read_bytes() == b"user data"
    tflite.export(multiconv_compact, path, force=True)
    assert mann_edge.runtime.load(path).task_names == multiconv_compact.task_names


def test_failure_mid_export_leaves_no_file(multiconv_compact, out, monkeypatch):
    import tensorflow as tf

    target = out / "failing.tflite"
    before = sorted(out.iterdir())

    class FailingConverter:
        def __init__(self, *args, **kwargs):
            self.target_spec = tf.lite.TargetSpec()

        def convert(self):
            raise RuntimeError("simulated converter crash")

    monkeypatch.setattr(tf.lite.TFLiteConverter, "from_saved_model", FailingConverter)
    with pytest.raises(ConversionError, match="simulated converter crash"):
        tflite.export(multiconv_compact, target)
    assert not target.exists()
    assert sorted(out.iterdir()) == before


def test_unsupported_op_is_named_with_the_supported_ones(out):
    x = TensorSpec("x", (None, 4))
    node = Node("mystery", "fft", ("x",), {}, {}, (None, 4))
    cm = CompactModel([x], [node], [Task("t", (x,), (TensorSpec("y", (None, 4)),), ("mystery",))], {})
    with pytest.raises(ConversionError, match=r"'fft'.*mystery.*Supported ops: \[.*'conv2d'"):
        tflite.export(cm, out / "unsupported.tflite")
    assert not (out / "unsupported.tflite").exists()


def test_a_lowering_that_needs_tf_select_is_named(out, monkeypatch):
    import tensorflow as tf

    # The gelu lowering calls tf.nn.gelu, which the converter fuses; Erf alone has no TFLite builtin.
    monkeypatch.setattr(tf.nn, "gelu", lambda x, approximate=False: tf.math.erf(x))
    x = TensorSpec("x", (None, 4))
    node = Node("act", "activation", ("x",), {}, {"activation": "gelu"}, (None, 4))
    cm = CompactModel([x], [node], [Task("t", (x,), (TensorSpec("y", (None, 4)),), ("act",))], {})
    with pytest.raises(ConversionError, match=r"tasks \['t'\] failed: TensorFlow ops without a TFLite builtin: Erf"):
        tflite.export(cm, out / "flex.tflite")
    assert not (out / "flex.tflite").exists()


def test_bad_dtype_is_refused(multiconv_compact, out):
    with pytest.raises(ConversionError, match=r"takes dtype 'float32', 'float16', 'int8' or 'int8_dynamic'. Received: 'int4'"):
        tflite.export(multiconv_compact, out / "int4.tflite", dtype="int4")
    assert not (out / "int4.tflite").exists()


def test_check_options_refuses_what_export_would_and_writes_nothing(out):
    before = sorted(out.iterdir())
    tflite.check_options(dtype="int8", sparse=False, calibration={"x": np.zeros((1, 4))}, int8_io=True)
    for options, message in (
        ({"dtype": "int4"}, r"TFLite export takes dtype 'float32', 'float16', 'int8' or 'int8_dynamic'. Received: 'int4'"),
        ({"target": "macOS13"}, r"TFLite export takes options \['sparse', 'calibration', 'int8_io', 'batch'\]. "
                                r"Received unknown options: \['target'\]"),
        ({"dtype": "int8", "int8_io": "yes", "calibration": {}}, r"`int8_io` must be True or False"),
        ({"sparse": 1}, r"`sparse` must be True or False. Received: sparse=1"),
    ):
        with pytest.raises(ConversionError, match=message):
            tflite.check_options(**options)
    assert sorted(out.iterdir()) == before


def test_a_fixed_batch_export_has_static_input_shapes_and_calibrates_on_whole_batches(tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    from mann_edge.converters.options import task_arrays
    from mann_edge.errors import ConversionError, InputError

    cm = mann_edge.compact(zoo.build_mixed())
    path = tflite.export(cm, tmp_path / "b1.tflite", batch=1)
    runner = Interpreter(model_path=str(path)).get_signature_runner("vision")
    assert [list(d["shape_signature"]) for d in runner.get_input_details().values()] == [[1, 8, 8, 1]]
    tflite.validate(cm, path).raise_for_errors()  # LiteRT resizes a static batch on the CPU: batch 8 runs too
    rng = np.random.default_rng(0)
    calibration = {spec.name: (rng.integers(0, zoo.VOCAB, (10, *spec.shape[1:])) if spec.dtype.startswith("int")
                               else rng.normal(size=(10, *spec.shape[1:]))).astype(spec.dtype) for spec in cm.inputs}
    int8 = tflite.export(cm, tmp_path / "b4.tflite", dtype="int8", calibration=calibration, batch=4)
    runner = Interpreter(model_path=str(int8)).get_signature_runner("vision")
    assert [list(d["shape_signature"]) for d in runner.get_input_details().values()] == [[4, 8, 8, 1]]
    tflite.validate(cm, int8, inputs={t: task_arrays(cm, t, calibration, what="c") for t in cm.task_names},
                    batches=(4,)).raise_for_errors()
    with pytest.raises(InputError, match=r"calibration data for task 'vision' holds 10 examples; an export with batch 16"):
        tflite.export(cm, tmp_path / "b16.tflite", dtype="int8", calibration=calibration, batch=16)
    with pytest.raises(ConversionError, match=r"option `batch` must be a positive int"):
        tflite.export(cm, tmp_path / "b0.tflite", batch=0)
