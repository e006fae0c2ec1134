"""Small models the tests build: every op the compact model has, in a few Keras graphs.

- `mixed`: three tasks over an image and a token sequence: conv + folded batch norm,
  max/avg pooling, a skip connection (Add), an embedding with layer norm and global
  pooling, a task reading both inputs through a `SumLayer`, `FilterLayer` on and
  off, Concatenate, Reshape, Dropout, RSN2 masks at 80 %.
- `activations`: one task per Keras activation, each a masked dense layer on one input.
- the legacy fixtures (`tests/fixtures/legacy/*.h5`) cover multitask conv and pooling.

Weights are random (glorot) rather than trained: parity needs values of a realistic
size, not accuracy.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from mann_edge.graph.activations import ACTIVATIONS
from mann_edge.graph.model import CompactModel, Node, Task, TensorSpec
from mann_edge.layers import (
    FilterLayer,
    MaskedConv2D,
    MaskedDense,
    MultiMaskedConv2D,
    MultiMaskedDense,
    MultiMaxPool2D,
    SelectorLayer,
    SumLayer,
)
from mann_edge.rsn2 import mask_model

FIXTURES = Path(__file__).parent / "fixtures"
LEGACY = FIXTURES / "legacy"
LEGACY_NAMES = ("mann_mlp", "beyondml_mlp", "mann_conv", "beyondml_conv")
VOCAB = 40
TOKENS = 12


def _randomize_batch_norm(model, rng):
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.5, c).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.2, c).astype("float32"))


def build_mixed(seed: int = 0) -> keras.Model:
    """Three tasks: 'vision' (image), 'text' (tokens), 'both' (image and tokens through a SumLayer)."""
    keras.utils.set_random_seed(seed)
    init = "glorot_uniform"
    image = keras.Input((8, 8, 1), name="image")
    tokens = keras.Input((TOKENS,), dtype="int32", name="tokens")

    v = keras.layers.Conv2D(8, 3, padding="same", name="conv")(image)
    v = keras.layers.BatchNormalization(name="bn")(v)
    v = keras.layers.Activation("relu", name="relu")(v)
    v = keras.layers.MaxPooling2D(2, name="pool")(v)  # 4x4x8
    skip = MaskedConv2D(8, 3, padding="same", activation="relu", kernel_initializer=init, name="skip_conv")(v)
    v = keras.layers.Add(name="skip_add")([v, skip])
    v = keras.layers.AveragePooling2D(2, padding="same", name="avg_pool")(v)  # 2x2x8
    v = keras.layers.Flatten(name="flatten")(v)
    v = MaskedDense(16, activation="tanh", kernel_initializer=init, name="vision_dense")(v)

    t = keras.layers.Embedding(VOCAB, 8, name="embedding")(tokens)
    t = keras.layers.LayerNormalization(name="layer_norm")(t)
    t = keras.layers.GlobalAveragePooling1D(name="text_pool")(t)
    t = MaskedDense(16, activation="gelu", kernel_initializer=init, name="text_dense")(t)

    both = SumLayer(name="sum")([v, FilterLayer(name="filter_on")(t)])
    both = keras.layers.Add(name="add_off")([both, FilterLayer(is_on=False, name="filter_off")(v)])

    h = MultiMaskedDense(16, activation="relu", kernel_initializer=init, name="shared")([v, t, both])
    h = MultiMaskedDense(16, activation="elu", kernel_initializer=init, name="shared_2")(h)
    vision = MaskedDense(10, activation="softmax", kernel_initializer=init, name="vision")(SelectorLayer(0)(h))
    text = keras.layers.Reshape((4, 4), name="reshape")(SelectorLayer(1)(h))
    text = keras.layers.Flatten(name="flatten_text")(text)
    text = keras.layers.Dense(2, activation="softmax", name="text")(keras.layers.Dropout(0.3)(text))
    joined = keras.layers.Concatenate(name="concat")([SelectorLayer(2)(h), v])
    both_out = MaskedDense(3, activation="softmax", kernel_initializer=init, name="both")(joined)
    model = keras.Model([image, tokens], [vision, text, both_out], name="mixed")
    _randomize_batch_norm(model, np.random.default_rng(seed))
    mask_model(model, 80, method="magnitude")
    return model


def build_multiconv(seed: int = 0) -> keras.Model:
    """Two image tasks through MultiMaskedConv2D + MultiMaxPool2D (strided), the legacy conv shape in new layers."""
    keras.utils.set_random_seed(seed)
    a, b = keras.Input((8, 8, 1), name="image_a"), keras.Input((8, 8, 1), name="image_b")
    h = MultiMaskedConv2D(6, 3, padding="valid", activation="relu", kernel_initializer="glorot_uniform")([a, b])
    h = MultiMaxPool2D(pool_size=2, strides=2, padding="valid")(h)
    outs = [
        MaskedDense(k, activation="softmax", kernel_initializer="glorot_uniform", name=name)(
            keras.layers.Flatten()(SelectorLayer(i)(h))
        )
        for i, (name, k) in enumerate([("digit", 10), ("parity", 2)])
    ]
    model = keras.Model([a, b], outs, name="multiconv")
    mask_model(model, 75, method="magnitude")
    return model


# `threshold` needs its two arguments, so Keras cannot use it as a layer's activation by name.
ACTIVATION_NAMES = sorted(set(ACTIVATIONS) - {"threshold"})


def build_activations(seed: int = 0) -> keras.Model:
    """One task per activation Keras names: ``x -> MaskedDense(8, activation=name)``."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((6,), name="x")
    outputs = [
        MaskedDense(8, activation=name, kernel_initializer="glorot_uniform", bias_initializer="random_normal", name=name)(x)
        for name in ACTIVATION_NAMES
    ]
    model = keras.Model(x, outputs, name="activations")
    mask_model(model, 50, method="magnitude")
    return model


