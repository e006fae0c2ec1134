"""Core ML export: one ML program per task (packages or functions), built by `mann_edge.converters.coreml_lowering`.

What stays sparse: every weight whose bitmask form is smaller than its dense form is
stored as ``constexpr_sparse_to_dense`` (a bitmask over the weight plus its nonzero
values, iOS16/macOS13 and later). ``sparse=False`` stores every weight as a dense const
(the baseline for size ratios).

What runs sparse: nothing. Core ML decompresses ``constexpr_*`` weights when it loads
the model, so each task computes dense, and only its own weights are loaded.

Choices, and why:
- Each task's MIL program comes from `mann_edge.converters.coreml_lowering` (one lowering
  per op and activation, tensors NHWC, batch free between 1 and ``max_batch``); this
  module converts, packages, describes and validates them.
- Targets below macOS15/iOS18 (default macOS13): a directory with one ``<task>.mlpackage``
  per task. macOS15/iOS18 and later: one ``.mlpackage`` with a function per task
  (``MultiFunctionDescriptor`` + ``save_multifunction``, shared weights deduplicated),
  the first task's function being the default.
- ``dtype="float16"``: weights are stored as float16 and the program computes in float16
  (compute precision FLOAT16); inputs and outputs stay float32 at the model's interface.
  ``"float32"``: float32 weights, compute precision FLOAT32.
- Joint compression (macOS15/iOS18 targets, where Core ML has the ops): ``"palettized2"``,
  ``"palettized4"``, ``"palettized6"``, ``"palettized8"`` store each sparse weight's
  nonzero values as N-bit indices into a palette (k-means, one palette per weight:
  ``constexpr_lut_to_sparse`` feeding ``constexpr_sparse_to_dense``); ``"int8_weights"``
  stores them as int8 with a scale per output channel (symmetric:
  ``constexpr_sparse_blockwise_shift_scale`` feeding ``constexpr_sparse_to_dense``). Both
  go through coremltools' own API (``coremltools.optimize.coreml.palettize_weights`` /
  ``linear_quantize_weights`` with ``joint_compression=True``) on the sparse program;
  weights of fewer than `COMPRESS_MIN_ELEMENTS` elements keep float32 values. The program
  computes in float32. Outputs differ from float32 by the palette's or int8's rounding:
  they are verified against a tolerance relative to each output's scale
  (`mann_edge.converters.validation.tolerances`); their accuracy is what ``--eval`` shows.
- Every package carries in its user-defined metadata the manifest of the tasks it holds
  (``mann_edge_manifest``: a per-task package only its task's, with the export's task list
  in its provenance, see `mann_edge.converters.metadata`; the multifunction package the
  whole model's), its tasks with their function and feature names (``mann_edge_tasks``)
  and the dtype (``mann_edge_dtype``); `mann_edge.runtime.coreml` rebuilds the tasks from them.

Core ML predicts only on macOS; elsewhere `validate` evaluates the saved package's ML
program in numpy (`mann_edge.converters.mil_eval`).

Example:
    >>> from mann_edge.converters import coreml
    >>> path = coreml.export(cm, "out/coreml")                          # one package per task
    >>> path = coreml.export(cm, "out/model.mlpackage", target="macOS15")  # one multifunction package
    >>> coreml.validate(cm, path).raise_for_errors()
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from mann_edge.converters.coreml_lowering import (
    ACTIVATION_LOWERINGS,
    DEFAULT_MAX_BATCH,
    DEFAULT_TARGET,
    LOWERINGS,
    MULTIFUNCTION_SPEC,
    OWNER,
    TaskProgram,
    build_program,
    check_lowerings,
    deployment_target,
    identifier,
)
from mann_edge.converters.metadata import manifest_text, task_manifest_text
from mann_edge.converters.options import check_bool, check_dtype, check_names
from mann_edge.converters.validation import DEFAULT_BATCHES, ValidationReport, compare, scaled_atol, tolerances
from mann_edge.errors import ConversionError
from mann_edge.files import atomic_output, file_stems
from mann_edge.formats import FORMATS, METADATA_DTYPE, METADATA_MANIFEST, METADATA_TASKS
from mann_edge.graph.model import CompactModel
from mann_edge.runtime.coreml import PACKAGE_SUFFIX, PackageTask, import_coremltools, read_layout

__all__ = [
    "sparse_layers",
    "LOWERINGS",
    "ACTIVATION_LOWERINGS",
    "FORMAT",
    "DEFAULT_TARGET",
    "check_options",
    "export",
    "validate",
    "artifact_name",
    "task_files",
    "is_multifunction_target",
    "runner",
    "COMPRESSED_DTYPES",
    "COMPRESS_MIN_ELEMENTS",
]

FORMAT = "coreml"
_OPTIONS = ("sparse", "target", "max_batch")
# dtype -> (coremltools' compression, its bits): joint sparse compression, iOS18/macOS15 and later.
COMPRESSED_DTYPES = {"palettized2": ("palettize", 2), "palettized4": ("palettize", 4),
                     "palettized6": ("palettize", 6), "palettized8": ("palettize", 8),
                     "int8_weights": ("quantize", 8)}
# Weights below this many elements keep float32 values: a palette or per-channel scales would outweigh the savings.
COMPRESS_MIN_ELEMENTS = 256


def check_options(*, dtype: str = "float32", **options) -> None:
    """ConversionError for a ``dtype`` or an `export` option the Core ML export would refuse; writes nothing.

    Options: ``sparse`` (a bool), ``target`` (a coremltools target, macOS13/iOS16 or later)
    and ``max_batch`` (a positive int). ``force`` is not an option: it says what to do with
    the output path. Checking the target imports coremltools, nothing more.

    Example:
        >>> check_options(dtype="float16", target="macOS12")
        Traceback (most recent call last):
        ConversionError: Core ML export takes a target with sparse weights (macOS13/iOS16 or later): [...]. Received: 'macOS12'
    """
    check_names(options, _OPTIONS, owner=OWNER)
    check_dtype(FORMAT, dtype, owner=OWNER)
    check_bool("sparse", options.get("sparse", True), owner=OWNER)
    target = options.get("target", DEFAULT_TARGET)
    deployment_target(target)
    if dtype in COMPRESSED_DTYPES and not is_multifunction_target(target):
        raise ConversionError(
            f"{OWNER} with dtype {dtype!r} (joint sparse compression) needs a macOS15/iOS18 target or later, where "
            f"Core ML has constexpr_lut_to_sparse and constexpr_sparse_blockwise_shift_scale "
            f"(--coreml-target macOS15, or target='iOS18'). Received: target={target!r}"
        )
    max_batch = options.get("max_batch", DEFAULT_MAX_BATCH)
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ConversionError(f"{OWNER} max_batch must be a positive int. Received: {max_batch!r}")


def is_multifunction_target(target: str) -> bool:
    """Whether ``target`` (macOS15/iOS18 or later) gets one multifunction package instead of a package per task.

    Example:
        >>> is_multifunction_target("iOS18")
        True
    """
    return int(deployment_target(target)) >= MULTIFUNCTION_SPEC


def artifact_name(*, target: str = DEFAULT_TARGET, **export_options) -> str:
    """The name an export with these `export` options gets inside an output directory (only ``target`` matters).

    Example:
        >>> artifact_name(target="macOS13"), artifact_name(target="macOS15")
        ('coreml', 'model.mlpackage')
    """
    return f"model{PACKAGE_SUFFIX}" if is_multifunction_target(target) else FORMATS[FORMAT].artifact


def task_files(path: "str | os.PathLike") -> dict[str, Path]:
    """task -> the package holding only that task (none for a multifunction package).

    Example:
        >>> task_files("out/coreml")["digits"].name
        'digits.mlpackage'
    """
    return {task: entry.package for task, entry in read_layout(path).entries.items() if entry.function is None}


def sparse_layers(path: "str | os.PathLike") -> None:
    """None: Core ML decides per compute unit whether sparse weights run sparse (not knowable from the file).

    Example:
        >>> sparse_layers("out/coreml") is None
        True
    """
    return None


# -- export --------------------------------------------------------------------------------------


def _convert(task_program: TaskProgram, *, target, dtype: str):
    """The MLModel of a task's MIL program (not loaded: Core ML may not exist here), progress bars silenced."""
    ct = import_coremltools()
    precision = ct.precision.FLOAT16 if dtype == "float16" else ct.precision.FLOAT32
    # The pass pipelines draw progress bars on stderr; keep them out of a command's output.
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return ct.convert(
                task_program.program,
                convert_to="mlprogram",
                inputs=task_program.input_types,
                minimum_deployment_target=target,
                compute_precision=precision,
                skip_model_load=True,
            )
    except (ValueError, TypeError, AssertionError, NotImplementedError, RuntimeError) as error:
        raise ConversionError(f"Core ML export: converting task {task_program.task!r} failed: {error}") from error


