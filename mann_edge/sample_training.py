"""Training the sample MANNs with RSN2: what `sample_models/train.py` and `mann-edge demo --train` run.

For each sample: a dense twin (same layers, same seed, each task trained on all of
its own slab, nothing pruned) gives the dense test accuracy; then `fit_rsn2`
trains and prunes the sample task by task towards 90 % per task. The record
beside the model holds both test accuracies, RSN2's validation figures and the
sparsity reached per task (of its own positions) and per multitask layer, the
step that stopped each task and why. Data: scikit-learn's bundled digits and
breast cancer sets and a generated sentiment corpus, split as
`mann_edge.samples.sample_data` does (nothing downloads). Seeds are fixed and
TensorFlow runs with op determinism on one thread; with oneDNN limited to AVX2 too
(`mann_edge.determinism.prepare_environment`, which `sample_models/train.py` and
`mann-edge demo --train` call before TensorFlow loads), a rerun writes the same weights
on one core or two, whatever the CPU's newest instruction set (`mann_edge.determinism`).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from mann_edge import determinism, rsn2, samples
from mann_edge.files import atomic_output
from mann_edge.layers import MaskedConv2D, MaskedDense, MultiMaskedConv1D, MultiMaskedDense, SelectorLayer

__all__ = ["build", "build_permuted_digits", "train_dense_twin", "train_sample", "main", "RSN2", "PERMUTED_RSN2"]

HIDDEN = 128
EMBEDDING = 16
# RSN2 settings, the same for every task of every sample (`fit_rsn2` arguments).
RSN2 = {"sparsity": 90, "step": 10, "min_step": 2.5, "patience": 10, "tolerance": 0.02, "final_epochs": 20,
        "epochs": 30, "batch_size": 32, "learning_rate": 1e-3}
INIT = "glorot_uniform"


# -- the models ----------------------------------------------------------------------------------


def digits_branch() -> tuple[keras.KerasTensor, keras.KerasTensor]:
    """8x8x1 digit images -> two convolutions with pooling -> a HIDDEN-wide vector."""
    image = keras.Input((8, 8, 1), name="digits_image")
    # The first convolution (144 weights) stays dense: at 90 % its 16 filters would share 14 weights.
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", kernel_initializer=INIT, name="digits_conv_1")(image)
    x = keras.layers.MaxPooling2D(2, name="digits_pool_1")(x)  # 4x4x16
    x = MaskedConv2D(32, 3, padding="same", activation="relu", kernel_initializer=INIT, name="digits_conv_2")(x)
    x = keras.layers.MaxPooling2D(2, name="digits_pool_2")(x)  # 2x2x32
    x = keras.layers.Flatten(name="digits_flatten")(x)
    return image, MaskedDense(HIDDEN, activation="relu", kernel_initializer=INIT, name="digits_dense")(x)


def cancer_branch() -> tuple[keras.KerasTensor, keras.KerasTensor]:
    """30 standardised features -> a HIDDEN-wide vector."""
    features = keras.Input((30,), name="cancer_features")
    return features, MaskedDense(HIDDEN, activation="relu", kernel_initializer=INIT, name="cancer_dense")(features)


def sentiment_branch() -> tuple[keras.KerasTensor, keras.KerasTensor]:
    """Token ids -> embedding -> flattened (word order matters: negations) -> a HIDDEN-wide vector."""
    tokens = keras.Input((samples.TOKENS,), dtype="int32", name="review_tokens")
    x = keras.layers.Embedding(len(samples.VOCABULARY), EMBEDDING, name="embedding")(tokens)
    x = keras.layers.Flatten(name="review_flatten")(x)
    return tokens, MaskedDense(HIDDEN, activation="relu", kernel_initializer=INIT, name="review_dense")(x)


def sequence_branches() -> tuple[list, list]:
    """Two text tasks on the same sentences, as in the original packages' image + text example.

    Token ids -> one embedding -> a MultiMaskedConv1D (a slab per task) -> sentiment: global max
    pooling; negation (is the verdict clause negated? word order decides): a small transformer
    block (two-head self-attention, residual, layer norm), then global average pooling.
    """
    inputs = [keras.Input((samples.TOKENS,), dtype="int32", name=samples.TASK_IO[task][0])
              for task in ("sentiment", "negation")]
    embedding = keras.layers.Embedding(len(samples.VOCABULARY), EMBEDDING, name="embedding")
    sentiment, negation = MultiMaskedConv1D(32, 3, padding="same", activation="relu", kernel_initializer=INIT,
                                            name="text_conv")([embedding(x) for x in inputs])
    sentiment = keras.layers.GlobalMaxPooling1D(name="review_pool")(sentiment)
    attended = keras.layers.MultiHeadAttention(2, 8, name="verdict_attention")(negation, negation)
    negation = keras.layers.LayerNormalization(name="verdict_norm")(keras.layers.Add(name="verdict_residual")(
        [negation, attended]))
    negation = keras.layers.GlobalAveragePooling1D(name="verdict_pool")(negation)
    features = [MaskedDense(HIDDEN, activation="relu", kernel_initializer=INIT, name=f"{task}_dense")(x)
                for task, x in (("review", sentiment), ("verdict", negation))]
    return inputs, features


BRANCHES = {"digits": digits_branch, "cancer": cancer_branch, "sentiment": sentiment_branch}
# Branches that serve several tasks at once (a multitask layer inside), by the tasks they serve.
SHARED_BRANCHES = {("sentiment", "negation"): sequence_branches}
CLASSES = {"digits": 10, "cancer": 2, "sentiment": 2, "negation": 2}
DATA = {
    "digits": "sklearn.datasets.load_digits, images / 16 as (8, 8, 1)",
    "cancer": "sklearn.datasets.load_breast_cancer, standardised with the train split's mean and std",
    "sentiment": f"generated: mann_edge.samples.sentiment_corpus({samples.CORPUS_SIZE}, seed={samples.SEED})",
    "negation": "the sentiment corpus, labelled by mann_edge.samples.negation_labels",
}


def build(name: str, seed: int = samples.SEED) -> keras.Model:
    """The sample's MANN: one branch per task into two shared MultiMaskedDense layers, one head per task."""
    keras.utils.set_random_seed(seed)
    tasks = samples.sample_tasks(name)
    inputs, features = [], []
    for group in _branch_groups(tasks):
        if len(group) == 1:
            x, feature = BRANCHES[group[0]]()
            inputs.append(x)
            features.append(feature)
        else:
            group_inputs, group_features = SHARED_BRANCHES[group]()
            inputs += group_inputs
            features += group_features
    h = MultiMaskedDense(HIDDEN, activation="relu", kernel_initializer=INIT, name="shared_1")(features)
    h = MultiMaskedDense(HIDDEN, activation="relu", kernel_initializer=INIT, name="shared_2")(h)
    outputs = [
        MaskedDense(CLASSES[task], activation="softmax", kernel_initializer=INIT, name=task)(
            SelectorLayer(i, name=f"select_{task}")(h)
        )
        for i, task in enumerate(tasks)
    ]
    return keras.Model(list(inputs), outputs, name=name)


