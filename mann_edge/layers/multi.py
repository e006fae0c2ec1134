"""Multitask layers: one weight slab per task, stacked tasks first.

A multitask layer takes a list of inputs (one per task) and returns a list of
outputs; branch ``i`` uses only slab ``i``. `MultiDense`/`MultiConv2D` are the
unmasked forms the original `remove_layer_masks` produces; the masked forms add
``weights_mask``/``bias_mask`` and the ``mask_initializer`` config key.
"""

from __future__ import annotations

import keras
from keras import ops

from mann_edge.layers.base import (
    LayerFacts,
    MaskedLayerMixin,
    conv_output_shape,
    conv_tuple,
    validate_branch_shapes,
    validate_padding,
    validate_positive_int,
)


@keras.saving.register_keras_serializable(package="mann_edge")
class MultiDense(MaskedLayerMixin, keras.layers.Layer):
    """Multitask fully connected layer: ``outputs[i] = activation(inputs[i] @ weights[i] + bias[i])``.

    Example:
        >>> layer = MultiDense(32, activation="relu")
        >>> a, b = layer([np.ones((4, 10), "float32"), np.ones((4, 10), "float32")])
    """

    masked = False
    multitask = True
    list_input = True
    block_prunable = True

    def __init__(
        self,
        units,
        use_bias=True,
        activation=None,
        kernel_initializer="random_normal",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = validate_positive_int("units", units)
        self.use_bias = bool(use_bias)
        self.activation = keras.activations.get(activation)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        shape = validate_branch_shapes(self, input_shape)
        tasks = len(input_shape)
        self.add_masked_weights((tasks, shape[-1], self.units), (tasks, self.units))

    def call(self, inputs):
        kernel, bias = self.masked_kernel(), self.masked_bias()
        outputs = []
        for i, x in enumerate(inputs):
            y = ops.matmul(x, kernel[i])
            if bias is not None:
                y = y + bias[i]
            outputs.append(self.activation(y))
        return outputs

    def compute_output_shape(self, input_shape):
        return [tuple(shape[:-1]) + (self.units,) for shape in input_shape]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "units": self.units,
                "use_bias": self.use_bias,
                "activation": keras.activations.serialize(self.activation),
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            }
        )
        return config


@keras.saving.register_keras_serializable(package="mann_edge")
class MultiMaskedDense(MultiDense):
    """`MultiDense` whose slabs are multiplied by binary masks (what RSN2 prunes).

    Example:
        >>> layer = MultiMaskedDense(32, activation="relu")
        >>> a, b = layer([x_task0, x_task1])
        >>> layer.set_masks([kernel_mask, bias_mask])   # shapes (2, in, 32) and (2, 32)
    """

    masked = True

    def __init__(self, units, use_bias=True, activation=None, kernel_initializer="random_normal",
                 mask_initializer="ones", bias_initializer="zeros", **kwargs):
        super().__init__(units, use_bias, activation, kernel_initializer, bias_initializer, **kwargs)
        self.mask_initializer = keras.initializers.get(mask_initializer)

    def get_config(self):
        config = super().get_config()
        config["mask_initializer"] = keras.initializers.serialize(self.mask_initializer)
        return config


class MultiConv(MaskedLayerMixin, keras.layers.Layer):
    """Multitask convolution (channels last) over ``rank`` spatial axes: branch ``i`` convolves ``inputs[i]`` with slab ``i``.

    The base of `MultiConv1D`, `MultiConv2D` and `MultiConv3D`, which set ``rank``.
    """

    rank: int
    masked = False
    multitask = True
    list_input = True

    def __init__(
        self,
        filters,
        kernel_size=3,
        padding="same",
        strides=1,
        use_bias=True,
        activation=None,
        kernel_initializer="random_normal",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = validate_positive_int("filters", filters)
        self.kernel_size = conv_tuple("kernel_size", kernel_size, self.rank)
        self.padding = validate_padding(padding)
        self.strides = conv_tuple("strides", strides, self.rank)
        self.use_bias = bool(use_bias)
        self.activation = keras.activations.get(activation)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        shape = validate_branch_shapes(self, input_shape)
        tasks = len(input_shape)
        self.add_masked_weights((tasks, *self.kernel_size, shape[-1], self.filters), (tasks, self.filters))

    def call(self, inputs):
        kernel, bias = self.masked_kernel(), self.masked_bias()
        outputs = []
        for i, x in enumerate(inputs):
            y = ops.conv(x, kernel[i], strides=self.strides, padding=self.padding)
            if bias is not None:
                y = y + bias[i]
            outputs.append(self.activation(y))
        return outputs

    def compute_output_shape(self, input_shape):
        return [
            conv_output_shape(shape, self.kernel_size, self.strides, self.padding, self.filters)
            for shape in input_shape
        ]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "kernel_size": list(self.kernel_size),
                "padding": self.padding,
                "strides": list(self.strides),
                "use_bias": self.use_bias,
                "activation": keras.activations.serialize(self.activation),
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            }
        )
        return config


