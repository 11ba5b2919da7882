"""Convolution geometry and im2col: the patches a Conv multiplies its weight with, so a conv can
be treated as a matrix product (Y[pos, O] = patches[pos, C·k] · W[O, C·k]ᵀ) for fitting."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir


@dataclass(frozen=True)
class ConvGeometry:
    """Kernel, strides, dilations and explicit pads of an N-D Conv (pads: begins then ends)."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...] | None  # None: auto_pad SAME_*, resolved per input size
    auto_pad: str = "NOTSET"

    @classmethod
    def of(cls, node: ir.Node, kernel: tuple[int, ...]) -> ConvGeometry:
        rank = len(kernel)
        attrs = node.attributes
        auto_pad = attrs.get_string("auto_pad", "NOTSET")
        pads = tuple(attrs.get_ints("pads", [0] * 2 * rank))
        if auto_pad == "VALID":
            pads = (0,) * 2 * rank
        return cls(
            kernel=tuple(kernel),
            strides=tuple(attrs.get_ints("strides", [1] * rank)),
            dilations=tuple(attrs.get_ints("dilations", [1] * rank)),
            pads=None if auto_pad.startswith("SAME") else pads,
            auto_pad=auto_pad,
        )

    def resolved_pads(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        """Explicit pads for an input of these spatial sizes (auto_pad SAME_* per the spec)."""
        if self.pads is not None:
            return self.pads
        begins, ends = [], []
        for size, k, s, d in zip(spatial, self.kernel, self.strides, self.dilations):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begins.append(small if self.auto_pad == "SAME_UPPER" else large)
            ends.append(large if self.auto_pad == "SAME_UPPER" else small)
        return (*begins, *ends)

    def output_size(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        pads = self.resolved_pads(spatial)
        rank = len(spatial)
        return tuple(
            (size + pads[i] + pads[i + rank] - (k - 1) * d - 1) // s + 1
            for i, (size, k, s, d) in enumerate(
                zip(spatial, self.kernel, self.strides, self.dilations)
            )
        )


def im2col(x: np.ndarray, geometry: ConvGeometry, rows: np.ndarray | None = None) -> np.ndarray:
    """Patches of ``x`` [N, C, *spatial] as rows [N·positions, C·prod(kernel)], in the order
    ``weight.reshape(O, -1)`` uses, so ``im2col(x) @ weight.reshape(O, -1).T`` is the conv.

    ``rows`` (flat indices over N·positions) picks a sample of patches without building the
    others: on large feature maps the full patch matrix would dwarf the activation."""
    rank = x.ndim - 2
    spatial = tuple(x.shape[2:])
    pads = geometry.resolved_pads(spatial)
    padded = np.pad(x, [(0, 0), (0, 0), *((pads[i], pads[i + rank]) for i in range(rank))])
    span = tuple((k - 1) * d + 1 for k, d in zip(geometry.kernel, geometry.dilations))
    windows = np.lib.stride_tricks.sliding_window_view(padded, span, axis=tuple(range(2, 2 + rank)))
    # windows: [N, C, *positions, *span]; keep every stride-th position and dilation-th tap
    positions = tuple(slice(None, None, s) for s in geometry.strides)
    taps = tuple(slice(None, None, d) for d in geometry.dilations)
    windows = windows[(slice(None), slice(None), *positions, *taps)]
    out = geometry.output_size(spatial)
    windows = windows[(slice(None), slice(None), *(slice(0, o) for o in out))]
    # -> [N, *positions, C, *kernel]
    order = (0, *range(2, 2 + rank), 1, *range(2 + rank, 2 + 2 * rank))
    patches = windows.transpose(order)
    width = x.shape[1] * math.prod(geometry.kernel)
    if rows is None:
        return patches.reshape(-1, width)
    return patches[np.unravel_index(rows, patches.shape[: 1 + rank])].reshape(len(rows), width)


def channels_last(y: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """A conv output [N, O, *spatial] as rows [N·positions, O] matching ``im2col`` rows."""
    moved = np.moveaxis(y, 1, -1)
    if rows is None:
        return moved.reshape(-1, y.shape[1])
    return moved[np.unravel_index(rows, moved.shape[:-1])]


def sample_rows(count: int, limit: int, rng: np.random.Generator) -> np.ndarray | None:
    """Sorted indices of at most ``limit`` of ``count`` rows (None: keep them all)."""
    return None if count <= limit else np.sort(rng.choice(count, limit, replace=False))
