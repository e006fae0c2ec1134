"""RSN2 ("Reduction of Sub-Network Neuroplasticity"): masking, per-task training and iterative pruning.

- `mask_model` has the original packages' meaning and signature: per masked
  layer, per task slab, prune the lowest ``percentile`` % by |weight| or
  |gradient|; with ``exclusive=True`` later tasks never get a position an earlier
  task holds. Selection is by rank, not by a ``>=`` threshold, so exact zeros and
  ties cannot let extra (or already used) positions through.
- `train_task` trains one task so that no other (protected) task's weights or
  outputs change by a single bit: layers it does not own are frozen, and a
  constraint puts every frozen or pruned position back after each optimizer step.
- `prune_task` prunes one task in steps; after each step the task trains until its
  validation metric recovers (or ``patience`` epochs pass), and only then is the step
  judged, in samples for accuracy (`Judge`). A failed step is rolled back and retried
  smaller (10 -> 5 -> 2.5 points) before pruning stops.
- `fit_rsn2` does all of it for every task in one call, after checking that the model can
  be compacted (`check_model`), with progress and a per-task summary (`RSN2Report`).

Training runs on Keras's TensorFlow backend, also under a `tf.distribute` strategy scope.
Seeded, with TensorFlow's op determinism on (`enable_determinism`), a run repeats bit for
bit on the same machine and library versions; `mann_edge.determinism` says what else to fix
(threads, oneDNN's instruction set) for the same bits on another machine.

Example:
    >>> report = fit_rsn2(model, {"digits": (x0, y0), "cancer": (x1, y1)}, sparsity=90)
    >>> print(report)
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import keras
import numpy as np

from mann_edge.compaction import check_compactable, task_usage
from mann_edge.errors import CompactionError

__all__ = [
    "mask_model",
    "select_mask",
    "train_task",
    "evaluate_task",
    "prune_task",
    "fit_rsn2",
    "check_model",
    "enable_determinism",
    "legacy_arguments",
    "Judge",
    "PruneStep",
    "TaskReport",
    "RSN2Report",
    "ValidationSizeWarning",
    "sparsity_of",
]


# -- choosing masks ------------------------------------------------------------------------------


def select_mask(
    scores: np.ndarray, percentile: float, available: np.ndarray | None = None, block_size: int = 1,
    *, of_available: bool = False,
) -> np.ndarray:
    """A 0/1 mask keeping the highest-scoring ``100 - percentile`` % (rounded down) of the positions of ``scores``.

    Only ``available`` positions (default: all) can be kept. The count kept is taken of the
    whole slice, as in the original `mask_model`; with ``of_available`` it is taken of the
    available positions, so that ``percentile`` is the share of a task's own positions it
    prunes (what `prune_task` promises). With ``block_size > 1`` the first axis of a
    (inputs, outputs) kernel is cut into blocks of that many consecutive inputs, scored by
    their summed |score|, and kept or pruned whole (TFLite's 1x4 sparse blocks).

    Example:
        >>> select_mask(np.array([0.1, 0.5, 0.0, 0.9]), 50)
        array([0., 1., 0., 1.], dtype=float32)
        >>> select_mask(np.array([0.1, 0.5, 0.0, 0.9]), 50, np.array([1, 1, 0, 0]), of_available=True)
        array([0., 1., 0., 0.], dtype=float32)
    """
    if not 0 <= percentile <= 100:
        raise ValueError(f"`percentile` must be between 0 and 100. Received: percentile={percentile}")
    scores = np.abs(np.asarray(scores, dtype=np.float64))
    available = np.ones(scores.shape, bool) if available is None else np.asarray(available, bool)
    if block_size > 1:
        return _select_blocks(scores, percentile, available, block_size, of_available)
    # At least `percentile` % is pruned (ceil), so a reported sparsity never falls short of the one asked.
    base = int(available.sum()) if of_available else scores.size
    keep = min(base - math.ceil(round(base * percentile / 100, 6)), int(available.sum()))
    flat_scores, flat_available = scores.ravel(), available.ravel()
    candidates = np.flatnonzero(flat_available)
    # Stable order: among equal scores the first positions win, so results are reproducible.
    chosen = candidates[np.argsort(-flat_scores[candidates], kind="stable")[:keep]]
    mask = np.zeros(scores.size, np.float32)
    mask[chosen] = 1.0
    return mask.reshape(scores.shape)


def _select_blocks(scores, percentile, available, block_size, of_available=False):
    if scores.ndim != 2:
        raise ValueError(f"Block masks need a 2-D (inputs, outputs) kernel. Received shape {scores.shape}")
    inputs, outputs = scores.shape
    blocks = -(-inputs // block_size)
    pad = blocks * block_size - inputs
    block_scores = np.pad(scores, [(0, pad), (0, 0)]).reshape(blocks, block_size, outputs).sum(axis=1).ravel()
    free_blocks = np.pad(available, [(0, pad), (0, 0)], constant_values=True).reshape(blocks, block_size, outputs)
    free_blocks = free_blocks.all(axis=1).ravel()
    # Counted in positions, not blocks: the last block of an input size that is not a multiple of
    # block_size is short, and the sparsity promised is that of the positions.
    sizes = np.repeat(np.minimum(block_size, inputs - np.arange(blocks) * block_size), outputs)
    base = int(available.sum()) if of_available else scores.size
    keep = base - math.ceil(round(base * percentile / 100, 6))
    candidates = np.flatnonzero(free_blocks)
    ranked = candidates[np.argsort(-block_scores[candidates], kind="stable")]  # first positions win ties
    chosen = ranked[np.cumsum(sizes[ranked]) <= keep]
    block_mask = np.zeros(blocks * outputs, np.float32)
    block_mask[chosen] = 1.0
    return np.repeat(block_mask.reshape(blocks, outputs), block_size, axis=0)[:inputs]


@dataclass
class _Weight:
    """A maskable weight: a layer's kernel or bias with its mask, and the slab (branch) it covers."""

    layer: keras.layers.Layer
    role: str  # "kernel" or "bias"
    variable: object
    mask: object
    multitask: bool

    @property
    def blockable(self) -> bool:
        # The layer class says whether its kernel can be pruned in blocks (TFLite's sparse kernel is for dense layers).
        return self.role == "kernel" and getattr(self.layer, "block_prunable", False)


def _masked_weights(model) -> list[_Weight]:
    weights = []
    for layer in model.layers:
        if getattr(layer, "masked", False):
            multitask = getattr(layer, "multitask", False)
            weights.append(_Weight(layer, "kernel", layer.w, layer.w_mask, multitask))
            if layer.use_bias:
                weights.append(_Weight(layer, "bias", layer.b, layer.b_mask, multitask))
    return weights


def _to_numpy(value) -> np.ndarray:
    return keras.ops.convert_to_numpy(value)


def mask_model(model, percentile: float, method: str = "gradients", exclusive: bool = True, x=None, y=None,
               *, loss=None, block_size: int = 1, check: bool = True):
    """Sets every masked layer's masks, as the original `mask_model` does (same arguments, same meaning).

    Args:
        model: a Keras model with `mann_edge` masked layers.
        percentile: percentage of each weight (per task slab) to prune, e.g. 90.
        method: ``"gradients"`` (|gradient of the loss on x, y|) or ``"magnitude"`` (|weight|).
        exclusive: masks of different tasks in a multitask layer are disjoint.
        x, y: lists of inputs and targets (one per model input / output), for ``"gradients"``.
        loss: loss for ``"gradients"`` (default: the compiled loss, else inferred from y).
        block_size: keep or prune blocks of this many consecutive inputs of one output unit
            in dense kernels (4 gives TFLite's 1x4 sparse blocks).
        check: first make sure the model can be compacted and exported (`check_model`);
            False masks a model mann-edge cannot export.

    Returns:
        The model, masked in place.

    Raises:
        CompactionError: with ``check``, listing every layer that cannot be compacted.

    Example:
        >>> mask_model(model, 90, method="magnitude")
    """
    if check:
        check_model(model)
    method = str(method).lower()
    if method not in ("gradients", "magnitude"):
        raise ValueError(f"`method` must be 'gradients' or 'magnitude'. Received: method={method!r}")
    weights = _masked_weights(model)
    if method == "gradients":
        if x is None or y is None:
            raise ValueError("method='gradients' needs x and y (inputs and targets per output); or use method='magnitude'")
        scores = _gradients(model, x, y, loss, [w.variable for w in weights])
    else:
        scores = [_to_numpy(w.variable) for w in weights]
    new_masks: dict[str, dict[str, np.ndarray]] = {}
    for weight, score in zip(weights, scores):
        block = block_size if weight.blockable else 1
        if weight.multitask:
            mask = np.zeros(score.shape, np.float32)
            used = np.zeros(score.shape[1:], bool)
            for slab in range(score.shape[0]):
                mask[slab] = select_mask(score[slab], percentile, ~used if exclusive else None, block)
                used |= mask[slab] > 0
        else:
            mask = select_mask(score, percentile, None, block)
        new_masks.setdefault(weight.layer.name, {})[weight.role] = mask
    for layer in {w.layer.name: w.layer for w in weights}.values():
        masks = new_masks[layer.name]
        layer.set_masks([masks["kernel"]] + ([masks["bias"]] if layer.use_bias else []))
    return model


def _gradients(model, x, y, loss, variables) -> list[np.ndarray]:
    import tensorflow as tf

    xs = list(x) if isinstance(x, (list, tuple)) else [x]
    ys = list(y) if isinstance(y, (list, tuple)) else [y]
    if len(xs) != len(model.inputs) or len(ys) != len(model.outputs):
        raise ValueError(
            f"method='gradients' needs one x per model input ({len(model.inputs)}) and one y per output "
            f"({len(model.outputs)}). Received: {len(xs)} and {len(ys)}"
        )
    counts = {len(a) for a in xs + ys}
    if len(counts) != 1:
        raise ValueError(
            "method='gradients' feeds all inputs at once, as the original does: give every input and target "
            f"the same number of samples. Received: {[len(a) for a in xs + ys]}"
        )
    losses = _losses(model, loss, ys)
    totals = [np.zeros(v.shape, np.float64) for v in variables]
    n = counts.pop()
    for start in range(0, n, 512):
        batch_x = [tf.convert_to_tensor(a[start : start + 512]) for a in xs]
        with tf.GradientTape() as tape:
            predictions = model(batch_x, training=False)
            predictions = predictions if isinstance(predictions, (list, tuple)) else [predictions]
            total = tf.add_n([fn(a[start : start + 512], p) for fn, a, p in zip(losses, ys, predictions)])
        for acc, g in zip(totals, tape.gradient(total, variables)):
            if g is not None:
                acc += np.asarray(g)
    return totals


def _losses(model, loss, ys) -> list[Callable]:
    if loss is None:
        loss = getattr(model, "loss", None)
    if loss is None:
        return [keras.losses.get(_default_loss(y)) for y in ys]
    if isinstance(loss, (list, tuple)):
        return [keras.losses.get(item) for item in loss]
    return [keras.losses.get(loss)] * len(ys)


def _default_loss(y: np.ndarray) -> str:
    y = np.asarray(y)
    if y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1 and np.issubdtype(y.dtype, np.integer)):
        return "sparse_categorical_crossentropy"
    return "categorical_crossentropy"