def _branch_groups(tasks) -> list[tuple[str, ...]]:
    """``tasks`` in order, the ones a shared branch serves grouped together (consecutive in the sample)."""
    groups, position = [], 0
    while position < len(tasks):
        shared = next((g for g in SHARED_BRANCHES if tuple(tasks[position:position + len(g)]) == g), None)
        group = shared or (tasks[position],)
        groups.append(group)
        position += len(group)
    return groups


def build_permuted_digits(tasks: int = 3, hidden: int = 256, seed: int = samples.SEED) -> keras.Model:
    """A MANN for `samples.permuted_digits`: per task, 64 pixels into its own dense layer; two shared MultiMaskedDense.

    Then one softmax head per task. An MLP, since a permutation leaves no image to convolve.

    Example:
        >>> model = build_permuted_digits(3)
        >>> model.output_names
        ['permutation_0', 'permutation_1', 'permutation_2']
    """
    keras.utils.set_random_seed(seed)
    names = [f"permutation_{task}" for task in range(tasks)]
    inputs = [keras.Input((64,), name=f"{name}_pixels") for name in names]
    features = [MaskedDense(hidden, activation="relu", kernel_initializer=INIT, name=f"{name}_dense")(x)
                for name, x in zip(names, inputs)]
    h = MultiMaskedDense(hidden, activation="relu", kernel_initializer=INIT, name="shared_1")(features)
    h = MultiMaskedDense(hidden, activation="relu", kernel_initializer=INIT, name="shared_2")(h)
    outputs = [MaskedDense(10, activation="softmax", kernel_initializer=INIT, name=name)(SelectorLayer(i)(h))
               for i, name in enumerate(names)]
    return keras.Model(inputs, outputs, name="permuted_digits")


