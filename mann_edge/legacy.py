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
from mann_edge.compaction import LOWERINGS
from mann_edge.errors import LegacyFormatError

__all__ = ["load_legacy", "LEGACY_CLASSES"]

# The mann_edge layer classes by name: the original packages' class names are ours.
_MANN_CLASSES = {name: getattr(mann_layers, name) for name in mann_layers.__all__}
# Standard Keras layers a legacy file may hold: those mann-edge compacts (one table, `compaction.LOWERINGS`).
_KERAS_CLASSES = tuple(sorted(cls.__name__ for cls in LOWERINGS if cls.__module__.startswith("keras.")))
# Nested models: their layers are read into the outer model (the graph mann-edge compacts is flat).
_MODEL_CLASSES = ("Functional", "Model", "Sequential")
LEGACY_CLASSES = ("InputLayer",) + tuple(_MANN_CLASSES) + _KERAS_CLASSES + _MODEL_CLASSES
# Keras 2 spellings that Keras 3 renamed.
_ALIASES = {"MaxPool2D": "MaxPooling2D", "AvgPool2D": "AveragePooling2D", "Convolution2D": "Conv2D",
            "MaxPool3D": "MaxPooling3D", "AvgPool3D": "AveragePooling3D", "Convolution3D": "Conv3D",
            "MaxPool1D": "MaxPooling1D", "AvgPool1D": "AveragePooling1D", "Convolution1D": "Conv1D"}
# Keras 2 config keys Keras 3 layers refuse; what they said is read elsewhere (the input shape) or is implied.
_KERAS2_ONLY_KEYS = ("batch_input_shape", "input_length")
# beyondml's compressed layers hold their weights as tf.sparse tensors, which `model.save` can only pickle.
_SPARSE_CLASSES = ("SparseDense", "SparseConv2D", "SparseConv3D", "SparseMultiDense", "SparseMultiConv2D",
                   "SparseMultiConv3D")


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
        model, origins = _build(config, path)
        _load_weights(model, weights, origins, path)
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
    _check_body(_kind(config.get("config", {}), dict, f"{where}.config"), f"{where}.config", path, stored, depth=0)


# Nested models inside nested models: real ones go two or three deep; a crafted file could go on.
_MAX_NESTING = 16


def _check_body(body: dict, where: str, path: Path, stored: dict[str, int], depth: int) -> None:
    if depth > _MAX_NESTING:
        raise LegacyFormatError(f"{where}: models nested more than {_MAX_NESTING} deep; refusing to build it")
    layers = _kind(body.get("layers", []), list, f"{where}.layers")
    for i, layer in enumerate(layers):
        at = f"{where}.layers[{i}]"
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
        if layer["class_name"] in _MODEL_CLASSES:
            _check_body(_kind(layer_config, dict, f"{at}: config"), f"{at}: config", path, stored, depth + 1)
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
        for ref in _kind(body.get(key, []), list, f"{where}.{key}"):
            if not (isinstance(ref, list) and len(ref) >= 3 and isinstance(ref[0], str)
                    and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ref[1:3])):
                raise LegacyFormatError(f"{where}.{key}: {ref!r} is not [layer name, node index, tensor index]")


def _kind(value, kind: type, where: str):
    if not isinstance(value, kind):
        expected = "an object" if kind is dict else "a list"
        raise LegacyFormatError(f"{where} must be {expected}. Received: {type(value).__name__}")
    return value


def _build(config: dict, path: Path) -> tuple:
    """The Keras 3 model of ``config``, and where each of its layers' weights are stored (see `_Reader`)."""
    class_name = config.get("class_name")
    if class_name not in _MODEL_CLASSES:
        raise LegacyFormatError(f"{path}: top-level class {class_name!r} is not a Functional or Sequential model")
    reader = _Reader(path)
    body = config.get("config", {})
    inputs, outputs = reader.graph(class_name, body, None, None)
    if not inputs or not outputs:
        raise LegacyFormatError(f"{path}: model_config has no input_layers or no output_layers")
    try:
        model = keras.Model(inputs, outputs if len(outputs) > 1 or class_name != "Sequential" else outputs[0],
                            name=body.get("name"))
    except (TypeError, ValueError) as error:
        raise LegacyFormatError(f"{path}: the model in model_config cannot be built ({_first_line(error)})") from None
    return model, reader.origins


