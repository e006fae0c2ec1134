"""Checking an export against the compact model it came from.

Every format's ``validate`` runs the artifact on the same sample inputs as the
compact model's numpy reference and hands both to `compare`, which checks
output names, shapes and values per task and output, collects every failure,
and returns a report with the figures (raising ValidationError with them when
asked).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from mann_edge.errors import InputError, ValidationError
from mann_edge.graph import plan
from mann_edge.graph.model import CompactModel, Task

__all__ = [
    "DEFAULT_BATCHES",
    "OutputCheck",
    "ValidationReport",
    "sample_inputs",
    "compare",
    "tolerances",
    "scaled_atol",
    "evaluate",
    "METRICS",
    "INT8_DTYPES",
    "PALETTE_ATOL",
    "INT8_ATOL",
    "FULL_INT8_ATOL",
    "EVAL_BATCH",
]


# Batch sizes every export is checked at: one example, and several (batched kernels, broadcasting).
DEFAULT_BATCHES = (1, 8)


def tolerances(dtype: str) -> tuple[float, float]:
    """Default (atol, rtol) for weights stored as ``dtype``.

    int8 (full-integer, or dynamic-range 'int8_dynamic': inputs quantized per batch row at
    run time) errs by a share of the size of the values, not per element: its atol is a
    fraction of each output's scale (``scaled_atol``), INT8_ATOL of it (see below).
    """
    if dtype == "int8":
        return (FULL_INT8_ATOL, 0.0)
    if dtype in INT8_DTYPES:
        return (INT8_ATOL, 0.0)
    if dtype in PALETTE_ATOL:
        return (PALETTE_ATOL[dtype], 0.0)
    return (1e-5, 1e-4) if dtype == "float32" else (1e-2, 1e-2)


# int8 tolerance, as a fraction of an output's scale (its largest |reference| value).
# Rounding 8-bit weights and inputs costs about 1 % of a layer's output scale per layer, and
# these errors add up through a network; 5 % keeps the deeper models (7 layers) inside
# while a broken kernel (a misread block, NaN, a wrong scale) errs by far more.
INT8_ATOL = 0.05
# Full-integer int8 also rounds every activation to 256 levels of its calibrated range: twice that.
FULL_INT8_ATOL = 0.1


def scaled_atol(dtype: str) -> bool:
    """Whether ``atol`` for ``dtype`` is a fraction of each output's scale (int8, palettized) rather than absolute."""
    return dtype in INT8_DTYPES or dtype in PALETTE_ATOL


# The dtypes whose values are 8-bit integers (tolerances relative to each output's scale).
INT8_DTYPES = ("int8", "int8_dynamic", "int8_weights")
# Palettized weights (Core ML), as a fraction of each output's scale: a palette of 2**N values per weight
# errs by about half a palette step per weight; this catches a misdecoded palette (values off by whole
# steps, or misplaced) while 2 bits, four values per weight, is expected to be coarse. Accuracy on
# labelled data (`convert(evaluation=...)`) is the measure of what a palette costs.
PALETTE_ATOL = {"palettized8": 0.05, "palettized6": 0.1, "palettized4": 0.25, "palettized2": 1.0}


@dataclass
class OutputCheck:
    """One output of one task at one batch size: how far the artifact is from the reference."""

    task: str
    output: str
    batch: int
    max_abs_error: float
    max_rel_error: float
    ok: bool
    problem: str = ""


@dataclass
class ValidationReport:
    """All checks of one artifact; ``ok`` when every output of every task is within tolerance."""

    format: str
    artifact: str
    atol: float
    rtol: float
    checks: list[OutputCheck] = field(default_factory=list)
    atol_scaled: bool = False  # atol is a fraction of each output's scale (max |reference|)
    random_inputs: bool = True  # some task was checked on `sample_inputs`, not on given data

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(check.ok for check in self.checks)

    @property
    def max_abs_error(self) -> float:
        return max((c.max_abs_error for c in self.checks), default=float("nan"))

    def failures(self) -> list[OutputCheck]:
        return [check for check in self.checks if not check.ok]

    def raise_for_errors(self) -> "ValidationReport":
        """Raises ValidationError listing every failing output with its figures; returns self otherwise."""
        bad = self.failures()
        if bad:
            details = "; ".join(
                f"task {c.task!r} output '{c.output}' batch {c.batch}: "
                + (c.problem or f"max abs error {c.max_abs_error:.3g} (atol {self.atol:g}"
                   f"{' x output scale' if self.atol_scaled else ''}, rtol {self.rtol:g})")
                for c in bad
            )
            hint = ("; it was checked on random inputs, and a quantized export matches only in the range it was "
                    "quantized for: check it on representative inputs (--calibration)"
                    if self.atol_scaled and self.random_inputs else "")
            raise ValidationError(f"{self.format} export {self.artifact} does not match the compact model: "
                                  f"{details}{hint}")
        if not self.checks:
            raise ValidationError(f"{self.format} export {self.artifact}: nothing was checked")
        return self


