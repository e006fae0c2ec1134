"""Compaction, the `.mann` bundle and the bundle runtime: parity with Keras, CSR storage, checks, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
import zipfile

import keras
import numpy as np
import pytest

import mann_edge
import zoo
from mann_edge.bundle import FORMAT_VERSION, MANIFEST, WEIGHTS
from mann_edge.compaction import MaskOverlapWarning, mask_overlaps
from mann_edge.errors import BundleError, CompactionError, InputError, OutputExistsError, TaskError
from mann_edge.layers import MultiMaskedDense, SelectorLayer
from mann_edge.sparse import CSRWeight


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, mixed_compact, multiconv_compact, activations_compact, legacy_compacts):
    """Every test model saved as a `.mann` and opened again through the runtime."""
    out = tmp_path_factory.mktemp("bundles")
    compacts = {"mixed": mixed_compact, "multiconv": multiconv_compact, "activations": activations_compact,
                **{f"legacy_{name}": cm for name, cm in legacy_compacts.items()}}
    return {name: cm.save(out / f"{name}.mann") for name, cm in compacts.items()}


# -- tasks and weights --------------------------------------------------------------------------------------


def test_a_task_reads_only_the_inputs_it_needs(mixed_compact):
    specs = {task.name: [spec.name for spec in task.inputs] for task in mixed_compact.tasks}
    assert specs == {"vision": ["image"], "text": ["tokens"], "both": ["image", "tokens"]}


def test_running_a_task_runs_only_its_own_ops(bundles, mixed_compact):
    session = mann_edge.runtime.load(bundles["mixed"])
    session.run("vision", zoo.sample_batch(zoo.build_mixed(), 2)[0])
    # the task ran as a compiled program (numba) or op by op (scipy, or a batch past the program's memory plan)
    program = session._programs.get("vision")
    ran = {node.name for node in program.nodes} if program is not None else set()
    if "vision" in session._executors:
        ran |= {name for name, _, _ in session._executors["vision"].steps}
    assert ran == {node.name for node in mixed_compact.task_nodes("vision")}
    assert not {mixed_compact.node(name).attrs["layer"] for name in ran} & {"embedding", "layer_norm", "text_dense"}
    assert {task for task, program in session._programs.items() if program is not None} | set(session._executors) \
        == {"vision"}


# -- what compaction builds ----------------------------------------------------------------------


def test_multitask_layers_split_into_one_csr_op_per_task_with_small_indices(pruned_compact):
    dense_nodes = [node for node in pruned_compact.nodes if node.op == "dense"]
    assert len(dense_nodes) == 2 * 3
    for node in dense_nodes:
        kernel = pruned_compact.weights[node.weights["kernel"]]
        assert isinstance(kernel, CSRWeight)
        rows, columns = kernel.matrix_shape
        # the smallest unsigned type that holds a column index (256 inputs: uint8) and the nonzero count
        assert kernel.indices.dtype == (np.uint8 if columns <= 256 else np.uint16)
        assert kernel.indptr.dtype == (np.uint16 if kernel.nnz < 2**16 else np.uint32)
        assert kernel.nnz <= 0.1 * np.prod(kernel.shape) + kernel.shape[-1]


@pytest.mark.parametrize("zoo_name", ["mixed", "multiconv"])
def test_nodes_record_the_layer_and_slab_they_come_from(zoo_name, request):
    model = request.getfixturevalue(f"{zoo_name}_model")
    compact = request.getfixturevalue(f"{zoo_name}_compact")
    layers = {layer.name: layer for layer in model.layers}
    slabs: dict[str, list[int]] = {}
    for node in compact.nodes:
        layer = layers[node.attrs["layer"]]
        assert ("slab" in node.attrs) == getattr(layer, "multitask", False), node.name
        if "slab" in node.attrs:
            slabs.setdefault(layer.name, []).append(node.attrs["slab"])
    # every branch of every multitask layer, each once
    multitask = {name: len(layer.input) for name, layer in layers.items() if getattr(layer, "multitask", False)}
    assert {name: sorted(found) for name, found in slabs.items()} == {n: list(range(k)) for n, k in multitask.items()}


def test_a_weight_stays_dense_where_csr_would_be_larger():
    from mann_edge.sparse import encode_weight, weight_nbytes

    rng = np.random.default_rng(0)
    full = rng.normal(size=(300, 40)).astype(np.float32)
    mostly_zero = full * (rng.random(full.shape) < 0.1)
    assert isinstance(encode_weight(full), np.ndarray)
    encoded = encode_weight(mostly_zero)
    assert isinstance(encoded, CSRWeight) and weight_nbytes(encoded) < mostly_zero.nbytes
    np.testing.assert_array_equal(encoded.to_dense(), mostly_zero)


def test_task_stats_count_nonzeros_and_bytes(pruned_compact):
    stats = {row["task"]: row for row in pruned_compact.task_stats()}
    assert set(stats) == {"task_a", "task_b"}
    for row in stats.values():
        assert row["params"] == 256 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
        assert 0.09 <= row["density"] <= 0.11
        assert row["bytes"] < 0.2 * row["dense_bytes"]


def test_tasks_are_named_by_caller_then_output_names_then_index():
    x = keras.Input((4,), name="x")
    h = MultiMaskedDense(3, name="m")([x, x])
    model = keras.Model(x, [SelectorLayer(0, name="first")(h), SelectorLayer(1, name="second")(h)])
    mann_edge.rsn2.mask_model(model, 50, method="magnitude")
    assert mann_edge.compact(model).task_names == ["first", "second"]
    assert mann_edge.compact(model, task_names=["a", "b"]).task_names == ["a", "b"]
    with pytest.raises(CompactionError, match="2"):
        mann_edge.compact(model, task_names=["only_one"])


def _overlapping_kernels():
    """The legacy conv fixture with slab 1 of its first kernel mask also claiming slab 0's positions."""
    model = mann_edge.load_legacy(zoo.LEGACY / "mann_conv.h5")
    layer = model.get_layer("multi_masked_conv2d")
    kernel, bias = layer.get_masks()
    kernel[1] = np.maximum(kernel[0], kernel[1])
    layer.set_masks([kernel, bias])
    return model, layer.name, int(kernel[0].sum())