def _first_node(layer_config: dict) -> int:
    """The index of a layer's first call in Keras 2 references: a nested graph model's node 0 is its own building."""
    class_name = layer_config["class_name"]
    layers = layer_config.get("config", {}).get("layers") or [{}]
    graph = class_name in ("Functional", "Model") or (class_name == "Sequential" and layers[0].get("class_name") == "InputLayer")
    return 1 if graph else 0


class _Reader:
    """Builds a model config's layers and calls them, reading nested models' layers into the outer graph.

    ``origins`` maps each built layer's name to where the file stores its weights: the group
    of the top-level layer holding it (a nested model stores all its layers' weights in its
    own group) and the layer's name in the file. A nested model called twice calls the same
    layers twice, as in the original.
    """

    def __init__(self, path: Path):
        self.path = path
        self.origins: dict[str, tuple[str, str]] = {}
        self.layers: dict[tuple, object] = {}  # (group, name in the file) -> built layer

    def graph(self, class_name: str, body: dict, arguments: list | None, group: str | None) -> tuple[list, list]:
        """(inputs, outputs) of a model body: new `keras.Input`s when ``arguments`` is None, else called on them."""
        if class_name == "Sequential":
            return self._sequential(body, arguments, group)
        outputs: dict[tuple[str, int], list] = {}
        input_refs = body.get("input_layers", [])
        if arguments is not None:
            if len(arguments) != len(input_refs):
                raise LegacyFormatError(f"{self.path}: nested model '{body.get('name')}' takes {len(input_refs)} "
                                        f"inputs and is called on {len(arguments)}")
            for ref, tensor in zip(input_refs, arguments):
                outputs[(ref[0], 0)] = [tensor]
        pending = list(body.get("layers", []))
        while pending:
            progressed = False
            for layer_config in list(pending):
                name = layer_config.get("name") or layer_config["config"]["name"]
                if layer_config["class_name"] == "InputLayer":
                    pending.remove(layer_config)
                    progressed = True
                    if arguments is None:
                        outputs[(name, 0)] = [_input(layer_config["config"], name, self.path)]
                    continue
                calls = _inbound_calls(layer_config)
                if not all((ref[0], ref[1]) in outputs for call in calls for ref in call):
                    continue
                pending.remove(layer_config)
                progressed = True
                for node_index, call in enumerate(calls, start=_first_node(layer_config)):
                    try:
                        args = [outputs[(ref[0], ref[1])][ref[2]] for ref in call]
                    except IndexError:
                        raise LegacyFormatError(f"{self.path}: layer '{name}' reads a tensor its input layers do not "
                                                f"give ({call})") from None
                    outputs[(name, node_index)] = self._apply(layer_config, name, args, group)
            if not progressed:
                names = [c.get("name") for c in pending]
                raise LegacyFormatError(f"{self.path}: layers {names} read inputs that no layer produces")
        try:
            inputs = [outputs[(ref[0], ref[1])][ref[2]] for ref in input_refs]
            results = [outputs[(ref[0], ref[1])][ref[2]] for ref in body.get("output_layers", [])]
        except (KeyError, IndexError) as error:
            raise LegacyFormatError(f"{self.path}: model_config names an input or output tensor no layer gives "
                                    f"({error})") from None
        return inputs, results

    def _apply(self, layer_config: dict, name: str, args: list, group: str | None) -> list:
        """The output tensors of one call of a layer (or of a nested model, read into this graph)."""
        class_name = layer_config["class_name"]
        if class_name in _MODEL_CLASSES:
            # Keras 2 numbers a nested model's calls after the node that built it, and stores its
            # layers' weights in its own group, which its inner models share.
            _, results = self.graph(class_name, layer_config["config"], args, group or name)
            return results
        layer = self._layer(layer_config, name, group)
        result = _call(layer, args if _takes_list(layer, args) else args[0], self.path)
        return list(result) if isinstance(result, (list, tuple)) else [result]

    def _layer(self, layer_config: dict, name: str, group: str | None):
        key = (group, name)
        if key not in self.layers:
            config = layer_config.get("config", {})
            # A nested model's layer may share a name with an outer one; Keras 3 needs unique names.
            unique = name if name not in self.origins else f"{group}_{name}"
            layer = _layer({**layer_config, "config": {**config, "name": unique}}, self.path)
            self.origins[layer.name] = (group or name, name)
            self.layers[key] = layer
        return self.layers[key]

    def _sequential(self, body: dict, arguments: list | None, group: str | None) -> tuple[list, list]:
        layer_configs = list(body.get("layers", []))
        if not layer_configs:
            raise LegacyFormatError(f"{self.path}: Sequential model '{body.get('name')}' has no layers")
        if arguments is not None:
            x = arguments[0]
            if layer_configs[0]["class_name"] == "InputLayer":
                layer_configs = layer_configs[1:]
        elif layer_configs[0]["class_name"] == "InputLayer":
            first = layer_configs.pop(0)
            x = _input(first["config"], first["config"].get("name", "input"), self.path)
        else:
            if layer_configs[0]["config"].get("batch_input_shape") is None:
                raise LegacyFormatError(f"{self.path}: Sequential model has no input shape")
            x = _input(layer_configs[0]["config"], None, self.path)
        inputs = [x]
        for layer_config in layer_configs:
            name = layer_config.get("name") or layer_config["config"]["name"]
            x = self._apply(layer_config, name, [x], group)[0]
        return inputs, [x]


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
    if class_name in _SPARSE_CLASSES:
        raise LegacyFormatError(
            f"{path}: layer '{name}' is a beyondml {class_name}, whose weights the original package can only save "
            "with pickle, which mann-edge never loads. Re-save the model in its masked form: with beyondml, "
            "rebuild it from the masked model it was made from (the model before it was converted to Sparse* "
            "layers: MaskedDense, MultiMaskedConv2D...) and call model.save('model.h5'); mann-edge reads that and "
            "stores the pruned weights sparse itself"
        )
    if class_name not in LEGACY_CLASSES:
        raise LegacyFormatError(
            f"{path}: layer '{name}' has class {class_name!r}, which mann-edge cannot read from a legacy file. "
            f"Known classes: {sorted(LEGACY_CLASSES)}"
        )
    for key in _KERAS2_ONLY_KEYS:
        config.pop(key, None)
    if isinstance(config.get("dtype"), dict):  # Keras 2.13 mixed-precision policies
        config["dtype"] = config["dtype"].get("config", {}).get("name", "float32")
    try:
        cls = _MANN_CLASSES.get(class_name) or getattr(keras.layers, class_name)
        return cls.from_config(config)
    except Exception as error:  # Keras raises many kinds for a config it cannot take
        raise LegacyFormatError(
            f"{path}: layer '{name}' ({class_name}) has a config mann-edge cannot use: {_first_line(error)}"
        ) from None


