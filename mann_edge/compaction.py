"""Compaction: a Keras model of MANN layers -> the compact model (per-task ops, CSR weights).

Each layer is lowered by one small function registered for its class. A
multitask layer becomes one op per branch (branch ``i`` reads slab ``i`` with
its mask applied); routing layers (`SelectorLayer`, on `FilterLayer`,
`Dropout`...) become wiring; a batch normalisation is folded into the dense or
conv op before it when nothing else reads that op. Weights are stored as CSR
where that is smaller. Every node records where it came from in its attributes:
``attrs["layer"]`` (the Keras layer's name) and, for a branch of a multitask
layer, ``attrs["slab"]`` (its slab index); tools read those, never node names.

Example:
    >>> cm = compact(model, task_names=["digits", "cancer"])
    >>> cm.task_stats()[0]["nonzeros"]
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from typing import Sequence

import keras
import numpy as np

from mann_edge import layers as mann_layers
from mann_edge._version import __version__
from mann_edge.errors import CompactionError
from mann_edge.files import build_time
from mann_edge.graph.activations import ACTIVATIONS, normalize_activation
from mann_edge.graph.model import CompactModel, Node, Task, TensorSpec
from mann_edge.registry import Registry
from mann_edge.sparse import encode_weight

__all__ = ["compact", "check_compactable", "MaskOverlapWarning", "mask_overlaps", "task_usage", "TaskUsage"]


class MaskOverlapWarning(UserWarning):
    """Two tasks' masks in one multitask layer share positions (RSN2 with exclusive=False?).

    Also raised, as a report only, for shared bias positions (see `mask_overlaps`).
    """


# -- the lowering table --------------------------------------------------------------------------

# Layer class -> its lowering, by exact class: a subclass may compute something else.
LOWERINGS = Registry("layer type", owner="mann-edge", verb="compact", error=CompactionError)


class _Builder:
    """Collects nodes and weights while layers are lowered.

    ``layer`` names the Keras layer being lowered; every node added records it.
    """

    def __init__(self):
        self.nodes: list[Node] = []
        self.weights: dict[str, object] = {}
        self.layer: str | None = None

    def add(self, name, op, inputs, out, weights=None, attrs=None, layouts=None, slab=None) -> str:
        """Adds a node; ``weights`` maps roles to dense arrays, stored as CSR where smaller.

        ``slab``: the slab index when the node is branch ``slab`` of a multitask layer.
        """
        roles = {}
        for role, array in (weights or {}).items():
            if array is None:
                continue
            array = np.asarray(array)
            if array.dtype.kind == "f":
                array = array.astype(np.float32)
                if not np.all(np.isfinite(array)):
                    raise CompactionError(f"Layer weight '{name}/{role}' holds NaN or infinite values; refusing to compact it")
            key = f"{name}/{role}"
            self.weights[key] = encode_weight(array, (layouts or {}).get(role, "rows"))
            roles[role] = key
        attrs = dict(attrs or {})
        shape = _activated_shape(tuple(out.shape), attrs.get("activation"))
        # Where the node came from, for plots and reports: recorded now, never parsed back from its name.
        attrs["layer"] = self.layer
        if slab is not None:
            attrs["slab"] = int(slab)
        self.nodes.append(Node(name, op, tuple(inputs), roles, attrs, shape, _dtype_name(out.dtype)))
        return name


def _activated_shape(shape: tuple, activation: dict | None) -> tuple:
    """Keras's symbolic shape of a layer ignores its activation; glu halves its axis."""
    if not activation or activation["name"] != "glu" or shape[activation["axis"]] is None:
        return shape
    axis = activation["axis"] % len(shape)
    return shape[:axis] + (shape[axis] // 2,) + shape[axis + 1:]


def _dtype_name(dtype) -> str:
    return keras.backend.standardize_dtype(dtype)


def _numpy(variable) -> np.ndarray | None:
    return None if variable is None else keras.ops.convert_to_numpy(variable)


def _activation(layer, function=None) -> dict:
    """The activation of ``layer`` as a graph attribute, or a CompactionError for a custom function."""
    function = layer.activation if function is None else function
    name = keras.activations.serialize(function)
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise CompactionError(
            f"Layer '{layer.name}' ({type(layer).__name__}) uses activation {name!r}, which mann-edge cannot "
            f"compact. Supported: {sorted(ACTIVATIONS)}"
        )
    return normalize_activation(name)


def _require_channels_last(layer):
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise CompactionError(
            f"Layer '{layer.name}' ({type(layer).__name__}) uses data_format={layer.data_format!r}; "
            "mann-edge compacts channels_last models only"
        )


KERNEL_LAYOUT = {"kernel": "oi"}


def _kernel_and_bias(layer) -> tuple[np.ndarray, np.ndarray | None]:
    """The kernel and bias as the layer applies them: masked for a MANN layer, as stored for a Keras one."""
    if getattr(layer, "masked", False):
        return _numpy(layer.masked_kernel()), _numpy(layer.masked_bias())
    return _numpy(layer.kernel), _numpy(layer.bias)


@LOWERINGS.register(mann_layers.MaskedDense, keras.layers.Dense)
def _dense(b, layer, inputs, outputs, name):
    if getattr(layer, "quantization_mode", None):
        raise CompactionError(f"Layer '{layer.name}' is quantized ({layer.quantization_mode}); compact the float model")
    kernel, bias = _kernel_and_bias(layer)
    attrs = {"activation": _activation(layer)}
    return [b.add(name, "dense", inputs, outputs[0], {"kernel": kernel, "bias": bias}, attrs, KERNEL_LAYOUT)]


@LOWERINGS.register(mann_layers.MultiDense, mann_layers.MultiMaskedDense)
def _multi_dense(b, layer, inputs, outputs, name):
    kernel, bias = _numpy(layer.masked_kernel()), _numpy(layer.masked_bias())
    attrs = {"activation": _activation(layer)}
    return [
        b.add(f"{name}[{i}]", "dense", [x], out, {"kernel": kernel[i], "bias": None if bias is None else bias[i]},
              attrs, KERNEL_LAYOUT, slab=i)
        for i, (x, out) in enumerate(zip(inputs, outputs))
    ]


def _conv_attrs(layer) -> dict:
    _require_channels_last(layer)
    if getattr(layer, "groups", 1) != 1:
        raise CompactionError(f"Layer '{layer.name}' uses groups={layer.groups}; mann-edge compacts groups=1 only")
    if layer.padding not in ("same", "valid"):
        raise CompactionError(f"Layer '{layer.name}' uses padding={layer.padding!r}; use 'same' or 'valid'")
    return {
        "strides": list(layer.strides),
        "padding": layer.padding,
        "dilation": list(getattr(layer, "dilation_rate", (1, 1))),
        "activation": _activation(layer),
    }


@LOWERINGS.register(mann_layers.MaskedConv2D, keras.layers.Conv2D)
def _conv2d(b, layer, inputs, outputs, name):
    kernel, bias = _kernel_and_bias(layer)
    return [b.add(name, "conv2d", inputs, outputs[0], {"kernel": kernel, "bias": bias}, _conv_attrs(layer), KERNEL_LAYOUT)]


@LOWERINGS.register(mann_layers.MultiConv2D, mann_layers.MultiMaskedConv2D)
def _multi_conv2d(b, layer, inputs, outputs, name):
    kernel, bias = _numpy(layer.masked_kernel()), _numpy(layer.masked_bias())
    attrs = _conv_attrs(layer)
    return [
        b.add(f"{name}[{i}]", "conv2d", [x], out, {"kernel": kernel[i], "bias": None if bias is None else bias[i]},
              attrs, KERNEL_LAYOUT, slab=i)
        for i, (x, out) in enumerate(zip(inputs, outputs))
    ]


def _pool_attrs(layer) -> dict:
    _require_channels_last(layer)
    return {"pool_size": list(layer.pool_size), "strides": list(layer.strides), "padding": layer.padding}


@LOWERINGS.register(keras.layers.MaxPooling2D)
def _max_pool(b, layer, inputs, outputs, name):
    return [b.add(name, "max_pool2d", inputs, outputs[0], attrs=_pool_attrs(layer))]


@LOWERINGS.register(keras.layers.AveragePooling2D)
def _avg_pool(b, layer, inputs, outputs, name):
    return [b.add(name, "avg_pool2d", inputs, outputs[0], attrs=_pool_attrs(layer))]


@LOWERINGS.register(mann_layers.MultiMaxPool2D)
def _multi_max_pool(b, layer, inputs, outputs, name):
    attrs = {"pool_size": list(layer.pool_size), "strides": list(layer.strides), "padding": layer.padding}
    return [
        b.add(f"{name}[{i}]", "max_pool2d", [x], out, attrs=attrs, slab=i)
        for i, (x, out) in enumerate(zip(inputs, outputs))
    ]


@LOWERINGS.register(keras.layers.GlobalAveragePooling1D, keras.layers.GlobalAveragePooling2D)
def _global_avg_pool(b, layer, inputs, outputs, name):
    _require_channels_last(layer)
    rank = 3 if isinstance(layer, keras.layers.GlobalAveragePooling1D) else 4
    attrs = {"axes": list(range(1, rank - 1)), "keepdims": bool(layer.keepdims)}
    return [b.add(name, "global_avg_pool", inputs, outputs[0], attrs=attrs)]


@LOWERINGS.register(keras.layers.Flatten)
def _flatten(b, layer, inputs, outputs, name):
    _require_channels_last(layer)
    return [b.add(name, "flatten", inputs, outputs[0])]


@LOWERINGS.register(keras.layers.Reshape)
def _reshape(b, layer, inputs, outputs, name):
    return [b.add(name, "reshape", inputs, outputs[0], attrs={"shape": [int(d) for d in layer.target_shape]})]


@LOWERINGS.register(keras.layers.Embedding)
def _embedding(b, layer, inputs, outputs, name):
    if layer.mask_zero:
        raise CompactionError(
            f"Embedding '{layer.name}' has mask_zero=True; Keras masks are not carried into the compact model. "
            "Train with mask_zero=False"
        )
    if getattr(layer, "quantization_mode", None):
        raise CompactionError(f"Embedding '{layer.name}' is quantized; compact the float model")
    return [b.add(name, "embedding", inputs, outputs[0], {"table": _numpy(layer.embeddings)})]


@LOWERINGS.register(keras.layers.BatchNormalization)
def _batch_norm(b, layer, inputs, outputs, name):
    rank = len(outputs[0].shape)
    if layer.axis not in (-1, rank - 1):
        raise CompactionError(f"BatchNormalization '{layer.name}' normalises axis {layer.axis}; only the last axis is supported")
    variance = _numpy(layer.moving_variance)
    gamma = _numpy(layer.gamma) if layer.scale else np.ones_like(variance)
    beta = _numpy(layer.beta) if layer.center else np.zeros_like(variance)
    scale = gamma / np.sqrt(variance + layer.epsilon)
    shift = beta - _numpy(layer.moving_mean) * scale
    return [b.add(name, "scale_shift", inputs, outputs[0], {"scale": scale, "shift": shift})]


@LOWERINGS.register(keras.layers.LayerNormalization)
def _layer_norm(b, layer, inputs, outputs, name):
    if getattr(layer, "rms_scaling", False):
        raise CompactionError(f"LayerNormalization '{layer.name}' uses rms_scaling, which mann-edge does not support")
    rank = len(outputs[0].shape)
    axes = sorted(a % rank for a in ([layer.axis] if isinstance(layer.axis, int) else layer.axis))
    weights = {"gamma": _numpy(layer.gamma) if layer.scale else None, "beta": _numpy(layer.beta) if layer.center else None}
    attrs = {"axes": axes, "epsilon": float(layer.epsilon)}
    return [b.add(name, "layer_norm", inputs, outputs[0], weights, attrs)]


def _activation_node(b, name, inputs, outputs, activation):
    if activation["name"] == "linear":
        return list(inputs)
    return [b.add(name, "activation", inputs, outputs[0], attrs={"activation": activation})]


@LOWERINGS.register(keras.layers.Activation)
def _activation_layer(b, layer, inputs, outputs, name):
    return _activation_node(b, name, inputs, outputs, _activation(layer))


@LOWERINGS.register(keras.layers.ReLU)
def _relu_layer(b, layer, inputs, outputs, name):
    params = {"negative_slope": float(layer.negative_slope), "threshold": float(layer.threshold),
              "max_value": None if layer.max_value is None else float(layer.max_value)}
    return _activation_node(b, name, inputs, outputs, normalize_activation({"name": "relu", **params}))


@LOWERINGS.register(keras.layers.LeakyReLU)
def _leaky_relu_layer(b, layer, inputs, outputs, name):
    activation = {"name": "leaky_relu", "negative_slope": float(layer.negative_slope)}
    return _activation_node(b, name, inputs, outputs, normalize_activation(activation))


@LOWERINGS.register(keras.layers.ELU)
def _elu_layer(b, layer, inputs, outputs, name):
    return _activation_node(b, name, inputs, outputs, normalize_activation({"name": "elu", "alpha": float(layer.alpha)}))


@LOWERINGS.register(keras.layers.Softmax)
def _softmax_layer(b, layer, inputs, outputs, name):
    axis = layer.axis if isinstance(layer.axis, int) else None
    if axis is None:
        raise CompactionError(f"Softmax '{layer.name}' over several axes is not supported")
    return _activation_node(b, name, inputs, outputs, normalize_activation({"name": "softmax", "axis": axis}))


@LOWERINGS.register(keras.layers.Add, mann_layers.SumLayer)
def _add(b, layer, inputs, outputs, name):
    return [b.add(name, "add", inputs, outputs[0])]


@LOWERINGS.register(keras.layers.Concatenate)
def _concat(b, layer, inputs, outputs, name):
    return [b.add(name, "concat", inputs, outputs[0], attrs={"axis": layer.axis % len(outputs[0].shape)})]


@LOWERINGS.register(mann_layers.SelectorLayer)
def _selector(b, layer, inputs, outputs, name):
    return [inputs[layer.sel_index]]


@LOWERINGS.register(mann_layers.FilterLayer)
def _filter(b, layer, inputs, outputs, name):
    if layer.is_on:
        return list(inputs)
    return [b.add(name, "zeros_like", inputs, outputs[0])]


@LOWERINGS.register(
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.GaussianDropout,
    keras.layers.GaussianNoise,
    keras.layers.AlphaDropout,
    keras.layers.Identity,
    keras.layers.ActivityRegularization,
)
def _identity(b, layer, inputs, outputs, name):
    # Inference-time identities: they leave no trace in the compact model.
    return list(inputs)


# -- the walk ------------------------------------------------------------------------------------


def _functional(model):
    if isinstance(model, keras.Sequential):
        functional = getattr(model, "_functional", None)
        if functional is None:
            raise CompactionError(
                f"Sequential model '{model.name}' is not built; give it an Input (or call build) before compacting"
            )
        return functional
    if not hasattr(model, "_nodes_by_depth"):
        raise CompactionError(
            f"Model '{model.name}' ({type(model).__name__}) is not a functional or Sequential Keras model"
        )
    return model


def _walk(model, builder: _Builder) -> dict[int, str]:
    """Lowers every layer call in graph order; returns KerasTensor id -> compact tensor name."""
    tensors: dict[int, str] = {}
    for kt in model.inputs:
        tensors[id(kt)] = kt._keras_history.operation.name
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            layer = node.operation
            if isinstance(layer, keras.layers.InputLayer):
                continue
            if isinstance(layer, keras.Model):
                raise CompactionError(
                    f"Layer '{layer.name}' is a nested model ({type(layer).__name__}); call its layers directly "
                    "in the outer model before compacting"
                )
            lowering = LOWERINGS.lookup(type(layer), context=f"layer '{layer.name}'")
            index = layer._inbound_nodes.index(node)
            name = layer.name if index == 0 else f"{layer.name}@{index}"
            inputs = [tensors[id(kt)] for kt in node.arguments.keras_tensors]
            builder.layer = layer.name
            results = lowering(builder, layer, inputs, node.outputs, name)
            for kt, result in zip(node.outputs, results):
                tensors[id(kt)] = result
    return tensors


def _fold_scale_shift(nodes: list[Node], weights: dict, keep: set[str]) -> tuple[list[Node], dict[str, str]]:
    """Folds each scale_shift into the dense/conv op before it when that op's output has no other reader."""
    readers: dict[str, int] = {}
    for node in nodes:
        for tensor in node.inputs:
            readers[tensor] = readers.get(tensor, 0) + 1
    by_name = {node.name: node for node in nodes}
    folded: dict[str, str] = {}  # scale_shift node -> producer it was folded into
    result = []
    for node in nodes:
        producer = by_name.get(node.inputs[0]) if node.op == "scale_shift" else None
        if (
            producer is not None
            and producer.op in ("dense", "conv2d")
            and producer.attrs["activation"]["name"] == "linear"
            and readers.get(producer.name) == 1
            and producer.name not in keep
        ):
            scale = _dense_of(weights[node.weights["scale"]])
            shift = _dense_of(weights[node.weights["shift"]])
            kernel = _dense_of(weights[producer.weights["kernel"]]) * scale
            bias = _dense_of(weights[producer.weights["bias"]]) if "bias" in producer.weights else np.zeros_like(shift)
            weights[producer.weights["kernel"]] = encode_weight(kernel.astype(np.float32), "oi")
            bias_key = f"{producer.name}/bias"
            weights[bias_key] = encode_weight((bias * scale + shift).astype(np.float32))
            for role in ("scale", "shift"):
                del weights[node.weights[role]]
            updated = replace(producer, weights={**producer.weights, "bias": bias_key}, shape=node.shape)
            result[result.index(by_name[producer.name])] = updated
            by_name[producer.name] = updated
            folded[node.name] = producer.name
            continue
        result.append(replace(node, inputs=tuple(folded.get(t, t) for t in node.inputs)))
    return result, folded


def _dense_of(weight) -> np.ndarray:
    return weight.to_dense() if hasattr(weight, "to_dense") else weight


@dataclass(frozen=True)
class TaskUsage:
    """What one model output is computed from.

    ``layers``: ``(layer name, branch)`` pairs, ``branch`` being the slab index of a
    multitask layer (whose output ``i`` reads only its input ``i``) and None for any
    other layer. ``inputs``: the names of the model inputs it reads.
    """

    layers: frozenset
    inputs: frozenset


def task_usage(model) -> list[TaskUsage]:
    """Per model output, the layers (and slabs) and inputs it depends on, following branches as `compact` splits them.

    RSN2 training uses it to know whose weights are whose, without touching weights.
    """
    model = _functional(model)
    usage = []
    for output in model.outputs:
        layers, inputs = set(), set()
        stack, seen = [output], set()
        while stack:
            kt = stack.pop()
            if id(kt) in seen:
                continue
            seen.add(id(kt))
            layer, node_index, tensor_index = kt._keras_history
            if isinstance(layer, keras.layers.InputLayer):
                inputs.add(layer.name)
                continue
            arguments = layer._inbound_nodes[node_index].arguments.keras_tensors
            if getattr(layer, "multitask", False):
                layers.add((layer.name, tensor_index))
                stack.append(arguments[tensor_index])
            elif isinstance(layer, mann_layers.SelectorLayer):
                stack.append(arguments[layer.sel_index])
            else:
                layers.add((layer.name, None))
                stack.extend(arguments)
        usage.append(TaskUsage(frozenset(layers), frozenset(inputs)))
    return usage


def mask_overlaps(model) -> list[dict]:
    """Per multitask layer and weight: how many positions more than one task's mask (or nonzeros) claims.

    Overlap is judged on kernels only; ``must_be_disjoint`` says which rows count. Disjoint
    masks are RSN2's promise about kernel positions: each task's subnetwork holds positions
    no other task uses. A bias is a handful of values per output unit, each task keeps its
    own bias slab in the compact model, and the original packages do not prune conv biases
    (their bias masks stay all ones while the kernel masks are disjoint), so shared bias
    positions are listed here (``must_be_disjoint`` False) but are not an overlap: they
    neither warn nor make ``strict`` fail.

    Returns:
        One row per weight: ``layer``, ``weight`` ('kernel' or 'bias'), ``positions`` (per
        slab), ``overlapping`` (positions more than one slab claims), ``must_be_disjoint``.

    Example:
        >>> [row for row in mask_overlaps(model) if row["overlapping"] and row["must_be_disjoint"]]
        []
    """
    rows = []
    for layer in model.layers:
        if not (getattr(layer, "multitask", False) and layer.weights):  # multitask pooling holds no slabs
            continue
        masks = layer.get_masks() if layer.masked else [_numpy(layer.w)] + ([_numpy(layer.b)] if layer.use_bias else [])
        for role, mask in zip(("kernel", "bias"), masks):
            claimed = (mask != 0).sum(axis=0)
            overlap = int((claimed > 1).sum())
            rows.append({"layer": layer.name, "weight": role, "positions": int(claimed.size), "overlapping": overlap,
                         "must_be_disjoint": role == "kernel"})
    return rows


def _check_overlaps(model, strict: bool) -> None:
    """Warns about every kernel overlap `mask_overlaps` finds; with ``strict`` it raises instead.

    Shared bias positions are allowed (see `mask_overlaps`), so they say nothing here;
    `mann-edge inspect` lists them.
    """
    for row in mask_overlaps(model):
        if not (row["overlapping"] and row["must_be_disjoint"]):
            continue
        message = (
            f"Multitask layer '{row['layer']}': {row['overlapping']} of {row['positions']} {row['weight']} positions "
            "are used by more than one task (masks are not disjoint)"
        )
        if strict:
            raise CompactionError(message)
        warnings.warn(message, MaskOverlapWarning, stacklevel=3)


def compact(
    model,
    task_names: Sequence[str] | None = None,
    *,
    strict: bool = False,
    labels: dict | None = None,
    source: str | None = None,
    source_sha256: str | None = None,
) -> CompactModel:
    """Turns a Keras model of MANN (and standard) layers into the compact model.

    Args:
        model: a functional or Sequential Keras 3 model (e.g. from `load_legacy`).
        task_names: one name per model output, in output order. Default: the model's
            output names, else ``task0..taskN-1``.
        strict: raise (instead of warn) when two tasks' kernel masks in a multitask layer
            overlap. Shared bias positions only warn, also with ``strict``: the original
            packages leave conv bias masks all ones (see `mask_overlaps`).
        labels: optional class names per task (task name -> list of str), kept in the manifest.
        source, source_sha256: provenance of the file the model came from.

    Raises:
        CompactionError: a layer it cannot compact (named with its class), NaN weights,
            overlapping kernel masks with ``strict``, bad task names.

    Example:
        >>> cm = compact(model, task_names=["digits", "cancer"])
        >>> cm.run("digits", x_digits)[0].shape
        (n, 10)
    """
    model = _functional(model)
    _check_overlaps(model, strict)

    builder = _Builder()
    tensors = _walk(model, builder)
    outputs = list(model.outputs)
    if not outputs:
        raise CompactionError(f"Model '{model.name}' has no outputs; nothing to compact")
    names = _task_names(model, task_names, len(outputs))
    output_tensors = [tensors[id(kt)] for kt in outputs]
    nodes, folded = _fold_scale_shift(builder.nodes, builder.weights, keep=set(output_tensors))
    output_tensors = [folded.get(t, t) for t in output_tensors]

    input_specs = [
        TensorSpec(kt._keras_history.operation.name, tuple(kt.shape), _dtype_name(kt.dtype)) for kt in model.inputs
    ]
    draft = CompactModel(input_specs, nodes, [], builder.weights)
    tasks = []
    output_names = list(getattr(model, "output_names", None) or [])
    for i, (task_name, kt, tensor) in enumerate(zip(names, outputs, output_tensors)):
        output_name = output_names[i] if i < len(output_names) else f"output_{i}"
        used = draft.ancestors([tensor])
        task_inputs = tuple(spec for spec in input_specs if spec.name in used)
        shape = draft.node(tensor).shape if tensor in used - {spec.name for spec in input_specs} else tuple(kt.shape)
        out_spec = TensorSpec(output_name, shape, _dtype_name(kt.dtype))
        task_labels = {output_name: list(labels[task_name])} if labels and task_name in labels else {}
        tasks.append(Task(task_name, task_inputs, (out_spec,), (tensor,), task_labels))

    provenance = {
        "source": source or model.name,
        "source_sha256": source_sha256,
        "mann_edge_version": __version__,
        "keras_version": keras.__version__,
    }
    if os.environ.get("SOURCE_DATE_EPOCH"):  # a build date only on request: the same source gives the same bytes
        provenance["created"] = build_time().isoformat()
    full = CompactModel(input_specs, nodes, tasks, builder.weights, provenance)
    return full.select_tasks(names)


def _task_names(model, task_names, count) -> list[str]:
    if task_names is None:
        names = list(getattr(model, "output_names", None) or [])
        if len(names) != count or len(set(names)) != count:
            names = [f"task{i}" for i in range(count)]
        return names
    names = [str(n) for n in task_names]
    if len(names) != count:
        raise CompactionError(f"Model '{model.name}' has {count} outputs, so it needs {count} task names. Received: {names}")
    if len(set(names)) != len(names) or any(not n for n in names):
        raise CompactionError(f"Task names must be unique and non-empty. Received: {names}")
    return names



# -- checking before training --------------------------------------------------------------------

# Layer classes that cannot be compacted -> the closest supported way to get the same effect.
# Consulted by `check_compactable`; a class not listed gets the most similar supported name.
ALTERNATIVES = {
    "Conv1D": "Conv2D with a (1, k) kernel on a Reshape to (1, steps, channels)",
    "Conv3D": "Conv2D (fold one spatial axis into channels with Reshape)",
    "DepthwiseConv2D": "Conv2D (groups=1)",
    "SeparableConv2D": "Conv2D (groups=1)",
    "Conv2DTranspose": "Conv2D on an upsampled input, or Dense + Reshape",
    "MaxPooling1D": "MaxPooling2D on a Reshape to (1, steps, channels)",
    "AveragePooling1D": "AveragePooling2D on a Reshape to (1, steps, channels)",
    "GlobalMaxPooling1D": "GlobalAveragePooling1D",
    "GlobalMaxPooling2D": "GlobalAveragePooling2D",
    "MultiMaxPool3D": "MultiMaxPool2D",
    "UpSampling2D": "Dense + Reshape",
    "ZeroPadding2D": "Conv2D with padding='same'",
    "Cropping2D": "Reshape, or Conv2D with padding='valid'",
    "Permute": "Reshape (when the order of the elements is kept)",
    "PReLU": "LeakyReLU",
    "GroupNormalization": "LayerNormalization",
    "UnitNormalization": "LayerNormalization",
    "Normalization": "normalising the inputs before the model, or BatchNormalization (folded)",
    "Rescaling": "scaling the inputs before the model, or BatchNormalization (folded)",
    "Subtract": "Add (of a negated branch) or Concatenate + Dense",
    "Multiply": "Concatenate + Dense",
    "Average": "Add, then a Dense scaled by 1/n",
    "Maximum": "Concatenate + Dense",
    "Minimum": "Concatenate + Dense",
    "Lambda": "a built-in layer or an Activation layer of a named activation",
    "SimpleRNN": "Flatten + Dense (or Embedding + GlobalAveragePooling1D)",
    "LSTM": "Flatten + Dense (or Embedding + GlobalAveragePooling1D)",
    "GRU": "Flatten + Dense (or Embedding + GlobalAveragePooling1D)",
    "Bidirectional": "Flatten + Dense (or Embedding + GlobalAveragePooling1D)",
    "MultiHeadAttention": "Dense layers (no attention op in the compact model)",
    "RepeatVector": "Concatenate of the same tensor",
}


class _CheckingBuilder(_Builder):
    """A `_Builder` that records node names only: checking lowers every layer without encoding any weight."""

    def add(self, name, op, inputs, out, weights=None, attrs=None, layouts=None, slab=None) -> str:
        return name


def _closest_supported(layer) -> str:
    """The supported layer to use instead of ``layer``'s class, from `ALTERNATIVES` or by name."""
    name = type(layer).__name__
    if name in ALTERNATIVES:
        return ALTERNATIVES[name]
    for base in type(layer).__mro__[1:]:
        if base in LOWERINGS:  # a subclass of a supported class: it may compute something else
            return f"{base.__name__} itself (subclasses are not compacted: they may compute something else)"
    import difflib

    close = difflib.get_close_matches(name, LOWERINGS.supported(), n=1, cutoff=0.0)
    return close[0] if close else "one of the supported layers"


def check_compactable(model) -> list[str]:
    """Every reason ``model`` cannot be compacted (and so exported), one line per layer; empty when it can.

    Each layer is lowered as `compact` would lower it, without encoding weights, so a
    layer class with no lowering and a supported class with an unsupported setting
    (``data_format``, ``groups``, a custom activation, ``mask_zero``...) are both listed,
    every one of them, not only the first. A class with no lowering comes with the closest
    supported alternative. RSN2 calls this before any training (`fit_rsn2`, `mask_model`).
    Every op a compactable model lowers to has a lowering in every export format (the
    parity tests check the formats' tables against the compact op registry).

    Example:
        >>> check_compactable(model)
        ["layer 'seq' (LSTM): mann-edge cannot compact this layer type; closest supported: Flatten + Dense ..."]
    """
    try:
        model = _functional(model)
    except CompactionError as error:
        return [str(error)]
    problems: dict[str, str] = {}  # by layer name: a layer called twice is listed once
    builder = _CheckingBuilder()
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            layer = node.operation
            if isinstance(layer, keras.layers.InputLayer) or layer.name in problems:
                continue
            where = f"layer '{layer.name}' ({type(layer).__name__})"
            if isinstance(layer, keras.Model):
                problems[layer.name] = f"{where}: a nested model; call its layers directly in the outer model"
                continue
            lowering = LOWERINGS.get(type(layer))
            if lowering is None:
                problems[layer.name] = (f"{where}: mann-edge cannot compact this layer type; closest supported: "
                                        f"{_closest_supported(layer)}")
                continue
            inputs = [f"in{i}" for i in range(len(node.arguments.keras_tensors))]
            builder.layer = layer.name
            try:
                lowering(builder, layer, inputs, node.outputs, layer.name)
            except CompactionError as error:
                # Most lowering errors already name the layer; only those that do not get it in front.
                named = f"'{layer.name}'" in str(error)
                problems[layer.name] = str(error) if named else f"{where}: {error}"
    return list(problems.values())