# RSN2 settings of the permuted-digits MANN (tests/test_rsn2.py, benchmarks/rsn2_three_tasks.py).
PERMUTED_RSN2 = {"sparsity": 90, "step": 10, "min_step": 2.5, "patience": 10, "tolerance": 0.02, "final_epochs": 10,
                 "epochs": 20, "batch_size": 32, "learning_rate": 1e-3}


# -- training and measuring ----------------------------------------------------------------------


def train_dense_twin(model: keras.Model, data: dict, *, epochs: int, batch_size: int, learning_rate: float,
                     seed: int = samples.SEED) -> keras.Model:
    """Trains every task of ``model`` (task -> TaskData, in output order) on its own full slabs, nothing pruned.

    The accuracy RSN2 is compared with: the same model and epochs as RSN2's dense phase.

    Example:
        >>> model = build_permuted_digits(3)
        >>> data = dict(zip(model.output_names, samples.permuted_digits(3)))
        >>> dense = train_dense_twin(model, data, epochs=20, batch_size=32, learning_rate=1e-3)
    """
    done = []
    for task, d in data.items():
        rsn2.train_task(model, task, d.x_train, d.y_train, epochs=epochs, batch_size=batch_size,
                        learning_rate=learning_rate, protect=done, seed=seed)
        done.append(task)
    return model


def train_dense(name: str, data: dict) -> keras.Model:
    """The dense twin: each task trains on its own full slabs, nothing pruned (the accuracy to compare with)."""
    return train_dense_twin(build(name), {task: data[task] for task in samples.sample_tasks(name)},
                            epochs=RSN2["epochs"], batch_size=RSN2["batch_size"], learning_rate=RSN2["learning_rate"])


def multitask_sparsity(model: keras.Model, tasks) -> dict:
    """Per task, per multitask layer it owns a slab of: the fraction of that slab's kernel that is pruned."""
    from mann_edge.compaction import task_usage

    layers = {layer.name: layer for layer in model.layers}
    result = {task: {} for task in tasks}
    for task, usage in zip(tasks, task_usage(model)):
        for name, slab in sorted(usage.layers, key=str):
            if slab is not None and getattr(layers[name], "masked", False):
                result[task][name] = float(1.0 - layers[name].get_masks()[0][slab].mean())
    return result


def save_keras(model: keras.Model, path: Path, force: bool) -> None:
    # Keras picks the format from the file name, so save under the final name in a scratch
    # directory, then move it into place atomically.
    with atomic_output(path, force=force) as tmp, tempfile.TemporaryDirectory() as scratch:
        staged = Path(scratch) / path.name
        model.save(staged)
        shutil.copyfile(staged, tmp)