@contextlib.contextmanager
def _gc_frozen():
    """Keeps the objects alive now out of garbage collection while converting.

    ``ct.convert`` ends with a full ``gc.collect()``; in a process holding a Keras model
    that costs about 0.2 s per task, most of an export's time. Frozen objects are skipped
    by collections; they are handed back to the collector afterwards.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _describe(mlmodel, manifest: str, dtype: str, entries: list[PackageTask], summary: str) -> None:
    """Writes into a package's metadata what `mann_edge.runtime.coreml.read_layout` reads back."""
    mlmodel.short_description = summary
    mlmodel.user_defined_metadata[METADATA_MANIFEST] = manifest
    mlmodel.user_defined_metadata[METADATA_TASKS] = json.dumps([entry.to_json() for entry in entries])
    mlmodel.user_defined_metadata[METADATA_DTYPE] = dtype


def export(model: CompactModel, path: "str | os.PathLike", *, dtype: str = "float32", sparse: bool = True,
           force: bool = False, target: str = DEFAULT_TARGET, max_batch: int = DEFAULT_MAX_BATCH) -> Path:
    """Writes the Core ML export of ``model`` at ``path`` (atomically) and returns ``path``.

    Args:
        model: the compact model.
        path: for targets below macOS15/iOS18, a directory to hold one ``<task>.mlpackage`` per task;
            for macOS15/iOS18 and later, the multifunction ``.mlpackage`` itself.
        dtype: "float32" (float32 weights and compute) or "float16" (float16 weights and compute);
            "palettized2/4/6/8" or "int8_weights" (sparse weights' values palettized or int8,
            float32 compute; macOS15/iOS18 targets, see the module docstring).
        sparse: store zeros as ``constexpr_sparse_to_dense`` (False: dense consts, the baseline).
        force: overwrite an existing ``path``.
        target: a coremltools target name, "macOS13"/"iOS16" or later.
        max_batch: the largest batch the packages accept (Core ML ML programs need a bound).

    Raises:
        ConversionError: an op or activation without a lowering (named), a bad option, a failed conversion.
        OutputExistsError: ``path`` exists and ``force`` is False.

    Example:
        >>> export(cm, "out/coreml", dtype="float16")
        PosixPath('out/coreml')
    """
    check_options(dtype=dtype, sparse=sparse, target=target, max_batch=max_batch)
    path = Path(path)
    ct_target = deployment_target(target)
    multifunction = int(ct_target) >= MULTIFUNCTION_SPEC
    if multifunction and path.suffix != PACKAGE_SUFFIX:
        raise ConversionError(
            f"Core ML target {target} writes one multifunction package: its path must end in {PACKAGE_SUFFIX}. "
            f"Received: {path}"
        )
    if not multifunction and path.suffix == PACKAGE_SUFFIX:
        raise ConversionError(
            f"Core ML target {target} writes a directory of per-task packages: give a directory path, not a "
            f"{PACKAGE_SUFFIX} (or use target='macOS15' for one package). Received: {path}"
        )
    names = model.task_names
    check_lowerings(model, names)
    whole = manifest_text(model)  # the multifunction package's; a per-task package gets its task's

    with atomic_output(path, force=force, directory=True) as tmp, tempfile.TemporaryDirectory(
        prefix="mann_edge_coreml_"
    ) as staging, _gc_frozen():
        stems = file_stems(names)
        functions: set[str] = set()
        built = []
        float_dtype = "float32" if dtype in COMPRESSED_DTYPES else dtype  # compressed from the float32 program
        for name in names:
            task_program = build_program(model, name, dtype=float_dtype, sparse=sparse, target=target,
                                         max_batch=max_batch)
            mlmodel = _compress(_convert(task_program, target=ct_target, dtype=float_dtype), dtype, name)
            if multifunction:
                function = identifier(name, functions)
                entry = PackageTask(name, path, function, task_program.inputs, task_program.outputs)
                package = Path(staging) / f"{len(built)}{PACKAGE_SUFFIX}"
            else:
                package = tmp / f"{stems[name]}{PACKAGE_SUFFIX}"
                entry = PackageTask(name, path / package.name, None, task_program.inputs, task_program.outputs)
                _describe(mlmodel, task_manifest_text(model, name, whole=whole), dtype, [entry],
                          f"mann-edge task {name!r} ({dtype})")
            mlmodel.save(str(package))
            _stable_identifiers(package)
            built.append((entry, package))
        if multifunction:
            _save_multifunction(built, tmp, Path(staging), whole, dtype)
            _stable_identifiers(tmp)
    return path


