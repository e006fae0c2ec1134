"""The sample MANNs shipped with mann-edge, their accuracy records and the data they were trained on.

Two samples, trained by ``sample_models/train.py`` with RSN2 and saved as Keras 3
``.keras`` files under ``mann_edge/samples_data/`` (package data, so they install
with the package):

- ``vision_tabular``: tasks ``digits`` (8x8x1 images through convolutions) and
  ``cancer`` (30 breast cancer features through dense layers);
- ``vision_text``: tasks ``digits`` and ``sentiment`` (token ids of a generated
  corpus of movie-review sentences, through an Embedding layer).

Beside each model, ``<name>.json`` records each task's test accuracy dense vs
RSN2-pruned and the sparsity reached, ``<name>.calibration.npz`` holds representative
inputs for full-integer int8 (`mann-edge convert --calibration`) and ``<name>.test.npz``
the test split with its labels (`mann-edge convert --eval`), both keyed by the model's
input and output names (`write_sample_sets` writes them from `sample_data`). `sample_data` rebuilds the exact splits
the script trained and tested on (scikit-learn's bundled data and a corpus
generated from a fixed seed; nothing downloads).

Example:
    >>> import keras
    >>> model = keras.models.load_model(sample_path("vision_tabular"))
    >>> data = sample_data("vision_tabular")
    >>> accuracy(model, "digits", data["digits"].x_test, data["digits"].y_test)
    0.98...
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mann_edge.errors import MannEdgeError

__all__ = [
    "SAMPLES",
    "SAMPLES_DIR",
    "SEED",
    "TaskData",
    "sample_path",
    "record_path",
    "sample_record",
    "sample_tasks",
    "sample_data",
    "accuracy",
    "sentiment_corpus",
    "negation_labels",
    "corpus_sha256",
    "tokenize",
    "VOCABULARY",
    "TOKENS",
    "summary_lines",
    "ACCURACY_MARGIN",
    "permuted_digits",
    "TASK_IO",
    "CALIBRATION_EXAMPLES",
    "calibration_path",
    "evaluation_path",
    "calibration_arrays",
    "evaluation_arrays",
    "write_sample_sets",
]

SAMPLES_DIR = Path(__file__).parent / "samples_data"
# sample name -> its tasks, in model output order
SAMPLES: dict[str, tuple[str, ...]] = {
    "vision_tabular": ("digits", "cancer"),
    "vision_text": ("digits", "sentiment"),
    "vision_sequence": ("digits", "sentiment", "negation"),
}
SEED = 0
TEST_SIZE = 0.25  # of each data set, held out for the recorded test accuracy
VAL_SIZE = 0.2  # of the rest, for RSN2's keep-or-roll-back decisions
CORPUS_SIZE = 3000
# Each sample task's model input name and output name (test_samples checks them against the models).
TASK_IO: dict[str, tuple[str, str]] = {
    "digits": ("digits_image", "digits"),
    "cancer": ("cancer_features", "cancer"),
    "sentiment": ("review_tokens", "sentiment"),
    "negation": ("verdict_tokens", "negation"),
}
# Training examples per input kept as calibration data: what the TFLite int8 export reads per task.
CALIBRATION_EXAMPLES = 200
# How far below its dense twin's test accuracy a pruned task may land before its summary flags it.
ACCURACY_MARGIN = 0.01


# -- files ---------------------------------------------------------------------------------------


def _check_name(name: str) -> str:
    if name not in SAMPLES:
        raise MannEdgeError(f"Unknown sample {name!r}. Samples: {sorted(SAMPLES)}")
    return name


def sample_path(name: str) -> Path:
    """Path of the sample model ``name`` (a `.keras` file).

    Example:
        >>> sample_path("vision_text").name
        'vision_text.keras'
    """
    path = SAMPLES_DIR / f"{_check_name(name)}.keras"
    if not path.is_file():
        raise MannEdgeError(f"Sample model {path} is missing; regenerate it with `python sample_models/train.py`")
    return path


def record_path(name: str) -> Path:
    """Path of the accuracy record (JSON) beside the sample model ``name``."""
    return SAMPLES_DIR / f"{_check_name(name)}.json"


def sample_record(name: str) -> dict:
    """The accuracy record of sample ``name``: per task, test accuracy dense vs pruned and sparsity.

    Example:
        >>> sample_record("vision_tabular")["tasks"]["digits"]["test_accuracy_pruned"]
        0.98...
    """
    path = record_path(name)
    if not path.is_file():
        raise MannEdgeError(f"Sample record {path} is missing; regenerate it with `python sample_models/train.py`")
    return json.loads(path.read_text())


def sample_tasks(name: str) -> tuple[str, ...]:
    """The task names of sample ``name``, in model output order."""
    return SAMPLES[_check_name(name)]


def calibration_path(name: str) -> Path:
    """Path of sample ``name``'s calibration data: an ``.npz`` with one array per model input name.

    Example:
        >>> calibration_path("vision_tabular").name
        'vision_tabular.calibration.npz'
    """
    return SAMPLES_DIR / f"{_check_name(name)}.calibration.npz"


def evaluation_path(name: str) -> Path:
    """Path of sample ``name``'s test set: inputs by input name, labels by each task's output name.

    Example:
        >>> evaluation_path("vision_text").name
        'vision_text.test.npz'
    """
    return SAMPLES_DIR / f"{_check_name(name)}.test.npz"


def calibration_arrays(name: str, seed: int = SEED) -> dict[str, np.ndarray]:
    """The first `CALIBRATION_EXAMPLES` training examples of each task, by model input name.

    Training examples, never test ones: the test set stays unseen by every step of an export.

    Example:
        >>> {k: v.shape for k, v in calibration_arrays("vision_tabular").items()}
        {'digits_image': (200, 8, 8, 1), 'cancer_features': (200, 30)}
    """
    return {TASK_IO[task][0]: data.x_train[:CALIBRATION_EXAMPLES] for task, data in sample_data(name, seed).items()}


def evaluation_arrays(name: str, seed: int = SEED) -> dict[str, np.ndarray]:
    """Each task's test split: its inputs by model input name, its labels by its output name.

    Example:
        >>> sorted(evaluation_arrays("vision_tabular"))
        ['cancer', 'cancer_features', 'digits', 'digits_image']
    """
    arrays = {}
    for task, data in sample_data(name, seed).items():
        input_name, output_name = TASK_IO[task]
        arrays[input_name], arrays[output_name] = data.x_test, data.y_test
    return arrays


def write_sample_sets(name: str) -> tuple[Path, Path]:
    """Writes sample ``name``'s calibration and test ``.npz`` files (deterministic); returns their paths.

    Example:
        >>> write_sample_sets("vision_text")[0].name
        'vision_text.calibration.npz'
    """
    paths = calibration_path(name), evaluation_path(name)
    for path, arrays in zip(paths, (calibration_arrays(name), evaluation_arrays(name))):
        np.savez_compressed(path, **arrays)
    return paths


# -- data ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskData:
    """One task's splits: train (what RSN2 trains on), val (what it prunes against), test (held out)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _splits(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, ...]:
    from sklearn.model_selection import train_test_split

    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=TEST_SIZE, random_state=seed, stratify=y)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=VAL_SIZE, random_state=seed, stratify=y_rest
    )
    return x_train, y_train, x_val, y_val, x_test, y_test