def test_overlapping_masks_warn_and_strict_refuses():
    model, name, shared = _overlapping_kernels()
    rows = [row for row in mask_overlaps(model) if row["overlapping"] and row["must_be_disjoint"]]
    assert [(row["layer"], row["weight"], row["overlapping"]) for row in rows] == [(name, "kernel", shared)]
    with pytest.warns(MaskOverlapWarning, match=rf"'{name}': {shared} of 144 kernel positions .*not disjoint"):
        mann_edge.compact(model)
    with pytest.raises(CompactionError, match=rf"'{name}': {shared} of 144 kernel positions .*not disjoint"):
        mann_edge.compact(model, strict=True)


@pytest.mark.parametrize("name", zoo.LEGACY_NAMES)
def test_strict_accepts_legacy_models_whose_kernel_masks_are_disjoint(name, legacy_models):
    # The original packages leave conv bias masks all ones, so biases "overlap" while kernels do not:
    # overlap is judged on kernels; shared biases are listed by mask_overlaps, and neither warn nor fail.
    model, _ = legacy_models[name]
    rows = mask_overlaps(model)
    assert rows and not any(row["overlapping"] for row in rows if row["weight"] == "kernel")
    shared_biases = [row for row in rows if row["weight"] == "bias" and row["overlapping"]]
    assert bool(shared_biases) == ("conv" in name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = mann_edge.compact(model, task_names=["task0", "task1"], strict=True)
    reported = [str(w.message) for w in caught if issubclass(w.category, MaskOverlapWarning)]
    assert reported == []
    zoo.check_legacy_fixture(cm.run, cm, name)


def test_disjoint_masks_compact_without_warning(pruned_compact):
    with warnings.catch_warnings():
        warnings.simplefilter("error", MaskOverlapWarning)
        mann_edge.compact(zoo.build_pruned_mlp())


def test_a_layer_it_cannot_compact_is_named_with_its_class():
    x = keras.Input((4, 3), name="x")
    y = keras.layers.LSTM(2, name="recurrent")(x)
    expected = r"cannot compact layer type 'LSTM' \(layer 'recurrent'\)\. Supported layer types: \[.*'MultiMaskedDense'"
    with pytest.raises(CompactionError, match=expected):
        mann_edge.compact(keras.Model(x, y))


def _nested_model() -> keras.Model:
    """A functional block called twice (second call on its own output) and a Sequential, nested in one model."""
    keras.utils.set_random_seed(0)
    inner = keras.Input((4,))
    block = keras.Model(inner, keras.layers.Dense(4, activation="tanh", name="dense")(inner), name="block")
    head = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="dense")], name="head")
    x = keras.Input((4,), name="x")
    first = block(x)
    y = head(keras.layers.Add(name="add")([block(first), x]))
    return keras.Model(x, [y, keras.layers.Dense(3, name="other")(first)], name="outer")


