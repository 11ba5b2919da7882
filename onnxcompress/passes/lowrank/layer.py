"""The layer behind a Gemm/MatMul/Conv/ConvTranspose node as lowrank sees it: ``y = M·x + b``
with ``M`` [O, D], ``x`` a row (Gemm/MatMul) or an im2col patch (Conv)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxcompress.conv import ConvGeometry
from onnxcompress.graph import Shapes, values_problem, weight_array, weight_problem
from onnxcompress.passes.base import Skip

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)


@dataclass
class Layer:
    """A candidate seen as y = matrix·x + bias, x a row (Gemm/MatMul) or a patch (Conv)."""

    node: ir.Node
    weight: np.ndarray  # as stored
    matrix: np.ndarray  # [O, D], float64
    bias: np.ndarray | None  # effective per-output bias; None when it is not per-output
    geometry: ConvGeometry | None = None

    @property
    def kind(self) -> str:
        return self.node.op_type

    @property
    def is_conv(self) -> bool:
        return self.kind in ("Conv", "ConvTranspose")

    def macs(self, positions: int, in_positions: int | None) -> int:
        """MACs at these output rows (a ConvTranspose works per input position)."""
        rows = in_positions if self.kind == "ConvTranspose" else positions
        return self.matrix.size * (rows or positions)

    def positions(self, shapes: Shapes, inputs: bool = False) -> int | None:
        """Rows the layer multiplies: output positions (conv) or rows (Gemm/MatMul), if
        known; with ``inputs``, the positions of its input (where Tucker-2's first 1×1 conv
        and a ConvTranspose's first factor run)."""
        value = self.node.inputs[0] if inputs else self.node.outputs[0]
        shape = shapes.get(value.name or "")
        if not shape or any(d is None for d in shape):
            return None
        if self.is_conv:
            return shape[0] * math.prod(shape[2:])
        return math.prod(shape[:-1])


def view(node: ir.Node) -> Layer:
    """The layer behind a Gemm/MatMul/Conv node, or Skip with the reason it is not one."""
    weight_value = node.inputs[1] if len(node.inputs) > 1 else None
    problem = weight_problem(weight_value)
    if problem:
        raise Skip(problem)
    if weight_value.const_value.dtype not in FLOAT_TYPES:
        raise Skip(f"weight dtype {weight_value.const_value.dtype.name} is not float")
    if node.inputs[0] is not None and node.inputs[0].const_value is not None:
        raise Skip("left operand is constant too")
    stored = weight_array(weight_value)  # read once: the checks and the view share it
    problem = values_problem(stored)
    if problem:
        raise Skip(problem)
    if node.op_type in ("Conv", "ConvTranspose"):
        return _conv_view(node, stored)
    if stored.ndim != 2:
        raise Skip(f"weight is {stored.ndim}-D; only 2-D is factorized")
    if node.op_type == "MatMul":
        return Layer(node, stored, stored.T.astype(np.float64), np.zeros(stored.shape[1]))
    return _gemm_view(node, stored)


def _conv_view(node: ir.Node, weight: np.ndarray) -> Layer:
    if weight.ndim < 3:
        raise Skip(f"conv weight is {weight.ndim}-D")
    if node.attributes.get_int("group", 1) != 1:
        raise Skip("grouped or depthwise conv (group > 1) is not factorized")
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    if bias_value is not None and bias_value.const_value is None:
        raise Skip("conv bias is not a constant")
    if node.op_type == "ConvTranspose":  # weight [C, O, *k]: output channels second
        matrix = np.moveaxis(weight, 1, 0).reshape(weight.shape[1], -1).astype(np.float64)
        geometry = None
    else:
        matrix = weight.reshape(weight.shape[0], -1).astype(np.float64)
        geometry = ConvGeometry.of(node, tuple(weight.shape[2:]))
    bias = (
        weight_array(bias_value).astype(np.float64)
        if bias_value is not None
        else np.zeros(matrix.shape[0])
    )
    return Layer(node, weight, matrix, bias, geometry)


def _gemm_view(node: ir.Node, stored: np.ndarray) -> Layer:
    attrs = node.attributes
    alpha, beta = attrs.get_float("alpha", 1.0), attrs.get_float("beta", 1.0)
    if alpha == 0:
        raise Skip("Gemm alpha is 0")
    op_b = stored.T if attrs.get_int("transB", 0) else stored  # [K, N]
    matrix = alpha * op_b.T.astype(np.float64)
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    bias: np.ndarray | None = np.zeros(matrix.shape[0])
    if bias_value is not None:
        if bias_value.const_value is None:
            raise Skip("Gemm C is not a constant")
        c = weight_array(bias_value).astype(np.float64)
        per_output = c.size in (1, matrix.shape[0]) and (c.ndim < 2 or c.shape[0] == 1)
        bias = beta * np.broadcast_to(c.reshape(-1), matrix.shape[:1]) if per_output else None
    return Layer(node, stored, matrix, bias)
