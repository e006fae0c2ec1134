"""The `.mann` bundle: a zip (or a directory) of ``manifest.json`` and ``weights.safetensors``.

Reading never runs code from the file: JSON and raw arrays only. Every name,
shape, size and hash is checked against the manifest before arrays are made,
so a truncated, tampered or hostile file gives a BundleError saying what is
wrong, and a bundle from a newer mann-edge says so.

A bundle is a file people download and load on devices, so reading one is bounded like
reading an image:

- what the file can make the process hold: each zip entry expands at most
  `MAX_COMPRESSION_RATIO` times (a deflate bomb is refused before it is inflated), and the
  weights the manifest declares, as dense arrays (what the reference ops and the exporters
  make of them), at most `MAX_DECLARED_RATIO` times the weights file (plus
  `DECLARED_BYTES_FLOOR`): a 679-byte file cannot declare a table of 250M rows;
- the structure: JSON nested at most `mann_edge.safe_json.MAX_DEPTH` deep, no key or zip
  entry twice, every field of the manifest of its type, range or enumeration, every node's
  attributes as its op declares them (`mann_edge.graph.schema`);
- the shapes: every weight must fit its op and every node its declared shape, and no tensor
  of a one-example run may exceed `mann_edge.graph.plan.MAX_TENSOR_BYTES`
  (`mann_edge.graph.plan.check_model`), so no kernel ever reads past an array.

Example:
    >>> cm.save("model.mann")
    >>> same = load_compact("model.mann")
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
import zipfile
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mann_edge import safe_json, safetensors_codec
from mann_edge._version import __version__
from mann_edge.errors import BundleError, MannEdgeError
from mann_edge.files import atomic_output, build_time
from mann_edge.graph.model import DTYPES, CompactModel, Node, Task, TensorSpec, embedding_rows, with_id_limits
from mann_edge.graph.ops import OPS
from mann_edge.graph.plan import check_model, describe_bytes
from mann_edge.sparse import LAYOUTS, CSRWeight

__all__ = [
    "save_compact", "load_compact", "manifest_of", "tasks_from_manifest", "export_of", "export_task_order",
    "SELECTED_FROM", "FORMAT", "FORMAT_VERSION", "MAX_COMPRESSION_RATIO", "MAX_DECLARED_RATIO", "DECLARED_BYTES_FLOOR",
]

FORMAT = "mann-edge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_WEIGHTS_BYTES = 16 * 1024**3
# A zip entry may inflate to at most this many times its compressed bytes (plus a mebibyte, for small
# entries): mann-edge stores the weights uncompressed and its manifests deflate about 6 to 15 times.
MAX_COMPRESSION_RATIO = 32
_SMALL_ENTRY = 1 << 20
# a zip entry's local header: signature, versions, flags, method, time, date, CRC, sizes, name and extra lengths
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
_UNREADABLE_FLAGS = 0x1 | 0x20 | 0x40  # encrypted, compressed patched data, strong encryption
# The weights a manifest declares, as dense float32 arrays, may take at most this many times the
# weights file's bytes plus the floor: a CSR weight 99.6 % zero is 256 times smaller than dense;
# RSN2's 90 % makes about 7.
MAX_DECLARED_RATIO = 256
DECLARED_BYTES_FLOOR = 16 * 1024 * 1024
# Ranks and sizes of a declared shape; beyond these no model is meant, and the sums stay small.
MAX_RANK = 8
MAX_DIM = 2**31 - 1


# -- writing -------------------------------------------------------------------------------------


def _weight_arrays(model: CompactModel) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    arrays, entries = {}, {}
    for key, weight in model.weights.items():
        if isinstance(weight, CSRWeight):
            entries[key] = {"kind": "csr", "shape": list(weight.shape), "layout": weight.layout, "dtype": str(weight.dtype)}
            arrays[f"{key}/indptr"], arrays[f"{key}/indices"], arrays[f"{key}/data"] = (
                weight.indptr,
                weight.indices,
                weight.data,
            )
        else:
            entries[key] = {"kind": "dense", "shape": list(weight.shape), "dtype": str(weight.dtype)}
            arrays[key] = weight
    return arrays, entries


def manifest_of(model: CompactModel, weight_entries: Mapping | None = None) -> dict:
    """The manifest (JSON-able dict) describing ``model``; exports embed it in their metadata."""
    if weight_entries is None:
        weight_entries = _weight_arrays(model)[1]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "inputs": [spec.to_json() for spec in model.inputs],
        "nodes": [node.to_json() for node in model.nodes],
        "tasks": [task.to_json() for task in model.tasks],
        "weights": dict(weight_entries),
        "provenance": dict(model.provenance),
    }


def save_compact(model: CompactModel, path: "str | os.PathLike", *, force: bool = False) -> str:
    """Writes ``model`` as a `.mann` zip at ``path`` (atomically); returns the path."""
    arrays, entries = _weight_arrays(model)
    blob = safetensors_codec.encode(arrays, metadata={"format": FORMAT})
    manifest = manifest_of(model, entries)
    manifest["provenance"].setdefault("mann_edge_version", __version__)
    manifest["weights_file"] = {"name": WEIGHTS, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    text = json.dumps(manifest, indent=1, sort_keys=False).encode()
    with atomic_output(path, force=force) as tmp:
        with zipfile.ZipFile(tmp, "w") as archive:
            archive.writestr(_entry(MANIFEST, zipfile.ZIP_DEFLATED), text)
            archive.writestr(_entry(WEIGHTS, zipfile.ZIP_STORED), blob)
    return str(path)


def _entry(name: str, compression: int) -> zipfile.ZipInfo:
    """A zip entry stamped with `build_time` (not now), so the same model gives the same bytes."""
    info = zipfile.ZipInfo(name, date_time=build_time().timetuple()[:6])
    info.compress_type = compression
    info.external_attr = 0o644 << 16
    return info


# -- reading -------------------------------------------------------------------------------------


def load_compact(path: "str | os.PathLike") -> CompactModel:
    """Reads a `.mann` bundle (zip or directory) into a CompactModel, checking everything on the way.

    Raises:
        BundleError: missing, truncated, tampered, or newer than this mann-edge reads.

    Example:
        >>> cm = load_compact("model.mann")
        >>> cm.task_names
        ['digits', 'cancer']
    """
    path = Path(path)
    if not path.exists():
        raise BundleError(f"Bundle {path} does not exist")
    manifest_bytes, read_weights = _open(path)
    try:
        manifest = safe_json.loads(manifest_bytes, MANIFEST)
    except ValueError as error:
        raise BundleError(f"Bundle {path}: {error}") from None
    reader = _ManifestReader(path, manifest)
    reader.check_header()
    declared = reader.weights_file()
    reader.check_declared_sizes(declared["bytes"])
    blob = read_weights(declared["bytes"])
    if len(blob) != declared["bytes"]:
        raise BundleError(f"Bundle {path}: {WEIGHTS} is {len(blob)} bytes, the manifest says {declared['bytes']} (truncated?)")
    # the hash runs on a second thread while the arrays are checked (hashlib lets go of the GIL): a sixth of a
    # load; its verdict comes first, so a corrupt file is reported as such whatever the checks made of it
    digest = _Sha256(blob)
    try:
        model, failure = reader.model(_arrays(path, blob)), None
    except BundleError as error:
        model, failure = None, error
    if digest.hexdigest() != declared["sha256"]:
        raise BundleError(f"Bundle {path}: {WEIGHTS} does not match the manifest's sha256 (corrupt or tampered)")
    if failure is not None:
        raise failure
    return model


def _arrays(path: Path, blob: bytes) -> dict[str, np.ndarray]:
    try:
        return safetensors_codec.decode(blob)[0]
    except ValueError as error:
        raise BundleError(f"Bundle {path}: {WEIGHTS}: {error}") from None


class _Sha256:
    """The sha256 of ``data``, computed on a thread of its own from construction; `hexdigest` waits for it."""

    def __init__(self, data):
        self._hash = hashlib.sha256()
        self._thread = threading.Thread(target=self._hash.update, args=(data,), name="mann-edge bundle sha256")
        self._thread.start()

    def hexdigest(self) -> str:
        self._thread.join()
        return self._hash.hexdigest()


def tasks_from_manifest(manifest: Any, source: "str | os.PathLike") -> list[Task]:
    """The tasks described by a manifest embedded in an export's metadata (no weights needed).

    Raises BundleError naming ``source`` when the manifest is not one mann-edge wrote.
    """
    reader = _ManifestReader(Path(source), manifest)
    reader.check_header()
    inputs = [reader.spec(s, f"inputs[{i}]") for i, s in enumerate(reader.field(manifest, "inputs", list, "manifest"))]
    nodes = {n.get("name"): None for n in reader.field(manifest, "nodes", list, "manifest") if isinstance(n, dict)}
    tasks = [reader.task(t, f"tasks[{i}]", inputs, nodes) for i, t in enumerate(reader.field(manifest, "tasks", list, "manifest"))]
    if not tasks:
        reader.fail("tasks", "is empty; a model needs at least one task")
    if len({t.name for t in tasks}) != len(tasks):
        reader.fail("tasks", "has duplicate task names")
    return list(with_id_limits(tasks, reader.embedding_rows()))


def _open(path: Path):
    """(manifest bytes, function reading the weights given their declared size)."""
    if path.is_dir():
        manifest_path, weights_path = path / MANIFEST, path / WEIGHTS
        for part in (manifest_path, weights_path):
            if not part.is_file():
                raise BundleError(f"Bundle directory {path} has no {part.name}")
        if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"Bundle {path}: {MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")

        def read_weights(expected: int) -> bytes:
            if weights_path.stat().st_size != expected:
                raise BundleError(
                    f"Bundle {path}: {WEIGHTS} is {weights_path.stat().st_size} bytes, the manifest says {expected}"
                )
            return weights_path.read_bytes()

        return manifest_path.read_bytes(), read_weights

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as error:
        raise BundleError(f"Bundle {path} is not a readable .mann zip ({error}); truncated or not a bundle?") from None
    infos = {}
    for info in archive.infolist():
        name = info.filename
        if name.startswith(("/", "\\")) or ".." in Path(name).parts or ":" in name:
            raise BundleError(f"Bundle {path} has an unsafe entry name {name!r}; refusing to read it")
        if name not in (MANIFEST, WEIGHTS):
            raise BundleError(f"Bundle {path} has an unexpected entry {name!r}; a bundle holds only {MANIFEST} and {WEIGHTS}")
        if name in infos:  # zipfile would silently read the last one; another reader may take the first
            raise BundleError(f"Bundle {path} has two entries named {name!r}; refusing to guess which one is meant")
        if info.file_size > MAX_COMPRESSION_RATIO * info.compress_size + _SMALL_ENTRY:
            raise BundleError(
                f"Bundle {path}: entry {name!r} inflates from {info.compress_size} to {info.file_size} bytes, more than "
                f"{MAX_COMPRESSION_RATIO} times; refusing it (a decompression bomb?)"
            )
        infos[name] = info
    for name in (MANIFEST, WEIGHTS):
        if name not in infos:
            raise BundleError(f"Bundle {path} has no {name}")
    if infos[MANIFEST].file_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"Bundle {path}: {MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")

    def read(name: str, limit: int) -> bytes:
        try:
            with archive.open(infos[name]) as handle:
                return handle.read(limit + 1)
        # a damaged header can also claim encryption, an unknown method or a newer zip version
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError, RuntimeError) as error:
            raise BundleError(f"Bundle {path}: cannot read {name} ({error}); the file is truncated or corrupt") from None

    def read_weights(expected: int) -> bytes:
        if infos[WEIGHTS].file_size != expected:
            raise BundleError(f"Bundle {path}: {WEIGHTS} is {infos[WEIGHTS].file_size} bytes, the manifest says {expected}")
        if infos[WEIGHTS].compress_type == zipfile.ZIP_STORED:
            return _stored_entry(path, infos[WEIGHTS])
        return read(WEIGHTS, expected)

    return read(MANIFEST, MAX_MANIFEST_BYTES), read_weights


def _stored_entry(path: Path, info: zipfile.ZipInfo) -> bytes:
    """The bytes of an uncompressed zip entry, read in one call.

    zipfile reads an entry in chunks and computes its CRC-32 on the way (about a third of a load of
    the paper-scale bundle); the weights' sha256, which `load_compact` checks against the manifest,
    is the stronger check of the same bytes.
    """
    def refuse(reason: str):
        raise BundleError(f"Bundle {path}: cannot read {info.filename} ({reason}); the file is truncated or corrupt")

    if info.flag_bits & _UNREADABLE_FLAGS:
        refuse(f"its zip flags 0x{info.flag_bits:x} claim encryption or patched data")
    try:
        with open(path, "rb") as handle:
            handle.seek(info.header_offset)
            header = handle.read(_LOCAL_HEADER.size)
            if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
                refuse("no local zip header where the directory says")
            name_length, extra_length = _LOCAL_HEADER.unpack(header)[-2:]
            if handle.read(name_length) != info.orig_filename.encode():
                refuse("its local zip header names another entry")
            handle.seek(extra_length, os.SEEK_CUR)
            data = handle.read(info.file_size)
    except OSError as error:
        refuse(str(error))
    if len(data) != info.file_size:
        refuse(f"it ends after {len(data)} of its {info.file_size} bytes")
    return data


class _ManifestReader:
    """Checks a manifest field by field; every error names the bundle and the field."""

    def __init__(self, path: Path, manifest: Any):
        self.path = path
        if not isinstance(manifest, dict):
            self.fail("manifest", "must be a JSON object")
        self.manifest = manifest

    def fail(self, where: str, message: str):
        raise BundleError(f"Bundle {self.path}: {where} {message}")

    def field(self, data: Any, key: str, kind, where: str):
        if not isinstance(data, dict) or key not in data:
            self.fail(where, f"has no '{key}'")
        value = data[key]
        if kind is int and isinstance(value, bool) or not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            self.fail(f"{where}.{key}", f"must be {names}, got {type(value).__name__}")
        return value

    def names(self, data: Any, key: str, where: str) -> list[str]:
        """A field holding a list of names (strings)."""
        value = self.field(data, key, list, where)
        if not all(isinstance(item, str) for item in value):
            self.fail(f"{where}.{key}", "must be a list of names (strings)")
        return value

    def shape(self, value: Any, where: str, allow_none: bool) -> tuple:
        if not isinstance(value, list) or len(value) > MAX_RANK or not all(
            (d is None and allow_none) or (isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM)
            for d in value
        ):
            self.fail(where, f"must be a list of at most {MAX_RANK} ints in [0, {MAX_DIM}]"
                             f"{' or null' if allow_none else ''}, got {_short(value)}")
        return tuple(value)

    def dtype(self, value: Any, where: str, allowed=DTYPES) -> str:
        if value not in allowed:
            self.fail(where, f"must be one of {list(allowed)}, got {value!r}")
        return value

    def check_header(self) -> None:
        if self.manifest.get("format") != FORMAT:
            self.fail("manifest", f"is not a mann-edge bundle manifest (format {self.manifest.get('format')!r})")
        version = self.field(self.manifest, "format_version", int, "manifest")
        if version > FORMAT_VERSION:
            self.fail(
                "manifest",
                f"has format version {version}, newer than the {FORMAT_VERSION} this mann-edge {__version__} reads; "
                "upgrade mann-edge to read it",
            )
        if version < 1:
            self.fail("manifest.format_version", f"must be at least 1, got {version}")

    def weights_file(self) -> dict:
        entry = self.field(self.manifest, "weights_file", dict, "manifest")
        size = self.field(entry, "bytes", int, "manifest.weights_file")
        if not 0 <= size <= MAX_WEIGHTS_BYTES:
            self.fail("manifest.weights_file.bytes", f"must be between 0 and {MAX_WEIGHTS_BYTES}, got {size}")
        digest = self.field(entry, "sha256", str, "manifest.weights_file")
        if len(digest) != 64:
            self.fail("manifest.weights_file.sha256", "must be 64 hex digits")
        return {"bytes": size, "sha256": digest}

    def check_declared_sizes(self, weights_bytes: int) -> None:
        """Refuses a manifest whose weights, made dense, would take far more than the weights file holds.

        Run before the weights are read: the declared shapes are what the reference ops and
        the exporters allocate, and a CSR weight of a few bytes can declare any shape.
        """
        entries = self.field(self.manifest, "weights", dict, "manifest")
        sizes = {}
        for key, entry in entries.items():
            where = f"weights[{key!r}]"
            shape = self.shape(self.field(entry, "shape", list, where), f"{where}.shape", allow_none=False)
            dtype = self.dtype(self.field(entry, "dtype", str, where), f"{where}.dtype")
            sizes[key] = math.prod(shape) * max(np.dtype(dtype).itemsize, 4)  # float16 computes as float32
        limit = MAX_DECLARED_RATIO * weights_bytes + DECLARED_BYTES_FLOOR
        total = sum(sizes.values())
        if total > limit:
            key = max(sizes, key=sizes.get)
            self.fail(f"weights[{key!r}]", f"declares shape {entries[key]['shape']} ({describe_bytes(sizes[key])} dense); "
                      f"the model's weights would take {describe_bytes(total)} dense from a weights file of "
                      f"{weights_bytes} bytes, more than {MAX_DECLARED_RATIO} times it (plus "
                      f"{describe_bytes(DECLARED_BYTES_FLOOR)}); refusing to allocate them")

    def embedding_rows(self) -> dict[str, int]:
        """Tensor -> rows of the smallest embedding table reading it, from the manifest's node and weight entries."""
        entries = self.manifest.get("weights") if isinstance(self.manifest.get("weights"), dict) else {}
        nodes = []
        for i, data in enumerate(self.field(self.manifest, "nodes", list, "manifest")):
            if isinstance(data, dict) and data.get("op") == "embedding":
                table = data.get("weights", {}).get("table") if isinstance(data.get("weights"), dict) else None
                entry = entries.get(table) if isinstance(table, str) else None
                if entry is None:
                    self.fail(f"nodes[{i}].weights.table", f"refers to {table!r}, which is not in the weights")
                shape = self.shape(self.field(entry, "shape", list, f"weights[{table!r}]"), f"weights[{table!r}].shape",
                                   allow_none=False)
                nodes.append(Node(str(data.get("name")), "embedding", tuple(self.names(data, "inputs", f"nodes[{i}]")),
                                  {"table": table}, shape=shape))
        return embedding_rows(nodes, lambda key: next(n.shape for n in nodes if n.weights["table"] == key))

    def spec(self, data: Any, where: str) -> TensorSpec:
        return TensorSpec(
            self.field(data, "name", str, where),
            self.shape(self.field(data, "shape", list, where), f"{where}.shape", allow_none=True),
            self.dtype(self.field(data, "dtype", str, where), f"{where}.dtype"),
        )

    def model(self, arrays: dict[str, np.ndarray]) -> CompactModel:
        m = self.manifest
        inputs = [self.spec(s, f"inputs[{i}]") for i, s in enumerate(self.field(m, "inputs", list, "manifest"))]
        known = {spec.name for spec in inputs}
        if len(known) != len(inputs):
            self.fail("inputs", "has duplicate names")
        weights = self.weights(self.field(m, "weights", dict, "manifest"), arrays)
        nodes = []
        for i, data in enumerate(self.field(m, "nodes", list, "manifest")):
            node = self.node(data, f"nodes[{i}]", known, weights)
            known.add(node.name)
            nodes.append(node)
        by_name = {node.name: node for node in nodes}
        tasks = [self.task(t, f"tasks[{i}]", inputs, by_name) for i, t in enumerate(self.field(m, "tasks", list, "manifest"))]
        if not tasks:
            self.fail("tasks", "is empty; a bundle needs at least one task")
        if len({t.name for t in tasks}) != len(tasks):
            self.fail("tasks", "has duplicate task names")
        provenance = m.get("provenance", {})
        if not isinstance(provenance, dict):
            self.fail("provenance", "must be an object")
        model = CompactModel(inputs, nodes, tasks, weights, provenance)
        for i, task in enumerate(model.tasks):
            reads = {spec.name for spec in inputs} & model.ancestors(task.output_tensors)
            missing = sorted(reads - {spec.name for spec in task.inputs})
            if missing:
                self.fail(f"tasks[{i}].inputs", f"lacks {missing}, which task {task.name!r} computes its outputs from")
        try:
            check_model(model)
        except ValueError as error:
            raise BundleError(f"Bundle {self.path}: {error}") from None
        return model

    def node(self, data: Any, where: str, known: set, weights: dict) -> Node:
        name = self.field(data, "name", str, where)
        op = self.field(data, "op", str, where)
        if name in known:
            self.fail(f"{where}.name", f"{name!r} is used twice")
        if op not in OPS:
            self.fail(f"{where}.op", f"{op!r} is not an op this mann-edge knows; supported: {sorted(OPS)}")
        inputs = self.names(data, "inputs", where)
        for tensor in inputs:
            if tensor not in known:
                self.fail(f"{where}.inputs", f"refers to {tensor!r}, which is not an input or an earlier node")
        roles = self.field(data, "weights", dict, where)
        for role, key in roles.items():
            if not isinstance(key, str) or key not in weights:
                self.fail(f"{where}.weights.{role}", f"refers to {key!r}, which is not in the weights")
        attrs = self.field(data, "attrs", dict, where)
        node = Node(
            name,
            op,
            tuple(inputs),
            dict(roles),
            attrs,
            self.shape(self.field(data, "shape", list, where), f"{where}.shape", allow_none=True),
            self.dtype(self.field(data, "dtype", str, where), f"{where}.dtype"),
        )
        try:
            OPS[op].check(node)
        except ValueError as error:
            self.fail(where, str(error))
        return node

    def task(self, data: Any, where: str, inputs: list[TensorSpec], nodes: dict) -> Task:
        name = self.field(data, "name", str, where)
        by_name = {spec.name: spec for spec in inputs}
        task_inputs = []
        for input_name in self.names(data, "inputs", where):
            if input_name not in by_name:
                self.fail(f"{where}.inputs", f"refers to {input_name!r}, which is not a model input")
            task_inputs.append(by_name[input_name])
        if not task_inputs:
            self.fail(f"{where}.inputs", "is empty; a task needs at least one input")
        outputs, tensors = [], []
        for j, out in enumerate(self.field(data, "outputs", list, where)):
            outputs.append(self.spec(out, f"{where}.outputs[{j}]"))
            tensor = self.field(out, "tensor", str, f"{where}.outputs[{j}]")
            if tensor not in nodes and tensor not in by_name:
                self.fail(f"{where}.outputs[{j}].tensor", f"refers to {tensor!r}, which is not a node or input")
            tensors.append(tensor)
        if not outputs:
            self.fail(f"{where}.outputs", "is empty; a task needs at least one output")
        labels = data.get("labels", {})
        if not isinstance(labels, dict) or not all(
            isinstance(v, list) and all(isinstance(s, str) for s in v) for v in labels.values()
        ):
            self.fail(f"{where}.labels", "must map output names to lists of strings")
        return Task(name, tuple(task_inputs), tuple(outputs), tuple(tensors), labels)

    def weights(self, entries: dict, arrays: dict[str, np.ndarray]) -> dict:
        weights, used = {}, set()
        for key, entry in entries.items():
            where = f"weights[{key!r}]"
            kind = self.field(entry, "kind", str, where)
            shape = self.shape(self.field(entry, "shape", list, where), f"{where}.shape", allow_none=False)
            dtype = self.dtype(self.field(entry, "dtype", str, where), f"{where}.dtype")
            if kind == "dense":
                array = self.array(arrays, key, where)
                used.add(key)
                if array.shape != shape or str(array.dtype) != dtype:
                    self.fail(where, f"is {array.dtype}{list(array.shape)} in the weights file, the manifest says {dtype}{list(shape)}")
                weight = array
            elif kind == "csr":
                layout = self.field(entry, "layout", str, where)
                if layout not in LAYOUTS:
                    self.fail(f"{where}.layout", f"must be one of {LAYOUTS}, got {layout!r}")
                parts = [self.array(arrays, f"{key}/{part}", where) for part in ("indptr", "indices", "data")]
                used.update(f"{key}/{part}" for part in ("indptr", "indices", "data"))
                if str(parts[2].dtype) != dtype:
                    self.fail(where, f"values are {parts[2].dtype}, the manifest says {dtype}")
                try:
                    weight = CSRWeight(shape, layout, *parts)
                except ValueError as error:
                    self.fail(where, str(error))
            else:
                self.fail(f"{where}.kind", f"must be 'dense' or 'csr', got {kind!r}")
            values = weight.data if isinstance(weight, CSRWeight) else weight
            if np.issubdtype(values.dtype, np.floating) and not np.all(np.isfinite(values)):
                self.fail(where, "holds NaN or infinite values")
            weights[key] = weight
        extra = set(arrays) - used
        if extra:
            self.fail("weights file", f"holds tensors the manifest does not list: {sorted(extra)[:5]}")
        return weights

    def array(self, arrays: dict, key: str, where: str) -> np.ndarray:
        if key not in arrays:
            self.fail(where, f"needs tensor {key!r}, which the weights file does not have")
        return arrays[key]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- exports whose files each hold one task ------------------------------------------------------