def _compress(mlmodel, dtype: str, task: str):
    """``mlmodel`` with its sparse weights' values palettized or int8 (`COMPRESSED_DTYPES`), or as it is.

    ``joint_compression=True`` keeps the sparse encoding and compresses its nonzero values;
    a weight stored dense (its bitmask form was not smaller) is compressed alone.
    """
    if dtype not in COMPRESSED_DTYPES:
        return mlmodel
    ct = import_coremltools()
    optimize = ct.optimize.coreml
    kind, bits = COMPRESSED_DTYPES[dtype]
    if kind == "palettize":
        # One palette per weight. A palette per output channel lifts 2 bits on vision_text digits from 64 % to
        # 95 % (97 % in float32), but its palettes make it larger than 4 bits per weight on the paper-scale
        # model (2.16 against 2.07 MB), which keeps every sample task within a point: 4 bits is the better buy.
        op_config = optimize.OpPalettizerConfig(nbits=bits, mode="kmeans", granularity="per_tensor",
                                                weight_threshold=COMPRESS_MIN_ELEMENTS)
        compress = optimize.palettize_weights
    else:
        op_config = optimize.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                                     weight_threshold=COMPRESS_MIN_ELEMENTS)
        compress = optimize.linear_quantize_weights
    try:
        # progress bars to stderr; an output channel without nonzeros divides by a zero range (its scale is
        # unused: the mask has no position there), which numpy would report as a warning
        with contextlib.redirect_stderr(io.StringIO()), np.errstate(divide="ignore", invalid="ignore"):
            return compress(mlmodel, optimize.OptimizationConfig(global_config=op_config), joint_compression=True)
    except (ValueError, TypeError, AssertionError, NotImplementedError, RuntimeError) as error:
        raise ConversionError(f"Core ML export: compressing task {task!r} as {dtype} failed: {error}") from error


