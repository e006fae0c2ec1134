"""The compiled task program (runtime/program.py) and its SELL-8 kernels against the reference executor.

Every op the interpreter runs, at odd sizes, batch 1 and larger batches, float32 and float16
weights, with empty rows and all-zero layers; small weights run dense (BLAS) by default, so
each case also runs with `DENSE_MAX_BYTES` = 0, which sends every CSR weight to the sparse
kernels (SELL-8 or 1x4 blocks). Ops the interpreter does not run go through their Python op
between two compiled calls; those are checked too, with the buffers they read and write.
"""

from __future__ import annotations

import numpy as np
import pytest

from mann_edge.errors import InputError
from mann_edge.graph import plan as graph_plan
from mann_edge.graph.model import CompactModel, Node, Task, TensorSpec
from mann_edge.runtime import kernels
from mann_edge.runtime.bundle import BundleSession
from mann_edge.sparse import CSRWeight, encode_weight

pytestmark = pytest.mark.skipif(kernels._numba_import_error() is not None,
                                reason="numba is not installed: the compiled program needs it")

ATOL = {"float32": 1e-5, "float16": 1e-2}


@pytest.fixture(params=["dense_small", "sparse"])
def kernel_choice(request, monkeypatch):
    """Small weights run dense by default; 'sparse' sends every CSR weight to the sparse kernels."""
    from mann_edge.runtime import program

    if request.param == "sparse":
        monkeypatch.setattr(program, "DENSE_MAX_BYTES", 0)
    return request.param


def _sparse(rng, shape, density, empty_outputs=0):
    w = rng.normal(0, 1, shape).astype(np.float32) * (rng.random(shape) < density)
    if empty_outputs:
        w[..., :empty_outputs] = 0
    return w


