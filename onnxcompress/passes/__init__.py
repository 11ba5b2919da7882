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

PASSES: dict[str, type[CompressionPass]] = {cls.name: cls for cls in (LowRank, Codebook)}

__all__ = [
    "PASSES",
    "Codebook",
    "CompressionPass",
    "LayerReport",
    "LowRank",
    "PassContext",
    "PassReport",
    "Skip",
]
