"""lowrank's graph side: a Plan (the factors chosen for one layer) and the rewrite that puts
them in place of the node, keeping its output name, layout conventions and bias."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcompress.emit import Emitter
from onnxcompress.passes.lowrank.layer import Layer

_SPATIAL_ATTRIBUTES = ("auto_pad", "pads", "strides", "dilations", "kernel_shape")


@dataclass
class Plan:
    """The factors for one layer: ``stages`` feed the last factor, ``first`` is their composite
    [r, D] map (for fitting and errors), ``last`` is [O, r]; ``bias`` replaces the layer's
    own bias when a fit produced one."""

    scheme: str
    ranks: dict[str, Any]
    stages: list[np.ndarray]  # svd: [F]; tucker2: [u_in, core]; separable: [depthwise]
    first: np.ndarray
    last: np.ndarray | None = None
    bias: np.ndarray | None = None
    output_error: float | None = None
    node_names: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if self.scheme == "svd":
            return f"rank {self.ranks['rank']} of {self.ranks['full_rank']}"
        if self.scheme == "tucker2":
            return "Tucker-2 ranks {},{}".format(*self.ranks["ranks"])
        return f"depth multiplier {self.ranks['multiplier']}"

    def params(self, layer: Layer) -> int:
        out_channels, inputs = layer.matrix.shape
        if self.scheme == "svd":
            return self.first.shape[0] * (inputs + out_channels)
        channels, taps = layer.weight.shape[1], math.prod(layer.weight.shape[2:])
        if self.scheme == "tucker2":
            rank_in, rank_out = self.ranks["ranks"]
            return channels * rank_in + rank_out * rank_in * taps + out_channels * rank_out
        width = self.first.shape[0]  # C·m
        return width * taps + out_channels * width

    def macs(self, layer: Layer, positions: int, in_positions: int | None = None) -> int:
        """MACs at ``positions`` output rows; Tucker-2's first 1×1 conv and a ConvTranspose's
        first factor run at the input's."""
        in_positions = in_positions or positions
        out_channels, inputs = layer.matrix.shape
        if layer.kind == "ConvTranspose":
            rank = self.first.shape[0]
            return rank * inputs * in_positions + rank * out_channels * positions
        if self.scheme != "tucker2":
            return self.params(layer) * positions
        channels, taps = layer.weight.shape[1], math.prod(layer.weight.shape[2:])
        rank_in, rank_out = self.ranks["ranks"]
        first = channels * rank_in * in_positions
        return first + (rank_out * rank_in * taps + out_channels * rank_out) * positions


def rewrite(emitter: Emitter, layer: Layer, plan: Plan) -> None:
    """Replace the layer's node by the plan's nodes, in place."""
    node = layer.node
    base = node.name or f"{node.op_type}_{node.outputs[0].name}"
    weights = _Weights(emitter, node.inputs[1].name, layer.weight.dtype)
    if node.op_type == "MatMul":
        nodes = _matmul_nodes(node, plan, weights)
    elif node.op_type == "Gemm":
        nodes = _gemm_nodes(node, layer, plan, weights)
    elif node.op_type == "ConvTranspose":
        nodes = _conv_transpose_nodes(node, layer, plan, weights)
    else:
        nodes = _conv_nodes(node, layer, plan, weights)
    for i, new in enumerate(nodes):
        output = f"{base}.lowrank.{i}.out" if i < len(nodes) - 1 else None
        emitter.adopt(new, f"{base}.lowrank.{i}", output)
    plan.node_names = [n.name for n in nodes]
    ir.convenience.replace_nodes_and_values(
        emitter.graph, node, [node], nodes, [node.outputs[0]], [nodes[-1].outputs[0]]
    )


class _Weights:
    """New initializers named after the weight they replace (``W.lowrank.0``, ``.1``…), in its
    dtype."""

    def __init__(self, emitter: Emitter, base: str, dtype: np.dtype) -> None:
        self.emitter, self.base, self.dtype = emitter, base, dtype
        self.count = 0

    def add(self, array: np.ndarray, suffix: str | None = None) -> ir.Value:
        name = f"{self.base}.lowrank.{suffix if suffix is not None else self.count}"
        self.count += suffix is None
        return self.emitter.constant(name, np.ascontiguousarray(array, self.dtype))


