"""A task of a compact model planned once per input size and run as one compiled call (numba).

Stepping through a task op by op in Python costs a few microseconds per op (binding the
arguments, allocating each output, numba's dispatch): on a small model that is most of a
run. Here a task is planned once per input shapes (`TaskProgram.plan`):

- the shapes of every tensor, from `mann_edge.graph.plan.check_run` (the same checks and
  the same `MAX_TENSOR_BYTES` limit as the op-by-op executor);
- its weights laid out once per task in a few flat arrays (float32 biases, tables and dense
  weights; the sparse kernels' values, float32 or float16 bits; their uint16 or uint32 indices;
  int64 slice pointers), one value and one index dtype per task, so a process loads one
  compiled variant of the interpreter;
- a buffer for every tensor and scratch array in one float32 arena, reused once a tensor's
  last reader has run (so the arena holds the live tensors, not all of them); a batch stays
  transposed, (features, batch), between two sparse products;
- a table of ops (a row of ints per op: its op code, then the offsets and sizes it works on).

A run then copies the inputs into the arena, makes one call to the compiled interpreter for
each stretch of compiled ops, and copies the outputs out. An op the interpreter does not know
(a new op type, an activation it does not compute, an input that comes from such an op with an
integer dtype) runs as its runtime op or reference op (`mann_edge.runtime.kernels.runtime_ops`)
between two stretches, reading and writing the arena.

Two interpreters: `run_program` runs every op; `run_stack_program` runs a task made of
products, activations and adds only (an MLP, as most MANN models are). Loading compiled code
from numba's cache costs in proportion to its size, so a layer stack's first run loads the
smaller one. `preload` starts that load on a background thread when a bundle opens.

Flatten and reshape cost nothing: channels-last tensors are contiguous, so their output
is their input's buffer. Sparse dense and conv kernels run on the sliced-ELLPACK (`Sell8`) and
1x4-block kernels of `mann_edge.runtime.fast_kernels`; a kernel small enough to sit in cache
with a quarter or more of it nonzero runs dense on BLAS instead (`DENSE_MAX_BYTES`). A conv
gathers its windows through an index made once per input size, then multiplies. The
interpreter is serial.

Example:
    >>> program = TaskProgram(compact_model, "digits", threads=1)
    >>> program.run({"digits_image": x})[0].shape
    (1, 10)
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from typing import Mapping

import numba
import numpy as np

from mann_edge.errors import InputError
from mann_edge.graph import plan as graph_plan
from mann_edge.graph.activations import normalize_activation
from mann_edge.graph.model import CompactModel, Node
from mann_edge.graph.ops import bind
from mann_edge.runtime.fast_kernels import (
    LANES,
    Blocks1x4,
    Sell8,
    _block_matmat_serial,
    _block_matvec_serial,
    _sell_matmat_serial,
    _sell_matvec_serial,
    aligned_empty,
    whole_tiles,
)
from mann_edge.runtime.kernels import Windows, runtime_ops
from mann_edge.sparse import CSRWeight, to_dense

__all__ = ["TaskProgram", "run_program", "run_stack_program", "compiled_op_types", "preload"]

# op codes of the interpreter; each op is a row of `_WIDTH` int64 in the program table
# (the codes up to `_ADD` make a layer stack, which `run_stack_program` runs on its own)
(_DENSE_SELL, _DENSE_BLOCK, _DENSE_FULL, _ACT, _ADD, _GATHER, _MAX_POOL, _AVG_POOL, _EMBED, _CONCAT, _PERMUTE,
 _REDUCE, _LAYER_NORM, _ATTENTION) = range(1, 15)
_WIDTH = 16
# activations the interpreter computes (`_ACT` kinds); any other runs as the node's op in Python
_LINEAR, _RELU, _SIGMOID, _TANH, _SOFTMAX = range(5)
_ACT_KINDS = {"linear": _LINEAR, "relu": _RELU, "sigmoid": _SIGMOID, "tanh": _TANH, "softmax": _SOFTMAX}
_PLAIN_RELU = normalize_activation("relu")
# A sparse kernel weight runs dense (BLAS) when its dense form stays in the core's cache (at most
# `DENSE_MAX_BYTES`) and a quarter or more of it is nonzero (`DENSE_MIN_DENSITY`). Measured on one
# core, 128 x 128 (us, batch 1 / batch 32; SELL against BLAS): 10 %: 0.9 / 3.6 against 0.9 / 8.1;
# 25 %: 1.3 / 4.9 against 1.1 / 8.3; 50 %: 2.2 / 8.6 against 1.1 / 8.1. RSN2's 90 % pruned weights
# stay sparse, as do larger weights (a 1000 x 1000 layer is 4 MB) whatever their density.
DENSE_MAX_BYTES = 128 * 1024
DENSE_MIN_DENSITY = 1 / 4
# errors `run_program` returns (0: none)
_ID_OUT_OF_RANGE = 1


def compiled_op_types() -> tuple[str, ...]:
    """The op types the compiled interpreter runs itself (others run in Python between its calls)."""
    return ("dense", "conv2d", "max_pool2d", "avg_pool2d", "embedding", "flatten", "reshape", "activation",
            "add", "concat", "transpose", "global_avg_pool", "global_max_pool", "layer_norm", "attention")


# a task made of these op types only is a layer stack (its ops' codes are at most `_ADD`): `run_stack_program` runs it
_STACK_OP_TYPES = frozenset({"dense", "activation", "add", "flatten", "reshape"})


# -- the interpreter ---------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _to_columns(act, x_off, n, k, dst, rows, lanes):
    """``dst`` (rows, lanes) = x (n, k) transposed; rows past k and lanes past n are zero (the block kernels' padding)."""
    x = act[x_off: x_off + n * k].reshape((n, k))
    y = act[dst: dst + rows * lanes].reshape((rows, lanes))
    y[:] = 0.0
    for b in range(n):
        for j in range(k):
            y[j, b] = x[b, j]


@numba.njit(cache=True, nogil=True)
def _from_columns(act, src, r, n, lanes, out_off):
    """out (n, r) = the first n lanes of ``src`` (r, lanes), transposed."""
    x = act[src: src + r * lanes].reshape((r, lanes))
    y = act[out_off: out_off + n * r].reshape((n, r))
    for b in range(n):
        for i in range(r):
            y[b, i] = x[i, b]


@numba.njit(cache=True, nogil=True)
def _dense_sell(op, wi, wf, data, indices_all, act):
    # op: code, n, k, r, x, out, slice pointers (wi; then the lanes' rows and lengths), x in columns, indices,
    # out in columns, values, bias, relu, scratch
    n, k, r, x_off, out_off = op[1], op[2], op[3], op[4], op[5]
    slices = (r + LANES - 1) // LANES
    sptr = wi[op[6]: op[6] + slices + 1]
    perm = wi[op[6] + slices + 1: op[6] + slices + 1 + slices * LANES]
    lengths = wi[op[6] + slices + 1 + slices * LANES: op[6] + slices + 1 + 2 * slices * LANES]
    entries = sptr[slices]
    indices = indices_all[op[8]: op[8] + entries]
    values = data[op[10]: op[10] + entries]
    bias = wf[op[11]: op[11] + r]
    relu = op[12] != 0
    if n == 1:
        _sell_matvec_serial(sptr, indices, values, perm, act[x_off: x_off + k], bias, relu, act[out_off: out_off + r])
        return
    lanes = whole_tiles(n)
    s, xt = _batch_input(op, act, k, k, lanes)
    y = out_off if op[9] else s
    _sell_matmat_serial(sptr, indices, values, perm, lengths, xt, lanes, bias, relu, act[y: y + r * lanes])
    if not op[9]:
        _from_columns(act, y, r, n, lanes, out_off)


@numba.njit(cache=True, nogil=True)
def _batch_input(op, act, k, kp, lanes):
    """The batch input of a sparse product as columns, (kp, lanes), and the scratch past it.

    A batch runs transposed, padded to whole tiles: each nonzero then adds one contiguous batch-wide
    row. op[7]: the input is kept so already (the output of the previous such product, op[9])."""
    s = op[13]
    if op[7]:
        return s, act[op[4]: op[4] + kp * lanes]
    _to_columns(act, op[4], op[1], k, s, kp, lanes)
    return s + kp * lanes, act[s: s + kp * lanes]


@numba.njit(cache=True, nogil=True)
def _dense_block(op, wi, wf, data, columns_all, act):
    # op: code, n, k, r, x, out, indptr, x in columns, columns, out in columns, values, bias, relu, scratch,
    # padded k
    n, k, r, x_off, out_off, kp = op[1], op[2], op[3], op[4], op[5], op[14]
    indptr = wi[op[6]: op[6] + r + 1]
    blocks = indptr[r]
    columns = columns_all[op[8]: op[8] + blocks]
    values = data[op[10]: op[10] + 4 * blocks]
    bias = wf[op[11]: op[11] + r]
    relu = op[12] != 0
    if n == 1:
        x = act[x_off: x_off + k]
        if kp != k:  # the last block reads past the inputs: zeros there
            _to_columns(act, x_off, n, k, op[13], kp, n)  # n (= 1), not a literal 1: that compiled a second variant
            x = act[op[13]: op[13] + kp]
        _block_matvec_serial(indptr, columns, values, x, bias, relu, act[out_off: out_off + r])
        return
    lanes = whole_tiles(n)
    s, xt = _batch_input(op, act, k, kp, lanes)
    y = out_off if op[9] else s
    _block_matmat_serial(indptr, columns, values, xt, lanes, bias, relu, act[y: y + r * lanes])
    if not op[9]:
        _from_columns(act, y, r, n, lanes, out_off)


@numba.njit(cache=True, nogil=True)
def _dense_full(op, wf, act):
    # op: code, n, k, r, x, out, weight (k, r), bias, relu; a weight kept dense goes to BLAS
    n, k, r, x_off, out_off, w_off, b_off, relu = op[1], op[2], op[3], op[4], op[5], op[6], op[7], op[8] != 0
    y = act[out_off: out_off + n * r].reshape((n, r))
    np.dot(act[x_off: x_off + n * k].reshape((n, k)), wf[w_off: w_off + k * r].reshape((k, r)), y)
    bias = wf[b_off: b_off + r]
    for b in range(n):
        for j in range(r):
            v = y[b, j] + bias[j]
            y[b, j] = 0.0 if relu and not v >= 0 else v


@numba.njit(cache=True, nogil=True)
def _gather(op, pi, act):
    # op: code, n, windows, cells, channels, pixels, x, out, table (windows, cells) of pixels (-1 in the padding),
    # columns, lanes. columns 0: the windows as rows (n * windows, cells * channels); 1: transposed,
    # (cells * channels, lanes), as the batch kernels read them, the lanes past n * windows zero.
    n, windows, cells, c, pixels, x_off, out_off, table = op[1], op[2], op[3], op[4], op[5], op[6], op[7], op[8]
    columns, lanes = op[9] != 0, op[10]
    x = act[x_off: x_off + n * pixels * c].reshape((n, pixels, c))
    index = pi[table: table + windows * cells].reshape((windows, cells))
    if columns:  # row by row of the output, so that the writes run along its lanes
        y = act[out_off: out_off + cells * c * lanes].reshape((cells, c, lanes))
        for cell in range(cells):
            for ch in range(c):
                row = y[cell, ch]
                for b in range(n):
                    lanes_b = row[b * windows: (b + 1) * windows]
                    for w in range(windows):
                        pixel = index[w, cell]
                        lanes_b[w] = x[b, pixel, ch] if pixel >= 0 else np.float32(0.0)
                row[n * windows:] = 0.0
        return
    if c == 1:  # one channel (a grey image): one value per cell, without the channel loop
        xs = act[x_off: x_off + n * pixels].reshape((n, pixels))
        ys = act[out_off: out_off + n * windows * cells].reshape((n, windows, cells))
        for b in range(n):
            for w in range(windows):
                for cell in range(cells):
                    pixel = index[w, cell]
                    ys[b, w, cell] = xs[b, pixel] if pixel >= 0 else np.float32(0.0)
        return
    y = act[out_off: out_off + n * windows * cells * c].reshape((n, windows, cells, c))
    for b in range(n):
        for w in range(windows):
            for cell in range(cells):
                pixel = index[w, cell]
                if pixel < 0:
                    for ch in range(c):
                        y[b, w, cell, ch] = 0.0
                else:
                    for ch in range(c):
                        y[b, w, cell, ch] = x[b, pixel, ch]


@numba.njit(cache=True, nogil=True)
def _pool(op, pi, act):
    # op: code (max or average), n, windows, cells, channels, pixels, x, out, table, counts (valid cells per
    # window); the inner loops run over contiguous channels
    average = op[0] == _AVG_POOL
    n, windows, cells, c, pixels, x_off, out_off, table, counts = op[1], op[2], op[3], op[4], op[5], op[6], op[7], \
        op[8], op[9]
    x = act[x_off: x_off + n * pixels * c].reshape((n, pixels, c))
    y = act[out_off: out_off + n * windows * c].reshape((n, windows, c))
    index = pi[table: table + windows * cells].reshape((windows, cells))
    for b in range(n):
        for w in range(windows):
            target = y[b, w]
            # the padding is -inf for the max (as the reference: every window holds a valid cell), left out of the mean
            target[:] = 0.0 if average else np.float32(-np.inf)
            for cell in range(cells):
                pixel = index[w, cell]
                if pixel < 0:
                    continue
                source = x[b, pixel]
                if average:
                    for ch in range(c):
                        target[ch] += source[ch]
                else:
                    for ch in range(c):
                        if source[ch] > target[ch]:
                            target[ch] = source[ch]
            if average:
                count = np.float32(pi[counts + w])
                for ch in range(c):
                    target[ch] = target[ch] / count


@numba.njit(cache=True, nogil=True)
def _embed(op, pi, wf, act):
    # op: code, ids, dim, vocab, ids offset (pi), table (wf), out
    count, dim, vocab, ids, table, out = op[1], op[2], op[3], op[4], op[5], op[6]
    rows = wf[table: table + vocab * dim].reshape((vocab, dim))
    y = act[out: out + count * dim].reshape((count, dim))
    for j in range(count):
        row = pi[ids + j]
        if row < 0 or row >= vocab:
            return _ID_OUT_OF_RANGE
        for d in range(dim):
            y[j, d] = rows[row, d]
    return 0


@numba.njit(cache=True, nogil=True)
def _activation(op, wf, act):
    # op: code, rows, width, x, out, kind, params (wf: relu's negative slope, max value (NaN: none), threshold)
    rows, width, x_off, out_off, kind, params = op[1], op[2], op[3], op[4], op[5], op[6]
    x = act[x_off: x_off + rows * width].reshape((rows, width))
    y = act[out_off: out_off + rows * width].reshape((rows, width))
    if kind == _RELU:
        slope, top, threshold = wf[params], wf[params + 1], wf[params + 2]
        for i in range(rows):
            for j in range(width):
                v = x[i, j]
                if v >= threshold:
                    value = v
                elif slope != 0:
                    value = slope * (v - threshold)
                else:
                    value = np.float32(0.0)
                if top == top and value > top:  # top is NaN when there is no max value
                    value = top
                y[i, j] = value
    elif kind == _SIGMOID:
        for i in range(rows):
            for j in range(width):
                y[i, j] = np.float32(1.0) / (np.float32(1.0) + np.exp(-x[i, j]))
    elif kind == _TANH:
        for i in range(rows):
            for j in range(width):
                y[i, j] = np.tanh(x[i, j])
    elif kind == _SOFTMAX:
        for i in range(rows):
            top = x[i, 0]
            for j in range(1, width):
                top = max(top, x[i, j])
            total = np.float32(0.0)
            for j in range(width):
                e = np.exp(x[i, j] - top)
                y[i, j] = e
                total += e
            for j in range(width):
                y[i, j] = y[i, j] / total
    elif x_off != out_off:
        for i in range(rows):
            for j in range(width):
                y[i, j] = x[i, j]


@numba.njit(cache=True, nogil=True)
def _add(op, pi, act):
    # op: code, size, out, inputs, list (pi: the inputs' offsets)
    size, out, count, inputs = op[1], op[2], op[3], op[4]
    y = act[out: out + size]
    x = act[pi[inputs]: pi[inputs] + size]
    for j in range(size):
        y[j] = x[j]
    for t in range(1, count):
        x = act[pi[inputs + t]: pi[inputs + t] + size]
        for j in range(size):
            y[j] += x[j]


@numba.njit(cache=True, nogil=True)
def _concat(op, pi, act):
    # op: code, outer, out, out inner, inputs, list (pi: offset, inner size per input)
    outer, out, width, count, inputs = op[1], op[2], op[3], op[4], op[5]
    y = act[out: out + outer * width].reshape((outer, width))
    start = 0
    for t in range(count):
        src, inner = pi[inputs + 2 * t], pi[inputs + 2 * t + 1]
        x = act[src: src + outer * inner].reshape((outer, inner))
        for i in range(outer):
            row = y[i, start: start + inner]
            for j in range(inner):
                row[j] = x[i, j]
        start += inner


@numba.njit(cache=True, nogil=True)
def _permute(op, pi, act):
    # op: code, n, size per example, x, out, table (pi: out[j] = x[table[j]] within an example)
    n, size, x_off, out, table = op[1], op[2], op[3], op[4], op[5]
    x = act[x_off: x_off + n * size].reshape((n, size))
    y = act[out: out + n * size].reshape((n, size))
    positions = pi[table: table + size]
    for b in range(n):
        for j in range(size):
            y[b, j] = x[b, positions[j]]


@numba.njit(cache=True, nogil=True)
def _reduce(op, pi, act):
    # op: code, n, size per example, groups, group size, x, out, table (pi: each group's positions), maximum
    n, size, groups, g, x_off, out, table, maximum = op[1], op[2], op[3], op[4], op[5], op[6], op[7], op[8] != 0
    x = act[x_off: x_off + n * size].reshape((n, size))
    y = act[out: out + n * groups].reshape((n, groups))
    positions = pi[table: table + groups * g].reshape((groups, g))
    for b in range(n):
        for j in range(groups):
            if maximum:
                value = x[b, positions[j, 0]]
                for t in range(1, g):
                    value = max(value, x[b, positions[j, t]])
            else:
                value = np.float32(0.0)
                for t in range(g):
                    value += x[b, positions[j, t]]
                value = value / np.float32(g)
            y[b, j] = value


@numba.njit(cache=True, nogil=True)
def _layer_norm_rows(x, y, wf, gamma, beta, epsilon):
    # each row of x normalized into y (y may be x)
    g = x.shape[1]
    for i in range(x.shape[0]):
        row, target = x[i], y[i]
        mean = np.float32(0.0)
        for t in range(g):
            mean += row[t]
        mean = mean / np.float32(g)
        variance = np.float32(0.0)
        for t in range(g):
            d = row[t] - mean
            variance += d * d
        scale = np.float32(1.0) / np.sqrt(variance / np.float32(g) + epsilon)
        for t in range(g):
            target[t] = (row[t] - mean) * scale
        if gamma >= 0:
            for t in range(g):
                target[t] = target[t] * wf[gamma + t]
        if beta >= 0:
            for t in range(g):
                target[t] = target[t] + wf[beta + t]


@numba.njit(cache=True, nogil=True)
def _layer_norm(op, pi, wf, act):
    # op: code, n, size per example, groups, group size, x, out, table (pi: each group's positions, in the
    # order of gamma and beta), gamma (wf, -1: none), beta (wf, -1: none), epsilon (wf), groups are rows
    n, size, groups, g, x_off, out, table = op[1], op[2], op[3], op[4], op[5], op[6], op[7]
    gamma, beta, epsilon = op[8], op[9], wf[op[10]]
    if op[11]:  # each group is a row (normalizing the last axis): no table
        _layer_norm_rows(act[x_off: x_off + n * size].reshape((n * groups, g)),
                         act[out: out + n * size].reshape((n * groups, g)), wf, gamma, beta, epsilon)
        return
    x = act[x_off: x_off + n * size].reshape((n, size))
    y = act[out: out + n * size].reshape((n, size))
    positions = pi[table: table + groups * g].reshape((groups, g))
    group = np.empty((1, g), np.float32)  # one group gathered into a row, normalized in place, put back
    for b in range(n):
        for j in range(groups):
            cells = positions[j]
            for t in range(g):
                group[0, t] = x[b, cells[t]]
            _layer_norm_rows(group, group, wf, gamma, beta, epsilon)
            for t in range(g):
                y[b, cells[t]] = group[0, t]


@numba.njit(cache=True, nogil=True)
def _attention(op, wf, act):
    # op: code, heads (batch times leading axes), tq, tv, d, dv, query, value, key, out, scale (wf), causal,
    # scratch (tq, tv) for the scores; the two products go to BLAS
    heads, tq, tv, d, dv = op[1], op[2], op[3], op[4], op[5]
    query, value, key, out, scale, causal, s0 = op[6], op[7], op[8], op[9], wf[op[10]], op[11] != 0, op[12]
    scores = act[s0: s0 + tq * tv].reshape((tq, tv))
    for h in range(heads):
        q = act[query + h * tq * d: query + (h + 1) * tq * d].reshape((tq, d))
        k = act[key + h * tv * d: key + (h + 1) * tv * d].reshape((tv, d))
        v = act[value + h * tv * dv: value + (h + 1) * tv * dv].reshape((tv, dv))
        np.dot(q, k.T, scores)
        for i in range(tq):
            row = scores[i]
            top = np.float32(-np.inf)  # float32 throughout: a float64 here would make every exp a double one
            for j in range(tv):
                score = row[j] * scale
                if causal and j > i:  # as Keras: the masked score minus 1e9, so its weight is 0
                    score = score + np.float32(-1e9)
                row[j] = score
                top = max(top, score)
            total = np.float32(0.0)
            for j in range(tv):
                e = np.exp(row[j] - top)
                row[j] = e
                total += e
            for j in range(tv):
                row[j] = row[j] / total
        np.dot(scores, v, act[out + h * tq * dv: out + (h + 1) * tq * dv].reshape((tq, dv)))


@numba.njit(cache=True, nogil=True)
def _stack_op(op, wi, pi, wf, values, indices, act):
    """Runs one op of a layer stack: a product, an activation or an add (codes up to `_ADD`)."""
    code = op[0]
    if code == _DENSE_SELL:
        _dense_sell(op, wi, wf, values, indices, act)
    elif code == _DENSE_BLOCK:
        _dense_block(op, wi, wf, values, indices, act)
    elif code == _DENSE_FULL:
        _dense_full(op, wf, act)
    elif code == _ACT:
        _activation(op, wf, act)
    elif code == _ADD:
        _add(op, pi, act)


@numba.njit(cache=True, nogil=True)
def run_program(program, first, last, wi, pi, wf, values, indices, act):
    """Runs rows ``first`` to ``last`` of ``program`` over the arena ``act``; returns 0, or an error code.

    ``wi`` (int64: row pointers), ``wf`` (float32: biases, tables, dense weights), ``values`` (the
    sparse kernels' values: float32, or float16 as their uint16 bits) and ``indices`` (uint16 or
    uint32) hold the task's weights; ``pi`` (int64) the plan's window tables, id inputs and input
    lists. One task uses one value and one index dtype, so numba compiles (and a process loads) only
    that variant. No bounds checks: `TaskProgram.plan` lays every offset out from shapes `check_run`
    accepted.
    """
    for p in range(first, last):
        op = program[p]
        code = op[0]
        if code <= _ADD:
            _stack_op(op, wi, pi, wf, values, indices, act)
        elif code == _GATHER:
            _gather(op, pi, act)
        elif code == _MAX_POOL or code == _AVG_POOL:
            _pool(op, pi, act)
        elif code == _EMBED:
            error = _embed(op, pi, wf, act)
            if error:
                return error
        elif code == _CONCAT:
            _concat(op, pi, act)
        elif code == _PERMUTE:
            _permute(op, pi, act)
        elif code == _REDUCE:
            _reduce(op, pi, act)
        elif code == _LAYER_NORM:
            _layer_norm(op, pi, wf, act)
        elif code == _ATTENTION:
            _attention(op, wf, act)
    return 0


@numba.njit(cache=True, nogil=True)
def run_stack_program(program, first, last, wi, pi, wf, values, indices, act):
    """`run_program` for a program of layer-stack ops only (products, activations, adds: an MLP, most MANN models).

    Its machine code is a third of `run_program`'s, and loading compiled code from numba's cache
    costs in proportion to it (LLVM parses the whole module's bitcode): the paper-scale model's
    first run took about 28 ms on it against 45 on `run_program` (measured before `preload`).
    """
    for p in range(first, last):
        _stack_op(program[p], wi, pi, wf, values, indices, act)
    return 0


def _interpreter(nodes) -> numba.core.registry.CPUDispatcher:
    """The interpreter that runs a task of ``nodes``: `run_stack_program` for a layer stack, else `run_program`."""
    return run_stack_program if all(node.op in _STACK_OP_TYPES for node in nodes) else run_program


def _kernel_dtypes(nodes, weights: Mapping) -> tuple[type, type]:
    """(values, indices) dtypes of a task's sparse kernels: one of each per task, so a process loads one variant.

    Float16 (as uint16 bits) only if every sparse kernel is float16; uint32 indices only if a
    kernel has more than 65,536 inputs.
    """
    sparse = [weights[node.weights["kernel"]] for node in nodes if node.op in ("dense", "conv2d")]
    sparse = [w for w in sparse if isinstance(w, CSRWeight)]
    half = bool(sparse) and all(w.data.dtype == np.float16 for w in sparse)
    wide = any(w.matrix_shape[1] > 1 << 16 for w in sparse)
    return np.uint16 if half else np.float32, np.uint32 if wide else np.uint16


_preloads: list[threading.Thread] = []


def preload(model: CompactModel) -> None:
    """Starts loading the compiled interpreters ``model``'s tasks run, from numba's cache, on a background thread.

    A task's first run otherwise waits for its interpreter: numba unpickles it and LLVM parses its
    bitcode (about 13 ms for `run_stack_program`, 27 for `run_program` here). Started when a bundle
    opens, the load overlaps the caller's work and the task's layout. Where numba has not compiled
    them yet it compiles them, as the first run would have.

    Example:
        >>> preload(load_compact("model.mann"))   # the first `TaskProgram.run` then finds its interpreter loaded
    """
    variants = set()
    for task in model.tasks:
        nodes = model.task_nodes(task.name)
        variants.add((_interpreter(nodes), *_kernel_dtypes(nodes, model.weights)))
    thread = threading.Thread(target=_load_interpreters, args=(variants,), name="mann-edge interpreter preload",
                              daemon=True)
    _preloads[:] = [*(t for t in _preloads if t.is_alive()), thread]
    thread.start()


def _load_interpreters(variants) -> None:
    for interpreter, value_dtype, index_dtype in variants:
        try:
            interpreter.compile(_argument_types(value_dtype, index_dtype))
        except Exception:  # noqa: BLE001  (the task's run compiles the same signature and raises it there)
            return


def _argument_types(value_dtype, index_dtype) -> tuple:
    """The numba types of an interpreter's arguments in a run (the signature it is compiled for)."""
    # the program table, two row numbers, the row pointers, the plan's tables, the float weights, the kernels'
    # values and indices, the arena
    arguments = (np.zeros((1, _WIDTH), np.int64), 0, 0, np.zeros(1, np.int64), np.zeros(1, np.int64),
                 np.zeros(1, np.float32), np.zeros(1, value_dtype), np.zeros(1, index_dtype), np.zeros(1, np.float32))
    return tuple(numba.typeof(argument) for argument in arguments)


def _finish_preloads() -> None:
    # a fork while a preload holds numba's compiler lock would leave the child a lock nobody releases
    while _preloads:
        _preloads.pop().join()


os.register_at_fork(before=_finish_preloads)


# -- the task's weights, laid out once ---------------------------------------------------------------


class _Arrays:
    """Flat arrays of one dtype that grow while a task is laid out; `freeze` makes the one array the kernels read."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self.parts: list[np.ndarray] = []
        self.size = 0

    def add(self, values) -> int:
        """Appends ``values`` (cast to the dtype); returns their offset."""
        values = np.ascontiguousarray(np.asarray(values).reshape(-1), self.dtype)
        offset = self.size
        self.parts.append(values)
        self.size += values.size
        return offset

    def freeze(self) -> np.ndarray:
        # one spare element, so an array with nothing in it still has a valid data pointer
        return np.concatenate(self.parts + [np.zeros(1, self.dtype)])


def _runs_dense(weight: CSRWeight) -> bool:
    """Whether the program multiplies ``weight`` dense (see `DENSE_MAX_BYTES`)."""
    rows, cols = weight.matrix_shape
    return 4 * rows * cols <= DENSE_MAX_BYTES and weight.nnz >= DENSE_MIN_DENSITY * rows * cols


def _fused(activation: dict) -> tuple[bool, dict | None]:
    """(relu fused into the kernel, activation left to an `_ACT` op or None) for a node's activation."""
    if activation == _PLAIN_RELU:
        return True, None
    if activation["name"] == "linear":
        return False, None
    return False, activation


def _compilable_activation(activation: dict, rank: int) -> bool:
    if activation["name"] not in _ACT_KINDS:
        return False
    return activation["name"] != "softmax" or activation["axis"] in (-1, rank - 1)


@dataclass
class _Layer:
    """A dense or conv node's kernel in the task's arrays: which kernel and where its weights are."""

    code: int
    rows: int
    cols: int
    words: dict = field(default_factory=dict)  # op row position -> value: pointers, indices, values, bias offsets


# -- one task ----------------------------------------------------------------------------------------


class _Arena:
    """Buffers in one float32 array, handed out first-fit and given back once their last reader ran.

    Sizes are rounded up to whole cache lines (`ALIGN` floats), so every buffer of the 64-byte aligned
    arena starts on one: the batch kernels' 16-lane loads then never straddle two lines.
    """

    ALIGN = 16

    def __init__(self):
        self.free: list[tuple[int, int]] = []  # (offset, size), sorted by offset
        self.end = 0

    def take(self, size: int) -> int:
        size = -(-max(int(size), 1) // self.ALIGN) * self.ALIGN
        for i, (offset, room) in enumerate(self.free):
            if room >= size:
                if room == size:
                    del self.free[i]
                else:
                    self.free[i] = (offset + size, room - size)
                return offset
        offset = self.end
        self.end += size
        return offset

    def give(self, offset: int, size: int) -> None:
        size = -(-max(int(size), 1) // self.ALIGN) * self.ALIGN
        self.free.append((offset, size))
        self.free.sort()
        merged: list[tuple[int, int]] = []
        for start, room in self.free:  # neighbours become one buffer again
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + room)
            else:
                merged.append((start, room))
        self.free = merged


@dataclass
class _Plan:
    """One task planned for one set of input shapes."""

    program: np.ndarray  # (ops, _WIDTH) int64
    pi: np.ndarray
    act: np.ndarray
    steps: list  # ("program", first, last) or ("python", node index)
    slots: dict  # tensor -> (offset, shape) in act
    inputs: list = field(default_factory=list)  # (input name, its buffer: a view of act, or of pi for ids)
    outputs: list = field(default_factory=list)  # (tensor, its buffer or None for a value kept in Python)

    def __post_init__(self):
        self.whole = len(self.steps) == 1 and self.steps[0][0] == "program"  # one compiled call does it all


class TaskProgram:
    """One task of a compact model: its weights laid out for `run_program`, and a plan per input shapes.

    Args:
        model: the compact model.
        task: the task's name.
        threads: threads for the ops that run in Python (the interpreter itself is serial).

    Example:
        >>> program = TaskProgram(model, "cancer")
        >>> y = program.run({"cancer_features": x})[0]
    """

    # plans kept, the oldest dropped first: callers use a few batch sizes
    _MAX_PLANS = 32

    def __init__(self, model: CompactModel, task: str, threads: int | None = 1):
        self.task = model.task(task)
        self.nodes = model.task_nodes(task)
        self.weights = {key: model.weights[key] for node in self.nodes for key in node.weights.values()}
        self._model_weights = model.weights
        self._registry = runtime_ops(threads)
        self._bound: dict[str, object] = {}
        self._plans: dict[tuple, _Plan] = {}
        # a plan's buffers serve one run at a time: callers on several threads take turns (re-entrant: `run`
        # plans under it)
        self._lock = threading.RLock()
        self.interpreter = _interpreter(self.nodes)
        self._layout()

    # weights ------------------------------------------------------------------

    def _layout(self) -> None:
        value_dtype, index_dtype = _kernel_dtypes(self.nodes, self.weights)
        self.half = value_dtype == np.uint16
        wi, wf = _Arrays(np.int64), _Arrays(np.float32)
        values, indices = _Arrays(value_dtype), _Arrays(index_dtype)
        self.layers: dict[str, _Layer] = {}
        self.tables: dict[str, int] = {}
        self.params: dict[str, int] = {}
        self.nnz = 0  # multiply-adds per example of the kernels (a weight run dense counts every entry)
        self.nonzeros = 0  # the weights' stored nonzeros
        self.kernel_bytes = 0  # bytes of weights a batch-1 run of the kernels reads (values, indices, pointers)
        for node in self.nodes:
            if node.op in ("dense", "conv2d"):
                self.layers[node.name] = self._layer(node, wi, wf, values, indices)
            elif node.op == "embedding":
                self.tables[node.name] = wf.add(to_dense(self.weights[node.weights["table"]]))
            if node.op == "layer_norm":
                attrs = node.attrs
                self.params[node.name] = wf.add([attrs["epsilon"]])
                for role in ("gamma", "beta"):
                    if role in node.weights:
                        self.tables[f"{node.name}/{role}"] = wf.add(to_dense(self.weights[node.weights[role]]))
            elif node.op == "attention":
                self.params[node.name] = wf.add([node.attrs.get("scale", 1.0)])
            activation = node.attrs.get("activation")
            if activation is not None:
                activation = normalize_activation(activation)
                if activation["name"] == "relu":
                    top = activation["max_value"]
                    self.params[node.name] = wf.add([activation["negative_slope"],
                                                     np.nan if top is None else top, activation["threshold"]])
        self.wi, self.wf, self.values, self.indices = wi.freeze(), wf.freeze(), values.freeze(), indices.freeze()

    def _layer(self, node: Node, wi, wf, values_out: _Arrays, indices_out: _Arrays) -> _Layer:
        kernel = self.weights[node.weights["kernel"]]
        bias_key = node.weights.get("bias")
        if isinstance(kernel, CSRWeight):
            rows, cols = kernel.matrix_shape
        else:
            cols, rows = int(np.prod(kernel.shape[:-1])), int(kernel.shape[-1])
        bias = np.zeros(rows, np.float32) if bias_key is None else to_dense(self.weights[bias_key])
        bias_offset = wf.add(bias)
        if not isinstance(kernel, CSRWeight) or _runs_dense(kernel):
            weight = np.asarray(to_dense(kernel), np.float32).reshape(cols, rows)
            self.nnz += weight.size
            self.nonzeros += int(np.count_nonzero(weight))
            self.kernel_bytes += weight.nbytes + 4 * rows
            return _Layer(_DENSE_FULL, rows, cols, {6: wf.add(weight), 7: bias_offset})
        self.nnz += kernel.nnz
        self.nonzeros += kernel.nnz
        blocks = Blocks1x4.from_csr(kernel)
        if blocks is not None:
            code, pointers, indices, values = _DENSE_BLOCK, blocks.indptr, blocks.columns, blocks.values
        else:
            sell = Sell8.from_csr(kernel)
            code, indices, values = _DENSE_SELL, sell.indices, sell.values
            pointers = np.concatenate([sell.sptr, sell.perm, sell.lengths])
        unread = sell.lengths.nbytes if code == _DENSE_SELL else 0  # the lane lengths serve batches only
        self.kernel_bytes += pointers.nbytes - unread + indices.nbytes + values.nbytes + 4 * rows
        words = {
            6: wi.add(pointers),
            8: indices_out.add(indices),
            10: values_out.add(values.view(np.uint16) if self.half else values),
            11: bias_offset,
        }
        if code == _DENSE_BLOCK:
            words[14] = blocks.padded_cols
        return _Layer(code, rows, cols, words)

    # plans --------------------------------------------------------------------

    def _compiled(self, node: Node, shapes: Mapping, python_values: set, int_inputs: set) -> bool:
        """Whether the interpreter runs ``node`` (else its op runs in Python)."""
        if node.op not in compiled_op_types() or any(name in python_values for name in node.inputs):
            return False
        if node.op == "embedding":  # the interpreter reads ids from the caller's integer inputs only
            return node.inputs[0] in int_inputs
        if any(name in int_inputs for name in node.inputs):
            return False
        if node.op == "attention":  # dot scores only; 'concat' scores run in Python
            return node.attrs.get("score_mode", "dot") == "dot" and len({len(shapes[i]) for i in node.inputs}) == 1 \
                and len({tuple(shapes[i][:-2]) for i in node.inputs}) == 1
        if node.op in ("dense", "conv2d", "activation"):
            _, rest = _fused(normalize_activation(node.attrs.get("activation")))
            if rest is not None and not _compilable_activation(rest, len(shapes[node.name])):
                return False
        return True

    def plan(self, shapes: Mapping[str, tuple]) -> "_Plan | None":
        """The plan for inputs of ``shapes`` (by input name, in the task's input order); InputError (naming the
        node) if they do not fit the task, None if its buffers would take more than `MAX_TENSOR_BYTES` (then
        the caller runs op by op). Planned once per shapes; a few dozen are kept."""
        with self._lock:
            return self._plan(shapes)

    def _plan(self, shapes: Mapping[str, tuple]) -> "_Plan | None":
        key = tuple(shapes.values())
        if key in self._plans:
            return self._plans[key]
        try:
            known = graph_plan.check_run(self.nodes, self.weights, shapes)
        except ValueError as error:
            raise InputError(f"Task {self.task.name!r}: {error}") from None
        built = self._build(known)
        if len(self._plans) >= self._MAX_PLANS:
            self._plans.pop(next(iter(self._plans)))
        self._plans[key] = built
        return built

    def _build(self, shapes: Mapping[str, tuple]) -> "_Plan | None":
        nodes = self.nodes
        outputs = set(self.task.output_tensors)
        # tensors only Python handles: outputs of Python ops that are not float (an op's own dtype)
        int_inputs = {spec.name for spec in self.task.inputs if not spec.dtype.startswith("float")}
        python_values: set[str] = set()
        compiled: list[bool] = []
        for node in nodes:
            flag = self._compiled(node, shapes, python_values, int_inputs)
            compiled.append(flag)
            if not flag and node.dtype not in ("float32", "float16"):
                python_values.add(node.name)
        # tensors kept transposed, (features, batch padded to whole tiles), between two sparse products of a batch:
        # transposing in and out of every product costs a fifth of a 1000 x 1000 layer's time at batch 32
        readers: dict[str, list[int]] = {}
        for index, node in enumerate(nodes):
            for name in node.inputs:
                readers.setdefault(name, []).append(index)

        def sparse_batch(index: int) -> bool:
            node = nodes[index]
            return (compiled[index] and node.op == "dense"
                    and self.layers[node.name].code in (_DENSE_SELL, _DENSE_BLOCK)
                    and math.prod(shapes[node.inputs[0]][:-1]) > 1)

        def writes_columns(index: int) -> bool:  # an activation the kernel does not fuse runs on rows
            return sparse_batch(index) and _fused(normalize_activation(nodes[index].attrs.get("activation")))[1] is None

        def reads_columns(index: int) -> bool:
            return sparse_batch(index) and self._takes_columns(self.layers[nodes[index].name])

        columnar = {node.name for index, node in enumerate(nodes)
                    if writes_columns(index) and node.name not in outputs and readers.get(node.name)
                    and all(reads_columns(reader) for reader in readers[node.name])}
        # a tensor's buffer: its own, or (flatten, reshape) its input's
        owner: dict[str, str] = {}
        last_use: dict[str, int] = {}
        for index, node in enumerate(nodes):
            for name in node.inputs:
                last_use[owner.get(name, name)] = index
            if compiled[index] and node.op in ("flatten", "reshape"):
                owner[node.name] = owner.get(node.inputs[0], node.inputs[0])
        for name in outputs:
            last_use[owner.get(name, name)] = len(nodes)

        arena, pi = _Arena(), _Arrays(np.int64)
        slots: dict[str, tuple[int, tuple]] = {}
        sizes: dict[str, int] = {}  # floats of each tensor's buffer
        plan_inputs: dict[str, tuple] = {}
        for spec in self.task.inputs:
            shape = tuple(shapes[spec.name])
            size = math.prod(shape)
            if spec.name in int_inputs:  # Python ops read the caller's array; the interpreter a copy as int64
                plan_inputs[spec.name] = ("i", pi.add(np.zeros(size, np.int64)), size)
                slots[spec.name] = (plan_inputs[spec.name][1], shape)
            else:
                offset = arena.take(size)
                slots[spec.name], sizes[spec.name] = (offset, shape), size
                plan_inputs[spec.name] = ("f", offset, size)

        rows: list[list[int]] = []
        steps: list[tuple] = []

        def release(index: int) -> None:
            for name in set(nodes[index].inputs):
                base = owner.get(name, name)
                if last_use.get(base) == index and base in sizes:
                    arena.give(slots[base][0], sizes[base])

        for index, node in enumerate(nodes):
            shape = tuple(shapes[node.name])
            if not compiled[index]:
                if node.name not in python_values:
                    sizes[node.name] = math.prod(shape)
                    slots[node.name] = (arena.take(sizes[node.name]), shape)
                steps.append(("python", index))
                release(index)
                continue
            if node.op in ("flatten", "reshape"):
                slots[node.name] = (slots[owner[node.name]][0], shape)
                continue
            sizes[node.name] = math.prod(shape)
            if node.name in columnar:
                sizes[node.name] = shape[-1] * whole_tiles(math.prod(shape[:-1]))
            out = arena.take(sizes[node.name])
            slots[node.name] = (out, shape)
            start = len(rows)
            self._emit(node, shapes, slots, out, arena, pi, rows, columnar)
            if steps and steps[-1][0] == "program" and steps[-1][2] == start:
                steps[-1] = ("program", steps[-1][1], len(rows))
            else:
                steps.append(("program", start, len(rows)))
            release(index)

        if arena.end * 4 > graph_plan.MAX_TENSOR_BYTES:
            return None
        program = np.zeros((max(len(rows), 1), _WIDTH), np.int64)
        for i, row in enumerate(rows):
            program[i, : len(row)] = row
        act = aligned_empty(arena.end + 1)
        act[:] = 0.0
        built = _Plan(program, pi.freeze(), act, steps, slots)
        for name, (kind, offset, size) in plan_inputs.items():
            buffer = built.act if kind == "f" else built.pi
            built.inputs.append((name, buffer[offset: offset + size].reshape(shapes[name])))
        for tensor in self.task.output_tensors:
            if tensor in python_values or tensor in int_inputs:
                built.outputs.append((tensor, None))
            else:
                offset, shape = slots[tensor]
                built.outputs.append((tensor, built.act[offset: offset + math.prod(shape)].reshape(shape)))
        return built

    @staticmethod
    def _takes_columns(layer: "_Layer") -> bool:
        """Whether the layer's batch kernel can read its input as the columns another op wrote: SELL always,
        1x4 blocks when no padding row follows the inputs (their kernel reads a multiple of 4)."""
        return layer.code == _DENSE_SELL or (layer.code == _DENSE_BLOCK and layer.words[14] == layer.cols)

    def _activation_row(self, node: Node, activation: dict, rows_n: int, width: int, x: int, out: int) -> list[int]:
        kind = _ACT_KINDS[activation["name"]]
        return [_ACT, rows_n, width, x, out, kind, self.params.get(node.name, 0)]

    def _emit(self, node: Node, shapes, slots, out: int, arena: _Arena, pi: _Arrays, rows: list,
              columnar: set = frozenset()) -> None:
        """Appends the interpreter rows that compute ``node`` into the buffer at ``out`` (``columnar``: the
        tensors kept transposed between two sparse products)."""
        shape = tuple(shapes[node.name])
        x_shape = tuple(shapes[node.inputs[0]]) if node.inputs else ()
        x = slots[node.inputs[0]][0] if node.inputs else 0
        if node.op in ("dense", "conv2d"):
            layer = self.layers[node.name]
            fused, rest = _fused(normalize_activation(node.attrs.get("activation")))
            scratch: list[tuple[int, int]] = []
            if node.op == "conv2d":
                kh, kw, cin, _ = self.weights[node.weights["kernel"]].shape
                windows = Windows((kh, kw), node.attrs["strides"], node.attrs["padding"],
                                  node.attrs.get("dilation", (1, 1)))
                n, height, width, channels = x_shape
                index, _, _ = windows.index(height, width, channels)
                pixels = np.where(index[:, :, 0] < height * width * channels, index[:, :, 0] // channels, -1)
                count = n * pixels.shape[0]
                columns = self._takes_columns(layer) and count > 1
                lanes = whole_tiles(count) if columns else count
                patches = arena.take(lanes * layer.cols)
                scratch.append((patches, lanes * layer.cols))
                rows.append([_GATHER, n, pixels.shape[0], kh * kw, channels, height * width, x, patches,
                             pi.add(pixels), int(columns), lanes])
                x = patches
            else:
                count = math.prod(x_shape[:-1])
            row = [layer.code, count, layer.cols, layer.rows, x, out] + [0] * 10
            for position, value in layer.words.items():
                row[position] = value
            if layer.code == _DENSE_FULL:
                row[8] = int(fused)
            else:
                row[12] = int(fused)
                row[7] = int((node.op == "conv2d" and columns) or (node.op == "dense" and node.inputs[0] in columnar))
                row[9] = int(node.name in columnar)
                padded = row[14] if layer.code == _DENSE_BLOCK else layer.cols
                lanes = whole_tiles(count)
                if layer.code == _DENSE_SELL and count == 1:
                    size = 0
                elif count == 1:
                    size = padded
                else:  # transposed input and output, unless kept so already
                    size = (0 if row[7] else padded * lanes) + (0 if row[9] else layer.rows * lanes)
                if size:
                    row[13] = arena.take(size)
                    scratch.append((row[13], size))
            rows.append(row[:_WIDTH])
            if rest is not None:
                rows.append(self._activation_row(node, rest, math.prod(shape[:-1]), shape[-1], out, out))
            for offset, size in scratch:
                arena.give(offset, size)
        elif node.op in ("max_pool2d", "avg_pool2d"):
            windows = Windows(node.attrs["pool_size"], node.attrs["strides"], node.attrs["padding"])
            n, height, width, channels = x_shape
            index, _, counts = windows.index(height, width, channels)
            pixels = np.where(index[:, :, 0] < height * width * channels, index[:, :, 0] // channels, -1)
            code = _MAX_POOL if node.op == "max_pool2d" else _AVG_POOL
            rows.append([code, n, pixels.shape[0], pixels.shape[1], channels, height * width, x, out, pi.add(pixels),
                         pi.add(counts)])
        elif node.op == "embedding":
            table = self.weights[node.weights["table"]]
            rows.append([_EMBED, math.prod(x_shape), table.shape[1], table.shape[0], x, self.tables[node.name], out])
        elif node.op == "activation":
            activation = normalize_activation(node.attrs.get("activation"))
            rows.append(self._activation_row(node, activation, math.prod(shape[:-1]), shape[-1], x, out))
        elif node.op == "add":
            offsets = [slots[name][0] for name in node.inputs]
            rows.append([_ADD, math.prod(shape), out, len(offsets), pi.add(offsets)])
        elif node.op == "concat":
            axis = node.attrs["axis"]
            pairs = []
            for name in node.inputs:
                pairs += [slots[name][0], math.prod(shapes[name][axis:])]
            rows.append([_CONCAT, math.prod(shape[:axis]), out, math.prod(shape[axis:]), len(node.inputs),
                         pi.add(pairs)])
        elif node.op == "transpose":
            order = np.arange(math.prod(x_shape[1:]), dtype=np.int64).reshape(x_shape[1:])
            table = np.transpose(order, [p - 1 for p in node.attrs["perm"][1:]])
            rows.append([_PERMUTE, x_shape[0], order.size, x, out, pi.add(table)])
        elif node.op in ("global_avg_pool", "global_max_pool", "layer_norm"):
            axes = sorted(a % len(x_shape) for a in node.attrs["axes"])
            kept = [a for a in range(1, len(x_shape)) if a not in axes]
            order = np.arange(math.prod(x_shape[1:]), dtype=np.int64).reshape(x_shape[1:])
            group = math.prod(x_shape[a] for a in axes)
            table = np.transpose(order, [a - 1 for a in kept + axes]).reshape(-1, group)
            common = [x_shape[0], order.size, table.shape[0], group, x, out, pi.add(table)]
            if node.op == "layer_norm":
                gamma = self.tables.get(f"{node.name}/gamma", -1)
                beta = self.tables.get(f"{node.name}/beta", -1)
                by_rows = int(np.array_equal(table, order.reshape(-1, group)))
                rows.append([_LAYER_NORM, *common, gamma, beta, self.params[node.name], by_rows])
            else:
                rows.append([_REDUCE, *common, int(node.op == "global_max_pool")])
        elif node.op == "attention":
            query, value, key = (tuple(shapes[name]) for name in node.inputs)
            q, v, k = (slots[name][0] for name in node.inputs)
            scores = arena.take(query[-2] * key[-2])
            rows.append([_ATTENTION, math.prod(query[:-2]), query[-2], key[-2], query[-1], value[-1], q, v, k, out,
                         self.params[node.name], int(bool(node.attrs.get("causal", False))), scores])
            arena.give(scores, query[-2] * key[-2])
        else:  # pragma: no cover - `_compiled` lets only the types above through
            raise AssertionError(node.op)

    # running ------------------------------------------------------------------

    def _op(self, node: Node):
        op = self._bound.get(node.name)
        if op is None:
            op = self._bound[node.name] = bind(node, self._model_weights, self._registry)
        return op

    @property
    def bytes_per_nonzero(self) -> float:
        """Weight bytes a batch-1 run reads per stored nonzero (values, indices, pointers, biases; inputs aside)."""
        return self.kernel_bytes / self.nonzeros if self.nonzeros else 0.0

    def work(self, batch: int) -> int:
        """Multiply-adds of the task's dense and conv kernels per example times ``batch`` (the conv's windows aside)."""
        return self.nnz * batch

    def run(self, inputs: Mapping[str, np.ndarray], plan: "_Plan | None" = None) -> list[np.ndarray]:
        """The task's outputs for ``inputs`` (checked by `normalize_inputs`), planned for their shapes.

        Raises:
            InputError: the shapes do not fit the task, or an id is outside its embedding table.
        """
        with self._lock:
            if plan is None:
                plan = self.plan({name: array.shape for name, array in inputs.items()})
            return self._run(plan, inputs)

    def _run(self, plan: _Plan, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        act, pi = plan.act, plan.pi
        for name, buffer in plan.inputs:
            buffer[...] = inputs[name]
        if plan.whole:  # the common case, kept short: it is most of a small model's run
            if self.interpreter(plan.program, 0, len(plan.program), self.wi, pi, self.wf, self.values, self.indices, act):
                raise InputError(f"Task {self.task.name!r}: an embedding received an id outside its table")
            return [buffer.copy() for _, buffer in plan.outputs]
        values: dict[str, np.ndarray] = {}
        for step in plan.steps:
            if step[0] == "program":
                error = self.interpreter(plan.program, step[1], step[2], self.wi, pi, self.wf, self.values, self.indices,
                                         act)
                if error:
                    raise InputError(f"Task {self.task.name!r}: an embedding received an id outside its table")
                continue
            node = self.nodes[step[1]]
            arguments = [self._read(plan, values, inputs, name) for name in node.inputs]
            result = self._op(node).run(*arguments)
            if node.name in plan.slots:
                offset, shape = plan.slots[node.name]
                if tuple(result.shape) != tuple(shape):
                    raise InputError(f"Op {node.op} (node '{node.name}') gave shape {tuple(result.shape)}, "
                                     f"its shape rule says {tuple(shape)}")
                act[offset: offset + result.size] = result.reshape(-1)
            else:
                values[node.name] = np.array(result, copy=True)
        results = []
        for tensor, buffer in plan.outputs:
            if buffer is not None:
                results.append(buffer.copy())
            else:
                results.append(values[tensor] if tensor in values else inputs[tensor])
        return results

    @staticmethod
    def _read(plan: _Plan, values: dict, inputs: Mapping, name: str) -> np.ndarray:
        if name in values:
            return values[name]
        if name in inputs:  # the caller's array, as checked (ids keep their dtype)
            return inputs[name]
        offset, shape = plan.slots[name]
        return plan.act[offset: offset + math.prod(shape)].reshape(shape)


def _initialise_numba() -> None:
    """Sets up numba's compiler context now, when the module is imported, rather than in a task's first run.

    numba builds that context (its typing and lowering registries, about 0.2 s) on the first call
    of any compiled function in a process, cached or not. A bundle session imports this module when
    it opens (`BundleSession`), so the cost is paid with the runtime's import, and the first run of
    a task only loads its compiled program from numba's cache.
    """
    _to_columns(np.zeros(1, np.float32), 0, 0, 0, 0, 0, 0)


_initialise_numba()
