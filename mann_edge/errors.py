"""The errors mann-edge raises.

Every message says what was expected, what came, and which file, task, layer
or op is at fault. The command line prints ``str(error)`` as its one-line
report, so a message must stand on its own.
"""

from __future__ import annotations

__all__ = [
    "MannEdgeError",
    "BundleError",
    "LegacyFormatError",
    "CompactionError",
    "TaskError",
    "InputError",
    "ConversionError",
    "ValidationError",
    "OutputExistsError",
]


class MannEdgeError(Exception):
    """Base class of every error mann-edge raises on bad input."""


class BundleError(MannEdgeError):
    """A `.mann` bundle (or its weights file) is missing, truncated, tampered or too new."""


class LegacyFormatError(MannEdgeError):
    """A `.h5` saved by `mann`/`beyondml` cannot be read."""


class CompactionError(MannEdgeError):
    """A Keras model cannot be turned into the compact model."""


class TaskError(MannEdgeError, KeyError):
    """A task name that the model does not have."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InputError(MannEdgeError, ValueError):
    """Inputs that do not match a task's input specs."""


class ConversionError(MannEdgeError):
    """An export to a format failed or is not possible for this model."""


class FormatCannotExpressError(ConversionError):
    """A format cannot hold this model (an op, an activation or a tensor of a layer); other formats may.

    `mann_edge.convert` then writes the formats that can and names this one (a `SkippedFormatWarning`).
    """


class SkippedFormatWarning(UserWarning):
    """`mann_edge.convert` did not write a format that cannot express the model; it wrote the others."""


class ValidationError(MannEdgeError):
    """An exported artifact does not reproduce the compact model's outputs."""


class OutputExistsError(MannEdgeError, FileExistsError):
    """An output would overwrite an existing file (pass ``force``/``--force``)."""
