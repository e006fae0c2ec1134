"""Reading the original packages' `.h5` models (Keras 2 format) without those packages."""

from __future__ import annotations

import json

import h5py
import keras
import numpy as np
import pytest

import mann_edge
import zoo
from mann_edge.errors import LegacyFormatError


@pytest.mark.parametrize("name", zoo.LEGACY_NAMES)
def test_outputs_and_accuracies_match_the_original(name, legacy_models):
    model, ref = legacy_models[name]
    out0, out1 = model.predict([ref["x0"], ref["x1"]], verbose=0)
    np.testing.assert_allclose(out0, ref["out0"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out1, ref["out1"], atol=1e-5, rtol=0)
    assert (out0.argmax(1) == ref["y0"]).mean() == ref["acc0"]
    assert (out1.argmax(1) == ref["y1"]).mean() == ref["acc1"]


@pytest.mark.parametrize("name", zoo.LEGACY_NAMES)
def test_layers_are_mann_edge_layers_with_the_files_masks(name, legacy_models):
    model, _ = legacy_models[name]
    masked = [layer for layer in model.layers if getattr(layer, "masked", False)]
    assert masked and all(type(layer).__module__.startswith("mann_edge.layers") for layer in masked)
    with h5py.File(zoo.LEGACY / f"{name}.h5") as f:
        for layer in masked:
            stored = np.asarray(f[f"model_weights/{layer.name}/{layer.name}/weights_mask:0"])
            np.testing.assert_array_equal(layer.get_masks()[0], stored)


def test_a_legacy_model_trains_further(legacy_models):
    model, ref = legacy_models["mann_mlp"]
    clone = mann_edge.load_legacy(zoo.LEGACY / "mann_mlp.h5")
    logs = mann_edge.rsn2.train_task(clone, 1, ref["x1"], ref["y1"], epochs=1)
    assert np.isfinite(logs["loss"])


def _rewrite(source, target, edit_config, edit_weights):
    """Copies a legacy .h5 with its config and weights edited (what the original's helpers would have saved)."""
    with h5py.File(source) as f:
        config = json.loads(f.attrs["model_config"])
        weights = {
            name: {w.decode() if isinstance(w, bytes) else w: np.asarray(f["model_weights"][name][w])
                   for w in f["model_weights"][name].attrs["weight_names"]}
            for name in f["model_weights"].attrs["layer_names"]
        }
    edit_config(config)
    weights = edit_weights(weights)
    write_legacy(target, config, weights)


def write_legacy(path, config, weights):
    """Writes a Keras 2 style .h5: model_config JSON and model_weights/<layer>/<weight name> datasets."""
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps(config)
        f.attrs["keras_version"] = "2.13.1"
        group = f.create_group("model_weights")
        group.attrs["layer_names"] = np.array([n.encode() for n in weights], dtype="S")
        for layer, arrays in weights.items():
            layer_group = group.create_group(layer)
            layer_group.attrs["weight_names"] = np.array([n.encode() for n in arrays], dtype="S")
            for weight_name, value in arrays.items():
                layer_group.create_dataset(weight_name, data=value)


def _remove_masks_config(config):
    for layer in config["config"]["layers"]:
        mapping = {"MaskedDense": "Dense", "MultiMaskedDense": "MultiDense"}
        if layer["class_name"] in mapping:
            layer["class_name"] = mapping[layer["class_name"]]
            del layer["config"]["mask_initializer"]


def _remove_masks_weights(weights):
    result = {}
    for layer, arrays in weights.items():
        if not arrays:
            result[layer] = {}
            continue
        w, b = arrays[f"{layer}/weights:0"], arrays[f"{layer}/bias:0"]
        w = w * arrays[f"{layer}/weights_mask:0"]
        b = b * arrays[f"{layer}/bias_mask:0"]
        names = ("kernel", "bias") if "multi" not in layer else ("weights", "bias")
        result[layer] = {f"{layer}/{names[0]}:0": w, f"{layer}/{names[1]}:0": b}
    return result


def test_models_after_remove_layer_masks(tmp_path, legacy_models):
    path = tmp_path / "unmasked.h5"
    _rewrite(zoo.LEGACY / "mann_mlp.h5", path, _remove_masks_config, _remove_masks_weights)
    model = mann_edge.load_legacy(path)
    classes = {type(layer).__name__ for layer in model.layers}
    assert {"Dense", "MultiDense", "SelectorLayer"} <= classes and "MaskedDense" not in classes
    ref = legacy_models["mann_mlp"][1]
    out0, out1 = model.predict([ref["x0"], ref["x1"]], verbose=0)
    np.testing.assert_allclose(out0, ref["out0"], atol=1e-5)
    np.testing.assert_allclose(out1, ref["out1"], atol=1e-5)


def _layer(class_name, name, config, inbound):
    return {"class_name": class_name, "name": name, "config": {"name": name, "trainable": True, "dtype": "float32", **config},
            "inbound_nodes": [[[src, 0, i, {}] for src, i in inbound]] if inbound else []}


def test_routing_layers_sum_and_filter(tmp_path):
    rng = np.random.default_rng(0)
    init = {"class_name": "Ones", "config": {}}
    config = {"class_name": "Functional", "config": {"name": "routing", "layers": [
        _layer("InputLayer", "a", {"batch_input_shape": [None, 4], "sparse": False, "ragged": False}, []),
        _layer("InputLayer", "b", {"batch_input_shape": [None, 4], "sparse": False, "ragged": False}, []),
        _layer("MaskedDense", "da", {"units": 3, "use_bias": True, "activation": "relu", "kernel_initializer": init,
                                     "mask_initializer": init, "bias_initializer": init}, [("a", 0)]),
        _layer("MaskedDense", "db", {"units": 3, "use_bias": True, "activation": "linear", "kernel_initializer": init,
                                     "mask_initializer": init, "bias_initializer": init}, [("b", 0)]),
        _layer("FilterLayer", "off", {"is_on": False}, [("db", 0)]),
        _layer("SumLayer", "sum", {}, [("da", 0), ("db", 0), ("off", 0)]),
        _layer("FilterLayer", "on", {"is_on": True}, [("sum", 0)]),
    ], "input_layers": [["a", 0, 0], ["b", 0, 0]], "output_layers": [["on", 0, 0]]}}
    arrays = {}
    for layer, fan_in in (("da", 4), ("db", 4)):
        arrays[layer] = {f"{layer}/weights:0": rng.normal(size=(fan_in, 3)).astype("float32"),
                         f"{layer}/bias:0": rng.normal(size=3).astype("float32"),
                         f"{layer}/weights_mask:0": (rng.random((fan_in, 3)) > 0.5).astype("float32"),
                         f"{layer}/bias_mask:0": np.ones(3, "float32")}
    weights = {"a": {}, "b": {}, **arrays, "off": {}, "sum": {}, "on": {}}
    path = tmp_path / "routing.h5"
    write_legacy(path, config, weights)
    model = mann_edge.load_legacy(path)
    x_a, x_b = rng.normal(size=(5, 4)).astype("float32"), rng.normal(size=(5, 4)).astype("float32")

    def dense(x, layer, activation):
        a = arrays[layer]
        y = x @ (a[f"{layer}/weights:0"] * a[f"{layer}/weights_mask:0"]) + a[f"{layer}/bias:0"]
        return np.maximum(y, 0) if activation == "relu" else y

    expected = dense(x_a, "da", "relu") + dense(x_b, "db", "linear")
    np.testing.assert_allclose(model.predict([x_a, x_b], verbose=0), expected, rtol=1e-5, atol=1e-6)


def test_a_one_task_multitask_layer_is_called_on_a_list_of_one(tmp_path):
    # Keras 2 records a call on [x] like a call on x; the class's `list_input` tells them apart.
    rng = np.random.default_rng(0)
    init = {"class_name": "Ones", "config": {}}
    config = {"class_name": "Functional", "config": {"name": "one_task", "layers": [
        _layer("InputLayer", "a", {"batch_input_shape": [None, 4], "sparse": False, "ragged": False}, []),
        _layer("MultiMaskedDense", "multi", {"units": 3, "use_bias": True, "activation": "linear",
                                             "kernel_initializer": init, "mask_initializer": init,
                                             "bias_initializer": init}, [("a", 0)]),
        _layer("SelectorLayer", "select", {"sel_index": 0}, [("multi", 0)]),
    ], "input_layers": [["a", 0, 0]], "output_layers": [["select", 0, 0]]}}
    arrays = {"multi/weights:0": rng.normal(size=(1, 4, 3)).astype("float32"),
              "multi/bias:0": rng.normal(size=(1, 3)).astype("float32"),
              "multi/weights_mask:0": (rng.random((1, 4, 3)) > 0.5).astype("float32"),
              "multi/bias_mask:0": np.ones((1, 3), "float32")}
    path = tmp_path / "one_task.h5"
    write_legacy(path, config, {"a": {}, "multi": arrays, "select": {}})
    model = mann_edge.load_legacy(path)
    x = rng.normal(size=(5, 4)).astype("float32")
    expected = x @ (arrays["multi/weights:0"][0] * arrays["multi/weights_mask:0"][0]) + arrays["multi/bias:0"][0]
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)