def _blocky(rng, n_in, n_out, keep):
    """(in, out) weights kept or pruned in 1x4 blocks along the inputs (n_in need not be a multiple of 4)."""
    mask = np.repeat(rng.random((-(-n_in // 4), n_out)) < keep, 4, axis=0)[:n_in]
    return rng.normal(0, 1, (n_in, n_out)).astype(np.float32) * mask


class _Graph:
    """A compact model built node by node, one task reading ``inputs`` and giving the last node."""

    def __init__(self, inputs):
        self.inputs = [TensorSpec(name, shape, dtype) for name, shape, dtype in inputs]
        self.nodes, self.weights = [], {}

    def add(self, name, op, inputs, attrs=None, shape=None, dtype="float32", **weights):
        roles = {}
        for role, value in weights.items():
            if value is None:
                continue
            key = f"{name}/{role}"
            roles[role] = key
            self.weights[key] = encode_weight(value, "oi") if role == "kernel" else value
        self.nodes.append(Node(name, op, tuple(inputs), roles, attrs or {}, shape or (None,), dtype))
        return name

    def model(self, outputs, dtype="float32") -> CompactModel:
        specs = tuple(TensorSpec(f"out_{i}", shape) for i, (_, shape) in enumerate(outputs))
        task = Task("task", tuple(self.inputs), specs, tuple(name for name, _ in outputs))
        return CompactModel(self.inputs, self.nodes, [task], self.weights).astype(dtype)


def _check(model, inputs_by_batch, dtype="float32"):
    """The session's outputs against the reference executor's, for each batch of inputs; returns the session."""
    session = BundleSession("model.mann", model=model, threads=1)
    for inputs in inputs_by_batch:
        got = session.run("task", inputs)
        if kernels.kernel_backend() == "numba" and not session._executors:  # it ran on the compiled program
            shapes = inputs if isinstance(inputs, dict) else {model.tasks[0].inputs[0].name: inputs}
            assert _program(session).plan({name: a.shape for name, a in shapes.items()}) is not None
        expected = model.run("task", inputs)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert g.shape == e.shape and g.dtype == np.float32 and g.flags.c_contiguous
            np.testing.assert_allclose(g, e, atol=ATOL[dtype], rtol=ATOL[dtype])
    return session


def _program(session):
    from mann_edge.runtime.program import TaskProgram

    program = session._programs["task"]
    assert isinstance(program, TaskProgram)
    return program


DENSE_CASES = [
    # (inputs, outputs, density, empty outputs, activation, block structured)
    (7, 5, 0.5, 0, "relu", False),
    (33, 17, 0.1, 3, "linear", False),
    (300, 9, 0.05, 0, "softmax", False),
    (19, 1, 1.0, 0, "tanh", False),
    (11, 6, 0.0, 0, "relu", False),  # no nonzero at all: only the bias comes out
    (70, 40, 0.3, 40, {"name": "relu", "max_value": 1.0, "threshold": 0.1}, False),  # every row empty
    (45, 23, 0.3, 2, "sigmoid", True),  # 1x4 blocks, a last partial block
    (64, 200, 0.25, 0, "gelu", True),  # an activation the interpreter leaves to Python
]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[4] if isinstance(c[4], str) else 'relu1'}")
def test_a_dense_chain_matches_the_reference(kernel_choice, case, dtype):
    n_in, n_out, density, empty, activation, blocks = case
    rng = np.random.default_rng(n_in * 13 + n_out)
    kernel = _blocky(rng, n_in, n_out, density) if blocks else _sparse(rng, (n_in, n_out), density, empty)
    graph = _Graph([("x", (None, n_in), "float32")])
    hidden = graph.add("hidden", "dense", ["x"], {"activation": activation}, (None, n_out),
                       kernel=kernel, bias=rng.normal(0, 1, n_out).astype(np.float32))
    graph.add("head", "dense", [hidden], {"activation": "relu"}, (None, 3), kernel=_sparse(rng, (n_out, 3), 0.7))
    model = graph.model([("head", (None, 3)), ("hidden", (None, n_out))], dtype)
    batches = [rng.normal(0, 1, (batch, n_in)).astype(np.float32) for batch in (1, 2, 13, 40)]
    _check(model, batches, dtype)


def test_sparse_weights_run_on_the_sparse_kernels_and_small_dense_ones_on_blas(monkeypatch):
    from mann_edge.runtime import program as program_module

    rng = np.random.default_rng(1)
    graph = _Graph([("x", (None, 45), "float32")])
    graph.add("a", "dense", ["x"], {}, (None, 30), kernel=_sparse(rng, (45, 30), 0.1))  # pruned as RSN2 does
    graph.add("b", "dense", ["a"], {}, (None, 20), kernel=_blocky(rng, 30, 20, 0.1))
    graph.add("c", "dense", ["b"], {}, (None, 10), kernel=_sparse(rng, (20, 10), 0.6))  # hardly pruned
    model = graph.model([("c", (None, 10))])
    x = rng.normal(0, 1, (1, 45)).astype(np.float32)
    codes, default = {}, program_module.DENSE_MAX_BYTES
    for limit in (default, 0):
        monkeypatch.setattr(program_module, "DENSE_MAX_BYTES", limit)
        session = _check(model, [x])
        codes[limit] = [int(c) for c in _program(session).plan({"x": (1, 45)}).program[:, 0]]
    assert codes[0] == [program_module._DENSE_SELL, program_module._DENSE_BLOCK, program_module._DENSE_SELL]
    assert codes[default] == [program_module._DENSE_SELL, program_module._DENSE_BLOCK, program_module._DENSE_FULL]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_batch_stays_in_columns_between_sparse_products(monkeypatch, dtype):
    # SELL and 1x4-block products chained: each reads the previous one's transposed output as it is, except a
    # block product whose inputs are not a multiple of 4 (its kernel reads a padding row)
    from mann_edge.runtime import program as program_module

    monkeypatch.setattr(program_module, "DENSE_MAX_BYTES", 0)
    rng = np.random.default_rng(5)
    graph = _Graph([("x", (None, 45), "float32")])
    layers = [("a", 45, 30, "sell"), ("b", 30, 32, "sell"), ("c", 32, 24, "blocks"), ("d", 24, 22, "sell"),
              ("e", 22, 20, "blocks"), ("f", 20, 12, "blocks")]
    previous = "x"
    for name, n_in, n_out, kind in layers:
        kernel = _blocky(rng, n_in, n_out, 0.4) if kind == "blocks" else _sparse(rng, (n_in, n_out), 0.3, 2)
        previous = graph.add(name, "dense", [previous], {"activation": "relu"}, (None, n_out), kernel=kernel,
                             bias=rng.normal(0, 1, n_out).astype(np.float32))
    model = graph.model([(previous, (None, 12))], dtype)
    batches = [rng.normal(0, 1, (batch, 45)).astype(np.float32) for batch in (1, 3, 40)]
    session = _check(model, batches, dtype)
    table = _program(session).plan({"x": (40, 45)}).program
    codes = [int(c) for c in table[:, 0]]
    assert codes == [program_module._DENSE_SELL] * 2 + [program_module._DENSE_BLOCK, program_module._DENSE_SELL] + \
        [program_module._DENSE_BLOCK] * 2
    assert table[:, 7].tolist() == [0, 1, 1, 1, 0, 1]  # input kept in columns (e: 22 inputs, padded to 24)
    assert table[:, 9].tolist() == [1, 1, 1, 0, 1, 0]  # output kept in columns (not d, read by e; f: the model's)


CONV_CASES = [
    # (image, kernel (kh, kw, cin, cout), strides, padding, dilation, density, pool)
    ((9, 7, 3), (3, 3, 3, 5), (1, 1), "same", (1, 1), 0.3, ("max_pool2d", (2, 2), (2, 2), "same")),
    ((8, 8, 2), (2, 3, 2, 4), (2, 1), "valid", (1, 1), 0.5, ("avg_pool2d", (3, 3), (1, 1), "same")),
    ((10, 9, 1), (3, 2, 1, 3), (1, 2), "same", (2, 1), 0.6, ("avg_pool2d", (2, 2), (2, 2), "valid")),
    ((5, 5, 4), (1, 1, 4, 6), (1, 1), "valid", (1, 1), 0.0, ("max_pool2d", (2, 3), (1, 2), "valid")),
    ((6, 6, 8), (3, 3, 8, 16), (1, 1), "same", (1, 1), "blocks", ("max_pool2d", (2, 2), (2, 2), "valid")),
]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[1]}-{c[3]}-{c[6][0]}")
def test_conv_pool_flatten_dense_matches_the_reference(kernel_choice, case, dtype):
    image, shape, strides, padding, dilation, density, (pool, size, pool_strides, pool_padding) = case
    rng = np.random.default_rng(sum(shape))
    kh, kw, cin, cout = shape
    if density == "blocks":  # 1x4 blocks along kh * kw * cin
        kernel = _blocky(rng, kh * kw * cin, cout, 0.3).reshape(shape)
    else:
        kernel = _sparse(rng, shape, density)
    graph = _Graph([("image", (None, *image), "float32")])
    conv = graph.add("conv", "conv2d", ["image"], {"strides": list(strides), "padding": padding,
                                                   "dilation": list(dilation), "activation": "relu"},
                     (None, None, None, cout), kernel=kernel, bias=rng.normal(0, 1, cout).astype(np.float32))
    pooled = graph.add("pool", pool, [conv], {"pool_size": list(size), "strides": list(pool_strides),
                                              "padding": pool_padding}, (None, None, None, cout))
    flat = graph.add("flat", "flatten", [pooled], {}, (None, None))
    model = graph.model([("flat", (None, None))], dtype)
    width = model.run("task", np.zeros((1, *image), np.float32))[0].shape[1]
    graph.add("head", "dense", [flat], {"activation": "softmax"}, (None, 5), kernel=_sparse(rng, (width, 5), 0.4))
    model = graph.model([("head", (None, 5)), ("flat", (None, width))], dtype)
    batches = [rng.normal(0, 1, (batch, *image)).astype(np.float32) for batch in (1, 3)]
    _check(model, batches, dtype)


def test_embedding_add_concat_and_a_python_op_between_compiled_stretches(kernel_choice):
    rng = np.random.default_rng(5)
    graph = _Graph([("ids", (None, 6), "int32"), ("x", (None, 12), "float32")])
    table = rng.normal(0, 1, (11, 4)).astype(np.float32)
    embedded = graph.add("embed", "embedding", ["ids"], {}, (None, 6, 4), table=table)
    flat = graph.add("flat", "flatten", [embedded], {}, (None, 24))
    a = graph.add("a", "dense", [flat], {"activation": "relu"}, (None, 12), kernel=_sparse(rng, (24, 12), 0.3))
    both = graph.add("sum", "add", [a, "x", a], {}, (None, 12))
    # scale_shift has no compiled kernel: it runs as its reference op between two compiled calls
    normed = graph.add("norm", "scale_shift", [both], {}, (None, 12),
                       scale=rng.normal(0, 1, 12).astype(np.float32), shift=rng.normal(0, 1, 12).astype(np.float32))
    joined = graph.add("join", "concat", [normed, "x", a], {"axis": 1}, (None, 36))
    graph.add("head", "dense", [joined], {"activation": "sigmoid"}, (None, 5), kernel=_sparse(rng, (36, 5), 0.5))
    model = graph.model([("head", (None, 5)), ("join", (None, 36))])
    batches = [{"ids": rng.integers(0, 11, (batch, 6)).astype(np.int32),
                "x": rng.normal(0, 1, (batch, 12)).astype(np.float32)} for batch in (1, 4, 9)]
    session = _check(model, batches)
    plan = _program(session).plan({"ids": (4, 6), "x": (4, 12)})
    assert [step[0] for step in plan.steps] == ["program", "python", "program"]


def test_an_id_outside_the_table_is_refused_by_the_compiled_embedding():
    rng = np.random.default_rng(6)
    graph = _Graph([("ids", (None, 3), "int32")])
    graph.add("embed", "embedding", ["ids"], {}, (None, 3, 2), table=rng.normal(0, 1, (5, 2)).astype(np.float32))
    session = BundleSession("model.mann", model=graph.model([("embed", (None, 3, 2))]), threads=1)
    with pytest.raises(InputError, match=r"ids must be in \[0, 5\)"):  # the session's input check
        session.run("task", np.array([[0, 5, 1]], np.int32))
    program = _program(session) if "task" in session._programs else None
    from mann_edge.runtime.program import TaskProgram

    program = program or TaskProgram(session.model, "task")
    with pytest.raises(InputError, match="outside its table"):  # the kernel's own check, past the session's
        program.run({"ids": np.array([[0, 7, 1]], np.int32)})


def test_buffers_are_reused_once_their_last_reader_ran():
    rng = np.random.default_rng(7)
    graph = _Graph([("x", (None, 50), "float32")])
    previous = "x"
    for i in range(6):
        previous = graph.add(f"d{i}", "dense", [previous], {"activation": "relu"}, (None, 50),
                             kernel=_sparse(rng, (50, 50), 0.2) * np.float32(0.4))  # activations stay about 1
    session = _check(graph.model([(previous, (None, 50))]), [rng.normal(0, 1, (8, 50)).astype(np.float32)])
    plan = _program(session).plan({"x": (8, 50)})
    # the input and the output as (8, 50); between the six products the batch stays in columns, (50, 16 lanes)
    tensors = 2 * 8 * 50 + 5 * 50 * 16
    assert plan.act.size < tensors / 2  # at most three tensors live at once, plus scratch


def test_shapes_that_do_not_fit_are_refused_naming_the_node():
    rng = np.random.default_rng(8)
    graph = _Graph([("image", (None, None, None, 2), "float32")])
    graph.add("conv", "conv2d", ["image"], {"strides": [1, 1], "padding": "valid"}, (None, None, None, 3),
              kernel=_sparse(rng, (3, 3, 2, 3), 0.5))
    flat = graph.add("flat", "flatten", ["conv"], {}, (None, None))
    graph.add("head", "dense", [flat], {}, (None, 2), kernel=_sparse(rng, (12, 2), 0.5))  # 2 x 2 x 3 features
    session = BundleSession("model.mann", model=graph.model([("head", (None, 2))]), threads=1)
    assert session.run("task", np.zeros((1, 4, 4, 2), np.float32))[0].shape == (1, 2)
    with pytest.raises(InputError, match="node 'head'"):
        session.run("task", np.zeros((1, 5, 5, 2), np.float32))
    with pytest.raises(InputError, match="node 'conv'"):
        session.run("task", np.zeros((1, 2, 2, 2), np.float32))


def test_a_plan_past_the_memory_limit_runs_op_by_op(monkeypatch):
    rng = np.random.default_rng(9)
    graph = _Graph([("x", (None, 40), "float32")])
    graph.add("a", "dense", ["x"], {"activation": "relu"}, (None, 40), kernel=_sparse(rng, (40, 40), 0.3))
    graph.add("b", "dense", ["a"], {}, (None, 40), kernel=_sparse(rng, (40, 40), 0.3))
    model = graph.model([("b", (None, 40))])
    # every tensor of a batch of 16 fits (2,560 bytes); the plan's buffers together do not
    monkeypatch.setattr(graph_plan, "MAX_TENSOR_BYTES", 16 * 40 * 4)
    session = _check(model, [rng.normal(0, 1, (16, 40)).astype(np.float32)])
    assert _program(session).plan({"x": (16, 40)}) is None
    assert "task" in session._executors  # it ran op by op
    with pytest.raises(InputError, match="more than the"):  # a batch whose tensors are too large is refused
        session.run("task", np.zeros((17, 40), np.float32))


def test_the_scipy_fallback_runs_op_by_op(monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, "numpy")
    rng = np.random.default_rng(10)
    graph = _Graph([("x", (None, 9), "float32")])
    graph.add("a", "dense", ["x"], {"activation": "relu"}, (None, 5), kernel=_sparse(rng, (9, 5), 0.5))
    session = _check(graph.model([("a", (None, 5))]), [np.ones((2, 9), np.float32)])
    assert session._programs["task"] is None and "task" in session._executors


def test_sell8_holds_rows_by_length_in_slices_of_eight():
    from mann_edge.runtime.fast_kernels import Sell8

    dense = np.zeros((3, 11), np.float32)  # (outputs, inputs): rows of 1, 3 and 0 nonzeros
    dense[0, 4] = 1.0
    dense[1, [0, 5, 10]] = [2.0, 3.0, 4.0]
    sell = Sell8.from_csr(CSRWeight.from_dense(dense.T, "oi"))
    assert sell.perm.tolist() == [1, 0, 2, -1, -1, -1, -1, -1]
    assert sell.lengths.tolist() == [3, 1, 0, 0, 0, 0, 0, 0]
    assert sell.sptr.tolist() == [0, 24]  # one slice, three steps of eight lanes
    steps = sell.values.reshape(3, 8)
    assert steps[:, 0].tolist() == [2.0, 3.0, 4.0] and steps[:, 1].tolist() == [1.0, 0.0, 0.0]
    assert sell.indices.reshape(3, 8)[:, 0].tolist() == [0, 5, 10]
    assert sell.padding == pytest.approx(24 / 4 - 1)
    assert sell.bytes_per_nonzero == pytest.approx(6 * 24 / 4)
    empty = Sell8.from_csr(CSRWeight.from_dense(np.zeros((5, 9), np.float32), "oi"))
    assert empty.sptr.tolist() == [0, 0, 0] and empty.padding == 0.0


@pytest.mark.parametrize("rows, cols", [(1, 1), (9, 70000), (17, 3)])
@pytest.mark.parametrize("batch", [1, 5])
def test_sell8_kernels_match_the_matrix_product(rows, cols, batch):
    from mann_edge.runtime.fast_kernels import Sell8, sell_matmat, sell_matvec

    rng = np.random.default_rng(rows + cols)
    dense = _sparse(rng, (rows, cols), min(1.0, 40 / cols))
    dense[rows // 2] = 0  # an empty row
    sell = Sell8.from_csr(CSRWeight.from_dense(dense.T, "oi"))
    assert sell.indices.dtype == (np.uint32 if cols > 65536 else np.uint16)
    x = rng.normal(0, 1, (batch, cols)).astype(np.float32)
    bias = rng.normal(0, 1, rows).astype(np.float32)
    expected = np.maximum(x @ dense.T + bias, 0)
    if batch == 1:
        out = np.empty(rows, np.float32)
        sell_matvec(sell, x[0], bias, True, out)
        np.testing.assert_allclose(out[None], expected, atol=1e-5, rtol=1e-5)
    else:
        with pytest.raises(ValueError, match="16k"):  # the kernel works in whole 16-lane tiles of the batch
            sell_matmat(sell, np.ascontiguousarray(x.T), bias, True, np.empty((rows, batch), np.float32))
        for lanes in (16, 48):  # one tile; a pass of two tiles and one more
            xt = np.zeros((cols, lanes), np.float32)
            xt[:, :batch] = x.T
            out = np.empty((rows, lanes), np.float32)
            sell_matmat(sell, xt, bias, True, out)
            np.testing.assert_allclose(out[:, :batch].T, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_attention_transpose_layer_norm_and_global_pools_match_the_reference(kernel_choice, causal, batch):
    # a two-head self-attention block as compaction lowers Keras's MultiHeadAttention, at odd sizes
    rng = np.random.default_rng(11)
    steps, width, heads, depth = 7, 10, 2, 3
    graph = _Graph([("x", (None, steps, width), "float32")])
    projected = {}
    for role in ("query", "key", "value"):
        dense = graph.add(f"{role}/dense", "dense", ["x"], {}, (None, steps, heads * depth),
                          kernel=_sparse(rng, (width, heads * depth), 0.6))
        split = graph.add(f"{role}/split", "reshape", [dense], {"shape": [steps, heads, depth]},
                          (None, steps, heads, depth))
        projected[role] = graph.add(role, "transpose", [split], {"perm": [0, 2, 1, 3]}, (None, heads, steps, depth))
    attended = graph.add("attention", "attention", [projected["query"], projected["value"], projected["key"]],
                         {"scale": 0.5, "causal": causal}, (None, heads, steps, depth))
    back = graph.add("heads", "transpose", [attended], {"perm": [0, 2, 1, 3]}, (None, steps, heads, depth))
    joined = graph.add("join", "reshape", [back], {"shape": [steps, heads * depth]}, (None, steps, heads * depth))
    normed = graph.add("norm", "layer_norm", [joined], {"axes": [1, 2], "epsilon": 1e-3}, (None, steps, heads * depth),
                       gamma=rng.normal(0, 1, (steps, heads * depth)).astype(np.float32))
    graph.add("mean", "global_avg_pool", [normed], {"axes": [1]}, (None, heads * depth))
    graph.add("top", "global_max_pool", [normed], {"axes": [2], "keepdims": True}, (None, steps, 1))
    graph.add("over_steps", "layer_norm", [joined], {"axes": [1], "epsilon": 1e-3}, (None, steps, heads * depth))
    model = graph.model([("mean", (None, heads * depth)), ("top", (None, steps, 1)),
                         ("attention", (None, heads, steps, depth)), ("over_steps", (None, steps, heads * depth))])
    session = _check(model, [rng.normal(0, 1, (batch, steps, width)).astype(np.float32)])
    plan = _program(session).plan({"x": (batch, steps, width)})
    assert [step[0] for step in plan.steps] == ["program"]  # every op compiled, none in Python
    from mann_edge.runtime.program import _LAYER_NORM

    # normalizing the last axes reads rows; normalizing the steps of each feature goes through the position table
    assert [int(row[11]) for row in plan.program if row[0] == _LAYER_NORM] == [1, 0]
    assert plan.act.ctypes.data % 64 == 0  # whole cache lines: the batch kernels' 16-lane loads never straddle two


def test_concat_scores_attention_runs_in_python_between_compiled_ops():
    rng = np.random.default_rng(12)
    graph = _Graph([("q", (None, 2, 4, 3), "float32"), ("v", (None, 2, 5, 3), "float32")])
    attended = graph.add("attention", "attention", ["q", "v", "v"], {"score_mode": "concat"}, (None, 2, 4, 3))
    graph.add("head", "dense", [attended], {"activation": "relu"}, (None, 2, 4, 6), kernel=_sparse(rng, (3, 6), 0.7))
    model = graph.model([("head", (None, 2, 4, 6))])
    inputs = {"q": rng.normal(0, 1, (2, 2, 4, 3)).astype(np.float32), "v": rng.normal(0, 1, (2, 2, 5, 3)).astype(np.float32)}
    session = _check(model, [inputs])
    plan = _program(session).plan({"q": (2, 2, 4, 3), "v": (2, 2, 5, 3)})
    assert [step[0] for step in plan.steps] == ["python", "program"]


def test_sessions_shared_by_threads_give_each_caller_its_own_result():
    # a plan's buffers serve one run at a time; the compiled program releases the GIL, so runs must take turns
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(13)
    graph = _Graph([("x", (None, 300), "float32")])
    # weights scaled so outputs stay near 1, where float32 sums agree to 1e-5 in any order
    hidden = graph.add("a", "dense", ["x"], {"activation": "relu"}, (None, 200),
                       kernel=0.1 * _sparse(rng, (300, 200), 0.3))
    graph.add("b", "dense", [hidden], {}, (None, 50), kernel=0.1 * _sparse(rng, (200, 50), 0.3))
    model = graph.model([("b", (None, 50))])
    session = BundleSession("model.mann", model=model, threads=1)
    inputs = [rng.normal(0, 1, (1 + i % 3, 300)).astype(np.float32) for i in range(64)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda x: session.run("task", x)[0], inputs * 16))
    for x, got in zip(inputs * 16, results):
        np.testing.assert_allclose(got, model.run("task", x)[0], atol=1e-5, rtol=1e-5)


def test_large_runs_with_threads_go_op_by_op_on_the_parallel_kernels(monkeypatch):
    from mann_edge.runtime import bundle

    rng = np.random.default_rng(14)
    graph = _Graph([("x", (None, 70), "float32")])
    graph.add("a", "dense", ["x"], {"activation": "relu"}, (None, 33), kernel=0.3 * _sparse(rng, (70, 33), 0.3))
    model = graph.model([("a", (None, 33))])
    # the weight runs dense (70 x 33 multiply-adds per example): one example is below the bar, nine are not
    monkeypatch.setattr(bundle, "PARALLEL_MIN_WORK", 3 * 70 * 33)
    session = BundleSession("model.mann", model=model, threads=2)
    for batch in (1, 9):
        x = rng.normal(0, 1, (batch, 70)).astype(np.float32)
        np.testing.assert_allclose(session.run("task", x)[0], model.run("task", x)[0], atol=1e-5, rtol=1e-5)
        assert ("task" in session._executors) == (batch == 9)


def _mlp_and_conv_models(rng):
    stack = _Graph([("x", (None, 20), "float32")])
    hidden = stack.add("a", "dense", ["x"], {"activation": "relu"}, (None, 16), kernel=_sparse(rng, (20, 16), 0.3))
    stack.add("b", "dense", [hidden], {"activation": "softmax"}, (None, 4), kernel=_sparse(rng, (16, 4), 0.5))
    conv = _Graph([("image", (None, 6, 6, 2), "float32")])
    feature = conv.add("conv", "conv2d", ["image"], {"strides": [1, 1], "padding": "same", "dilation": [1, 1],
                                                     "activation": "relu"}, (None, None, None, 3),
                       kernel=_sparse(rng, (3, 3, 2, 3), 0.5))
    conv.add("flat", "flatten", [feature], {}, (None, None))
    return stack.model([("b", (None, 4))]), conv.model([("flat", (None, 108))])


def test_a_layer_stack_runs_on_the_stack_interpreter_and_the_full_one_gives_the_same(kernel_choice):
    from mann_edge.runtime import program as program_module

    rng = np.random.default_rng(21)
    stack_model, conv_model = _mlp_and_conv_models(rng)
    x = rng.normal(0, 1, (3, 20)).astype(np.float32)
    program = _program(_check(stack_model, [x]))
    assert program.interpreter is program_module.run_stack_program
    assert _program(_check(conv_model, [rng.normal(0, 1, (2, 6, 6, 2)).astype(np.float32)])).interpreter \
        is program_module.run_program
    # every op of a layer stack is one the full interpreter runs too, with the same code
    plan = program.plan({"x": x.shape})
    results = []
    for interpreter in (program_module.run_stack_program, program_module.run_program):
        plan.inputs[0][1][...] = x
        assert interpreter(plan.program, 0, len(plan.program), program.wi, plan.pi, program.wf, program.values,
                           program.indices, plan.act) == 0
        results.append(plan.outputs[0][1].copy())
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_allclose(results[0], stack_model.run("task", x)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_preloaded_signature_is_the_one_a_run_calls(dtype):
    # preloading a signature other than the run's would load (or compile) an interpreter nobody calls
    import numba

    from mann_edge.runtime import program as program_module

    rng = np.random.default_rng(22)
    for model in _mlp_and_conv_models(rng):
        model = model.astype(dtype)
        session = BundleSession("model.mann", model=model, threads=1)  # starts the preload
        program_module._finish_preloads()
        task = model.tasks[0]
        x = rng.normal(0, 1, (2, *task.inputs[0].shape[1:])).astype(np.float32)
        session.run("task", x)
        program = _program(session)
        plan = program.plan({task.inputs[0].name: x.shape})
        run_types = tuple(numba.typeof(argument) for argument in (
            plan.program, 0, len(plan.program), program.wi, plan.pi, program.wf, program.values, program.indices,
            plan.act))
        values, indices = program_module._kernel_dtypes(program.nodes, program.weights)
        assert program_module._argument_types(values, indices) == run_types
        assert run_types in program.interpreter.signatures


def test_a_fork_while_the_interpreter_preloads_leaves_the_child_able_to_run(tmp_path):
    # the child of a fork made while the preload held numba's compiler lock would wait for it forever; a fresh
    # process, so the preload is still loading when it forks
    import subprocess
    import sys

    rng = np.random.default_rng(23)
    model = _mlp_and_conv_models(rng)[0]
    model.save(tmp_path / "model.mann")
    x = rng.normal(0, 1, (1, 20)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = f"""
import multiprocessing, numpy as np
from mann_edge import runtime
session = runtime.load({str(tmp_path / "model.mann")!r}, threads=1)
x = np.load({str(tmp_path / "x.npy")!r})
context = multiprocessing.get_context("fork")
results = context.Queue()
child = context.Process(target=lambda: results.put(session.run("task", x)[0]))
child.start()
child.join(60)
if child.is_alive():
    child.kill()
    raise SystemExit("the forked child did not finish a one-example run in 60 s")
np.save({str(tmp_path / "y.npy")!r}, results.get(timeout=10))
"""
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), model.run("task", x)[0], atol=1e-5, rtol=1e-5)