def sparsity_of(model, *, by_task: bool = True) -> dict:
    """Percentage of pruned positions per masked layer (and per task slab): ``{layer: {slab: %}}``."""
    result = {}
    for weight in _masked_weights(model):
        if weight.role != "kernel":
            continue
        mask = _to_numpy(weight.mask)
        if weight.multitask and by_task:
            result[weight.layer.name] = {slab: 100.0 * (1 - mask[slab].mean()) for slab in range(mask.shape[0])}
        else:
            result[weight.layer.name] = {None: 100.0 * (1 - mask.mean())}
    return result


# -- whose weights are whose ---------------------------------------------------------------------


class _TaskConstraint(keras.constraints.Constraint):
    """After each optimizer step: positions outside ``keep`` go back to their frozen values.

    ``keep`` and ``frozen`` are variables, read when the step runs, so one compiled
    training step serves every pruning step of a task: `_Ownership.refresh` updates them.
    """

    def __init__(self, keep, frozen):
        self.keep, self.frozen = keep, frozen

    def __call__(self, value):
        return value * self.keep + self.frozen


def _resolve_task(model, task) -> int:
    names = list(getattr(model, "output_names", None) or [])
    if isinstance(task, (int, np.integer)) and not isinstance(task, bool):
        if not 0 <= task < len(model.outputs):
            raise ValueError(f"Task index {task} is out of range: the model has {len(model.outputs)} outputs")
        return int(task)
    if task in names:
        return names.index(task)
    raise ValueError(f"Unknown task {task!r}: name a model output {names} or give its index")


