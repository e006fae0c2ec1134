"""Block-structured RSN2 end to end: block masks -> compact -> TFLite that runs its sparse FULLY_CONNECTED kernel.

RSN2 with ``block_size=4`` (float) or 16 (int8) keeps or prunes four (sixteen) consecutive
inputs of an output unit together: the 1x4 / 1x16 blocks TFLite's sparse kernel reads, so
the export needs no DENSIFY op. Every file is run by LiteRT through `mann_edge.runtime.load`.
"""

from __future__ import annotations


import keras
import numpy as np
import pytest

import mann_edge
import zoo
from mann_edge.converters import tflite, validation
from mann_edge.layers import MultiMaskedDense, SelectorLayer
from mann_edge.rsn2 import mask_model, sparsity_of

INPUTS, HIDDEN, CLASSES = 64, 128, 16
LAYERS = ("hidden_1", "hidden_2", "classes")


def build_block_mann(block_size: int, seed: int = 0) -> keras.Model:
    """Two tasks through 64 -> 128 -> 128 -> 16 MultiMaskedDense, masked at 90 % per task in 1 x ``block_size`` blocks."""
    keras.utils.set_random_seed(seed)
    a, b = keras.Input((INPUTS,), name="a"), keras.Input((INPUTS,), name="b")
    h = MultiMaskedDense(HIDDEN, activation="relu", bias_initializer="random_normal", name="hidden_1")([a, b])
    h = MultiMaskedDense(HIDDEN, activation="relu", bias_initializer="random_normal", name="hidden_2")(h)
    h = MultiMaskedDense(CLASSES, name="classes")(h)  # logits: errors are not squashed by a softmax
    model = keras.Model([a, b], [SelectorLayer(0, name="task_a")(h), SelectorLayer(1, name="task_b")(h)])
    mask_model(model, 90, method="magnitude", block_size=block_size)
    return model


def _assert_block_masks_exclusive_at_90(model: keras.Model, block_size: int) -> None:
    for name in LAYERS:
        mask = model.get_layer(name).get_masks()[0]  # (tasks, inputs, outputs)
        assert (mask.sum(axis=0) <= 1).all(), f"{name}: tasks share positions"
        blocks = mask.reshape(mask.shape[0], -1, block_size, mask.shape[2]).sum(axis=2)
        assert np.isin(blocks, (0, block_size)).all(), f"{name}: a block is partly kept"
    for name, slabs in sparsity_of(model).items():
        assert all(89.0 <= value <= 91.0 for value in slabs.values()), (name, slabs)


def _assert_compact_tasks_disjoint(cm) -> None:
    """Each layer's per-task kernels in the compact model use disjoint positions (exclusive masks survive compaction)."""
    kernels = {}
    for node in cm.nodes:
        if node.op == "dense":
            kernels.setdefault(tuple(cm.dense_weight(node.weights["kernel"]).shape), []).append(
                cm.dense_weight(node.weights["kernel"]) != 0
            )
    assert sorted(len(used) for used in kernels.values()) == [2, 2, 2]
    for used in kernels.values():
        assert not (used[0] & used[1]).any()


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("block_sparsity")


@pytest.fixture(scope="module")
def block4():
    model = build_block_mann(4)
    return model, mann_edge.compact(model)


@pytest.fixture(scope="module")
def block16():
    model = build_block_mann(16, seed=1)
    return model, mann_edge.compact(model)


def test_block_4_masks_compact_to_exclusive_tasks(block4):
    model, cm = block4
    _assert_block_masks_exclusive_at_90(model, 4)
    _assert_compact_tasks_disjoint(cm)
    arrays = zoo.sample_batch(model, 8, seed=2)
    for task, expected in zip(cm.task_names, zoo.keras_outputs(model, arrays)):
        inputs = {"task_a": {"a": arrays[0]}, "task_b": {"b": arrays[1]}}[task]
        np.testing.assert_allclose(cm.run(task, inputs)[0], expected, atol=1e-5, rtol=0)


def test_block_4_float32_export_runs_the_sparse_kernel_and_matches(block4, out):
    _, cm = block4
    path = tflite.export(cm, out / "block4.tflite")
    ops = tflite.operators(path)
    assert ops.count("FULLY_CONNECTED") == 2 * len(LAYERS)
    assert "DENSIFY" not in ops  # every kernel stays sparse at run time
    assert zoo.tflite_sparse_blocks(path) == [("FLOAT32", 4)] * (2 * len(LAYERS))
    session = mann_edge.runtime.load(path)
    for batch in (1, 32):
        for task in cm.tasks:
            inputs = validation.sample_inputs(cm, task, batch, seed=batch)
            (got,) = session.run(task.name, inputs)
            np.testing.assert_allclose(got, cm.run(task.name, inputs)[0], atol=1e-5, rtol=0, err_msg=task.name)
    tflite.validate(cm, path, use_xnnpack=False).raise_for_errors()


def test_block_16_int8_export_runs_the_sparse_int8_kernel_and_matches(block16, out):
    model, cm = block16
    _assert_block_masks_exclusive_at_90(model, 16)
    _assert_compact_tasks_disjoint(cm)
    path = out / "block16_int8.tflite"
    calibration = {spec.name: np.random.default_rng(0).normal(size=(64, *spec.shape[1:])).astype("float32")
                   for spec in cm.inputs}
    tflite.export(cm, path, dtype="int8", calibration=calibration)
    ops = tflite.operators(path)
    assert ops.count("FULLY_CONNECTED") == 2 * len(LAYERS)
    assert "DENSIFY" not in ops
    assert zoo.tflite_sparse_blocks(path) == [("INT8", 16)] * (2 * len(LAYERS))
    session = mann_edge.runtime.load(path)
    for batch in (1, 32):
        for task in cm.tasks:
            inputs = validation.sample_inputs(cm, task, batch, seed=batch)
            (got,) = session.run(task.name, inputs)
            (want,) = cm.run(task.name, inputs)
            error = np.abs(got - want).max()
            assert error <= validation.INT8_ATOL * np.abs(want).max(), (task.name, batch, error)
    tflite.validate(cm, path).raise_for_errors()


def test_unstructured_masks_would_run_dense_behind_densify(out):
    # The contrast: block_size=1 (RSN2's default) at the same 90 % gives DENSIFY in front of every kernel.
    cm = mann_edge.compact(build_block_mann(1, seed=2))
    path = tflite.export(cm, out / "unstructured.tflite")
    assert tflite.operators(path).count("DENSIFY") == 2 * len(LAYERS)
    assert zoo.tflite_sparse_blocks(path) == [("FLOAT32", 1)] * (2 * len(LAYERS))
