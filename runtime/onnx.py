"""The onnxruntime backend: runs an ONNX export, one `.onnx` file (one graph) per task.

An ONNX export is a directory of per-task ``.onnx`` files (file names sanitized from the
task names). onnxruntime runs every node of a graph whatever output is asked for, so each
task is its own graph, and a task's session is created the first time it runs: opening
an export touches no weights.

Each file carries in its ``metadata_props`` the manifest of its task (``mann_edge_manifest``:
that task's inputs, nodes and weights, its provenance naming every task of the export), the
true name of its task (``mann_edge_task``) and the weights' dtype (``mann_edge_dtype``); the
session's tasks are rebuilt from the files, each contributing its own, in the model's order.
These are read with a few lines of protobuf wire-format walking (`read_metadata`): the
runtime imports neither the ``onnx`` package nor TensorFlow, and reading the metadata
skips over the graph without parsing it. A single ``.onnx`` file also opens: its one task.

Example:
    >>> sess = OnnxSession("out/onnx", threads=1)      # or "out/onnx/digits.onnx"
    >>> [t.name for t in sess.tasks]
    ['digits', 'cancer']
    >>> probabilities = sess.run("digits", x)[0]
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Callable

import numpy as np

from mann_edge import safe_json
from mann_edge.bundle import export_of, export_task_order, tasks_from_manifest
from mann_edge.errors import BundleError, MannEdgeError
from mann_edge.formats import METADATA_DTYPE, METADATA_MANIFEST, METADATA_TASK
from mann_edge.graph.model import Task
from mann_edge.runtime.session import Session

__all__ = [
    "OnnxSession",
    "SUFFIX",
    "ORT_SUFFIX",
    "read_ort_metadata",
    "read_ort_model",
    "fixed_batch",
    "read_metadata",
    "read_manifest",
]

SUFFIX = ".onnx"
# ONNX Runtime's own format (a flatbuffer, for ONNX Runtime Mobile): same graphs, same metadata_props.
ORT_SUFFIX = ".ort"

# ModelProto's fields (onnx/onnx.proto): number -> protobuf wire type (0 varint, 2 length-delimited).
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
_IR_VERSION, _GRAPH, _METADATA_PROPS = 1, 7, 14


class _NotOnnx(Exception):
    """The bytes are not an ONNX ModelProto; the message says what was found where."""


class _Truncated(Exception):
    """A field runs past the end of the file."""


def _varint(view, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end:
            raise _Truncated(f"a number runs past byte {end}")
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift >= 64:
            raise _NotOnnx(f"a varint longer than 10 bytes at byte {pos}")


def _fields(view, start: int, end: int):
    """(field number, wire type, value or (payload start, payload end)) of each field in ``view[start:end]``."""
    pos = start
    while pos < end:
        key, pos = _varint(view, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(view, pos, end)
            yield number, wire, value
        elif wire == 2:
            length, pos = _varint(view, pos, end)
            if pos + length > end:
                raise _Truncated(f"field {number} declares {length} bytes at byte {pos}, {end - pos} remain")
            yield number, wire, (pos, pos + length)
            pos += length
        else:
            raise _NotOnnx(f"wire type {wire} (field {number}) at byte {pos}")


def _string_pair(view, start: int, end: int) -> tuple[str, str]:
    """A StringStringEntryProto: (key, value)."""
    entry = {1: "", 2: ""}
    for number, wire, value in _fields(view, start, end):
        if number in entry and wire == 2:
            entry[number] = bytes(view[value[0] : value[1]]).decode("utf-8", errors="replace")
    return entry[1], entry[2]


def read_metadata(path: "str | os.PathLike") -> dict[str, str]:
    """The ``metadata_props`` of an ONNX model file (key -> value), or a MannEdgeError naming the file.

    Walks the top-level fields of the ModelProto, skipping the graph, so a large model
    costs a few reads. A file that is not an ONNX model, or is cut short, is refused.

    Example:
        >>> read_metadata("out/onnx/digits.onnx")["mann_edge_task"]
        'digits'
    """
    path = Path(path)
    if not path.is_file():
        raise MannEdgeError(f"ONNX model {path} does not exist or is not a file")
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            raise MannEdgeError(f"{path} is not an ONNX model: the file is empty")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
            seen: set[int] = set()
            metadata: dict[str, str] = {}
            try:
                for number, wire, value in _fields(view, 0, size):
                    if _MODEL_FIELDS.get(number) != wire:
                        raise _NotOnnx(f"field {number} with wire type {wire}, which an ONNX ModelProto does not have")
                    seen.add(number)
                    if number == _METADATA_PROPS:
                        key, text = _string_pair(view, *value)
                        metadata[key] = text
            except _NotOnnx as error:
                raise MannEdgeError(f"{path} is not an ONNX model: {error}") from None
            except _Truncated as error:
                raise MannEdgeError(f"{path} is a truncated ONNX model: {error} (file of {size} bytes)") from None
    missing = [name for number, name in ((_IR_VERSION, "ir_version"), (_GRAPH, "graph")) if number not in seen]
    if missing:
        raise MannEdgeError(f"{path} is not an ONNX model: it has no {' and no '.join(missing)}")
    return metadata


def read_ort_model(path: "str | os.PathLike", read: Callable):
    """``read(model)`` of the Model table of an ORT-format file's flatbuffer, or a MannEdgeError naming the file.

    Example:
        >>> read_ort_model("out/ort/digits.ort", lambda model: model.Graph().NodesLength()) > 0
        True
    """
    import onnxruntime.tools.ort_format_model  # noqa: F401  (puts its flatbuffer classes on sys.path)
    from ort_flatbuffers_py.fbs.InferenceSession import InferenceSession

    path = Path(path)
    if not path.is_file():
        raise MannEdgeError(f"ORT model {path} does not exist or is not a file")
    data = path.read_bytes()
    if len(data) < 8 or not InferenceSession.InferenceSessionBufferHasIdentifier(data, 0):
        raise MannEdgeError(f"{path} is not an ORT-format model: expected the flatbuffer file identifier b'ORTM'")
    try:
        return read(InferenceSession.GetRootAs(data, 0).Model())
    except Exception as error:  # a corrupt flatbuffer fails anywhere while being walked
        raise MannEdgeError(f"{path} is not a readable ORT-format model ({type(error).__name__}: {error})") from None


def read_ort_metadata(path: "str | os.PathLike") -> dict[str, str]:
    """The ``metadata_props`` of an ORT-format model file (key -> value), read from its flatbuffer.

    Example:
        >>> read_ort_metadata("out/ort/digits.ort")["mann_edge_task"]
        'digits'
    """
    def metadata(model) -> dict[str, str]:
        entries = [model.MetadataProps(i) for i in range(model.MetadataPropsLength())] if model else []
        return {entry.Key().decode(): entry.Value().decode() for entry in entries}

    return read_ort_model(path, metadata)


def read_manifest(path: "str | os.PathLike") -> tuple[dict, dict[str, str]]:
    """(the mann-edge manifest, all metadata) of one ``.onnx`` or ``.ort`` file, or a MannEdgeError naming the file.

    Example:
        >>> manifest, metadata = read_manifest("out/onnx/digits.onnx")
        >>> metadata["mann_edge_dtype"], manifest["tasks"][0]["name"]
        ('float32', 'digits')
    """
    metadata = read_ort_metadata(path) if Path(path).suffix == ORT_SUFFIX else read_metadata(path)
    for key in (METADATA_MANIFEST, METADATA_TASK):
        if key not in metadata:
            raise MannEdgeError(
                f"{path} is an ONNX model without the '{key}' metadata entry, so not a mann-edge export "
                f"(its metadata: {sorted(metadata) or 'none'}); export it with mann_edge.converters.onnx"
            )
    try:
        manifest = safe_json.loads(metadata[METADATA_MANIFEST], f"metadata entry '{METADATA_MANIFEST}'")
    except ValueError as error:
        raise MannEdgeError(f"{path}: {error}") from None
    return manifest, metadata


def _task_files(path: Path) -> tuple[list[Task], dict[str, Path], dict[str, str]]:
    """The tasks of the export at ``path`` (in the model's order), the file of each, and the dtype of each."""
    # a directory of one kind: per-task .onnx files, or their .ort conversions
    files = (sorted(path.glob(f"*{SUFFIX}")) or sorted(path.glob(f"*{ORT_SUFFIX}"))) if path.is_dir() else [path]
    if not files:
        raise MannEdgeError(f"{path} holds no {SUFFIX} or {ORT_SUFFIX} files, so no ONNX export")
    by_task: dict[str, Path] = {}
    specs: dict[str, Task] = {}
    dtypes: dict[str, str] = {}
    exports: dict[Path, tuple] = {}
    for file in files:
        manifest, metadata = read_manifest(file)
        try:
            tasks = {task.name: task for task in tasks_from_manifest(manifest, file)}
        except BundleError as error:
            raise MannEdgeError(str(error)) from None
        name = metadata[METADATA_TASK]
        if name not in tasks:
            raise MannEdgeError(f"{file} says it holds task {name!r}, which its manifest does not have "
                                f"(tasks: {list(tasks)})")
        if name in by_task:
            raise MannEdgeError(f"Task {name!r} is in two files of {path}: {by_task[name].name} and {file.name}")
        by_task[name], specs[name] = file, tasks[name]
        dtypes[name] = metadata.get(METADATA_DTYPE, "float32")
        exports[file] = export_of(manifest, metadata[METADATA_MANIFEST], file)
    order = export_task_order(path, by_task, exports, parts=f"the {files[0].suffix} files", whole=path.is_dir())
    return [specs[name] for name in order], by_task, dtypes


# -- per-task files: which export a file belongs to ----------------------------------------------
# Shared with `mann_edge.runtime.coreml`, whose per-task packages embed their manifests the same way
# (written by `mann_edge.converters.metadata`).


def _ort_errors() -> tuple[type[BaseException], ...]:
    """What onnxruntime raises: its own classes derive from Exception, not RuntimeError."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
             "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")
    return tuple(getattr(state, name) for name in names if hasattr(state, name)) + (RuntimeError, ValueError)


class OnnxSession(Session):
    """An ONNX export opened with onnxruntime; ``run(task, x)`` runs only that task's graph.

    Args:
        path: the export directory (one ``.onnx`` per task, or one ``.ort`` per task: ONNX
            Runtime's own format) or a single task's file.
        threads: onnxruntime's intra-op thread count (None: its default).

    Raises:
        MannEdgeError: a file that is not ONNX, is truncated, lacks the mann-edge metadata,
            or a task without its file.

    Example:
        >>> sess = OnnxSession("out/onnx", threads=1)
        >>> sess.run("cancer", x)[0].shape
        (1, 2)
    """

    backend = "onnxruntime"

    def __init__(self, path: "str | os.PathLike", threads: int | None = None):
        path = Path(path)
        if not path.exists():
            raise MannEdgeError(f"ONNX export {path} does not exist")
        tasks, files, dtypes = _task_files(path)
        super().__init__(path, tasks)
        self.files = files
        self.dtypes = dtypes
        self.threads = threads
        self._sessions: dict[str, object] = {}

    def session(self, task: str):
        """The `onnxruntime.InferenceSession` of ``task``, created (weights loaded and folded) on first use."""
        name = self.task(task).name
        if name not in self._sessions:
            self._sessions[name] = self._open(self.files[name])
        return self._sessions[name]

    def _open(self, file: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        # fatal only: a failure reaches the caller as a MannEdgeError with the message, not as a log line too
        options.log_severity_level = 4
        if self.threads is not None:
            options.intra_op_num_threads = int(self.threads)
        try:
            return ort.InferenceSession(str(file), sess_options=options, providers=["CPUExecutionProvider"])
        except _ort_errors() as error:
            raise MannEdgeError(f"onnxruntime cannot open {file}: {error}") from None

    def _run(self, task: Task, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        session = self.session(task.name)
        try:
            return session.run([spec.name for spec in task.outputs], inputs)
        except _ort_errors() as error:  # onnxruntime puts its kernels' messages in the error
            raise MannEdgeError(f"onnxruntime failed to run task {task.name!r} of {self.files[task.name]}: {error}") from None


def fixed_batch(session: OnnxSession) -> int | None:
    """The batch size every task of ``session`` is fixed to (exported with ``batch=N``), or None when it is free.

    Example:
        >>> fixed_batch(OnnxSession("out/onnx"))   # exported with batch=1
        1
    """
    sizes = {arg.shape[0] for task in session.tasks for arg in session.session(task.name).get_inputs()}
    (size,) = sizes if len(sizes) == 1 else (None,)
    return size if isinstance(size, int) else None
