"""onnxcompress: post-training compression of ONNX models by graph-rewriting passes,
validated against onnxruntime."""

from onnxcompress.calibration import load_feeds, parse_dims, synthetic_feeds
from onnxcompress.errors import (
    BadData,
    BadModel,
    CannotRun,
    OnnxCompressError,
    PassBrokeGraph,
    RecipeError,
    ToleranceExceeded,
)
from onnxcompress.inspection import inspect_model
from onnxcompress.model_io import save
from onnxcompress.optimize import Metric, OptimizeResult, Target, Tolerance, optimize, optimize_file
from onnxcompress.passes import PASSES, CompressionPass, PassContext, PassReport
from onnxcompress.pipeline import Gates, Options, compress
from onnxcompress.recipe import Recipe
from onnxcompress.report import CompressionReport
from onnxcompress.validate import Validation, validate
from onnxcompress.version import __version__


def load(source):
    """Load a model (path, bytes, ModelProto, ir.Model or gs.Graph) as an ``onnx_ir.Model``."""
    from onnxcompress import model_io

    return model_io.load(source).model


__all__ = [
    "PASSES",
    "BadData",
    "BadModel",
    "CannotRun",
    "CompressionPass",
    "CompressionReport",
    "Gates",
    "Metric",
    "OnnxCompressError",
    "OptimizeResult",
    "Options",
    "PassBrokeGraph",
    "PassContext",
    "PassReport",
    "Recipe",
    "RecipeError",
    "Target",
    "Tolerance",
    "ToleranceExceeded",
    "Validation",
    "__version__",
    "compress",
    "inspect_model",
    "load",
    "load_feeds",
    "optimize",
    "optimize_file",
    "parse_dims",
    "save",
    "synthetic_feeds",
    "validate",
]
