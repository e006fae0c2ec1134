"""The rest of beyondml's TensorFlow catalogue: 1-D/3-D MANN layers, MultitaskNormalization, nested models.

Read from the files beyondml 0.1.7 saved (outputs against the ones it recorded), trained and
pruned by RSN2 as new Keras 3 models, compacted with each task's graph holding what it reads.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from sklearn.datasets import load_digits

import mann_edge
import zoo
from mann_edge import rsn2
from mann_edge.compaction import mask_overlaps, task_usage
from mann_edge.errors import LegacyFormatError
from mann_edge.layers import (
    MaskedConv1D,
    MaskedConv3D,
    MaskedDense,
    MultiConv3D,
    MultiMaskedConv1D,
    MultiMaskedConv3D,
    MultiMaskedDense,
    MultiMaxPool3D,
    MultitaskNormalization,
    SelectorLayer,
)


@pytest.mark.parametrize("name", zoo.CATALOGUE_NAMES)
def test_catalogue_fixtures_give_the_recorded_outputs(name):
    model = mann_edge.load_legacy(zoo.LEGACY / f"{name}.h5")
    recorded = zoo.legacy_reference(name)
    outputs = zoo.keras_outputs(model, [recorded[f"x{i}"] for i in range(len(model.inputs))])
    atol = 2e-3 if name == "beyondml_float16" else 1e-5  # float16 compute rounds differently in TF 2.13 and 2.21
    for index, got in enumerate(outputs):
        np.testing.assert_allclose(np.asarray(got, np.float32), recorded[f"out{index}"], atol=atol, rtol=0,
                                   err_msg=f"{name} output {index}")


def test_nested_models_are_read_into_one_graph_with_their_weights():
    model = mann_edge.load_legacy(zoo.LEGACY / "beyondml_transformer.h5")
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)
    names = {layer.name for layer in model.layers}
    assert {"embedding", "embedding_1", "multi_dense", "attention", "attention_1", "layer_normalization_1"} <= names
    classes = {type(layer).__name__ for layer in model.layers}
    assert {"Attention", "Embedding", "MultiDense", "LayerNormalization", "Reshape", "Dropout"} <= classes


def test_a_float16_model_keeps_its_float16_layers_and_compacts_to_float32():
    model = mann_edge.load_legacy(zoo.LEGACY / "beyondml_float16.h5")
    assert {layer.dtype_policy.name for layer in model.layers if isinstance(layer, keras.layers.Dense)} == {"float16"}
    cm = mann_edge.compact(model)
    # the compact graph computes in float32 (the float16 weights widen exactly); --dtype picks the stored width
    assert {spec.dtype for spec in cm.inputs} == {"float32"}
    recorded = zoo.legacy_reference("beyondml_float16")
    for index, task in enumerate(cm.tasks):
        (got,) = cm.run(task.name, {task.inputs[0].name: recorded[f"x{index}"]})
        np.testing.assert_allclose(got, recorded[f"out{index}"], atol=2e-3)


def test_sparse_layers_are_refused_with_how_to_resave():
    with pytest.raises(LegacyFormatError, match=r"layer 'sparse_dense' is a beyondml SparseDense.*pickle.*masked form"):
        mann_edge.load_legacy(zoo.LEGACY / "beyondml_sparse.h5")


def test_multitask_normalization_reads_every_branch_and_owns_its_own():
    model = mann_edge.load_legacy(zoo.LEGACY / "beyondml_mtnorm.h5")
    usage = task_usage(model)
    for task in (0, 1):
        other = 1 - task
        assert ("multi_masked_dense_1", task) in usage[task].layers
        assert ("multi_masked_dense_1", other) not in usage[task].layers
        assert ("multi_masked_dense_1", other) in usage[task].reads
    cm = mann_edge.compact(model, task_names=["a", "b"])
    for task in cm.tasks:
        slabs = {node.attrs.get("slab") for node in cm.task_nodes(task.name) if node.op == "dense"}
        assert slabs == {0, 1}, task.name  # a task's graph holds every branch it divides by


@pytest.mark.parametrize("layer_class, rank", [(MaskedConv1D, 1), (MaskedConv3D, 3)])
def test_masked_convolutions_of_every_rank_round_trip_through_keras(layer_class, rank, tmp_path):
    keras.utils.set_random_seed(0)
    x = keras.Input((6,) * rank + (2,))
    model = keras.Model(x, layer_class(3, kernel_size=2, strides=2, padding="valid", activation="relu")(x))
    path = tmp_path / "m.keras"
    model.save(path)
    again = keras.models.load_model(path)
    sample = np.random.default_rng(0).normal(size=(2,) + (6,) * rank + (2,)).astype("float32")
    np.testing.assert_array_equal(zoo.keras_outputs(model, sample)[0], zoo.keras_outputs(again, sample)[0])
    assert zoo.keras_outputs(model, sample)[0].shape == (2,) + (3,) * rank + (3,)


def test_masked_conv3d_takes_the_originals_positional_order():
    layer = MaskedConv3D(4, 3, "valid", 1, "relu", False)  # beyondml: (filters, kernel_size, padding, strides, activation, use_bias)
    assert keras.activations.serialize(layer.activation) == "relu" and layer.use_bias is False
    assert MultiMaxPool3D().pool_size == (3, 3, 3) and MultiMaxPool3D().strides == (1, 1, 1)


def _digits():
    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")
    return images, digits.target


def _conv3d_and_text_model(seed: int) -> keras.Model:
    """Two tasks on a digit, each through its own slab of a MultiMaskedConv3D (4 noisy slices of the image)
    and of a MultiMaskedConv1D (its rows as a sequence)."""
    keras.utils.set_random_seed(seed)
    volume, rows = keras.Input((4, 8, 8, 1), name="volume_in"), keras.Input((8, 8), name="rows_in")
    v = MultiMaxPool3D(2, 2)(MultiMaskedConv3D(4, 3, activation="relu")([volume, volume]))
    r = MultiMaskedConv1D(8, 3, activation="relu")([rows, rows])
    heads = [keras.layers.Concatenate()([keras.layers.Flatten()(v[i]), keras.layers.Flatten()(r[i])]) for i in (0, 1)]
    outputs = [MaskedDense(2, activation="softmax", name=name)(h) for name, h in zip(("parity", "low"), heads)]
    return keras.Model([volume, rows], outputs)


@pytest.mark.parametrize("seed", [0, 1])
def test_rsn2_prunes_3d_and_1d_multitask_convolutions_to_exclusive_masks(seed):
    images, labels = _digits()
    rng = np.random.default_rng(seed)
    volumes = np.stack([images + rng.normal(0, 0.1, images.shape).astype("float32") for _ in range(4)], axis=1)
    model = _conv3d_and_text_model(seed)
    x = {"volume_in": volumes[..., None][:600], "rows_in": images[:600]}
    data = {"parity": (x, labels[:600] % 2), "low": (x, (labels[:600] < 5).astype(int))}
    report = rsn2.fit_rsn2(model, data, sparsity=60, step=30, tolerance=1.0, epochs=1, patience=1, final_epochs=0,
                           verbose=False, seed=seed)
    assert [round(task.sparsity) for task in report.tasks] == [60, 60]
    assert not [row for row in mask_overlaps(model) if row["overlapping"] and row["must_be_disjoint"]]
    cm = mann_edge.compact(model, strict=True)
    inputs = {"volume_in": volumes[600:607, ..., None], "rows_in": images[600:607]}
    expected = zoo.keras_outputs(model, [inputs["volume_in"], inputs["rows_in"]])
    for task, want in zip(cm.tasks, expected):
        (got,) = cm.run(task.name, {spec.name: inputs[spec.name] for spec in task.inputs})
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_rsn2_trains_each_task_of_a_normalized_pair_on_its_own_branch():
    images, labels = _digits()
    x = images.reshape(len(images), -1)[:, :32]
    keras.utils.set_random_seed(0)
    a, b = keras.Input((32,), name="a_in"), keras.Input((32,), name="b_in")
    h = MultiMaskedDense(16, activation="relu")([a, b])
    h = MultiMaskedDense(4, activation="sigmoid")(h)
    p0, p1 = MultitaskNormalization()(h)
    model = keras.Model([a, b], [SelectorLayer(0, name="first")([p0, p1]), SelectorLayer(1, name="second")([p0, p1])])
    data = {"first": ({"a_in": x[:400], "b_in": x[:400]}, labels[:400] % 4),
            "second": ({"a_in": x[:400], "b_in": x[:400]}, labels[:400] // 3)}
    report = rsn2.fit_rsn2(model, data, sparsity=50, step=25, tolerance=1.0, epochs=1, patience=1, final_epochs=0,
                           verbose=False, loss="sparse_categorical_crossentropy")
    assert [round(task.sparsity) for task in report.tasks] == [50, 50]
    masks = model.layers[2].get_masks()[0]
    assert (masks.sum(axis=0) <= 1).all()  # exclusive: each task pruned and kept its own slab only
    assert 0.45 < masks[0].mean() < 0.55 and 0.2 < masks[1].mean() < 0.3


def test_multi_conv3d_without_masks_compacts():
    keras.utils.set_random_seed(0)
    x = keras.Input((4, 6, 6, 1))
    a, b = MultiConv3D(2, 3)([x, x])
    model = keras.Model(x, [keras.layers.Flatten()(a), keras.layers.Flatten()(b)])
    cm = mann_edge.compact(model)
    sample = np.random.default_rng(0).normal(size=(3, 4, 6, 6, 1)).astype("float32")
    for task, want in zip(cm.tasks, zoo.keras_outputs(model, sample)):
        np.testing.assert_allclose(cm.run(task.name, {task.inputs[0].name: sample})[0], want, atol=1e-5)


def test_a_float16_model_converts_to_every_format_and_each_runs_within_float16_tolerance(tmp_path):
    from test_parity import _runner

    from mann_edge.formats import FORMATS

    exports = [name for name in FORMATS if name != "mann"]  # the bundle is always written
    result = mann_edge.convert(zoo.LEGACY / "beyondml_float16.h5", tmp_path, formats=exports,
                               task_names=["t0", "t1"])  # verify: every export against the compact model, 1e-5
    recorded = zoo.legacy_reference("beyondml_float16")
    for name, path in result.artifacts.items():
        run = _runner(name, path)
        for index, task in enumerate(("t0", "t1")):
            (got,) = run(task, {f"input_{index + 1}": recorded[f"x{index}"]})
            np.testing.assert_allclose(np.asarray(got), recorded[f"out{index}"], atol=2e-3, err_msg=f"{name} {task}")
    assert set(result.artifacts) == set(FORMATS)


def test_rsn2_refuses_masked_layers_inside_a_nested_model():
    inner_in = keras.Input((8,))
    inner = keras.Model(inner_in, MaskedDense(4, name="inside")(inner_in), name="block")
    x = keras.Input((8,))
    model = keras.Model(x, MaskedDense(2, activation="softmax", name="out")(inner(x)))
    with pytest.raises(mann_edge.errors.CompactionError, match=r"nested model 'block' holds masked layers \['inside'\]"):
        rsn2.check_model(model)


def test_a_crafted_file_nesting_models_without_end_is_refused(tmp_path):
    from test_legacy import write_legacy

    body = {"name": "m0", "layers": [], "input_layers": [], "output_layers": []}
    config = {"class_name": "Functional", "config": body}
    for depth in range(1, 20):
        inner = {"name": f"m{depth}", "layers": [], "input_layers": [], "output_layers": []}
        body["layers"].append({"class_name": "Functional", "name": f"m{depth}", "config": inner, "inbound_nodes": []})
        body = inner
    path = tmp_path / "deep.h5"
    write_legacy(path, config, {})
    with pytest.raises(LegacyFormatError, match="models nested more than 16 deep"):
        mann_edge.load_legacy(path)


def test_transformer_heads_serving_every_task_are_not_called_overlapping_masks():
    import warnings

    from mann_edge.compaction import MaskOverlapWarning

    model = mann_edge.load_legacy(zoo.LEGACY / "beyondml_transformer.h5")
    heads = [row for row in mask_overlaps(model) if row["layer"] == "multi_dense"]
    assert heads and all(row["overlapping"] and not row["must_be_disjoint"] for row in heads)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MaskOverlapWarning)
        mann_edge.compact(model, strict=True)  # the task slabs (multi_masked_dense_2) are disjoint


def test_rsn2_says_when_a_later_task_changes_an_earlier_ones_outputs():
    images, labels = _digits()
    x = images.reshape(len(images), -1)[:300, :32]
    keras.utils.set_random_seed(0)
    a, b = keras.Input((32,), name="a_in"), keras.Input((32,), name="b_in")
    p0, p1 = MultitaskNormalization()(MultiMaskedDense(4, activation="sigmoid")([a, b]))
    model = keras.Model([a, b], [SelectorLayer(0, name="first")([p0, p1]), SelectorLayer(1, name="second")([p0, p1])])
    data = {name: ({"a_in": x, "b_in": x}, labels[:300] % 4) for name in ("first", "second")}
    report = rsn2.fit_rsn2(model, data, sparsity=50, step=50, tolerance=1.0, epochs=1, patience=1, final_epochs=0,
                           verbose=False, loss="sparse_categorical_crossentropy")
    first, second = report.tasks
    assert any("reads later tasks' slabs" in w and "multi_masked_dense" in w for w in first.warnings)
    assert not any("reads later tasks' slabs" in w for w in second.warnings)  # nothing trains after it
