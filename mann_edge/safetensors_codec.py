"""Reads and writes the safetensors format (https://github.com/huggingface/safetensors) with numpy.

The format is a little-endian u64 header length, a JSON header
(name -> dtype, shape, byte offsets; optional ``__metadata__``) and the raw
bytes. Reading checks every offset, size and shape against the buffer before
making any array, so a truncated or hostile file gives a ValueError, never a
crash or a large allocation. The arrays returned are read-only views of the
given bytes.

Example:
    >>> blob = encode({"w": np.ones((2, 3), "float32")}, metadata={"source": "x"})
    >>> arrays, metadata = decode(blob)
"""

from __future__ import annotations

import json
import math
import struct
from typing import Mapping

import numpy as np

from mann_edge import safe_json

__all__ = ["encode", "decode", "MAX_HEADER_BYTES"]

MAX_HEADER_BYTES = 64 * 1024 * 1024

_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}


def encode(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors bytes of ``arrays`` (stored in the order given)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    chunks, offset = [], 0
    for name, array in arrays.items():
        array = np.asarray(array, order="C")  # ascontiguousarray would turn a scalar into shape (1,)
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        code = _CODES.get(np.dtype(dtype))
        if code is None:
            raise ValueError(f"Tensor '{name}': dtype {array.dtype} cannot be stored in safetensors")
        data = array.astype(dtype, copy=False).tobytes()
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keeps the data 8-byte aligned
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def decode(blob: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The arrays and metadata in ``blob``; ValueError saying what is wrong otherwise."""
    view = memoryview(blob)
    if len(view) < 8:
        raise ValueError(f"safetensors data is {len(view)} bytes, shorter than its 8-byte header length")
    (header_size,) = struct.unpack("<Q", view[:8])
    if header_size > min(MAX_HEADER_BYTES, len(view) - 8):
        raise ValueError(f"safetensors header claims {header_size} bytes but the data has {len(view) - 8}")
    header = safe_json.loads(bytes(view[8 : 8 + header_size]), "safetensors header")
    if not isinstance(header, dict):
        raise ValueError("safetensors header must be a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("safetensors __metadata__ must map strings to strings")
    buffer = view[8 + header_size :]
    arrays, spans = {}, []
    for name, entry in header.items():
        dtype, shape, (begin, end) = _check_entry(name, entry, len(buffer))
        spans.append((begin, end, name))
        arrays[name] = np.frombuffer(buffer[begin:end], dtype=dtype).reshape(shape)
    spans.sort()
    for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise ValueError(f"safetensors tensors '{name_a}' and '{name_b}' overlap")
    return arrays, dict(metadata)


def _check_entry(name, entry, buffer_size):
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"safetensors entry '{name}' must have exactly dtype, shape and data_offsets")
    dtype = _DTYPES.get(entry["dtype"])
    if dtype is None:
        raise ValueError(f"safetensors entry '{name}' has unsupported dtype {entry['dtype']!r}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"safetensors entry '{name}' has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= buffer_size
    ):
        raise ValueError(f"safetensors entry '{name}' has offsets {offsets!r} outside the {buffer_size}-byte data")
    if math.prod(shape) * dtype.itemsize != offsets[1] - offsets[0]:
        raise ValueError(
            f"safetensors entry '{name}': shape {shape} of {entry['dtype']} needs "
            f"{math.prod(shape) * dtype.itemsize} bytes, offsets span {offsets[1] - offsets[0]}"
        )
    return dtype, tuple(shape), offsets
