"""Reading `.h5` models saved by the original `mann` 0.3 / `beyondml` 0.1 packages (Keras 2).

The file's ``model_config`` JSON is rebuilt layer by layer into a Keras 3
functional model of `mann_edge` layers (and the standard Keras layers mann-edge
compacts), then every weight is copied by name from ``model_weights``. Only the
classes listed in `LEGACY_CLASSES` are built; anything else (a `Lambda`, an
unknown custom layer) is refused with its layer name, so reading a file never
runs code from it. Neither original package is needed. The `mann_edge` classes
are found by name in the layers package's ``__all__`` (they keep the original
class names), and whether a layer takes a list of inputs is its class's
``list_input`` attribute.

Example:
    >>> model = load_legacy("mann_mlp.h5")
    >>> model.predict([x_digits, x_cancer])
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import keras
import numpy as np

from mann_edge import layers as mann_layers
from mann_edge.errors import LegacyFormatError

__all__ = ["load_legacy", "LEGACY_CLASSES"]

# The mann_edge layer classes by name: the original packages' class names are ours.
_MANN_CLASSES = {name: getattr(mann_layers, name) for name in mann_layers.__all__}
# Standard Keras layers a legacy file may hold, built from keras.layers by name.
_KERAS_CLASSES = ("Dense", "Conv2D", "MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling1D",
                  "GlobalAveragePooling2D", "Flatten", "Reshape", "Embedding", "Dropout", "BatchNormalization",
                  "LayerNormalization", "Activation", "ReLU", "LeakyReLU", "ELU", "Softmax", "Add", "Concatenate")
LEGACY_CLASSES = ("InputLayer",) + tuple(_MANN_CLASSES) + _KERAS_CLASSES
# Keras 2 spellings that Keras 3 renamed.
_ALIASES = {"MaxPool2D": "MaxPooling2D", "AvgPool2D": "AveragePooling2D", "Convolution2D": "Conv2D"}


def load_legacy(path: "str | os.PathLike"):
    """Reads a `mann`/`beyondml` `.h5` model into a Keras 3 model of `mann_edge` layers.

    The weights and masks are those in the file, so predictions match the original
    model's and training can go on.

    Raises:
        LegacyFormatError: not an HDF5 model file, a layer class it does not know
            (named with its layer), missing or mis-shaped weights.

    Example:
        >>> model = load_legacy("mann_conv.h5")
        >>> [layer.__class__.__name__ for layer in model.layers][:3]
        ['InputLayer', 'InputLayer', 'MultiMaskedConv2D']
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise LegacyFormatError(f"Legacy model {path} does not exist")
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise LegacyFormatError(f"{path} is not a readable HDF5 (.h5) file ({error})") from None
    with handle:
        if "model_config" not in handle.attrs:
            raise LegacyFormatError(f"{path} has no model_config: it holds weights only, not a saved model")
        raw = handle.attrs["model_config"]
        try:
            config = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise LegacyFormatError(f"{path}: model_config is not valid JSON ({error})") from None
        model = _build(config, path)
        weights = handle["model_weights"] if "model_weights" in handle else handle
        _load_weights(model, weights, path)
    return model


def _build(config: dict, path: Path):
    class_name = config.get("class_name")
    body = config.get("config", {})
    if class_name == "Sequential":
        return _build_sequential(body, path)
    if class_name not in ("Functional", "Model"):
        raise LegacyFormatError(f"{path}: top-level class {class_name!r} is not a Functional or Sequential model")
    layer_configs = body.get("layers", [])
    outputs: dict[tuple[str, int], list] = {}
    pending = list(layer_configs)
    while pending:
        progressed = False
        for layer_config in list(pending):
            calls = _inbound_calls(layer_config)
            if not all((ref[0], ref[1]) in outputs for call in calls for ref in call):
                continue
            pending.remove(layer_config)
            progressed = True
            name = layer_config.get("name") or layer_config["config"]["name"]
            if layer_config["class_name"] == "InputLayer":
                outputs[(name, 0)] = [_input(layer_config["config"], name, path)]
                continue
            layer = _layer(layer_config, path)
            for node_index, call in enumerate(calls):
                args = [outputs[(ref[0], ref[1])][ref[2]] for ref in call]
                result = layer(args if _takes_list(layer, args) else args[0])
                outputs[(name, node_index)] = list(result) if isinstance(result, (list, tuple)) else [result]
        if not progressed:
            names = [c.get("name") for c in pending]
            raise LegacyFormatError(f"{path}: layers {names} read inputs that no layer produces")
    inputs = [outputs[(ref[0], ref[1])][ref[2]] for ref in body["input_layers"]]
    model_outputs = [outputs[(ref[0], ref[1])][ref[2]] for ref in body["output_layers"]]
    return keras.Model(inputs, model_outputs, name=body.get("name"))