def test_nested_models_are_flattened_into_the_graph_named_by_path():
    from mann_edge.compaction import task_usage

    model = _nested_model()
    cm = mann_edge.compact(model, task_names=["y", "other"])
    # a layer called twice gives two nodes (the second call's named '@1') of one layer
    assert {(n.name, n.attrs["layer"]) for n in cm.nodes if n.op == "dense"} == {
        ("block/dense", "block/dense"), ("other", "other"), ("block@1/dense", "block/dense"), ("head/dense", "head/dense")}
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    for task, want in zip(cm.task_names, zoo.keras_outputs(model, x)):
        np.testing.assert_allclose(cm.run(task, x)[0], want, atol=1e-6)
    usage = task_usage(model)
    assert usage[0].layers == {("block", None), ("block/dense", None), ("head", None), ("head/dense", None),
                               ("add", None)}
    assert usage[1].layers == {("block", None), ("block/dense", None), ("other", None)}
    assert usage[0].inputs == usage[1].inputs == {"x"}


def test_check_compactable_looks_inside_nested_models():
    from mann_edge.compaction import check_compactable

    inner = keras.Input((4, 3))
    block = keras.Model(inner, keras.layers.LSTM(2, name="recurrent")(inner), name="block")
    x = keras.Input((4, 3), name="x")
    problems = check_compactable(keras.Model(x, keras.layers.Dense(2)(block(x))))
    assert len(problems) == 1 and "layer 'block/recurrent' (LSTM)" in problems[0] and "Conv1D" in problems[0]
    assert check_compactable(_nested_model()) == []


@pytest.mark.parametrize("build, match", [
    (lambda x: keras.layers.UpSampling2D(2, interpolation="bicubic", name="smooth")(x),
     r"UpSampling2D 'smooth' uses interpolation='bicubic'"),
    (lambda x: keras.layers.Conv2D(4, 3, groups=2, name="grouped")(keras.layers.Conv2D(2, 1)(x)),
     r"Layer 'grouped' uses groups=2"),
    (lambda x: keras.layers.Normalization(axis=1, mean=0.0, variance=1.0, name="rows")(x),
     r"Normalization 'rows' normalises axes \(1,\)"),
    (lambda x: keras.layers.Attention(name="scored")([x, x], return_attention_scores=True)[0],
     r"Layer 'scored' \(Attention\) is called with return_attention_scores"),
])
def test_layer_settings_it_cannot_compact_are_named_with_the_layer(build, match):
    x = keras.Input((4, 4, 1), name="image")
    model = keras.Model(x, build(x))
    with pytest.raises(CompactionError, match=match):
        mann_edge.compact(model)


