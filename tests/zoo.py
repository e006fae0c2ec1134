"""Small models the tests build: every op the compact model has, in a few Keras graphs.

- `mixed`: three tasks over an image and a token sequence: conv + folded batch norm,
  max/avg pooling, a skip connection (Add), an embedding with layer norm and global
  pooling, a task reading both inputs through a `SumLayer`, `FilterLayer` on and
  off, Concatenate, Reshape, Dropout, RSN2 masks at 80 %.
- `activations`: one task per Keras activation, each a masked dense layer on one input.
- `volumes`, `sequences`, `images`, `attention`: the Keras layers MANN users mix in (3-D and
  1-D convolutions and pools, padding, cropping, upsampling, depthwise and separable
  convolutions, elementwise merges, Attention and MultiHeadAttention, nested models), two
  tasks each, about half of every kernel zero so that sparse storage is exercised.
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
    MaskedConv1D,
    MaskedConv2D,
    MaskedConv3D,
    MaskedDense,
    MultiConv1D,
    MultiConv2D,
    MultiConv3D,
    MultiMaskedConv1D,
    MultiMaskedConv2D,
    MultiMaskedConv3D,
    MultiMaskedDense,
    MultiMaxPool2D,
    MultiMaxPool3D,
    MultitaskNormalization,
    SelectorLayer,
    SumLayer,
)
from mann_edge.rsn2 import mask_model

FIXTURES = Path(__file__).parent / "fixtures"
LEGACY = FIXTURES / "legacy"
LEGACY_NAMES = ("mann_mlp", "beyondml_mlp", "mann_conv", "beyondml_conv")
# beyondml 0.1.7's catalogue beyond those: one x per model input (in input order) and one out per task, no labels.
CATALOGUE_NAMES = ("beyondml_conv3d", "beyondml_mtnorm", "beyondml_transformer", "beyondml_float16")
VOCAB = 40
TOKENS = 12
# Float inputs that hold token ids (an Embedding fed floats, as beyondml's embedding blocks are).
FLOAT_IDS = {"ids"}


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
    """Random inputs for every model input: normal floats, token ids in [0, VOCAB) (as floats for `FLOAT_IDS`)."""
    rng = np.random.default_rng(seed)
    arrays = []
    for kt in model.inputs:
        shape = (batch, *kt.shape[1:])
        if "int" in str(kt.dtype) or kt.name in FLOAT_IDS:
            arrays.append(rng.integers(0, VOCAB, shape).astype(kt.dtype))
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


def _half_zero_kernels(model, rng, keep: tuple[str, ...] = ()) -> None:
    """Zeroes about half of every kernel (and depthwise/pointwise kernel) at random, so sparse storage is exercised;
    the layers named in ``keep`` stay dense."""
    for layer in model.layers:
        if layer.name in keep:
            continue
        for weight in layer.weights:
            if weight.path.endswith("kernel") and len(weight.shape) >= 2:
                value = keras.ops.convert_to_numpy(weight)
                weight.assign(np.where(rng.random(value.shape) < 0.5, 0.0, value).astype(value.dtype))


def build_volumes(seed: int = 0) -> keras.Model:
    """Two tasks over a volume: Conv3D ('same', strided, dilated), 3-D max/avg pools with uneven 'same' padding,
    GlobalAveragePooling3D, a BatchNormalization folded into a Conv3D, ZeroPadding3D, Cropping3D and the elementwise merges (Subtract, Multiply, Average,
    Maximum, Minimum)."""
    keras.utils.set_random_seed(seed)
    volume = keras.Input((5, 6, 6, 2), name="volume")
    h = keras.layers.Conv3D(4, (2, 3, 3), padding="same", activation="relu", name="conv3d")(volume)
    a = keras.layers.MaxPooling3D(2, padding="same", name="max3d")(h)  # 3x3x3, pads (0, 1)
    b = keras.layers.AveragePooling3D((3, 2, 2), strides=2, padding="same", name="avg3d")(h)  # 3x3x3
    c = keras.layers.Conv3D(4, 3, strides=(2, 2, 2), padding="same", name="strided3d")(h)  # 3x3x3
    d = keras.layers.Conv3D(4, 2, dilation_rate=2, padding="valid", name="dilated3d")(h)  # 3x4x4
    d = keras.layers.BatchNormalization(name="bn3d")(d)  # folded into the conv3d
    d = keras.layers.MaxPooling3D((1, 2, 2), strides=(1, 1, 1), padding="valid", name="valid3d")(d)  # 3x3x3
    diff = keras.layers.Subtract(name="subtract")([a, b])
    prod = keras.layers.Multiply(name="multiply")([a, c, d])
    mean = keras.layers.Average(name="average")([diff, prod, d])
    high = keras.layers.Maximum(name="maximum")([mean, c])
    low = keras.layers.Minimum(name="minimum")([mean, d, b])
    first = keras.layers.Dense(3, name="first")(keras.layers.Flatten()(high))
    low = keras.layers.ZeroPadding3D(((0, 1), (1, 0), (2, 1)), name="zero_padding3d")(low)  # 4x4x6
    low = keras.layers.Cropping3D(((1, 0), (0, 2), (1, 1)), name="cropping3d")(low)  # 3x2x4
    pooled = [keras.layers.GlobalAveragePooling3D(name="gap3d")(low), keras.layers.GlobalMaxPooling3D(name="gmp3d")(low)]
    second = keras.layers.Dense(2, name="second")(keras.layers.Concatenate()(pooled))
    model = keras.Model(volume, [first, second], name="volumes")
    _half_zero_kernels(model, np.random.default_rng(seed), keep=("strided3d",))  # a dense kernel: TFLite's CONV_3D
    _randomize_batch_norm(model, np.random.default_rng(seed))
    return model


def build_mann_ranks(seed: int = 0) -> keras.Model:
    """The 1-D and 3-D MANN layers in new models (the legacy files hold the 3-D masked ones only): two tasks over a
    sequence and a volume (also read as an image) through MaskedConv1D/3D, MultiConv1D/2D/3D (no masks),
    MultiMaskedConv1D/3D, MultiMaxPool3D,
    and their scores normalised across the tasks (MultitaskNormalization); masks by RSN2's `mask_model`."""
    keras.utils.set_random_seed(seed)
    sequence, volume = keras.Input((9, 3), name="sequence"), keras.Input((4, 6, 6, 1), name="volume")
    s = MaskedConv1D(4, 3, padding="same", activation="relu", name="masked_conv1d")(sequence)
    s = MultiConv1D(4, 2, strides=2, padding="valid", name="multi_conv1d")([s, s])
    s = MultiMaskedConv1D(3, 3, activation="tanh", name="multi_masked_conv1d")(s)
    v = MaskedConv3D(3, 2, "valid", 1, "relu", name="masked_conv3d")(volume)
    v = MultiConv3D(3, (1, 2, 2), name="multi_conv3d")([v, v])
    v = MultiMaskedConv3D(2, 3, strides=(1, 2, 2), name="multi_masked_conv3d")(v)
    v = MultiMaxPool3D((1, 2, 2), strides=(1, 1, 1), padding="valid", name="multi_max_pool3d")(v)
    image = keras.layers.Reshape((6, 6, 4), name="as_image")(volume)
    m = MultiConv2D(2, 3, strides=2, name="multi_conv2d")([image, image])
    heads = [keras.layers.Concatenate()([keras.layers.Flatten()(x[i]) for x in (s, v, m)]) for i in (0, 1)]
    scores = MultiMaskedDense(3, activation="sigmoid", name="scores")(heads)
    shares = MultitaskNormalization(name="shares")(scores)
    model = keras.Model([sequence, volume], [SelectorLayer(i, name=name)(shares) for i, name in enumerate(("a", "b"))],
                        name="mann_ranks")
    _half_zero_kernels(model, np.random.default_rng(seed))  # the unmasked multitask layers
    return mask_model(model, 50, method="magnitude", exclusive=True)


