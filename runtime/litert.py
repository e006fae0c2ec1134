"""The LiteRT backend: runs a TFLite export with `ai_edge_litert`, one signature per task.

A TFLite export holds one signature per task (key = task name, inputs and outputs named
after the task's specs) and the model's manifest in its metadata (``mann_edge_manifest``),
from which the tasks are rebuilt. The metadata is read straight from the flatbuffer with
``ai_edge_litert.schema_py_generated``; TensorFlow is never imported.

With ``use_xnnpack=True`` LiteRT applies its XNNPACK delegate (its default); with ``False``
only the builtin kernels run (``BUILTIN_WITHOUT_DEFAULT_DELEGATES``). mann-edge exports
all run with XNNPACK on (each int8 export is verified so); files written by mann-edge
before that may record ``mann_edge_use_xnnpack = false``, which the session honours.

A full-integer export written with int8 inputs and outputs keeps the task's float
interface here: float inputs are quantized and int8 outputs dequantized with the file's
own scales and zero points.

Example:
    >>> sess = LiteRTSession("out/model.tflite")
    >>> [t.name for t in sess.tasks]
    ['digits', 'cancer']
    >>> probabilities = sess.run("digits", x)[0]
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np

from mann_edge import safe_json
from mann_edge.bundle import tasks_from_manifest
from mann_edge.errors import MannEdgeError
from mann_edge.formats import METADATA_MANIFEST, METADATA_USE_XNNPACK
from mann_edge.graph.model import Task
from mann_edge.runtime.session import Session

__all__ = [
    "LiteRTSession",
    "FILE_IDENTIFIER",
    "read_metadata",
    "read_manifest",
    "xnnpack_recorded",
    "builtin_operators",
    "captured_stderr",
]

FILE_IDENTIFIER = b"TFL3"

T = TypeVar("T")


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Collects what is written to file descriptor 2 (native code included) while the block runs.

    Yields a list that holds the captured text once the block has ended, so callers can
    keep LiteRT's and the converter's log lines out of a command's output and still
    quote them in an error.

    Example:
        >>> with captured_stderr() as log:
        ...     interpreter.allocate_tensors()
        >>> log[0]
        'INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\n'
    """
    log: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2 (embedded interpreters): nothing to capture
        yield log
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield log
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            log.append(sink.read().decode("utf-8", errors="replace"))


def _schema():
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


def _read_model(path: "str | os.PathLike", reader: Callable[[object, mmap.mmap], T]) -> T:
    """``reader(model, file_view)`` on the TFLite flatbuffer at ``path``, or a MannEdgeError naming the file.

    The file is memory-mapped, not read: only the parts ``reader`` touches are paged in.
    """
    path = Path(path)
    if not path.is_file():
        raise MannEdgeError(f"TFLite model {path} does not exist or is not a file")
    schema = _schema()
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size < 8:
            raise MannEdgeError(f"{path} is not a TFLite model: the file is too short to be a flatbuffer")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
            if not schema.Model.ModelBufferHasIdentifier(view, 0):
                raise MannEdgeError(
                    f"{path} is not a TFLite model: expected the flatbuffer file identifier {FILE_IDENTIFIER!r}, "
                    f"found {bytes(view[4:8])!r}"
                )
            try:
                return reader(schema.Model.GetRootAs(view, 0), view)
            except MannEdgeError:
                raise
            except Exception as error:  # a truncated or corrupt flatbuffer fails anywhere while being walked
                raise MannEdgeError(f"{path} is not a readable TFLite model ({type(error).__name__}: {error})") from None


def _buffer_bytes(model, view: mmap.mmap, index: int) -> bytes:
    buffer = model.Buffers(index)
    if buffer.Offset() > 1:  # data stored after the flatbuffer (models over 2 GB)
        return bytes(view[buffer.Offset() : buffer.Offset() + buffer.Size()])
    if buffer.DataIsNone():
        return b""
    return buffer.DataAsNumpy().tobytes()