def _vocabulary(model: CompactModel, input_name: str) -> int | None:
    """Rows of the smallest embedding table that reads ``input_name`` (so sample ids stay valid)."""
    sizes = [model.weights[node.weights["table"]].shape[0] for node in model.nodes
             if node.op == "embedding" and node.inputs[0] == input_name]
    return min(sizes) if sizes else None


def sample_inputs(model: CompactModel, task: str | Task, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic inputs for a task: standard normal floats, valid ids for embedding inputs."""
    task = model.task(task) if isinstance(task, str) else task
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in task.inputs:
        shape = tuple(batch if d is None else d for d in spec.shape)
        size = 8 * math.prod(shape)  # drawn as float64
        if size > plan.MAX_TENSOR_BYTES:  # a source declaring huge inputs cannot make verification allocate them
            raise InputError(f"Task {task.name!r} input '{spec.name}' of shape {list(shape)} would take "
                             f"{plan.describe_bytes(size)} as sample inputs, more than the "
                             f"{plan.describe_bytes(plan.MAX_TENSOR_BYTES)} a run may allocate")
        vocabulary = _vocabulary(model, spec.name)
        if vocabulary is not None or spec.dtype.startswith("int"):
            arrays[spec.name] = rng.integers(0, vocabulary or 2, shape).astype(spec.dtype)
        else:
            arrays[spec.name] = rng.normal(0.0, 1.0, shape).astype(spec.dtype)
    return arrays


def compare(
    model: CompactModel,
    run: Callable[[str, dict[str, np.ndarray]], Sequence[np.ndarray]],
    *,
    format: str,
    artifact: str,
    atol: float,
    rtol: float,
    tasks: Sequence[str] | None = None,
    batches: Sequence[int] = DEFAULT_BATCHES,
    seed: int = 0,
    scaled_atol: bool = False,
    inputs: "Mapping[str, Mapping[str, np.ndarray]] | None" = None,
) -> ValidationReport:
    """Runs every task (or ``tasks``) through ``run`` and the reference; returns the report (does not raise).

    ``scaled_atol``: ``atol`` is a fraction of each output's scale (its largest |reference|
    value at that batch) instead of an absolute error (int8 exports). ``inputs``: task ->
    its input arrays, whose first rows make each batch instead of `sample_inputs` (data in
    the range a full-integer export was calibrated for); tasks it lacks get sample inputs.
    """
    report = ValidationReport(format, str(artifact), atol, rtol, atol_scaled=scaled_atol,
                              random_inputs=any(name not in (inputs or {}) for name in tasks or model.task_names))
    for name in tasks or model.task_names:
        task = model.task(name)
        for batch in batches:
            given = (inputs or {}).get(name)
            batch_inputs = {key: array[:batch] for key, array in given.items()} if given else \
                sample_inputs(model, task, batch, seed)
            expected = model.run(name, batch_inputs)
            try:
                actual = list(run(name, batch_inputs))
            except Exception as error:  # the artifact failing to run is a finding, reported with the rest
                report.checks.append(OutputCheck(name, "*", batch, float("inf"), float("inf"), False, f"failed to run: {error}"))
                continue
            if len(actual) != len(expected):
                report.checks.append(OutputCheck(name, "*", batch, float("inf"), float("inf"), False,
                                                 f"returned {len(actual)} outputs, expected {len(expected)}"))
                continue
            for spec, want, got in zip(task.outputs, expected, actual):
                got = np.asarray(got)
                if got.shape != want.shape:
                    report.checks.append(OutputCheck(name, spec.name, batch, float("inf"), float("inf"), False,
                                                     f"shape {got.shape}, expected {want.shape}"))
                    continue
                ok, problem, abs_error, rel_error = _within(want, got, atol * _scale(want, scaled_atol), rtol)
                report.checks.append(OutputCheck(name, spec.name, batch, abs_error, rel_error, ok, problem))
    return report


def _scale(want: np.ndarray, scaled: bool) -> float:
    return float(np.max(np.abs(want[np.isfinite(want)]), initial=0.0)) if scaled else 1.0


def _within(want: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> tuple[bool, str, float, float]:
    """(ok, problem, max abs error, max rel error) of ``got`` against ``want``.

    Non-finite values match where the reference has the same value (NaN for NaN, inf of the
    same sign); the errors are measured over the positions where both are finite.
    """
    want64, got64 = want.astype(np.float64), got.astype(np.float64)
    same_nonfinite = ~np.isfinite(want64) & ((want64 == got64) | (np.isnan(want64) & np.isnan(got64)))
    finite = np.isfinite(want64) & np.isfinite(got64)
    mismatched = ~(finite | same_nonfinite)
    diff = np.abs(got64[finite] - want64[finite])
    abs_error = float(diff.max(initial=0.0))
    rel_error = float((diff / (np.abs(want64[finite]) + 1e-12)).max(initial=0.0))
    if mismatched.any():
        return False, f"{int(mismatched.sum())} non-finite value(s) where the reference differs", abs_error, rel_error
    ok = bool(np.all(diff <= atol + rtol * np.abs(want64[finite])))
    return ok, "", abs_error, rel_error


# Examples run at once when evaluating (bounded memory on large evaluation sets).
EVAL_BATCH = 256


def _accuracy(outputs: np.ndarray, labels: np.ndarray, task: str) -> float:
    """Share of examples whose predicted class is the label: argmax over the last axis, or ``> 0.5`` for one unit.

    Labels are class ids ``(N,)`` or one-hot rows ``(N, classes)``.
    """
    width = outputs.shape[-1]
    if labels.ndim == 2 and labels.shape[1] == width and width > 1:
        labels = labels.argmax(axis=1)
    if labels.ndim != 1 or len(labels) != len(outputs):
        raise InputError(f"labels of task {task!r} must be {len(outputs)} class ids (or one-hot rows of {width}) for "
                         f"its {len(outputs)} examples. Received shape {list(labels.shape)}")
    predicted = (outputs[..., 0] > 0.5).astype(int) if width == 1 else outputs.argmax(axis=-1)
    return float(np.mean(predicted.reshape(-1) == labels))


def _mean_absolute_error(outputs: np.ndarray, labels: np.ndarray, task: str) -> float:
    """Mean absolute difference between the outputs and targets of the outputs' shape (regression tasks)."""
    if labels.shape != outputs.shape:
        raise InputError(f"targets of task {task!r} must have its output's shape {list(outputs.shape)} for the mean "
                         f"absolute error. Received shape {list(labels.shape)}")
    return float(np.mean(np.abs(outputs.astype(np.float64) - labels.astype(np.float64))))


