"""One helper for every lookup table of mann-edge: ops, layer lowerings, format lowerings, MIL kernels.

A table maps keys (op types, activation names, layer classes) to what handles them. Entries
register with a decorator beside their function or class, as in ONNX's reference evaluator;
an unknown key raises the table's error class with one message shape everywhere:
"<owner> cannot <verb> <what> 'x' (<context>). Supported <what>s: [...]".

Example:
    >>> LOWERINGS = Registry("op", owner="ONNX export", verb="lower", error=ConversionError)
    >>> @LOWERINGS.register("relu")
    ... def _relu(g, node, inputs): ...
    >>> LOWERINGS.lookup("gelu", context="node 'dense_3'")
    Traceback (most recent call last):
    ConversionError: ONNX export cannot lower op 'gelu' (node 'dense_3'). Supported ops: ['relu']
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Iterator

__all__ = ["Registry"]


class Registry:
    """A named table: ``register(*keys)`` decorates its entries, ``lookup(key)`` finds one or says what exists.

    Args:
        what: what the keys are, singular ("op", "activation", "layer class", "MIL op").
        owner: who consults the table, for messages ("ONNX export", "compaction").
        verb: what the owner does with an entry ("lower", "run", "compact").
        error: the exception class an unknown key raises.
    """

    def __init__(self, what: str, *, owner: str, verb: str, error: type[Exception] = ValueError):
        self.what = what
        self.owner = owner
        self.verb = verb
        self.error = error
        self._entries: dict[Hashable, Any] = {}

    def register(self, *keys: Hashable) -> Callable[[Any], Any]:
        """A decorator registering its function or class under each of ``keys`` (a key registered twice is an error)."""
        if not keys:
            raise ValueError(f"register() of the {self.owner} {self.what} table needs at least one key")

        def decorator(entry):
            for key in keys:
                if key in self._entries:
                    raise ValueError(f"{self.owner}: {self.what} {_label(key)!r} is registered twice")
                self._entries[key] = entry
            return entry

        return decorator

    def lookup(self, key: Hashable, *, context: str = "") -> Any:
        """The entry of ``key``, or the table's error naming ``key``, the context and what is supported."""
        try:
            return self._entries[key]
        except (KeyError, TypeError):
            where = f" ({context})" if context else ""
            raise self.error(
                f"{self.owner} cannot {self.verb} {self.what} {_label(key)!r}{where}. "
                f"Supported {self.what}s: {self.supported()}"
            ) from None

    def supported(self) -> list[str]:
        """The registered keys as sorted names."""
        return sorted({_label(key) for key in self._entries})

    def __contains__(self, key: object) -> bool:
        try:
            return key in self._entries
        except TypeError:
            return False

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, key: Hashable) -> Any:
        return self.lookup(key)

    def get(self, key: Hashable, default: Any = None) -> Any:
        return self._entries.get(key, default)

    def keys(self):
        return self._entries.keys()

    def items(self):
        return self._entries.items()

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, owner={self.owner!r}, {len(self)} entries)"


def _label(key: Hashable) -> str:
    return key.__name__ if isinstance(key, type) else str(key)