def build_pruned_mlp(seed: int = 0) -> keras.Model:
    """Two tasks through 256 -> 512 -> 512 -> 10 MultiMaskedDense, 90 % of each task's weights pruned."""
    keras.utils.set_random_seed(seed)
    a, b = keras.Input((256,), name="a"), keras.Input((256,), name="b")
    h = MultiMaskedDense(512, activation="relu", name="hidden_1")([a, b])
    h = MultiMaskedDense(512, activation="relu", name="hidden_2")(h)
    h = MultiMaskedDense(10, activation="softmax", name="classes")(h)
    model = keras.Model([a, b], [SelectorLayer(0, name="task_a")(h), SelectorLayer(1, name="task_b")(h)])
    mask_model(model, 90, method="magnitude")
    return model


def build_padding() -> keras.Model:
    """Convolutions and pooling where TensorFlow's 'same' padding is uneven (strides 2 on even sizes) or dilated."""
    keras.utils.set_random_seed(3)
    x = keras.Input((8, 8, 2), name="image")
    h = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="strided")(x)  # 4x4, pads (0, 1)
    h = keras.layers.AveragePooling2D(3, strides=2, padding="same", name="avg")(h)  # 2x2, pads (0, 1)
    h = keras.layers.Conv2D(4, 3, dilation_rate=2, padding="same", name="dilated")(h)  # 2x2, pads (2, 2)
    h = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="max")(h)  # 1x1, pads (0, 1)
    y = keras.layers.Dense(3, name="y")(keras.layers.Flatten()(h))
    return keras.Model(x, y)


def parametrized_activations() -> CompactModel:
    """A compact model with one task per activation with non-default parameters, on 2-D and (axis ones) 3-D tensors.

    Keras layers name their activations with the defaults, so the parameters are tested on a model built
    directly; every format checks it against the numpy reference.
    """
    rng = np.random.default_rng(1)
    activations = [
        ({"name": "relu", "negative_slope": 0.1, "max_value": 1.5, "threshold": 0.2}, "flat"),
        ({"name": "relu", "max_value": 0.8}, "flat"),
        ({"name": "relu", "max_value": 6.0}, "flat"),
        ({"name": "relu", "threshold": 0.3}, "flat"),
        ({"name": "leaky_relu", "negative_slope": 0.05}, "flat"),
        ({"name": "elu", "alpha": 0.5}, "flat"),
        ({"name": "celu", "alpha": 2.0}, "flat"),
        ({"name": "gelu", "approximate": True}, "flat"),
        ({"name": "hard_shrink", "threshold": 0.3}, "flat"),
        ({"name": "soft_shrink", "threshold": 0.3}, "flat"),
        ({"name": "threshold", "threshold": 0.1, "default_value": -2.0}, "flat"),
        ({"name": "squareplus", "b": 1.0}, "flat"),
        ({"name": "softmax", "axis": 1}, "flat"),
        ({"name": "softmax", "axis": 1}, "grid"),
        ({"name": "log_softmax", "axis": 1}, "grid"),
        ({"name": "sparsemax", "axis": 1}, "flat"),
        ({"name": "sparsemax", "axis": 1}, "grid"),
        ({"name": "glu", "axis": 1}, "grid"),
    ]
    x = TensorSpec("x", (None, 6))
    nodes = [
        Node("dense", "dense", ("x",), {"kernel": "kernel"}, {}, (None, 8)),
        Node("grid", "reshape", ("dense",), {}, {"shape": [2, -1]}, (None, 2, 4)),
    ]
    tasks = []
    for i, (activation, source) in enumerate(activations):
        shape = (None, 8) if source == "flat" else (None, 2, 4)
        if activation["name"] == "glu":
            shape = (None, 1, 4)
        nodes.append(Node(f"act{i}", "activation", ("dense" if source == "flat" else "grid",), {},
                          {"activation": activation}, shape))
        tasks.append(Task(f"{activation['name']}_{i}", (x,), (TensorSpec(f"y{i}", shape),), (f"act{i}",)))
    return CompactModel([x], nodes, tasks, {"kernel": rng.normal(0, 1, (6, 8)).astype("float32")})


