"""Shared fixtures: the test model zoo, built once per session, and the legacy fixtures."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest

import zoo


@pytest.fixture(scope="session")
def mixed_model():
    return zoo.build_mixed()


@pytest.fixture(scope="session")
def multiconv_model():
    return zoo.build_multiconv()


@pytest.fixture(scope="session")
def activations_model():
    return zoo.build_activations()


def _compact(model):
    import mann_edge

    return mann_edge.compact(model)


@pytest.fixture(scope="session")
def pruned_compact():
    """The 90 %-pruned two-task MLP (256 -> 512 -> 512 -> 10): the size-ratio model."""
    return _compact(zoo.build_pruned_mlp())


@pytest.fixture(scope="session")
def mixed_compact(mixed_model):
    return _compact(mixed_model)


@pytest.fixture(scope="session")
def multiconv_compact(multiconv_model):
    return _compact(multiconv_model)


@pytest.fixture(scope="session")
def activations_compact(activations_model):
    return _compact(activations_model)


@pytest.fixture(scope="session")
def legacy_models():
    """name -> (Keras model, recorded reference) for the four legacy fixtures."""
    import mann_edge

    return {name: (mann_edge.load_legacy(zoo.LEGACY / f"{name}.h5"), zoo.legacy_reference(name)) for name in zoo.LEGACY_NAMES}


@pytest.fixture(scope="session")
def legacy_compacts(legacy_models):
    """name -> CompactModel with tasks named task0, task1."""
    import mann_edge

    result = {}
    for name, (model, _) in legacy_models.items():
        result[name] = mann_edge.compact(model, task_names=["task0", "task1"])
    return result
