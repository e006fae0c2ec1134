"""RSN2 ("Reduction of Sub-Network Neuroplasticity"): masking, per-task training and iterative pruning.

- `mask_model` has the original packages' meaning and signature: per masked
  layer, per task slab, prune the lowest ``percentile`` % by |weight| or
  |gradient|; with ``exclusive=True`` later tasks never get a position an earlier
  task holds. Selection is by rank, not by a ``>=`` threshold, so exact zeros and
  ties cannot let extra (or already used) positions through.
- `train_task` trains one task so that no other (protected) task's weights or
  outputs change by a single bit: layers it does not own are frozen, and a
  constraint puts every frozen or pruned position back after each optimizer step.
- `prune_task` prunes one task in steps while its validation metric holds, and
  rolls back the step that broke it.
- `fit_rsn2` does all of it for every task in one call, with progress and a summary.

Training runs on Keras's TensorFlow backend, also under a `tf.distribute` strategy scope.

Example:
    >>> report = fit_rsn2(model, {"digits": (x0, y0), "cancer": (x1, y1)}, sparsity=90)
    >>> print(report)
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import keras
import numpy as np

from mann_edge.compaction import task_usage

__all__ = ["mask_model", "select_mask", "train_task", "prune_task", "fit_rsn2", "TaskReport", "RSN2Report", "sparsity_of"]


# -- choosing masks ------------------------------------------------------------------------------


def select_mask(
    scores: np.ndarray, percentile: float, available: np.ndarray | None = None, block_size: int = 1
) -> np.ndarray:
    """A 0/1 mask keeping the highest-scoring ``100 - percentile`` % (rounded down) of the positions of ``scores``.

    The count kept is taken of the whole slice, as in the original; only ``available``
    positions (default: all) can be kept. With ``block_size > 1`` the first axis of a
    (inputs, outputs) kernel is cut into blocks of that many consecutive inputs, scored by
    their summed |score|, and kept or pruned whole (TFLite's 1x4 sparse blocks).

    Example:
        >>> select_mask(np.array([0.1, 0.5, 0.0, 0.9]), 50)
        array([0., 1., 0., 1.], dtype=float32)
    """
    if not 0 <= percentile <= 100:
        raise ValueError(f"`percentile` must be between 0 and 100. Received: percentile={percentile}")
    scores = np.abs(np.asarray(scores, dtype=np.float64))
    available = np.ones(scores.shape, bool) if available is None else np.asarray(available, bool)
    if block_size > 1:
        return _select_blocks(scores, percentile, available, block_size)
    # At least `percentile` % is pruned (ceil), so a reported sparsity never falls short of the one asked.
    keep = min(scores.size - math.ceil(round(scores.size * percentile / 100, 6)), int(available.sum()))
    flat_scores, flat_available = scores.ravel(), available.ravel()
    candidates = np.flatnonzero(flat_available)
    # Stable order: among equal scores the first positions win, so results are reproducible.
    chosen = candidates[np.argsort(-flat_scores[candidates], kind="stable")[:keep]]
    mask = np.zeros(scores.size, np.float32)
    mask[chosen] = 1.0
    return mask.reshape(scores.shape)


def _select_blocks(scores, percentile, available, block_size):
    if scores.ndim != 2:
        raise ValueError(f"Block masks need a 2-D (inputs, outputs) kernel. Received shape {scores.shape}")
    inputs, outputs = scores.shape
    blocks = -(-inputs // block_size)
    pad = blocks * block_size - inputs
    padded_scores = np.pad(scores, [(0, pad), (0, 0)]).reshape(blocks, block_size, outputs)
    padded_available = np.pad(available, [(0, pad), (0, 0)], constant_values=True).reshape(blocks, block_size, outputs)
    block_mask = select_mask(padded_scores.sum(axis=1), percentile, padded_available.all(axis=1))
    return np.repeat(block_mask, block_size, axis=0)[:inputs]


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
               *, loss=None, block_size: int = 1):
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

    Returns:
        The model, masked in place.

    Example:
        >>> mask_model(model, 90, method="magnitude")
    """
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
    """After each optimizer step: positions outside ``keep`` go back to their frozen values."""

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
    """For each trainable variable of the model: the 0/1 array of positions task ``task`` may change."""
    usage = task_usage(model)
    mine, protected = usage[task].layers, set().union(*(usage[p].layers for p in protect)) if protect else set()
    masks = {id(w.variable): w.mask for w in _masked_weights(model)}
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
            if id(variable) in masks:
                keep *= _to_numpy(masks[id(variable)])
            result.append((layer, variable, keep))
    return result


class _Ownership:
    """Within a ``with`` block, only task ``task``'s own positions can train."""

    def __init__(self, model, task: int, protect: Sequence[int]):
        self.model, self.task, self.protect = model, task, protect

    def __enter__(self):
        self.saved_trainable = {layer.name: layer.trainable for layer in self.model.layers}
        self.saved_constraints = []
        owned = _ownership(self.model, self.task, self.protect)
        trainable_layers = {layer.name for layer, _, keep in owned if keep.any()}
        for layer in self.model.layers:
            if layer.trainable_weights and layer.name not in trainable_layers:
                layer.trainable = False  # also puts BatchNormalization in inference mode
        for layer, variable, keep in owned:
            if layer.name in trainable_layers:
                frozen = _to_numpy(variable) * (1.0 - keep)
                self.saved_constraints.append((variable, variable.constraint))
                variable.constraint = _TaskConstraint(keep, frozen.astype(np.float32))
        return self

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


def train_task(model, task, x, y, *, epochs: int = 10, batch_size: int = 32, protect: Sequence | None = None,
               loss="auto", optimizer="adam", learning_rate: float = 1e-3, metrics=("accuracy",),
               validation_data=None, verbose: int = 0, seed: int | None = 0) -> dict:
    """Trains one task; no protected task's weights or outputs change (bit for bit).

    Args:
        model: the MANN (functional Keras model); task: output name or index.
        x: the task's input(s): an array, a list (in the task's input order) or a dict by input name.
        y: targets (integer labels or one-hot).
        protect: tasks (names or indices) whose weights must not change; default every other task.
            A layer shared with a protected task is frozen.
        validation_data: optional (x_val, y_val) in the same form.

    Returns:
        The final epoch's logs (loss, metrics, val_ metrics).

    Example:
        >>> train_task(model, "digits", x_digits, y_digits, epochs=5)
    """
    index = _resolve_task(model, task)
    protect = [i for i in range(len(model.outputs)) if i != index] if protect is None else \
        [_resolve_task(model, p) for p in protect if _resolve_task(model, p) != index]
    inputs = _task_inputs(model, index, x)
    val = None
    if validation_data is not None:
        val_inputs = _task_inputs(model, index, validation_data[0])
        val = (val_inputs(), np.asarray(validation_data[1]))
    if seed is not None:
        keras.utils.set_random_seed(seed)
    with _Ownership(model, index, protect):
        sub = _compiled_task_model(model, index, loss, optimizer, learning_rate, metrics, np.asarray(y))
        history = sub.fit(inputs(), np.asarray(y), epochs=epochs, batch_size=batch_size, validation_data=val,
                          verbose=verbose, shuffle=True)
    return {k: float(v[-1]) for k, v in history.history.items()}


def evaluate_task(model, task, x, y, *, loss="auto", metrics=("accuracy",), batch_size: int = 256) -> dict:
    """Loss and metrics of one task on (x, y)."""
    index = _resolve_task(model, task)
    sub = _compiled_task_model(model, index, loss, "adam", 1e-3, metrics, np.asarray(y))
    return sub.evaluate(_task_inputs(model, index, x)(), np.asarray(y), batch_size=batch_size, verbose=0, return_dict=True)


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
    """Masks each of the task's slices at ``percentile`` by weight magnitude, within its free positions."""
    for weight, slab, held in slices:
        mask = _to_numpy(weight.mask).copy()
        values = _to_numpy(weight.variable)
        block = block_size if weight.blockable else 1
        if slab is None:
            mask = select_mask(values, percentile, None, block)
        else:
            mask[slab] = select_mask(values[slab], percentile, ~held, block)
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


@dataclass
class TaskReport:
    """What RSN2 did to one task."""

    task: str
    metric: str
    dense: float
    pruned: float
    sparsity: float  # % of the task's maskable kernel positions pruned
    layers: dict = field(default_factory=dict)  # layer (or layer[slab]) -> % pruned
    steps: list = field(default_factory=list)  # (sparsity, metric, kept)


@dataclass
class RSN2Report:
    """Per-task summary of `fit_rsn2`; ``str()`` is a table."""

    tasks: list

    def __str__(self) -> str:
        lines = [f"{'task':<16} {'metric':<10} {'dense':>8} {'pruned':>8} {'sparsity':>9}"]
        for t in self.tasks:
            lines.append(f"{t.task:<16} {t.metric:<10} {t.dense:>8.4f} {t.pruned:>8.4f} {t.sparsity:>8.1f}%")
            for layer, value in t.layers.items():
                lines.append(f"    {layer:<40} {value:>6.1f}% pruned")
        return "\n".join(lines)


def _task_sparsity(slices) -> tuple[float, dict]:
    per_layer, total, pruned = {}, 0, 0
    for weight, slab, _ in slices:
        if weight.role != "kernel":
            continue
        mask = _to_numpy(weight.mask)
        mask = mask if slab is None else mask[slab]
        name = weight.layer.name if slab is None else f"{weight.layer.name}[{slab}]"
        per_layer[name] = 100.0 * (1 - mask.mean())
        total += mask.size
        pruned += int(mask.size - mask.sum())
    return (100.0 * pruned / total if total else 0.0), per_layer


def prune_task(model, task, x, y, validation_data, *, step: float = 10, max_sparsity: float = 90,
               tolerance: float = 0.02, epochs: int = 3, protect: Sequence | None = None, block_size: int = 1,
               metric: str = "accuracy", progress: Callable[[str], None] | None = None, **train_args) -> TaskReport:
    """Prunes one task in steps of ``step`` points while its validation ``metric`` stays within ``tolerance`` of its best.

    The best is the task's metric before this pruning (its dense value): measuring each
    step against it, rather than against the highest value seen so far, keeps the noise
    of a small validation set from raising the bar. After each step the task retrains for
    ``epochs``. The step that drops the metric below ``best - tolerance`` is rolled back
    (weights and masks) and pruning stops; otherwise it stops at ``max_sparsity``.

    Example:
        >>> report = prune_task(model, "digits", x, y, (x_val, y_val), max_sparsity=90)
        >>> report.sparsity, report.pruned
    """
    index = _resolve_task(model, task)
    name = _task_name(model, index)
    protect_idx = [i for i in range(len(model.outputs)) if i != index] if protect is None else \
        [_resolve_task(model, p) for p in protect if _resolve_task(model, p) != index]
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
    train_args = dict(train_args, protect=protect_idx, metrics=(metric,) if metric != "loss" else ())

    def score() -> float:
        logs = evaluate_task(model, index, *validation_data, loss=train_args.get("loss", "auto"),
                             metrics=train_args["metrics"])
        if metric == "loss":
            return -logs["loss"]
        if metric not in logs:
            raise ValueError(f"Metric {metric!r} is not among the evaluated ones: {sorted(logs)}")
        return logs[metric]

    best = score()
    steps = []
    targets = [min(max_sparsity, step * k) for k in range(1, math.ceil(max_sparsity / step) + 1)]
    for target in targets:
        snapshot = [(w.variable, _to_numpy(w.variable), w.mask, _to_numpy(w.mask)) for w, _, _ in slices]
        _set_task_sparsity(model, slices, target, block_size)
        train_task(model, index, x, y, epochs=epochs, **train_args)
        value = score()
        kept = value >= best - tolerance
        steps.append((target, value, kept))
        say(f"  [{name}] sparsity {target:5.1f}%  val {metric} {value:.4f}  (dense {best:.4f})  "
            f"{'kept' if kept else 'rolled back'}")
        if not kept:
            for variable, value_before, mask, mask_before in snapshot:
                mask.assign(mask_before)
                variable.assign(value_before)
            break
    sparsity, per_layer = _task_sparsity(slices)
    return TaskReport(name, metric, best, score(), sparsity, per_layer, steps)


def _task_name(model, index: int) -> str:
    names = list(getattr(model, "output_names", None) or [])
    return names[index] if index < len(names) else f"task{index}"


# -- everything in one call ----------------------------------------------------------------------


def _split(data, seed: int):
    """(x, y, x_val, y_val) from a tuple/dict; without validation data, 20% of the training data."""
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
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(len(y) * 0.8)
    train, val = order[:cut], order[cut:]

    def take(value, idx):
        if isinstance(value, Mapping):
            return {k: np.asarray(v)[idx] for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [np.asarray(v)[idx] for v in value]
        return np.asarray(value)[idx]

    return take(x, train), y[train], take(x, val), y[val]


def fit_rsn2(model, data: Mapping, *, sparsity: float = 90, step: float = 10, tolerance: float = 0.02,
             epochs: int = 20, prune_epochs: int = 3, batch_size: int = 32, learning_rate: float = 1e-3,
             loss="auto", metric: str = "accuracy", block_size: int = 1, strategy=None, verbose: bool = True,
             seed: int = 0) -> RSN2Report:
    """Trains and prunes every task of a MANN with RSN2, one task after the other.

    For each task in turn: its masked slabs get every position no earlier task holds,
    it trains (``epochs``), then `prune_task` takes it towards ``sparsity`` in steps of
    ``step`` while validation ``metric`` stays within ``tolerance``. Earlier tasks are
    protected, so nothing they learned is forgotten.

    Args:
        data: task (output name or index) -> ``(x, y)``, ``(x, y, x_val, y_val)`` or a dict
            with those keys; without validation data 20% of the training data is held out.
        strategy: an optional ``tf.distribute`` strategy to train under (the model must have
            been built in its scope).
        verbose: print progress and the summary.

    Returns:
        RSN2Report: per task the metric dense vs pruned, the sparsity reached, per layer.

    Example:
        >>> report = fit_rsn2(model, {"digits": (x0, y0), "cancer": (x1, y1)}, sparsity=90)
        >>> print(report)
    """
    import contextlib

    say = (lambda message: print(message, file=sys.stderr, flush=True)) if verbose else (lambda message: None)
    order = [_resolve_task(model, task) for task in data]
    prepared = {index: _split(value, seed) for index, value in zip(order, data.values())}
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    reports, done = [], []
    with scope:
        for position, index in enumerate(order):
            name = _task_name(model, index)
            x, y, x_val, y_val = prepared[index]
            slices = _task_mask_slices(model, index, done)
            _open_task_slices(slices)
            say(f"[{position + 1}/{len(order)}] task {name!r}: training dense on its free positions ({epochs} epochs)")
            logs = train_task(model, index, x, y, epochs=epochs, batch_size=batch_size, protect=done, loss=loss,
                              learning_rate=learning_rate, metrics=(metric,) if metric != "loss" else (),
                              validation_data=(x_val, y_val), seed=seed)
            say(f"  [{name}] trained: " + ", ".join(f"{k} {v:.4f}" for k, v in logs.items()))
            report = prune_task(model, index, x, y, (x_val, y_val), step=step, max_sparsity=sparsity,
                                tolerance=tolerance, epochs=prune_epochs, protect=done, block_size=block_size,
                                metric=metric, progress=say, batch_size=batch_size, loss=loss,
                                learning_rate=learning_rate, seed=seed)
            reports.append(report)
            done.append(index)
    summary = RSN2Report(reports)
    say(str(summary))
    return summary
