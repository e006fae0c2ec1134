"""Crafted files and inputs (issue 12): memory safety, resource limits, malformed structure, silent wrong answers,
interrupts and loose arguments. docs/bad-input.md tables each case with its message.

Every case is refused with one line naming the file and the field, tensor or node, in the Python API and the
command, under both kernel sets of the bundle runtime (`MANN_EDGE_KERNELS`). The compiled (numba) cases run in
a fresh interpreter where a memory error could kill the process rather than pytest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

import hostile
import mann_edge
from mann_edge import safe_json, safetensors_codec
from mann_edge.bundle import MANIFEST, WEIGHTS
from mann_edge.cli import main
from mann_edge.errors import BundleError, InputError, LegacyFormatError, MannEdgeError
from mann_edge.graph import plan
from mann_edge.graph.model import CompactModel, Node, Task, TensorSpec
from mann_edge.runtime import kernels
from mann_edge.sparse import CSRWeight

TESTS = Path(__file__).resolve().parent
numba_only = pytest.mark.skipif(kernels._numba_import_error() is not None, reason="numba is not installed")
BACKENDS = ["numpy", pytest.param("numba", marks=numba_only)]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, request.param)
    return request.param


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    *progress, last = err.splitlines()
    assert last.startswith("mann-edge: error: ") and "Traceback" not in err, err
    assert all(line.startswith(("[", "    ")) for line in progress), err
    return last


def _edited(model: CompactModel, *, nodes=None, weights=None, inputs=None, tasks=None) -> CompactModel:
    """``model`` with some of its parts replaced (nodes and weights by name)."""
    by_name = {node.name: node for node in model.nodes}
    by_name.update(nodes or {})
    return CompactModel(inputs or model.inputs, [by_name[node.name] for node in model.nodes], tasks or model.tasks,
                        {**model.weights, **(weights or {})})


def _attrs(model: CompactModel, node: str, **changes) -> dict:
    """The node ``node`` with its attributes changed (a value of ... removes the attribute)."""
    old = next(n for n in model.nodes if n.name == node)
    attrs = {k: v for k, v in {**old.attrs, **changes}.items() if v is not ...}
    return {node: Node(old.name, old.op, old.inputs, old.weights, attrs, old.shape, old.dtype)}


# -- 1. shapes checked against ops when a bundle loads: no kernel sees inconsistent shapes --------------------


def _short_bias_model(rows: int) -> CompactModel:
    """A dense node whose bias (1 value) is shorter than its CSR kernel's rows: the compiled kernels read bias[i]."""
    x = TensorSpec("x", (None, 4))
    kernel = CSRWeight((4, rows), "oi", np.zeros(rows + 1, np.uint8), np.zeros(0, np.uint8), np.zeros(0, np.float32))
    node = Node("dense", "dense", ("x",), {"kernel": "k", "bias": "b"}, {"activation": "linear"}, (None, rows))
    return CompactModel([x], [node], [Task("t", (x,), (TensorSpec("y", (None, rows)),), ("dense",))],
                        {"k": kernel, "b": np.zeros(1, np.float32)})


SHORT_BIAS_RUN = """
import sys
sys.path.insert(0, {tests!r})
import numpy as np, mann_edge
from mann_edge.errors import BundleError
try:
    session = mann_edge.runtime.load({path!r}, threads=1)
except BundleError as error:
    print("refused:", error)
else:
    print("ran:", np.count_nonzero(session.run("t", np.zeros((1, 4), np.float32))[0]), "nonzero outputs of zero inputs")
"""


