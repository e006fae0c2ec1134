"""Pictures of a MANN: which task owns which weight of each multitask layer, and bytes per format.

Each multitask layer (``MultiDense``/``MultiConv2D`` and their masked forms) becomes
one panel: its kernel as a matrix (inputs down, outputs across; a conv kernel
``(kh, kw, cin, cout)`` flattened to ``(kh*kw*cin, cout)``), every position coloured
by the task whose slab holds a nonzero weight there. With RSN2's exclusive masks
the tasks' subsets are disjoint, as in the MANN paper's figure; a position held by
several tasks (masks that overlap, as in some legacy files) gets its own colour.

The ownership is read from the compact model, whose nodes record the Keras layer
and the slab they came from (``attrs["layer"]``, ``attrs["slab"]``), so a Keras
model, a `.keras`/`.h5` file and a `.mann` bundle all give the same picture. A
bundle written before nodes recorded them gets one panel per dense/conv op.
matplotlib draws with the Agg canvas: no display needed.

Example:
    >>> plot_masks("model.mann", "masks.png", formats_bytes={"onnx": 812_345, "tflite": 402_112})
    PosixPath('masks.png')
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from mann_edge.errors import MannEdgeError
from mann_edge.files import atomic_output
from mann_edge.graph.model import CompactModel, Node

__all__ = ["plot_masks", "layer_ownership", "LayerOwnership", "task_colors", "FREE_COLOR", "OVERLAP_COLOR",
           "MAX_CELLS"]

# tab10 without its red and grey, which mean "several tasks" and "unused" here.
TASK_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
FREE_COLOR = "#eeeeee"
OVERLAP_COLOR = "#d62728"
FREE, OVERLAP = -1, -2  # ownership codes besides the slab index
MAX_CELLS = 192  # a panel shows at most this many rows and columns; larger matrices are pooled
IMAGE_FORMATS = ("png", "svg", "pdf")
KERNEL_OPS = ("dense", "conv2d")


@dataclass(frozen=True)
class LayerOwnership:
    """One multitask layer's kernel positions by owner.

    ``owner[r, c]`` is the slab index (position in ``slabs``) whose weight is nonzero
    there, ``-1`` where none is, ``-2`` where several are. ``slabs[i]`` names the
    task(s) that run slab ``i``. ``kernel_shape`` is the per-slab kernel's own shape.
    """

    layer: str
    op: str
    kernel_shape: tuple[int, ...]
    slabs: tuple[str, ...]
    owner: np.ndarray

    @property
    def overlapping(self) -> int:
        return int((self.owner == OVERLAP).sum())


def task_colors(count: int) -> list[str]:
    """The colours of ``count`` slabs, in order (`TASK_COLORS`, then evenly spaced hues beyond 8)."""
    if count <= len(TASK_COLORS):
        return list(TASK_COLORS[:count])
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps["hsv"]
    return [to_hex(cmap(i / count)) for i in range(count)]


def layer_ownership(model: CompactModel) -> list[LayerOwnership]:
    """Per multitask layer of ``model`` (graph order): which slab owns each kernel position.

    Layers and slabs are those the nodes record (``attrs["layer"]``, ``attrs["slab"]``);
    in a bundle written before nodes recorded them, each dense/conv op is its own layer.

    Example:
        >>> [o.layer for o in layer_ownership(cm)]
        ['shared_1', 'shared_2']
    """
    groups = _kernel_slabs(model)
    users: dict[str, list[str]] = {node.name: [] for slabs in groups.values() for nodes in slabs.values()
                                   for node in nodes}
    for task in model.tasks:
        for node in model.task_nodes(task.name):
            if node.name in users:
                users[node.name].append(task.name)
    result = []
    for layer, slabs in groups.items():
        indices = sorted(slabs)
        # A layer called more than once has one node per call and slab, all with that slab's kernel.
        nodes = [slabs[i][0] for i in indices]
        kernels = [model.dense_weight(node.weights["kernel"]) for node in nodes]
        shapes = {k.shape for k in kernels}
        if len(shapes) != 1:
            raise MannEdgeError(f"Multitask layer '{layer}': its slabs' kernels differ in shape: {sorted(shapes)}")
        held = np.stack([k.reshape(-1, k.shape[-1]) != 0 for k in kernels])  # (slabs, rows, cols)
        owner = np.where(held.any(axis=0), held.argmax(axis=0), FREE).astype(np.int16)
        owner[held.sum(axis=0) > 1] = OVERLAP
        names = tuple(
            ", ".join(dict.fromkeys(task for node in slabs[i] for task in users[node.name])) or f"slab {i}"
            for i in indices
        )
        result.append(LayerOwnership(layer, nodes[0].op, tuple(kernels[0].shape), names, owner))
    return result


def _records_layers(model: CompactModel) -> bool:
    """Whether ``model``'s nodes record the layer they came from (bundles written before they did do not)."""
    return any("layer" in node.attrs for node in model.nodes)