def _digits(seed: int) -> TaskData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]  # (n, 8, 8, 1), values in [0, 1]
    return TaskData(*_splits(images, digits.target.astype(np.int32), seed))


def _cancer(seed: int) -> TaskData:
    from sklearn.datasets import load_breast_cancer

    cancer = load_breast_cancer()
    x_train, y_train, x_val, y_val, x_test, y_test = _splits(cancer.data, cancer.target.astype(np.int32), seed)
    # Standardised with the training split's statistics only, so nothing leaks from val/test.
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)

    def scale(x):
        return ((x - mean) / std).astype(np.float32)

    return TaskData(scale(x_train), y_train, scale(x_val), y_val, scale(x_test), y_test)


def _sentiment(seed: int) -> TaskData:
    sentences, labels = sentiment_corpus(CORPUS_SIZE, seed)
    return TaskData(*_splits(tokenize(sentences), np.asarray(labels, np.int32), seed))


def _negation(seed: int) -> TaskData:
    sentences, _ = sentiment_corpus(CORPUS_SIZE, seed)
    return TaskData(*_splits(tokenize(sentences), negation_labels(sentences), seed))


_TASK_DATA = {"digits": _digits, "cancer": _cancer, "sentiment": _sentiment, "negation": _negation}


def permuted_digits(tasks: int = 3, seed: int = SEED) -> list[TaskData]:
    """Digits as ``tasks`` tasks, each with its own fixed permutation of the 64 pixels (task 0 unpermuted).

    The classic continual-learning benchmark (permuted MNIST) at scikit-learn's scale: the
    same labels, a different input layout per task, so one MANN must hold a subnetwork per
    task. Flattened pixels / 16 (float32, ``(n, 64)``), split as the samples are (stratified,
    25 % test, then 20 % of the rest for validation) with ``seed``; permutations from
    ``numpy.random.default_rng(seed + task)``.

    Example:
        >>> [task.x_test.shape for task in permuted_digits(2)]
        [(450, 64), (450, 64)]
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.data / 16.0).astype(np.float32)
    splits = _splits(pixels, digits.target.astype(np.int32), seed)
    result = []
    for task in range(tasks):
        order = np.arange(64) if task == 0 else np.random.default_rng(seed + task).permutation(64)
        x_train, y_train, x_val, y_val, x_test, y_test = splits
        result.append(TaskData(x_train[:, order], y_train, x_val[:, order], y_val, x_test[:, order], y_test))
    return result


def sample_data(name: str, seed: int = SEED) -> dict[str, TaskData]:
    """The exact train/val/test splits sample ``name`` was trained and measured on, per task.

    Deterministic: scikit-learn's bundled data sets and a generated corpus, split with ``seed``.

    Example:
        >>> data = sample_data("vision_text")
        >>> data["sentiment"].x_test.dtype, data["sentiment"].x_test.shape[1]
        (dtype('int32'), 16)
    """
    return {task: _TASK_DATA[task](seed) for task in sample_tasks(name)}


# -- the generated sentiment corpus --------------------------------------------------------------

SUBJECTS = ("the movie", "this film", "the plot", "the acting", "the story", "the ending", "the music",
            "the cast", "the script", "this show")
POSITIVE = ("good", "great", "excellent", "wonderful", "brilliant", "enjoyable", "charming", "superb",
            "moving", "funny")
NEGATIVE = ("bad", "terrible", "awful", "boring", "dull", "poor", "weak", "messy", "tedious", "horrible")
INTENSIFIERS = ("very", "really", "quite", "truly", "so")
NEGATIONS = ("not", "never")
LIKE_VERBS = {"loved": "love", "liked": "like", "enjoyed": "enjoy", "adored": "adore"}
DISLIKE_VERBS = {"hated": "hate", "disliked": "dislike", "loathed": "loathe"}
OPENERS = ("honestly", "overall", "i think", "to be fair", "in the end")
TOKENS = 16  # longest sentence: opener (3) + clause (6) + "but" + clause (6)

VOCABULARY: tuple[str, ...] = ("<pad>", "<unk>") + tuple(sorted(
    {word for phrase in SUBJECTS + POSITIVE + NEGATIVE + INTENSIFIERS + NEGATIONS + OPENERS
     for word in phrase.split()}
    | set(LIKE_VERBS) | set(LIKE_VERBS.values()) | set(DISLIKE_VERBS) | set(DISLIKE_VERBS.values())
    | {"was", "is", "i", "did", "but", "and"}
))


def _clause(rng: random.Random) -> tuple[str, int]:
    """A clause and its polarity (1 positive, 0 negative); a negation flips the polarity of what it negates."""
    subject = rng.choice(SUBJECTS)
    negated = rng.random() < 0.35
    if rng.random() < 0.65:
        polarity = rng.randrange(2)
        adjective = rng.choice(POSITIVE if polarity else NEGATIVE)
        words = [subject, rng.choice(("was", "is"))]
        if negated:
            words.append(rng.choice(NEGATIONS))
        if rng.random() < 0.4:
            words.append(rng.choice(INTENSIFIERS))
        words.append(adjective)
    else:
        polarity = rng.randrange(2)
        verbs = LIKE_VERBS if polarity else DISLIKE_VERBS
        past = rng.choice(sorted(verbs))
        words = ["i", "did", "not", verbs[past], subject] if negated else ["i", past, subject]
    return " ".join(words), polarity ^ int(negated)


def _sentence(rng: random.Random) -> tuple[str, int]:
    opener = [rng.choice(OPENERS)] if rng.random() < 0.3 else []
    first, label = _clause(rng)
    shape = rng.random()
    if shape < 0.5:
        return " ".join(opener + [first]), label
    second, second_label = _clause(rng)
    if shape < 0.8:
        # "X but Y": the clause after "but" is the verdict.
        return " ".join(opener + [first, "but", second]), second_label
    while second_label != label:  # "X and Y" joins clauses that agree
        second, second_label = _clause(rng)
    return " ".join(opener + [first, "and", second]), label


def sentiment_corpus(size: int = CORPUS_SIZE, seed: int = SEED) -> tuple[list[str], list[int]]:
    """``size`` distinct generated review sentences and their labels (1 positive, 0 negative).

    Template sentences from fixed word lists: adjectives and verbs of either polarity,
    negations that flip it ("was not good", "i did not like ..."), intensifiers, openers,
    and two-clause sentences ("... but ..." takes the second clause's verdict). Python's
    `random.Random` with a fixed seed keeps the corpus identical across numpy versions.

    Example:
        >>> sentences, labels = sentiment_corpus(3)
        >>> len(sentences), set(labels) <= {0, 1}
        (3, True)
    """
    rng = random.Random(seed)
    seen: dict[str, int] = {}
    while len(seen) < size:
        sentence, label = _sentence(rng)
        seen.setdefault(sentence, label)
    return list(seen), list(seen.values())


def negation_labels(sentences) -> np.ndarray:
    """Whether each sentence's verdict is negated (1) or not (0): a label that needs word order.

    The verdict is the clause after "but" when there is one, else the whole sentence, so
    "the plot was not good but the music was great" is 0 and "... but i did not like the
    story" is 1: the same words in another order flip it.

    Example:
        >>> negation_labels(["the film was not good but the music was great", "the plot was never dull"]).tolist()
        [0, 1]
    """
    labels = []
    for sentence in sentences:
        words = sentence.split()
        verdict = words[words.index("but") + 1:] if "but" in words else words
        labels.append(int(any(word in NEGATIONS for word in verdict)))
    return np.asarray(labels, np.int32)


def corpus_sha256(size: int = CORPUS_SIZE, seed: int = SEED) -> str:
    """A digest of the generated corpus, recorded beside the model to detect a corpus that changed."""
    sentences, labels = sentiment_corpus(size, seed)
    text = "\n".join(f"{label}\t{sentence}" for sentence, label in zip(sentences, labels))
    return hashlib.sha256(text.encode()).hexdigest()


def tokenize(sentences, length: int = TOKENS) -> np.ndarray:
    """Token ids (int32, ``(n, length)``) by `VOCABULARY`: 0 pads at the end, 1 is an unknown word.

    Example:
        >>> tokenize(["the movie was good"]).shape
        (1, 16)
    """
    index = {word: i for i, word in enumerate(VOCABULARY)}
    ids = np.zeros((len(sentences), length), np.int32)
    for row, sentence in enumerate(sentences):
        words = sentence.split()[:length]
        ids[row, : len(words)] = [index.get(word, 1) for word in words]
    return ids


# -- measuring -----------------------------------------------------------------------------------


def accuracy(model, task: str, x: np.ndarray, y: np.ndarray, *, batch_size: int = 256) -> float:
    """Accuracy of a Keras MANN's output ``task`` on (x, y); the model's other inputs get zeros.

    Example:
        >>> accuracy(model, "cancer", data["cancer"].x_test, data["cancer"].y_test)
        0.97...
    """
    import keras

    from mann_edge.rsn2 import _resolve_task, _task_inputs

    index = _resolve_task(model, task)
    inputs = _task_inputs(model, index, x)()
    outputs = model.predict(inputs, batch_size=batch_size, verbose=0)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    predicted = keras.ops.convert_to_numpy(outputs[index]).argmax(axis=-1)
    return float((predicted == np.asarray(y)).mean())


def summary_lines(record: dict) -> list[str]:
    """Per task of a sample record: test accuracy dense vs pruned, sparsity vs target, why pruning stopped.

    A task below its target sparsity, or more than `ACCURACY_MARGIN` below its dense twin's
    test accuracy, gets a line saying so and what to try.

    Example:
        >>> print("\n".join(summary_lines(sample_record("vision_tabular"))))
    """
    lines = []
    for task, t in record["tasks"].items():
        drop = t["test_accuracy_dense"] - t["test_accuracy_pruned"]
        target = t.get("target_sparsity", record["rsn2"]["sparsity"] / 100)
        lines.append(f"  {task:<10} test accuracy dense {t['test_accuracy_dense']:.3f} -> pruned "
                     f"{t['test_accuracy_pruned']:.3f} ({100 * (t['test_accuracy_pruned'] - t['test_accuracy_dense']):+.1f} "
                     f"points, {t['test_samples']} test samples); "
                     f"{100 * t['sparsity']:.1f}% of its own weights pruned (target {100 * target:.0f}%)")
        if "stopped" in t:
            lines.append(f"  {'':<10} pruning: {t['stopped']}; judged on {t['val_samples']} validation samples, "
                         f"tolerance {t['tolerance']}")
        lines += [f"  ! {warning}" for warning in t.get("warnings", ())]
        if t["sparsity"] < target - 1e-9:
            lines.append(f"  ! {task} is below its target sparsity: retrain with more patience, a larger tolerance "
                         "or more validation data (sample_models/README.md)")
        if drop > ACCURACY_MARGIN + 1e-9:
            lines.append(f"  ! {task} lost {100 * drop:.1f} points of test accuracy to pruning, more than "
                         f"{100 * ACCURACY_MARGIN:.0f}: retrain with a smaller tolerance or more patience")
    return lines