@pytest.mark.parametrize("rows", [64, 1 << 24])
def test_a_bias_shorter_than_the_kernel_is_refused_at_load(rows, backend, tmp_path, capsys):
    path = _short_bias_model(rows).save(tmp_path / "evil.mann")
    # before the fix: heap bytes at 64 rows, a segfault at 16M (numba); so it runs in a fresh interpreter
    run = subprocess.run([sys.executable, "-c", SHORT_BIAS_RUN.format(tests=str(TESTS), path=str(path))],
                         capture_output=True, text=True, env={**os.environ, kernels.KERNELS_ENV: backend}, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("refused:"), run.stdout
    assert "evil.mann" in run.stdout and "node 'dense'" in run.stdout and f"bias must have shape [{rows}]" in run.stdout
    for argv in (["verify", str(path), "--against", str(path)], ["convert", str(path), "-o", str(tmp_path / "out")]):
        err = _one_line_error(capsys, argv)
        assert "evil.mann" in err and "node 'dense'" in err
    assert not (tmp_path / "out").exists()


def test_a_model_built_in_memory_with_a_short_bias_is_refused_before_the_kernel_runs(backend):
    # a model that never went through a file: the executor checks the shapes of each new batch itself
    from mann_edge.runtime.bundle import BundleSession

    session = BundleSession("memory.mann", model=_short_bias_model(64), threads=1)
    with pytest.raises(InputError, match=r"Task 't': Op dense \(node 'dense'\): bias must have shape \[64\]"):
        session.run("t", np.zeros((1, 4), np.float32))


def _rows_layout(model):
    kernel = model.weights["d3/kernel"]
    return {"d3/kernel": CSRWeight.from_dense(kernel.to_dense(), "rows")}


INCONSISTENT = {
    # case: (edit of the every-op model, what the message must say)
    "conv kernel channels": (lambda m: _edited(m, weights={"conv/kernel": CSRWeight.from_dense(
        np.ones((3, 3, 5, 4), np.float32), "oi")}), r"node 'conv'.*takes 5 input channels"),
    "conv bias": (lambda m: _edited(m, weights={"conv/bias": np.zeros(3, np.float32)}), r"node 'conv'.*bias must have shape \[4\]"),
    "dense kernel width": (lambda m: _edited(m, weights={"d2/kernel": np.zeros((15, 8), np.float32)}),
                           r"node 'd2'.*takes 15 input features"),
    "csr kernel layout": (lambda m: _edited(m, weights=_rows_layout(m)), r"node 'd3'.*layout 'oi'"),
    "window larger than the input": (lambda m: _edited(m, nodes=_attrs(m, "pool", pool_size=[7, 7])),
                                     r"node 'pool'.*does not fit an input of shape \(1, 6, 6, 4\)"),
    "scale length": (lambda m: _edited(m, weights={"ss/scale": np.ones(3, np.float32)}), r"node 'ss'.*'scale' must have shape \[4\]"),
    "layer norm gamma": (lambda m: _edited(m, weights={"ln/gamma": np.ones(5, np.float32)}), r"node 'ln'.*'gamma' must hold 6"),
    "embedding table rank": (lambda m: _edited(m, weights={"emb/table": np.ones(11, np.float32)}),
                             r"node 'emb'.*'table' must be rank 2"),
    "reshape": (lambda m: _edited(m, nodes=_attrs(m, "rs", shape=[3, 3])), r"node 'rs'.*cannot reshape"),
    "concat": (lambda m: _edited(m, inputs=[m.inputs[0], m.inputs[1], TensorSpec("feats", (None, 7, 2))]),
               r"node 'cat'.*do not agree"),
    "declared node shape": (lambda m: _edited(m, nodes={"d1": Node("d1", "dense", ("cat",), {"kernel": "d1/kernel",
                            "bias": "d1/bias"}, {"activation": "relu"}, (None, 17))}), r"node 'd1'.*declares shape \[None, 17\]"),
    "task output shape": (lambda m: _edited(m, tasks=[Task("all", m.tasks[0].inputs, (TensorSpec("p", (None, 4)),),
                          ("d3",)), m.tasks[1]]), r"output 'p' declares shape \[None, 4\]"),
    "glu on an odd axis": (lambda m: _edited(m, nodes=_attrs(m, "d3", activation={"name": "glu", "axis": -1})),
                           r"node 'd3'.*'glu'.*odd"),
}


@pytest.mark.parametrize("case", sorted(INCONSISTENT))
def test_inconsistent_shapes_are_refused_naming_the_node(case, tmp_path):
    edit, message = INCONSISTENT[case]
    path = edit(hostile.every_op_model()).save(tmp_path / "bad.mann")
    with pytest.raises(BundleError, match=message) as raised:
        mann_edge.load_compact(path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_the_every_op_model_loads_and_runs_the_same_on_both_kernel_sets(backend, tmp_path):
    model = hostile.every_op_model()
    session = mann_edge.runtime.load(model.save(tmp_path / "ok.mann"), threads=1)
    for task in model.tasks:
        feed = hostile.sample_feed(task, 3, {"tokens": 11})
        for got, want in zip(session.run(task.name, feed), model.run(task.name, feed)):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_fuzzed_shapes_and_attributes_load_or_fail_cleanly_with_the_scipy_kernels(tmp_path, monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, "numpy")
    outcomes = hostile.fuzz(tmp_path)
    assert sum(outcomes.values()) == hostile.FUZZ_EXAMPLES and outcomes.get("refused at load") and outcomes.get("ran")


@numba_only
def test_fuzzed_shapes_and_attributes_load_or_fail_cleanly_with_the_compiled_kernels():
    # a fresh interpreter: an out-of-bounds read in a compiled kernel would kill it, not pytest
    run = subprocess.run([sys.executable, str(TESTS / "hostile.py"), "fuzz"], capture_output=True, text=True,
                         env={**os.environ, kernels.KERNELS_ENV: "numba"}, timeout=600, cwd=TESTS)
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-3000:]}"
    outcomes = json.loads(run.stdout.strip().splitlines()[-1])
    assert sum(outcomes.values()) == hostile.FUZZ_EXAMPLES and outcomes.get("refused at load") and outcomes.get("ran")


