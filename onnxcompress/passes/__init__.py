"""Every compression pass, by name."""

from onnxcompress.passes.base import (
    CompressionPass,
    LayerReport,
    PassContext,
    PassReport,
    Skip,
)
from onnxcompress.passes.lowrank import LowRank

PASSES: dict[str, type[CompressionPass]] = {cls.name: cls for cls in (LowRank,)}

__all__ = [
    "PASSES",
    "CompressionPass",
    "LayerReport",
    "LowRank",
    "PassContext",
    "PassReport",
    "Skip",
]