def _kernel_slabs(model: CompactModel) -> dict[str, dict[int, list[Node]]]:
    """Layer -> slab -> the dense/conv nodes of that slab, in graph order, from the nodes' attributes.

    Only branches of multitask layers (nodes with ``attrs["slab"]``) count. A model whose
    nodes record no layer (an older bundle) cannot tell which ops were slabs: each kernel
    op is then its own one-slab layer, named by its node.
    """
    recorded = _records_layers(model)
    groups: dict[str, dict[int, list[Node]]] = {}
    for node in model.nodes:
        if node.op not in KERNEL_OPS or "kernel" not in node.weights:
            continue
        if "slab" in node.attrs:
            layer, slab = node.attrs.get("layer", node.name), int(node.attrs["slab"])
        elif not recorded:
            layer, slab = node.name, 0
        else:
            continue
        groups.setdefault(layer, {}).setdefault(slab, []).append(node)
    return groups


def _owner_names(panels: list[LayerOwnership]) -> list[str]:
    """Every slab owner across the panels, each once, in order: one colour each.

    By name, not by slab index: slab 0 of one layer and slab 0 of another may be
    different tasks' (a layer shared by some of the tasks only).
    """
    return list(dict.fromkeys(name for panel in panels for name in panel.slabs))


def _pooled(owner: np.ndarray, slabs: int, max_cells: int) -> tuple[np.ndarray, tuple[int, int]]:
    """``owner`` shrunk to at most ``max_cells`` per side; a cell shows an owner present in its block.

    Each owner's presence is max-pooled, so an owner holding a single position of a
    block can still show. Where several are present, a seeded draw weighted by the
    inverse of each owner's position count picks one: a rare owner wins the blocks it
    appears in, owners of equal size share their blocks evenly (a fine speckle).
    """
    rows, cols = owner.shape
    fr, fc = max(1, math.ceil(rows / max_cells)), max(1, math.ceil(cols / max_cells))
    if fr == 1 and fc == 1:
        return owner, (1, 1)
    out_rows, out_cols = math.ceil(rows / fr), math.ceil(cols / fc)
    padded = np.full((out_rows * fr, out_cols * fc), FREE, owner.dtype)
    padded[:rows, :cols] = owner
    blocks = padded.reshape(out_rows, fr, out_cols, fc)
    codes = np.array(list(range(slabs)) + [OVERLAP], owner.dtype)
    present = np.stack([(blocks == code).any(axis=(1, 3)) for code in codes])  # (codes, out_rows, out_cols)
    counts = np.array([max(int((owner == code).sum()), 1) for code in codes], np.float64)
    # Efraimidis-Spirakis keys u ** (1 / weight) with weight 1 / count, as logs: the largest key wins.
    keys = np.log(np.random.default_rng(0).random(present.shape)) * counts[:, None, None]
    chosen = np.argmax(np.where(present, keys, -np.inf), axis=0)
    pooled = np.where(present.any(axis=0), codes[chosen], FREE).astype(owner.dtype)
    return pooled, (fr, fc)


def _rgb(owner: np.ndarray, colors: list[str]) -> np.ndarray:
    from matplotlib.colors import to_rgb

    palette = np.array([to_rgb(c) for c in colors] + [to_rgb(OVERLAP_COLOR), to_rgb(FREE_COLOR)])
    index = np.where(owner >= 0, owner, np.where(owner == OVERLAP, len(colors), len(colors) + 1))
    return palette[index]


def _model_of(source) -> CompactModel:
    from mann_edge.sources import load_source

    if isinstance(source, (CompactModel, str, os.PathLike)):
        return load_source(source)
    if hasattr(source, "layers") and hasattr(source, "outputs"):  # a Keras model
        return load_source(source)
    raise MannEdgeError(
        "plot_masks takes a Keras model, a .keras/.h5/.mann path or a CompactModel. "
        f"Received: {type(source).__name__}"
    )


