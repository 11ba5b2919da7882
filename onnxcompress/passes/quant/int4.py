"""The int4 pass: MatMul/Gemm weights stored as 4-bit integers in blocks along the reduction
axis, one scale (and, asymmetric, one zero point) per block and output column, read through a
blocked DequantizeLinear (opset 21) or onnxruntime's MatMulNBits."""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes  # a dependency of onnx: numpy int4/uint4 types
import numpy as np
import onnx_ir as ir

from onnxcompress.emit import Emitter
from onnxcompress.graph import default_opset, is_constant, values_problem, weight_array, weight_axes
from onnxcompress.passes.base import (
    CompressionPass,
    LayerReport,
    PassContext,
    PassReport,
    Skip,
    check_fields,
    name_matches,
)
from onnxcompress.passes.quant.insert import constant_dq

#: Blocked DequantizeLinear and int4 types exist from opset 21.
BLOCKED_OPSET = 21


class Int4(CompressionPass):
    """MatMul/Gemm weights -> int4 blocks read through blocked DequantizeLinear (or MatMulNBits)."""

    name = "int4"

    @dataclass(frozen=True)
    class Config:
        block_size: int = 32  # weights per scale along the reduction axis (a power of 2, 16-256)
        symmetric: bool = True  # int4 with no zero point, else uint4 with one per block
        matmulnbits: bool = False  # com.microsoft MatMulNBits (onnxruntime) instead of DQ
        exclude: tuple[str, ...] = ()

        def __post_init__(self) -> None:
            check_fields(
                self,
                {"block_size": (lambda v: v in (16, 32, 64, 128, 256), "16, 32, 64, 128 or 256")},
            )

    def required_opset(self, model: ir.Model) -> int | None:
        if self.config.matmulnbits:
            return None
        opset = default_opset(model) or BLOCKED_OPSET
        return BLOCKED_OPSET if opset < BLOCKED_OPSET else None

    @classmethod
    def applies(cls, node: ir.Node) -> bool:
        return node.op_type in ("MatMul", "Gemm") and node.domain in ("", "ai.onnx")

    def run(self, model: ir.Model, ctx: PassContext) -> PassReport:
        report = PassReport(self.name, self.config_dict())
        emitter = Emitter(model, self.name)
        for node in list(model.graph):
            if not self.applies(node):
                continue
            try:
                report.layers.append(self._quantize(emitter, node))
            except Skip as skip:
                report.layers.append(LayerReport.skipped(node, str(skip)))
        return report

    def _quantize(self, emitter: Emitter, node: ir.Node) -> LayerReport:
        cfg = self.config
        weight = _check_weight(node, cfg.exclude)
        array = np.asarray(weight.const_value.numpy(), np.float32)
        axis = weight_axes(node).reduced
        blocks = quantize_blocks(np.moveaxis(array, axis, 0), cfg.block_size, cfg.symmetric)
        restored = np.moveaxis(blocks.restore(), 0, axis)
        if cfg.matmulnbits:
            packed_bytes = self._nbits(emitter, node, array)
        else:
            packed_bytes = self._blocked_dq(emitter, node, blocks, axis)
        form = "MatMulNBits" if cfg.matmulnbits else "DequantizeLinear"
        return LayerReport.rewritten(
            node,
            {"block_size": cfg.block_size, "symmetric": cfg.symmetric, "form": form},
            original=array,
            restored=restored,
            params=(array.size, array.size),
            nbytes=(array.nbytes, packed_bytes),
        )

    def _blocked_dq(self, emitter: Emitter, node: ir.Node, blocks: Int4Blocks, axis: int) -> int:
        """Read the weight through a blocked DequantizeLinear; returns its bytes."""
        values = np.moveaxis(blocks.values, 0, axis)
        scales = np.moveaxis(blocks.scales, 0, axis)
        zeros = None if blocks.zeros is None else np.moveaxis(blocks.zeros, 0, axis)
        dq = constant_dq(
            emitter, node.inputs[1], values, scales, zeros, axis, block=self.config.block_size
        )
        node.replace_input_with(1, dq)
        return blocks.nbytes

    def _nbits(self, emitter: Emitter, node: ir.Node, array: np.ndarray) -> int:
        """Replace the MatMul by a MatMulNBits; returns its operands' bytes."""
        if node.op_type != "MatMul":
            raise Skip("MatMulNBits replaces MatMul only")
        packed, scales, zeros = pack_matmulnbits(
            array, self.config.block_size, self.config.symmetric
        )
        k, n = array.shape
        base = node.inputs[1].name
        inputs = [
            node.inputs[0],
            emitter.constant(f"{base}_q4", packed),
            emitter.constant(f"{base}_scales", scales),
        ]
        if zeros is not None:
            inputs.append(emitter.constant(f"{base}_zero_points", zeros))
        new = emitter.node(
            "MatMulNBits",
            inputs,
            {"K": k, "N": n, "bits": 4, "block_size": self.config.block_size},
            name=f"{node.name or base}.int4",
            domain="com.microsoft",
        )
        graph = emitter.graph
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], [new], [node.outputs[0]], [new.outputs[0]]
        )
        if "com.microsoft" not in graph.opset_imports:
            graph.opset_imports["com.microsoft"] = 1
        return packed.nbytes + scales.nbytes + (0 if zeros is None else zeros.nbytes)