# -- 2. decompression and allocation limits ---------------------------------------------------------------------


def _peak_bytes(function) -> int:
    tracemalloc.start()
    try:
        function()
    except MannEdgeError:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def _bundle(tmp_path, manifest: dict, blob: bytes, name="crafted.mann", compression=zipfile.ZIP_STORED) -> Path:
    manifest = {**manifest, "weights_file": {"name": WEIGHTS, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}}
    return hostile.write_zip(tmp_path / name, {MANIFEST: json.dumps(manifest).encode(), WEIGHTS: blob},
                             compression=compression)


def test_a_deflate_bomb_in_the_weights_is_refused_before_it_is_inflated(tmp_path):
    model = hostile.every_op_model()
    entries = hostile.bundle_bytes(model, tmp_path)
    arrays, _ = safetensors_codec.decode(entries[WEIGHTS])
    bomb = {**arrays, "padding": np.zeros(64 * 2**20, np.uint8)}  # 64 MiB of zeros deflate to about 64 KiB
    blob = safetensors_codec.encode(bomb)
    path = _bundle(tmp_path, json.loads(entries[MANIFEST]), blob, "bomb.mann", zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 1 << 20
    with pytest.raises(BundleError, match=r"bomb.mann: entry 'weights.safetensors' inflates from \d+ to \d+ bytes"):
        mann_edge.load_compact(path)
    assert _peak_bytes(lambda: mann_edge.load_compact(path)) < 4 * path.stat().st_size + (1 << 20)


def test_a_tiny_bundle_declaring_a_huge_table_is_refused_naming_it(tmp_path, capsys):
    # 250M rows stored as 'oi' CSR: 9 indptr entries and no values, 8 GB once made dense
    tokens = TensorSpec("tokens", (None, 3), "int32")
    table = CSRWeight((250_000_000, 8), "oi", np.zeros(9, np.uint8), np.zeros(0, np.uint32), np.zeros(0, np.float32))
    node = Node("emb", "embedding", ("tokens",), {"table": "emb/table"}, {}, (None, 3, 8))
    model = CompactModel([tokens], [node], [Task("t", (tokens,), (TensorSpec("y", (None, 3, 8)),), ("emb",))],
                         {"emb/table": table})
    path = model.save(tmp_path / "tiny.mann")
    assert Path(path).stat().st_size < 2000
    with pytest.raises(BundleError, match=r"tiny.mann: weights\['emb/table'\] declares shape \[250000000, 8\] \(7.5 GiB"):
        mann_edge.load_compact(path)
    assert _peak_bytes(lambda: mann_edge.load_compact(path)) < 1 << 20
    err = _one_line_error(capsys, ["inspect", str(path)])
    assert "tiny.mann" in err and "emb/table" in err


def test_a_window_whose_intermediates_would_take_terabytes_is_refused_naming_the_node(tmp_path):
    model = hostile.every_op_model()
    edited = _edited(model, nodes=_attrs(model, "avg", pool_size=[10**6, 10**6]))
    path = edited.save(tmp_path / "window.mann")
    with pytest.raises(BundleError, match=r"window.mann: Op avg_pool2d \(node 'avg'\): .* would take [\d.]+ [TP]iB, "
                                          r"more than the 1.0 GiB a run may allocate"):
        mann_edge.load_compact(path)
    assert _peak_bytes(lambda: mann_edge.load_compact(path)) < 1 << 20


def test_a_batch_whose_intermediates_exceed_the_limit_is_refused_before_running(backend, monkeypatch, tmp_path):
    model = hostile.every_op_model()
    session = mann_edge.runtime.load(model.save(tmp_path / "ok.mann"), threads=1)
    monkeypatch.setattr(plan, "MAX_TENSOR_BYTES", 100_000)  # a small limit, so a batch of 64 crosses it
    feed = hostile.sample_feed(model.task("all"), 64, {"tokens": 11})
    for run in (session.run, model.run):
        with pytest.raises(InputError, match=r"Task 'all': Op conv2d \(node 'conv'\): .* would take .* more than"):
            run("all", feed)
    assert session.run("all", hostile.sample_feed(model.task("all"), 1, {"tokens": 11}))[0].shape == (1, 3)


def test_verification_does_not_draw_sample_inputs_beyond_the_limit():
    from mann_edge.converters.validation import sample_inputs

    wide = TensorSpec("x", (None, 2**27))  # 512 MiB per example: loads, but 8 examples would take 8 GiB as float64
    node = Node("act", "activation", ("x",), {}, {"activation": "relu"}, (None, 2**27))
    model = CompactModel([wide], [node], [Task("t", (wide,), (TensorSpec("y", (None, 2**27)),), ("act",))], {})
    plan.check_model(model)
    with pytest.raises(InputError, match=r"Task 't' input 'x' of shape \[8, 134217728\] would take 8.0 GiB"):
        sample_inputs(model, "t", 8)


# -- 3. malformed structure --------------------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


def test_deeply_nested_json_is_refused_by_every_reader(tmp_path):
    with pytest.raises(ValueError, match="manifest.json is nested deeper than 64 levels"):
        safe_json.loads(DEEP, "manifest.json")
    with pytest.raises(ValueError, match="nested deeper than 64 levels"):
        safe_json.loads('{"a": ' * 70 + "1" + "}" * 70, "x")
    entries = hostile.bundle_bytes(hostile.every_op_model(), tmp_path)
    manifest = json.loads(entries[MANIFEST])
    manifest["nodes"][0]["attrs"]["deep"] = "@"
    text = json.dumps(manifest).replace('"@"', DEEP)
    path = hostile.write_zip(tmp_path / "deep.mann", {MANIFEST: text.encode(), WEIGHTS: entries[WEIGHTS]})
    with pytest.raises(BundleError, match=r"deep.mann: manifest.json is nested deeper than 64 levels"):
        mann_edge.load_compact(path)
    header = DEEP.encode()
    with pytest.raises(ValueError, match="safetensors header is nested deeper"):
        safetensors_codec.decode(len(header).to_bytes(8, "little") + header)


def test_deeply_nested_export_metadata_is_refused_naming_the_file(tmp_path):
    from mann_edge.formats import METADATA_MANIFEST
    from mann_edge.runtime import coreml, litert, onnx

    with pytest.raises(MannEdgeError, match=r"model.tflite: metadata entry 'mann_edge_manifest' is nested deeper"):
        litert._manifest_of(tmp_path / "model.tflite", {METADATA_MANIFEST: DEEP.encode()})
    with pytest.raises(BundleError, match=r"digits.mlpackage: metadata 'mann_edge_manifest' is nested deeper"):
        coreml._json(DEEP, tmp_path / "digits.mlpackage", METADATA_MANIFEST)
    onnx_file = _onnx_with_metadata(tmp_path / "deep.onnx", {METADATA_MANIFEST: DEEP, "mann_edge_task": "t"})
    with pytest.raises(MannEdgeError, match=r"deep.onnx: metadata entry 'mann_edge_manifest' is nested deeper"):
        onnx.OnnxSession(onnx_file)


def _onnx_with_metadata(path: Path, metadata: dict) -> Path:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    proto = helper.make_model(graph)
    helper.set_model_props(proto, metadata)
    path.write_bytes(proto.SerializeToString())
    return path


def test_duplicate_zip_entries_and_json_keys_are_refused(tmp_path):
    entries = hostile.bundle_bytes(hostile.every_op_model(), tmp_path)
    other = json.loads(entries[MANIFEST])
    other["tasks"] = other["tasks"][:1]
    twice = [(MANIFEST, entries[MANIFEST]), (WEIGHTS, entries[WEIGHTS]), (MANIFEST, json.dumps(other).encode())]
    with pytest.raises(BundleError, match=r"twice.mann has two entries named 'manifest.json'"):
        mann_edge.load_compact(hostile.write_zip(tmp_path / "twice.mann", twice))
    text = entries[MANIFEST].decode().replace('"format":', '"tasks": [], "format":', 1)
    with pytest.raises(BundleError, match=r"keys.mann: manifest.json: key 'tasks' appears twice in one object"):
        mann_edge.load_compact(hostile.write_zip(tmp_path / "keys.mann", {MANIFEST: text.encode(), WEIGHTS: entries[WEIGHTS]}))
    header = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {}}'
    with pytest.raises(ValueError, match="safetensors header: key 'w' appears twice"):
        safetensors_codec.decode(len(header).to_bytes(8, "little") + header + b"\0" * 4)


