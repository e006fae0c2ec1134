"""mann-edge: ship sparse multitask neural networks (MANN, RSN2) to the edge.

Importing `mann_edge` is cheap: TensorFlow and Keras load only when a name
that needs them is first used, so `mann_edge.runtime` stays light on a device.

Example:
    >>> import mann_edge
    >>> model = mann_edge.load_legacy("mann_mlp.h5")          # or any Keras 3 MANN
    >>> cm = mann_edge.compact(model, task_names=["digits", "cancer"])
    >>> cm.save("model.mann")
    >>> result = mann_edge.convert("model.mann", "out/", formats=["tflite", "onnx"])
    >>> sess = mann_edge.runtime.load(result.artifacts["onnx"])
    >>> probabilities = sess.run("digits", x)
"""

from __future__ import annotations

import importlib

from mann_edge._version import __version__

__all__ = [
    "__version__",
    "CompactModel",
    "compact",
    "load_compact",
    "load_legacy",
    "convert",
    "inspect",
    "layers",
    "rsn2",
    "runtime",
    "converters",
    "errors",
    "api",
    "formats",
    "plotting",
]

# name -> (module, attribute or None for the module itself)
_LAZY = {
    "CompactModel": ("mann_edge.graph", "CompactModel"),
    "compact": ("mann_edge.compaction", "compact"),
    "load_compact": ("mann_edge.bundle", "load_compact"),
    "load_legacy": ("mann_edge.legacy", "load_legacy"),
    "convert": ("mann_edge.api", "convert"),
    "inspect": ("mann_edge.inspection", "inspect"),
    "layers": ("mann_edge.layers", None),
    "rsn2": ("mann_edge.rsn2", None),
    "runtime": ("mann_edge.runtime", None),
    "converters": ("mann_edge.converters", None),
    "errors": ("mann_edge.errors", None),
    "api": ("mann_edge.api", None),
    "formats": ("mann_edge.formats", None),
    "plotting": ("mann_edge.plotting", None),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'mann_edge' has no attribute '{name}'")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
