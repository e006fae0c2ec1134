"""The committed sample MANNs: they load as plain Keras files, reproduce their recorded accuracies, are RSN2-pruned.

No training here: the accuracies are recomputed from the shipped files on the held-out
split `mann_edge.samples.sample_data` rebuilds (scikit-learn's bundled data and the
generated corpus), through Keras and through the compact model's numpy executor.
"""

from __future__ import annotations

import fnmatch
import json
import math

import keras
import numpy as np
import pytest

import mann_edge
import mann_edge.layers  # noqa: F401  (registers the layer classes for load_model)
from mann_edge import samples
from mann_edge.errors import MannEdgeError
from mann_edge.layers import MultiMaskedDense

NAMES = sorted(samples.SAMPLES)
ROOT = samples.SAMPLES_DIR.parents[1]


@pytest.fixture(scope="module")
def loaded():
    """name -> (Keras model, record, data splits)."""
    return {
        name: (keras.models.load_model(samples.sample_path(name)), samples.sample_record(name), samples.sample_data(name))
        for name in NAMES
    }


def _multitask_layers(model):
    return [layer for layer in model.layers if isinstance(layer, MultiMaskedDense)]


def test_each_sample_ships_a_model_and_its_record_small():
    sizes = []
    for name in NAMES:
        path = samples.sample_path(name)
        assert path.suffix == ".keras" and path.parent == samples.record_path(name).parent
        record = samples.sample_record(name)
        assert record["sample"] == name and record["model"] == path.name
        assert list(record["tasks"]) == list(samples.sample_tasks(name))
        sizes.append(path.stat().st_size + samples.record_path(name).stat().st_size)
    assert sum(sizes) < 4_000_000, f"samples take {sum(sizes)} bytes; keep them a few MB in all"


def test_samples_are_package_data():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = config["package-data"]["mann_edge"]
    for path in sorted(samples.SAMPLES_DIR.iterdir()):
        relative = path.relative_to(ROOT / "mann_edge").as_posix()
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), f"{relative} is not in package-data {patterns}"


@pytest.mark.parametrize("name", NAMES)
def test_sample_loads_with_plain_load_model(loaded, name):
    model, record, _ = loaded[name]
    assert list(model.output_names) == list(samples.sample_tasks(name))
    assert len(_multitask_layers(model)) == 2
    assert all(type(layer).__module__.startswith("mann_edge.layers") for layer in _multitask_layers(model))


@pytest.mark.parametrize("name", NAMES)
def test_recorded_test_accuracies_are_reproduced(loaded, name):
    model, record, data = loaded[name]
    compact = mann_edge.compact(model)
    for task, figures in record["tasks"].items():
        split = data[task]
        assert len(split.y_test) == figures["test_samples"]
        by_keras = samples.accuracy(model, task, split.x_test, split.y_test)
        assert by_keras == pytest.approx(figures["test_accuracy_pruned"], abs=1e-6), f"{name}/{task} through Keras"
        predicted = compact.run(task, split.x_test)[0].argmax(axis=-1)
        by_compact = float((predicted == split.y_test).mean())
        assert by_compact == pytest.approx(figures["test_accuracy_pruned"], abs=1e-6), f"{name}/{task} compacted"


@pytest.mark.parametrize("name", NAMES)
def test_pruned_accuracy_stays_within_one_point_of_dense(loaded, name):
    _, record, _ = loaded[name]
    for task, figures in record["tasks"].items():
        assert figures["test_accuracy_pruned"] >= figures["test_accuracy_dense"] - samples.ACCURACY_MARGIN, \
            (name, task, figures)
        assert figures["test_accuracy_pruned"] >= 0.9, (name, task, figures)


