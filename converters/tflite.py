"""TFLite export: one ``.tflite`` file with one signature per task, run by LiteRT.

What stays sparse: with ``sparse=True`` the converter's ``EXPERIMENTAL_SPARSITY`` stores
every FULLY_CONNECTED and CONV_2D kernel with at least 30 % zeros in TFLite's own
compressed encoding (a dense row dimension over a CSR column dimension, uint8/uint16
indices where they fit). Embedding tables, biases and normalisation weights stay dense
(TFLite has no sparse encoding for them). ``sparse=False`` stores every weight dense:
the baseline for size ratios and benchmarks.

What runs sparse: only FULLY_CONNECTED weights with 1x4 blocks (four consecutive inputs
of one output unit, float) or 1x16 blocks (int8) reach TFLite's sparse FULLY_CONNECTED
kernel; RSN2 gives such masks with ``mask_model(..., block_size=4)`` (16 for int8).
Unstructured sparsity (what RSN2 pruning gives by default) gets a DENSIFY op in front of
its consumer: the weight is expanded once when the interpreter prepares the model and
runs dense. In sparse exports a dense kernel whose input size is not a multiple of the
block (4, or 16 for int8) is padded to one (a PAD op on its input), because the
converter's block encoder mis-encodes such kernels (see
`mann_edge.converters.tf_lowering.LoweringOptions`).

Choices, and why:
- The compact graph is lowered to TensorFlow ops (`mann_edge.converters.tf_lowering`,
  one lowering per op), saved as a SavedModel with one signature per task and converted
  with ``from_saved_model(signature_keys=...)``: the one route that gives several
  signatures in one file. Builtin ops only (no TF Select), so LiteRT alone runs it.
- Inputs keep the batch dimension dynamic: one file serves batch 1 and 32.
- ``dtype="float16"``: the converter's float16 weight encoding (``Optimize.DEFAULT`` with
  ``supported_types=[float16]``). It combines with the sparse encoding: float16 values
  inside the sparse encoding, DENSIFY then DEQUANTIZE in front of each weight's consumer.
  Weights are stored float16, everything computes in float32 (LiteRT computes the
  DEQUANTIZE of a constant once and keeps it; XNNPACK converts the weights at load).
- ``dtype="int8"``: full-integer quantization (``Optimize.DEFAULT`` with a representative
  dataset: the calibration inputs, one example at a time per signature; builtin int8 ops
  only): int8 weights (per channel) and activations, float inputs and outputs unless
  ``int8_io``. ``dtype="int8_dynamic"``: dynamic-range quantization (no representative
  dataset): weights of 1024 elements or more int8, activations float, FULLY_CONNECTED and
  CONV_2D on their hybrid kernels. Errors are those of 8-bit values, so both are checked
  against a tolerance relative to each output's scale
  (`mann_edge.converters.validation.tolerances`), a full-integer file on its calibration
  inputs.
- Every file runs in LiteRT's default interpreter (XNNPACK on, as on Android); no export
  asks the user to switch a delegate off. LiteRT 2.3's XNNPACK cannot prepare int8 weights
  behind a DENSIFY op ("failed to delegate FULLY_CONNECTED ... TfLiteXNNPackDelegate
  failed to prepare") and runs dynamic-range int8 1x16 blocks wrong on x86. So a
  full-integer export keeps an int8 weight sparse only where the sparse int8 kernel reads
  it (1x16 blocks) and stores the others dense (`densify_where_larger`); an
  ``int8_dynamic`` export is written dense. A `DenseWeightsWarning` says so at export
  time, and every int8 export is verified in the default interpreter before it is written.
  Files written before this record ``mann_edge_use_xnnpack = false``; `LiteRTSession`
  still honours that entry.
- The manifest (``mann_edge_manifest``) and the dtype (``mann_edge_dtype``) are model metadata
  entries, written into the converter's flatbuffer with the schema's object API (file identifier TFL3);
  `mann_edge.runtime.litert` rebuilds the tasks from them.

Example:
    >>> from mann_edge.converters import tflite
    >>> path = tflite.export(cm, "out/model.tflite")
    >>> tflite.validate(cm, path).raise_for_errors()
    >>> "FULLY_CONNECTED" in tflite.operators(path)
    True
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from mann_edge.bundle import manifest_of
from mann_edge.converters.options import check_batch, check_bool, check_dtype, check_names, read_arrays, task_arrays
from mann_edge.converters.tf_lowering import (
    ACTIVATION_LOWERINGS,
    LOWERINGS,
    OWNER,
    build_module,
    check_lowerings,
)
from mann_edge.converters.validation import (
    DEFAULT_BATCHES,
    INT8_DTYPES,
    ValidationReport,
    compare,
    scaled_atol,
    tolerances,
)
from mann_edge.errors import ConversionError, InputError, MannEdgeError
from mann_edge.formats import METADATA_DTYPE, METADATA_MANIFEST
from mann_edge.files import atomic_output
from mann_edge.graph.model import CompactModel
from mann_edge.runtime.litert import (
    FILE_IDENTIFIER,
    LiteRTSession,
    builtin_operators,
    captured_stderr,
    read_metadata,
)

__all__ = [
    "sparse_layers",
    "LOWERINGS",
    "ACTIVATION_LOWERINGS",
    "FORMAT",
    "check_options",
    "export",
    "validate",
    "artifact_name",
    "task_files",
    "operators",
    "add_metadata",
    "densify_where_larger",
    "kernel_report",
    "runner",
    "DenseWeightsWarning",
    "CALIBRATION_EXAMPLES",
]

FORMAT = "tflite"
# Longest converter message quoted in an error (MLIR diagnostics run to pages).
_MAX_MESSAGE = 500


class DenseWeightsWarning(UserWarning):
    """Sparse weights of an export that LiteRT will run dense (stored dense, or expanded at load): says which and why."""


# Calibration examples the converter reads per task (one at a time): enough for stable activation
# ranges on the samples, and a bounded conversion time on large data.
CALIBRATION_EXAMPLES = 200


def check_options(*, dtype: str = "float32", **options) -> None:
    """ConversionError for a ``dtype`` or an `export` option the TFLite export would refuse; writes nothing.

    Options: ``sparse`` (a bool), ``calibration`` (data for dtype 'int8', required there and
    nowhere else), ``int8_io`` (a bool, dtype 'int8' only), ``batch`` (a positive int, or None). ``force`` is not an option: it
    says what to do with the output path.

    Example:
        >>> check_options(dtype="int4")
        Traceback (most recent call last):
        ConversionError: TFLite export takes dtype 'float32', 'float16', 'int8' or 'int8_dynamic'. Received: 'int4'
    """
    check_names(options, ["sparse", "calibration", "int8_io", "batch"], owner=OWNER)
    check_batch(options.get("batch"), owner=OWNER)
    check_dtype(FORMAT, dtype, owner=OWNER)
    check_bool("sparse", options.get("sparse", True), owner=OWNER)
    check_bool("int8_io", options.get("int8_io", False), owner=OWNER)
    calibrated = options.get("calibration") is not None
    if dtype == "int8" and not calibrated:
        raise ConversionError(
            f"{OWNER} with dtype 'int8' (full-integer: int8 weights and activations) needs calibration data: "
            "representative inputs, one array per model input name (--calibration data.npz, or calibration=...). "
            "Received none; dtype 'int8_dynamic' quantizes the weights alone without it"
        )
    if dtype != "int8" and calibrated:
        raise ConversionError(f"{OWNER} reads calibration data for dtype 'int8' only. Received: dtype={dtype!r}")
    if options.get("int8_io", False) and dtype != "int8":
        raise ConversionError(f"{OWNER} option `int8_io` (int8 inputs and outputs) needs dtype 'int8'. "
                              f"Received: dtype={dtype!r}")


def artifact_name(**export_options) -> str:
    """The file name a TFLite export gets inside an output directory."""
    return "model.tflite"


def task_files(path: "str | os.PathLike") -> dict[str, Path]:
    """One file holds every task (a signature each): no per-task files."""
    return {}


def export(
    model: CompactModel,
    path: "str | os.PathLike",
    *,
    dtype: str = "float32",
    sparse: bool = True,
    calibration: "str | os.PathLike | Mapping[str, np.ndarray] | None" = None,
    int8_io: bool = False,
    batch: int | None = None,
    force: bool = False,
) -> Path:
    """Writes ``model`` as one ``.tflite`` file at ``path`` (atomically) and returns ``path``.

    Every file runs in LiteRT's default interpreter (XNNPACK on): int8 exports are verified
    there before they are written, and weights in an encoding XNNPACK cannot run are stored
    dense (a `DenseWeightsWarning` names them).

    Args:
        model: the compact model; every task becomes a signature named after it.
        path: the output file (an existing one is refused unless ``force``).
        dtype: 'float32'; 'float16' to store the weights as float16; 'int8' for full-integer
            quantization (int8 weights and activations, activation ranges calibrated on
            ``calibration``); 'int8_dynamic' for dynamic-range quantization (int8 weights,
            float activations, no calibration; stored dense, see the module docstring).
        sparse: store sparse weights in TFLite's sparse encoding (False: all dense).
        calibration: dtype 'int8' only, required there: representative inputs, an ``.npz``
            path or a mapping with one array per model input name (batch first); each task
            reads its first `CALIBRATION_EXAMPLES` examples.
        int8_io: dtype 'int8' only: int8 input and output tensors (float ones otherwise);
            `LiteRTSession` quantizes float inputs and dequantizes outputs at the boundary.
        batch: fix every input's batch dimension to this size (None: free); accelerator
            delegates (NNAPI, GPU) plan static shapes. The file then runs that batch only.
        force: overwrite an existing ``path``.

    Raises:
        ConversionError: an op without a lowering, a bad option, the converter failing, or an
            int8 export that LiteRT's default interpreter does not run close to ``model``.
        InputError: calibration data that does not fit the model's inputs (names, shapes).
        OutputExistsError: ``path`` exists and ``force`` is False.

    Warns:
        DenseWeightsWarning: sparse weights that will run dense, with the reason.

    Example:
        >>> export(cm, "model.tflite", dtype="int8", calibration="calibration.npz")
        PosixPath('model.tflite')
    """
    check_options(dtype=dtype, sparse=sparse, calibration=calibration, int8_io=int8_io, batch=batch)
    check_lowerings(model)
    data = _calibration_inputs(model, calibration, batch) if dtype == "int8" else None
    path = Path(path)
    metadata = {METADATA_MANIFEST: json.dumps(manifest_of(model)).encode(), METADATA_DTYPE: dtype.encode()}
    # Dynamic-range int8 is written dense: XNNPACK cannot prepare its weights behind DENSIFY and runs
    # its 1x16 blocks wrong (LiteRT 2.3, x86), so no sparse form of it runs in the default interpreter.
    encode_sparse = sparse and dtype != "int8_dynamic"
    with atomic_output(path, force=force) as tmp:
        full_integer = {"calibration": data, "int8_io": int8_io} if dtype == "int8" else {}
        flatbuffer = _convert(model, dtype=dtype, sparse=encode_sparse, batch=batch, **full_integer)
        if encode_sparse:
            flatbuffer = densify_where_larger(flatbuffer)
        tmp.write_bytes(add_metadata(flatbuffer, metadata))
        if dtype in INT8_DTYPES:
            _check_default_interpreter(model, tmp, path, data)
        _warn_dense(model, tmp, path, dtype=dtype, sparse=sparse)
    return path


def _calibration_inputs(model: CompactModel, calibration, batch: int | None = None) -> dict[str, dict[str, np.ndarray]]:
    """task -> its calibration inputs (at most `CALIBRATION_EXAMPLES` examples), checked against the model.

    With a fixed ``batch`` the converter takes whole batches: the examples are cut to a multiple of it.
    """
    arrays = read_arrays(calibration, what="calibration data")
    result = {}
    for task in model.task_names:
        given = task_arrays(model, task, arrays, what="calibration data")
        count = min(CALIBRATION_EXAMPLES, len(next(iter(given.values()))))
        if batch is not None:
            if count < batch:
                raise InputError(f"calibration data for task {task!r} holds {count} examples; an export with batch "
                                 f"{batch} calibrates on whole batches and needs at least {batch}")
            count -= count % batch
        result[task] = {name: array[:count] for name, array in given.items()}
    return result


def _check_default_interpreter(model: CompactModel, written: Path, path: Path, data) -> None:
    """ConversionError unless LiteRT's default interpreter (XNNPACK on) runs ``written`` (to become ``path``) right.

    Verified, never assumed: LiteRT 2.3's XNNPACK delegate runs some int8 encodings wrong
    (DESIGN.md). A full-integer file is checked on its calibration inputs, the range its
    activations were quantized for.
    """
    try:
        report = validate(model, written, use_xnnpack=True, inputs=data)
        problem = "" if report.ok else _worst(report)
    except MannEdgeError as error:
        problem = str(error)
    if problem:
        raise ConversionError(
            f"TFLite {read_metadata(written)[METADATA_DTYPE].decode()} export {path} does not run right in LiteRT's "
            f"default interpreter (XNNPACK on): {problem.replace(str(written), str(path))}. "
            "Export it as float16 or float32 instead"
        )


def _warn_dense(model: CompactModel, written: Path, path: Path, *, dtype: str, sparse: bool) -> None:
    """A DenseWeightsWarning naming the sparse weights of ``model`` that the file at ``written`` runs dense."""
    # TFLite's converter encodes weights with at least 30 % zeros: the ones this warning is about
    sparse_kernels = [row for row in model.node_stats()
                      if row["op"] in ("dense", "conv2d") and row["params"] and row["nonzeros"] <= 0.7 * row["params"]]
    # float exports run DENSIFY'd weights as fast as dense ones (`kernel_report` and the convert table say
    # which run sparse); int8 ones are where the choice changes what is written
    if dtype not in INT8_DTYPES or not sparse or not sparse_kernels:
        return
    kernels = kernel_report(written)
    stored_dense = sum(1 for row in kernels if row["stored"] == "dense")
    if dtype == "int8_dynamic":
        warnings.warn(
            f"{path}: dtype 'int8_dynamic' stores every weight dense and runs it dense (LiteRT's XNNPACK delegate, "
            "on by default, cannot run dynamic-range int8 sparse weights); dtype 'int8' with calibration data keeps "
            "1x16-block sparse weights sparse", DenseWeightsWarning, stacklevel=3)
    elif stored_dense:
        sparse_run = sum(1 for row in kernels if row["runs"] == "sparse")
        warnings.warn(
            f"{path}: {stored_dense} of {len(kernels)} int8 weights are stored and run dense ({sparse_run} run "
            "LiteRT's sparse int8 kernel): unstructured masks would need DENSIFY, which XNNPACK (on by default) "
            "cannot prepare for int8, or the sparse form is not smaller; prune with RSN2 block_size=16 (1x16 blocks) "
            "to keep them sparse", DenseWeightsWarning, stacklevel=3)


def _worst(report: ValidationReport) -> str:
    """The first failing check of ``report``, in a few words (task, output, batch, error)."""
    check = report.failures()[0]
    what = check.problem or f"max abs error {check.max_abs_error:.3g}"
    return f"task {check.task!r} output '{check.output}' batch {check.batch}: {what}"


def validate(
    model: CompactModel,
    path: "str | os.PathLike",
    *,
    atol: float | None = None,
    rtol: float | None = None,
    tasks: Sequence[str] | None = None,
    use_xnnpack: bool | None = None,
    batches: Sequence[int] = DEFAULT_BATCHES,
    inputs: "Mapping[str, Mapping[str, np.ndarray]] | None" = None,
) -> ValidationReport:
    """Runs the export at ``path`` through LiteRT on sample inputs (batch 1 and 8) and compares it with ``model``.

    Default tolerances follow the dtype the file was exported with
    (`mann_edge.converters.validation.tolerances`); for int8 files ``atol`` is a fraction
    of each output's scale (its largest absolute reference value). ``use_xnnpack``: True
    checks the XNNPACK delegate, False the builtin kernels, None (default) what
    `LiteRTSession` runs by default for this file. ``inputs``: task -> input arrays to
    check on instead of random ones (a full-integer file's calibration data: random
    inputs fall outside the ranges its activations were quantized for).

    Example:
        >>> report = validate(cm, "model.tflite")
        >>> report.raise_for_errors().max_abs_error < 1e-5
        True
    """
    session = LiteRTSession(path, use_xnnpack=use_xnnpack)
    dtype = read_metadata(path).get(METADATA_DTYPE, b"float32").decode("utf-8", errors="replace")
    default_atol, default_rtol = tolerances(dtype)
    return compare(
        model,
        session.run,
        format=FORMAT,
        artifact=str(path),
        atol=default_atol if atol is None else atol,
        rtol=default_rtol if rtol is None else rtol,
        tasks=tasks,
        batches=batches,
        scaled_atol=scaled_atol(dtype),
        inputs=inputs,
    )


def runner(path: "str | os.PathLike") -> Callable[[str, Mapping[str, np.ndarray]], list[np.ndarray]]:
    """A function running one task of the ``.tflite`` file at ``path`` in LiteRT's default interpreter.

    Example:
        >>> probabilities = runner("model.tflite")("digits", {"digits_image": x})[0]
    """
    return LiteRTSession(path).run


def sparse_layers(path: "str | os.PathLike") -> tuple[int, int]:
    """(weights LiteRT runs sparse, weights of FULLY_CONNECTED and convolution ops) in the file at ``path``.

    Example:
        >>> sparse_layers("model.tflite")    # 1x16-block int8 weights: the sparse int8 kernel
        (6, 6)
    """
    rows = kernel_report(path)
    return sum(row["runs"] == "sparse" for row in rows), len(rows)


def kernel_report(path: "str | os.PathLike") -> list[dict]:
    """Per FULLY_CONNECTED / CONV_2D / DEPTHWISE_CONV_2D op of a ``.tflite`` file: how its weight is stored and run.

    Each row: ``op`` (its name and subgraph index), ``weight`` (the tensor's name), ``type``
    ('FLOAT32', 'INT8'...), ``stored`` ('dense', 'sparse' or 'block 1xN') and ``runs``
    ('sparse' when the op reads the sparse tensor itself, which only TFLite's sparse
    FULLY_CONNECTED kernels do; 'dense' behind a DENSIFY op or for a dense weight).
    Weights shared by several signatures appear once per signature.

    Example:
        >>> [(row["stored"], row["runs"]) for row in kernel_report("model.tflite")]
        [('block 1x16', 'sparse'), ('sparse', 'dense')]
    """
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(Path(path).read_bytes()), 0)
    names = {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    types = {code: name for name, code in vars(schema.TensorType).items() if not name.startswith("_")}
    codes = [names.get(max(c.builtinCode, c.deprecatedBuiltinCode), "?") for c in model.operatorCodes or []]
    rows = []
    for index, subgraph in enumerate(model.subgraphs or []):
        made_by = {int(op.outputs[0]): op for op in subgraph.operators or [] if codes[op.opcodeIndex] == "DENSIFY"}
        for op in subgraph.operators or []:
            if codes[op.opcodeIndex] not in ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D"):
                continue
            weight_index = int(op.inputs[1])
            densify = made_by.get(weight_index)
            tensor = subgraph.tensors[int(densify.inputs[0]) if densify else weight_index]
            stored = "dense"
            if tensor.sparsity is not None:
                block = [int(d) for d in tensor.sparsity.blockMap] if tensor.sparsity.blockMap is not None else []
                size = int(tensor.sparsity.dimMetadata[-1].denseSize) if block else 1
                stored = f"block 1x{size}" if block else "sparse"
            rows.append({
                "op": f"{codes[op.opcodeIndex]}#{index}",
                "weight": (tensor.name or b"").decode() if isinstance(tensor.name, bytes) else str(tensor.name or ""),
                "type": types.get(tensor.type, str(tensor.type)),
                "stored": stored,
                "runs": "sparse" if stored != "dense" and densify is None else "dense",
            })
    return rows


def operators(path: "str | os.PathLike") -> list[str]:
    """The operators a ``.tflite`` file runs, every subgraph in order (builtins by name, e.g. 'DENSIFY').

    Example:
        >>> operators("model.tflite")[:2]
        ['DENSIFY', 'FULLY_CONNECTED']
    """
    return builtin_operators(path)


def add_metadata(flatbuffer: bytes, entries: Mapping[str, bytes]) -> bytes:
    """The TFLite flatbuffer with ``entries`` (name -> bytes) appended as model metadata.

    Example:
        >>> data = add_metadata(converter.convert(), {"mann_edge_manifest": b"{}"})
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(flatbuffer), 0)
    model.buffers = list(model.buffers or [])
    model.metadata = list(model.metadata or [])
    for name, data in entries.items():
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(data, dtype=np.uint8)
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name = name
        entry.buffer = len(model.buffers) - 1
        model.metadata.append(entry)
    builder = flatbuffers.Builder(len(flatbuffer) + sum(len(data) for data in entries.values()) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
    return bytes(builder.Output())


# TensorType -> numpy dtype of the weights the rewrite below may densify.
_WEIGHT_TYPES = {0: np.float32, 1: np.float16, 9: np.int8}
_INT8 = 9


def densify_where_larger(flatbuffer: bytes) -> bytes:
    """The flatbuffer with every sparse weight whose encoding is not smaller than its dense form stored dense.

    TFLite's converter encodes every FullyConnected/Conv weight with at least 30 % zeros, also
    where its encoding (values, indices, segments) takes more bytes than the dense weight
    (float16 values with 16-bit indices, long rows at about 30 % zeros). Such a weight only
    costs: LiteRT expands it once at load (a DENSIFY op) and runs it dense. Here each such
    DENSIFY is replaced by its dense result as a constant, and the sparse tensor is dropped,
    so every weight is stored in the smaller of its two encodings.

    An int8 weight behind a DENSIFY is always stored dense: LiteRT's XNNPACK delegate (on by
    default) fails to prepare int8 weights behind DENSIFY ("failed to delegate
    FULLY_CONNECTED ... TfLiteXNNPackDelegate failed to prepare"), and they run dense anyway.
    1x16-block int8 weights have no DENSIFY (the sparse int8 kernel reads them) and stay.

    Example:
        >>> data = densify_where_larger(converter.convert())
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(flatbuffer), 0)
    codes = [max(code.builtinCode, code.deprecatedBuiltinCode) for code in model.operatorCodes or []]
    changed = False
    densified: dict[int, int] = {}  # sparse buffer -> its dense buffer (signatures share weights' buffers)
    for index, subgraph in enumerate(model.subgraphs or []):
        kept, dropped = [], set()
        for op in subgraph.operators or []:
            sparse, dense = (subgraph.tensors[op.inputs[0]], subgraph.tensors[op.outputs[0]]) \
                if codes[op.opcodeIndex] == schema.BuiltinOperator.DENSIFY else (None, None)
            if sparse is None or dense.type not in _WEIGHT_TYPES or (dense.type != _INT8 and _encoded_nbytes(
                    sparse, model) < int(np.prod(dense.shape)) * np.dtype(_WEIGHT_TYPES[dense.type]).itemsize):
                kept.append(op)
                continue
            if dense.quantization is None or dense.quantization.scale is None:
                dense.quantization = sparse.quantization  # int8 scales (per channel) live on the sparse tensor
            if sparse.buffer not in densified:
                buffer = schema.BufferT()
                buffer.data = np.frombuffer(_decode_sparse(sparse, model, _WEIGHT_TYPES[dense.type]).tobytes(), np.uint8)
                model.buffers.append(buffer)
                densified[sparse.buffer] = len(model.buffers) - 1
            dense.buffer = densified[sparse.buffer]
            dropped.add(op.inputs[0])
        if dropped:
            subgraph.operators = kept
            _drop_tensors(model, index, subgraph, dropped)
            changed = True
    if not changed:
        return flatbuffer
    _drop_unused_buffers_and_codes(model)
    builder = flatbuffers.Builder(len(flatbuffer) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
    return bytes(builder.Output())


def _drop_unused_buffers_and_codes(model) -> None:
    """Removes buffers no tensor or metadata entry uses (buffer 0, the empty one, stays) and unused operator codes."""
    tensors = [tensor for graph in model.subgraphs for tensor in graph.tensors or []]
    used = {0} | {t.buffer for t in tensors} | {m.buffer for m in model.metadata or []}
    kept = [i for i in range(len(model.buffers)) if i in used]
    new = {old: position for position, old in enumerate(kept)}
    model.buffers = [model.buffers[i] for i in kept]
    for item in [*tensors, *(model.metadata or [])]:
        item.buffer = new[item.buffer]
    ops = [op for graph in model.subgraphs for op in graph.operators or []]
    codes = sorted({op.opcodeIndex for op in ops})
    renumbered = {old: position for position, old in enumerate(codes)}
    model.operatorCodes = [model.operatorCodes[i] for i in codes]
    for op in ops:
        op.opcodeIndex = renumbered[op.opcodeIndex]


def _vector(union) -> np.ndarray:
    return np.asarray(getattr(union, "values", None) if union is not None else [], dtype=np.int64)


def _encoded_nbytes(tensor, model) -> int:
    """Bytes of a sparse tensor's encoding: its values and every segment and index array."""
    size = len(model.buffers[tensor.buffer].data if model.buffers[tensor.buffer].data is not None else [])
    for meta in tensor.sparsity.dimMetadata or []:
        for union in (meta.arraySegments, meta.arrayIndices):
            values = getattr(union, "values", None)
            size += 0 if values is None else np.asarray(values).nbytes
    return size


def _decode_sparse(tensor, model, dtype) -> np.ndarray:
    """The dense array of a TFLite sparse tensor (traversal order, block map, DENSE/SPARSE_CSR dimensions)."""
    from ai_edge_litert import schema_py_generated as schema

    sparsity = tensor.sparsity
    shape = [int(d) for d in tensor.shape]
    order = [int(d) for d in sparsity.traversalOrder]
    block_map = [int(d) for d in (sparsity.blockMap if sparsity.blockMap is not None else [])]
    metas = sparsity.dimMetadata
    values = np.frombuffer(bytes(model.buffers[tensor.buffer].data), dtype)
    # every traversal level as (expanded dimension, indices into the next level's positions)
    positions = np.zeros(1, np.int64)  # one root position
    coordinates = []
    for level, meta in enumerate(metas):
        if meta.format == schema.DimensionType.DENSE:
            size = int(meta.denseSize)
            coordinate = np.tile(np.arange(size), len(positions))
            parents = np.repeat(np.arange(len(positions)), size)
            positions = positions[parents] * size + coordinate
        else:
            segments, indices = _vector(meta.arraySegments), _vector(meta.arrayIndices)
            starts, ends = segments[positions], segments[positions + 1]
            parents = np.repeat(np.arange(len(positions)), ends - starts)
            positions = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)]) if len(parents) else \
                np.zeros(0, np.int64)
            coordinate = indices[positions]
        coordinates = [c[parents] for c in coordinates] + [coordinate]
    by_dimension = dict(zip(order, coordinates))
    index = []
    for dim, size in enumerate(shape):
        if dim in block_map:
            block = int(metas[order.index(len(shape) + block_map.index(dim))].denseSize)
            index.append(by_dimension[dim] * block + by_dimension[len(shape) + block_map.index(dim)])
        else:
            index.append(by_dimension[dim])
    dense = np.zeros(shape, dtype)
    dense[tuple(index)] = values[positions]  # the last level's positions index the stored values
    return dense