def _check_formats_bytes(formats_bytes) -> dict[str, int]:
    if not isinstance(formats_bytes, Mapping) or not formats_bytes:
        raise ValueError(f"`formats_bytes` must be a non-empty mapping {{format: bytes}}. Received: {formats_bytes!r}")
    result = {}
    for name, size in formats_bytes.items():
        if isinstance(size, bool) or not isinstance(size, (int, np.integer, float)) or not size >= 0:
            raise ValueError(f"`formats_bytes[{name!r}]` must be a number of bytes >= 0. Received: {size!r}")
        result[str(name)] = int(size)
    return result


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _draw_layer(ax, panel: LayerOwnership, colors: list[str]) -> None:
    image, (fr, fc) = _pooled(panel.owner, len(panel.slabs), MAX_CELLS)
    ax.imshow(_rgb(image, colors), interpolation="nearest", aspect="auto")
    rows, cols = panel.owner.shape
    what = "x".join(str(d) for d in panel.kernel_shape)
    title = f"{panel.layer}  ({panel.op} {what})"
    if (fr, fc) != (1, 1):
        title += f"\nshown {fr}x{fc}-pooled"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(f"outputs ({cols})", fontsize=8)
    inputs = {"conv2d": "kh*kw*cin", "conv3d": "kd*kh*kw*cin"}.get(panel.op, "inputs")
    ax.set_ylabel(f"{inputs} ({rows})", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_bytes(ax, formats_bytes: dict[str, int]) -> None:
    names = list(formats_bytes)
    sizes = [formats_bytes[n] for n in names]
    bars = ax.barh(names, sizes, color="#4c72b0")
    ax.invert_yaxis()  # first format on top
    ax.bar_label(bars, labels=[_size(s) for s in sizes], padding=3, fontsize=8)
    ax.set_xlim(0, max(sizes) * 1.2 or 1)
    ax.set_xlabel("bytes", fontsize=8)
    ax.set_title("file size per format", fontsize=9)
    ax.tick_params(labelsize=8)


def plot_masks(source, path, *, formats_bytes: Mapping[str, float] | None = None, force: bool = False) -> Path:
    """Draws each multitask layer's weight positions coloured by owning task (and bytes per format) into ``path``.

    Args:
        source: a Keras model, a `.keras`/`.h5`/`.mann` path or a CompactModel.
        path: the image to write; its suffix picks the format (png, svg or pdf).
        formats_bytes: optional ``{format: bytes}``, drawn as a bar panel.
        force: overwrite an existing ``path``.

    Returns:
        The path written (atomically).

    Raises:
        MannEdgeError: a source that cannot be read, or a model without a multitask layer.
        OutputExistsError: ``path`` exists and ``force`` is False.

    Example:
        >>> plot_masks(mann_edge.samples.sample_path("vision_tabular"), "masks.png")
        PosixPath('masks.png')
    """
    path = Path(path)
    image_format = path.suffix.lower().lstrip(".")
    if image_format not in IMAGE_FORMATS:
        raise MannEdgeError(f"Plot {path}: expected a .png, .svg or .pdf file name. Received suffix {path.suffix!r}")
    sizes = _check_formats_bytes(formats_bytes) if formats_bytes is not None else None
    model = _model_of(source)
    panels = layer_ownership(model)
    if not panels:
        raise MannEdgeError(
            f"{source if isinstance(source, (str, os.PathLike)) else 'The model'} has no multitask layer "
            f"(MultiDense/MultiConv2D) to plot; its ops: {sorted({node.op for node in model.nodes})}"
        )

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    owners = _owner_names(panels)
    colors = task_colors(len(owners))
    columns = min(len(panels), 3)
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(3.6 * columns + 1.0, 3.4 * rows + (1.6 if sizes else 0) + 0.6), layout="constrained")
    FigureCanvasAgg(figure)  # draw with Agg: no display, no pyplot state
    grid = figure.add_gridspec(rows + (1 if sizes else 0), columns,
                               height_ratios=[3] * rows + ([max(1.0, 0.35 * len(sizes))] if sizes else []))
    for i, panel in enumerate(panels):
        panel_colors = [colors[owners.index(name)] for name in panel.slabs]
        _draw_layer(figure.add_subplot(grid[i // columns, i % columns]), panel, panel_colors)
    if sizes:
        _draw_bytes(figure.add_subplot(grid[rows, :]), sizes)

    handles = [Patch(facecolor=c, edgecolor="none", label=name) for c, name in zip(colors, owners)]
    handles.append(Patch(facecolor=FREE_COLOR, edgecolor="#999999", label="unused"))
    if any(p.overlapping for p in panels):
        handles.append(Patch(facecolor=OVERLAP_COLOR, edgecolor="none", label="several tasks"))
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), fontsize=8, frameon=False)
    title = "Weights by owning task"
    if not _records_layers(model):
        title += " (a bundle without layer records: one panel per op)"
    figure.suptitle(title, fontsize=10)

    with atomic_output(path, force=force) as tmp:
        figure.savefig(tmp, format=image_format, dpi=110)
    return path