def _ownership(model, task: int, protect: Sequence[int]):
    """For each trainable variable of the model: the 0/1 array of positions task ``task`` owns (masks aside)."""
    usage = task_usage(model)
    mine, protected = usage[task].layers, set().union(*(usage[p].layers for p in protect)) if protect else set()
    result = []
    for layer in model.layers:
        for variable in layer.trainable_weights:
            keep = np.zeros(variable.shape, np.float32)
            if getattr(layer, "multitask", False):
                for slab in range(variable.shape[0]):
                    if (layer.name, slab) in mine and (layer.name, slab) not in protected:
                        keep[slab] = 1.0
            elif (layer.name, None) in mine and (layer.name, None) not in protected:
                keep[...] = 1.0
            result.append((layer, variable, keep))
    return result


class _Ownership:
    """Within a ``with`` block, only task ``task``'s own, unpruned positions can train.

    Layers the task does not own are frozen (``trainable=False``); in the layers it owns a
    constraint puts every other position (another task's slab, a pruned weight) back after
    each optimizer step. `refresh` re-reads the masks and weights, after a pruning step.
    """

    def __init__(self, model, task: int, protect: Sequence[int]):
        self.model, self.task, self.protect = model, task, protect

    def __enter__(self):
        import tensorflow as tf

        self.saved_trainable = {layer.name: layer.trainable for layer in self.model.layers}
        self.saved_constraints, self.owned = [], []
        owned = _ownership(self.model, self.task, self.protect)
        trainable_layers = {layer.name for layer, _, keep in owned if keep.any()}
        for layer in self.model.layers:
            if layer.trainable_weights and layer.name not in trainable_layers:
                layer.trainable = False  # also puts BatchNormalization in inference mode
        masks = {id(w.variable): w.mask for w in _masked_weights(self.model)}
        for layer, variable, keep in owned:
            if layer.name in trainable_layers:
                constraint = _TaskConstraint(tf.Variable(keep, trainable=False), tf.Variable(keep, trainable=False))
                self.saved_constraints.append((variable, variable.constraint))
                self.owned.append((variable, keep, masks.get(id(variable)), constraint))
                variable.constraint = constraint
        self.refresh()
        return self

    def refresh(self) -> None:
        """Takes the current masks and weights: what is pruned or not owned stays at its current value."""
        for variable, owned, mask, constraint in self.owned:
            keep = owned if mask is None else owned * _to_numpy(mask)
            constraint.keep.assign(keep)
            constraint.frozen.assign((_to_numpy(variable) * (1.0 - keep)).astype(np.float32))

    def __exit__(self, *exc):
        for variable, constraint in self.saved_constraints:
            variable.constraint = constraint
        for layer in self.model.layers:
            layer.trainable = self.saved_trainable[layer.name]
        return False


# -- per-task training ---------------------------------------------------------------------------


def _task_inputs(model, task: int, x) -> Callable[[int], list]:
    """A function giving the full model input list for ``n`` samples: ``x`` on the task's inputs, zeros elsewhere."""
    usage = task_usage(model)[task]
    names = [kt._keras_history.operation.name for kt in model.inputs]
    mine = [name for name in names if name in usage.inputs]
    if isinstance(x, Mapping):
        given = dict(x)
    elif isinstance(x, (list, tuple)):
        given = dict(zip(mine, x))
        if len(x) != len(mine):
            raise ValueError(f"Task {task} reads inputs {mine}; received {len(x)} arrays")
    else:
        if len(mine) != 1:
            raise ValueError(f"Task {task} reads inputs {mine}; pass a list or dict of arrays")
        given = {mine[0]: x}
    arrays = {name: np.asarray(value) for name, value in given.items()}
    n = len(next(iter(arrays.values())))

    def full(indices=None) -> list:
        result = []
        for kt, name in zip(model.inputs, names):
            if name in arrays:
                value = arrays[name]
                result.append(value if indices is None else value[indices])
            else:
                count = n if indices is None else len(indices)
                result.append(np.zeros((count, *kt.shape[1:]), keras.backend.standardize_dtype(kt.dtype)))
        return result

    full.size = n
    return full


def _compiled_task_model(model, task: int, loss, optimizer, learning_rate, metrics, y):
    sub = keras.Model(model.inputs, model.outputs[task])
    loss = _default_loss(y) if loss in (None, "auto") else loss
    optimizer = keras.optimizers.get({"class_name": optimizer, "config": {"learning_rate": learning_rate}}) \
        if isinstance(optimizer, str) else optimizer
    sub.compile(optimizer=optimizer, loss=loss, metrics=list(metrics))
    return sub


class _TaskTrainer:
    """One task's training, compiled once and reused by every pruning step (a ``with`` block).

    Tracing a Keras training step costs about a second, more than an epoch of the samples;
    so the task's single-output model is compiled once, and each `fit` starts from a fresh
    optimizer state (as a newly compiled model would) after `_Ownership.refresh` has taken
    the current masks and weights.
    """

    def __init__(self, model, task: int, y, *, protect: Sequence[int], loss="auto", optimizer="adam",
                 learning_rate: float = 1e-3, metrics=("accuracy",)):
        self.model, self.task, self.ownership = model, task, _Ownership(model, task, protect)
        self.compile_args = (loss, optimizer, learning_rate, tuple(metrics), np.asarray(y))

    def __enter__(self):
        self.ownership.__enter__()
        try:
            self.sub = _compiled_task_model(self.model, self.task, *self.compile_args)
            self.sub.optimizer.build(self.sub.trainable_variables)
            self.fresh = [_to_numpy(v).copy() for v in self.sub.optimizer.variables]
        except BaseException:
            self.ownership.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        return self.ownership.__exit__(*exc)

    def fit(self, x, y, *, epochs: int, batch_size: int = 32, validation_data=None, verbose: int = 0,
            seed: int | None = 0, callbacks=None) -> dict:
        inputs = _task_inputs(self.model, self.task, x)
        val = None
        if validation_data is not None:
            val = (_task_inputs(self.model, self.task, validation_data[0])(), np.asarray(validation_data[1]))
        self.ownership.refresh()
        for variable, value in zip(self.sub.optimizer.variables, self.fresh):
            variable.assign(value)
        if seed is not None:
            keras.utils.set_random_seed(seed)
        history = self.sub.fit(inputs(), np.asarray(y), epochs=epochs, batch_size=batch_size, validation_data=val,
                               verbose=verbose, shuffle=True, callbacks=list(callbacks or ()))
        return {k: float(v[-1]) for k, v in history.history.items()}

    def evaluate(self, x, y, batch_size: int = 256) -> dict:
        return self.sub.evaluate(_task_inputs(self.model, self.task, x)(), np.asarray(y), batch_size=batch_size,
                                 verbose=0, return_dict=True)


