"""Parsing JSON that came from a file someone else wrote: bounded depth, no duplicate keys.

Every JSON text mann-edge reads from a file goes through `loads`: a bundle's manifest, the
safetensors header, the manifests and task tables in export metadata (TFLite, ONNX, Core ML)
and a legacy `.h5` file's ``model_config``. Python's own parser accepts two things a crafted
file can use against its reader:

- nesting thousands of levels deep, which raises a raw RecursionError there or in any
  recursive code that walks the result later;
- the same key twice in one object, where the last value silently wins, so two readers
  (or a person and a program) can see different documents in the same bytes.

`loads` refuses both, and malformed text, with a ValueError saying what and where; callers
prefix the file name.

Example:
    >>> loads('{"a": 1, "a": 2}', "manifest.json")
    Traceback (most recent call last):
    ValueError: manifest.json: key 'a' appears twice in one object
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["loads", "MAX_DEPTH"]

# Deeper than anything mann-edge writes (a manifest is about 6 levels, a Keras 2 model_config
# about 10) and far below the interpreter's recursion limit.
MAX_DEPTH = 64


def _unique_keys(where: str):
    def build(pairs: list[tuple[str, Any]]) -> dict:
        result: dict = {}
        for key, value in pairs:
            if key in result:
                raise ValueError(f"{where}: key {key!r} appears twice in one object")
            result[key] = value
        return result

    return build


def loads(text: "str | bytes", where: str, *, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON value of ``text``; ValueError naming ``where`` for invalid JSON, a repeated key or too deep nesting.

    Example:
        >>> loads(b'{"tasks": []}', "manifest.json")
        {'tasks': []}
    """
    try:
        if isinstance(text, (bytes, bytearray, memoryview)):
            text = bytes(text).decode("utf-8")
        value = json.loads(text, object_pairs_hook=_unique_keys(where))
    except UnicodeDecodeError as error:
        raise ValueError(f"{where} is not UTF-8 text ({error})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not valid JSON ({error})") from None
    except RecursionError:
        raise ValueError(f"{where} is nested deeper than {max_depth} levels") from None
    _check_depth(value, where, max_depth)
    return value


def _check_depth(value: Any, where: str, max_depth: int) -> None:
    # iterative, so checking a deep document cannot itself run out of stack
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > max_depth:
                raise ValueError(f"{where} is nested deeper than {max_depth} levels")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
