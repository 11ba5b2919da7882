"""Low-rank factorization of Gemm/MatMul weights by truncated SVD."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxcompress.graph import (
    Namer,
    add_weight,
    default_opset,
    node_label,
    tag,
    weight_array,
    weight_problem,
)
from onnxcompress.passes.base import (
    CompressionPass,
    LayerReport,
    PassContext,
    PassReport,
    Skip,
    check_fields,
    excluded,
)

#: Gemm without its C input (needed for the first, bias-free factor) exists from opset 11.
GEMM_OPTIONAL_C_OPSET = 11
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)


class LowRank(CompressionPass):
    """MatMul/Gemm(x, W[k,n]) -> two thin products x·A[k,r]·B[r,n] with A·B ≈ W (truncated SVD)."""

    name = "lowrank"

    @dataclass(frozen=True)
    class Config:
        """Choose the rank by exactly one of rank, ratio, energy (energy=0.95 if none)."""

        rank: int | None = None  # the same rank for every layer (capped at full rank)
        ratio: float | None = None  # share of each layer's full rank, 0 < ratio <= 1
        energy: float | None = None  # keep singular values holding this share of sum(s^2)
        min_saving: float = 0.1  # skip a layer unless its params drop by this share
        round_to: int = 1  # round ranks up to a multiple of this (kernel-friendly)
        exclude: tuple[str, ...] = ()  # node-name glob patterns to leave alone

        def __post_init__(self) -> None:
            chosen = [k for k in ("rank", "ratio", "energy") if getattr(self, k) is not None]
            if len(chosen) > 1:
                raise ValueError(f"give only one of rank, ratio, energy (got {', '.join(chosen)})")
            check_fields(
                self,
                {
                    "rank": (lambda v: v >= 1, "an integer >= 1"),
                    "ratio": (lambda v: 0 < v <= 1, "in (0, 1]"),
                    "energy": (lambda v: 0 < v <= 1, "in (0, 1]"),
                    "min_saving": (lambda v: v < 1, "below 1 (negative allows growth)"),
                    "round_to": (lambda v: v >= 1, "an integer >= 1"),
                },
            )

    def required_opset(self, model: ir.Model) -> int | None:
        opset = default_opset(model) or GEMM_OPTIONAL_C_OPSET
        has_gemm = any(node.op_type == "Gemm" for node in model.graph)
        return GEMM_OPTIONAL_C_OPSET if has_gemm and opset < GEMM_OPTIONAL_C_OPSET else None

    def run(self, model: ir.Model, ctx: PassContext) -> PassReport:
        report = PassReport(self.name, self.config_dict())
        namer = Namer(model)
        for node in list(model.graph):
            if node.op_type not in ("Gemm", "MatMul") or node.domain not in ("", "ai.onnx"):
                continue  # not a candidate at all: not reported
            try:
                report.layers.append(self._factorize(model.graph, node, ctx, namer))
            except Skip as skip:
                report.layers.append(LayerReport.skipped(node, str(skip)))
        return report

    @classmethod
    def applies(cls, node: ir.Node) -> bool:
        try:
            cls._weight_value(node)
            return True
        except Skip:
            return False

    @staticmethod
    def _weight_value(node: ir.Node) -> ir.Value:
        """The 2-D float constant weight of a Gemm/MatMul, or Skip with the reason it is not one."""
        if node.op_type not in ("Gemm", "MatMul") or node.domain not in ("", "ai.onnx"):
            raise Skip("not a Gemm or MatMul")
        weight_value = node.inputs[1] if len(node.inputs) > 1 else None
        problem = weight_problem(weight_value)
        if problem:
            raise Skip(problem)
        if weight_value.const_value.dtype not in _FLOAT_TYPES:
            raise Skip(f"weight dtype {weight_value.const_value.dtype.name} is not float")
        if len(weight_value.const_value.shape) != 2:
            raise Skip(f"weight is {len(weight_value.const_value.shape)}-D; only 2-D is factorized")
        if node.inputs[0] is not None and node.inputs[0].const_value is not None:
            raise Skip("left operand is constant too")
        return weight_value

    def _factorize(self, graph: ir.Graph, node: ir.Node, ctx: PassContext, namer: Namer):
        if excluded(node, self.config.exclude):
            raise Skip("excluded by name pattern")
        stored = weight_array(self._weight_value(node))
        trans_b = node.op_type == "Gemm" and node.attributes.get_int("transB", 0) == 1
        matrix = stored.T if trans_b else stored  # the [k, n] matrix the product uses
        left, right, rank, error = self._truncate(matrix)
        k, n = matrix.shape
        saving = 1 - rank * (k + n) / (k * n)
        if saving < self.config.min_saving or (saving <= 0 and self.config.min_saving >= 0):
            raise Skip(
                f"rank {rank} of {min(k, n)} saves {saving:.0%} of params "
                f"(min_saving {self.config.min_saving:.0%})"
            )
        if trans_b:  # keep the stored layout the exporter chose
            left, right = left.T, right.T
        left, right = left.astype(stored.dtype), right.astype(stored.dtype)
        first, second = self._replace(graph, node, namer, left, right)
        rows = _rows(node, ctx)
        return LayerReport(
            node=node_label(node),
            op_type=node.op_type,
            action="rewritten",
            detail={"rank": rank, "full_rank": min(k, n), "nodes": [first.name, second.name]},
            params_before=k * n,
            params_after=rank * (k + n),
            bytes_before=stored.nbytes,
            bytes_after=left.nbytes + right.nbytes,
            macs_before=rows * k * n if rows else None,
            macs_after=rows * rank * (k + n) if rows else None,
            weight_error=error,
        )

    def _truncate(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, float]:
        """Return A[k,r], B[r,n] with A·B the best rank-r approximation, r, and its error."""
        u, s, vt = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
        rank = self._choose_rank(s)
        energy = np.square(s)
        total = float(energy.sum())
        error = math.sqrt(float(energy[rank:].sum()) / total) if total > 0 else 0.0
        root = np.sqrt(s[:rank])
        return u[:, :rank] * root, root[:, None] * vt[:rank], rank, error

    def _choose_rank(self, singular_values: np.ndarray) -> int:
        full = len(singular_values)
        cfg = self.config
        if cfg.rank is not None:
            rank = cfg.rank
        elif cfg.ratio is not None:
            rank = math.ceil(cfg.ratio * full)
        else:
            energy = np.cumsum(np.square(singular_values))
            share = cfg.energy if cfg.energy is not None else 0.95
            total = energy[-1] if energy[-1] > 0 else 1.0
            rank = int(np.searchsorted(energy / total, share - 1e-12)) + 1
        rank = math.ceil(rank / cfg.round_to) * cfg.round_to
        return max(1, min(rank, full))

    def _replace(self, graph, node, namer, left, right) -> tuple[ir.Node, ir.Node]:
        base = node.name or f"{node.op_type}_{node.outputs[0].name}"
        weight_name = node.inputs[1].name
        left_value = add_weight(graph, namer, f"{weight_name}.lowrank.0", left)
        right_value = add_weight(graph, namer, f"{weight_name}.lowrank.1", right)
        if node.op_type == "MatMul":
            first = ir.node("MatMul", [node.inputs[0], left_value])
            second = ir.node("MatMul", [first.outputs[0], right_value])
        else:
            first, second = _gemm_pair(node, left_value, right_value)
        for i, new in enumerate((first, second)):
            new.name = namer.fresh(f"{base}.lowrank.{i}")
            tag(new, self.name)
        first.outputs[0].name = namer.fresh(f"{base}.lowrank.0.out")
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], [first, second], [node.outputs[0]], [second.outputs[0]]
        )
        return first, second


def _gemm_pair(node: ir.Node, left: ir.Value, right: ir.Value) -> tuple[ir.Node, ir.Node]:
    """alpha·op(A)·op(B) + beta·C  ->  Gemm(Gemm(A, L; alpha, transA), R, C; beta)."""
    attrs = node.attributes
    trans_b = attrs.get_int("transB", 0)
    first = ir.node(
        "Gemm",
        [node.inputs[0], left],
        {
            "alpha": attrs.get_float("alpha", 1.0),
            "transA": attrs.get_int("transA", 0),
            "transB": trans_b,
        },
    )
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    second_inputs = [first.outputs[0], right] + ([bias] if bias is not None else [])
    second = ir.node(
        "Gemm", second_inputs, {"beta": attrs.get_float("beta", 1.0), "transB": trans_b}
    )
    return first, second


def _rows(node: ir.Node, ctx: PassContext) -> int | None:
    """How many rows the product multiplies (all output dims but the last), if known."""
    shape = ctx.shapes.get(node.outputs[0].name or "")
    if not shape or any(d is None for d in shape):
        return None
    return math.prod(shape[:-1])