# metric name -> (function of (outputs, labels, task), higher is better)
METRICS: dict[str, tuple[Callable[[np.ndarray, np.ndarray, str], float], bool]] = {
    "accuracy": (_accuracy, True),
    "mae": (_mean_absolute_error, False),
}


def evaluate(
    run: Callable[[str, dict[str, np.ndarray]], Sequence[np.ndarray]],
    model: CompactModel,
    task: str,
    inputs: Mapping[str, np.ndarray],
    labels: np.ndarray,
    *,
    metric: str = "accuracy",
    output: int = 0,
) -> float:
    """``metric`` (a name in `METRICS`) of output ``output`` of ``task``, run through ``run`` on labelled data.

    'accuracy': labels are class ids ``(N,)`` or one-hot rows; the prediction is the argmax
    over the last axis, or ``> 0.5`` for a single-unit output. 'mae': targets of the
    output's shape, their mean absolute difference.

    Example:
        >>> evaluate(model.run, model, "digits", {"digits_image": x}, y)
        0.98
    """
    if metric not in METRICS:
        raise InputError(f"metric must be one of {sorted(METRICS)}. Received: {metric!r}")
    count = len(next(iter(inputs.values())))
    outputs = np.concatenate([
        np.asarray(run(task, {name: array[start : start + EVAL_BATCH] for name, array in inputs.items()})[output],
                   dtype=np.float64)
        for start in range(0, count, EVAL_BATCH)
    ])
    return METRICS[metric][0](outputs, np.asarray(labels), task)
