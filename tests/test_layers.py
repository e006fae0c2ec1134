"""The MANN layers: configs, shapes, masks, a training step and .keras save/load, each layer the same way."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from mann_edge import layers as L

# (layer factory, input shapes, expected output shapes); multitask layers take a list of inputs.
CASES = {
    "MaskedDense": (lambda: L.MaskedDense(5, activation="relu"), [(7,)], [(5,)]),
    "MaskedConv2D": (lambda: L.MaskedConv2D(4, 3, padding="valid", strides=2), [(9, 9, 2)], [(4, 4, 4)]),
    "MultiMaskedDense": (lambda: L.MultiMaskedDense(5, activation="tanh"), [(7,), (7,)], [(5,), (5,)]),
    "MultiDense": (lambda: L.MultiDense(5), [(7,), (7,), (7,)], [(5,), (5,), (5,)]),
    "MultiMaskedConv2D": (lambda: L.MultiMaskedConv2D(3, kernel_size=(3, 2)), [(6, 6, 2), (6, 6, 2)], [(6, 6, 3), (6, 6, 3)]),
    "MultiConv2D": (lambda: L.MultiConv2D(3, padding="valid"), [(6, 6, 2), (6, 6, 2)], [(4, 4, 3), (4, 4, 3)]),
    "MultiMaxPool2D": (lambda: L.MultiMaxPool2D(2, strides=2), [(6, 6, 2), (6, 6, 2)], [(3, 3, 2), (3, 3, 2)]),
    "MaskedConv1D": (lambda: L.MaskedConv1D(4, 3, padding="valid", strides=2), [(9, 2)], [(4, 4)]),
    "MaskedConv3D": (lambda: L.MaskedConv3D(4, 3, "same", 2), [(5, 6, 6, 2)], [(3, 3, 3, 4)]),
    "MultiMaskedConv1D": (lambda: L.MultiMaskedConv1D(3, kernel_size=2), [(7, 2), (7, 2)], [(7, 3), (7, 3)]),
    "MultiConv1D": (lambda: L.MultiConv1D(3, padding="valid"), [(7, 2), (7, 2)], [(5, 3), (5, 3)]),
    "MultiMaskedConv3D": (lambda: L.MultiMaskedConv3D(3, kernel_size=(1, 3, 2)), [(4, 6, 6, 2), (4, 6, 6, 2)],
                          [(4, 6, 6, 3), (4, 6, 6, 3)]),
    "MultiConv3D": (lambda: L.MultiConv3D(3, padding="valid"), [(4, 6, 6, 2), (4, 6, 6, 2)], [(2, 4, 4, 3), (2, 4, 4, 3)]),
    "MultiMaxPool3D": (lambda: L.MultiMaxPool3D(2, strides=2), [(4, 6, 6, 2), (4, 6, 6, 2)], [(2, 3, 3, 2), (2, 3, 3, 2)]),
    "MultitaskNormalization": (lambda: L.MultitaskNormalization(), [(4,), (4,)], [(4,), (4,)]),
    "SelectorLayer": (lambda: L.SelectorLayer(1), [(4,), (4,)], [(4,)]),
    "FilterLayer": (lambda: L.FilterLayer(is_on=False), [(4,)], [(4,)]),
    "SumLayer": (lambda: L.SumLayer(), [(4,), (4,), (4,)], [(4,)]),
}
# What each class says about itself (`LayerFacts`): masked, multitask, list_input, block_prunable.
FACTS = {
    "MaskedDense": (True, False, False, True),
    "MaskedConv2D": (True, False, False, False),
    "MultiMaskedDense": (True, True, True, True),
    "MultiDense": (False, True, True, True),
    "MultiMaskedConv2D": (True, True, True, False),
    "MultiConv2D": (False, True, True, False),
    "MultiMaxPool2D": (False, True, True, False),
    "MaskedConv1D": (True, False, False, False),
    "MaskedConv3D": (True, False, False, False),
    "MultiMaskedConv1D": (True, True, True, False),
    "MultiConv1D": (False, True, True, False),
    "MultiMaskedConv3D": (True, True, True, False),
    "MultiConv3D": (False, True, True, False),
    "MultiMaxPool3D": (False, True, True, False),
    "MultitaskNormalization": (False, False, True, False),
    "SelectorLayer": (False, False, True, False),
    "FilterLayer": (False, False, False, False),
    "SumLayer": (False, False, True, False),
}


def _model(name):
    factory, in_shapes, _ = CASES[name]
    inputs = [keras.Input(shape) for shape in in_shapes]
    layer = factory()
    outputs = layer(inputs if layer.list_input else inputs[0])
    return keras.Model(inputs, outputs), layer


def _data(name, n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(n, *shape)).astype("float32") for shape in CASES[name][1]]


def test_every_public_layer_has_a_case():
    assert set(L.__all__) == set(CASES) == set(FACTS)


@pytest.mark.parametrize("name", sorted(FACTS))
def test_each_class_states_its_facts(name):
    cls = getattr(L, name)
    assert (cls.masked, cls.multitask, cls.list_input, cls.block_prunable) == FACTS[name]
    # a multitask layer returns one output per input
    _, in_shapes, out_shapes = CASES[name]
    assert not cls.multitask or len(in_shapes) == len(out_shapes)


@pytest.mark.parametrize("name", sorted(CASES))
def test_config_round_trip(name):
    _, layer = _model(name)
    config = layer.get_config()
    json.dumps(config)  # serializable
    clone = type(layer).from_config(config)
    assert clone.get_config() == config


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_shapes(name):
    model, _ = _model(name)
    outputs = model.predict(_data(name), verbose=0)
    outputs = outputs if isinstance(outputs, list) else [outputs]
    assert [o.shape[1:] for o in outputs] == CASES[name][2]


@pytest.mark.parametrize("name", sorted(CASES))
def test_save_and_load_keras_without_custom_objects(name, tmp_path):
    model, _ = _model(name)
    data = _data(name)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    expected, actual = model.predict(data, verbose=0), loaded.predict(data, verbose=0)
    for e, a in zip(expected if isinstance(expected, list) else [expected], actual if isinstance(actual, list) else [actual]):
        np.testing.assert_array_equal(e, a)


@pytest.mark.parametrize("name", ["MaskedDense", "MaskedConv2D", "MultiMaskedDense", "MultiMaskedConv2D"])
def test_masks_are_non_trainable_weights_in_the_original_order(name):
    _, layer = _model(name)
    assert [w.name for w in layer.weights] == ["weights", "bias", "weights_mask", "bias_mask"]
    assert [w.name for w in layer.trainable_weights] == ["weights", "bias"]
    if name.startswith("Multi"):
        assert layer.w.shape[0] == len(CASES[name][1])  # tasks first


@pytest.mark.parametrize("name", ["MaskedDense", "MaskedConv2D", "MultiMaskedDense", "MultiMaskedConv2D"])
def test_pruned_weights_stay_exactly_zero_through_training(name):
    model, layer = _model(name)
    rng = np.random.default_rng(1)
    masks = [(rng.random(w.shape) > 0.7).astype("float32") for w in (layer.w, layer.b)]
    layer.set_masks(masks)
    data = _data(name, n=32)
    targets = [rng.normal(size=o.shape).astype("float32") for o in (model(data) if isinstance(model(data), list) else [model(data)])]
    model.compile(keras.optimizers.Adam(0.05), "mse")
    model.fit(data, targets if len(targets) > 1 else targets[0], epochs=3, verbose=0)
    for weight, mask in zip((layer.w, layer.b), masks):
        values = keras.ops.convert_to_numpy(weight)
        assert np.all(values[mask == 0] == 0)
        assert np.any(values[mask == 1] != 0)


def test_set_masks_checks_count_and_shape():
    _, layer = _model("MaskedDense")
    with pytest.raises(ValueError, match="expects 2 masks"):
        layer.set_masks([np.ones((7, 5))])
    with pytest.raises(ValueError, match=r"must have shape \(7, 5\)"):
        layer.set_masks([np.ones((5, 7)), np.ones(5)])


def test_unmasked_layers_have_no_masks():
    _, layer = _model("MultiDense")
    with pytest.raises(TypeError, match="has no masks"):
        layer.set_masks([])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: L.MaskedDense(0), "`units` must be a positive int. Received: units=0"),
        (lambda: L.MultiMaskedConv2D(4, padding="causal"), "`padding` must be 'same' or 'valid'"),
        (lambda: L.MaskedConv2D(4, kernel_size=(1, 2, 3)), "`kernel_size` must be an int or a tuple of 2 ints"),
        (lambda: L.MultiMaskedConv3D(4, strides=(1, 2)), "`strides` must be an int or a tuple of 3 ints"),
        (lambda: L.SelectorLayer(-1), "`sel_index` must be a non-negative int"),
    ],
)
def test_bad_arguments_are_refused_clearly(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_multitask_layers_refuse_unequal_branch_shapes():
    with pytest.raises(ValueError, match="must have the same shape"):
        L.MultiMaskedDense(3)([keras.Input((4,)), keras.Input((5,))])


def test_branch_i_reads_only_input_i():
    model, layer = _model("MultiMaskedDense")
    a, b = _data("MultiMaskedDense")
    out_a, out_b = model.predict([a, b], verbose=0)
    out_a2, out_b2 = model.predict([a, np.zeros_like(b)], verbose=0)
    np.testing.assert_array_equal(out_a, out_a2)
    assert not np.allclose(out_b, out_b2)
