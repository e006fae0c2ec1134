"""What every MANN weight layer shares: its weights, masks and argument checks."""

from __future__ import annotations

import keras
import numpy as np


class MaskConstraint(keras.constraints.Constraint):
    """Multiplies a weight by its mask after each optimizer step.

    The mask already zeroes the weight's effect in `call`; this keeps the stored
    value at exactly zero too, whatever the optimizer's momentum or decay does.
    """

    def __init__(self, mask):
        self.mask = mask

    def __call__(self, weight):
        return weight * self.mask


class LayerFacts:
    """What mann-edge's tools need to know about a layer class, as class attributes.

    RSN2, compaction, the legacy reader and the sample training read these instead of
    keeping lists of classes, so a new layer class states its facts where it is defined.
    A Keras layer has none of them: read them with ``getattr(layer, fact, False)``.

    Attributes:
        masked: holds ``weights_mask`` (and ``bias_mask``), which RSN2 sets.
        multitask: one weight slab per task; output ``i`` reads only input ``i``.
        list_input: called on a list of tensors (one per task, or those it routes or sums).
        block_prunable: RSN2 can prune its kernel in blocks of consecutive inputs
            (``block_size``): dense kernels, the shape TFLite's sparse FullyConnected runs.
        reads_all_branches: output ``i`` reads every input but belongs to input ``i``'s
            branch: a task reads the other branches without owning (training or pruning) them.
    """

    masked = False
    multitask = False
    list_input = False
    block_prunable = False
    reads_all_branches = False


class MaskedLayerMixin(LayerFacts):
    """Creates ``weights`` and ``bias`` (and, when masked, their masks) in the original packages' order.

    Subclasses set ``masked`` and hold ``kernel_initializer``, ``bias_initializer``,
    ``use_bias`` and, when masked, ``mask_initializer``.
    """

    masked = True

    def add_masked_weights(self, kernel_shape, bias_shape):
        kernel_shape, bias_shape = tuple(int(d) for d in kernel_shape), tuple(int(d) for d in bias_shape)
        self.w_mask = self.b_mask = None
        if self.masked:
            self.w_mask = self.add_weight(
                shape=kernel_shape, initializer=self.mask_initializer, trainable=False, name="weights_mask"
            )
        self.w = self.add_weight(
            shape=kernel_shape,
            initializer=self.kernel_initializer,
            trainable=True,
            name="weights",
            constraint=MaskConstraint(self.w_mask) if self.masked else None,
        )
        self.b = None
        if self.use_bias:
            if self.masked:
                self.b_mask = self.add_weight(
                    shape=bias_shape, initializer=self.mask_initializer, trainable=False, name="bias_mask"
                )
            self.b = self.add_weight(
                shape=bias_shape,
                initializer=self.bias_initializer,
                trainable=True,
                name="bias",
                constraint=MaskConstraint(self.b_mask) if self.masked else None,
            )

    def masked_kernel(self):
        """The kernel as the layer applies it (mask included), as a backend tensor."""
        return self.w * self.w_mask if self.masked else self.w

    def masked_bias(self):
        """The bias as the layer applies it, or None without bias."""
        if not self.use_bias:
            return None
        return self.b * self.b_mask if self.masked else self.b

    def get_masks(self) -> list[np.ndarray]:
        """The masks as numpy arrays: ``[weights_mask]`` or ``[weights_mask, bias_mask]``."""
        self._require_masks()
        masks = [keras.ops.convert_to_numpy(self.w_mask)]
        if self.use_bias:
            masks.append(keras.ops.convert_to_numpy(self.b_mask))
        return masks

    def set_masks(self, new_masks) -> None:
        """Sets the masks and zeroes the weights they prune, as the original `set_masks` does.

        Args:
            new_masks: ``[weights_mask]`` or ``[weights_mask, bias_mask]``, 0/1 arrays shaped like the weights.
        """
        self._require_masks()
        targets = [(self.w, self.w_mask)] + ([(self.b, self.b_mask)] if self.use_bias else [])
        if len(new_masks) != len(targets):
            raise ValueError(
                f"Layer '{self.name}' expects {len(targets)} masks (weights"
                f"{', bias' if self.use_bias else ''}). Received: {len(new_masks)} masks."
            )
        for (weight, mask), new_mask in zip(targets, new_masks):
            new_mask = np.asarray(new_mask)
            if new_mask.shape != tuple(weight.shape):
                raise ValueError(
                    f"Mask for '{weight.path}' must have shape {tuple(weight.shape)}. Received: {new_mask.shape}."
                )
            new_mask = (new_mask != 0).astype(mask.dtype)
            mask.assign(new_mask)
            weight.assign(keras.ops.convert_to_numpy(weight) * new_mask)

    def _require_masks(self):
        if not self.masked:
            raise TypeError(f"Layer '{self.name}' ({type(self).__name__}) has no masks.")


def validate_positive_int(name: str, value) -> int:
    """``value`` as an int, or a ValueError in Keras's style."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, float)) or int(value) != value:
        raise ValueError(f"`{name}` must be a positive int. Received: {name}={value!r}")
    if int(value) <= 0:
        raise ValueError(f"`{name}` must be a positive int. Received: {name}={value!r}")
    return int(value)


def conv_tuple(name: str, value, rank: int = 2) -> tuple[int, ...]:
    """An int or ``rank`` ints as ``rank`` positive ints (kernel sizes, strides, pool sizes)."""
    values = (value,) * rank if isinstance(value, (int, np.integer)) else tuple(value)
    if len(values) != rank:
        raise ValueError(f"`{name}` must be an int or a tuple of {rank} ints. Received: {name}={value!r}")
    return tuple(validate_positive_int(name, v) for v in values)


def validate_padding(padding) -> str:
    """'same' or 'valid' (any case), lower-cased."""
    if not isinstance(padding, str) or padding.lower() not in ("same", "valid"):
        raise ValueError(f"`padding` must be 'same' or 'valid'. Received: padding={padding!r}")
    return padding.lower()


def validate_branch_shapes(layer, input_shape) -> tuple:
    """The one shape all branches of a multitask layer share, or a ValueError naming the layer."""
    if not isinstance(input_shape, (list, tuple)) or not input_shape or not isinstance(input_shape[0], (list, tuple)):
        raise ValueError(
            f"{type(layer).__name__} '{layer.name}' takes a list of inputs, one per task. Received shape: {input_shape}"
        )
    shapes = [tuple(s) for s in input_shape]
    if len(set(s[1:] for s in shapes)) != 1:
        raise ValueError(
            f"All inputs of {type(layer).__name__} '{layer.name}' must have the same shape. Received: {shapes}"
        )
    return shapes[0]


def conv_output_shape(input_shape, kernel_size, strides, padding, channels):
    """Output shape of a channels-last convolution or pooling over ``len(kernel_size)`` spatial axes."""

    def length(size, k, s):
        if size is None:
            return None
        if padding == "same":
            return -(-size // s)
        return (size - k) // s + 1

    spatial = input_shape[1:1 + len(kernel_size)]
    return (input_shape[0], *(length(*axis) for axis in zip(spatial, kernel_size, strides)), channels)