def _header_offset(data: bytes, signature: bytes, nth: int) -> int:
    """Where the ``nth`` zip header with ``signature`` starts (entries in order: the manifest, then the weights)."""
    at = -1
    for _ in range(nth + 1):
        at = data.index(signature, at + 1)
    return at


@pytest.mark.parametrize("entry", [MANIFEST, WEIGHTS])
@pytest.mark.parametrize("flags", [0x1, 0x20, 0x40], ids=["encrypted", "patched data", "strong encryption"])
def test_zip_entries_claiming_encryption_or_patches_are_refused(flags, entry, tmp_path):
    # damaged headers found by the damage fuzz: zipfile raised RuntimeError / NotImplementedError for these; the
    # weights (stored) are read without zipfile, so they are checked on their own
    entries = hostile.bundle_bytes(hostile.every_op_model(), tmp_path)
    data = bytearray(hostile.write_zip(tmp_path / "clean.mann", entries).read_bytes())
    # set the flags in the entry's local header (offset 6) and central record (offset 8)
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = _header_offset(data, signature, [MANIFEST, WEIGHTS].index(entry)) + offset
        data[at:at + 2] = (int.from_bytes(data[at:at + 2], "little") | flags).to_bytes(2, "little")
    path = tmp_path / "flags.mann"
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"flags.mann: cannot read {entry} .*truncated or corrupt"):
        mann_edge.load_compact(path)