def read_metadata(path: "str | os.PathLike") -> dict[str, bytes]:
    """The model metadata entries of a TFLite file: name -> raw bytes.

    Example:
        >>> sorted(read_metadata("model.tflite"))
        ['CONVERSION_METADATA', 'mann_edge_dtype', 'mann_edge_manifest', 'min_runtime_version']
    """

    def entries(model, view):
        result = {}
        for i in range(model.MetadataLength()):
            metadata = model.Metadata(i)
            name = (metadata.Name() or b"").decode("utf-8", errors="replace")
            if not 0 <= metadata.Buffer() < model.BuffersLength():
                raise MannEdgeError(f"{path}: metadata entry {name!r} points to buffer {metadata.Buffer()}, "
                                    f"which does not exist")
            result[name] = _buffer_bytes(model, view, metadata.Buffer())
        return result

    return _read_model(path, entries)


def read_manifest(path: "str | os.PathLike") -> dict:
    """The mann-edge manifest embedded in a TFLite export, or a MannEdgeError naming the file.

    Example:
        >>> read_manifest("model.tflite")["tasks"][0]["name"]
        'digits'
    """
    return _manifest_of(path, read_metadata(path))


def _manifest_of(path: "str | os.PathLike", metadata: dict[str, bytes]) -> dict:
    if METADATA_MANIFEST not in metadata:
        raise MannEdgeError(
            f"{path} is a TFLite model without the '{METADATA_MANIFEST}' metadata entry, so not a mann-edge "
            f"export (its metadata: {sorted(metadata) or 'none'}); export it with mann_edge.converters.tflite"
        )
    try:
        return safe_json.loads(metadata[METADATA_MANIFEST], f"metadata entry '{METADATA_MANIFEST}'")
    except ValueError as error:
        raise MannEdgeError(f"{path}: {error}") from None


def xnnpack_recorded(metadata: dict[str, bytes]) -> bool:
    """Whether a file's metadata (`read_metadata`) lets XNNPACK run it: False only when its export recorded so.

    Example:
        >>> xnnpack_recorded(read_metadata("model_int8.tflite"))
        False
    """
    return metadata.get(METADATA_USE_XNNPACK, b"true").strip().lower() != b"false"


def builtin_operators(path: "str | os.PathLike") -> list[str]:
    """Names of the operators of every subgraph of a TFLite file, in execution order.

    Builtins by their ``BuiltinOperator`` name (``FULLY_CONNECTED``, ``DENSIFY``...),
    custom operators as ``CUSTOM:<code>``.

    Example:
        >>> builtin_operators("model.tflite")[:2]
        ['DENSIFY', 'FULLY_CONNECTED']
    """
    names = {code: name for name, code in vars(_schema().BuiltinOperator).items() if not name.startswith("_")}

    def walk(model, view):
        codes = []
        for i in range(model.OperatorCodesLength()):
            code = model.OperatorCodes(i)
            # codes below 127 may sit only in the deprecated int8 field (older writers)
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            if names.get(builtin) == "CUSTOM":
                codes.append(f"CUSTOM:{(code.CustomCode() or b'').decode('utf-8', errors='replace')}")
            else:
                codes.append(names.get(builtin, f"BUILTIN_{builtin}"))
        result = []
        for g in range(model.SubgraphsLength()):
            subgraph = model.Subgraphs(g)
            result.extend(codes[subgraph.Operators(i).OpcodeIndex()] for i in range(subgraph.OperatorsLength()))
        return result

    return _read_model(path, walk)


