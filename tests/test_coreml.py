"""Core ML export: parity with Keras and the recorded legacy outputs, sparse storage, package layouts, errors.

Core ML predicts only on macOS. Elsewhere every package is checked by evaluating its
saved ML program in numpy (`mann_edge.converters.mil_eval`): the program and weights are
read back from the package on disk, so what is checked is what was written.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import mann_edge
import zoo
from mann_edge.bundle import manifest_of
from mann_edge.converters import coreml, mil_eval
from mann_edge.converters.metadata import manifest_text, task_manifest_text
from mann_edge.converters.mil_eval import KERNELS, MILEvaluator
from mann_edge.errors import BundleError, ConversionError, MannEdgeError, OutputExistsError, ValidationError
from mann_edge.graph.model import CompactModel, Node, Task, TensorSpec
from mann_edge.registry import Registry
from mann_edge.formats import METADATA_MANIFEST, METADATA_TASKS
from mann_edge.runtime.coreml import import_coremltools, read_layout

ON_MACOS = sys.platform == "darwin"


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _programs(path: Path):
    """(package, function name, MIL function) of every task in an export."""
    layout = read_layout(path)
    return [
        (entry.package, entry.function, MILEvaluator(entry.package, function=entry.function).function)
        for entry in layout.entries.values()
    ]


def _op_types(path: Path) -> set[str]:
    return {op.op_type for _, _, function in _programs(path) for op in function.operations}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("coreml")


@pytest.fixture(scope="module")
def legacy_exports(legacy_compacts, out):
    return {name: coreml.export(cm, out / f"legacy_{name}") for name, cm in legacy_compacts.items()}


@pytest.fixture(scope="module")
def zoo_exports(mixed_compact, multiconv_compact, out):
    compacts = {"mixed": mixed_compact, "multiconv": multiconv_compact}
    return {name: coreml.export(cm, out / name) for name, cm in compacts.items()}


@pytest.fixture(scope="module")
def activation_export(out):
    """The 18-task model of every parametrized activation, exported: (model, path)."""
    cm = zoo.parametrized_activations()
    return cm, coreml.export(cm, out / "activation_parameters")


@pytest.fixture(scope="module")
def pruned(out, pruned_compact):
    """The 90 %-pruned model exported sparse float32, dense float32 and sparse float16, with conversion times."""
    cm = pruned_compact
    exports, seconds = {}, {}
    for label, options in {
        "sparse32": {"sparse": True, "dtype": "float32"},
        "dense32": {"sparse": False, "dtype": "float32"},
        "sparse16": {"sparse": True, "dtype": "float16"},
    }.items():
        start = time.perf_counter()
        exports[label] = coreml.export(cm, out / f"pruned_{label}", **options)
        seconds[label] = time.perf_counter() - start
    return cm, exports, seconds


# -- parity --------------------------------------------------------------------------------------


def test_validate_reports_float32_parity(zoo_exports, mixed_compact):
    report = coreml.validate(mixed_compact, zoo_exports["mixed"]).raise_for_errors()
    assert report.max_abs_error <= 1e-5
    assert {check.task for check in report.checks} == set(mixed_compact.task_names)


def test_float16_export_stays_within_1e_2_and_stores_float16_weights(mixed_compact, out):
    path = coreml.export(mixed_compact, out / "mixed_fp16", dtype="float16")
    coreml.validate(mixed_compact, path, atol=0.0, rtol=1e-2).raise_for_errors()  # purely relative
    from coremltools.converters.mil.mil import types

    weights = [op for _, _, function in _programs(path) for op in function.operations
               if op.op_type.startswith("constexpr_") or (op.op_type == "const" and op.outputs[0].rank >= 2)]
    assert weights and {types.builtin_to_string(op.outputs[0].dtype) for op in weights} == {"fp16"}


# -- what the packages hold ------------------------------------------------------------------------


def test_sparse_export_is_at_most_a_fifth_of_dense(pruned):
    cm, exports, seconds = pruned
    sizes = {label: _size(path) for label, path in exports.items()}
    ratio32 = sizes["sparse32"] / sizes["dense32"]
    ratio16 = sizes["sparse16"] / sizes["dense32"]
    print(f"\nCore ML sizes (bytes): {sizes}; sparse fp32/dense {ratio32:.3f}, sparse fp16/dense fp32 {ratio16:.3f}; "
          f"conversion seconds: { {k: round(v, 2) for k, v in seconds.items()} }")
    assert ratio32 <= 0.20
    assert ratio16 <= 0.12
    for label in ("sparse32", "sparse16"):
        coreml.validate(cm, exports[label]).raise_for_errors()


def test_sparse_weights_are_constexpr_sparse_to_dense_and_dense_baseline_has_none(pruned):
    _, exports, _ = pruned
    ct = import_coremltools()
    for package in Path(exports["sparse32"]).glob("*.mlpackage"):
        ct.models.MLModel(str(package), skip_model_load=True)  # the package loads in coremltools
    sparse_ops = [op for _, _, f in _programs(exports["sparse32"]) for op in f.operations
                  if op.op_type == "constexpr_sparse_to_dense"]
    assert len(sparse_ops) == 2 * 3  # each task's three kernels (the untrained biases are all zero: dense)
    mask = sparse_ops[0].inputs["mask"].val
    assert mask.dtype == np.uint8 and "shape" in sparse_ops[0].inputs  # the iOS16 form: packed bits + shape
    assert "constexpr_sparse_to_dense" not in _op_types(exports["dense32"])


def test_every_op_of_the_packages_has_a_numpy_kernel(zoo_exports, legacy_exports):
    used = set()
    for path in [*zoo_exports.values(), *legacy_exports.values()]:
        used |= _op_types(path)
    assert used - {"const"} - {t for t in used if t.startswith("constexpr_")} <= set(KERNELS)


def test_per_task_packages_carry_the_manifest_and_their_task(zoo_exports, mixed_compact):
    path = zoo_exports["mixed"]
    packages = sorted(p.name for p in Path(path).glob("*.mlpackage"))
    assert packages == sorted(f"{name}.mlpackage" for name in mixed_compact.task_names)
    ct = import_coremltools()
    whole = manifest_text(mixed_compact)
    for name in mixed_compact.task_names:
        metadata = ct.models.MLModel(str(Path(path) / f"{name}.mlpackage"), skip_model_load=True).user_defined_metadata
        assert json.loads(metadata[METADATA_MANIFEST]) == json.loads(task_manifest_text(mixed_compact, name, whole=whole))
        assert [entry["task"] for entry in json.loads(metadata[METADATA_TASKS])] == [name]
    layout = read_layout(path)
    assert [t.name for t in layout.tasks()] == mixed_compact.task_names
    assert [t.inputs for t in layout.tasks()] == [t.inputs for t in mixed_compact.tasks]


def test_each_package_embeds_the_manifest_of_its_own_task_only(activation_export):
    cm, path = activation_export
    whole = json.dumps(manifest_of(cm))
    ct = import_coremltools()
    for package in sorted(Path(path).glob("*.mlpackage")):
        metadata = ct.models.MLModel(str(package), skip_model_load=True).user_defined_metadata
        manifest = json.loads(metadata[METADATA_MANIFEST])
        (entry,) = json.loads(metadata[METADATA_TASKS])
        assert [task["name"] for task in manifest["tasks"]] == [entry["task"]]
        assert set(manifest["weights"]) == set(cm.task_weight_keys(entry["task"]))
        assert len(metadata[METADATA_MANIFEST]) < len(whole) / 4, package.name  # 18 tasks: about 1/6 of the whole
    assert [task.name for task in read_layout(path).tasks()] == cm.task_names  # rebuilt in the model's order


def test_a_directory_missing_a_package_or_mixing_two_exports_is_refused(zoo_exports, out):
    partial = out / "partial"
    shutil.copytree(zoo_exports["multiconv"], partial)
    shutil.rmtree(partial / "parity.mlpackage")
    with pytest.raises(BundleError, match=r"partial lacks the packages of tasks \['parity'\]"):
        read_layout(partial)
    mixed = out / "two_models"
    shutil.copytree(zoo_exports["multiconv"], mixed)
    shutil.copytree(zoo_exports["mixed"] / "text.mlpackage", mixed / "text.mlpackage")
    with pytest.raises(BundleError, match=r"two_models: .*\.mlpackage and .*\.mlpackage come from different models"):
        read_layout(mixed)


def test_task_names_are_sanitized_for_files_and_kept_in_metadata(out):
    cm = zoo.parametrized_activations()
    renamed = [Task(f"task/{i} é", t.inputs, t.outputs, t.output_tensors) for i, t in enumerate(cm.tasks[:2])]
    cm = CompactModel(cm.inputs, cm.nodes, renamed, cm.weights)
    path = coreml.export(cm, out / "odd_names")
    assert sorted(p.name for p in path.glob("*.mlpackage")) == ["task_0__.mlpackage", "task_1__.mlpackage"]
    assert sorted(read_layout(path).entries) == sorted(cm.task_names)
    coreml.validate(cm, path).raise_for_errors()


def test_multifunction_target_writes_one_package_with_a_function_per_task(mixed_compact, out):
    path = coreml.export(mixed_compact, out / "model.mlpackage", target="macOS15")
    assert coreml.artifact_name(target="macOS15") == "model.mlpackage" and coreml.artifact_name(target="macOS13") == "coreml"
    ct = import_coremltools()
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    assert [f.name for f in spec.description.functions] == mixed_compact.task_names
    assert spec.description.defaultFunctionName == mixed_compact.task_names[0]
    # one package for every task: it keeps the whole model's manifest
    assert json.loads(spec.description.metadata.userDefined[METADATA_MANIFEST]) == json.loads(manifest_text(mixed_compact))
    programs = _programs(path)
    assert {package for package, _, _ in programs} == {path}
    sparse_ops = [op for _, _, f in programs for op in f.operations if op.op_type == "constexpr_sparse_to_dense"]
    # the iOS18 form: a bit per weight element, shaped like the weight, no separate shape
    assert sparse_ops and all("shape" not in op.inputs and op.inputs["mask"].shape == op.outputs[0].shape
                              for op in sparse_ops)
    coreml.validate(mixed_compact, path).raise_for_errors()
    assert mann_edge.runtime.detect_format(path) == "coreml"


# -- runtime -------------------------------------------------------------------------------------


@pytest.mark.skipif(ON_MACOS, reason="Core ML runs on macOS; the refusal is what other systems get")
def test_runtime_refuses_off_macos_and_points_to_validate(zoo_exports):
    from mann_edge.runtime.coreml import CoreMLSession

    for opener in (CoreMLSession, mann_edge.runtime.load):
        with pytest.raises(MannEdgeError, match=r"only on macOS.*mann_edge\.converters\.coreml\.validate"):
            opener(zoo_exports["multiconv"])


@pytest.mark.skipif(not ON_MACOS, reason="Core ML predicts only on macOS")
def test_runtime_runs_every_task_on_macos(zoo_exports, mixed_compact):
    session = mann_edge.runtime.load(zoo_exports["mixed"])
    assert session.task_names == mixed_compact.task_names
    coreml.validate(mixed_compact, zoo_exports["mixed"]).raise_for_errors()


def test_runtime_module_imports_neither_coremltools_nor_tensorflow():
    code = (
        "import sys\n"
        "import mann_edge.runtime.coreml as rc\n"
        "assert 'coremltools' not in sys.modules and 'tensorflow' not in sys.modules\n"
        "rc.import_coremltools()\n"
        "assert 'coremltools' in sys.modules and 'tensorflow' not in sys.modules and 'torch' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# -- errors --------------------------------------------------------------------------------------


def test_existing_output_is_refused_without_force(multiconv_compact, out):
    path = out / "existing"
    path.mkdir()
    (path / "keep.txt").write_text("user data")
    with pytest.raises(OutputExistsError):
        coreml.export(multiconv_compact, path)
    assert (path / "keep.txt").read_text() == "user data"
    coreml.export(multiconv_compact, path, force=True)
    assert sorted(p.name for p in path.iterdir()) == ["digit.mlpackage", "parity.mlpackage"]


def test_failure_mid_export_leaves_nothing(multiconv_compact, out, monkeypatch):
    target = out / "failing"
    before = sorted(out.iterdir())
    converted = []
    real_convert = coreml._convert

    def fail_on_second_task(*args, **kwargs):
        if converted:
            raise ConversionError("simulated failure on the second task")
        converted.append(True)
        return real_convert(*args, **kwargs)

    monkeypatch.setattr(coreml, "_convert", fail_on_second_task)
    with pytest.raises(ConversionError, match="simulated"):
        coreml.export(multiconv_compact, target)
    assert converted and not target.exists()
    assert sorted(out.iterdir()) == before


def test_unsupported_op_is_named_with_the_supported_ones(out):
    x = TensorSpec("x", (None, 4))
    node = Node("mystery", "fft", ("x",), {}, {}, (None, 4))
    cm = CompactModel([x], [node], [Task("t", (x,), (TensorSpec("y", (None, 4)),), ("mystery",))], {})
    with pytest.raises(ConversionError, match=r"'fft'.*mystery.*Supported ops: \[.*'conv2d'"):
        coreml.export(cm, out / "unsupported")
    assert not (out / "unsupported").exists()


def test_bad_options_are_refused(multiconv_compact, out):
    with pytest.raises(ConversionError, match="macOS13/iOS16 or later"):
        coreml.export(multiconv_compact, out / "old", target="macOS12")
    with pytest.raises(ConversionError, match="'float32', 'float16', .*'int8_weights'. Received: 'int8'"):
        coreml.export(multiconv_compact, out / "int8", dtype="int8")
    with pytest.raises(ConversionError, match="must end in .mlpackage"):
        coreml.export(multiconv_compact, out / "multi", target="iOS18")


def test_check_options_refuses_what_export_would_and_writes_nothing(out):
    before = sorted(out.iterdir())
    coreml.check_options(dtype="float16", sparse=False, target="iOS18", max_batch=8)
    for options, message in (
        ({"dtype": "int8"}, r"Core ML export takes dtype 'float32', 'float16', 'palettized2', .* or 'int8_weights'. "
                            r"Received: 'int8'"),
        ({"dtype": "palettized4"}, r"dtype 'palettized4' \(joint sparse compression\) needs a macOS15/iOS18 target.*"
                                   r"Received: target='macOS13'"),
        ({"target": "macOS12"}, r"target with sparse weights \(macOS13/iOS16 or later\): \[.*'macOS13'.*\]. "
                                r"Received: 'macOS12'"),
        ({"max_batch": 0}, r"max_batch must be a positive int. Received: 0"),
        ({"compute_units": "ALL"}, r"takes options \['sparse', 'target', 'max_batch'\]. "
                                   r"Received unknown options: \['compute_units'\]"),
        ({"sparse": "yes"}, r"`sparse` must be True or False. Received: sparse='yes'"),
    ):
        with pytest.raises(ConversionError, match=message):
            coreml.check_options(**options)
    assert sorted(out.iterdir()) == before


def test_evaluator_names_a_mil_op_it_cannot_evaluate(legacy_exports, monkeypatch):
    without_softmax = Registry(KERNELS.what, owner=KERNELS.owner, verb=KERNELS.verb, error=KERNELS.error)
    for op_type, kernel in KERNELS.items():
        if op_type != "softmax":
            without_softmax.register(op_type)(kernel)
    monkeypatch.setattr(mil_eval, "KERNELS", without_softmax)
    package = next(Path(legacy_exports["mann_mlp"]).glob("*.mlpackage"))
    with pytest.raises(ValidationError, match=r"cannot evaluate MIL op type 'softmax' \(op .*\). "
                                              r"Supported MIL op types: \[.*'add'"):
        MILEvaluator(package)


# -- joint compression (iOS18/macOS15): sparse + palettized, sparse + int8 ------------------------------


@pytest.fixture(scope="module")
def compressed(out, pruned_compact):
    """The 90 %-pruned model as one multifunction package per compressed dtype (and float32 sparse, the baseline)."""
    return {dtype: coreml.export(pruned_compact, out / f"pruned_{dtype}.mlpackage", dtype=dtype, target="macOS15")
            for dtype in ("float32", *coreml.COMPRESSED_DTYPES)}


@pytest.mark.parametrize("dtype, joint_op", [
    ("palettized2", "constexpr_lut_to_sparse"), ("palettized4", "constexpr_lut_to_sparse"),
    ("palettized6", "constexpr_lut_to_sparse"), ("palettized8", "constexpr_lut_to_sparse"),
    ("int8_weights", "constexpr_sparse_blockwise_shift_scale"),
])
def test_compressed_exports_keep_the_sparse_encoding_and_compress_its_values(compressed, pruned_compact, dtype,
                                                                             joint_op):
    path = compressed[dtype]
    assert read_layout(path).dtype == dtype
    for _, _, function in _programs(path):
        ops = [op for op in function.operations if op.op_type.startswith("constexpr_")]
        joint = [op for op in ops if op.op_type == joint_op]
        assert len(joint) == 3, [op.op_type for op in ops]  # the task's three kernels (biases: zero, dense)
        # each feeds a constexpr_sparse_to_dense: the weight stays sparse, its nonzero values compressed
        consumers = {child.op_type for op in joint for var in op.outputs for child in var.child_ops}
        assert consumers == {"constexpr_sparse_to_dense"}
        if joint_op == "constexpr_lut_to_sparse":
            bits = int(dtype.removeprefix("palettized"))
            assert {op.inputs["lut"].val.shape[-2] for op in joint} == {2**bits}  # a palette of 2**N values
        else:
            assert {op.inputs["nonzero_data"].val.dtype for op in joint} == {np.dtype(np.int8)}
    coreml.validate(pruned_compact, path).raise_for_errors()


def test_compressed_exports_are_smaller_with_fewer_bits(compressed):
    sizes = {dtype: _size(path) for dtype, path in compressed.items()}
    print(f"\nCore ML joint compression sizes (bytes): {sizes}")
    assert sizes["palettized2"] < sizes["palettized4"] < sizes["palettized6"] < sizes["palettized8"] < sizes["float32"]
    assert sizes["int8_weights"] < sizes["float32"]


def _reference_value(var) -> np.ndarray:
    """A const var's value, or coremltools' decompression of the constexpr output ``var``."""
    if var.op.op_type == "const":
        return np.asarray(var.val)
    values = var.op.materialized_val_inference()
    return np.asarray(values[var.op.outputs.index(var)] if isinstance(values, tuple) else values)


def test_numpy_decompression_of_every_constexpr_op_matches_coremltools(compressed):
    # The evaluator decompresses from the MIL spec in numpy; coremltools' own decompression is the reference.
    checked = set()
    for path in compressed.values():
        for _, _, function in _programs(path):
            for op in function.operations:
                if not op.op_type.startswith("constexpr_"):
                    continue
                ours = mil_eval.DECOMPRESSORS.lookup(op.op_type)(**{key: _reference_value(var)
                                                                      for key, var in op.inputs.items()})
                theirs = op.materialized_val_inference()
                for mine, reference in zip(ours if isinstance(ours, tuple) else (ours,),
                                           theirs if isinstance(theirs, tuple) else (theirs,)):
                    np.testing.assert_array_equal(np.asarray(mine), np.asarray(reference), err_msg=op.name)
                checked.add(op.op_type)
    assert checked == {"constexpr_sparse_to_dense", "constexpr_lut_to_sparse", "constexpr_sparse_blockwise_shift_scale"}


def _linear_outputs_compact(seed: int = 3) -> CompactModel:
    """x(64) -> dense 128 relu -> dense 16 (logits: errors are not squashed by a softmax), kernels 80 % zeros."""
    rng = np.random.default_rng(seed)

    def kernel(inputs, outputs):
        values = rng.normal(0, 1, (inputs, outputs)).astype("float32")
        values[rng.random(values.shape) < 0.8] = 0.0
        return values

    x = TensorSpec("x", (None, 64))
    nodes = [Node("hidden", "dense", ("x",), {"kernel": "k1"}, {"activation": "relu"}, (None, 128)),
             Node("logits", "dense", ("hidden",), {"kernel": "k2"}, {}, (None, 16))]
    return CompactModel([x], nodes, [Task("logits", (x,), (TensorSpec("y", (None, 16)),), ("logits",))],
                        {"k1": kernel(64, 128), "k2": kernel(128, 16)})


def test_a_misdecoded_palette_fails_verification(out, monkeypatch):
    # The 4-bit tolerance is loose, not blind: values read from the neighbouring palette entry fail it.
    cm = _linear_outputs_compact()
    path = coreml.export(cm, out / "logits_palettized4.mlpackage", dtype="palettized4", target="macOS15")
    assert coreml.validate(cm, path).ok
    decode = mil_eval.DECOMPRESSORS.lookup("constexpr_lut_to_sparse")
    broken = Registry(mil_eval.DECOMPRESSORS.what, owner=mil_eval.DECOMPRESSORS.owner,
                      verb=mil_eval.DECOMPRESSORS.verb, error=mil_eval.DECOMPRESSORS.error)
    broken.register("constexpr_lut_to_sparse")(
        lambda indices_mask, indices_nonzero_data, lut, vector_axis=None:
        decode(indices_mask, (indices_nonzero_data.astype(np.int64) + 1) % lut.shape[-2], lut))
    for op_type in mil_eval.DECOMPRESSORS:
        if op_type != "constexpr_lut_to_sparse":
            broken.register(op_type)(mil_eval.DECOMPRESSORS.lookup(op_type))
    monkeypatch.setattr(mil_eval, "DECOMPRESSORS", broken)
    report = coreml.validate(cm, path)
    assert not report.ok and report.atol_scaled and report.atol == 0.25


def test_compression_needs_the_ios18_target(pruned_compact, out):
    with pytest.raises(ConversionError, match=r"dtype 'int8_weights' \(joint sparse compression\) needs a "
                                              r"macOS15/iOS18 target"):
        coreml.export(pruned_compact, out / "old_target", dtype="int8_weights", target="iOS16")
    assert not (out / "old_target").exists()
