"""Quantization parameters: per-tensor activation scales and zero points, symmetric int8
weights (per channel or per tensor), and their float values back."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir


@dataclass(frozen=True)
class QParams:
    """Scale and zero point of one per-tensor quantized activation."""

    scale: float
    zero_point: int
    dtype: ir.DataType


def activation_qparams(lo: float, hi: float, dtype: ir.DataType, symmetric: bool) -> QParams:
    """Scale and zero point mapping [lo, hi] (which holds 0) onto the type's 256 levels."""
    if symmetric:
        bound = max(-lo, hi)
        scale = bound / 127.0 if bound > 0 else 1.0
        zero = 128 if dtype == ir.DataType.UINT8 else 0
        return QParams(float(np.float32(scale)), zero, dtype)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    scale = float(np.float32(scale))
    qmin = 0 if dtype == ir.DataType.UINT8 else -128
    zero = int(np.clip(round(qmin - lo / scale), qmin, qmin + 255))
    return QParams(scale, zero, dtype)


def quantize_symmetric(
    array: np.ndarray, axis: int | None, levels: int = 127
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 values and their scales (one per slice along ``axis``, or one)."""
    if axis is None:
        bound = np.array(np.abs(array).max(initial=0.0), np.float32)
        shape = ()
    else:
        moved = np.moveaxis(np.abs(array), axis, 0).reshape(array.shape[axis], -1)
        bound = moved.max(1, initial=0.0).astype(np.float32)
        shape = [1] * array.ndim
        shape[axis] = -1
    scales = np.where(bound > 0, bound / levels, 1.0).astype(np.float32)
    q = np.clip(np.round(array / scales.reshape(shape)), -levels, levels).astype(np.int8)
    return q, scales


def dequantize(q: np.ndarray, scales: np.ndarray, axis: int | None) -> np.ndarray:
    """The float values ``q`` stands for: ``q * scale`` (per slice along ``axis``, or one)."""
    if axis is None:
        return q.astype(np.float32) * scales
    shape = [1] * q.ndim
    shape[axis] = -1
    return q.astype(np.float32) * scales.reshape(shape)


def quantize_with(array: np.ndarray, qparams: QParams) -> np.ndarray:
    """``array`` on the 256 levels of ``qparams`` (clamped), in its integer type."""
    qmin = 0 if qparams.dtype == ir.DataType.UINT8 else -128
    q = np.clip(np.round(array / qparams.scale) + qparams.zero_point, qmin, qmin + 255)
    return q.astype(np.uint8 if qparams.dtype == ir.DataType.UINT8 else np.int8)