def _load_weights(model, group, origins: dict[str, tuple[str, str]], path: Path) -> None:
    """Copies every weight from the file; ``origins``: layer name -> (its file group, its name in the file)."""
    for layer in model.layers:
        if not layer.weights:
            continue
        holder, stored_name = origins.get(layer.name, (layer.name, layer.name))
        if holder not in group:
            raise LegacyFormatError(f"{path}: no weights stored for layer '{stored_name}'")
        layer_group = group[holder]
        stored = {}
        for weight_name in layer_group.attrs.get("weight_names", []):
            weight_name = weight_name.decode() if isinstance(weight_name, bytes) else str(weight_name)
            parts = weight_name.split("/")
            if holder != stored_name and (len(parts) < 2 or parts[-2] != stored_name):
                continue  # a nested model's group holds every inner layer's weights
            stored[parts[-1].split(":")[0]] = np.asarray(layer_group[weight_name])
        for variable in layer.weights:
            base = variable.name.split("/")[-1]
            if base not in stored:
                raise LegacyFormatError(
                    f"{path}: layer '{stored_name}' has no stored weight '{base}' (stored: {sorted(stored)})"
                )
            value = stored[base]
            if tuple(value.shape) != tuple(variable.shape):
                raise LegacyFormatError(
                    f"{path}: weight '{stored_name}/{base}' has shape {value.shape} in the file, "
                    f"the layer expects {tuple(variable.shape)}"
                )
            _check_values(value, f"{path}: weight '{stored_name}/{base}'", is_mask=base.endswith("_mask"))
            variable.assign(value.astype(variable.dtype))


def _check_values(value: np.ndarray, where: str, is_mask: bool) -> None:
    """HDF5 has no checksums: values no training can produce are the one sign of a damaged file."""
    if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
        raise LegacyFormatError(f"{where} holds NaN or infinite values (a corrupt file, or a diverged training)")
    if is_mask and not np.all((value == 0) | (value == 1)):
        raise LegacyFormatError(f"{where} is a mask but holds values other than 0 and 1 (a corrupt file?)")