def _drop_tensors(model, subgraph_index: int, subgraph, dropped: set[int]) -> None:
    """Removes the ``dropped`` tensors from a subgraph, renumbering every reference to the others."""
    kept = [i for i in range(len(subgraph.tensors)) if i not in dropped]
    new = {old: position for position, old in enumerate(kept)}

    def renumber(indices):
        return None if indices is None else [new[int(i)] if int(i) >= 0 else int(i) for i in indices]

    subgraph.tensors = [subgraph.tensors[i] for i in kept]
    for op in subgraph.operators:
        op.inputs, op.outputs = renumber(op.inputs), renumber(op.outputs)
        op.intermediates = renumber(op.intermediates)
    subgraph.inputs, subgraph.outputs = renumber(subgraph.inputs), renumber(subgraph.outputs)
    for signature in model.signatureDefs or []:
        if signature.subgraphIndex == subgraph_index:
            for entry in [*(signature.inputs or []), *(signature.outputs or [])]:
                entry.tensorIndex = new[int(entry.tensorIndex)]


def _convert(model: CompactModel, *, dtype: str, sparse: bool, calibration=None, int8_io: bool = False,
             batch: int | None = None) -> bytes:
    """The converter's flatbuffer for ``model``: SavedModel in a temporary directory, then TFLiteConverter.

    ``calibration`` (task -> input arrays; dtype 'int8') becomes the converter's representative
    dataset: one example at a time, keyed by signature, as it takes several signatures.
    """
    import tensorflow as tf

    # both int8 kinds hand float32 weights to the converter, which quantizes them (block 16 for alignment)
    module = build_module(model, "int8" if dtype in INT8_DTYPES else dtype, block_align=sparse, batch=batch)
    log: list[str] = []
    try:
        with _quiet() as log, tempfile.TemporaryDirectory(prefix="mann_edge_tflite_") as saved:
            signatures = {name: function.get_concrete_function() for name, function in module.functions.items()}
            tf.saved_model.save(module, saved, signatures=signatures)
            converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=model.task_names)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
            optimizations = set()
            if sparse:
                optimizations.add(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
            if dtype == "float16":
                optimizations.add(tf.lite.Optimize.DEFAULT)
                converter.target_spec.supported_types = [tf.float16]
            if dtype == "int8_dynamic":  # no representative dataset: dynamic-range quantization
                optimizations.add(tf.lite.Optimize.DEFAULT)
            if dtype == "int8":  # full integer: every op int8, or the conversion fails naming it
                optimizations.add(tf.lite.Optimize.DEFAULT)
                converter.representative_dataset = lambda: _examples(calibration, batch or 1)
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
                if int8_io:
                    converter.inference_input_type = tf.int8
                    converter.inference_output_type = tf.int8
            converter.optimizations = optimizations
            return converter.convert()
    except ConversionError:
        raise
    except Exception as error:
        raise _conversion_failure(model, error, log) from error


def _examples(calibration: Mapping[str, Mapping[str, np.ndarray]],
              batch: int = 1) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """The converter's representative dataset: (signature key, one batch of inputs), task after task."""
    for task, arrays in calibration.items():
        for row in range(0, len(next(iter(arrays.values()))), batch):
            yield task, {name: array[row : row + batch] for name, array in arrays.items()}


def _conversion_failure(model: CompactModel, error: Exception, log: list[str]) -> ConversionError:
    """The ConversionError for a failed conversion: what TFLite lacks if that is the cause, else the first line."""
    where = f"TFLite conversion of tasks {model.task_names} failed"
    text = str(error).strip()
    missing = re.search(r"TF Select ops: (.+)", text)
    if missing:
        return ConversionError(
            f"{where}: TensorFlow ops without a TFLite builtin: {missing.group(1).strip()} "
            "(emitted by a lowering in mann_edge.converters.tf_lowering)"
        )
    lines = text.splitlines() or [line for line in "".join(log).splitlines() if "error" in line.lower()]
    summary = lines[0] if lines else type(error).__name__
    return ConversionError(f"{where}: {summary[:_MAX_MESSAGE]}")


@contextlib.contextmanager
def _quiet() -> Iterator[list[str]]:
    """Keeps TensorFlow's and the converter's logs (Python and native) out of the caller's output."""
    logger = logging.getLogger("tensorflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with captured_stderr() as log, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield log
    finally:
        logger.setLevel(level)
