"""`mann-edge inspect`: what a model holds, per task and per layer, and what it costs dense vs compact."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from mann_edge.errors import CompactionError
from mann_edge.graph.model import CompactModel, Node
from mann_edge.sources import load_keras_source, load_source

__all__ = ["inspect", "inspect_source", "format_report", "keras_report", "format_keras_report"]


def inspect(source, task_names: Sequence[str] | None = None) -> dict:
    """A JSON-able report of ``source`` (`.keras`, `.h5`, `.mann`, a Keras model or a CompactModel).

    Keys: ``source``, ``tasks`` (inputs, outputs, parameters, nonzeros, density, bytes
    compact vs dense float32), ``layers`` (the same per op, with the Keras ``layer`` and
    multitask ``slab`` it came from) and ``total``. A `.keras`/`.h5` model that cannot be
    compacted gets `keras_report` instead (``compactable`` False, every ``problems`` line).

    Example:
        >>> report = inspect("model.mann")
        >>> report["tasks"][0]["density"]
        0.1
    """
    return inspect_source(source, task_names)[1]


def inspect_source(source, task_names: Sequence[str] | None = None) -> tuple[CompactModel | None, dict]:
    """(the compact model, its report); for a `.keras`/`.h5` that cannot be compacted, (None, `keras_report`).

    Example:
        >>> model, report = inspect_source("lstm.keras")
        >>> model is None, report["compactable"]
        (True, False)
    """
    name = str(source) if not isinstance(source, CompactModel) else "<CompactModel>"
    try:
        model = load_source(source, task_names)
    except CompactionError:
        if not isinstance(source, (str, os.PathLike)) or Path(source).suffix.lower() not in (".keras", ".h5"):
            raise
        from mann_edge.compaction import check_compactable

        keras_model = load_keras_source(source)
        problems = check_compactable(keras_model)
        if not problems:  # refused for another reason (NaN weights, overlapping masks with strict): say that
            raise
        return None, keras_report(keras_model, name, problems)
    return model, report_of(model, name)


def keras_report(model, source: str, problems: Sequence[str]) -> dict:
    """A report of a Keras model that cannot be compacted: its layers, their weights and the problems.

    What `mann-edge inspect` shows for such a model (everything but the compact and export
    figures), so the user sees every layer to change before training or converting.

    Example:
        >>> keras_report(model, "lstm.keras", check_compactable(model))["problems"][0]
        "layer 'seq' (LSTM): mann-edge cannot compact this layer type; closest supported: ..."
    """
    import numpy as np

    layers = []
    for layer in model.layers:
        values = [np.asarray(w) for w in layer.get_weights()]
        params = int(sum(v.size for v in values))
        layers.append({"layer": layer.name, "class": type(layer).__name__, "params": params,
                       "nonzeros": int(sum(np.count_nonzero(v) for v in values)), "dense_bytes": 4 * params})
    params, nonzeros = sum(r["params"] for r in layers), sum(r["nonzeros"] for r in layers)
    return {
        "source": source,
        "compactable": False,
        "problems": list(problems),
        "tasks": [{"task": name} for name in model.output_names],
        "layers": layers,
        "total": {"params": params, "nonzeros": nonzeros, "density": nonzeros / params if params else None,
                  "bytes": None, "dense_bytes": 4 * params},
    }


def format_keras_report(report: dict) -> str:
    """`keras_report` as the text `mann-edge inspect` prints."""
    lines = [report["source"], "", f"Cannot be compacted or exported ({len(report['problems'])} layer(s) to change):"]
    lines += [f"  - {problem}" for problem in report["problems"]]
    lines += ["", f"Tasks (outputs): {', '.join(t['task'] for t in report['tasks'])}", "", "Layers"]
    lines.append(f"  {'layer':<32} {'class':<24} {'params':>10} {'nonzeros':>10}")
    for row in report["layers"]:
        lines.append(f"  {row['layer']:<32} {row['class']:<24} {row['params']:>10,} {row['nonzeros']:>10,}")
    total = report["total"]
    lines += ["", f"Total: {total['params']:,} parameters, {total['nonzeros']:,} nonzeros "
                  f"({_density(total['density'])}); {_size(total['dense_bytes'])} dense float32"]
    return "\n".join(lines)


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
