"""ORT-format export: one ``.ort`` file per task for ONNX Runtime Mobile, with the operators a reduced build needs.

An ``.ort`` file is ONNX Runtime's own serialisation of a graph (a flatbuffer): what
ONNX Runtime Mobile loads, and what a reduced (minimal) build of it is made for. This
module writes the ONNX export of each task (`mann_edge.converters.onnx`, every dtype and
option of it: float16, QDQ int8, a fixed ``batch``), has onnxruntime save it in its own
format, and writes ``required_operators.config`` beside the files: the operators (and
their opsets) the tasks use, the input of ONNX Runtime's ``build.py
--include_ops_by_config`` for a build that runs these tasks and nothing else (what
``python -m onnxruntime.tools.convert_onnx_models_to_ort`` writes, here with
``create_config_from_models`` from the same tools).

What the conversion does to the sparse encoding, measured (`tests/test_ort.py`, and the
README's figures): onnxruntime saves the graph after its graph optimisations, and at any
level from 'basic' up, constant folding expands each bitmask-encoded weight into its
dense tensor, so the ``.ort`` file holds dense weights. With ``sparse=True`` the file is
saved without optimisations: it keeps the bitmask encoding and is the smallest form that
ONNX Runtime Mobile loads, but an ORT-format session does not fold it at load, so the
expansion runs at every inference (about 5x the task's time on the samples). So:

- ``sparse=True`` (the default, like every format): smallest file, slower runs;
- ``sparse=False``: saved at the 'extended' level (portable: no hardware-specific layouts;
  QDQ pairs fused into integer kernels, which an ORT-format session does not do at load),
  weights folded dense, as fast as the ONNX export.

onnxruntime's ORT serialisation is not byte-for-byte reproducible (some of its tables
are written in hash order): two exports of one model hold the same graph and weights and
run identically, but their bytes differ.

``mann_edge.convert(storage="auto")`` measures both and keeps the one that runs at
least as fast as dense. Both load in `mann_edge.runtime.load` (`OnnxSession` reads
``.ort`` files and their metadata).

Example:
    >>> from mann_edge.converters import ort
    >>> path = ort.export(cm, "out/ort", dtype="int8", calibration="cal.npz", sparse=False)
    >>> sorted(p.name for p in path.iterdir())
    ['cancer.ort', 'digits.ort', 'required_operators.config']
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from mann_edge.converters import onnx as onnx_export
from mann_edge.converters.onnx_lowering import ACTIVATION_LOWERINGS, LOWERINGS
from mann_edge.converters.validation import DEFAULT_BATCHES, ValidationReport
from mann_edge.errors import ConversionError
from mann_edge.files import atomic_output
from mann_edge.formats import FORMATS
from mann_edge.graph.model import CompactModel
from mann_edge.runtime.onnx import ORT_SUFFIX, OnnxSession, read_ort_model

__all__ = [
    "LOWERINGS",
    "ACTIVATION_LOWERINGS",
    "FORMAT",
    "CONFIG_NAME",
    "check_options",
    "export",
    "validate",
    "runner",
    "artifact_name",
    "task_files",
    "sparse_layers",
    "SlowEncodingWarning",
]

FORMAT = "ort"


class SlowEncodingWarning(UserWarning):
    """An export whose small encoding costs run time in its runtime (the ``.ort`` files that keep the bitmask)."""

OWNER = "ORT-format export"
# The operator list a reduced ONNX Runtime build is configured with (`build.py --include_ops_by_config`).
CONFIG_NAME = "required_operators.config"


def check_options(*, dtype: str = "float32", **options) -> None:
    """ConversionError for a ``dtype`` or option the export refuses: those of the ONNX export, named as ORT's.

    Example:
        >>> check_options(dtype="int8")
        Traceback (most recent call last):
        ConversionError: ORT-format export with dtype 'int8' (QDQ: ...) needs calibration data: ...
    """
    try:
        onnx_export.check_options(dtype=dtype, **options)
    except ConversionError as error:
        raise ConversionError(str(error).replace(onnx_export.OWNER, OWNER)) from None


def artifact_name(**export_options) -> str:
    """The directory name an ORT-format export gets inside an output directory."""
    return FORMATS[FORMAT].artifact


def task_files(path: "str | os.PathLike") -> dict[str, Path]:
    """task -> the ``.ort`` file holding it.

    Example:
        >>> task_files("out/ort")["digits"].name
        'digits.ort'
    """
    return dict(OnnxSession(path).files)


def export(model: CompactModel, path: "str | os.PathLike", *, dtype: str = "float32", sparse: bool = True,
           calibration: "str | os.PathLike | Mapping[str, np.ndarray] | None" = None, batch: int | None = None,
           force: bool = False) -> Path:
    """Writes one ``.ort`` file per task and ``required_operators.config`` into the directory ``path``.

    Args: those of `mann_edge.converters.onnx.export`; ``sparse=True`` keeps the bitmask
    encoding (no graph optimisation when saving), ``sparse=False`` saves the graph at the
    'extended' optimisation level (weights folded dense). See the module docstring.

    Raises:
        ConversionError: what the ONNX export raises, or onnxruntime failing to save a task.
        OutputExistsError: ``path`` exists and ``force`` is False.

    Example:
        >>> export(cm, "out/ort", sparse=False, batch=1)
        PosixPath('out/ort')
    """
    import onnxruntime as ort
    from onnxruntime.tools.ort_format_model import create_config_from_models

    check_options(dtype=dtype, sparse=sparse, calibration=calibration, batch=batch)
    path = Path(path)
    # extended, not all: the layout optimisations above it are specific to this machine's CPU
    level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL if sparse else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    with atomic_output(path, force=force, directory=True) as tmp, \
            tempfile.TemporaryDirectory(prefix="mann_edge_ort_") as work:
        source = onnx_export.export(model, Path(work) / "onnx", dtype=dtype, sparse=sparse, calibration=calibration,
                                    batch=batch)
        converted = []
        for task, file in onnx_export.task_files(source).items():
            target = tmp / (file.stem + ORT_SUFFIX)
            options = ort.SessionOptions()
            options.graph_optimization_level = level
            options.optimized_model_filepath = str(target)
            options.add_session_config_entry("session.save_model_format", "ORT")
            options.log_severity_level = 3
            try:
                ort.InferenceSession(str(file), sess_options=options, providers=["CPUExecutionProvider"])
            except Exception as error:  # onnxruntime's own error classes derive from Exception
                raise ConversionError(f"{OWNER} of task {task!r}: onnxruntime cannot save it: {error}") from None
            converted.append(target)
        if sparse:
            warnings.warn(f"{path}: the .ort files keep the bitmask encoding (the smallest form ONNX Runtime Mobile "
                          "loads), which an ORT-format session expands at every run (tens of times slower than "
                          "dense on large weights); --storage dense (sparse=False) folds it, --storage auto measures "
                          "both", SlowEncodingWarning, stacklevel=2)
        config = tmp / CONFIG_NAME
        with contextlib.redirect_stdout(io.StringIO()), _quiet_tool_log():  # the tool reports each file it reads
            create_config_from_models(converted, config, enable_type_reduction=False)
        # its header lists the files it read by absolute (here: staging) path; name them as they are in the export
        config.write_text(config.read_text().replace(f"{tmp}{os.sep}", ""))
    return path


@contextlib.contextmanager
def _quiet_tool_log():
    """Keeps the config tool's INFO line (on its own logger) out of the caller's logs."""
    import logging

    logger = logging.getLogger("ort_format_model.utils")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def runner(path: "str | os.PathLike") -> Callable[[str, Mapping[str, np.ndarray]], list[np.ndarray]]:
    """A function running one task of the ORT-format export at ``path`` in onnxruntime."""
    return OnnxSession(path).run


def validate(model: CompactModel, path: "str | os.PathLike", *, atol: float | None = None, rtol: float | None = None,
             tasks: Sequence[str] | None = None, batches: Sequence[int] = DEFAULT_BATCHES,
             inputs: "Mapping[str, Mapping[str, np.ndarray]] | None" = None) -> ValidationReport:
    """Runs the ``.ort`` files at ``path`` in onnxruntime against ``model``, as `mann_edge.converters.onnx.validate`.

    Example:
        >>> validate(cm, "out/ort").raise_for_errors()
    """
    report = onnx_export.validate(model, path, atol=atol, rtol=rtol, tasks=tasks, batches=batches, inputs=inputs)
    report.format = FORMAT
    return report


# Ops that multiply by a weight, as onnxruntime's optimisations may leave them in a saved graph.
_WEIGHT_OPS = ("MatMul", "Gemm", "Conv", "FusedGemm", "FusedConv", "FusedMatMul", "MatMulInteger", "ConvInteger",
               "QLinearMatMul", "QLinearConv", "QGemm", "MatMulIntegerToFloat")


def sparse_layers(path: "str | os.PathLike") -> tuple[int, int]:
    """(weights onnxruntime runs sparse: none, MatMul/Gemm/Conv nodes of every task file), read from the flatbuffers.

    Example:
        >>> sparse_layers("out/ort")
        (0, 8)
    """
    def weight_ops(model) -> int:
        graph = model.Graph()
        return sum(graph.Nodes(i).OpType().decode() in _WEIGHT_OPS for i in range(graph.NodesLength()))

    return 0, sum(read_ort_model(file, weight_ops) for file in task_files(path).values())
