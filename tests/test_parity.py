"""The parity matrix: every source model x every format in the table x batch sizes 1 and 7 x every task.

Sources are the legacy fixtures (against the outputs the original packages recorded), the
test zoo and the shipped samples (against Keras), and a compact model built directly
(against the numpy reference). Each export runs in its own runtime where this machine has
it, and through its converter's own evaluation elsewhere (Core ML off macOS). A format
added to `mann_edge.formats.FORMATS` is tested here without touching this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

import mann_edge
import zoo
from mann_edge import samples
from mann_edge.converters.validation import tolerances
from mann_edge.errors import InputError
from mann_edge.formats import FORMATS
from mann_edge.graph.activations import ACTIVATIONS
from mann_edge.graph.ops import OPS

BATCHES = (1, 7)


@dataclass
class Source:
    """A model to export: its compact model, and the reference outputs of a task for a batch size."""

    compact: mann_edge.CompactModel
    reference: Callable[[str, int], tuple[dict, list]]  # (task, batch) -> (inputs by name, expected outputs)


def _legacy(name: str) -> Source:
    """A file the original packages saved, against the outputs they recorded: ``x<i>`` feeds model input ``i``."""
    cm = mann_edge.compact(mann_edge.load_legacy(zoo.LEGACY / f"{name}.h5"), task_names=["task0", "task1"])
    recorded = zoo.legacy_reference(name)
    inputs = [spec.name for spec in cm.inputs]

    def reference(task: str, batch: int):
        feeds = {spec.name: recorded[f"x{inputs.index(spec.name)}"][:batch] for spec in cm.task(task).inputs}
        return feeds, [recorded[f"out{cm.task_names.index(task)}"][:batch]]

    return Source(cm, reference)


def _keras(model) -> Source:
    cm = mann_edge.compact(model)

    def reference(task: str, batch: int):
        arrays = zoo.sample_batch(model, batch, seed=batch)
        by_name = {kt.name: array for kt, array in zip(model.inputs, arrays)}
        expected = dict(zip(model.output_names, zoo.keras_outputs(model, arrays if len(arrays) > 1 else arrays[0])))
        spec = cm.task(task)
        return {s.name: by_name[s.name] for s in spec.inputs}, [expected[s.name] for s in spec.outputs]

    return Source(cm, reference)


def _numpy_reference(cm) -> Source:
    from mann_edge.converters.validation import sample_inputs

    def reference(task: str, batch: int):
        inputs = sample_inputs(cm, task, batch, seed=batch)
        return inputs, cm.run(task, inputs)

    return Source(cm, reference)


def _sample(name: str) -> Source:
    """A shipped sample, run on the held-out examples of its own data (the other task's inputs zero)."""
    import keras

    import mann_edge.layers  # noqa: F401  (registers the layer classes)

    model = keras.models.load_model(samples.sample_path(name), compile=False)
    cm = mann_edge.compact(model, task_names=samples.sample_tasks(name))
    data = samples.sample_data(name)

    def reference(task: str, batch: int):
        x = data[task].x_test[:batch]
        feed = [np.zeros((batch, *kt.shape[1:]), kt.dtype) for kt in model.inputs]
        feed[[kt.name for kt in model.inputs].index(cm.task(task).inputs[0].name)] = x
        expected = zoo.keras_outputs(model, feed)[cm.task_names.index(task)]
        return {cm.task(task).inputs[0].name: x}, [expected]

    return Source(cm, reference)


SOURCES: dict[str, Callable[[], Source]] = {
    **{f"legacy/{name}": (lambda name=name: _legacy(name))
       for name in zoo.LEGACY_NAMES + zoo.CATALOGUE_NAMES if name != "beyondml_float16"},
    "zoo/mixed": lambda: _keras(zoo.build_mixed()),
    "zoo/multiconv": lambda: _keras(zoo.build_multiconv()),
    "zoo/activations": lambda: _keras(zoo.build_activations()),
    "zoo/padding": lambda: _keras(zoo.build_padding()),
    "zoo/volumes": lambda: _keras(zoo.build_volumes()),
    "zoo/sequences": lambda: _keras(zoo.build_sequences()),
    "zoo/images": lambda: _keras(zoo.build_images()),
    "zoo/attention": lambda: _keras(zoo.build_attention()),
    "zoo/mann_ranks": lambda: _keras(zoo.build_mann_ranks()),
    "zoo/parametrized_activations": lambda: _numpy_reference(zoo.parametrized_activations()),
    **{f"sample/{name}": (lambda name=name: _sample(name)) for name in samples.SAMPLES},
}


@pytest.fixture(scope="module")
def sources():
    cache: dict[str, Source] = {}

    def get(name: str) -> Source:
        if name not in cache:
            cache[name] = SOURCES[name]()
        return cache[name]

    return get


def _runner(format: str, path):
    """How to run an export here: its runtime, or where that runtime cannot run on this machine, its converter's own."""
    if FORMATS[format].runs_here():
        return mann_edge.runtime.load(path).run
    return FORMATS[format].converter_module().runner(path)


@pytest.mark.parametrize("format", list(FORMATS))
@pytest.mark.parametrize("source", list(SOURCES))
def test_every_task_of_every_source_matches_its_reference_in_every_format(source, format, sources, tmp_path):
    model = sources(source)
    module = FORMATS[format].converter_module()
    path = module.export(model.compact, tmp_path / module.artifact_name())
    run = _runner(format, path)
    atol, rtol = tolerances("float32")
    for task in model.compact.tasks:
        for batch in BATCHES:
            inputs, expected = model.reference(task.name, batch)
            outputs = run(task.name, inputs)
            assert len(outputs) == len(expected)
            for spec, got, want in zip(task.outputs, outputs, expected):
                got = np.asarray(got)
                assert got.shape == want.shape, f"{source} {format} {task.name} b{batch} '{spec.name}'"
                np.testing.assert_allclose(got, want, atol=atol, rtol=rtol,
                                           err_msg=f"{source} {format} task {task.name} batch {batch} '{spec.name}'")


@pytest.mark.parametrize("format", list(FORMATS))
@pytest.mark.parametrize("source", ["legacy/mann_conv", "zoo/mixed"])
def test_float16_exports_are_within_the_float16_tolerance(source, format, sources, tmp_path):
    model = sources(source)
    module = FORMATS[format].converter_module()
    if "float16" not in FORMATS[format].dtypes:
        pytest.skip(f"{format} takes no float16")
    path = module.export(model.compact, tmp_path / module.artifact_name(), dtype="float16")
    report = module.validate(model.compact, path, batches=BATCHES)
    assert report.atol == tolerances("float16")[0]
    report.raise_for_errors()
    assert {check.task for check in report.checks} == set(model.compact.task_names)
    assert {check.batch for check in report.checks} == set(BATCHES)


@pytest.mark.parametrize("format", list(FORMATS))
def test_every_compact_op_and_activation_has_a_lowering_in_every_format(format):
    module = FORMATS[format].converter_module()
    assert set(OPS) <= set(module.LOWERINGS), sorted(set(OPS) - set(module.LOWERINGS))
    assert set(ACTIVATIONS) <= set(module.ACTIVATION_LOWERINGS), sorted(set(ACTIVATIONS) - set(module.ACTIVATION_LOWERINGS))


def _layer_classes(model) -> set[type]:
    """The layer classes of ``model`` and of the models nested in it."""
    import keras

    classes = set()
    for layer in model.layers:
        classes.add(type(layer))
        if isinstance(layer, keras.Model):
            classes |= _layer_classes(layer)
    return classes


def test_every_layer_that_compacts_is_in_the_parity_matrix():
    """Coverage is checked, not hoped for: a Keras layer given a lowering needs a zoo model among `SOURCES`.

    MANN layers count in the zoo models and in the files the original packages saved.
    """
    from mann_edge.compaction import LOWERINGS

    builders = [zoo.build_mixed, zoo.build_multiconv, zoo.build_activations, zoo.build_padding, zoo.build_volumes,
                zoo.build_sequences, zoo.build_images, zoo.build_attention, zoo.build_mann_ranks]
    assert {f"zoo/{b.__name__.removeprefix('build_')}" for b in builders} <= set(SOURCES)
    legacy = [name for name in zoo.LEGACY_NAMES + zoo.CATALOGUE_NAMES if f"legacy/{name}" in SOURCES]
    used = set().union(*(_layer_classes(build()) for build in builders),
                       *(_layer_classes(mann_edge.load_legacy(zoo.LEGACY / f"{name}.h5")) for name in legacy))
    missing = {cls.__name__ for cls in LOWERINGS if cls not in used}
    assert not missing, f"layers with a lowering but no model in the parity matrix: {sorted(missing)}"


def test_every_compact_op_is_in_the_parity_matrix(sources):
    zoo_sources = [name for name in SOURCES if name.startswith(("zoo/", "legacy/"))]
    used = {node.op for name in zoo_sources for node in sources(name).compact.nodes}
    assert set(OPS) <= used, f"ops no parity source uses: {sorted(set(OPS) - used)}"


@pytest.mark.parametrize("format", [name for name, f in FORMATS.items() if f.runs_here()])
def test_every_runtime_refuses_bad_inputs_alike(format, sources, tmp_path):
    """One input rule for every backend: ids outside the table (before any cast), NaN, empty batches."""
    model = sources("zoo/mixed")
    module = FORMATS[format].converter_module()
    session = mann_edge.runtime.load(module.export(model.compact, tmp_path / module.artifact_name()))
    # int64 2**32 + 1 and uint64 2**63 used to wrap to valid ids
    for bad, dtype in ((zoo.VOCAB + 5, "int32"), (-1, "int32"), (2**32 + 1, "int64"), (2**63, "uint64")):
        with pytest.raises(InputError, match=rf"Task 'text' input 'tokens'.*ids must be in \[0, {zoo.VOCAB}\)"):
            session.run("text", np.full((1, zoo.TOKENS), bad, dtype))
    image = np.zeros((1, 8, 8, 1), np.float32)
    image[0, 1, 1, 0] = np.nan
    with pytest.raises(InputError, match=r"Task 'vision' input 'image'.*NaN or infinite"):
        session.run("vision", image)
    with pytest.raises(InputError, match=r"Task 'vision': input 'image' holds an empty batch"):
        session.run("vision", image[:0])


@pytest.mark.parametrize("format", list(FORMATS))
def test_a_layer_a_format_cannot_express_is_named_with_the_format_at_convert_time(format, tmp_path):
    """Core ML holds tensors of rank 5 at most: a rank-6 Reshape is refused by Core ML alone, naming the layer."""
    import keras

    from mann_edge.errors import ConversionError

    x = keras.Input((32,), name="x")
    y = keras.layers.Dense(2, name="y")(keras.layers.Reshape((32,))(keras.layers.Reshape((2, 2, 2, 2, 2), name="deep")(x)))
    model = keras.Model(x, y)
    cm = mann_edge.compact(model)
    module = FORMATS[format].converter_module()
    if format != "coreml":
        path = module.export(cm, tmp_path / module.artifact_name())
        inputs = zoo.sample_batch(model, 2)[0]
        np.testing.assert_allclose(_runner(format, path)(cm.task_names[0], {"x": inputs})[0],
                                   zoo.keras_outputs(model, inputs)[0], atol=1e-5)
        return
    with pytest.raises(ConversionError, match=r"Core ML export cannot express layer 'deep' \(node 'deep', op reshape\)"):
        module.export(cm, tmp_path / module.artifact_name())


def test_tflite_keeps_a_sparse_conv3d_kernel_sparse_one_conv2d_per_depth_tap(tmp_path):
    """TFLite's converter encodes CONV_2D kernels sparse, never CONV_3D ones: a sparse conv3d is lowered per depth tap."""
    import keras

    keras.utils.set_random_seed(0)
    x = keras.Input((4, 6, 6, 8), name="volume")
    layer = keras.layers.Conv3D(16, 3, padding="same", name="conv3d")
    model = keras.Model(x, keras.layers.Flatten()(layer(x)))
    kernel = keras.ops.convert_to_numpy(layer.kernel)
    layer.kernel.assign(np.where(np.random.default_rng(0).random(kernel.shape) < 0.9, 0.0, kernel))
    cm = mann_edge.compact(model)
    module = FORMATS["tflite"].converter_module()
    path = module.export(cm, tmp_path / module.artifact_name())
    assert zoo.tflite_sparse_blocks(path) == [("FLOAT32", 1)] * 3  # one (3, 3, 8, 16) kernel per depth tap
    inputs = zoo.sample_batch(model, 2)[0]
    np.testing.assert_allclose(_runner("tflite", path)(cm.task_names[0], {"volume": inputs})[0],
                               zoo.keras_outputs(model, inputs)[0], atol=1e-5)