def test_every_mann_edge_layer_class_can_be_read():
    from mann_edge.legacy import LEGACY_CLASSES

    assert set(mann_edge.layers.__all__) <= set(LEGACY_CLASSES)


def test_unknown_layer_class_is_named(tmp_path):
    path = tmp_path / "lambda.h5"
    _rewrite(zoo.LEGACY / "mann_mlp.h5", path,
             lambda c: c["config"]["layers"][6].update(class_name="Lambda"), lambda w: w)
    with pytest.raises(LegacyFormatError, match=r"layer 'selector_layer' has class 'Lambda'"):
        mann_edge.load_legacy(path)


@pytest.mark.parametrize(
    "content, message",
    [(None, "does not exist"), (b"", "not a readable HDF5"), (b"garbage" * 100, "not a readable HDF5")],
)
def test_missing_empty_or_corrupt_files(tmp_path, content, message):
    path = tmp_path / "model.h5"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(LegacyFormatError, match=message):
        mann_edge.load_legacy(path)


def test_truncated_file(tmp_path):
    data = (zoo.LEGACY / "mann_mlp.h5").read_bytes()
    path = tmp_path / "truncated.h5"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LegacyFormatError):
        mann_edge.load_legacy(path)


def test_weights_only_file(tmp_path):
    path = tmp_path / "weights.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([b"dense"])
    with pytest.raises(LegacyFormatError, match="holds weights only"):
        mann_edge.load_legacy(path)


def test_mis_shaped_weight_is_named(tmp_path):
    def shrink(weights):
        weights["masked_dense_2"]["masked_dense_2/weights:0"] = np.zeros((3, 3), "float32")
        return weights

    path = tmp_path / "bad.h5"
    _rewrite(zoo.LEGACY / "mann_mlp.h5", path, lambda c: None, shrink)
    with pytest.raises(LegacyFormatError, match=r"weight 'masked_dense_2/weights' has shape \(3, 3\)"):
        mann_edge.load_legacy(path)


def test_returns_a_keras_3_model(legacy_models):
    model, _ = legacy_models["mann_conv"]
    assert isinstance(model, keras.Model)
    assert [type(l).__name__ for l in model.layers][2:5] == ["MultiMaskedConv2D", "MultiMaxPool2D", "MultiMaskedConv2D"]
