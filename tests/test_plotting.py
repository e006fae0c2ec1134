"""`plot_masks`: the picture of which task owns which weight, from every kind of source; its errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import replace

import keras
import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread

import mann_edge
import zoo
from mann_edge import samples
from mann_edge.errors import MannEdgeError, OutputExistsError
from mann_edge.graph.model import CompactModel, Node, Task, TensorSpec
from mann_edge.layers import MultiMaskedDense, SelectorLayer
from mann_edge.plotting import (
    FREE_COLOR,
    MAX_CELLS,
    OVERLAP_COLOR,
    _pooled,
    layer_ownership,
    plot_masks,
    task_colors,
)

# The hand-made overlapping model is meant to overlap.
pytestmark = pytest.mark.filterwarnings("ignore::mann_edge.compaction.MaskOverlapWarning")


def color_pixels(path, color: str) -> int:
    """How many pixels of the image at ``path`` have exactly ``color`` (to 8-bit rounding)."""
    image = imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    return int((np.abs(image[..., :3] - np.array(to_rgb(color))) < 1.5 / 255).all(axis=-1).sum())


def overlapping_model():
    """Two tasks through one MultiMaskedDense whose masks share 4 positions."""
    keras.utils.set_random_seed(0)
    a, b = keras.Input((6,), name="a"), keras.Input((6,), name="b")
    layer = MultiMaskedDense(4, kernel_initializer="glorot_uniform", bias_initializer="ones", name="shared")
    h = layer([a, b])
    model = keras.Model([a, b], [SelectorLayer(0, name="left")(h), SelectorLayer(1, name="right")(h)])
    mask = np.zeros((2, 6, 4), "float32")
    mask[0, :3], mask[1, 2:] = 1, 1  # rows 2 belong to both
    layer.set_masks([mask, np.ones((2, 4), "float32")])
    return model


@pytest.fixture(scope="module")
def sample_model():
    return keras.models.load_model(samples.sample_path("vision_tabular"))


def test_png_of_a_sample_shows_every_task_in_its_colour(sample_model, tmp_path):
    path = plot_masks(samples.sample_path("vision_tabular"), tmp_path / "masks.png")
    assert path == tmp_path / "masks.png"
    image = imread(path)
    height, width = image.shape[:2]
    assert 250 <= height <= 3000 and 400 <= width <= 4000, image.shape
    for task, color in zip(samples.sample_tasks("vision_tabular"), task_colors(2)):
        # far more than a legend patch: the panels show each task's ~10 % of two 128x128 kernels
        assert color_pixels(path, color) > 3000, f"task {task!r} ({color}) is not visible"
    assert color_pixels(path, FREE_COLOR) > 3000
    assert color_pixels(path, OVERLAP_COLOR) == 0
    assert not list(tmp_path.glob(".*partial"))


def test_ownership_follows_the_keras_masks_and_task_names(sample_model):
    panels = layer_ownership(mann_edge.compact(sample_model))
    assert [p.layer for p in panels] == ["shared_1", "shared_2"]
    for panel in panels:
        mask = sample_model.get_layer(panel.layer).get_masks()[0]
        expected = np.where(mask.any(axis=0), mask.argmax(axis=0), -1)
        np.testing.assert_array_equal(panel.owner, expected)
        assert panel.slabs == ("digits", "cancer") and panel.overlapping == 0


def test_conv_kernels_are_flattened_to_inputs_by_outputs(multiconv_model):
    (panel,) = layer_ownership(mann_edge.compact(multiconv_model))
    layer = next(layer for layer in multiconv_model.layers if layer.name == panel.layer)
    mask = layer.get_masks()[0]  # (tasks, kh, kw, cin, cout)
    assert panel.op == "conv2d" and panel.kernel_shape == mask.shape[1:]
    assert panel.owner.shape == (3 * 3 * 1, 6)
    flat = mask.reshape(2, -1, mask.shape[-1])
    np.testing.assert_array_equal(panel.owner, np.where(flat.any(axis=0), flat.argmax(axis=0), -1))


def test_ownership_comes_from_node_attributes_not_names():
    # A name that looks like a slab ("decoy[1]") means nothing; attrs["layer"] and attrs["slab"] do.
    rng = np.random.default_rng(0)
    spec = TensorSpec("x", (None, 5))
    nodes, weights, tasks, kernels = [], {}, [], []
    for i, (name, origin) in enumerate([("alpha", {"layer": "shared", "slab": 0}),
                                        ("beta", {"layer": "shared", "slab": 1}),
                                        ("decoy[1]", {"layer": "decoy"})]):
        kernels.append(((rng.random((5, 3)) < 0.5) * rng.normal(size=(5, 3))).astype("float32"))
        weights[f"{name}/kernel"] = kernels[-1]
        nodes.append(Node(name, "dense", ("x",), {"kernel": f"{name}/kernel"}, {"activation": "linear", **origin},
                          (None, 3)))
        tasks.append(Task(f"t{i}", (spec,), (TensorSpec(f"y{i}", (None, 3)),), (name,)))
    (panel,) = layer_ownership(CompactModel([spec], nodes, tasks, weights))
    assert (panel.layer, panel.op, panel.kernel_shape, panel.slabs) == ("shared", "dense", (5, 3), ("t0", "t1"))
    held = np.stack([k != 0 for k in kernels[:2]])
    expected = np.where(held.sum(axis=0) > 1, -2, np.where(held.any(axis=0), held.argmax(axis=0), -1))
    np.testing.assert_array_equal(panel.owner, expected)


def test_a_bundle_without_layer_records_plots_one_panel_per_op(pruned_compact, tmp_path):
    # Bundles written before compaction recorded attrs["layer"]/["slab"]: each kernel op is its own layer.
    unrecorded = [replace(node, attrs={k: v for k, v in node.attrs.items() if k not in ("layer", "slab")})
                  for node in pruned_compact.nodes]
    older = CompactModel(pruned_compact.inputs, unrecorded, pruned_compact.tasks, pruned_compact.weights,
                         pruned_compact.provenance)
    bundle = older.save(tmp_path / "older.mann")
    panels = layer_ownership(mann_edge.load_compact(bundle))
    assert [p.layer for p in panels] == [node.name for node in pruned_compact.nodes if node.op == "dense"]
    assert all(len(p.slabs) == 1 and p.slabs[0] in ("task_a", "task_b") and not p.overlapping for p in panels)
    path = plot_masks(bundle, tmp_path / "older.png")
    assert color_pixels(path, task_colors(1)[0]) > 3000


def test_large_matrices_are_pooled_so_every_task_stays_visible(pruned_compact, tmp_path):
    panels = {p.layer: p for p in layer_ownership(pruned_compact)}
    owner = panels["hidden_2"].owner  # 512 x 512
    pooled, factors = _pooled(owner, 2, MAX_CELLS)
    assert factors == (3, 3) and max(pooled.shape) <= MAX_CELLS
    for task in (0, 1):
        share = (pooled == task).mean()
        assert 0.3 < share < 0.7, f"task {task} shows in {share:.2f} of the pooled cells"
    plot_masks(pruned_compact, tmp_path / "mlp.png")
    for color in task_colors(2):
        assert color_pixels(tmp_path / "mlp.png", color) > 3000


def test_pooling_keeps_a_single_position_visible():
    owner = np.full((600, 600), -1, np.int16)
    owner[:, :300] = 0
    owner[450, 100] = 1  # one position of task 1 in task 0's half
    pooled, (fr, fc) = _pooled(owner, 2, 200)
    assert (fr, fc) == (3, 3)
    assert pooled[150, 33] == 1 and (pooled == 1).sum() == 1
    assert (pooled[:, :100] == 0).sum() == 200 * 100 - 1 and (pooled[:, 100:] == -1).all()


def test_overlapping_masks_get_their_own_colour(tmp_path):
    model = overlapping_model()
    (panel,) = layer_ownership(mann_edge.compact(model))
    path = plot_masks(model, tmp_path / "overlap.png")
    assert panel.overlapping == 4 and (panel.owner[2] == -2).all()
    assert panel.slabs == ("left", "right")
    assert color_pixels(path, OVERLAP_COLOR) > 1000


def test_bar_panel_shows_bytes_per_format(tmp_path):
    plain = plot_masks(overlapping_model(), tmp_path / "plain.png")
    with_bars = plot_masks(overlapping_model(), tmp_path / "bars.png",
                           formats_bytes={"onnx": 120_000, "tflite": 64_000, "mann": 9_000})
    assert imread(with_bars).shape[0] > imread(plain).shape[0]
    assert color_pixels(with_bars, "#4c72b0") > 2000 and color_pixels(plain, "#4c72b0") == 0


@pytest.mark.parametrize("bad", [{}, {"onnx": -1}, {"onnx": "big"}, [("onnx", 3)]])
def test_bad_formats_bytes_are_named(bad, tmp_path):
    with pytest.raises(ValueError, match="formats_bytes"):
        plot_masks(overlapping_model(), tmp_path / "x.png", formats_bytes=bad)
    assert not (tmp_path / "x.png").exists()


def test_mann_bundle_and_legacy_h5_sources(pruned_compact, tmp_path):
    bundle = pruned_compact.save(tmp_path / "mlp.mann")
    assert color_pixels(plot_masks(bundle, tmp_path / "bundle.png"), task_colors(2)[1]) > 3000
    path = plot_masks(zoo.LEGACY / "mann_conv.h5", tmp_path / "legacy.svg")
    assert path.read_text().lstrip().startswith("<?xml") and "<svg" in path.read_text()


def test_bad_sources_error_clearly(activations_compact, tmp_path):
    with pytest.raises(MannEdgeError, match="does not exist"):
        plot_masks(tmp_path / "missing.keras", tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(MannEdgeError, match=r"expected a \.keras, \.h5, \.mann"):
        plot_masks(tmp_path / "notes.txt", tmp_path / "a.png")
    (tmp_path / "broken.keras").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(MannEdgeError, match="broken.keras"):
        plot_masks(tmp_path / "broken.keras", tmp_path / "a.png")
    with pytest.raises(MannEdgeError, match="takes a Keras model.*Received: int"):
        plot_masks(42, tmp_path / "a.png")
    with pytest.raises(MannEdgeError, match="no multitask layer"):
        plot_masks(activations_compact, tmp_path / "a.png")
    with pytest.raises(MannEdgeError, match=r"\.png, \.svg or \.pdf.*'\.jpg'"):
        plot_masks(activations_compact, tmp_path / "a.jpg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.keras", "notes.txt"]


def test_existing_output_needs_force(tmp_path):
    path = tmp_path / "m.png"
    path.write_bytes(b"old")
    with pytest.raises(OutputExistsError, match="m.png"):
        plot_masks(overlapping_model(), path)
    assert path.read_bytes() == b"old"
    plot_masks(overlapping_model(), path, force=True)
    assert imread(path).shape[2] in (3, 4)


NO_DISPLAY = textwrap.dedent(
    """
    import os, sys
    os.environ.pop("DISPLAY", None)
    os.environ["MPLBACKEND"] = "qtagg"  # a display backend that is not there must not matter
    from mann_edge.plotting import plot_masks
    plot_masks(sys.argv[1], sys.argv[2])
    print("pyplot" if "matplotlib.pyplot" in sys.modules else "", "tensorflow" if "tensorflow" in sys.modules else "")
    """
)


def test_draws_without_a_display_or_pyplot(pruned_compact, tmp_path):
    bundle = pruned_compact.save(tmp_path / "mlp.mann")
    result = subprocess.run([sys.executable, "-c", NO_DISPLAY, str(bundle), str(tmp_path / "m.png")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "", f"imported: {result.stdout.strip()}"
    assert imread(tmp_path / "m.png").shape[0] > 250
