"""Errors of our own. The CLI turns each into one clear line and an exit code."""

from __future__ import annotations


class OnnxCompressError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 2


class BadModel(OnnxCompressError):
    """The input is not a loadable ONNX model (missing, empty, corrupt, unsafe, unsupported)."""


class BadData(OnnxCompressError):
    """Calibration or validation data is missing, malformed or does not match the model."""


class BadOption(OnnxCompressError):
    """An option's value makes no sense (a NaN or negative tolerance, an unknown output)."""


class BadPath(OnnxCompressError):
    """An output path cannot be written, or would overwrite an input or another output."""


class RecipeError(OnnxCompressError):
    """A recipe names an unknown pass or option, or gives a bad value."""


class CannotRun(OnnxCompressError):
    """onnxruntime cannot create a session for a model (custom ops, unsupported operators)."""


class ToleranceExceeded(OnnxCompressError):
    """The compressed model missed a user's gate; ``report`` holds the measurements."""

    exit_code = 1

    def __init__(self, message: str, report: object = None, model: object = None) -> None:
        super().__init__(message)
        self.report = report
        self.model = model  # the compressed model that missed, for --keep-failed


class PassBrokeGraph(OnnxCompressError):
    """A pass left a graph that fails a check it passed before: a bug in onnxcompress."""

    exit_code = 3


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a
    one-line error quotes of a library's multi-line report."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
