"""Calibration statistics for the data-aware codebook: input means (bias correction) and
input Gram matrices E[x xᵀ] (output-error refinement), kept as running sums a batch at a time."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxcompress.calibration import Feed
from onnxcompress.errors import CannotRun
from onnxcompress.validate import Runner

logger = logging.getLogger(__name__)

#: Gram matrices are kept for inputs up to this many features, and this many bytes in all.
MAX_GRAM_FEATURES = 4096
GRAM_BUDGET_BYTES = 512 << 20


@dataclass
class LayerStats:
    """Running statistics of one layer's input activation."""

    node: ir.Node
    kind: str  # "fc" (Gemm/MatMul: features on the last axis) or "conv" (channels on axis 1)
    total: np.ndarray | None = None
    gram: np.ndarray | None = None
    count: int = 0
    want_gram: bool = False

    @property
    def mean(self) -> np.ndarray:
        assert self.total is not None
        return self.total / max(self.count, 1)

    def add(self, activation: np.ndarray) -> None:
        x = activation.astype(np.float64)
        if self.kind == "conv":
            rows = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
        else:
            rows = x.reshape(-1, x.shape[-1])
        self.total = rows.sum(0) + (self.total if self.total is not None else 0.0)
        self.count += len(rows)
        if self.want_gram:
            product = rows.T @ rows
            self.gram = product if self.gram is None else self.gram + product

    def finish(self) -> None:
        if self.gram is not None:
            self.gram /= max(self.count, 1)


def _layer_of(value: ir.Value) -> tuple[ir.Node, str] | None:
    """The one Conv/Gemm/MatMul reading ``value`` as its weight, and the kind of input it has."""
    uses = value.uses()
    if len(uses) != 1:
        return None
    node, index = uses[0]
    if index != 1 or node.inputs[0] is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Conv":
        return node, "conv"
    if node.op_type == "Gemm" and not node.attributes.get_int("transA", 0):
        return node, "fc"
    if node.op_type == "MatMul" and len(value.const_value.shape) == 2:
        return node, "fc"
    return None


def collect_stats(
    model: ir.Model, weights: list[ir.Value], feeds: list[Feed], with_gram: bool
) -> tuple[dict[str, LayerStats], list[str]]:
    """Input statistics of every layer whose weight is in ``weights``, over ``feeds``."""
    stats: dict[str, LayerStats] = {}
    budget = GRAM_BUDGET_BYTES
    for value in weights:
        found = _layer_of(value)
        if found is None:
            continue
        node, kind = found
        features = value.const_value.shape[0 if _is_left_weight(node) else 1]
        want = with_gram and kind == "fc" and features <= MAX_GRAM_FEATURES
        want = want and budget >= 8 * features * features
        budget -= 8 * features * features if want else 0
        stats[value.name] = LayerStats(node, kind, want_gram=want)
    if not stats:
        return {}, ["data_aware: no Conv/Gemm/MatMul weight with a single use to refine"]
    try:
        _accumulate(model, stats, feeds)
    except CannotRun as exc:
        return {}, [f"data_aware: statistics failed ({exc}); nothing refined"]
    return stats, [f"data_aware: statistics of {len(stats)} layer input(s) on {len(feeds)} feed(s)"]


def _is_left_weight(node: ir.Node) -> bool:
    """Whether the weight's first axis holds the input features (MatMul, Gemm transB=0)."""
    return node.op_type == "MatMul" or not node.attributes.get_int("transB", 0)


def _accumulate(model: ir.Model, stats: dict[str, LayerStats], feeds: list[Feed]) -> None:
    names = {s.node.inputs[0].name for s in stats.values()}
    captured = sorted(n for n in names if not _is_graph_input(model, n))
    runner = Runner(model, "model for calibration statistics", extra_outputs=captured)
    try:
        for feed in feeds:
            activations = {**runner.capture(feed), **{k: v for k, v in feed.items() if k in names}}
            for layer in stats.values():
                layer.add(activations[layer.node.inputs[0].name])
    finally:
        runner.close()
    for layer in stats.values():
        layer.finish()


def _is_graph_input(model: ir.Model, name: str) -> bool:
    return any(v.name == name for v in model.graph.inputs)


def correct_bias(
    value: ir.Value, weight: np.ndarray, approx: np.ndarray, stats: LayerStats
) -> dict:
    """Shift the layer's bias by the mean output error the new weight causes on the data."""
    node = stats.node
    shift = _mean_output_shift(node, (approx - weight).astype(np.float64), stats.mean)
    bias, scale = _bias_of(node)
    if bias is None:
        return {"bias_correction": "no constant bias to correct"}
    current = bias.const_value.numpy()
    if current.size != shift.size:
        return {"bias_correction": f"bias of shape {list(current.shape)} not per channel"}
    corrected = (current.astype(np.float64) - scale * shift.reshape(current.shape)).astype(
        current.dtype
    )
    bias.const_value = ir.Tensor(corrected, name=bias.name)
    return {"bias_correction": float(np.abs(shift).max(initial=0.0))}


def _mean_output_shift(node: ir.Node, delta: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """E[(W' − W) x] per output channel, from the mean of the input."""
    if node.op_type == "Conv":
        groups = node.attributes.get_int("group", 1)
        per_filter = delta.reshape(delta.shape[0], delta.shape[1], -1).sum(-1)  # [co, ci/g]
        group_of = np.arange(delta.shape[0]) // (delta.shape[0] // groups)
        means = mean.reshape(groups, -1)[group_of]  # [co, ci/g]
        return (per_filter * means).sum(1)
    if node.op_type == "Gemm":
        product = delta.T if node.attributes.get_int("transB", 0) else delta
        return node.attributes.get_float("alpha", 1.0) * (mean @ product)
    return mean @ delta


def _bias_of(node: ir.Node) -> tuple[ir.Value | None, float]:
    """The constant bias added to the layer's output (and 1/beta for Gemm), if there is one."""
    if node.op_type in ("Conv", "Gemm"):
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        scale = 1.0 / node.attributes.get_float("beta", 1.0) if node.op_type == "Gemm" else 1.0
        return (bias, scale) if _private_constant(bias) else (None, 1.0)
    uses = node.outputs[0].uses()
    if len(uses) == 1 and uses[0][0].op_type == "Add":
        add = uses[0][0]
        other = add.inputs[1 - uses[0][1]]
        if _private_constant(other):
            return other, 1.0
    return None, 1.0


def _private_constant(value: ir.Value | None) -> bool:
    return (
        value is not None
        and value.const_value is not None
        and not value.is_graph_input()
        and len(value.uses()) == 1
    )
