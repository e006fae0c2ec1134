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
- ``dtype="int8"``: dynamic-range quantization (``Optimize.DEFAULT`` without a
  representative dataset): weights of 1024 elements or more are stored int8 with their
  scales, activations stay float; FULLY_CONNECTED and CONV_2D run their hybrid kernels
  (inputs quantized on the fly, per batch row). With ``sparse=True`` the int8 weights take
  the sparse encoding too, and 1x16-block weights run the sparse int8 kernel. Errors are
  those of 8-bit values, so int8 exports are checked against a tolerance relative to
  each output's scale (`mann_edge.converters.validation.tolerances`).
- Every int8 export is verified before it is written: LiteRT 2.3's XNNPACK delegate gives
  wrong outputs (NaN or far-off values on x86) on int8 1x16 block-sparse weights, and cannot
  prepare int8 weights behind a DENSIFY op (unstructured int8). When XNNPACK fails the
  check and the builtin kernels pass it, the file records ``mann_edge_use_xnnpack =
  false``, `LiteRTSession` then runs it without XNNPACK, and the export warns
  (`XnnpackFallbackWarning`). When the builtin kernels fail too, the export fails.
- The manifest (``mann_edge_manifest``), the dtype (``mann_edge_dtype``) and, for int8,
  the kernel decision (``mann_edge_use_xnnpack``) are model metadata entries, written
  into the converter's flatbuffer with the schema's object API (file identifier TFL3);
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
from typing import Iterator, Mapping, Sequence

import numpy as np

from mann_edge.bundle import manifest_of
from mann_edge.converters.options import check_bool, check_dtype, check_names
from mann_edge.converters.tf_lowering import ACTIVATION_LOWERINGS, LOWERINGS, OWNER, build_module, check_lowerings
from mann_edge.converters.validation import DEFAULT_BATCHES, ValidationReport, compare, scaled_atol, tolerances
from mann_edge.errors import ConversionError, MannEdgeError
from mann_edge.formats import METADATA_DTYPE, METADATA_MANIFEST, METADATA_USE_XNNPACK
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
    "XnnpackFallbackWarning",
]

FORMAT = "tflite"
# Longest converter message quoted in an error (MLIR diagnostics run to pages).
_MAX_MESSAGE = 500


class XnnpackFallbackWarning(UserWarning):
    """An export runs wrong under LiteRT's XNNPACK delegate and right on the builtin kernels: it records XNNPACK off."""


def check_options(*, dtype: str = "float32", **options) -> None:
    """ConversionError for a ``dtype`` or an `export` option the TFLite export would refuse; writes nothing.

    Options: ``sparse`` (a bool). ``force`` is not an option: it says what to do with the output path.

    Example:
        >>> check_options(dtype="int4")
        Traceback (most recent call last):
        ConversionError: TFLite export takes dtype 'float32', 'float16' or 'int8'. Received: 'int4'
    """
    check_names(options, ["sparse"], owner=OWNER)
    check_dtype(FORMAT, dtype, owner=OWNER)
    check_bool("sparse", options.get("sparse", True), owner=OWNER)


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
    force: bool = False,
) -> Path:
    """Writes ``model`` as one ``.tflite`` file at ``path`` (atomically) and returns ``path``.

    Args:
        model: the compact model; every task becomes a signature named after it.
        path: the output file (an existing one is refused unless ``force``).
        dtype: 'float32'; 'float16' to store the weights as float16; 'int8' for dynamic-range
            quantization (int8 weights, float activations), verified before it is written.
        sparse: store sparse weights in TFLite's sparse encoding (False: all dense).
        force: overwrite an existing ``path``.

    Raises:
        ConversionError: an op without a lowering, a bad option, the converter failing, or an
            int8 export that does not match ``model`` even on the builtin kernels.
        OutputExistsError: ``path`` exists and ``force`` is False.

    Warns:
        XnnpackFallbackWarning: an int8 export that XNNPACK runs wrong; the file records
            that XNNPACK must stay off, and `LiteRTSession` honours it.

    Example:
        >>> export(cm, "model.tflite", dtype="float16")
        PosixPath('model.tflite')
    """
    check_options(dtype=dtype, sparse=sparse)
    check_lowerings(model)
    path = Path(path)
    metadata = {METADATA_MANIFEST: json.dumps(manifest_of(model)).encode(), METADATA_DTYPE: dtype.encode()}
    with atomic_output(path, force=force) as tmp:
        flatbuffer = _convert(model, dtype=dtype, sparse=sparse)
        if sparse and dtype != "int8":
            flatbuffer = densify_where_larger(flatbuffer)
        tmp.write_bytes(add_metadata(flatbuffer, metadata))
        if dtype == "int8":
            use_xnnpack = _choose_kernels(model, tmp, path)
            tmp.write_bytes(add_metadata(flatbuffer, {**metadata, METADATA_USE_XNNPACK: str(use_xnnpack).lower().encode()}))
    return path