def _protected(model, index: int, protect) -> list[int]:
    """The indices of the tasks to protect: ``protect`` resolved, or every other task."""
    if protect is None:
        return [i for i in range(len(model.outputs)) if i != index]
    return [_resolve_task(model, p) for p in protect if _resolve_task(model, p) != index]


def train_task(model, task, x, y, *, epochs: int = 10, batch_size: int = 32, protect: Sequence | None = None,
               loss="auto", optimizer="adam", learning_rate: float = 1e-3, metrics=("accuracy",),
               validation_data=None, verbose: int = 0, seed: int | None = 0, callbacks=None) -> dict:
    """Trains one task; no protected task's weights or outputs change (bit for bit).

    Args:
        model: the MANN (functional Keras model); task: output name or index.
        x: the task's input(s): an array, a list (in the task's input order) or a dict by input name.
        y: targets (integer labels or one-hot).
        protect: tasks (names or indices) whose weights must not change; default every other task.
            A layer shared with a protected task is frozen.
        validation_data: optional (x_val, y_val) in the same form.
        seed: seeds Python, numpy and TensorFlow (`keras.utils.set_random_seed`) before training,
            so the same call gives the same shuffles and weights; None leaves the seeds alone.
        callbacks: Keras callbacks for the fit (their ``model`` is the task's single-output model).

    Returns:
        The final epoch's logs (loss, metrics, val_ metrics).

    Example:
        >>> train_task(model, "digits", x_digits, y_digits, epochs=5)
    """
    index = _resolve_task(model, task)
    with _TaskTrainer(model, index, y, protect=_protected(model, index, protect), loss=loss, optimizer=optimizer,
                      learning_rate=learning_rate, metrics=metrics) as trainer:
        return trainer.fit(x, y, epochs=epochs, batch_size=batch_size, validation_data=validation_data,
                           verbose=verbose, seed=seed, callbacks=callbacks)


def evaluate_task(model, task, x, y, *, loss="auto", metrics=("accuracy",), batch_size: int = 256) -> dict:
    """Loss and metrics of one task on (x, y)."""
    index = _resolve_task(model, task)
    sub = _compiled_task_model(model, index, loss, "adam", 1e-3, metrics, np.asarray(y))
    return sub.evaluate(_task_inputs(model, index, x)(), np.asarray(y), batch_size=batch_size, verbose=0, return_dict=True)


# -- judging a pruning step ----------------------------------------------------------------------

# Metrics whose value is the share of samples right: a step is judged in samples for them.
ACCURACY_METRICS = frozenset({"accuracy", "acc", "sparse_categorical_accuracy", "categorical_accuracy",
                              "binary_accuracy"})


class ValidationSizeWarning(UserWarning):
    """A task's validation set is too small for the tolerance asked: one error is worth more than it."""


@dataclass(frozen=True)
class Judge:
    """How `prune_task` judges a step: the task's validation metric after the step against its dense value.

    For an accuracy metric the comparison is in samples, the unit a validation set can
    resolve: a step passes when the pruned task makes at most ``allowed`` more validation
    errors than the dense one. ``allowed`` is ``tolerance`` times the validation size,
    rounded down, and at least one sample (a smaller difference cannot be observed, so
    demanding it would reject every step on a small set; `too_small` says when that floor
    applies). Any other metric passes when within ``tolerance`` of dense; ``"loss"`` is
    judged as ``-loss``, so higher is better everywhere.

    Example:
        >>> judge = Judge.make("accuracy", dense=0.98, tolerance=0.02, samples=270)
        >>> judge.allowed, judge.passes(0.97), judge.passes(0.95)
        (5, True, False)
    """

    metric: str
    dense: float
    tolerance: float
    samples: int
    allowed: int | None  # extra validation errors a step may cost (accuracy metrics), else None

    @classmethod
    def make(cls, metric: str, dense: float, tolerance: float, samples: int) -> "Judge":
        if not tolerance >= 0:
            raise ValueError(f"`tolerance` must be >= 0 (a share of the metric, e.g. 0.02). Received: {tolerance}")
        if metric not in ACCURACY_METRICS:
            return cls(metric, float(dense), float(tolerance), int(samples), None)
        allowed = max(1, math.floor(tolerance * samples + 1e-9))
        return cls(metric, float(dense), float(tolerance), int(samples), allowed)

    def errors(self, value: float) -> int:
        """Validation errors behind an accuracy ``value``."""
        return int(round((1.0 - value) * self.samples))

    def passes(self, value: float) -> bool:
        if self.allowed is None:
            return value >= self.dense - self.tolerance - 1e-12
        return self.errors(value) <= self.errors(self.dense) + self.allowed

    @property
    def needed(self) -> float:
        """The lowest value that passes."""
        if self.allowed is None:
            return self.dense - self.tolerance
        return 1.0 - min(self.samples, self.errors(self.dense) + self.allowed) / self.samples

    @property
    def too_small(self) -> bool:
        """Whether one validation error is worth more than the tolerance (so one error is allowed instead)."""
        return self.allowed is not None and self.tolerance * self.samples < 1 - 1e-9

    def describe(self) -> str:
        """The tolerance as applied, e.g. ``"5 samples (1.85 points) of 270"``."""
        if self.allowed is None:
            return f"{self.tolerance:g} of {self.metric}"
        plural = "s" if self.allowed > 1 else ""
        return f"{self.allowed} sample{plural} ({100 * self.allowed / self.samples:.2f} points) of {self.samples}"

    def small_set_message(self, task: str) -> str:
        one = 100 / self.samples
        return (f"Task {task!r}: its validation set has {self.samples} samples, so one error is worth {one:.2f} points "
                f"of {self.metric}, more than the tolerance of {100 * self.tolerance:.2f} points; steps are judged "
                f"with one sample ({one:.2f} points) instead. Give it at least "
                f"{math.ceil(1 / self.tolerance - 1e-9) if self.tolerance > 0 else 'more'} validation samples, or a "
                f"larger tolerance, for the tolerance asked")


def _metric_value(logs: Mapping, metric: str, prefix: str = "") -> float:
    """The metric from Keras logs, higher is better (loss is negated)."""
    key = prefix + metric
    if key not in logs:
        raise ValueError(f"Metric {metric!r} is not among the evaluated ones: {sorted(logs)}")
    return -float(logs[key]) if metric == "loss" else float(logs[key])


