"""int4 blocks in numpy, and the stored operands of every form the int4 pass writes.

A matrix ``[K, N]`` is quantized in blocks of ``block`` rows per column (K is the axis the
blocks run along: the reduction axis of a MatMul weight, the hidden axis of an embedding
table). Every form stores the same 4-bit codes and scales, so they compute the same weight:

- blocked DequantizeLinear (opset 21): int4 (or uint4 with zero points) ``[K, N]`` as is;
- MatMulNBits: codes ``[N, blocks, block/2]``, two a byte, low nibble first;
- GatherBlockQuantized: an embedding table ``[V, H]`` as uint8 ``[V, ceil(H/2)]``, two a byte;
- folded: codes ``[ceil(K/2), N]`` with row i in the low nibble and row i + ceil(K/2) in the
  high one, so that a BitShift of both halves and one Reshape undo it.

Symmetric blocks hold int4 values in [-8, 7] and no zero point; the unsigned code is value + 8
(the zero point MatMulNBits and GatherBlockQuantized assume when none is given).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes  # a dependency of onnx: numpy int4/uint4 types
import numpy as np

#: The unsigned code of a symmetric block's zero.
SYMMETRIC_ZERO = 8


@dataclass
class Int4Blocks:
    """int4 values of a [K, N] matrix quantized in blocks of rows; scales [ceil(K/B), N]."""

    values: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None
    block: int

    @property
    def blocks(self) -> int:
        return self.scales.shape[0]

    def restore(self) -> np.ndarray:
        rows = np.arange(self.values.shape[0]) // self.block
        zero = 0 if self.zeros is None else self.zeros.astype(np.float32)[rows]
        return (self.values.astype(np.float32) - zero) * self.scales[rows]

    @property
    def nbytes(self) -> int:
        """Stored size: two 4-bit values (or zero points) a byte, float32 scales."""
        zeros = 0 if self.zeros is None else math.ceil(self.zeros.size / 2)
        return math.ceil(self.values.size / 2) + self.scales.nbytes + zeros

    def codes(self, padded: bool = False) -> np.ndarray:
        """Unsigned 4-bit codes as uint8 [K, N] ([blocks * block, N] padded with each
        block's zero, which dequantizes to 0)."""
        zero = SYMMETRIC_ZERO if self.zeros is None else 0
        codes = self.values.astype(np.int16) + zero
        if padded and codes.shape[0] % self.block:
            pad = self.blocks * self.block - codes.shape[0]
            fill = self.zero_codes()[-1:]  # the last block's zero, per column
            codes = np.concatenate([codes, np.repeat(fill, pad, 0)])
        return codes.astype(np.uint8)

    def zero_codes(self) -> np.ndarray:
        """Each block's zero point as an unsigned code, uint8 [blocks, N]."""
        if self.zeros is None:
            return np.full(self.scales.shape, SYMMETRIC_ZERO, np.uint8)
        return self.zeros.astype(np.uint8)


def quantize_blocks(matrix: np.ndarray, block: int, symmetric: bool) -> Int4Blocks:
    """Quantize ``matrix`` [K, N] in blocks of ``block`` rows, per column."""
    k = matrix.shape[0]
    padded = np.zeros((math.ceil(k / block) * block, matrix.shape[1]), np.float32)
    padded[:k] = matrix
    grouped = padded.reshape(-1, block, matrix.shape[1])
    rows = np.arange(k) // block
    if symmetric:
        bound = np.abs(grouped).max(1)
        scales = np.where(bound > 0, bound / 7.0, 1.0).astype(np.float32)
        values = np.clip(np.round(matrix / scales[rows]), -8, 7).astype(ml_dtypes.int4)
        return Int4Blocks(values, scales, None, block)
    low, high = np.minimum(grouped.min(1), 0), np.maximum(grouped.max(1), 0)
    scales = np.where(high > low, (high - low) / 15.0, 1.0).astype(np.float32)
    zeros_f = np.clip(np.round(-low / scales), 0, 15)
    values = np.clip(np.round(matrix / scales[rows]) + zeros_f[rows], 0, 15).astype(ml_dtypes.uint4)
    return Int4Blocks(values, scales, zeros_f.astype(ml_dtypes.uint4), block)


@dataclass
class Packed:
    """The stored operands of one form: packed codes, scales, zero points or None."""

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None

    @property
    def nbytes(self) -> int:
        return (
            self.codes.nbytes
            + self.scales.nbytes
            + (0 if self.zeros is None else self.zeros.nbytes)
        )


def matmulnbits_operands(blocks: Int4Blocks) -> Packed:
    """MatMulNBits operands for W [K, N]: B [N, blocks, block/2] uint8, scales [N * blocks],
    zero points [N * ceil(blocks/2)] (two a byte per column) or None when symmetric."""
    n = blocks.values.shape[1]
    per_column = blocks.codes(padded=True).T.reshape(n, blocks.blocks, blocks.block)
    scales = np.ascontiguousarray(blocks.scales.T).reshape(-1)
    zeros = None
    if blocks.zeros is not None:
        zeros = pack_nibbles(_even(blocks.zero_codes().T)).reshape(-1)
    return Packed(pack_nibbles(per_column), scales, zeros)


def gather_operands(blocks: Int4Blocks) -> Packed:
    """GatherBlockQuantized operands (uint8 data, bits=4) for a table [V, H] quantized as
    ``blocks`` of its transpose [H, V]: data [V, ceil(H/2)], scales [V, blocks], zero points
    [V, ceil(blocks/2)] or None when symmetric."""
    rows = _even(blocks.codes().T)
    scales = np.ascontiguousarray(blocks.scales.T)
    zeros = None if blocks.zeros is None else pack_nibbles(_even(blocks.zero_codes().T))
    return Packed(pack_nibbles(rows), scales, zeros)


def folded_operands(blocks: Int4Blocks) -> Packed:
    """The folded form's operands: codes [ceil(K/2), N] (row i low, row i + ceil(K/2) high, a
    zero row after an odd K), scales [blocks, 1, N], zero points as uint8 [blocks, 1, N] or
    None when symmetric."""
    codes = _even(blocks.codes().T).T
    half = codes.shape[0] // 2
    packed = (codes[:half] | (codes[half:] << 4)).astype(np.uint8)
    zeros = None if blocks.zeros is None else blocks.zero_codes()[:, None, :]
    return Packed(packed, blocks.scales[:, None, :], zeros)


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Pairs along the last axis in one byte each, the first in the low nibble."""
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def _even(values: np.ndarray) -> np.ndarray:
    """``values`` with a zero column appended when the last axis is odd (for nibble pairs)."""
    if values.shape[-1] % 2 == 0:
        return values
    return np.concatenate([values, np.zeros((*values.shape[:-1], 1), values.dtype)], -1)