def _stable_identifiers(package: Path) -> None:
    """Replaces the random item identifiers coremltools writes into a package's Manifest.json by ones
    derived from each item's path, so the same model gives the same bytes (the identifiers only link
    the manifest's entries to each other)."""
    manifest_path = package / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    stable = {old: str(uuid.uuid5(uuid.NAMESPACE_URL, f"mann-edge:{item['path']}"))
              for old, item in manifest["itemInfoEntries"].items()}
    manifest["itemInfoEntries"] = {stable[old]: item for old, item in sorted(manifest["itemInfoEntries"].items(),
                                                                              key=lambda pair: pair[1]["path"])}
    manifest["rootModelIdentifier"] = stable.get(manifest.get("rootModelIdentifier"), manifest.get("rootModelIdentifier"))
    manifest_path.write_text(json.dumps(manifest, indent=4, sort_keys=True))


def _save_multifunction(built: list[tuple[PackageTask, Path]], tmp: Path, staging: Path, manifest: str,
                        dtype: str) -> None:
    """Combines the per-task packages into one with a function per task (the first is the default)."""
    ct = import_coremltools()
    descriptor = ct.utils.MultiFunctionDescriptor()
    for entry, package in built:
        descriptor.add_function(str(package), src_function_name="main", target_function_name=entry.function)
    descriptor.default_function_name = built[0][0].function
    combined = staging / f"combined{PACKAGE_SUFFIX}"
    with contextlib.redirect_stderr(io.StringIO()):
        ct.utils.save_multifunction(descriptor, str(combined))
    mlmodel = ct.models.MLModel(str(combined), skip_model_load=True)
    _describe(mlmodel, manifest, dtype, [entry for entry, _ in built],
              f"mann-edge tasks {[entry.task for entry, _ in built]} ({dtype}), one function each")
    described = staging / f"model{PACKAGE_SUFFIX}"
    mlmodel.save(str(described))
    shutil.copytree(described, tmp, dirs_exist_ok=True)