class _Recovery(keras.callbacks.Callback):
    """Ends training after the first epoch whose validation metric passes the judge: the step has recovered."""

    def __init__(self, judge: Judge):
        super().__init__()
        self.judge, self.values, self.passed = judge, [], False

    def on_epoch_end(self, epoch, logs=None):
        value = _metric_value(logs or {}, self.judge.metric, "val_")
        self.values.append(value)
        if self.judge.passes(value):
            self.passed = True
            self.model.stop_training = True


# -- iterative pruning ---------------------------------------------------------------------------


def _task_mask_slices(model, task: int, protect: Sequence[int]):
    """The masked weights task ``task`` prunes (those it owns, unprotected), each as (weight, slab, held).

    ``slab`` is the slab index in a multitask weight (None otherwise); ``held`` marks the
    positions protected tasks' slabs of that weight hold, which this task must not take.
    """
    usage = task_usage(model)
    mine = usage[task].layers
    protected = set().union(*(usage[p].layers for p in protect)) if protect else set()
    result = []
    for weight in _masked_weights(model):
        if not weight.multitask:
            if (weight.layer.name, None) in mine and (weight.layer.name, None) not in protected:
                result.append((weight, None, None))
            continue
        mask = _to_numpy(weight.mask)
        held_slabs = [slab for slab in range(mask.shape[0]) if (weight.layer.name, slab) in protected]
        held = mask[held_slabs].sum(axis=0) > 0 if held_slabs else np.zeros(mask.shape[1:], bool)
        for slab in range(mask.shape[0]):
            if (weight.layer.name, slab) in mine and (weight.layer.name, slab) not in protected:
                result.append((weight, slab, held))
    return result


def _set_task_sparsity(model, slices, percentile: float, block_size: int) -> None:
    """Masks each of the task's slices at ``percentile`` of its own (free) positions, by weight magnitude."""
    for weight, slab, held in slices:
        mask = _to_numpy(weight.mask).copy()
        values = _to_numpy(weight.variable)
        block = block_size if weight.blockable else 1
        if slab is None:
            mask = select_mask(values, percentile, None, block)
        else:
            mask[slab] = select_mask(values[slab], percentile, ~held, block, of_available=True)
        weight.mask.assign(mask)
        weight.variable.assign(values * mask)


def _open_task_slices(slices) -> None:
    """Gives the task's slices every position no protected task holds (the start of its dense training)."""
    for weight, slab, held in slices:
        mask = _to_numpy(weight.mask).copy()
        if slab is None:
            mask[...] = 1.0
        else:
            mask[slab] = (~held).astype(np.float32)
        weight.mask.assign(mask)


def _task_sparsity(slices) -> tuple[float, dict]:
    """% of the task's own kernel positions pruned, overall and per layer (``layer[slab]`` for a slab).

    A task's own positions are those of its layers, and in a multitask layer those of its
    slab that no protected (earlier) task holds: positions another task holds are not
    this task's pruning and do not count.
    """
    per_layer, total, pruned = {}, 0, 0
    for weight, slab, held in slices:
        if weight.role != "kernel":
            continue
        mask = _to_numpy(weight.mask)
        own = mask.ravel() if slab is None else mask[slab][~held]
        name = weight.layer.name if slab is None else f"{weight.layer.name}[{slab}]"
        kept = int(np.count_nonzero(own))
        per_layer[name] = 100.0 * (1 - kept / own.size) if own.size else 0.0
        total += own.size
        pruned += own.size - kept
    return (100.0 * pruned / total if total else 0.0), per_layer


@dataclass
class PruneStep:
    """One pruning step of `prune_task`: from ``start`` % to ``sparsity`` %, kept or rolled back."""

    start: float  # % of the task's own positions pruned before the step
    sparsity: float  # % tried
    epochs: int  # recovery epochs it trained
    value: float  # validation metric at its end
    kept: bool


@dataclass
class TaskReport:
    """What RSN2 did to one task.

    ``sparsity`` is the % of the task's own kernel positions pruned (its layers' kernels, and
    in a multitask layer the positions of its slab no earlier task holds); ``layers`` the
    same per layer. ``dense`` and ``pruned`` are the validation metric before and after
    pruning (``-loss`` for ``metric="loss"``), on ``validation_samples`` samples; ``tolerance``
    how the steps were judged; ``stopped`` why pruning ended; ``steps`` every step tried.
    """

    task: str
    metric: str
    dense: float
    pruned: float
    sparsity: float
    target: float = 0.0
    validation_samples: int = 0
    tolerance: str = ""
    stopped: str = ""
    layers: dict = field(default_factory=dict)
    steps: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    advice: str = ""

    @property
    def reached(self) -> bool:
        """Whether the task reached its target sparsity."""
        return self.sparsity >= self.target - 1e-6


@dataclass
class RSN2Report:
    """Per-task summary of `fit_rsn2`; ``str()`` is a table, then a line per task that missed its target."""

    tasks: list

    @property
    def below_target(self) -> list:
        return [t for t in self.tasks if not t.reached]

    def __str__(self) -> str:
        header = (f"{'task':<14} {'metric':<9} {'val n':>6} {'dense':>7} {'pruned':>7} {'sparsity':>9} "
                  f"{'target':>7}  stopped")
        lines = ["RSN2 (sparsity: share of the task's own kernel positions pruned; val n: validation samples)",
                 header, "-" * len(header)]
        for t in self.tasks:
            flag = "" if t.reached else "  <- below target"
            lines.append(f"{t.task:<14} {t.metric:<9} {t.validation_samples:>6} {t.dense:>7.4f} {t.pruned:>7.4f} "
                         f"{t.sparsity:>8.1f}% {t.target:>6.0f}%  {t.stopped}{flag}")
            for layer, value in t.layers.items():
                lines.append(f"    {layer:<40} {value:>6.1f}% pruned")
        for t in self.tasks:
            lines += [f"! {message}" for message in t.warnings]
            if not t.reached:
                lines.append(f"! {t.task!r} reached {t.sparsity:.1f} % of its {t.target:g} % target. {t.advice}")
        return "\n".join(lines)


def _stop_reason(steps: list[PruneStep], judge: Judge, patience: int) -> str:
    """Why the failed steps at the end of ``steps`` stopped pruning, naming each size tried."""
    failed = []
    for step in reversed(steps):
        if step.kept:
            break
        failed.append(step)
    failed.reverse()
    tried = ", ".join(f"{s.sparsity:g}" for s in failed)
    last = failed[-1]
    if judge.metric == "loss":  # judged as -loss; shown as the loss
        short = f"val loss {-last.value:.4f} > {-judge.needed:.4f} allowed"
    else:
        short = f"val {judge.metric} {last.value:.4f} < {judge.needed:.4f} needed"
    epochs = f"{patience} epoch{'s' if patience != 1 else ''}"
    return f"steps from {last.start:g} to {tried} % failed: {short} after {epochs}"


