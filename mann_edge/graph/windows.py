"""Window arithmetic of convolutions and pools, in numpy only: padding, output sizes, sliding windows.

One copy for everything that slides a window: the reference ops (`mann_edge.graph.ops`),
the ONNX and Core ML lowerings (which write TensorFlow's 'same' padding as explicit pads)
and the numpy evaluation of Core ML programs (`mann_edge.converters.mil_eval`).

TensorFlow's 'same' padding gives an output of ``ceil(size / stride)`` cells and, when
the padding is odd, puts the extra cell after (bottom, right); 'valid' pads nothing.
A dilated kernel of ``k`` taps spans ``(k - 1) * dilation + 1`` cells.

Example:
    >>> same_padding(8, kernel=3, stride=2)
    (0, 1)
    >>> window_pads("same", (8, 8), (3, 3), (2, 2))
    [(0, 1), (0, 1)]
    >>> output_sizes("valid", (8, 8), (3, 3), (2, 2))
    [3, 3]
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["PADDINGS", "span", "same_padding", "window_pads", "output_sizes", "sliding_windows", "conv_windows"]

PADDINGS = ("same", "valid")


def span(kernel: int, dilation: int = 1) -> int:
    """The cells a kernel of ``kernel`` taps covers with ``dilation``.

    Example:
        >>> span(3, dilation=2)
        5
    """
    return (int(kernel) - 1) * int(dilation) + 1


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's 'same' padding (before, after) of one axis: the extra cell goes after.

    Example:
        >>> same_padding(5, kernel=2, stride=1)
        (0, 1)
    """
    out = -(-int(size) // int(stride))
    total = max((out - 1) * int(stride) + span(kernel, dilation) - int(size), 0)
    return total // 2, total - total // 2


def window_pads(
    padding: str,
    spatial: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilation: Sequence[int] | None = None,
) -> list[tuple[int, int]]:
    """(before, after) per spatial axis for TensorFlow's ``padding`` ('same' or 'valid').

    Raises:
        ValueError: ``padding`` is neither 'same' nor 'valid'.

    Example:
        >>> window_pads("same", (7, 6), (3, 3), (1, 2), (2, 1))
        [(2, 2), (0, 1)]
    """
    _check_padding(padding)
    dilation = (1,) * len(spatial) if dilation is None else dilation
    if padding == "valid":
        return [(0, 0)] * len(spatial)
    return [same_padding(size, k, s, d) for size, k, s, d in zip(spatial, kernel, strides, dilation)]


def output_sizes(
    padding: str,
    spatial: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilation: Sequence[int] | None = None,
) -> list[int]:
    """The output size per spatial axis of a window sliding with TensorFlow's ``padding``.

    Example:
        >>> output_sizes("same", (7, 8), (3, 3), (2, 2))
        [4, 4]
    """
    dilation = (1,) * len(spatial) if dilation is None else dilation
    pads = window_pads(padding, spatial, kernel, strides, dilation)
    return [
        (int(size) + before + after - span(k, d)) // int(s) + 1
        for size, (before, after), k, s, d in zip(spatial, pads, kernel, strides, dilation)
    ]


def sliding_windows(
    x: np.ndarray,
    kernel: Sequence[int],
    strides: Sequence[int],
    pads: Sequence[tuple[int, int]],
    *,
    dilation: Sequence[int] | None = None,
    axes: Sequence[int] = (1, 2),
    pad_value: float = 0.0,
) -> np.ndarray:
    """A strided view of the windows of ``x`` over ``axes``: those axes become output positions, the taps come last.

    ``x`` is padded with ``pad_value`` by ``pads`` ((before, after) per axis of ``axes``).
    For an NHWC batch and ``axes=(1, 2)`` the result is (N, Ho, Wo, C, kh, kw); for NCHW and
    ``axes=(2, 3)``, (N, C, Ho, Wo, kh, kw).

    Raises:
        ValueError: a window larger than the padded input.

    Example:
        >>> sliding_windows(np.ones((1, 4, 4, 2)), (3, 3), (1, 1), [(0, 0), (0, 0)]).shape
        (1, 2, 2, 2, 3, 3)
    """
    axes = tuple(axes)
    dilation = (1,) * len(axes) if dilation is None else tuple(dilation)
    widths = [(0, 0)] * x.ndim
    for axis, pad in zip(axes, pads):
        widths[axis] = (int(pad[0]), int(pad[1]))
    padded = np.pad(x, widths, constant_values=pad_value)
    spans = tuple(span(k, d) for k, d in zip(kernel, dilation))
    sizes = tuple(padded.shape[axis] for axis in axes)
    if any(size < s for size, s in zip(sizes, spans)):
        raise ValueError(f"window {spans} larger than the padded input {sizes}")
    windows = np.lib.stride_tricks.sliding_window_view(padded, spans, axis=axes)
    steps = [slice(None)] * x.ndim
    for axis, stride in zip(axes, strides):
        steps[axis] = slice(None, None, int(stride))
    # The taps of a dilated kernel are every ``dilation``-th cell of its span.
    return windows[(*steps, *(slice(None, None, int(d)) for d in dilation))]


def conv_windows(x: np.ndarray, kernel, strides, padding: str, dilation=None, pad_value: float = 0.0):
    """Sliding windows of a channels-last batch over its ``len(kernel)`` spatial axes, taps before channels.

    For NHWC ``x`` and a (kh, kw) kernel: ((N, Ho, Wo, kh, kw, C), the (before, after) pads of H and W);
    for NDHWC and (kd, kh, kw): (N, Do, Ho, Wo, kd, kh, kw, C).

    Example:
        >>> windows, pads = conv_windows(np.ones((1, 8, 8, 3)), (3, 3), (2, 2), "same")
        >>> windows.shape, pads
        ((1, 4, 4, 3, 3, 3), [(0, 1), (0, 1)])
    """
    rank = len(kernel)
    pads = window_pads(padding, x.shape[1:1 + rank], kernel, strides, dilation)
    axes = tuple(range(1, rank + 1))
    windows = sliding_windows(x, kernel, strides, pads, dilation=dilation, axes=axes, pad_value=pad_value)
    # (N, *out, C, *taps) -> (N, *out, *taps, C)
    order = (0, *axes, *range(rank + 2, 2 * rank + 2), rank + 1)
    return windows.transpose(order), pads


def _check_padding(padding: str) -> None:
    if padding not in PADDINGS:
        raise ValueError(f"padding must be 'same' or 'valid'. Received: {padding!r}")