# The provenance entry of a per-task file's manifest naming the export it belongs to (see `export_of`).
SELECTED_FROM = "selected_from"


def export_of(manifest: dict, text: str, source: "str | os.PathLike", error: type[MannEdgeError] = MannEdgeError
              ) -> tuple[tuple[str, ...], str]:
    """(the task names of the export a file belongs to, in the model's order; what identifies the export's model).

    A per-task file embeds the manifest of its own task, whose provenance records the export
    (`SELECTED_FROM`: every task name and the sha256 of the whole model's manifest). A
    manifest without that record describes the whole model (a multifunction Core ML
    package, or an export written before per-task manifests): its own tasks and text say it.

    Raises:
        ``error``: a record that is not a list of task names and a digest.

    Example:
        >>> export_of(task_manifest, text, "out/onnx/digits.onnx")
        (('digits', 'cancer'), '9f2c...')
    """
    provenance = manifest.get("provenance")
    record = provenance.get(SELECTED_FROM) if isinstance(provenance, dict) else None
    if record is None:
        tasks = manifest.get("tasks") if isinstance(manifest.get("tasks"), list) else []
        return tuple(task.get("name") for task in tasks if isinstance(task, dict)), text
    names = record.get("tasks") if isinstance(record, dict) else None
    digest = record.get("manifest_sha256") if isinstance(record, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not isinstance(digest, str):
        raise error(f"{source}: the manifest's provenance entry '{SELECTED_FROM}' must hold 'tasks' (a list of "
                    f"task names) and 'manifest_sha256' (a string). Received: {record!r}")
    return tuple(names), digest


def export_task_order(path: Path, held: Mapping[str, Path], exports: Mapping[Path, tuple], *, parts: str, whole: bool,
                      error: type[MannEdgeError] = MannEdgeError) -> list[str]:
    """The tasks held in the files of ``path``, in the model's order, once the files are checked to be one export.

    Args:
        path: the export (for messages).
        held: task -> the file holding it.
        exports: file -> `export_of` its manifest.
        parts: what the files are, for messages ("the .onnx files").
        whole: ``path`` is a directory that must hold every task of its export.

    Raises:
        ``error``: files of different exports, a task its export does not list, or (``whole``) a task without its file.
    """
    (first, export), *others = exports.items()
    for file, other in others:
        if other != export:
            raise error(f"{path}: {file.name} and {first.name} come from different models (their manifests differ)")
    order = list(export[0])
    unknown = [name for name in held if name not in order]
    if unknown:
        raise error(f"{path}: files {[held[name].name for name in unknown]} hold tasks {unknown} of another model")
    missing = [name for name in order if name not in held]
    if whole and missing:
        raise error(f"{path} lacks {parts} of tasks {missing} (found {sorted(file.name for file in exports)})")
    return [name for name in order if name in held]