def _advice(judge: Judge, patience: int, min_step: float) -> str:
    """What to try for a task that stopped below its target."""
    hints = [f"more patience (now {patience} epochs per step)",
             f"a larger tolerance (now {judge.describe()})"]
    if judge.too_small or judge.samples < 200:
        hints.append(f"more validation samples (now {judge.samples})")
    hints += [f"a smaller min_step (now {min_step:g} points)", "more width in its layers, or a lower target for it"]
    return "Try " + ", ".join(hints[:-1]) + " or " + hints[-1] + "."


def prune_task(model, task, x, y, validation_data, *, target: float = 90, step: float = 10, min_step: float = 2.5,
               start: float = 0, patience: int = 10, tolerance: float = 0.02, final_epochs: int = 0,
               protect: Sequence | None = None, block_size: int = 1, metric: str = "accuracy",
               progress: Callable[[str], None] | None = None, **train_args) -> TaskReport:
    """Prunes one task towards ``target`` % of its own weights, step by step, each step recovered before it is judged.

    Each step prunes the task's smallest weights (by magnitude, within the positions no
    protected task holds) up to the next sparsity, then trains one epoch at a time until
    the validation ``metric`` passes the `Judge` (within ``tolerance`` of the task's dense
    value, counted in samples for accuracy) or ``patience`` epochs have run. A step that
    has not recovered by then is rolled back to the last kept state (weights and masks)
    and retried at half the step (10 -> 5 -> 2.5 points by default); pruning stops when a
    step below ``min_step`` would be needed, or at ``target``. Measuring every step against
    the dense value, not the last kept one, keeps small losses from adding up.

    Args:
        target: % of the task's own kernel positions to prune.
        step: first step size, in points of sparsity; ``min_step`` the smallest retry.
        start: the first sparsity tried (the original's ``starting_pruning``); 0 starts at ``step``.
        patience: recovery epochs a step gets before it is judged failed.
        tolerance: how much of ``metric`` a step may cost against dense (0.02: 2 points of accuracy).
        final_epochs: epochs the task trains at its final masks once pruning stops (not judged:
            the step that reached them ended at the first epoch that passed).
        protect: tasks whose weights must not change (default: every other task).
        block_size: prune dense kernels in blocks of this many consecutive inputs.
        train_args: passed to `train_task` (batch_size, learning_rate, loss, optimizer, seed).

    Returns:
        TaskReport: dense vs pruned validation metric, sparsity reached, every step, why it stopped.

    Example:
        >>> report = prune_task(model, "digits", x, y, (x_val, y_val), target=90, patience=5)
        >>> report.sparsity, report.pruned, report.stopped
    """
    index = _resolve_task(model, task)
    name = _task_name(model, index)
    if not 0 < target <= 100 or not step > 0 or not min_step > 0 or not 0 <= start <= target:
        raise ValueError(f"Task {name!r}: expected 0 < target <= 100, step > 0, min_step > 0 and 0 <= start <= target."
                         f" Received: target={target}, step={step}, min_step={min_step}, start={start}")
    if int(patience) < 1:
        raise ValueError(f"Task {name!r}: `patience` must be at least 1 epoch. Received: patience={patience}")
    protect_idx = _protected(model, index, protect)
    slices = _task_mask_slices(model, index, protect_idx)
    if not slices:
        raise ValueError(f"Task {name!r} owns no masked weights that are not shared with a protected task")
    for weight, slab, held in slices:
        if held is not None and held.all():
            protected = [_task_name(model, p) for p in protect_idx]
            raise ValueError(
                f"Task {name!r} has no free positions in '{weight.layer.name}': the protected tasks {protected} "
                "hold them all. Prune those tasks first (fit_rsn2 does), or pass protect=[]"
            )
    say = progress or (lambda message: None)
    fit_args = {key: train_args.pop(key) for key in ("batch_size", "seed", "verbose") if key in train_args}
    x_val, y_val = validation_data
    metrics = (metric,) if metric != "loss" else ()
    with _TaskTrainer(model, index, y, protect=protect_idx, metrics=metrics, **train_args) as trainer:
        judge = Judge.make(metric, _metric_value(trainer.evaluate(x_val, y_val), metric), tolerance, len(y_val))
        warned = []
        if judge.too_small:
            warned.append(judge.small_set_message(name))
            warnings.warn(warned[-1], ValidationSizeWarning, stacklevel=2)
            say(f"  [{name}] warning: {warned[-1]}")
        schedule = {"target": float(target), "step": float(step), "min_step": float(min_step), "start": float(start),
                    "patience": int(patience)}
        steps, stopped = _prune_steps(trainer, slices, judge, schedule, (x, y, validation_data), fit_args, block_size,
                                      lambda line: say(f"  [{name}] {line}"))
        if final_epochs and any(s.kept for s in steps):
            # The kept masks train on: the step that reached them stopped at the first epoch that passed.
            say(f"  [{name}] training its pruned weights for {final_epochs} more epochs")
            trainer.fit(x, y, epochs=int(final_epochs), **fit_args)
        pruned = _metric_value(trainer.evaluate(x_val, y_val), metric)
    sparsity, per_layer = _task_sparsity(slices)
    report = TaskReport(name, metric, judge.dense, pruned, sparsity, float(target), len(y_val), judge.describe(),
                        stopped, per_layer, steps, warned)
    if not report.reached:
        report.advice = _advice(judge, int(patience), min_step)
    return report