def build_sequences(seed: int = 0) -> keras.Model:
    """Two tasks over a sequence: Conv1D (strided, dilated and causal), 1-D max/avg pools, GlobalMaxPooling1D, ZeroPadding1D,
    Cropping1D, UpSampling1D."""
    keras.utils.set_random_seed(seed)
    sequence = keras.Input((11, 3), name="sequence")
    h = keras.layers.Conv1D(6, 3, padding="same", activation="relu", name="conv1d")(sequence)
    h = keras.layers.MaxPooling1D(2, padding="same", name="max1d")(keras.layers.SpatialDropout1D(0.2)(h))  # 6
    s = keras.layers.Conv1D(4, 2, strides=2, padding="valid", name="strided1d")(h)  # 3
    d = keras.layers.Conv1D(4, 2, dilation_rate=2, padding="causal", activation="tanh", name="dilated1d")(h)  # 6, causal
    d = keras.layers.AveragePooling1D(3, strides=2, padding="same", name="avg1d")(d)  # 3
    first = keras.layers.Dense(3, name="first")(keras.layers.Flatten()(keras.layers.Add()([s, d])))
    u = keras.layers.UpSampling1D(2, name="upsampling1d")(keras.layers.ZeroPadding1D((2, 1), name="zero_padding1d")(d))
    u = keras.layers.Cropping1D((1, 3), name="cropping1d")(u)  # 8
    second = keras.layers.Dense(2, name="second")(keras.layers.GlobalMaxPooling1D(name="gmp1d")(u))
    model = keras.Model(sequence, [first, second], name="sequences")
    _half_zero_kernels(model, np.random.default_rng(seed))
    return model


