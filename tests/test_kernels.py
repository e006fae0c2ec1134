"""The bundle backend's CSR kernels against the reference ops: numba path, scipy fallback, threads.

Small random layers (odd shapes, empty rows, all-zero weights, float32 and float16 values),
dense and conv, each op bound once with the reference registry and once with the runtime's,
on batch 1 (the mat-vec kernel) and larger batches (the transposed mat-mat kernel).
Weights pruned in 1x4 blocks run the block kernels when numba is installed: those are
checked the same way, with explicit zeros in kept blocks, a last partial block, and
weights just below the fill the block kernels need (which must stay on the CSR kernels).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from mann_edge.errors import InputError, MannEdgeError
from mann_edge.graph import ops
from mann_edge.graph.model import CompactModel, Node, Task, TensorSpec
from mann_edge.runtime import kernels
from mann_edge.runtime.bundle import BundleSession
from mann_edge.sparse import CSRWeight, encode_weight

numba_only = pytest.mark.skipif(
    kernels._numba_import_error() is not None, reason="numba is not installed: only the scipy fallback can run"
)
BACKENDS = ["numpy", pytest.param("numba", marks=numba_only)]
ATOL = 1e-5


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, request.param)
    return request.param


def _sparse(rng, shape, density, dtype="float32", empty_rows=0):
    """A random (…, out) kernel with ``density`` nonzeros; the first ``empty_rows`` outputs read nothing."""
    w = rng.normal(0, 1, shape).astype(np.float32) * (rng.random(shape) < density)
    if empty_rows:
        w[..., :empty_rows] = 0
    return w.astype(dtype)


def _weights(kernel, bias):
    weights = {"kernel": CSRWeight.from_dense(kernel, "oi")}
    if bias is not None:
        weights["bias"] = bias
    return weights


def _node(op, attrs, bias=True):
    roles = {"kernel": "k", **({"bias": "b"} if bias else {})}
    return Node("layer", op, ("x",), roles, attrs)


def _pair(op, attrs, kernel, bias, threads=1):
    node = _node(op, attrs, bias is not None)
    weights = _weights(kernel, bias)
    reference = ops.bind(node, {"k": weights["kernel"], **({"b": bias} if bias is not None else {})})
    fast = kernels.runtime_ops(threads)[op](node, weights)
    return reference, fast


DENSE_CASES = [
    # (inputs, outputs, density, empty output rows, activation)
    (7, 5, 0.5, 0, "relu"),
    (33, 17, 0.1, 3, "linear"),
    (300, 9, 0.05, 0, "softmax"),
    (19, 1, 1.0, 0, "tanh"),
    (11, 6, 0.0, 0, "relu"),  # an all-zero weight: only the bias comes out
    (70, 40, 0.3, 40, {"name": "relu", "max_value": 1.0}),  # every row empty; a relu the kernel cannot fuse
]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: f"{c[0]}x{c[1]}")
@pytest.mark.parametrize("batch", [1, 2, 13])
def test_csr_dense_matches_the_reference_op(backend, case, dtype, batch):
    inputs, outputs, density, empty, activation = case
    rng = np.random.default_rng(inputs * 7 + outputs)
    kernel = _sparse(rng, (inputs, outputs), density, dtype, empty)
    bias = rng.normal(0, 1, outputs).astype(dtype)
    reference, fast = _pair("dense", {"activation": activation}, kernel, bias)
    x = rng.normal(0, 1, (batch, inputs)).astype(np.float32)
    expected = reference.run(x)
    got = fast.run(x)
    assert got.shape == expected.shape == (batch, outputs)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=1e-5)


def test_csr_dense_without_bias_and_with_more_leading_axes(backend):
    rng = np.random.default_rng(3)
    reference, fast = _pair("dense", {"activation": "relu"}, _sparse(rng, (12, 8), 0.4), None)
    x = rng.normal(0, 1, (2, 3, 12)).astype(np.float32)
    np.testing.assert_allclose(fast.run(x), reference.run(x), atol=ATOL)
    assert fast.run(x).shape == (2, 3, 8)


def test_an_empty_batch_gives_an_empty_result(backend):
    rng = np.random.default_rng(4)
    _, fast = _pair("dense", {"activation": "relu"}, _sparse(rng, (6, 4), 0.5), np.ones(4, "float32"))
    assert fast.run(np.zeros((0, 6), np.float32)).shape == (0, 4)


def test_the_fused_relu_turns_nan_into_zero_as_the_reference_does(backend):
    # the reference relu is np.where(x >= 0, x, 0); every output reads the NaN input here
    # (a sparse product skips stored zeros, so NaN reaches only the outputs that read it)
    kernel = np.array([[1.0, -2.0, 3.0], [0.0, 1.0, 0.0]], np.float32)
    reference, fast = _pair("dense", {"activation": "relu"}, kernel, None)
    for batch in (1, 4):
        x = np.tile(np.array([[np.nan, 1.0]], np.float32), (batch, 1))
        expected = reference.run(x)
        assert np.all(expected == 0)
        np.testing.assert_array_equal(fast.run(x), expected)


CONV_CASES = [
    # (image, kernel (kh, kw, cin, cout), strides, padding, dilation, density)
    ((9, 7, 3), (3, 3, 3, 5), (1, 1), "same", (1, 1), 0.3),
    ((8, 8, 2), (2, 3, 2, 4), (2, 1), "valid", (1, 1), 0.5),
    ((10, 9, 1), (3, 2, 1, 3), (1, 2), "same", (2, 1), 0.6),
    ((5, 5, 4), (1, 1, 4, 6), (1, 1), "valid", (1, 1), 0.0),
]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[1]}-{c[3]}")
@pytest.mark.parametrize("batch", [1, 3])
def test_csr_conv2d_matches_the_reference_op(backend, case, dtype, batch):
    image, shape, strides, padding, dilation, density = case
    rng = np.random.default_rng(sum(shape))
    kernel = _sparse(rng, shape, density, dtype, empty_rows=1)
    bias = rng.normal(0, 1, shape[-1]).astype(np.float32)
    attrs = {"strides": strides, "padding": padding, "dilation": dilation, "activation": "relu"}
    reference, fast = _pair("conv2d", attrs, kernel, bias)
    x = rng.normal(0, 1, (batch, *image)).astype(np.float32)
    expected = reference.run(x)
    got = fast.run(x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=1e-5)


POOL_CASES = [
    # (image, pool size, strides, padding)
    ((8, 8, 3), (2, 2), (2, 2), "valid"),
    ((7, 9, 2), (3, 3), (2, 2), "same"),  # the extra padding cell goes after, as in TensorFlow
    ((5, 6, 1), (2, 3), (1, 2), "same"),
    ((6, 5, 4), (3, 2), (3, 1), "valid"),  # windows that do not tile the input
    ((1, 1, 2), (2, 2), (2, 2), "same"),  # a window larger than the input, all padding but one cell
]


@pytest.mark.parametrize("op", ["max_pool2d", "avg_pool2d"])
@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{c[3]}")
@pytest.mark.parametrize("batch", [1, 3])
def test_gathered_pooling_matches_the_reference_op(op, case, batch):
    image, pool, strides, padding = case
    node = Node("pool", op, ("x",), {}, {"pool_size": pool, "strides": strides, "padding": padding})
    reference, fast = ops.bind(node, {}), kernels.runtime_ops()[op](node, {})
    x = np.random.default_rng(batch).normal(0, 1, (batch, *image)).astype(np.float32)
    for _ in range(2):  # the second run reuses the cached window index
        expected, got = reference.run(x), fast.run(x)
        assert got.shape == expected.shape and got.dtype == expected.dtype
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-6)


def test_windows_are_indexed_per_input_size():
    windows = kernels.Windows((3, 3), strides=(1, 1), padding="same")
    small, _, _ = windows(np.ones((1, 4, 4, 2), np.float32), fill=0.0)
    large, _, _ = windows(np.ones((2, 6, 5, 2), np.float32), fill=0.0)
    assert small.shape == (1, 16, 9, 2) and large.shape == (2, 30, 9, 2)
    assert small[0, 0].sum() == 4 * 2  # the corner window holds 4 cells of the input, 5 of padding


def test_a_dense_kernel_kept_dense_runs_through_blas(backend):
    rng = np.random.default_rng(5)
    kernel = rng.normal(0, 1, (6, 4)).astype(np.float32)
    node = _node("dense", {"activation": "relu"})
    fast = kernels.runtime_ops(1)["dense"](node, {"kernel": kernel, "bias": np.ones(4, "float32")})
    reference = ops.bind(node, {"k": kernel, "b": np.ones(4, "float32")})
    assert isinstance(fast.product, kernels.DenseProduct)
    x = rng.normal(0, 1, (3, 6)).astype(np.float32)
    np.testing.assert_allclose(fast.run(x), reference.run(x), atol=ATOL)


def test_a_wrong_input_size_is_refused_before_the_kernel_reads_it(backend):
    rng = np.random.default_rng(6)
    _, fast = _pair("dense", {"activation": "relu"}, _sparse(rng, (10, 4), 0.5), None)
    for batch in (1, 5):
        with pytest.raises(InputError, match=r"node 'layer'.*expected 10 input features, got 9"):
            fast.run(np.ones((batch, 9), np.float32))


# -- 1x4 blocks ----------------------------------------------------------------------------------


def _blocky(rng, inputs, outputs, keep, dtype="float32", holes=0.0):
    """A random (inputs, outputs) kernel pruned in 1x4 blocks (four consecutive inputs of one output).

    ``keep``: share of blocks kept; ``holes``: share of the kept values then set to zero,
    so some kept blocks hold explicit zeros (and, past 0.25, the weight is no longer block structured).
    A last block of fewer than four inputs is kept like any other.
    """
    blocks = -(-inputs // 4)
    kept = np.repeat(rng.random((blocks, outputs)) < keep, 4, axis=0)[:inputs]
    w = rng.normal(0, 1, (inputs, outputs)).astype(np.float32) * kept
    w[rng.random(w.shape) < holes] = 0
    return w.astype(dtype)


def _block_product_class():
    from mann_edge.runtime.fast_kernels import NumbaBlockProduct

    return NumbaBlockProduct


BLOCK_CASES = [
    # (inputs, outputs, kept blocks, holes): inputs not a multiple of 4 leave a partial last block
    (64, 24, 0.3, 0.0),
    (30, 17, 0.5, 0.0),
    (7, 5, 0.8, 0.0),
    (102, 33, 0.1, 0.05),  # a few kept blocks with an explicit zero: still blocks
    (3, 4, 1.0, 0.0),  # three inputs: each row one partial block, fill exactly 75 %
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: f"{c[0]}x{c[1]}-holes{c[3]}")
@pytest.mark.parametrize("batch", [1, 2, 13, 40])  # 40: a pass of two 16-lane tiles, then one more
def test_block_structured_dense_matches_the_reference_op(backend, case, dtype, batch, threads, monkeypatch):
    inputs, outputs, keep, holes = case
    if backend == "numba":  # these layers are far below the size where threads pay: run the parallel kernels anyway
        from mann_edge.runtime import fast_kernels

        monkeypatch.setattr(fast_kernels, "PARALLEL_MIN_BLOCK_LANES", 0)
    rng = np.random.default_rng(inputs * 11 + outputs)
    kernel = _blocky(rng, inputs, outputs, keep, dtype, holes)
    bias = rng.normal(0, 1, outputs).astype(dtype)
    reference, fast = _pair("dense", {"activation": "relu"}, kernel, bias, threads=threads)
    if backend == "numba":
        assert isinstance(fast.product, _block_product_class())
    x = rng.normal(0, 1, (batch, inputs)).astype(np.float32)
    expected = reference.run(x)
    got = fast.run(x)
    assert got.shape == expected.shape == (batch, outputs)
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 13])
def test_weights_below_the_block_fill_stay_on_the_csr_kernels(backend, batch):
    # 40 % of each kept block zeroed: below the 75 % fill the block kernels need
    rng = np.random.default_rng(12)
    kernel = _blocky(rng, 50, 20, 0.4, holes=0.4)
    reference, fast = _pair("dense", {"activation": "linear"}, kernel, rng.normal(0, 1, 20).astype("float32"))
    if backend == "numba":
        from mann_edge.runtime.fast_kernels import NumbaCSRProduct

        assert type(fast.product) is NumbaCSRProduct
    x = rng.normal(0, 1, (batch, 50)).astype(np.float32)
    np.testing.assert_allclose(fast.run(x), reference.run(x), atol=ATOL, rtol=1e-5)


@numba_only
def test_blocks_hold_each_row_s_blocks_with_explicit_zeros():
    from mann_edge.runtime.fast_kernels import Blocks1x4

    # matrix (outputs 2, inputs 6): output 0 reads inputs 0-3 (one zero among them) and 5; output 1 input 4
    matrix = np.array([[1, 2, 0, 3, 0, 4], [0, 0, 0, 0, 5, 0]], np.float32)
    blocks = Blocks1x4.from_csr(CSRWeight.from_dense(matrix.T, "oi"), min_fill=0.4)
    assert blocks.indptr.tolist() == [0, 2, 3]
    assert blocks.columns.tolist() == [0, 1, 1] and blocks.columns.dtype == np.uint16
    assert blocks.values.tolist() == [1, 2, 0, 3, 0, 4, 0, 0, 5, 0, 0, 0]
    assert (blocks.padded_cols, blocks.nnz, blocks.fill) == (8, 5, 5 / 12)
    assert Blocks1x4.from_csr(CSRWeight.from_dense(matrix.T, "oi")) is None  # 5/12 < 0.75
    assert Blocks1x4.from_csr(CSRWeight.from_dense(matrix, "rows"), min_fill=0.0) is None
    assert Blocks1x4.from_csr(CSRWeight.from_dense(np.zeros((8, 3), np.float32), "oi")) is None


@numba_only
def test_small_block_products_run_serial_and_large_ones_parallel(monkeypatch):
    from mann_edge.runtime import fast_kernels

    calls = []
    monkeypatch.setattr(fast_kernels, "block_matvec", lambda *args, parallel: calls.append(parallel))
    monkeypatch.setattr(fast_kernels, "block_matmat", lambda *args, parallel: calls.append(parallel))
    rng = np.random.default_rng(15)
    _, fast = _pair("dense", {}, _blocky(rng, 40, 30, 0.5), None, threads=2)
    blocks = fast.product.blocks
    monkeypatch.setattr(fast_kernels, "PARALLEL_MIN_BLOCK_LANES", 8 * blocks)
    for batch in (1, 7, 8, 9):
        fast.run(np.ones((batch, 40), np.float32))
    assert calls == [False, False, True, True]


@numba_only
def test_blocks_past_65536_columns_take_uint32_indices():
    from mann_edge.runtime.fast_kernels import Blocks1x4

    kernel = np.zeros((4 * 70_000, 1), np.float32)
    kernel[-4:] = 1.0  # the last block, column 69,999
    blocks = Blocks1x4.from_csr(CSRWeight.from_dense(kernel, "oi"))
    assert blocks.columns.dtype == np.uint32 and blocks.columns.tolist() == [69_999]
    reference, fast = _pair("dense", {}, kernel, None)
    x = np.random.default_rng(13).normal(0, 1, (1, kernel.shape[0])).astype(np.float32)
    np.testing.assert_allclose(fast.run(x), reference.run(x), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_a_block_structured_conv_kernel_matches_the_reference_op(backend, batch):
    # cin = 4 and whole (kh, kw) positions pruned: blocks of the flattened (kh * kw * cin) inputs
    rng = np.random.default_rng(14)
    kernel = rng.normal(0, 1, (3, 3, 4, 6)).astype(np.float32) * (rng.random((3, 3, 1, 6)) < 0.5)
    attrs = {"strides": (1, 1), "padding": "same", "dilation": (1, 1), "activation": "relu"}
    reference, fast = _pair("conv2d", attrs, kernel, rng.normal(0, 1, 6).astype(np.float32))
    if backend == "numba":
        assert isinstance(fast.product, _block_product_class())
    x = rng.normal(0, 1, (batch, 7, 5, 4)).astype(np.float32)
    np.testing.assert_allclose(fast.run(x), reference.run(x), atol=ATOL, rtol=1e-5)


# -- which kernels run -----------------------------------------------------------------------------


@numba_only
def test_numba_is_used_when_installed_and_the_fallback_when_asked(monkeypatch):
    from mann_edge.runtime.fast_kernels import NumbaCSRProduct

    rng = np.random.default_rng(7)
    monkeypatch.setenv(kernels.KERNELS_ENV, "auto")
    assert kernels.kernel_backend() == "numba"
    _, fast = _pair("dense", {}, _sparse(rng, (5, 3), 0.5), None)
    assert isinstance(fast.product, NumbaCSRProduct)
    monkeypatch.setenv(kernels.KERNELS_ENV, "numpy")
    _, fallback = _pair("dense", {}, _sparse(rng, (5, 3), 0.5), None)
    assert isinstance(fallback.product, kernels.ScipyCSRProduct)


@numba_only
def test_float16_values_stay_float16_in_the_numba_kernel(monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, "numba")
    rng = np.random.default_rng(8)
    _, fast = _pair("dense", {}, _sparse(rng, (40, 30), 0.2, "float16"), None)
    assert fast.product.sell.values.dtype == np.float16  # stored as half ...
    assert fast.product.sell.kernel_values.dtype == np.uint16  # ... handed over as their bits, widened in the kernel


def test_an_unknown_kernel_choice_is_refused(monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, "cuda")
    with pytest.raises(MannEdgeError, match=r"MANN_EDGE_KERNELS must be one of \['auto', 'numba', 'numpy'\]. Received: 'cuda'"):
        kernels.kernel_backend()


def test_without_numba_auto_falls_back_and_numba_is_an_error():
    # a fresh interpreter where importing numba fails, as on a device without it
    code = (
        "import sys; sys.modules['numba'] = None\n"
        "import os\n"
        "from mann_edge.runtime import kernels\n"
        "assert kernels.kernel_backend() == 'numpy', kernels.kernel_backend()\n"
        "os.environ['MANN_EDGE_KERNELS'] = 'numba'\n"
        "try:\n"
        "    kernels.kernel_backend()\n"
        "except Exception as error:\n"
        "    print(type(error).__name__, error)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != kernels.KERNELS_ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.startswith("MannEdgeError MANN_EDGE_KERNELS=numba, but the compiled kernels do not import")


def test_every_kernel_replaces_a_reference_op_of_the_same_type():
    assert set(kernels.KERNELS) <= set(ops.OPS)
    for op_type, kernel in kernels.KERNELS.items():
        assert issubclass(kernel, ops.OPS[op_type]) and kernel.type == op_type
    table = kernels.runtime_ops(1)
    assert set(table) == set(ops.OPS)
    assert all(table[op_type] is ops.OPS[op_type] for op_type in set(ops.OPS) - set(kernels.KERNELS))


@pytest.mark.parametrize("registry, owner", [(None, "The reference executor"), ("runtime", "The bundle runtime")])
def test_an_unknown_op_is_named_with_the_supported_ones(registry, owner):
    node = Node("mystery", "fft", ("x",))
    table = kernels.runtime_ops(1) if registry == "runtime" else None
    expected = rf"{owner} cannot run op 'fft' \(node 'mystery'\)\. Supported ops: \[.*'conv2d'"
    with pytest.raises(ValueError, match=expected):
        ops.bind(node, {}, table)


@pytest.mark.parametrize("threads", [0, -1, 1.5, True])
def test_bad_thread_counts_are_refused(threads):
    with pytest.raises(ValueError, match=r"`threads` must be a positive int or None"):
        kernels.runtime_ops(threads)


# -- whole tasks through the session ---------------------------------------------------------------


def _mlp(dtype="float32", blocks=False) -> CompactModel:
    """x (29) -> 64 relu -> 31 relu -> 7 softmax, about 80 % zeros (in 1x4 blocks if ``blocks``), as compaction stores it."""
    rng = np.random.default_rng(9)
    sizes = [29, 64, 31, 7]
    nodes, weights, previous = [], {}, "x"
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        name = f"dense_{i}"
        kernel = _blocky(rng, n_in, n_out, 0.2) if blocks else _sparse(rng, (n_in, n_out), 0.2, empty_rows=2)
        weights[f"{name}/kernel"] = encode_weight(kernel, "oi")
        weights[f"{name}/bias"] = encode_weight(rng.normal(0, 1, n_out).astype(np.float32))
        activation = "softmax" if i == len(sizes) - 2 else "relu"
        nodes.append(Node(name, "dense", (previous,), {"kernel": f"{name}/kernel", "bias": f"{name}/bias"},
                          {"activation": activation}, (None, n_out)))
        previous = name
    spec = TensorSpec("x", (None, 29))
    task = Task("task", (spec,), (TensorSpec("y", (None, 7)),), (previous,))
    return CompactModel([spec], nodes, [task], weights).astype(dtype)


@pytest.mark.parametrize("blocks", [False, True], ids=["unstructured", "blocks"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("threads", [1, 2, None])
def test_a_session_with_threads_matches_the_reference_executor(backend, dtype, threads, blocks, monkeypatch):
    if backend == "numba" and blocks:
        from mann_edge.runtime import fast_kernels

        monkeypatch.setattr(fast_kernels, "PARALLEL_MIN_BLOCK_LANES", 0)
    model = _mlp(dtype, blocks)
    session = BundleSession("mlp.mann", model=model, threads=threads)
    for batch in (1, 6, 64):
        x = np.random.default_rng(batch).normal(0, 1, (batch, 29)).astype(np.float32)
        got = session.run("task", x)[0]
        assert got.flags.c_contiguous
        np.testing.assert_allclose(got, model.run("task", x)[0], atol=ATOL, rtol=1e-5)


@numba_only
@pytest.mark.parametrize("blocks", [False, True], ids=["unstructured", "blocks"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_numba_and_scipy_paths_agree(monkeypatch, dtype, blocks):
    model = _mlp(dtype, blocks)
    x = np.random.default_rng(10).normal(0, 1, (17, 29)).astype(np.float32)
    outputs = {}
    for choice in ("numba", "numpy"):
        monkeypatch.setenv(kernels.KERNELS_ENV, choice)
        outputs[choice] = BundleSession("mlp.mann", model=model, threads=1).run("task", x)[0]
    np.testing.assert_allclose(outputs["numba"], outputs["numpy"], atol=ATOL, rtol=1e-5)


def test_load_passes_threads_to_the_bundle_session(tmp_path, backend):
    from mann_edge import runtime

    path = _mlp().save(tmp_path / "mlp.mann")
    session = runtime.load(path, threads=1)
    assert isinstance(session, BundleSession) and session.threads == 1
    x = np.ones((2, 29), np.float32)
    np.testing.assert_allclose(session.run("task", x)[0], _mlp().run("task", x)[0], atol=ATOL)


def test_the_pruned_fixture_runs_the_same_on_every_kernel_path(backend, pruned_compact):
    session = BundleSession("pruned.mann", model=pruned_compact, threads=1)
    for task in pruned_compact.tasks:
        for batch in (1, 32):
            x = np.random.default_rng(batch).normal(0, 1, (batch, 256)).astype(np.float32)
            np.testing.assert_allclose(session.run(task.name, x)[0], pruned_compact.run(task.name, x)[0], atol=ATOL)


@numba_only
@pytest.mark.parametrize("full", [True, False], ids=["full blocks", "one block with a zero"])
def test_full_blocks_take_the_csr_values_in_order_as_partial_ones_are_laid_out(full):
    # every block full (RSN2's block masks) skips the general layout; both must give the same blocks
    from mann_edge.runtime.fast_kernels import Blocks1x4

    rng = np.random.default_rng(16)
    matrix = np.repeat(rng.random((9, 5)) < 0.4, 4, axis=1)[:, :18] * rng.normal(0, 1, (9, 18)).astype(np.float32)
    matrix[:, 16:] = 0  # the last block column holds two inputs: keep it empty, so every block can be full
    matrix[1] = 0  # an empty row
    if not full:
        matrix[np.nonzero(matrix)[0][0], np.nonzero(matrix)[1][0]] = 0
    blocks = Blocks1x4.from_csr(CSRWeight.from_dense(matrix.T, "oi"), min_fill=0.5)
    assert (blocks.fill == 1.0) == full
    dense = np.zeros((9, blocks.padded_cols), np.float32)
    for row in range(9):
        for b in range(blocks.indptr[row], blocks.indptr[row + 1]):
            dense[row, 4 * blocks.columns[b]: 4 * blocks.columns[b] + 4] = blocks.values[4 * b: 4 * b + 4]
    np.testing.assert_array_equal(dense[:, :18], matrix)
    assert blocks.values.flags.writeable and blocks.columns.dtype == np.uint16