def test_multi_head_attention_keeps_its_projection_kernels_sparse():
    keras.utils.set_random_seed(0)
    x = keras.Input((6, 16), name="x")
    layer = keras.layers.MultiHeadAttention(4, 8, name="mha")
    model = keras.Model(x, layer(x, x))
    for weight in layer.weights:
        if weight.path.endswith("kernel"):
            value = keras.ops.convert_to_numpy(weight)
            weight.assign(np.where(np.random.default_rng(1).random(value.shape) < 0.8, 0.0, value))
    cm = mann_edge.compact(model)
    kernels = [cm.weights[n.weights["kernel"]] for n in cm.nodes if n.op == "dense"]
    assert len(kernels) == 4 and all(isinstance(k, CSRWeight) for k in kernels)
    inputs = np.random.default_rng(2).normal(size=(3, 6, 16)).astype("float32")
    np.testing.assert_allclose(cm.run(cm.task_names[0], inputs)[0], zoo.keras_outputs(model, inputs)[0], atol=1e-5)


def test_nan_weights_are_refused_naming_the_layer():
    x = keras.Input((4,), name="x")
    layer = keras.layers.Dense(2, name="broken")
    model = keras.Model(x, layer(x))
    kernel = layer.get_weights()[0]
    kernel[0, 0] = np.nan
    layer.set_weights([kernel, layer.get_weights()[1]])
    with pytest.raises(CompactionError, match="broken"):
        mann_edge.compact(model)


# -- the bundle ----------------------------------------------------------------------------------


def test_bundle_round_trip_is_bit_identical(bundles, mixed_compact):
    loaded = mann_edge.load_compact(bundles["mixed"])
    assert loaded.task_names == mixed_compact.task_names
    assert [n.to_json() for n in loaded.nodes] == [n.to_json() for n in mixed_compact.nodes]
    assert set(loaded.weights) == set(mixed_compact.weights)
    for key, weight in mixed_compact.weights.items():
        other = loaded.weights[key]
        assert type(other) is type(weight)
        if isinstance(weight, CSRWeight):
            for part in ("indptr", "indices", "data"):
                a, b = getattr(weight, part), getattr(other, part)
                assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
            assert (weight.shape, weight.layout) == (other.shape, other.layout)
        else:
            assert weight.dtype == other.dtype and weight.tobytes() == other.tobytes()


def test_bundle_records_format_version_and_provenance(bundles):
    with zipfile.ZipFile(bundles["legacy_mann_mlp"]) as archive:
        manifest = json.loads(archive.read(MANIFEST))
    assert manifest["format_version"] == FORMAT_VERSION
    provenance = mann_edge.load_compact(bundles["legacy_mann_mlp"]).provenance
    assert provenance["mann_edge_version"] == mann_edge.__version__
    assert "created" not in provenance  # no build time unless SOURCE_DATE_EPOCH asks for one (reproducible bytes)


def test_bundle_from_a_file_records_the_source_hash(tmp_path):
    from mann_edge.files import sha256_file
    from mann_edge.sources import load_source

    source = zoo.LEGACY / "mann_mlp.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MaskOverlapWarning)
        cm = load_source(source)
    assert cm.provenance["source_sha256"] == sha256_file(source)
    assert cm.provenance["source"] == "mann_mlp.h5"


def test_existing_bundle_is_not_overwritten_without_force(bundles, mixed_compact):
    path = bundles["mixed"]
    before = open(path, "rb").read()
    with pytest.raises(OutputExistsError, match="force"):
        mixed_compact.save(path)
    assert open(path, "rb").read() == before
    mixed_compact.save(path, force=True)


def _rewrite_zip(source, target, edit):
    with zipfile.ZipFile(source) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in edit(entries).items():
            archive.writestr(name, data)