def _prune_steps(trainer: _TaskTrainer, slices, judge: Judge, schedule: dict, data, fit_args: dict, block_size: int,
                 say: Callable[[str], None]) -> tuple[list[PruneStep], str]:
    """The steps of `prune_task`: prune, recover, judge; roll back and halve the step on failure.

    Returns the steps tried and why pruning stopped.
    """
    x, y, validation_data = data
    model, target, size, start = trainer.model, schedule["target"], schedule["step"], schedule["start"]
    steps: list[PruneStep] = []
    level = 0.0
    while level < target - 1e-9:
        goal = min(target, start if level == 0 and start > 0 else level + size)
        saved = [_to_numpy(v).copy() for v in model.weights]  # every weight and mask: a rollback restores all
        _set_task_sparsity(model, slices, goal, block_size)
        recovery = _Recovery(judge)
        trainer.fit(x, y, epochs=schedule["patience"], validation_data=validation_data, callbacks=[recovery],
                    **fit_args)
        steps.append(PruneStep(level, goal, len(recovery.values), recovery.values[-1], recovery.passed))
        say(f"sparsity {level:5.1f}% -> {goal:5.1f}%  val {judge.metric} {recovery.values[-1]:.4f} "
            f"(dense {judge.dense:.4f}, {judge.needed:.4f} needed)  after {len(recovery.values)} epoch(s): "
            f"{'kept' if recovery.passed else 'rolled back'}")
        if recovery.passed:
            level = goal
            continue
        for variable, value in zip(model.weights, saved):
            variable.assign(value)
        if size / 2 < schedule["min_step"] - 1e-9:
            return steps, _stop_reason(steps, judge, schedule["patience"])
        size /= 2
        start = 0  # after a failed first step, retries go up from the last kept state in smaller steps
    return steps, "reached the target"


def _task_name(model, index: int) -> str:
    names = list(getattr(model, "output_names", None) or [])
    return names[index] if index < len(names) else f"task{index}"


# -- checks before training ----------------------------------------------------------------------


def check_model(model) -> None:
    """Raises CompactionError listing every layer of ``model`` that cannot be compacted (and so exported).

    RSN2 calls it before any training, so a model mann-edge cannot export fails in a
    second with every layer to change, not after minutes of training in `convert`.

    Example:
        >>> check_model(model)   # returns None when every layer compacts
    """
    problems = check_compactable(model) + _nested_masked_layers(model)
    if problems:
        listed = "; ".join(f"({i}) {problem}" for i, problem in enumerate(problems, start=1))
        raise CompactionError(
            f"Model '{model.name}' has {len(problems)} layer(s) mann-edge cannot compact, so it could not be exported "
            f"after training: {listed}. Change them before training (or pass check=False to train it anyway)"
        )


def _coupled_to_later_tasks(model, task: int, later: Sequence[int]) -> list[str]:
    """Why training the ``later`` tasks changes task ``task``'s outputs: it reads their branches (not protected).

    Through a layer whose outputs read every branch (`MultitaskNormalization`): RSN2 trains each
    task on its own branch, so the earlier task keeps its weights but not its outputs.
    """
    usage = task_usage(model)
    read_only = usage[task].reads - usage[task].layers
    shared = sorted({name for later_task in later for name, slab in usage[later_task].layers
                     if slab is not None and (name, slab) in read_only})
    if not shared:
        return []
    return [f"reads later tasks' slabs of {shared} (through a layer that reads every branch, e.g. "
            "MultitaskNormalization): training them changed this task's outputs after it was judged; its "
            "figures are from before"]


def _nested_masked_layers(model) -> list[str]:
    """RSN2 masks the model's own layers; a masked layer inside a nested model would train but never be pruned."""
    problems = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            inner = [sub.name for sub in layer._flatten_layers(include_self=False) if getattr(sub, "masked", False)]
            if inner:
                problems.append(f"nested model '{layer.name}' holds masked layers {inner}, which RSN2 cannot prune "
                                "there; call those layers in the outer model (or load it with load_legacy, which "
                                "reads nested models into one graph)")
    return problems


def enable_determinism(threads: int | None = None) -> dict:
    """Switches on TensorFlow's op determinism (process-wide), and fixes the thread count if asked and still possible.

    With it and a fixed seed, training repeats bit for bit in the same setting. Across
    machines the thread count and oneDNN's CPU-specific kernels also decide the rounding:
    `mann_edge.determinism` says what to fix (before TensorFlow starts) and what remains.

    Returns:
        What holds now: ``{"op_determinism": ..., "threads": ..., "isa": ...}``.
    """
    from mann_edge import determinism

    return determinism.enable(threads)


# -- everything in one call ----------------------------------------------------------------------


