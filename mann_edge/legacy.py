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

import os
from pathlib import Path

import keras
import numpy as np

from mann_edge import layers as mann_layers
from mann_edge import safe_json
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
            config = safe_json.loads(raw if isinstance(raw, (bytes, str)) else str(raw), "model_config")
        except ValueError as error:
            raise LegacyFormatError(f"{path}: {error}") from None
        weights = handle["model_weights"] if "model_weights" in handle else handle
        _check_config(config, path, _stored_sizes(weights, path))
        model = _build(config, path)
        _load_weights(model, weights, path)
    return model


# Config entries that size a layer's weights or windows. A legacy file stores every weight, so none of
# them can exceed the number of values stored for its layer (or in the whole file, for a layer
# without weights); a larger one would make Keras allocate what the file never held.
_SIZE_KEYS = ("units", "filters", "kernel_size", "pool_size", "strides", "dilation_rate", "input_dim", "output_dim",
              "target_shape")


def _stored_sizes(weights, path: Path) -> dict[str, int]:
    """Layer name -> the number of weight values the file stores for it ("" -> the whole file), from metadata only."""
    import h5py

    sizes: dict[str, int] = {}

    def visit(name, item):
        if isinstance(item, h5py.Dataset):
            layer = name.split("/")[0]
            sizes[layer] = sizes.get(layer, 0) + int(item.size)
            sizes[""] = sizes.get("", 0) + int(item.size)

    try:
        weights.visititems(visit)
    except (OSError, RuntimeError, KeyError) as error:
        raise LegacyFormatError(f"{path}: model_weights cannot be read ({error})") from None
    return sizes


def _check_config(config, path: Path, stored: dict[str, int]) -> None:
    """LegacyFormatError naming the file and the layer for a config mann-edge cannot build safely.

    Checks the structure `_build` walks (objects, lists, names, class names, inbound references)
    and the sizes in each layer's config (`_SIZE_KEYS`) against what the file stores.
    """
    where = f"{path}: model_config"
    _kind(config, dict, where)
    body = _kind(config.get("config", {}), dict, f"{where}.config")
    layers = _kind(body.get("layers", []), list, f"{where}.config.layers")
    for i, layer in enumerate(layers):
        at = f"{where}.config.layers[{i}]"
        _kind(layer, dict, at)
        if isinstance(layer.get("name"), str):
            at = f"{path}: layer '{layer['name']}'"
        layer_config = _kind(layer.get("config"), dict, f"{at}: config")
        name = layer.get("name", layer_config.get("name"))
        if not isinstance(name, str):
            raise LegacyFormatError(f"{at} has no layer name (a string). Received: {name!r}")
        at = f"{path}: layer '{name}'"
        if not isinstance(layer.get("class_name"), str):
            raise LegacyFormatError(f"{at} has no class_name (a string). Received: {layer.get('class_name')!r}")
        nodes = _kind(layer.get("inbound_nodes", []), list, f"{at}: inbound_nodes")
        for node in nodes:
            if isinstance(node, dict):
                continue  # a Keras 3 config: `_inbound_calls` says so
            for ref in _kind(node, list, f"{at}: inbound node"):
                if not (isinstance(ref, list) and len(ref) >= 3 and isinstance(ref[0], str)
                        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**16 for v in ref[1:3])):
                    raise LegacyFormatError(f"{at}: inbound reference {ref!r} is not [layer name, node index, tensor index]")
        limit = max(stored.get(name, 0) or stored.get("", 0), 1)
        for key in _SIZE_KEYS:
            value = layer_config.get(key)
            values = value if isinstance(value, (list, tuple)) else [value]
            if value is not None and not all(isinstance(v, int) and not isinstance(v, bool) and -1 <= v <= limit
                                             for v in values):
                raise LegacyFormatError(
                    f"{at} ({layer['class_name']}) has {key}={value!r}, beyond the {limit} weight values the file "
                    "stores for it; refusing to build it"
                )
    for key in ("input_layers", "output_layers"):
        for ref in _kind(body.get(key, []), list, f"{where}.config.{key}"):
            if not (isinstance(ref, list) and len(ref) >= 3 and isinstance(ref[0], str)
                    and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ref[1:3])):
                raise LegacyFormatError(f"{where}.config.{key}: {ref!r} is not [layer name, node index, tensor index]")