def train_sample(name: str, out_dir: Path, *, force: bool = False) -> dict:
    """Trains sample ``name``, writes ``<name>.keras`` and ``<name>.json`` into ``out_dir``; returns the record."""
    model_path, record_path = out_dir / f"{name}.keras", out_dir / f"{name}.json"
    for path in (model_path, record_path):
        if path.exists() and not force:
            raise SystemExit(f"{path} already exists; pass --force to retrain and overwrite it")
    tasks = samples.sample_tasks(name)
    data = samples.sample_data(name)
    # Before the first model is built (the thread count can be fixed only then) and before the dense twin,
    # so both runs repeat bit for bit; `determinism` says what else decides the bits.
    conditions = determinism.enable(threads=1)
    start = time.perf_counter()

    print(f"== {name}: dense twin", file=sys.stderr, flush=True)
    dense = train_dense(name, data)
    dense_accuracy = {task: samples.accuracy(dense, task, data[task].x_test, data[task].y_test) for task in tasks}

    print(f"== {name}: RSN2", file=sys.stderr, flush=True)
    model = build(name)
    report = rsn2.fit_rsn2(
        model,
        {task: (data[task].x_train, data[task].y_train, data[task].x_val, data[task].y_val) for task in tasks},
        **RSN2, seed=samples.SEED,
    )
    seconds = time.perf_counter() - start
    pruned_accuracy = {task: samples.accuracy(model, task, data[task].x_test, data[task].y_test) for task in tasks}
    layer_sparsity = multitask_sparsity(model, tasks)

    record = {
        "sample": name,
        "model": model_path.name,
        "tasks": {
            task: {
                "test_samples": int(len(data[task].y_test)),
                "test_accuracy_dense": dense_accuracy[task],
                "test_accuracy_pruned": pruned_accuracy[task],
                "val_samples": int(t.validation_samples),
                "val_accuracy_dense": float(t.dense),
                "val_accuracy_pruned": float(t.pruned),
                "tolerance": t.tolerance,
                "target_sparsity": float(t.target) / 100,
                "sparsity": float(t.sparsity) / 100,  # of the task's own masked kernel positions
                "stopped": t.stopped,
                "steps": [[s.start, s.sparsity, s.epochs, round(s.value, 6), s.kept] for s in t.steps],
                "multitask_sparsity": layer_sparsity[task],  # of the whole slab, positions of other tasks included
                "layer_sparsity": {layer: float(value) / 100 for layer, value in t.layers.items()},
                "warnings": list(t.warnings),
            }
            for task, t in zip(tasks, report.tasks)
        },
        "data": {**{task: DATA[task] for task in tasks},
                 "split": f"stratified: test {samples.TEST_SIZE} of all, val {samples.VAL_SIZE} of the rest, "
                          f"random_state={samples.SEED} (mann_edge.samples.sample_data)"},
        "rsn2": dict(RSN2),
        "seed": samples.SEED,
        "determinism": conditions,  # op determinism, fixed threads, oneDNN's ISA (mann_edge.determinism)
        "train_seconds": round(seconds, 1),
        "versions": {"keras": keras.__version__, "tensorflow": tf.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
    }
    if {"sentiment", "negation"} & set(tasks):
        record["corpus_sha256"] = samples.corpus_sha256()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_keras(model, model_path, force)
    with atomic_output(record_path, force=force) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    print(f"== {name}: {seconds:.0f} s, {model_path.stat().st_size / 1e6:.2f} MB", file=sys.stderr, flush=True)
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(samples.SAMPLES), action="append", help="train only this sample")
    parser.add_argument("--out", type=Path, default=samples.SAMPLES_DIR, help="output directory")
    parser.add_argument("--force", action="store_true", help="overwrite existing samples")
    args = parser.parse_args(argv)
    for name in args.only or list(samples.SAMPLES):
        record = train_sample(name, args.out, force=args.force)
        print("\n".join(samples.summary_lines(record)), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
