"""Every compression pass, by name."""

from onnxcompress.passes.base import (
    CompressionPass,
    LayerReport,
    PassContext,
    PassReport,
    Skip,
)
from onnxcompress.passes.codebook import Codebook
from onnxcompress.passes.lowrank import LowRank
from onnxcompress.passes.prune import Prune

PASSES: dict[str, type[CompressionPass]] = {cls.name: cls for cls in (LowRank, Prune, Codebook)}

__all__ = [
    "PASSES",
    "Codebook",
    "CompressionPass",
    "LayerReport",
    "LowRank",
    "PassContext",
    "PassReport",
    "Prune",
    "Skip",
]