def test_a_weights_entry_whose_local_header_names_another_file_is_refused(tmp_path):
    entries = hostile.bundle_bytes(hostile.every_op_model(), tmp_path)
    data = bytearray(hostile.write_zip(tmp_path / "clean.mann", entries).read_bytes())
    at = _header_offset(data, b"PK\x03\x04", 1) + 30  # the weights' local header, then its name
    data[at:at + len(WEIGHTS)] = WEIGHTS.replace("weights", "weightz").encode()
    path = tmp_path / "renamed.mann"
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"renamed.mann: cannot read weights.safetensors \(its local zip header "
                                          r"names another entry\)"):
        mann_edge.load_compact(path)


def test_a_weights_entry_running_past_the_end_of_the_file_is_refused(tmp_path):
    entries = hostile.bundle_bytes(hostile.every_op_model(), tmp_path)
    claimed = len(entries[WEIGHTS]) + 10**6
    manifest = json.loads(entries[MANIFEST])
    manifest["weights_file"]["bytes"] = claimed
    data = bytearray(hostile.write_zip(tmp_path / "clean.mann", {MANIFEST: json.dumps(manifest).encode(),
                                                                  WEIGHTS: entries[WEIGHTS]}).read_bytes())
    at = _header_offset(data, b"PK\x01\x02", 1)  # the weights' central record: sizes at offsets 20 and 24
    data[at + 20:at + 28] = claimed.to_bytes(4, "little") * 2
    path = tmp_path / "short.mann"
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"short.mann: cannot read weights.safetensors \(it ends after \d+ of its "
                                          rf"{claimed} bytes\); the file is truncated or corrupt"):
        mann_edge.load_compact(path)


def test_weights_damaged_past_reading_are_reported_as_not_matching_their_hash(tmp_path):
    # the hash is checked beside the arrays (on a second thread); its verdict is the one reported
    entries = hostile.bundle_bytes(hostile.every_op_model(), tmp_path)
    weights = bytearray(entries[WEIGHTS])
    weights[:8] = (len(weights) * 2).to_bytes(8, "little")  # a safetensors header longer than the file
    path = hostile.write_zip(tmp_path / "damaged.mann", {MANIFEST: entries[MANIFEST], WEIGHTS: bytes(weights)})
    with pytest.raises(BundleError, match=r"damaged.mann: weights.safetensors does not match the manifest's sha256"):
        mann_edge.load_compact(path)