def test_truncated_bundle_is_refused_naming_the_file(bundles, tmp_path):
    data = open(bundles["multiconv"], "rb").read()
    for cut in (0, 10, len(data) // 2, len(data) - 10):
        path = tmp_path / f"cut_{cut}.mann"
        path.write_bytes(data[:cut])
        with pytest.raises(BundleError, match=str(path.name)):
            mann_edge.load_compact(path)


def test_tampered_weights_are_refused_by_their_hash(bundles, tmp_path):
    def flip(entries):
        weights = bytearray(entries[WEIGHTS])
        weights[-1] ^= 0xFF
        return {**entries, WEIGHTS: bytes(weights)}

    path = tmp_path / "tampered.mann"
    _rewrite_zip(bundles["multiconv"], path, flip)
    with pytest.raises(BundleError, match="hash|sha256"):
        mann_edge.load_compact(path)


def test_a_newer_format_version_is_explained(bundles, tmp_path):
    def newer(entries):
        manifest = json.loads(entries[MANIFEST])
        manifest["format_version"] = FORMAT_VERSION + 1
        return {**entries, MANIFEST: json.dumps(manifest)}

    path = tmp_path / "newer.mann"
    _rewrite_zip(bundles["multiconv"], path, newer)
    with pytest.raises(BundleError, match=r"newer|upgrade"):
        mann_edge.load_compact(path)


# -- the runtime ---------------------------------------------------------------------------------


def test_runtime_imports_neither_tensorflow_nor_keras(bundles):
    code = (
        "import sys, numpy as np, mann_edge.runtime as rt\n"
        f"s = rt.load({str(bundles['legacy_mann_mlp'])!r})\n"
        "s.run(s.tasks[0].name, np.zeros((1, s.tasks[0].inputs[0].shape[1]), np.float32))\n"
        "bad = [m for m in ('tensorflow', 'keras') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_tasks_expose_names_and_specs(bundles):
    session = mann_edge.runtime.load(bundles["mixed"])
    assert session.task_names == ["vision", "text", "both"]
    vision = session.task("vision")
    assert [(s.name, s.shape, s.dtype) for s in vision.inputs] == [("image", (None, 8, 8, 1), "float32")]
    assert [(s.name, s.shape) for s in vision.outputs] == [("vision", (None, 10))]


def test_unknown_task_names_the_tasks_there_are(bundles):
    session = mann_edge.runtime.load(bundles["mixed"])
    with pytest.raises(TaskError, match=r"'nope'.*vision.*text.*both"):
        session.run("nope", np.zeros((1, 8, 8, 1)))


def test_input_checks_name_the_task_and_the_spec(bundles):
    session = mann_edge.runtime.load(bundles["mixed"])
    image = np.zeros((2, 8, 8, 1), np.float32)
    tokens = np.zeros((2, zoo.TOKENS), np.int32)
    with pytest.raises(InputError, match=r"'both'.*2 input"):
        session.run("both", [image])
    with pytest.raises(InputError, match=r"'vision'.*image.*\(2, 8, 8, 3\)"):
        session.run("vision", np.zeros((2, 8, 8, 3)))
    with pytest.raises(InputError, match=r"add a batch axis"):
        session.run("vision", np.zeros((8, 8, 1)))
    with pytest.raises(InputError, match=r"'text'.*integer ids"):
        session.run("text", tokens.astype(np.float32))
    with pytest.raises(InputError, match=r"takes inputs \['image', 'tokens'\]"):
        session.run("both", {"image": image, "words": tokens})


def test_float64_inputs_are_cast_and_give_the_float32_result(bundles):
    session = mann_edge.runtime.load(bundles["legacy_mann_mlp"])
    task = session.tasks[0]
    x = np.random.default_rng(0).normal(size=(3, task.inputs[0].shape[1]))
    (from64,) = session.run(task.name, x)
    (from32,) = session.run(task.name, x.astype(np.float32))
    assert from64.dtype == np.float32
    np.testing.assert_array_equal(from64, from32)


def test_dict_list_and_single_array_inputs_agree(bundles):
    session = mann_edge.runtime.load(bundles["mixed"])
    rng = np.random.default_rng(1)
    image = rng.normal(size=(2, 8, 8, 1)).astype(np.float32)
    tokens = rng.integers(0, zoo.VOCAB, (2, zoo.TOKENS)).astype(np.int32)
    (by_list,) = session.run("both", [image, tokens])
    (by_dict,) = session.run("both", {"tokens": tokens, "image": image})
    np.testing.assert_array_equal(by_list, by_dict)
    (single,) = session.run("vision", image)
    (single_list,) = session.run("vision", [image])
    np.testing.assert_array_equal(single, single_list)


def test_missing_path_and_unknown_kind_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.mann"):
        mann_edge.runtime.load(tmp_path / "nothing.mann")
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 16)
    with pytest.raises(mann_edge.errors.MannEdgeError, match="weights.bin"):
        mann_edge.runtime.load(other)


# -- inspect -------------------------------------------------------------------------------------


def test_inspect_reports_tasks_layers_and_bytes(bundles):
    report = mann_edge.inspect(bundles["legacy_mann_mlp"])
    assert [t["task"] for t in report["tasks"]] == ["task0", "task1"]
    assert report["total"]["bytes"] < report["total"]["dense_bytes"]
    assert all({"node", "op", "params", "nonzeros", "density"} <= set(row) for row in report["layers"])


@pytest.mark.parametrize("kind", [".keras", ".h5", ".mann"])
def test_inspect_command_reads_every_source_kind(kind, bundles, tmp_path, mixed_model):
    from mann_edge.cli import main

    path = {".h5": zoo.LEGACY / "mann_mlp.h5", ".mann": bundles["mixed"]}.get(kind)
    if path is None:
        path = tmp_path / "mixed.keras"
        mixed_model.save(path)
    result = subprocess.run([sys.executable, "-m", "mann_edge.cli", "inspect", str(path), "--json"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["tasks"] and all(t["nonzeros"] <= t["params"] for t in report["tasks"])
    assert main(["inspect", str(path)]) == 0


def test_output_specs_give_the_shapes_the_tasks_return(activations_compact):
    # Keras's symbolic shape ignores the activation (glu halves its axis); the specs must not.
    x = np.ones((2, 6), np.float32)
    for task in activations_compact.tasks:
        (got,) = activations_compact.run(task.name, x)
        assert got.shape[1:] == task.outputs[0].shape[1:], task.name


def test_inspect_lists_every_layer_of_a_model_it_cannot_compact(tmp_path, capsys):
    from mann_edge.cli import main

    x = keras.Input((4, 3), name="x")
    h = keras.layers.LSTM(2, name="recurrent")(x)
    y = keras.layers.Dense(2, name="out")(keras.layers.PReLU(name="prelu")(h))
    path = tmp_path / "lstm.keras"
    keras.Model(x, y).save(path)
    assert main(["inspect", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "Cannot be compacted or exported (2 layer(s) to change)" in printed
    assert "'recurrent' (LSTM)" in printed and "'prelu' (PReLU)" in printed and "LeakyReLU" in printed
    report = mann_edge.inspect(path)
    assert report["compactable"] is False and len(report["problems"]) == 2
    assert [row["layer"] for row in report["layers"]][-1] == "out" and report["total"]["params"] > 0
    assert main(["inspect", str(path), "--plot", str(tmp_path / "m.png")]) == 1
    assert "cannot be compacted" in capsys.readouterr().err and not (tmp_path / "m.png").exists()
    with pytest.raises(CompactionError, match="LSTM"):  # convert still refuses it
        mann_edge.convert(str(path), tmp_path / "out")