def _split(data, seed: int, validation_split: float):
    """(x, y, x_val, y_val) from a tuple/dict; without validation data, ``validation_split`` of the training data."""
    if isinstance(data, Mapping):
        x, y = data["x"], data["y"]
        x_val, y_val = data.get("x_val"), data.get("y_val")
    elif len(data) == 4:
        x, y, x_val, y_val = data
    else:
        (x, y), x_val, y_val = data, None, None
    y = np.asarray(y)
    if x_val is not None:
        return x, y, x_val, np.asarray(y_val)
    if not 0 < validation_split < 1:
        raise ValueError(f"`validation_split` must be between 0 and 1. Received: {validation_split}")
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(len(y) * (1 - validation_split))
    train, val = order[:cut], order[cut:]

    def take(value, idx):
        if isinstance(value, Mapping):
            return {k: np.asarray(v)[idx] for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [np.asarray(v)[idx] for v in value]
        return np.asarray(value)[idx]

    return take(x, train), y[train], take(x, val), y[val]


def _for_task(value, name: str, index: int, default):
    """A per-task setting: ``value`` itself, or its entry for the task (by name, then index) in a mapping."""
    if isinstance(value, Mapping):
        if name in value:
            return value[name]
        return value.get(index, default)
    return value


# The original packages' `train_model_iteratively` arguments -> `fit_rsn2`'s (see `legacy_arguments`).
LEGACY_ARGUMENTS = {
    "validation_split": "validation_split",
    "delta": "tolerance",  # with metric="loss": the original judges validation loss
    "batch_size": "batch_size",
    "patience": "patience",
    "max_epochs": "epochs",
    "starting_pruning": "start",
    "pruning_rate": "step",
    "losses": "loss",
    "optimizer": "optimizer",
}


def legacy_arguments(**arguments) -> dict:
    """`fit_rsn2` keyword arguments for the arguments of `train_model_iteratively` (mann 0.3, beyondml 0.1).

    The original, ``train_model_iteratively(model, task_gradients, train_x, train_y,
    validation_split, delta, batch_size, losses, optimizer='adam', metrics=None,
    starting_pruning=0, pruning_rate=10, patience=5, max_epochs=100)``, trains each task
    (early stopping on validation loss, at most ``max_epochs``), then prunes it from
    ``starting_pruning`` in steps of ``pruning_rate`` %, training one epoch at a time for at
    most ``patience`` epochs until validation loss is below the best so far plus ``delta``,
    and stops at the first step that does not get there. Here: ``validation_split`` ->
    ``validation_split``, ``delta`` -> ``tolerance`` with ``metric="loss"``, ``batch_size``,
    ``patience`` (recovery epochs per step), ``max_epochs`` -> ``epochs`` (dense training,
    all of them, no early stopping), ``starting_pruning`` -> ``start``, ``pruning_rate`` ->
    ``step``, ``losses`` -> ``loss``, ``optimizer``. A per-task list becomes a mapping by
    task index. ``task_gradients`` and ``metrics`` have no counterpart: mann-edge prunes by
    weight magnitude after training and judges one metric. What differs: a failed step is
    rolled back and retried smaller (``min_step``) instead of ending the task, and each
    step is measured against the dense value instead of the last accepted one (whose
    ``delta`` could add up step after step).

    Example:
        >>> legacy_arguments(delta=0.05, patience=3, pruning_rate=10, max_epochs=50)
        {'tolerance': 0.05, 'metric': 'loss', 'patience': 3, 'step': 10, 'epochs': 50}
    """
    result = {}
    for key, value in arguments.items():
        if key in ("task_gradients", "metrics"):
            continue
        if key not in LEGACY_ARGUMENTS:
            raise ValueError(f"train_model_iteratively has no argument {key!r} that fit_rsn2 takes. "
                             f"Known: {sorted(LEGACY_ARGUMENTS) + ['metrics', 'task_gradients']}")
        if isinstance(value, (list, tuple)) and key != "losses":
            value = dict(enumerate(value))
        result[LEGACY_ARGUMENTS[key]] = value
        if key == "delta":
            result["metric"] = "loss"
    return result


def fit_rsn2(model, data: Mapping, *, sparsity=90, step=10, min_step: float = 2.5, patience=10, tolerance=0.02,
             start=0, epochs=20, final_epochs: int = 10, prune_epochs: int | None = None, batch_size: int = 32,
             learning_rate: float = 1e-3, prune_learning_rate: float | None = None, optimizer="adam", loss="auto",
             metric: str = "accuracy", block_size: int = 1, validation_split=0.2, strategy=None,
             verbose: bool = True, seed: int = 0, deterministic: bool = True, check: bool = True) -> RSN2Report:
    """Trains and prunes every task of a MANN with RSN2, one task after the other.

    For each task in turn: its masked slabs get every position no earlier task holds, it
    trains (``epochs``), then `prune_task` takes it towards ``sparsity`` % of its own
    positions, each step recovered for up to ``patience`` epochs and judged against the
    task's dense validation metric with ``tolerance``; a failed step is rolled back and
    retried smaller, down to ``min_step``. Earlier tasks are protected, so nothing they
    learned is forgotten. At its final masks the task trains ``final_epochs`` more (the
    original trains once more after pruning too). ``sparsity``, ``step``, ``patience``,
    ``tolerance``, ``start``, ``epochs`` and ``validation_split`` take one value for every task
    or a mapping task (name or index) -> value (a task the mapping leaves out gets the
    default); ``loss`` one loss or a list, one per model output. `legacy_arguments` maps the
    original `train_model_iteratively` arguments onto these.

    Args:
        data: task (output name or index) -> ``(x, y)``, ``(x, y, x_val, y_val)`` or a dict
            with those keys; without validation data ``validation_split`` of it is held out.
        prune_epochs: the former name of ``patience`` (used when given).
        prune_learning_rate: the learning rate of the pruning steps and final epochs (default
            ``learning_rate``).
        strategy: an optional ``tf.distribute`` strategy to train under (the model must have
            been built in its scope).
        verbose: print progress and the summary (to stderr).
        seed: seeds every training call; with ``deterministic`` (TensorFlow's op determinism,
            switched on for the whole process) a rerun on the same machine gives the same
            masks and weights; `mann_edge.determinism` says what else to fix for other machines.
        check: before any training, refuse a model that cannot be compacted (`check_model`).

    Returns:
        RSN2Report: per task the validation metric dense vs pruned, the sparsity of its own
        positions, the step that stopped it and why; tasks below target are flagged.

    Raises:
        CompactionError: with ``check``, every layer that cannot be compacted.

    Example:
        >>> report = fit_rsn2(model, {"digits": (x0, y0), "cancer": (x1, y1)}, sparsity=90,
        ...                   tolerance={"cancer": 0.03})
        >>> print(report)
    """
    import contextlib

    if check:
        check_model(model)
    if deterministic:
        enable_determinism()  # the thread count is TensorFlow's to fix before the model was built
    say = (lambda message: print(message, file=sys.stderr, flush=True)) if verbose else (lambda message: None)
    patience = prune_epochs if prune_epochs is not None else patience
    order = [_resolve_task(model, task) for task in data]
    if len(set(order)) != len(order):
        raise ValueError(f"Each task may appear once in `data`. Received tasks {list(data)}")
    names = {index: _task_name(model, index) for index in order}
    prepared = {index: _split(value, seed, _for_task(validation_split, names[index], index, 0.2))
                for index, value in zip(order, data.values())}
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    reports, done = [], []
    with scope:
        for position, index in enumerate(order):
            name = names[index]
            x, y, x_val, y_val = prepared[index]
            settings = {key: _for_task(value, name, index, default) for key, value, default in (
                ("target", sparsity, 90), ("step", step, 10), ("patience", patience, 10),
                ("tolerance", tolerance, 0.02), ("start", start, 0))}
            task_epochs = _for_task(epochs, name, index, 20)
            task_loss = loss[index] if isinstance(loss, (list, tuple)) else loss  # one loss per model output
            slices = _task_mask_slices(model, index, done)
            _open_task_slices(slices)
            say(f"[{position + 1}/{len(order)}] task {name!r}: training dense on its free positions "
                f"({task_epochs} epochs)")
            logs = train_task(model, index, x, y, epochs=task_epochs, batch_size=batch_size, protect=done,
                              loss=task_loss, optimizer=optimizer, learning_rate=learning_rate,
                              metrics=(metric,) if metric != "loss" else (), validation_data=(x_val, y_val), seed=seed)
            say(f"  [{name}] trained: " + ", ".join(f"{k} {v:.4f}" for k, v in logs.items()))
            report = prune_task(model, index, x, y, (x_val, y_val), min_step=min_step, final_epochs=final_epochs,
                                protect=done, block_size=block_size, metric=metric, progress=say,
                                batch_size=batch_size, loss=task_loss, optimizer=optimizer, seed=seed,
                                learning_rate=prune_learning_rate or learning_rate, **settings)
            report.warnings += _coupled_to_later_tasks(model, index, order[position + 1:])
            reports.append(report)
            done.append(index)
    summary = RSN2Report(reports)
    say(str(summary))
    return summary
