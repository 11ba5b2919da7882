"""Every compression pass, by name."""

from onnxcompress.passes.base import (
    CompressionPass,
    LayerReport,
    PassContext,
    PassReport,
    Skip,
)
from onnxcompress.passes.lowrank import LowRank
from onnxcompress.passes.prune import Prune

PASSES: dict[str, type[CompressionPass]] = {cls.name: cls for cls in (LowRank, Prune)}

__all__ = [
    "PASSES",
    "CompressionPass",
    "LayerReport",
    "LowRank",
    "PassContext",
    "PassReport",
    "Prune",
    "Skip",
]
