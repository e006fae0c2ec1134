"""Hostile bundles for the hardening tests: a small model of every op, built with numpy only, and ways to damage it.

`every_op_model` needs neither Keras nor TensorFlow, so the fuzz test can run it in a fresh
interpreter under the compiled kernels (`python tests/hostile.py fuzz`), where a memory error
would kill the process instead of pytest.
"""

from __future__ import annotations

import json
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np

from mann_edge.graph.model import CompactModel, Node, Task, TensorSpec
from mann_edge.sparse import CSRWeight, encode_weight

# attribute values a crafted file may hold: wrong types, zeros, negatives, huge sizes, unknown names
ODD_VALUES = [0, -1, 1, 2, 3, 10**6, 2**40, 1.5, True, None, "bogus", "same", "valid", "relu", "", [], {}, [0, 1],
              [1], [1, 1], [2, 2], [3, 3], [1, 0], [10**6, 10**6], [2**40, 1], [-1], [2, -1], [1, 2, 3], [4, 4],
              {"name": "softmax", "axis": 5}, {"name": "glu"}, {"name": "nope"}, {"name": "relu", "max_value": "x"}]
ATTRIBUTE_KEYS = ["strides", "padding", "dilation", "pool_size", "activation", "axes", "keepdims", "shape", "axis",
                  "epsilon", "bogus"]


def _sparse(rng, shape, density, layout):
    array = (rng.normal(0, 1, shape) * (rng.random(shape) < density)).astype(np.float32)
    return CSRWeight.from_dense(array, layout)


def every_op_model(seed: int = 0) -> CompactModel:
    """Two tasks over an image, token ids and features through every op; CSR, 1x4-block and dense weights."""
    rng = np.random.default_rng(seed)
    image, tokens, feats = (TensorSpec("image", (None, 6, 6, 2)), TensorSpec("tokens", (None, 5), "int32"),
                            TensorSpec("feats", (None, 7)))
    blocks = np.repeat(rng.random((13, 16)) < 0.4, 4, axis=0)[:49] * rng.normal(0, 1, (49, 16))
    weights = {
        "conv/kernel": _sparse(rng, (3, 3, 2, 4), 0.5, "oi"),
        "conv/bias": rng.normal(0, 1, 4).astype(np.float32),
        "ss/scale": rng.uniform(0.5, 1.5, 4).astype(np.float32),
        "ss/shift": rng.normal(0, 1, 4).astype(np.float32),
        "emb/table": encode_weight(rng.normal(0, 1, (11, 6)).astype(np.float32) * (rng.random((11, 6)) < 0.3)),
        "ln/gamma": rng.uniform(0.5, 1.5, 6).astype(np.float32),
        "ln/beta": rng.normal(0, 1, 6).astype(np.float32),
        "d1/kernel": CSRWeight.from_dense(blocks.astype(np.float32), "oi"),
        "d1/bias": rng.normal(0, 1, 16).astype(np.float32),
        "d2/kernel": rng.normal(0, 1, (16, 8)).astype(np.float32),
        "d2/bias": rng.normal(0, 1, 8).astype(np.float32),
        "d3/kernel": _sparse(rng, (8, 3), 0.6, "oi"),
        "d3/bias": rng.normal(0, 1, 3).astype(np.float32),
    }
    window = {"strides": [2, 2], "padding": "valid"}
    nodes = [
        Node("conv", "conv2d", ("image",), {"kernel": "conv/kernel", "bias": "conv/bias"},
             {"strides": [1, 1], "padding": "same", "dilation": [1, 1], "activation": "relu"}, (None, 6, 6, 4)),
        Node("pool", "max_pool2d", ("conv",), {}, {"pool_size": [2, 2], **window}, (None, 3, 3, 4)),
        Node("avg", "avg_pool2d", ("pool",), {}, {"pool_size": [2, 2], "strides": [1, 1], "padding": "same"},
             (None, 3, 3, 4)),
        Node("sum", "add", ("pool", "avg"), {}, {}, (None, 3, 3, 4)),
        Node("ss", "scale_shift", ("sum",), {"scale": "ss/scale", "shift": "ss/shift"}, {}, (None, 3, 3, 4)),
        Node("flat", "flatten", ("ss",), {}, {}, (None, 36)),
        Node("emb", "embedding", ("tokens",), {"table": "emb/table"}, {}, (None, 5, 6)),
        Node("ln", "layer_norm", ("emb",), {"gamma": "ln/gamma", "beta": "ln/beta"}, {"axes": [2], "epsilon": 1e-3},
             (None, 5, 6)),
        Node("gp", "global_avg_pool", ("ln",), {}, {"axes": [1], "keepdims": False}, (None, 6)),
        Node("cat", "concat", ("flat", "gp", "feats"), {}, {"axis": 1}, (None, 49)),
        Node("d1", "dense", ("cat",), {"kernel": "d1/kernel", "bias": "d1/bias"}, {"activation": "relu"}, (None, 16)),
        Node("d2", "dense", ("d1",), {"kernel": "d2/kernel", "bias": "d2/bias"}, {"activation": "tanh"}, (None, 8)),
        Node("rs", "reshape", ("d2",), {}, {"shape": [2, -1]}, (None, 2, 4)),
        Node("act", "activation", ("rs",), {}, {"activation": {"name": "softmax", "axis": -1}}, (None, 2, 4)),
        Node("fl2", "flatten", ("act",), {}, {}, (None, 8)),
        Node("zero", "zeros_like", ("fl2",), {}, {}, (None, 8)),
        Node("out", "add", ("fl2", "zero"), {}, {}, (None, 8)),
        Node("d3", "dense", ("out",), {"kernel": "d3/kernel", "bias": "d3/bias"}, {"activation": "softmax"}, (None, 3)),
    ]
    tasks = [
        Task("all", (image, tokens, feats), (TensorSpec("probabilities", (None, 3)),), ("d3",)),
        Task("text", (tokens,), (TensorSpec("pooled", (None, 6)),), ("gp",)),
    ]
    return CompactModel([image, tokens, feats], nodes, tasks, weights)


