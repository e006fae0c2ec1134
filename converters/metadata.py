"""The manifests exports embed in their metadata (``mann_edge_manifest``): the model's, or one task's.

A file holding every task (a ``.tflite``, a multifunction Core ML package) embeds the whole
model's manifest. A file holding one task (an ``.onnx`` file, a per-task ``.mlpackage``)
embeds only what that task needs: the manifest of ``model.select_tasks([task])``, whose
provenance records the export the file belongs to (`mann_edge.bundle.SELECTED_FROM`:
every task name in order and the sha256 of the whole manifest). The runtimes rebuild an
export's tasks from its files with that record (`mann_edge.bundle.export_task_order`):
each file contributes its task, files of different models are refused, and a missing
file is named. A file's metadata thus grows with its own task, not with the model.

Example:
    >>> whole = manifest_text(cm)
    >>> json.loads(task_manifest_text(cm, "digits", whole=whole))["tasks"][0]["name"]
    'digits'
"""

from __future__ import annotations

import hashlib
import json

from mann_edge.bundle import SELECTED_FROM, manifest_of
from mann_edge.graph.model import CompactModel

__all__ = ["manifest_text", "task_manifest_text"]


def manifest_text(model: CompactModel) -> str:
    """The whole model's manifest as JSON text.

    Example:
        >>> json.loads(manifest_text(cm))["tasks"][1]["name"]
        'cancer'
    """
    return json.dumps(manifest_of(model))


def task_manifest_text(model: CompactModel, task: str, *, whole: str) -> str:
    """The manifest (JSON text) of ``task`` alone, recording the export it belongs to; ``whole`` is `manifest_text`.

    Example:
        >>> manifest = json.loads(task_manifest_text(cm, "digits", whole=manifest_text(cm)))
        >>> manifest["provenance"]["selected_from"]["tasks"]
        ['digits', 'cancer']
    """
    record = {"tasks": model.task_names, "manifest_sha256": hashlib.sha256(whole.encode()).hexdigest()}
    return json.dumps(manifest_of(model.select_tasks([task]).with_provenance(**{SELECTED_FROM: record})))