def _check_weight(node: ir.Node, exclude: tuple[str, ...]) -> ir.Value:
    """The node's weight, or Skip with why it is not quantized."""
    if name_matches(node, exclude):
        raise Skip("excluded by name pattern")
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if not is_constant(weight):
        raise Skip("weight is not a constant")
    if len(weight.uses()) > 1:
        raise Skip(f"weight is shared by {len(weight.uses())} uses")
    if weight.dtype != ir.DataType.FLOAT or len(weight.shape or ()) != 2:
        raise Skip("weight is not a 2-D float32 matrix")
    problem = values_problem(weight_array(weight))
    if problem:
        raise Skip(problem)
    return weight


@dataclass
class Int4Blocks:
    """int4 values of a [K, N] matrix quantized in blocks of rows; scales [ceil(K/B), N]."""

    values: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None
    block: int

    def restore(self) -> np.ndarray:
        rows = np.arange(self.values.shape[0]) // self.block
        zero = 0 if self.zeros is None else self.zeros.astype(np.float32)[rows]
        return (self.values.astype(np.float32) - zero) * self.scales[rows]

    @property
    def nbytes(self) -> int:
        """Stored size: two 4-bit values (or zero points) a byte, float32 scales."""
        zeros = 0 if self.zeros is None else math.ceil(self.zeros.size / 2)
        return math.ceil(self.values.size / 2) + self.scales.nbytes + zeros


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


def pack_matmulnbits(
    matrix: np.ndarray, block: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """MatMulNBits operands for W [K, N]: B [N, blocks, block/2] uint8 (two 4-bit values per
    byte, low nibble first), scales [N * blocks], zero points packed the same way."""
    k, n = matrix.shape
    blocks = math.ceil(k / block)
    padded = np.zeros((blocks * block, n), np.float32)
    padded[:k] = matrix
    grouped = padded.T.reshape(n, blocks, block)
    if symmetric:
        bound = np.abs(grouped).max(-1)
        scales = np.where(bound > 0, bound / 7.0, 1.0).astype(np.float32)
        zeros = np.full((n, blocks), 8.0)
    else:
        low, high = np.minimum(grouped.min(-1), 0), np.maximum(grouped.max(-1), 0)
        scales = np.where(high > low, (high - low) / 15.0, 1.0).astype(np.float32)
        zeros = np.clip(np.round(-low / scales), 0, 15)
    q = np.clip(np.round(grouped / scales[..., None]) + zeros[..., None], 0, 15).astype(np.uint8)
    packed = _pack_nibbles(q)
    if symmetric:
        return packed, scales.reshape(-1), None
    zeros_u8 = zeros.astype(np.uint8)
    if blocks % 2:
        zeros_u8 = np.concatenate([zeros_u8, np.zeros((n, 1), np.uint8)], 1)
    return packed, scales.reshape(-1), _pack_nibbles(zeros_u8).reshape(-1)


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Pairs along the last axis in one byte each, the first in the low nibble."""
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)