def bundle_bytes(model: CompactModel, tmp: Path) -> dict[str, bytes]:
    """The zip entries (manifest, weights) of ``model`` saved as a bundle."""
    path = Path(model.save(tmp / "model.mann", force=True))
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def write_zip(path: Path, entries, *, compression=zipfile.ZIP_STORED) -> Path:
    """A zip of ``entries`` ((name, bytes) pairs or a dict; a name may repeat)."""
    items = entries.items() if isinstance(entries, dict) else entries
    with zipfile.ZipFile(path, "w", compression=compression) as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about a repeated name: here that is the point
        for name, data in items:
            archive.writestr(name, data)
    return path


def sample_feed(task: Task, batch: int, rows: dict[str, int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    feed = {}
    for spec in task.inputs:
        shape = tuple(batch if d is None else d for d in spec.shape)
        if spec.dtype.startswith("int"):
            feed[spec.name] = rng.integers(0, max(1, rows.get(spec.name, 2)), shape).astype(spec.dtype)
        else:
            feed[spec.name] = rng.normal(0, 1, shape).astype(spec.dtype)
    return feed


# -- the fuzz: valid bundles with a shape or an attribute changed, loaded and run --------------------


def mutated(model: CompactModel, draw, st) -> CompactModel:
    """``model`` with one to three things changed by hypothesis draws: a weight's shape, an attribute, a declared shape."""
    nodes, weights, inputs = list(model.nodes), dict(model.weights), list(model.inputs)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["weight", "attribute", "drop attribute", "input shape", "node shape"]))
        if kind == "weight":
            key = draw(st.sampled_from(sorted(weights)))
            shape = tuple(draw(st.lists(st.integers(0, 9), min_size=1, max_size=4)))
            rng = np.random.default_rng(draw(st.integers(0, 2**16)))
            array = (rng.normal(0, 1, shape) * (rng.random(shape) < 0.5)).astype(np.float32)
            form = draw(st.sampled_from(["dense", "oi", "rows"]))
            weights[key] = array if form == "dense" or array.size == 0 else CSRWeight.from_dense(array, form)
        elif kind in ("attribute", "drop attribute"):
            i = draw(st.integers(0, len(nodes) - 1))
            node = nodes[i]
            attrs = dict(node.attrs)
            if kind == "attribute":
                attrs[draw(st.sampled_from(ATTRIBUTE_KEYS))] = draw(st.sampled_from(ODD_VALUES))
            elif attrs:
                attrs.pop(draw(st.sampled_from(sorted(attrs))))
            nodes[i] = Node(node.name, node.op, node.inputs, node.weights, attrs, node.shape, node.dtype)
        elif kind == "input shape":
            i = draw(st.integers(0, len(inputs) - 1))
            dims = draw(st.lists(st.integers(0, 12), min_size=0, max_size=4))
            inputs[i] = TensorSpec(inputs[i].name, (None, *dims), inputs[i].dtype)
        else:
            i = draw(st.integers(0, len(nodes) - 1))
            node = nodes[i]
            shape = (None, *draw(st.lists(st.integers(0, 12), min_size=0, max_size=3)))
            nodes[i] = Node(node.name, node.op, node.inputs, node.weights, node.attrs, shape, node.dtype)
    by_name = {spec.name: spec for spec in inputs}
    tasks = [Task(t.name, tuple(by_name[s.name] for s in t.inputs), t.outputs, t.output_tensors) for t in model.tasks]
    return CompactModel(inputs, nodes, tasks, weights)


def load_and_run(model: CompactModel, folder: Path) -> str:
    """Saves ``model``, loads it through the runtime and runs every task at batch 1 and 3.

    Returns what happened ("refused at load", "refused at run", "ran"); anything but a
    mann-edge error naming the file (at load) or the task (at run) fails.
    """
    import mann_edge
    from mann_edge.errors import BundleError, InputError

    path = Path(model.save(folder / "fuzzed.mann", force=True))
    try:
        session = mann_edge.runtime.load(path, threads=1)
    except BundleError as error:
        assert str(path) in str(error) and "\n" not in str(error), str(error)
        return "refused at load"
    outcome = "ran"
    rows = {spec.name: next((v for t in session.tasks for k, v in t.id_limits.items() if k == spec.name), 2)
            for spec in session.model.inputs}
    for task in session.tasks:
        for batch in (1, 3):
            feed = sample_feed(task, batch, rows)
            try:
                outputs = session.run(task.name, feed)
            except InputError as error:
                assert repr(task.name) in str(error) or "node '" in str(error), str(error)
                outcome = "refused at run"
                continue
            for spec, output in zip(task.outputs, outputs):
                assert output.ndim == len(spec.shape) and output.shape[0] == batch, (spec, output.shape)
                assert all(d is None or d == a for d, a in zip(spec.shape, output.shape)), (spec, output.shape)
    return outcome


FUZZ_EXAMPLES = 120


def fuzz(folder: Path) -> dict[str, int]:
    """Runs the mutation fuzz (hypothesis, derandomized) in this process; returns how often each outcome came."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    base = every_op_model()
    outcomes: dict[str, int] = {}

    @settings(max_examples=FUZZ_EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def one(data):
        outcome = load_and_run(mutated(base, data.draw, st), folder)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    one()
    return outcomes


if __name__ == "__main__" and sys.argv[1:2] == ["fuzz"]:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        print(json.dumps(fuzz(Path(folder))))
