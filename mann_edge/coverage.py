"""Which layers mann-edge compacts and which formats take them, read from the tables themselves.

A row per lowering in `mann_edge.compaction.LOWERINGS` (the layer classes it covers, the
compact ops it declares with `compaction.lowers`) and a column per format in
`mann_edge.formats.FORMATS`, ticked where that format's converter has a lowering for every
one of those ops. The README's layer table is this module's output; a test fails when they
differ, and ``python -m mann_edge.coverage --write README.md`` rewrites it.

Example:
    >>> print(layer_table())
    | Layers | Compact ops | .mann | TFLite | ONNX | Core ML |
    ...
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LayerRow", "layer_rows", "layer_table", "README_START", "README_END", "main"]

README_START = "<!-- layer table: made by `python -m mann_edge.coverage --write README.md`; do not edit by hand -->"
README_END = "<!-- end of layer table -->"


@dataclass(frozen=True)
class LayerRow:
    """One lowering: the classes it compacts, the ops it emits, and per format whether every op has a lowering."""

    classes: tuple[type, ...]
    ops: tuple[str, ...]
    formats: dict[str, bool]


def layer_rows() -> list[LayerRow]:
    """Every lowering of the compaction table, in registration order (mann-edge's layers, then Keras's)."""
    from mann_edge.compaction import LOWERINGS
    from mann_edge.formats import FORMATS

    lowered = {name: set(fmt.converter_module().LOWERINGS) for name, fmt in FORMATS.items()}
    by_function: dict[object, list[type]] = {}
    for cls, function in LOWERINGS.items():
        by_function.setdefault(function, []).append(cls)
    rows = [
        LayerRow(tuple(classes), function.ops, {name: set(function.ops) <= ops for name, ops in lowered.items()})
        for function, classes in by_function.items()
    ]
    return sorted(rows, key=lambda row: not any(_is_mann(cls) for cls in row.classes))


def _is_mann(cls: type) -> bool:
    return cls.__module__.startswith("mann_edge.")


def _name(cls: type) -> str:
    # RSN2 prunes a masked layer; block_prunable ones also in blocks (TFLite's sparse kernel).
    masked = getattr(cls, "masked", False)
    marks = ("†" if masked else "") + ("‡" if masked and getattr(cls, "block_prunable", False) else "")
    return f"`{cls.__name__}`{marks}"


def layer_table() -> str:
    """The README's layer table (markdown), with its notes."""
    from mann_edge.formats import FORMATS

    titles = [fmt.title if name != "mann" else f"`{fmt.suffix}` (bundle runtime)" for name, fmt in FORMATS.items()]
    lines = [
        "| Layers | Compact ops | " + " | ".join(titles) + " |",
        "|---|---|" + "---|" * len(FORMATS),
    ]
    for row in layer_rows():
        names = ", ".join(_name(cls) for cls in row.classes)
        ops = ", ".join(f"`{op}`" for op in row.ops) or "none (wiring)"
        ticks = " | ".join("✓" if row.formats[name] else "✗" for name in FORMATS)
        lines.append(f"| {names} | {ops} | {ticks} |")
    lines += [
        "",
        "Layers in `mann_edge.layers` keep the original packages' names; the others are `keras.layers`. "
        "† RSN2 prunes it (masks); ‡ also in blocks (`block_size`). A functional or Sequential model "
        "called as a layer is read into the graph, layer by layer. Every activation Keras names is "
        "taken, as an `activation` argument or an `Activation` layer. A layer not listed is refused at "
        "compaction (and by RSN2 before training) with the closest supported one.",
    ]
    return "\n".join(lines)


def _with_table(text: str, table: str) -> str:
    """``text`` with the block between `README_START` and `README_END` replaced by ``table``."""
    if README_START not in text or README_END not in text:
        raise ValueError(f"The file has no layer table markers ({README_START!r} ... {README_END!r})")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_START}\n{table}\n{README_END}{tail}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Print (or write into a README) mann-edge's supported-layer table.")
    parser.add_argument("--write", type=Path, metavar="README", help="rewrite the table between the markers in this file")
    args = parser.parse_args(argv)
    table = layer_table()
    if args.write is None:
        print(table)
        return 0
    from mann_edge.files import atomic_output

    updated = _with_table(args.write.read_text(), table)
    with atomic_output(args.write, force=True) as tmp:
        tmp.write_text(updated)
    print(f"wrote the layer table ({len(layer_rows())} rows) into {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
