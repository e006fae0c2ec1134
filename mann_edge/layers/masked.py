"""Single-task masked layers: `MaskedDense`, `MaskedConv1D`, `MaskedConv2D`, `MaskedConv3D`.

Same constructor arguments, config keys and weight names as the original
`mann`/`beyondml` layers: ``weights``, ``bias`` (trainable) and
``weights_mask``, ``bias_mask`` (not trainable). The mask multiplies the
weight at every call and, through a constraint, after every optimizer step,
so a pruned weight stays exactly zero however the model is trained.
"""

from __future__ import annotations

import keras
from keras import ops

from mann_edge.layers.base import (
    MaskedLayerMixin,
    conv_output_shape,
    conv_tuple,
    validate_padding,
    validate_positive_int,
)


@keras.saving.register_keras_serializable(package="mann_edge")
class MaskedDense(MaskedLayerMixin, keras.layers.Layer):
    """Fully connected layer whose weights and bias are multiplied by binary masks.

    Example:
        >>> layer = MaskedDense(16, activation="relu")
        >>> y = layer(np.ones((2, 8), "float32"))   # (2, 16)
    """

    block_prunable = True

    def __init__(
        self,
        units,
        use_bias=True,
        activation=None,
        kernel_initializer="random_normal",
        mask_initializer="ones",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = validate_positive_int("units", units)
        self.use_bias = bool(use_bias)
        self.activation = keras.activations.get(activation)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.mask_initializer = keras.initializers.get(mask_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        self.add_masked_weights((input_shape[-1], self.units), (self.units,))

    def call(self, inputs):
        outputs = ops.matmul(inputs, self.masked_kernel())
        if self.use_bias:
            outputs = outputs + self.masked_bias()
        return self.activation(outputs)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "units": self.units,
                "use_bias": self.use_bias,
                "activation": keras.activations.serialize(self.activation),
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "mask_initializer": keras.initializers.serialize(self.mask_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            }
        )
        return config


class MaskedConv(MaskedLayerMixin, keras.layers.Layer):
    """Convolution (channels last) over ``rank`` spatial axes whose kernel and bias are multiplied by binary masks.

    The base of `MaskedConv1D`, `MaskedConv2D` and `MaskedConv3D`, which set ``rank``.
    """

    rank: int

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
        mask_initializer="ones",
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
        self.mask_initializer = keras.initializers.get(mask_initializer)

    def build(self, input_shape):
        self.add_masked_weights((*self.kernel_size, input_shape[-1], self.filters), (self.filters,))

    def call(self, inputs):
        outputs = ops.conv(inputs, self.masked_kernel(), strides=self.strides, padding=self.padding)
        if self.use_bias:
            outputs = outputs + self.masked_bias()
        return self.activation(outputs)

    def compute_output_shape(self, input_shape):
        return conv_output_shape(input_shape, self.kernel_size, self.strides, self.padding, self.filters)

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
                "mask_initializer": keras.initializers.serialize(self.mask_initializer),
            }
        )
        return config


@keras.saving.register_keras_serializable(package="mann_edge")
class MaskedConv1D(MaskedConv):
    """1-D convolution over (steps, channels) with masked kernel and bias; not in the original packages.

    Example:
        >>> layer = MaskedConv1D(8, kernel_size=3, padding="same", activation="relu")
        >>> y = layer(np.ones((1, 20, 16), "float32"))   # (1, 20, 8)
    """

    rank = 1


@keras.saving.register_keras_serializable(package="mann_edge")
class MaskedConv2D(MaskedConv):
    """2-D convolution (channels last) whose kernel and bias are multiplied by binary masks.

    Example:
        >>> layer = MaskedConv2D(8, kernel_size=3, padding="same", activation="relu")
        >>> y = layer(np.ones((1, 28, 28, 1), "float32"))   # (1, 28, 28, 8)
    """

    rank = 2


@keras.saving.register_keras_serializable(package="mann_edge")
class MaskedConv3D(MaskedConv):
    """3-D convolution over (depth, height, width, channels) with masked kernel and bias.

    Example:
        >>> layer = MaskedConv3D(4, kernel_size=3, activation="relu")
        >>> y = layer(np.ones((1, 4, 8, 8, 1), "float32"))   # (1, 4, 8, 8, 4)
    """

    rank = 3

    # The original takes `activation` before `use_bias` here (not in MaskedConv2D): kept for positional calls.
    def __init__(self, filters, kernel_size=3, padding="same", strides=1, activation=None, use_bias=True,
                 kernel_initializer="random_normal", bias_initializer="zeros", mask_initializer="ones", **kwargs):
        super().__init__(filters, kernel_size, padding, strides, use_bias, activation,
                         kernel_initializer, bias_initializer, mask_initializer, **kwargs)