# -- validation ----------------------------------------------------------------------------------


def runner(path: "str | os.PathLike") -> Callable[[str, Mapping[str, np.ndarray]], list[np.ndarray]]:
    """A function running one task of the export at ``path`` on inputs given by name.

    On macOS it predicts with Core ML (`CoreMLSession`). Elsewhere Core ML cannot run, so it
    reads each task's saved ML program back from its package, decompresses the weights and
    evaluates the ops in numpy (`mann_edge.converters.mil_eval.MILEvaluator`), float16
    programs rounding to float16 after every op. Each task's program is opened on first use.

    Example:
        >>> run = runner("out/coreml")
        >>> probabilities = run("digits", {"digits_in": x})[0]
    """
    if sys.platform == "darwin":
        from mann_edge.runtime.coreml import CoreMLSession

        return CoreMLSession(path).run

    from mann_edge.converters.mil_eval import MILEvaluator

    layout = read_layout(path)
    evaluators: dict[str, MILEvaluator] = {}

    def evaluate(task: str, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if task not in layout.entries:
            raise ConversionError(f"Core ML export {path} has no task {task!r}; it has {sorted(layout.entries)}")
        entry = layout.entries[task]
        if task not in evaluators:
            evaluators[task] = MILEvaluator(entry.package, function=entry.function)
        return entry.outputs_of(evaluators[task].predict(entry.feed(inputs)))

    return evaluate


def validate(model: CompactModel, path: "str | os.PathLike", *, atol: float | None = None, rtol: float | None = None,
             tasks: Sequence[str] | None = None, batches: Sequence[int] = DEFAULT_BATCHES,
             inputs: "Mapping[str, Mapping[str, np.ndarray]] | None" = None) -> ValidationReport:
    """Runs the export at ``path`` on sample inputs (batch 1 and 8) and compares it with the compact model.

    Every task of ``model`` (or ``tasks``) is checked: one the export lacks fails the report.

    The export runs through `runner`: Core ML on macOS, the numpy evaluation of the saved
    ML programs elsewhere. Default tolerances follow the dtype recorded in the packages.
    ``inputs``: task -> input arrays to check on instead of random ones (representative
    data for a palettized or int8 export).

    Example:
        >>> validate(cm, "out/coreml").raise_for_errors()
    """
    layout = read_layout(path)
    default_atol, default_rtol = tolerances(layout.dtype)
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    return compare(model, runner(path), format=FORMAT, artifact=str(path), atol=atol, rtol=rtol, tasks=tasks,
                   batches=batches, scaled_atol=scaled_atol(layout.dtype), inputs=inputs)
