"""ONNX export: a directory with one ``.onnx`` graph per task, run by onnxruntime.

Why one file per task: onnxruntime runs every node of a graph whatever output is asked
for, so a graph holding several tasks would compute them all. ``export(model, out_dir)``
writes ``out_dir/<task>.onnx`` (file names sanitized). Each file's ``metadata_props``
hold the true task name, the dtype and the manifest of that task alone (its inputs,
nodes and weights, with the export's task list in its provenance: see
`mann_edge.converters.metadata`), so a file's metadata grows with its task, not with the
model; `mann_edge.runtime.onnx` rebuilds the export's tasks from its files.

Each task's graph is built by `mann_edge.converters.onnx_lowering` (one lowering per op,
weights as bitmask + nonzero values expanded at load); this module writes, names and
checks the files.

``dtype="int8"``: static QDQ quantization per task with onnxruntime's own tool
(``onnxruntime.quantization.quantize_static``, calibrated on representative inputs: int8
weights per output channel, int8 activations, QuantizeLinear/DequantizeLinear pairs that
onnxruntime fuses into integer kernels). The quantizer reads dense weights, so each task
is lowered dense, quantized, and then every int8 weight with zeros is stored as bitmask +
int8 nonzero values with the same expansion nodes as float weights (folded back to the
int8 weight when a session is created), where that is smaller.

Example:
    >>> from mann_edge.converters import onnx as onnx_export
    >>> path = onnx_export.export(cm, "out/onnx")
    >>> sorted(p.name for p in path.iterdir())
    ['cancer.onnx', 'digits.onnx']
    >>> onnx_export.validate(cm, path).raise_for_errors()
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from mann_edge.converters.metadata import manifest_text, task_manifest_text
from mann_edge.converters.onnx_lowering import ACTIVATION_LOWERINGS, LOWERINGS, OWNER, build_task_model, check_lowerings
from mann_edge.converters.lowering import bitmask_nbytes, encode_bitmask
from mann_edge.converters.options import check_batch, check_bool, check_dtype, check_names, read_arrays, task_arrays
from mann_edge.converters.validation import DEFAULT_BATCHES, ValidationReport, compare, scaled_atol, tolerances
from mann_edge.errors import ConversionError
from mann_edge.files import atomic_output, file_stems
from mann_edge.formats import FORMATS, METADATA_DTYPE, METADATA_MANIFEST, METADATA_TASK
from mann_edge.graph.model import CompactModel
from mann_edge.runtime.onnx import SUFFIX, OnnxSession, fixed_batch

__all__ = [
    "encode_int8_weights",
    "CALIBRATION_EXAMPLES",
    "sparse_layers",
    "runner",
    "LOWERINGS",
    "ACTIVATION_LOWERINGS",
    "FORMAT",
    "check_options",
    "export",
    "validate",
    "file_names",
    "artifact_name",
    "task_files",
]

FORMAT = "onnx"


def check_options(*, dtype: str = "float32", **options) -> None:
    """ConversionError for a ``dtype`` or an `export` option the ONNX export would refuse; writes nothing.

    Options: ``sparse`` (a bool). ``force`` is not an option: it says what to do with the output path.

    Example:
        >>> check_options(dtype="int8")
        Traceback (most recent call last):
        ConversionError: ONNX export takes dtype 'float32' or 'float16'. Received: 'int8'
    """
    check_names(options, ["sparse", "calibration", "batch"], owner=OWNER)
    check_batch(options.get("batch"), owner=OWNER)
    check_dtype(FORMAT, dtype, owner=OWNER)
    check_bool("sparse", options.get("sparse", True), owner=OWNER)
    calibrated = options.get("calibration") is not None
    if dtype == "int8" and not calibrated:
        raise ConversionError(f"{OWNER} with dtype 'int8' (QDQ: int8 weights and activations) needs calibration data: "
                              "representative inputs, one array per model input name (--calibration data.npz, or "
                              "calibration=...). Received none")
    if dtype != "int8" and calibrated:
        raise ConversionError(f"{OWNER} reads calibration data for dtype 'int8' only. Received: dtype={dtype!r}")


def file_names(task_names: Sequence[str]) -> dict[str, str]:
    """Task name -> its file name in an export (`mann_edge.files.file_stems` + '.onnx').

    Example:
        >>> file_names(["digits", "a/b", "A/B"])
        {'digits': 'digits.onnx', 'a/b': 'a_b.onnx', 'A/B': 'A_B_2.onnx'}
    """
    return {name: stem + SUFFIX for name, stem in file_stems(task_names).items()}


def artifact_name(**export_options) -> str:
    """The directory name an ONNX export gets inside an output directory.

    Example:
        >>> artifact_name(sparse=False)
        'onnx'
    """
    return FORMATS[FORMAT].artifact


def task_files(path: "str | os.PathLike") -> dict[str, Path]:
    """task -> the ``.onnx`` file holding it.

    Example:
        >>> task_files("out/onnx")["digits"].name
        'digits.onnx'
    """
    return dict(OnnxSession(path).files)


def export(
    model: CompactModel,
    path: "str | os.PathLike",
    *,
    dtype: str = "float32",
    sparse: bool = True,
    calibration: "str | os.PathLike | Mapping[str, np.ndarray] | None" = None,
    batch: int | None = None,
    force: bool = False,
) -> Path:
    """Writes ``model`` as a directory of per-task ``.onnx`` files at ``path`` (atomically); returns ``path``.

    Args:
        model: the compact model; every task becomes one graph in its own file.
        path: the output directory (an existing one is refused unless ``force``).
        dtype: 'float32', or 'float16' to store the weights as float16 (computing in float32);
            'int8' for QDQ static quantization (needs ``calibration``).
        sparse: store weights with zeros as bitmask + nonzero values (False: all dense).
        calibration: dtype 'int8' only, required there: representative inputs, an ``.npz``
            path or a mapping with one array per model input name; each task reads its first
            `CALIBRATION_EXAMPLES` examples.
        batch: fix every input's batch dimension to this size (None: free). Mobile execution
            providers (NNAPI, Core ML) take only nodes with static shapes.
        force: replace an existing ``path``.

    Raises:
        ConversionError: an op without a lowering, a bad option, or a graph the ONNX checker rejects.
        OutputExistsError: ``path`` exists and ``force`` is False.

    Example:
        >>> export(cm, "out/onnx", dtype="float16")
        PosixPath('out/onnx')
    """
    import onnx

    check_options(dtype=dtype, sparse=sparse, calibration=calibration, batch=batch)
    check_lowerings(model)
    arrays = read_arrays(calibration, what="calibration data") if dtype == "int8" else None
    path = Path(path)
    whole = manifest_text(model)
    with atomic_output(path, force=force, directory=True) as tmp:
        for task, file_name in file_names(model.task_names).items():
            metadata = {METADATA_MANIFEST: task_manifest_text(model, task, whole=whole), METADATA_TASK: task,
                        METADATA_DTYPE: dtype}
            if dtype == "int8":
                examples = {name: array[:CALIBRATION_EXAMPLES]
                            for name, array in task_arrays(model, task, arrays, what="calibration data").items()}
                proto = _quantized(build_task_model(model, task, sparse=False, metadata=metadata), task, examples)
                proto = encode_int8_weights(proto) if sparse else proto
            else:
                proto = build_task_model(model, task, dtype=dtype, sparse=sparse, metadata=metadata)
            if batch is not None:
                proto = _fixed_batch(proto, batch)
            try:
                onnx.checker.check_model(proto, full_check=True)
                data = proto.SerializeToString()
            except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as error:
                raise ConversionError(f"ONNX export of task {task!r}: the ONNX checker rejects the graph: {error}") from None
            (tmp / file_name).write_bytes(data)
    return path


def _fixed_batch(proto, batch: int):
    """``proto`` with the batch dimension (``batch``, the lowering's name for it) fixed to ``batch`` everywhere."""
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_dim_param_fixed

    make_dim_param_fixed(proto.graph, "batch", batch)
    fix_output_shapes(proto)
    return proto


# Calibration examples each task's quantization reads (one at a time), as for TFLite.
CALIBRATION_EXAMPLES = 200


def _quantized(proto, task: str, examples: Mapping[str, np.ndarray]):
    """``proto`` quantized by onnxruntime's static QDQ quantizer, calibrated on ``examples`` (one at a time)."""
    import logging

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Examples(CalibrationDataReader):
        def __init__(self):
            count = len(next(iter(examples.values())))
            self.rows = iter([{name: array[i : i + 1] for name, array in examples.items()} for i in range(count)])

        def get_next(self):
            return next(self.rows, None)

    with tempfile.TemporaryDirectory(prefix="mann_edge_onnx_int8_") as work:
        source, target = Path(work) / "float.onnx", Path(work) / "int8.onnx"
        onnx.save(proto, str(source))
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantizer's advice to pre-process goes to the root logger
        try:
            quantize_static(str(source), str(target), Examples(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        except Exception as error:  # the quantizer raises plain exceptions of many kinds
            raise ConversionError(f"ONNX int8 export of task {task!r}: onnxruntime's quantizer failed: "
                                  f"{type(error).__name__}: {error}") from error
        finally:
            root.setLevel(level)
        quantized = onnx.load(str(target))
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(proto.metadata_props)  # ours, whatever the quantizer kept or added
    return quantized


# Bytes of the expansion nodes of one bitmask-encoded weight (names, attributes, small constants).
_EXPANSION_BYTES = 1024


def encode_int8_weights(proto):
    """``proto`` with each int8 weight that has zeros stored as bitmask + int8 nonzero values, where smaller.

    The expansion is the float weights' (`mann_edge.converters.onnx_lowering`): unpack the
    bits, number the nonzeros with CumSum, Gather from [0, values...]; it reads only
    initializers, so onnxruntime folds it back to the int8 weight when a session is created.

    Example:
        >>> proto = encode_int8_weights(onnx.load("int8.onnx"))
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    nodes, kept = [], []
    for initializer in graph.initializer:
        array = numpy_helper.to_array(initializer)
        if initializer.data_type != TensorProto.INT8 or array.ndim < 2 or \
                bitmask_nbytes(array) + _EXPANSION_BYTES >= array.nbytes:
            kept.append(initializer)
            continue
        mask, values = encode_bitmask(array)
        name = initializer.name
        prefix = f"{name}:bitmask"

        def const(suffix, value, dtype):
            tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), f"{prefix}:{suffix}")
            kept.append(tensor)
            return tensor.name

        def op(kind, inputs, output, **attributes):
            nodes.append(helper.make_node(kind, inputs, [output], name=output, **attributes))
            return output

        column = op("Reshape", [op("Cast", [const("mask", mask, np.uint8)], f"{prefix}/cast", to=TensorProto.INT32),
                                const("column", [-1, 1], np.int64)], f"{prefix}/column")
        bits = op("Mod", [op("Div", [column, const("powers", 1 << np.arange(8), np.int32)], f"{prefix}/div"),
                          const("two", 2, np.int32)], f"{prefix}/mod")
        bits = op("Reshape", [bits, const("flat", [-1], np.int64)], f"{prefix}/bits")
        if mask.size * 8 != array.size:  # the last byte's unused bits
            bits = op("Slice", [bits, const("start", [0], np.int64), const("end", [array.size], np.int64)],
                      f"{prefix}/sliced")
        slots = op("Mul", [op("CumSum", [bits, const("axis", 0, np.int32)], f"{prefix}/cumsum"), bits],
                   f"{prefix}/slots")
        table = op("Concat", [const("zero", [0], np.int8), const("values", values, np.int8)], f"{prefix}/table", axis=0)
        op("Reshape", [op("Gather", [table, slots], f"{prefix}/gather", axis=0),
                       const("shape", array.shape, np.int64)], name)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + old)  # the expansions read initializers only: they go first
    return proto


def runner(path: "str | os.PathLike") -> Callable[[str, Mapping[str, np.ndarray]], list[np.ndarray]]:
    """A function running one task of the ONNX export at ``path`` in onnxruntime.

    Example:
        >>> probabilities = runner("out/onnx")("digits", {"digits_image": x})[0]
    """
    return OnnxSession(path).run


def sparse_layers(path: "str | os.PathLike") -> tuple[int, int]:
    """(weights onnxruntime runs sparse: none, MatMul/Gemm/Conv nodes of every task file) of the export at ``path``.

    onnxruntime densifies sparse initializers when it loads a file and has no sparse CPU
    kernel for these ops in its standard builds (DESIGN.md): every weight runs dense.

    Example:
        >>> sparse_layers("out/onnx")
        (0, 8)
    """
    import onnx

    ops = ("MatMul", "Gemm", "Conv")
    count = sum(node.op_type in ops for file in task_files(path).values()
                for node in onnx.load(str(file), load_external_data=False).graph.node)
    return 0, count


def validate(
    model: CompactModel,
    path: "str | os.PathLike",
    *,
    atol: float | None = None,
    rtol: float | None = None,
    tasks: Sequence[str] | None = None,
    batches: Sequence[int] = DEFAULT_BATCHES,
    inputs: "Mapping[str, Mapping[str, np.ndarray]] | None" = None,
) -> ValidationReport:
    """Runs the export at ``path`` through onnxruntime on sample inputs (batch 1 and 8) and compares it with ``model``.

    Default tolerances follow the dtype the files were exported with. Every task of
    ``model`` (or ``tasks``) is checked: one the export lacks fails the report, so a
    single ``.onnx`` file is checked against a model of its one task (``tasks=[...]``).
    ``inputs``: task -> input arrays to check on instead of random ones (an int8 export's
    calibration data, the range it was quantized for). Files with a fixed batch size are
    checked at that size.

    Example:
        >>> report = validate(cm, "out/onnx")
        >>> report.raise_for_errors().max_abs_error < 1e-5
        True
    """
    session = OnnxSession(path)
    batches = (fixed_batch(session),) if fixed_batch(session) else batches  # a fixed batch takes no other
    dtypes = set(session.dtypes.values())
    dtype = "int8" if "int8" in dtypes else "float16" if "float16" in dtypes else "float32"
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
