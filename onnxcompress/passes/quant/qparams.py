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


#: An int32 bias is kept within ±2**30, so that the integer kernel's accumulator (the bias
#: plus up to fan-in products of 255 x 127) stays clear of int32 overflow.
BIAS_BOUND = 2.0**30


def bias_scale_floor(bias: np.ndarray, input_scale: float) -> np.ndarray:
    """The smallest weight scale per channel that keeps bias / (s_x * s_w) within BIAS_BOUND.

    Channels that training left dead have weights near 1e-10 and so weight scales near 1e-12;
    their int32 bias would saturate and turn the channel's constant output into garbage. With
    the floor their weights round to zero instead: they contributed nothing measurable."""
    return (np.abs(bias.astype(np.float64)) / (input_scale * BIAS_BOUND)).astype(np.float32)


def quantize_symmetric(
    array: np.ndarray, axis: int | None, levels: int = 127, floor: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 values and their scales (one per slice along ``axis``, or one), each
    scale at least ``floor`` when given."""
    if axis is None:
        bound = np.array(np.abs(array).max(initial=0.0), np.float32)
        shape = ()
    else:
        moved = np.moveaxis(np.abs(array), axis, 0).reshape(array.shape[axis], -1)
        bound = moved.max(1, initial=0.0).astype(np.float32)
        shape = [1] * array.ndim
        shape[axis] = -1
    scales = np.where(bound > 0, bound / levels, 1.0).astype(np.float32)
    if floor is not None:  # one scale for the tensor: the largest channel's floor
        floor = np.max(floor, initial=0.0) if axis is None else floor
        scales = np.maximum(scales, floor).astype(np.float32)
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
