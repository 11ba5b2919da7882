"""Which axis of a weight holds its output channels, and the weight as channel-first rows.

Codebooks are fitted per output channel (or per group of them): every row ``[C, L]`` of the
channel-first weight gets its own. The decoder rebuilds the weight by reshaping the decoded
rows and transposing back, so the layout is all it needs to know.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxcompress.graph import weight_axes


def channel_axis(value: ir.Value) -> int | None:
    """The output-channel axis of a weight, as every consumer reads it (None when they
    disagree or one gives the weight no channel meaning)."""
    rank = len(value.const_value.shape)
    axes = {weight_axes(node, index, rank).out for node, index in value.uses()}
    return axes.pop() if len(axes) == 1 else None


@dataclass
class ChannelLayout:
    """The weight moved to channel-first and flattened to rows [C, L]."""

    shape: tuple[int, ...]
    axis: int | None
    fallback: bool = False  # per tensor because per-channel codebooks outweigh the indices

    @property
    def perm(self) -> tuple[int, ...]:
        if self.axis is None:
            return tuple(range(len(self.shape)))
        return (self.axis, *(i for i in range(len(self.shape)) if i != self.axis))

    @property
    def transposed(self) -> bool:
        """Whether the channel-first weight is a transpose of the stored one."""
        return self.perm != tuple(range(len(self.perm)))

    @property
    def channel_first_shape(self) -> list[int]:
        return [self.shape[i] for i in self.perm]

    @property
    def channels(self) -> int:
        return self.shape[self.axis] if self.axis is not None else 1

    @property
    def granularity(self) -> str:
        if self.fallback:
            return "tensor (per-channel codebooks would outweigh the indices)"
        return "tensor" if self.axis is None else "channel"

    @property
    def fc_rows(self) -> bool:
        """Rows are output rows over input features (a 2-D fully connected weight)."""
        return self.axis is not None and len(self.shape) == 2

    def rows(self, weight: np.ndarray) -> np.ndarray:
        return weight.transpose(self.perm).reshape(self.channels, -1)

    def weight(self, rows: np.ndarray) -> np.ndarray:
        return rows.reshape(self.channel_first_shape).transpose(np.argsort(self.perm))