ATTRIBUTE_CASES = {
    # case: (node, attribute changes, what the message must say)
    "strides 0": ("pool", {"strides": [0, 2]}, r"attribute 'strides' must be 2 positive ints. Received: \[0, 2\]"),
    "missing strides": ("conv", {"strides": ...}, r"attribute 'strides' is missing; it must be 2 positive ints"),
    "padding bogus": ("avg", {"padding": "bogus"}, r"attribute 'padding' must be one of \['same', 'valid'\]. Received: 'bogus'"),
    "unknown activation": ("d1", {"activation": "swoosh"}, r"attribute 'activation' must be an activation"),
    "activation axis out of range": ("act", {"activation": {"name": "softmax", "axis": 5}}, r"axis 5 is outside"),
    "unknown attribute": ("d2", {"kernel_size": 3}, r"Received unknown attributes: \['kernel_size'\]"),
    "pool size 0": ("pool", {"pool_size": [0, 2]}, r"attribute 'pool_size' must be 2 positive ints"),
    "epsilon NaN": ("ln", {"epsilon": float("nan")}, r"attribute 'epsilon' must be a finite number >= 0"),
    "axes include the batch": ("gp", {"axes": [0]}, r"attribute 'axes' must be distinct axes in \[1, 7\]"),
}


@pytest.mark.parametrize("case", sorted(ATTRIBUTE_CASES))
def test_attributes_are_checked_at_load_naming_the_node(case, tmp_path):
    node, changes, message = ATTRIBUTE_CASES[case]
    model = hostile.every_op_model()
    path = _edited(model, nodes=_attrs(model, node, **changes)).save(tmp_path / "attrs.mann")
    with pytest.raises(BundleError, match=rf"attrs.mann: (nodes\[\d+\] )?Op \w+ \(node '{node}'\).*{message}"):
        mann_edge.load_compact(path)


def test_a_task_with_no_inputs_or_missing_ones_is_refused(tmp_path):
    model = hostile.every_op_model()
    entries = hostile.bundle_bytes(model, tmp_path)
    manifest = json.loads(entries[MANIFEST])
    manifest["tasks"][1]["inputs"] = []
    path = hostile.write_zip(tmp_path / "none.mann", {MANIFEST: json.dumps(manifest).encode(), WEIGHTS: entries[WEIGHTS]})
    with pytest.raises(BundleError, match=r"none.mann: tasks\[1\].inputs is empty; a task needs at least one input"):
        mann_edge.load_compact(path)
    manifest["tasks"][0]["inputs"] = ["image", "feats"]
    manifest["tasks"][1]["inputs"] = ["tokens"]
    path = hostile.write_zip(tmp_path / "lacks.mann", {MANIFEST: json.dumps(manifest).encode(), WEIGHTS: entries[WEIGHTS]})
    with pytest.raises(BundleError, match=r"lacks.mann: tasks\[0\].inputs lacks \['tokens'\]"):
        mann_edge.load_compact(path)


# -- the legacy reader ----------------------------------------------------------------------------------------


def _legacy(tmp_path, name, edit) -> Path:
    from test_legacy import _rewrite

    import zoo

    path = tmp_path / f"{name}.h5"
    _rewrite(zoo.LEGACY / "mann_mlp.h5", path, edit, lambda weights: weights)
    return path


def _first_of(config, class_name):
    return next(layer for layer in config["config"]["layers"] if layer["class_name"] == class_name)


LEGACY_CASES = {
    "no class_name": (lambda c: c["config"]["layers"][2].pop("class_name"), r"layer 'masked_dense' has no class_name"),
    "config not an object": (lambda c: c["config"]["layers"][2].update(config=[1, 2]),
                             r"layer 'masked_dense': config must be an object. Received: list"),
    "selector index out of range": (lambda c: _first_of(c, "SelectorLayer")["config"].update(sel_index=7),
                                    r"layer 'selector_layer' \(SelectorLayer\) cannot be applied to its inputs: .*"
                                    r"selects input 7 of 2"),
    "units 2**40": (lambda c: _first_of(c, "MaskedDense")["config"].update(units=2**40),
                    r"layer 'masked_dense' \(MaskedDense\) has units=1099511627776, beyond the \d+ weight values"),
    "layers not a list": (lambda c: c["config"].update(layers=5), r"model_config.config.layers must be a list"),
}