def _choose_kernels(model: CompactModel, written: Path, path: Path) -> bool:
    """Whether XNNPACK may run the export ``written`` (to become ``path``): verified, never assumed.

    XNNPACK first, as LiteRT applies it by default; when it runs the file wrong or cannot
    prepare it (XNNPACK refuses int8 weights behind a DENSIFY op), the builtin kernels.
    A file that neither runs right is refused with both findings.
    """
    try:
        with_xnnpack = validate(model, written, use_xnnpack=True)
        xnnpack_problem = "" if with_xnnpack.ok else _worst(with_xnnpack)
    except MannEdgeError as error:
        xnnpack_problem = str(error).replace(str(written), str(path))
    if not xnnpack_problem:
        return True
    builtin = validate(model, written, use_xnnpack=False)
    if builtin.ok:
        warnings.warn(
            f"{path}: LiteRT's XNNPACK delegate does not run this int8 export right ({xnnpack_problem}); the "
            f"builtin kernels do (max abs error {builtin.max_abs_error:.3g}). The file records "
            f"{METADATA_USE_XNNPACK}=false, so mann_edge.runtime runs it without XNNPACK",
            XnnpackFallbackWarning,
            stacklevel=3,
        )
        return False
    raise ConversionError(
        f"TFLite int8 export {path} does not match the compact model: with XNNPACK {xnnpack_problem}; "
        f"with the builtin kernels {_worst(builtin)}. Export it as float16 or float32 instead"
    )


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
) -> ValidationReport:
    """Runs the export at ``path`` through LiteRT on sample inputs (batch 1 and 8) and compares it with ``model``.

    Default tolerances follow the dtype the file was exported with
    (`mann_edge.converters.validation.tolerances`); for int8 files ``atol`` is a fraction
    of each output's scale (its largest absolute reference value). ``use_xnnpack``: True
    checks the XNNPACK delegate, False the builtin kernels, None (default) what
    `LiteRTSession` runs by default for this file.

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
    )


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
_FLOAT_TYPES = {0: np.float32, 1: np.float16}


def densify_where_larger(flatbuffer: bytes) -> bytes:
    """The flatbuffer with every sparse weight whose encoding is not smaller than its dense form stored dense.

    TFLite's converter encodes every FullyConnected/Conv weight with at least 30 % zeros, also
    where its encoding (values, indices, segments) takes more bytes than the dense weight
    (float16 values with 16-bit indices, long rows at about 30 % zeros). Such a weight only
    costs: LiteRT expands it once at load (a DENSIFY op) and runs it dense. Here each such
    DENSIFY is replaced by its dense result as a constant, and the sparse tensor is dropped,
    so every weight is stored in the smaller of its two encodings.

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
            if sparse is None or dense.type not in _FLOAT_TYPES or \
                    _encoded_nbytes(sparse, model) < int(np.prod(dense.shape)) * np.dtype(_FLOAT_TYPES[dense.type]).itemsize:
                kept.append(op)
                continue
            if sparse.buffer not in densified:
                buffer = schema.BufferT()
                buffer.data = np.frombuffer(_decode_sparse(sparse, model, _FLOAT_TYPES[dense.type]).tobytes(), np.uint8)
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


def _convert(model: CompactModel, *, dtype: str, sparse: bool) -> bytes:
    """The converter's flatbuffer for ``model``: SavedModel in a temporary directory, then TFLiteConverter."""
    import tensorflow as tf

    module = build_module(model, dtype, block_align=sparse)
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
            if dtype == "int8":  # no representative dataset: dynamic-range quantization
                optimizations.add(tf.lite.Optimize.DEFAULT)
            converter.optimizations = optimizations
            return converter.convert()
    except ConversionError:
        raise
    except Exception as error:
        raise _conversion_failure(model, error, log) from error


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