@pytest.mark.parametrize("name", NAMES)
def test_each_task_reached_its_target_on_its_own_positions(loaded, name):
    # A task's own positions: its layers, and in a multitask layer what the tasks before it left free.
    model, record, data = loaded[name]
    tasks = samples.sample_tasks(name)
    for layer in _multitask_layers(model):
        mask = layer.get_masks()[0]
        held = np.zeros(mask.shape[1:], bool)
        for slab, task in enumerate(tasks):
            own = mask[slab][~held]
            assert 1.0 - own.mean() >= record["tasks"][task]["target_sparsity"], (name, layer.name, task)
            held |= mask[slab] > 0
    for task, figures in record["tasks"].items():
        assert figures["sparsity"] >= figures["target_sparsity"] == 0.9, (name, task)
        assert figures["stopped"] == "reached the target" and not figures["warnings"], (name, task)
        assert figures["val_samples"] == len(data[task].y_val)
        assert all(kept for *_, kept in figures["steps"][-1:]), "the last step recorded is the one kept"


@pytest.mark.parametrize("name", NAMES)
def test_each_task_slab_is_pruned_to_at_least_90_percent(loaded, name):
    model, record, _ = loaded[name]
    tasks = samples.sample_tasks(name)
    for layer in _multitask_layers(model):
        mask = layer.get_masks()[0]
        kernel = keras.ops.convert_to_numpy(layer.w)
        assert not kernel[mask == 0].any(), f"{layer.name}: pruned positions hold weights"
        for slab, task in enumerate(tasks):
            sparsity = 1.0 - mask[slab].mean()
            assert sparsity >= 0.9, f"{name}/{layer.name}[{slab}] ({task}) is only {sparsity:.3f} sparse"
            assert sparsity == pytest.approx(record["tasks"][task]["multitask_sparsity"][layer.name], abs=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_masks_are_disjoint_across_tasks(loaded, name):
    model, _, _ = loaded[name]
    for layer in _multitask_layers(model):
        for role, mask in zip(("kernel", "bias"), layer.get_masks()):
            shared = int((mask.sum(axis=0) > 1).sum())
            assert shared == 0, f"{name}/{layer.name} {role}: {shared} positions held by more than one task"


def test_sentiment_corpus_is_the_one_trained_on():
    record = samples.sample_record("vision_text")
    assert samples.corpus_sha256() == record["corpus_sha256"]
    sentences, labels = samples.sentiment_corpus()
    assert (sentences, labels) == samples.sentiment_corpus()
    assert len(set(sentences)) == len(sentences) == samples.CORPUS_SIZE
    assert 0.4 < np.mean(labels) < 0.6
    tokens = samples.tokenize(sentences)
    assert tokens.dtype == np.int32 and tokens.shape == (samples.CORPUS_SIZE, samples.TOKENS)
    assert not (tokens == 1).any(), "every generated word is in the vocabulary"
    assert max(len(s.split()) for s in sentences) <= samples.TOKENS


def test_negation_flips_the_label_in_the_corpus():
    labelled = dict(zip(*samples.sentiment_corpus()))
    pairs = 0
    for sentence, label in labelled.items():
        for negation in samples.NEGATIONS:
            negated = sentence.replace(" was ", f" was {negation} ", 1)
            simple = " but " not in sentence and " and " not in sentence
            if simple and negated != sentence and negated in labelled:
                assert labelled[negated] == 1 - label, (sentence, negated)
                pairs += 1
    assert pairs > 10


def test_data_splits_are_deterministic_and_disjoint():
    first, second = samples.sample_data("vision_tabular"), samples.sample_data("vision_tabular")
    for task in first:
        np.testing.assert_array_equal(first[task].x_test, second[task].x_test)
        np.testing.assert_array_equal(first[task].y_train, second[task].y_train)
    for task, total in (("digits", 1797), ("cancer", 569)):
        split = first[task]
        assert len(split.y_train) + len(split.y_val) + len(split.y_test) == total
        assert len(split.y_test) == math.ceil(total * samples.TEST_SIZE)  # scikit-learn rounds the test share up
    assert first["digits"].x_test.shape[1:] == (8, 8, 1) and first["cancer"].x_test.shape[1:] == (30,)


def test_unknown_sample_is_named():
    with pytest.raises(MannEdgeError, match=r"Unknown sample 'nope'.*vision_tabular"):
        samples.sample_path("nope")


def test_record_is_plain_json_with_the_rsn2_settings():
    record = json.loads(samples.record_path("vision_tabular").read_text())
    assert record["rsn2"]["sparsity"] == 90 and record["seed"] == samples.SEED
    assert record["train_seconds"] > 0
    # What decides the bits of a rerun (mann_edge.determinism): the samples were trained under all of it.
    assert record["determinism"] == {"op_determinism": True, "threads": 1, "isa": "AVX2"}


def _record(**task):
    figures = {"test_samples": 450, "test_accuracy_dense": 0.98, "test_accuracy_pruned": 0.975, "val_samples": 270,
               "tolerance": "5 samples (1.85 points) of 270", "target_sparsity": 0.9, "sparsity": 0.9,
               "stopped": "reached the target", "warnings": []}
    return {"rsn2": {"sparsity": 90}, "tasks": {"digits": {**figures, **task}}}


def test_the_summary_says_what_each_task_reached_and_why_it_stopped():
    lines = samples.summary_lines(_record())
    assert "dense 0.980 -> pruned 0.975 (-0.5 points, 450 test samples)" in lines[0]
    assert "90.0% of its own weights pruned (target 90%)" in lines[0]
    assert "reached the target; judged on 270 validation samples, tolerance 5 samples" in lines[1]
    assert not any(line.lstrip().startswith("!") for line in lines)


def test_the_summary_flags_a_task_below_target_or_too_far_below_dense():
    lines = samples.summary_lines(_record(sparsity=0.8, test_accuracy_pruned=0.95,
                                          stopped="steps from 80 to 90, 85, 82.5 % failed", warnings=["too small"]))
    flags = [line.strip() for line in lines if line.lstrip().startswith("!")]
    assert flags[0] == "! too small"
    assert "digits is below its target sparsity" in flags[1] and "more patience" in flags[1]
    assert "digits lost 3.0 points of test accuracy" in flags[2]


@pytest.mark.parametrize("name", NAMES)
def test_training_script_builds_the_shipped_architecture(loaded, name):
    from mann_edge import sample_training

    built, (shipped, _, _) = sample_training.build(name), loaded[name]
    assert [(type(layer).__name__, layer.name) for layer in built.layers] == \
        [(type(layer).__name__, layer.name) for layer in shipped.layers]
    assert [w.shape for w in built.weights] == [w.shape for w in shipped.weights]


@pytest.mark.parametrize("name", NAMES)
def test_each_sample_ships_its_calibration_and_test_sets_as_the_splits_give_them(name):
    for path, arrays in ((samples.calibration_path(name), samples.calibration_arrays(name)),
                         (samples.evaluation_path(name), samples.evaluation_arrays(name))):
        assert path.is_file(), f"{path} is missing; write it with mann_edge.samples.write_sample_sets({name!r})"
        with np.load(path, allow_pickle=False) as shipped:
            assert sorted(shipped.files) == sorted(arrays)
            for key, array in arrays.items():
                np.testing.assert_array_equal(shipped[key], array, err_msg=f"{path.name}: {key}")
    calibration = samples.calibration_arrays(name)
    assert all(len(array) == samples.CALIBRATION_EXAMPLES for array in calibration.values())


@pytest.mark.parametrize("name", NAMES)
def test_sample_sets_are_keyed_by_the_models_input_and_output_names(loaded, name):
    model = mann_edge.compact(loaded[name][0])
    for task in model.tasks:
        assert samples.TASK_IO[task.name] == (task.inputs[0].name, task.outputs[0].name)
        assert len(task.inputs) == 1