@pytest.mark.parametrize("case", sorted(LEGACY_CASES))
def test_a_malformed_legacy_config_is_refused_naming_the_file_and_layer(case, tmp_path, capsys):
    edit, message = LEGACY_CASES[case]
    path = _legacy(tmp_path, "bad", edit)
    with pytest.raises(LegacyFormatError, match=rf"bad.h5: {message}"):
        mann_edge.load_legacy(path)
    err = _one_line_error(capsys, ["inspect", str(path)])
    assert "bad.h5" in err and re.search(message, err)


def test_a_deeply_nested_legacy_config_is_refused(tmp_path):
    import h5py

    path = tmp_path / "deep.h5"
    with h5py.File(path, "w") as handle:
        handle.attrs["model_config"] = DEEP
    with pytest.raises(LegacyFormatError, match=r"deep.h5: model_config is nested deeper than 64 levels"):
        mann_edge.load_legacy(path)


# -- 4. silent wrong answers: ids, NaN, empty batches --------------------------------------------------------


def _text_runs(model, tmp_path):
    """The ways to run the text task here: the reference, and the bundle runtime (whichever kernels are set)."""
    session = mann_edge.runtime.load(model.save(tmp_path / "ids.mann", force=True), threads=1)
    return {"reference": model.run, "bundle": session.run}


@pytest.mark.parametrize("ids", [np.array([[2**32 + 1] * 5], np.int64), np.array([[2**63] * 5], np.uint64),
                                 np.array([[-1, 0, 0, 0, 0]]), np.array([[11, 0, 0, 0, 0]])],
                         ids=["int64 2**32+1", "uint64 2**63", "negative", "one past the table"])
def test_ids_outside_the_table_are_refused_before_any_cast(ids, backend, tmp_path):
    model = hostile.every_op_model()
    for name, run in _text_runs(model, tmp_path).items():
        with pytest.raises(InputError, match=r"Task 'text' input 'tokens'.*ids must be in \[0, 11\)"):
            run("text", ids)
    assert model.task("text").id_limits == {"tokens": 11}


@pytest.mark.parametrize("value", [np.nan, np.inf, 1e300])
def test_non_finite_float_inputs_are_refused_on_every_backend(value, backend, tmp_path):
    model = hostile.every_op_model()
    session = mann_edge.runtime.load(model.save(tmp_path / "nan.mann"), threads=1)
    feed = hostile.sample_feed(model.task("all"), 2, {"tokens": 11})
    feed["image"] = feed["image"].astype(np.float64)
    feed["image"][1, 2, 3, 0] = value
    for run in (model.run, session.run):
        with pytest.raises(InputError, match=r"Task 'all' input 'image'.*holds 1 NaN or infinite value"):
            run("all", feed)


def test_an_empty_batch_is_refused_on_every_backend(backend, tmp_path):
    model = hostile.every_op_model()
    session = mann_edge.runtime.load(model.save(tmp_path / "empty.mann"), threads=1)
    for run in (model.run, session.run):
        with pytest.raises(InputError, match=r"Task 'text': input 'tokens' holds an empty batch"):
            run("text", np.zeros((0, 5), np.int32))


# -- 5. verification before the final name, interrupts ------------------------------------------------------


def test_verification_runs_on_the_staged_file_before_it_takes_its_final_name(tmp_path, monkeypatch):
    from mann_edge.converters import bundle as bundle_export

    seen = []
    real_validate = bundle_export.validate

    def validate(model, path, **kwargs):
        seen.append((Path(path), (tmp_path / "out" / "model.mann").exists()))
        report = real_validate(model, path, **kwargs)
        report.checks[0].ok = False  # as if the artifact did not reproduce the model
        return report

    monkeypatch.setattr(bundle_export, "validate", validate)
    with pytest.raises(mann_edge.errors.ValidationError, match=r"mann export .*out/model.mann does not match"):
        mann_edge.convert(hostile.every_op_model(), tmp_path / "out", formats=[])
    (staged, final_existed), = seen
    assert staged.name == "model.mann" and staged.parent.name.endswith(".partial") and not final_existed
    assert not (tmp_path / "out").exists()


