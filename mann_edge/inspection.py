"""`mann-edge inspect`: what a model holds, per task and per layer, and what it costs dense vs compact."""

from __future__ import annotations

from typing import Sequence

from mann_edge.graph.model import CompactModel, Node
from mann_edge.sources import load_source

__all__ = ["inspect", "format_report"]


def inspect(source, task_names: Sequence[str] | None = None) -> dict:
    """A JSON-able report of ``source`` (`.keras`, `.h5`, `.mann`, a Keras model or a CompactModel).

    Keys: ``source``, ``tasks`` (inputs, outputs, parameters, nonzeros, density, bytes
    compact vs dense float32), ``layers`` (the same per op, with the Keras ``layer`` and
    multitask ``slab`` it came from) and ``total``.

    Example:
        >>> report = inspect("model.mann")
        >>> report["tasks"][0]["density"]
        0.1
    """
    model = load_source(source, task_names)
    return report_of(model, str(source) if not isinstance(source, CompactModel) else "<CompactModel>")


def report_of(model: CompactModel, source: str) -> dict:
    tasks = []
    for task, stats in zip(model.tasks, model.task_stats()):
        tasks.append(
            {
                **stats,
                "inputs": [spec.to_json() for spec in task.inputs],
                "outputs": [spec.to_json() for spec in task.outputs],
                "nodes": [node.name for node in model.task_nodes(task.name)],
            }
        )
    layers = [
        {
            **row,
            **_origin(model.node(row["node"])),
            "density": row["nonzeros"] / row["params"] if row["params"] else None,
        }
        for row in model.node_stats()
    ]
    params = sum(r["params"] for r in layers)
    nonzeros = sum(r["nonzeros"] for r in layers)
    return {
        "source": source,
        "provenance": model.provenance,
        "tasks": tasks,
        "layers": layers,
        "total": {
            "params": params,
            "nonzeros": nonzeros,
            "density": nonzeros / params if params else None,
            "bytes": sum(r["bytes"] for r in layers),
            "dense_bytes": sum(r["dense_bytes"] for r in layers),
        },
    }


def _origin(node: Node) -> dict:
    """The Keras layer (and multitask slab) a node came from, as compaction recorded them.

    A bundle written before nodes recorded them counts each node as its own layer.
    """
    return {"layer": node.attrs.get("layer", node.name), "slab": node.attrs.get("slab")}


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _density(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_report(report: dict) -> str:
    """The report as the text tables `mann-edge inspect` prints."""
    lines = [f"{report['source']}", "", "Tasks"]
    lines.append(f"  {'task':<20} {'params':>10} {'nonzeros':>10} {'density':>8} {'compact':>10} {'dense':>10}")
    for t in report["tasks"]:
        lines.append(
            f"  {t['task']:<20} {t['params']:>10,} {t['nonzeros']:>10,} {_density(t['density']):>8} "
            f"{_size(t['bytes']):>10} {_size(t['dense_bytes']):>10}"
        )
        inputs = ", ".join(f"{s['name']}{_dims(s['shape'])}" for s in t["inputs"])
        outputs = ", ".join(f"{s['name']}{_dims(s['shape'])}" for s in t["outputs"])
        lines.append(f"    inputs: {inputs}   outputs: {outputs}")
    lines += ["", "Layers (ops of the compact model)"]
    lines.append(f"  {'op':<32} {'type':<15} {'params':>10} {'nonzeros':>10} {'density':>8} {'compact':>10}")
    for row in report["layers"]:
        if not row["params"]:
            continue
        lines.append(
            f"  {row['node']:<32} {row['op']:<15} {row['params']:>10,} {row['nonzeros']:>10,} "
            f"{_density(row['density']):>8} {_size(row['bytes']):>10}"
        )
    total = report["total"]
    lines += [
        "",
        f"Total: {total['params']:,} parameters, {total['nonzeros']:,} nonzeros ({_density(total['density'])}); "
        f"{_size(total['bytes'])} compact vs {_size(total['dense_bytes'])} dense float32",
    ]
    return "\n".join(lines)


def _dims(shape) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"
