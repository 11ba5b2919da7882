"""Every compression pass, by name."""

from onnxcompress.passes.base import (
    CompressionPass,
    LayerReport,
    PassContext,
    PassReport,
    Skip,
)
from onnxcompress.passes.lowrank import LowRank
from onnxcompress.passes.qdq import Int4, Qdq

PASSES: dict[str, type[CompressionPass]] = {cls.name: cls for cls in (LowRank, Qdq, Int4)}

__all__ = [
    "PASSES",
    "CompressionPass",
    "Int4",
    "LayerReport",
    "LowRank",
    "PassContext",
    "PassReport",
    "Qdq",
    "Skip",
]