def _matmul_nodes(node: ir.Node, plan: Plan, weights: _Weights) -> list[ir.Node]:
    first = ir.node("MatMul", [node.inputs[0], weights.add(plan.first.T)])
    return [first, ir.node("MatMul", [first.outputs[0], weights.add(plan.last.T)])]


def _gemm_nodes(node: ir.Node, layer: Layer, plan: Plan, weights: _Weights) -> list[ir.Node]:
    """alpha·op(A)·op(B) + beta·C -> Gemm(Gemm(A, P; alpha, transA), Q, C; beta), keeping the
    stored layout (transB) the exporter chose. ``first`` holds alpha, so P = Fᵀ / alpha."""
    attrs = node.attributes
    alpha, trans_b = attrs.get_float("alpha", 1.0), attrs.get_int("transB", 0)
    left, right = plan.first.T / alpha, plan.last.T  # [K, r], [r, N]
    if trans_b:
        left, right = left.T, right.T
    first = ir.node(
        "Gemm",
        [node.inputs[0], weights.add(left)],
        {"alpha": alpha, "transA": attrs.get_int("transA", 0), "transB": trans_b},
    )
    bias, beta = _gemm_bias(node, plan, weights)
    inputs = [first.outputs[0], weights.add(right)] + ([bias] if bias is not None else [])
    return [first, ir.node("Gemm", inputs, {"beta": beta, "transB": trans_b})]


def _gemm_bias(node: ir.Node, plan: Plan, weights: _Weights) -> tuple[ir.Value | None, float]:
    if plan.bias is not None:
        return weights.add(plan.bias, "bias"), 1.0
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    return bias, node.attributes.get_float("beta", 1.0)


def _conv_nodes(node: ir.Node, layer: Layer, plan: Plan, weights: _Weights) -> list[ir.Node]:
    out_channels, channels, *kernel = layer.weight.shape
    spatial = {k: a.value for k, a in node.attributes.items() if k in _SPATIAL_ATTRIBUTES}
    point = [1] * len(kernel)
    x = node.inputs[0]
    if plan.scheme == "svd":
        rank = plan.first.shape[0]
        stages = [(plan.first.reshape(rank, channels, *kernel), spatial)]
    elif plan.scheme == "tucker2":
        u_in, core = plan.stages
        stages = [(u_in.T.reshape(u_in.shape[1], channels, *point), {}), (core, spatial)]
    else:
        (depthwise,) = plan.stages
        stages = [(depthwise, {**spatial, "group": channels})]
    nodes = []
    for weight, attributes in stages:
        nodes.append(ir.node("Conv", [x, weights.add(weight)], attributes))
        x = nodes[-1].outputs[0]
    last = weights.add(plan.last.reshape(out_channels, plan.last.shape[1], *point))
    bias = _conv_bias(node, plan, weights)
    nodes.append(ir.node("Conv", [x, last] + ([bias] if bias is not None else [])))
    return nodes


def _conv_transpose_nodes(node, layer: Layer, plan: Plan, weights: _Weights) -> list[ir.Node]:
    """ConvTranspose(x, W[C, O, k]) -> Conv1×1(ConvTranspose(x, F[C, r, k]), A[O, r]): the
    transposed conv is linear in its weight's output-channel axis, so the split commutes."""
    channels, out_channels, *kernel = layer.weight.shape
    rank = plan.first.shape[0]
    first_weight = np.moveaxis(plan.first.reshape(rank, channels, *kernel), 0, 1)
    attributes = {k: a.value for k, a in node.attributes.items() if k != "group"}
    first = ir.node("ConvTranspose", [node.inputs[0], weights.add(first_weight)], attributes)
    last = weights.add(plan.last.reshape(out_channels, rank, *([1] * len(kernel))))
    bias = _conv_bias(node, plan, weights)
    return [first, ir.node("Conv", [first.outputs[0], last] + ([bias] if bias is not None else []))]


def _conv_bias(node: ir.Node, plan: Plan, weights: _Weights) -> ir.Value | None:
    if plan.bias is not None:
        return weights.add(plan.bias, "bias")
    return node.inputs[2] if len(node.inputs) > 2 else None