class LiteRTSession(Session):
    """A TFLite export opened with LiteRT; ``run(task, x)`` invokes that task's signature only.

    Args:
        path: the ``.tflite`` file.
        threads: LiteRT's thread count (None: LiteRT's default, one thread).
        use_xnnpack: False runs the builtin kernels only, without the default XNNPACK delegate;
            None (the default) does what the file's ``mann_edge_use_xnnpack`` entry says
            (XNNPACK on when it has none).

    Raises:
        MannEdgeError: the file is not a TFLite model, has no mann-edge manifest, or lacks
            a task's signature.

    Example:
        >>> sess = LiteRTSession("model.tflite", threads=1, use_xnnpack=False)
        >>> sess.run("cancer", x)[0].shape
        (1, 2)
    """

    backend = "litert"

    def __init__(self, path: "str | os.PathLike", threads: int | None = None, use_xnnpack: bool | None = None):
        path = Path(path)
        metadata = read_metadata(path)
        tasks = tasks_from_manifest(_manifest_of(path, metadata), path)
        super().__init__(path, tasks)
        self.use_xnnpack = xnnpack_recorded(metadata) if use_xnnpack is None else bool(use_xnnpack)
        self.interpreter = _open_interpreter(path, threads, self.use_xnnpack)
        self._check_signatures(self.interpreter.get_signature_list())
        self._runners: dict[str, object] = {}

    def _check_signatures(self, signatures: dict) -> None:
        for task in self.tasks:
            if task.name not in signatures:
                raise MannEdgeError(
                    f"{self.path} has no signature for task {task.name!r}. Its signatures: {sorted(signatures)}"
                )
            inputs, outputs = signatures[task.name]["inputs"], signatures[task.name]["outputs"]
            wanted_inputs = [spec.name for spec in task.inputs]
            wanted_outputs = [spec.name for spec in task.outputs]
            if sorted(inputs) != sorted(wanted_inputs) or not set(wanted_outputs) <= set(outputs):
                raise MannEdgeError(
                    f"{self.path}: signature {task.name!r} takes {sorted(inputs)} and gives {sorted(outputs)}; "
                    f"the manifest's task takes {wanted_inputs} and gives {wanted_outputs}"
                )

    def _run(self, task: Task, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        runner = self._runners.get(task.name)
        if runner is None:
            runner = self._runners[task.name] = self.interpreter.get_signature_runner(task.name)
        # A full-integer export with int8 inputs/outputs (`int8_io`): the session keeps the task's
        # float interface, quantizing at the boundary with the file's own scales.
        details = runner.get_input_details()
        inputs = {name: _quantize(array, details[name]) for name, array in inputs.items()}
        try:
            results = runner(**inputs)
        except (RuntimeError, ValueError) as error:  # LiteRT puts its kernels' messages in the error
            raise MannEdgeError(f"LiteRT failed to run task {task.name!r} of {self.path}: {error}") from None
        outputs = runner.get_output_details()
        return [_dequantize(results[spec.name], outputs[spec.name]) for spec in task.outputs]


def _quantize(array: np.ndarray, detail: dict) -> np.ndarray:
    """``array`` as the int8 tensor ``detail`` describes, when the file takes int8 for a float input."""
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if detail["dtype"] != np.int8 or not scale or not np.issubdtype(np.asarray(array).dtype, np.floating):
        return array
    return np.clip(np.round(array / scale) + zero_point, -128, 127).astype(np.int8)


def _dequantize(array: np.ndarray, detail: dict) -> np.ndarray:
    """An int8 output as float32 values with the file's scale; other outputs unchanged."""
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if array.dtype != np.int8 or not scale:
        return array
    return ((array.astype(np.float32) - zero_point) * scale).astype(np.float32)


def _open_interpreter(path: Path, threads: int | None, use_xnnpack: bool):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.AUTO if use_xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    # LiteRT announces its delegate on stderr when it applies it (at the first allocation): keep that quiet.
    with captured_stderr() as log:
        try:
            interpreter = Interpreter(model_path=str(path), num_threads=threads, experimental_op_resolver_type=resolver)
            interpreter.allocate_tensors()
        except (RuntimeError, ValueError) as error:
            failure = error
        else:
            return interpreter
    details = " ".join(line for line in "".join(log).splitlines() if line.strip())
    raise MannEdgeError(f"LiteRT cannot open {path}: {failure}" + (f" ({details})" if details else ""))