def test_an_interrupt_a_library_swallows_is_honoured_before_the_rename(tmp_path, monkeypatch):
    from mann_edge.converters import bundle as bundle_export

    real_export = bundle_export.export

    def export_swallowing_ctrl_c(model, path, **kwargs):
        result = real_export(model, path, **kwargs)
        try:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while native code runs...
        except KeyboardInterrupt:
            pass  # ...and a callback that catches everything
        return result

    monkeypatch.setattr(bundle_export, "export", export_swallowing_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        mann_edge.convert(hostile.every_op_model(), tmp_path / "out", formats=[])
    assert not (tmp_path / "out").exists()


INTERRUPTED = """
import signal, subprocess, sys, time
process = subprocess.Popen([sys.executable, "-m", "mann_edge.cli", "convert", {source!r}, "-o", {out!r},
                            "--to", "tflite"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
for line in process.stderr:
    if "tflite: writing" in line:
        break
time.sleep({delay})
process.send_signal(signal.SIGINT)
print(process.wait(), process.stderr.read().strip().splitlines()[-1:])
"""


@pytest.mark.parametrize("delay", [0.0, 0.2, 0.4])
def test_ctrl_c_during_the_tflite_conversion_exits_130_and_leaves_nothing_partial(delay, tmp_path):
    # Ctrl-C used to be lost inside TensorFlow's converter (the conversion went on and exited 0). Now it is
    # honoured wherever it lands: during the conversion nothing is left; after the last rename, the
    # outputs are complete and verified. Never exit 0, never a partial or staged file.
    source = hostile.every_op_model().save(tmp_path / "model.mann")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", INTERRUPTED.format(source=str(source), out=str(out), delay=delay)],
                         capture_output=True, text=True, timeout=300)
    code = int(run.stdout.split()[0])
    assert code in (130, -signal.SIGINT), run.stdout + run.stderr[-2000:]
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert left in ([], ["model.mann", "model.tflite"]), left


# -- 6. loose arguments -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, option", [
    (["convert", "{src}", "-o", ""], "-o/--out"),
    (["convert", "{src}", "-o", "{out}", "--to", ""], "--to"),
    (["convert", "{src}", "-o", "{out}", "--to", " , "], "--to"),
    (["convert", "{src}", "-o", "{out}", "--tasks", ""], "--tasks"),
    (["convert", "", "-o", "{out}"], "source"),
    (["verify", "{src}", "--against", ""], "--against"),
    (["inspect", "{src}", "--task-names", ""], "--task-names"),
])
def test_empty_arguments_are_bad_usage_and_write_nothing(argv, option, tmp_path, capsys, monkeypatch):
    source = hostile.every_op_model().save(tmp_path / "model.mann")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(src=source, out=tmp_path / "out") for a in argv])
    assert exit_info.value.code == 2
    assert f"argument {option}: must" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_an_empty_output_directory_is_refused_by_the_api(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(mann_edge.errors.ConversionError, match=r"out_dir must name a directory. Received: ''"):
        mann_edge.convert(hostile.every_op_model(), "", formats=[])
    assert list(tmp_path.iterdir()) == []


def test_an_unexpected_error_still_names_the_file(tmp_path, capsys, monkeypatch):
    import mann_edge.inspection

    def broken(*args, **kwargs):
        raise KeyError("class_name")

    monkeypatch.setattr(mann_edge.inspection, "load_source", broken)  # what `inspect` reads the file with
    path = tmp_path / "model.mann"
    path.write_bytes(b"")
    err = _one_line_error(capsys, ["inspect", str(path)])
    assert err == f"mann-edge: error: KeyError: 'class_name' (while reading {path})"


# -- 7. the bad-input table names only tests that exist ---------------------------------------------------------


def _test_names() -> dict[str, set[str]]:
    return {path.name: set(re.findall(r"^def (test_\w+)", path.read_text(), re.M)) for path in TESTS.glob("test_*.py")}


def test_every_row_of_the_bad_input_table_names_tests_that_exist():
    tests = _test_names()
    everywhere = set().union(*tests.values())
    rows = [line for line in (TESTS.parent / "docs" / "bad-input.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith(("| input", "|---"))]
    assert len(rows) > 40
    problems = []
    for row in rows:
        cell = row.rstrip(" |").rsplit(" | ", 1)[-1]
        names = re.findall(r"`([^`]+)`", cell)
        if not names and cell.strip() not in ("same",):
            problems.append(f"no test named: {row[:80]}")
        for name in names:
            file, _, test = name.partition("::") if "::" in name else ("", "", name)
            if name.endswith(".py"):
                ok = name in tests
            elif test.endswith("..."):
                ok = any(t.startswith(test[:-3]) for t in (tests.get(file) or everywhere))
            else:
                ok = test in (tests.get(file, set()) if file else everywhere)
            if not ok:
                problems.append(f"{name} does not exist ({row[:60]}...)")
    assert not problems, "\n".join(problems)
