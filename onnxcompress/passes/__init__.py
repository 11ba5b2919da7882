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
from onnxcompress.passes.quant import Int4, Qdq

PASSES: dict[str, type[CompressionPass]] = {
    cls.name: cls for cls in (LowRank, Prune, Codebook, Qdq, Int4)
}

__all__ = [
    "PASSES",
    "Codebook",
    "CompressionPass",
    "Int4",
    "LayerReport",
    "LowRank",
    "PassContext",
    "PassReport",
    "Prune",
    "Qdq",
    "Skip",
]