def build_images(seed: int = 0) -> keras.Model:
    """Two image tasks: Rescaling, adapted Normalization, ZeroPadding2D, DepthwiseConv2D (multiplier 2),
    SeparableConv2D, Cropping2D, UpSampling2D (nearest and bilinear), Permute, global pools, the activation
    layers and the layers that are identities at inference."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    image = keras.Input((7, 7, 3), name="picture")
    normalization = keras.layers.Normalization(name="normalization")
    normalization.adapt(rng.normal(-0.2, 0.3, (16, 7, 7, 3)).astype("float32"))  # outputs of a few units
    h = keras.layers.Rescaling(0.5, offset=-0.25, name="rescaling")(image)
    h = normalization(h)
    h = keras.layers.ZeroPadding2D(((1, 0), (2, 1)), name="zero_padding")(h)  # 8x10
    wide = keras.initializers.RandomNormal(stddev=0.5)  # outputs of a few units: errors show above the tolerance
    h = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", activation="relu", depthwise_initializer=wide,
                                     bias_initializer="random_normal", name="depthwise")(h)
    h = keras.layers.SeparableConv2D(5, 3, strides=2, padding="same", depthwise_initializer=wide,
                                     pointwise_initializer=wide, name="separable")(h)  # 4x5x5
    h = keras.layers.DepthwiseConv2D(2, dilation_rate=2, padding="valid", depthwise_initializer=wide,
                                     name="dilated_depthwise")(h)  # 2x3x5
    h = keras.layers.LeakyReLU(0.1, name="leaky")(keras.layers.SpatialDropout2D(0.2)(h))
    first = keras.layers.Cropping2D(((0, 1), (1, 0)), name="cropping")(h)  # 1x2x5
    first = keras.layers.UpSampling2D((3, 2), name="upsampling")(first)  # 3x4x5
    first = keras.layers.Permute((2, 1, 3), name="permute")(first)  # 4x3x5
    first = keras.layers.Dense(3, kernel_initializer=wide, name="first")(keras.layers.Flatten()(first))
    smooth = keras.layers.UpSampling2D((2, 3), interpolation="bilinear", name="bilinear")(h)  # 4x9x5
    smooth = keras.layers.ELU(0.5, name="elu")(keras.layers.GaussianNoise(0.1)(keras.layers.GaussianDropout(0.1)(smooth)))
    pooled = keras.layers.Concatenate()([keras.layers.GlobalMaxPooling2D(name="gmp2d")(smooth),
                                         keras.layers.GlobalAveragePooling2D(name="gap2d")(smooth)])
    pooled = keras.layers.ReLU(max_value=2.0, negative_slope=0.1, name="relu")(keras.layers.AlphaDropout(0.1)(pooled))
    pooled = keras.layers.ActivityRegularization(l1=0.01)(keras.layers.Identity()(pooled))
    second = keras.layers.Dense(2, kernel_initializer=wide, name="logits")(pooled)
    second = keras.layers.Softmax(name="second")(second)
    model = keras.Model(image, [first, second], name="images")
    _half_zero_kernels(model, rng)
    return model


def _encoder_block(dim: int, name: str) -> keras.Model:
    """A nested functional block as beyondml's transformer builds one: self-attention, Add, LayerNormalization, Dense."""
    x = keras.Input((TOKENS, dim))
    attended = keras.layers.MultiHeadAttention(2, 4, name="self_attention")(x, x, use_causal_mask=True)
    h = keras.layers.LayerNormalization(name="norm")(keras.layers.Add()([x, attended]))
    h = keras.layers.Dense(dim, activation="relu", name="feed_forward")(keras.layers.Dropout(0.1)(h))
    return keras.Model(x, h, name=name)


def build_attention(seed: int = 0) -> keras.Model:
    """Two tasks over token ids given as floats: Embedding, a nested encoder block (MultiHeadAttention, causal),
    a nested Sequential, Keras Attention (scaled and causal; concat scores), cross MultiHeadAttention with a key,
    RepeatVector, Permute, Concatenate, Reshape."""
    keras.utils.set_random_seed(seed)
    dim = 8
    tokens = keras.Input((TOKENS,), name="ids")  # float ids, as beyondml's embedding blocks take them
    h = keras.layers.Embedding(VOCAB, dim, name="embedding")(tokens)
    h = _encoder_block(dim, "encoder")(h)
    head = keras.Sequential([keras.Input((TOKENS, dim)), keras.layers.Dense(dim, activation="tanh", name="inner_dense")],
                            name="head")
    h = head(h)
    dotted = keras.layers.Attention(use_scale=True, name="attention")([h, h], use_causal_mask=True)
    concat = keras.layers.Attention(score_mode="concat", name="concat_attention")([h, dotted, h])
    summary = keras.layers.Dense(dim, name="summary")(keras.layers.GlobalAveragePooling1D()(concat))
    repeated = keras.layers.RepeatVector(3, name="repeat")(summary)  # 3 x dim
    cross = keras.layers.MultiHeadAttention(2, 3, value_dim=2, name="cross")(repeated, h, key=dotted)  # 3 x dim
    joined = keras.layers.Concatenate(axis=-1, name="join")([cross, repeated])  # 3 x 2dim
    first = keras.layers.Dense(3, name="first")(keras.layers.Flatten()(keras.layers.Permute((2, 1))(joined)))
    second = keras.layers.Dense(2, name="second")(keras.layers.Reshape((-1,))(concat))
    model = keras.Model(tokens, [first, second], name="attention")
    _half_zero_kernels(model, np.random.default_rng(seed))
    return model
