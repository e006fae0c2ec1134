"""Routing layers: they hold no weights and vanish into the compact graph's wiring."""

from __future__ import annotations

import functools

import keras
from keras import ops

from mann_edge.layers.base import LayerFacts


@keras.saving.register_keras_serializable(package="mann_edge")
class SelectorLayer(LayerFacts, keras.layers.Layer):
    """Returns ``inputs[sel_index]``: picks one task's branch out of a multitask layer's outputs.

    Example:
        >>> branches = MultiMaskedDense(10)([x0, x1])
        >>> task1 = SelectorLayer(1)(branches)
    """

    list_input = True

    def __init__(self, sel_index, **kwargs):
        super().__init__(**kwargs)
        if isinstance(sel_index, bool) or not isinstance(sel_index, int) or sel_index < 0:
            raise ValueError(f"`sel_index` must be a non-negative int. Received: sel_index={sel_index!r}")
        self.sel_index = sel_index

    def call(self, inputs):
        return inputs[self.sel_index]

    def compute_output_shape(self, input_shape):
        if self.sel_index >= len(input_shape):
            raise ValueError(
                f"SelectorLayer '{self.name}' selects input {self.sel_index} of {len(input_shape)} inputs."
            )
        return tuple(input_shape[self.sel_index])

    def get_config(self):
        config = super().get_config()
        config["sel_index"] = self.sel_index
        return config


@keras.saving.register_keras_serializable(package="mann_edge")
class FilterLayer(LayerFacts, keras.layers.Layer):
    """Passes its input through when on, outputs zeros of the same shape when off.

    Example:
        >>> gated = FilterLayer(is_on=False)(x)   # zeros like x
    """

    def __init__(self, is_on=True, **kwargs):
        super().__init__(**kwargs)
        self.is_on = bool(is_on)

    def call(self, inputs):
        return inputs if self.is_on else ops.zeros_like(inputs)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def turn_on(self):
        """Pass inputs through unchanged."""
        self.is_on = True

    def turn_off(self):
        """Output zeros."""
        self.is_on = False

    def get_config(self):
        config = super().get_config()
        config["is_on"] = self.is_on
        return config


@keras.saving.register_keras_serializable(package="mann_edge")
class SumLayer(LayerFacts, keras.layers.Layer):
    """Adds all its inputs together (shapes must match).

    Example:
        >>> total = SumLayer()([a, b, c])
    """

    list_input = True

    def call(self, inputs):
        return functools.reduce(ops.add, inputs)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])


@keras.saving.register_keras_serializable(package="mann_edge")
class MultitaskNormalization(LayerFacts, keras.layers.Layer):
    """Divides each input by the sum of all of them: ``outputs[i] = inputs[i] / sum(inputs)``.

    Every output reads every input, so a task's graph after it holds every branch it divides
    by; output ``i`` belongs to branch ``i`` (RSN2 trains and prunes task ``i`` there only).

    Example:
        >>> p0, p1 = MultitaskNormalization()([scores0, scores1])   # p0 + p1 == 1
    """

    list_input = True
    reads_all_branches = True

    def call(self, inputs):
        total = functools.reduce(ops.add, inputs)
        return [ops.divide(x, total) for x in inputs]

    def compute_output_shape(self, input_shape):
        return [tuple(shape) for shape in input_shape]