def sample_batch(model: keras.Model, batch: int, seed: int = 0) -> list[np.ndarray]:
    """Random inputs for every model input: normal floats, token ids in [0, VOCAB)."""
    rng = np.random.default_rng(seed)
    arrays = []
    for kt in model.inputs:
        shape = (batch, *kt.shape[1:])
        if "int" in str(kt.dtype):
            arrays.append(rng.integers(0, VOCAB, shape).astype("int32"))
        else:
            arrays.append(rng.normal(0, 1, shape).astype("float32"))
    return arrays


def keras_outputs(model: keras.Model, inputs: list[np.ndarray]) -> list[np.ndarray]:
    outputs = model(inputs, training=False)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return [keras.ops.convert_to_numpy(o) for o in outputs]


def legacy_reference(name: str) -> dict:
    """The recorded inputs, labels, outputs and accuracies of a legacy fixture."""
    with np.load(LEGACY / f"{name}.npz") as data:
        return {key: data[key] for key in data.files}


def check_legacy_fixture(run, compact: CompactModel, name: str) -> None:
    """Legacy fixture ``name`` through ``run(task, {input: x})``: the recorded outputs (1e-5) and accuracies (exact)."""
    ref = legacy_reference(name)
    for index, task in enumerate(compact.tasks):
        (got,) = run(task.name, {task.inputs[0].name: ref[f"x{index}"]})
        np.testing.assert_allclose(got, ref[f"out{index}"], atol=1e-5, rtol=0, err_msg=f"{name} task {task.name}")
        assert (got.argmax(1) == ref[f"y{index}"]).mean() == ref[f"acc{index}"]


def check_matches_keras(run, keras_model: keras.Model, compact: CompactModel, batch: int) -> None:
    """Every task of ``compact`` through ``run(task, inputs by name)`` equals ``keras_model`` within 1e-5."""
    arrays = sample_batch(keras_model, batch, seed=batch)
    by_name = {kt.name: array for kt, array in zip(keras_model.inputs, arrays)}
    expected = keras_outputs(keras_model, arrays if len(arrays) > 1 else arrays[0])
    expected = dict(zip(keras_model.output_names, expected))
    for task in compact.tasks:
        outputs = run(task.name, {spec.name: by_name[spec.name] for spec in task.inputs})
        for spec, got in zip(task.outputs, outputs):
            assert got.shape == expected[spec.name].shape
            np.testing.assert_allclose(got, expected[spec.name], atol=1e-5, rtol=0, err_msg=f"task {task.name}")


def tflite_constants(path) -> list[tuple[str, int | None]]:
    """(type name, inputs per sparse block) of every constant tensor of a TFLite file, in file order.

    The block is None for a tensor stored dense and 1 for one stored sparse without blocks.
    """
    from ai_edge_litert import schema_py_generated as schema

    names = {code: name for name, code in vars(schema.TensorType).items() if not name.startswith("_")}
    model = schema.Model.GetRootAs(Path(path).read_bytes(), 0)
    result = []
    for g in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(g)
        for i in range(subgraph.TensorsLength()):
            tensor = subgraph.Tensors(i)
            if model.Buffers(tensor.Buffer()).DataLength() == 0:
                continue
            sparsity, block = tensor.Sparsity(), None
            if sparsity is not None:  # a block's own dimension is the last one
                blocked = sparsity.BlockMapLength() > 0
                block = sparsity.DimMetadata(sparsity.DimMetadataLength() - 1).DenseSize() if blocked else 1
            result.append((names[tensor.Type()], block))
    return result


def tflite_sparse_blocks(path) -> list[tuple[str, int]]:
    """(type name, inputs per block) of every constant a TFLite file stores sparse; 1 for unblocked."""
    return [(kind, block) for kind, block in tflite_constants(path) if block is not None]