class MultiMaskedConv(MultiConv):
    """`MultiConv` whose slabs are multiplied by binary masks (what RSN2 prunes); adds ``mask_initializer``."""

    masked = True

    def __init__(self, filters, kernel_size=3, padding="same", strides=1, use_bias=True, activation=None,
                 kernel_initializer="random_normal", bias_initializer="zeros", mask_initializer="ones", **kwargs):
        super().__init__(filters, kernel_size, padding, strides, use_bias, activation,
                         kernel_initializer, bias_initializer, **kwargs)
        self.mask_initializer = keras.initializers.get(mask_initializer)

    def get_config(self):
        config = super().get_config()
        config["mask_initializer"] = keras.initializers.serialize(self.mask_initializer)
        return config


@keras.saving.register_keras_serializable(package="mann_edge")
class MultiConv1D(MultiConv):
    """Multitask 1-D convolution over (steps, channels); not in the original packages.

    Example:
        >>> a, b = MultiConv1D(8, kernel_size=3, activation="relu")([texts0, texts1])
    """

    rank = 1


@keras.saving.register_keras_serializable(package="mann_edge")
class MultiConv2D(MultiConv):
    """Multitask 2-D convolution (channels last): branch ``i`` convolves ``inputs[i]`` with slab ``i``.

    Example:
        >>> layer = MultiConv2D(8, kernel_size=3, activation="relu")
        >>> a, b = layer([images0, images1])
    """

    rank = 2


@keras.saving.register_keras_serializable(package="mann_edge")
class MultiConv3D(MultiConv):
    """Multitask 3-D convolution over (depth, height, width, channels).

    Example:
        >>> a, b = MultiConv3D(4, kernel_size=3, activation="relu")([volumes0, volumes1])
    """

    rank = 3


@keras.saving.register_keras_serializable(package="mann_edge")
class MultiMaskedConv1D(MultiMaskedConv):
    """`MultiConv1D` with masked slabs: the text branch of a MANN (not in the original packages).

    Example:
        >>> a, b = MultiMaskedConv1D(16, kernel_size=3, activation="relu")([embedded0, embedded1])
    """

    rank = 1


@keras.saving.register_keras_serializable(package="mann_edge")
class MultiMaskedConv2D(MultiMaskedConv):
    """`MultiConv2D` whose slabs are multiplied by binary masks (what RSN2 prunes).

    Example:
        >>> layer = MultiMaskedConv2D(16, kernel_size=3, activation="relu")
        >>> a, b = layer([images0, images1])
    """

    rank = 2


@keras.saving.register_keras_serializable(package="mann_edge")
class MultiMaskedConv3D(MultiMaskedConv):
    """`MultiConv3D` whose slabs are multiplied by binary masks.

    Example:
        >>> a, b = MultiMaskedConv3D(4, kernel_size=3, activation="relu")([volumes0, volumes1])
    """

    rank = 3


class MultiMaxPool(LayerFacts, keras.layers.Layer):
    """Max pooling over ``rank`` spatial axes applied to each task's input (the base of the 2-D and 3-D forms)."""

    rank: int
    multitask = True
    list_input = True

    def __init__(self, pool_size, strides, padding="same", **kwargs):
        super().__init__(**kwargs)
        self.pool_size = conv_tuple("pool_size", pool_size, self.rank)
        self.strides = conv_tuple("strides", strides, self.rank)
        self.padding = validate_padding(padding)

    def call(self, inputs):
        return [ops.max_pool(x, self.pool_size, strides=self.strides, padding=self.padding) for x in inputs]

    def compute_output_shape(self, input_shape):
        validate_branch_shapes(self, input_shape)
        return [
            conv_output_shape(shape, self.pool_size, self.strides, self.padding, shape[-1]) for shape in input_shape
        ]

    def get_config(self):
        config = super().get_config()
        config.update({"pool_size": list(self.pool_size), "strides": list(self.strides), "padding": self.padding})
        return config


@keras.saving.register_keras_serializable(package="mann_edge")
class MultiMaxPool2D(MultiMaxPool):
    """2-D max pooling applied to each task's input.

    Note the original's defaults: ``strides=(1, 1)`` and ``padding='same'`` keep the spatial size.

    Example:
        >>> a, b = MultiMaxPool2D(pool_size=2, strides=2)([maps0, maps1])
    """

    rank = 2

    def __init__(self, pool_size=(2, 2), strides=(1, 1), padding="same", **kwargs):
        super().__init__(pool_size, strides, padding, **kwargs)


@keras.saving.register_keras_serializable(package="mann_edge")
class MultiMaxPool3D(MultiMaxPool):
    """3-D max pooling applied to each task's input, with the original's defaults (3x3x3 windows, stride 1, 'same').

    Example:
        >>> a, b = MultiMaxPool3D(pool_size=2, strides=2)([volumes0, volumes1])
    """

    rank = 3

    def __init__(self, pool_size=(3, 3, 3), strides=(1, 1, 1), padding="same", **kwargs):
        super().__init__(pool_size, strides, padding, **kwargs)