def _takes_list(layer, args: list) -> bool:
    """Whether ``layer`` was called on a list of the tensors ``args`` rather than on ``args[0]``.

    A mann_edge class says so (``list_input``), also for a list of one (a one-task MANN).
    Keras 2 configs record one reference per tensor of a call, so a standard Keras layer
    (Add, Concatenate) read several tensors exactly when it was called on a list.
    """
    return getattr(layer, "list_input", False) or len(args) > 1


def _build_sequential(body: dict, path: Path):
    layer_configs = body.get("layers", [])
    if not layer_configs:
        raise LegacyFormatError(f"{path}: Sequential model has no layers")
    first = layer_configs[0]
    if first["class_name"] == "InputLayer":
        x = _input(first["config"], first["config"]["name"], path)
        layer_configs = layer_configs[1:]
    else:
        shape = first["config"].get("batch_input_shape")
        if shape is None:
            raise LegacyFormatError(f"{path}: Sequential model has no input shape")
        x = keras.Input(batch_shape=tuple(shape), dtype=first["config"].get("dtype", "float32"))
    inputs = x
    for layer_config in layer_configs:
        x = _layer(layer_config, path)(x)
    return keras.Model(inputs, x, name=body.get("name"))


def _inbound_calls(layer_config: dict) -> list[list]:
    """Keras 2 inbound nodes as lists of (layer, node_index, tensor_index)."""
    calls = []
    for node in layer_config.get("inbound_nodes", []):
        if isinstance(node, dict):  # a Keras 3 config slipped in: not what this reader is for
            raise LegacyFormatError(
                f"Layer '{layer_config.get('name')}' uses the Keras 3 config format; load it with keras.models.load_model"
            )
        calls.append([(ref[0], int(ref[1]), int(ref[2])) for ref in node])
    return calls


def _canonical(class_name: str) -> str:
    return _ALIASES.get(class_name, class_name)


def _input(config: dict, name: str, path: Path):
    shape = config.get("batch_input_shape") or config.get("batch_shape")
    if shape is None:
        raise LegacyFormatError(f"{path}: InputLayer '{name}' has no batch_input_shape")
    return keras.Input(batch_shape=tuple(shape), dtype=config.get("dtype", "float32"), name=name)


def _layer(layer_config: dict, path: Path):
    class_name = _canonical(layer_config.get("class_name", "?"))
    config = dict(layer_config.get("config", {}))
    name = config.get("name", layer_config.get("name"))
    if class_name not in LEGACY_CLASSES:
        raise LegacyFormatError(
            f"{path}: layer '{name}' has class {class_name!r}, which mann-edge cannot read from a legacy file. "
            f"Known classes: {sorted(LEGACY_CLASSES)}"
        )
    if isinstance(config.get("dtype"), dict):  # Keras 2.13 mixed-precision policies
        config["dtype"] = config["dtype"].get("config", {}).get("name", "float32")
    try:
        cls = _MANN_CLASSES.get(class_name) or getattr(keras.layers, class_name)
        return cls.from_config(config)
    except (TypeError, ValueError) as error:
        raise LegacyFormatError(f"{path}: layer '{name}' ({class_name}) has a config mann-edge cannot use: {error}") from None


def _load_weights(model, group, path: Path) -> None:
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in group:
            raise LegacyFormatError(f"{path}: no weights stored for layer '{layer.name}'")
        layer_group = group[layer.name]
        stored = {}
        for weight_name in layer_group.attrs.get("weight_names", []):
            weight_name = weight_name.decode() if isinstance(weight_name, bytes) else str(weight_name)
            base = weight_name.split("/")[-1].split(":")[0]
            stored[base] = np.asarray(layer_group[weight_name])
        for variable in layer.weights:
            base = variable.name.split("/")[-1]
            if base not in stored:
                raise LegacyFormatError(
                    f"{path}: layer '{layer.name}' has no stored weight '{base}' (stored: {sorted(stored)})"
                )
            value = stored[base]
            if tuple(value.shape) != tuple(variable.shape):
                raise LegacyFormatError(
                    f"{path}: weight '{layer.name}/{base}' has shape {value.shape} in the file, "
                    f"the layer expects {tuple(variable.shape)}"
                )
            _check_values(value, f"{path}: weight '{layer.name}/{base}'", is_mask=base.endswith("_mask"))
            variable.assign(value.astype(variable.dtype))


def _check_values(value: np.ndarray, where: str, is_mask: bool) -> None:
    """HDF5 has no checksums: values no training can produce are the one sign of a damaged file."""
    if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
        raise LegacyFormatError(f"{where} holds NaN or infinite values (a corrupt file, or a diverged training)")
    if is_mask and not np.all((value == 0) | (value == 1)):
        raise LegacyFormatError(f"{where} is a mask but holds values other than 0 and 1 (a corrupt file?)")