def _kind(value, kind: type, where: str):
    if not isinstance(value, kind):
        expected = "an object" if kind is dict else "a list"
        raise LegacyFormatError(f"{where} must be {expected}. Received: {type(value).__name__}")
    return value


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
                try:
                    args = [outputs[(ref[0], ref[1])][ref[2]] for ref in call]
                except IndexError:
                    raise LegacyFormatError(f"{path}: layer '{name}' reads a tensor its input layers do not give "
                                            f"({call})") from None
                result = _call(layer, args if _takes_list(layer, args) else args[0], path)
                outputs[(name, node_index)] = list(result) if isinstance(result, (list, tuple)) else [result]
        if not progressed:
            names = [c.get("name") for c in pending]
            raise LegacyFormatError(f"{path}: layers {names} read inputs that no layer produces")
    try:
        inputs = [outputs[(ref[0], ref[1])][ref[2]] for ref in body.get("input_layers", [])]
        model_outputs = [outputs[(ref[0], ref[1])][ref[2]] for ref in body.get("output_layers", [])]
    except (KeyError, IndexError) as error:
        raise LegacyFormatError(f"{path}: model_config names an input or output tensor no layer gives ({error})") from None
    if not inputs or not model_outputs:
        raise LegacyFormatError(f"{path}: model_config has no input_layers or no output_layers")
    try:
        return keras.Model(inputs, model_outputs, name=body.get("name"))
    except (TypeError, ValueError) as error:
        raise LegacyFormatError(f"{path}: the model in model_config cannot be built ({_first_line(error)})") from None


def _call(layer, args, path: Path):
    """``layer(args)``, or a LegacyFormatError naming the file and the layer (Keras raises many kinds)."""
    try:
        return layer(args)
    except Exception as error:
        raise LegacyFormatError(
            f"{path}: layer '{layer.name}' ({type(layer).__name__}) cannot be applied to its inputs: {_first_line(error)}"
        ) from None


def _first_line(error: BaseException) -> str:
    # Keras wraps a layer's error in a banner; its own message is the first line that says something
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Exception encountered", "Arguments received", "•"))]
    text = (useful or lines or [type(error).__name__])[0]
    return text.replace("\x1b[1m", "").replace("\x1b[0m", "")[:300]


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
        x = _input(first["config"], first["config"].get("name", "input"), path)
        layer_configs = layer_configs[1:]
    else:
        shape = first["config"].get("batch_input_shape")
        if shape is None:
            raise LegacyFormatError(f"{path}: Sequential model has no input shape")
        x = _input(first["config"], None, path)
    inputs = x
    for layer_config in layer_configs:
        x = _call(_layer(layer_config, path), x, path)
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


def _input(config: dict, name: str | None, path: Path):
    shape = config.get("batch_input_shape") or config.get("batch_shape")
    if shape is None:
        raise LegacyFormatError(f"{path}: InputLayer '{name}' has no batch_input_shape")
    if not isinstance(shape, list) or not all(d is None or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)
                                              for d in shape):
        raise LegacyFormatError(f"{path}: InputLayer '{name}' has batch_input_shape {shape!r}; expected a list of "
                                "sizes (ints or null)")
    try:
        return keras.Input(batch_shape=tuple(shape), dtype=config.get("dtype", "float32"), name=name)
    except (TypeError, ValueError) as error:
        raise LegacyFormatError(f"{path}: InputLayer '{name}' cannot be built ({_first_line(error)})") from None


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
    except Exception as error:  # Keras raises many kinds for a config it cannot take
        raise LegacyFormatError(
            f"{path}: layer '{name}' ({class_name}) has a config mann-edge cannot use: {_first_line(error)}"
        ) from None


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
