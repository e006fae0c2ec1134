"""The Core ML backend: runs a Core ML export on macOS, one task (one package or function) at a time.

An export is either a directory of per-task ``.mlpackage`` (target macOS13/iOS16 and
later) or one multifunction ``.mlpackage`` with a function per task (macOS15/iOS18 and
later). Every package says in its user-defined metadata which tasks it holds, under
which function and feature names, and carries the manifest of those tasks (a per-task
package only its task's, naming the export's tasks in its provenance; a multifunction
package the whole model's), so the tasks are rebuilt from the packages alone, each
contributing its own, in the model's order.

Core ML predicts only on macOS. Elsewhere `CoreMLSession` refuses with a MannEdgeError;
`mann_edge.converters.coreml.validate` checks a package there by evaluating its saved
ML program in numpy.

coremltools is imported only when a session opens (never at module import), with
TensorFlow and PyTorch kept out: coremltools imports them when installed only to offer
their converters, which the runtime does not use.

Example:
    >>> sess = CoreMLSession("out/coreml")          # or "out/model.mlpackage"
    >>> probabilities = sess.run("digits", x)[0]
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from mann_edge import safe_json
from mann_edge.bundle import export_of, export_task_order, tasks_from_manifest
from mann_edge.errors import BundleError, MannEdgeError
from mann_edge.formats import METADATA_DTYPE, METADATA_MANIFEST, METADATA_TASKS
from mann_edge.graph.model import Task
from mann_edge.runtime.session import Session

__all__ = [
    "CoreMLSession",
    "PackageLayout",
    "PackageTask",
    "FeatureIO",
    "read_layout",
    "import_coremltools",
]

PACKAGE_SUFFIX = ".mlpackage"

# What coremltools would import at its own import only to offer converters we never use.
_HEAVY_FRAMEWORKS = ("tensorflow", "torch")


def import_coremltools():
    """Imports coremltools without letting it pull in TensorFlow or PyTorch, and without its load-time noise.

    A framework already imported by the caller stays visible to coremltools. The others
    are hidden only while coremltools imports, so the caller can still import them later
    (coremltools' own TensorFlow/PyTorch converters then stay off in this process).

    Example:
        >>> ct = import_coremltools()
        >>> ct.target.iOS16
    """
    if "coremltools" in sys.modules:
        return sys.modules["coremltools"]
    hidden = [name for name in _HEAVY_FRAMEWORKS if name not in sys.modules]
    logger = logging.getLogger("coremltools")
    level = logger.level
    # Its import logs a warning per missing native proxy (all of them off macOS) and per
    # unsupported version of optional packages; none of it concerns what we use.
    logger.setLevel(logging.ERROR)
    for name in hidden:
        sys.modules[name] = None  # makes `import name` raise ImportError
    try:
        import coremltools
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
        logger.setLevel(level)
    return coremltools


@dataclass(frozen=True)
class FeatureIO:
    """One task input or output: its name in the task, its Core ML feature name and Core ML dtype."""

    name: str
    feature: str
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "feature": self.feature, "dtype": self.dtype}


@dataclass(frozen=True)
class PackageTask:
    """Where one task lives: its package, its function (None for a single-function package) and features."""

    task: str
    package: Path
    function: str | None
    inputs: tuple[FeatureIO, ...]
    outputs: tuple[FeatureIO, ...]

    def feed(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The Core ML feature dict for task inputs given by name (cast to the features' dtypes)."""
        return {io.feature: np.ascontiguousarray(inputs[io.name], dtype=io.dtype) for io in self.inputs}

    def outputs_of(self, result: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The task's outputs, in order, from a Core ML result dict."""
        missing = [io.feature for io in self.outputs if io.feature not in result]
        if missing:
            raise MannEdgeError(
                f"Core ML package {self.package} (task {self.task!r}) returned features {sorted(result)}; "
                f"expected {[io.feature for io in self.outputs]}"
            )
        return [np.asarray(result[io.feature], dtype=io.dtype) for io in self.outputs]

    def to_json(self) -> dict:
        return {
            "task": self.task,
            "function": self.function,
            "inputs": [io.to_json() for io in self.inputs],
            "outputs": [io.to_json() for io in self.outputs],
        }


@dataclass(frozen=True)
class PackageLayout:
    """A Core ML export read from its metadata: the weights' dtype, each task's place and spec, in the model's order."""

    path: Path
    dtype: str
    entries: Mapping[str, PackageTask]
    specs: tuple[Task, ...]

    def tasks(self) -> list[Task]:
        """The exported tasks (specs rebuilt from the packages' manifests), in the model's task order."""
        return list(self.specs)


def package_paths(path: "str | os.PathLike") -> list[Path]:
    """The `.mlpackage` of an export: ``path`` itself, or those inside the directory ``path``."""
    path = Path(path)
    if path.suffix == PACKAGE_SUFFIX:
        return [path]
    packages = sorted(path.glob(f"*{PACKAGE_SUFFIX}")) if path.is_dir() else []
    if not packages:
        raise MannEdgeError(f"{path} is not a Core ML export: expected a {PACKAGE_SUFFIX} or a directory of them")
    return packages


def read_layout(path: "str | os.PathLike") -> PackageLayout:
    """Reads which task is in which package and function, and each task's spec, from the packages' metadata.

    Needs coremltools. Each package contributes the tasks it holds, with their specs from its
    own manifest; the manifests' provenance says which export the packages belong to.

    Raises:
        BundleError: a package without mann-edge metadata, packages from different exports,
            or a directory of per-task packages missing one.

    Example:
        >>> layout = read_layout("out/coreml")
        >>> layout.entries["digits"].package.name
        'digits.mlpackage'
    """
    path = Path(path)
    ct = import_coremltools()
    dtype, entries, specs, exports = None, {}, {}, {}
    for package in package_paths(path):
        metadata = _metadata(ct, package)
        manifest = _json(metadata[METADATA_MANIFEST], package, METADATA_MANIFEST)
        tasks = {task.name: task for task in tasks_from_manifest(manifest, package)}
        dtype = metadata[METADATA_DTYPE]
        for entry in _json(metadata[METADATA_TASKS], package, METADATA_TASKS):
            task = _package_task(entry, package)
            if task.task in entries:
                raise BundleError(f"Core ML export {path} holds task {task.task!r} twice")
            if task.task not in tasks:
                raise BundleError(f"Core ML package {package} holds task {task.task!r}, which its manifest does not "
                                  f"have (tasks: {list(tasks)})")
            entries[task.task], specs[task.task] = task, tasks[task.task]
        exports[package] = export_of(manifest, metadata[METADATA_MANIFEST], package, BundleError)
    # A directory must hold every task of its export; a package opened alone holds what it holds.
    order = export_task_order(path, {name: entry.package for name, entry in entries.items()}, exports,
                              parts="the packages", whole=path.suffix != PACKAGE_SUFFIX, error=BundleError)
    return PackageLayout(path, dtype, {name: entries[name] for name in order}, tuple(specs[name] for name in order))


def _metadata(ct, package: Path) -> Mapping[str, str]:
    """The user-defined metadata of a package mann-edge wrote, or a BundleError naming the package."""
    try:
        model = ct.models.MLModel(str(package), skip_model_load=True)
    except Exception as error:  # coremltools raises protobuf, OS and its own errors alike
        raise BundleError(f"Core ML package {package} cannot be read ({error}); truncated or corrupt?") from None
    if model.get_spec().WhichOneof("Type") is None:  # an empty protobuf parses as an empty model
        raise BundleError(f"Core ML package {package} holds no model; its model.mlmodel is empty or truncated")
    metadata = model.user_defined_metadata
    for key in (METADATA_MANIFEST, METADATA_TASKS, METADATA_DTYPE):
        if key not in metadata:
            raise BundleError(f"Core ML package {package} has no '{key}' metadata; it was not written by mann-edge")
    return metadata


def _json(text: str, package: Path, key: str):
    try:
        return safe_json.loads(text, f"metadata '{key}'")
    except ValueError as error:
        raise BundleError(f"Core ML package {package}: {error}") from None


def _package_task(entry, package: Path) -> PackageTask:
    try:
        return PackageTask(
            task=entry["task"],
            package=package,
            function=entry["function"],
            inputs=tuple(FeatureIO(io["name"], io["feature"], io["dtype"]) for io in entry["inputs"]),
            outputs=tuple(FeatureIO(io["name"], io["feature"], io["dtype"]) for io in entry["outputs"]),
        )
    except (KeyError, TypeError) as error:
        raise BundleError(
            f"Core ML package {package}: metadata '{METADATA_TASKS}' entry is malformed ({error!r})"
        ) from None


class CoreMLSession(Session):
    """Runs a Core ML export on macOS; each task's model is loaded on its first run.

    Args:
        path: a directory of per-task `.mlpackage`, or one multifunction `.mlpackage`.
        compute_units: a `coremltools.ComputeUnit` name: "ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE".

    Raises:
        MannEdgeError: off macOS (Core ML runs only there), or a package mann-edge did not write.

    Example:
        >>> sess = CoreMLSession("out/model.mlpackage", compute_units="CPU_ONLY")
        >>> sess.run("digits", x)[0].shape
        (1, 10)
    """

    backend = "coreml"

    def __init__(self, path: "str | os.PathLike", threads: int | None = None, *, compute_units: str = "ALL"):
        # ``threads``: Core ML schedules its own work; accepted so every backend opens the same way.
        if sys.platform != "darwin":
            raise MannEdgeError(
                f"Core ML runs only on macOS; this is {sys.platform}, so {path} cannot be run here. "
                "To check a Core ML export on this machine, use mann_edge.converters.coreml.validate(model, path), "
                "which evaluates the saved package's ML program in numpy."
            )
        self.layout = read_layout(path)
        super().__init__(path, self.layout.tasks())
        ct = import_coremltools()
        if compute_units not in ct.ComputeUnit.__members__:
            raise MannEdgeError(
                f"compute_units must be one of {list(ct.ComputeUnit.__members__)}. Received: {compute_units!r}"
            )
        self.compute_units = ct.ComputeUnit[compute_units]
        self._models: dict[str, object] = {}

    def _model(self, entry: PackageTask):
        model = self._models.get(entry.task)
        if model is None:
            ct = import_coremltools()
            options = {"function_name": entry.function} if entry.function else {}
            model = ct.models.MLModel(str(entry.package), compute_units=self.compute_units, **options)
            self._models[entry.task] = model
        return model

    def _run(self, task: Task, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        entry = self.layout.entries[task.name]
        return entry.outputs_of(self._model(entry).predict(entry.feed(inputs)))
