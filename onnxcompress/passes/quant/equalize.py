"""Cross-layer equalization (Nagel et al. 2019): rescale channels between two Convs so both
weights share their range, before per-tensor weight quantization.

Per-tensor int8 wastes most levels on a layer whose output channels differ in range by orders
of magnitude; moving a per-channel factor from the first conv into the second's input channels
is exact in float (through nothing or a positively homogeneous ReLU) and evens them out.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcompress.graph import bias_input, is_constant, set_constant
from onnxcompress.passes.quant.plan import constant_bias


def equalize(
    model: ir.Model, planned: list[ir.Node], rounds: int = 4, details: dict | None = None
) -> str:
    """Rescale channels between Conv pairs so both weights share their range (exact in float).

    W1[i] /= s_i, b1[i] /= s_i, W2[:, i] *= s_i with s_i = sqrt(r1_i / r2_i), through a ReLU
    (positively homogeneous) or nothing; the second conv may be depthwise. ``details``, when
    given, receives per conv of a pair (by name) what it was scaled by and with which conv.
    """
    chosen = set(map(id, planned))
    pairs = [p for p in _equalizable_pairs(model) if id(p[0]) in chosen and id(p[1]) in chosen]
    total = {id(first): np.ones(1) for first, _ in pairs}
    for _ in range(rounds):
        for first, second in pairs:
            total[id(first)] = total[id(first)] * _equalize_pair(first, second)
    for first, second in pairs:
        if details is not None:
            low, high = float(total[id(first)].min()), float(total[id(first)].max())
            details[first.name] = f"outputs / s, s in [{low:.3g}, {high:.3g}], with {second.name}"
            details[second.name] = f"inputs x s, s in [{low:.3g}, {high:.3g}], with {first.name}"
    note = f"equalized {len(pairs)} conv pair(s)"
    bounded = _pairs_through_bounded_clips(model)
    if bounded:
        note += (
            f"; {bounded} Conv -> Clip -> Conv pair(s) left alone (a Clip with an upper bound,"
            " ReLU6, does not commute with rescaling)"
        )
    return note


def _pairs_through_bounded_clips(model: ir.Model) -> int:
    count = 0
    for node in model.graph:
        if node.op_type != "Clip" or len(node.inputs) < 3 or node.inputs[2] is None:
            continue
        producer, reader = node.inputs[0].producer(), _single_reader(node.outputs[0])
        if producer is not None and producer.op_type == "Conv" and reader is not None:
            count += reader.op_type == "Conv"
    return count


def _equalizable_pairs(model: ir.Model) -> list[tuple[ir.Node, ir.Node]]:
    pairs = []
    for first in model.graph:
        if first.op_type != "Conv" or not is_constant(first.inputs[1]):
            continue
        second = _single_reader(first.outputs[0])
        if second is not None and second.op_type == "Relu":
            second = _single_reader(second.outputs[0])
        if second is None or second.op_type != "Conv" or not is_constant(second.inputs[1]):
            continue
        if _second_layout(second) is None:
            continue
        if bias_input(first) is not None and constant_bias(first) is None:
            continue  # a computed bias cannot be rescaled
        if len(first.inputs[1].uses()) == 1 and len(second.inputs[1].uses()) == 1:
            pairs.append((first, second))
    return pairs


def _single_reader(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def _second_layout(conv: ir.Node) -> str | None:
    """'dense' (group 1: input channel i is W[:, i]) or 'depthwise' (W[i]); else None."""
    groups = conv.attributes.get_int("group", 1)
    if groups == 1:
        return "dense"
    weight_shape = conv.inputs[1].const_value.shape
    return "depthwise" if weight_shape[1] == 1 and weight_shape[0] == groups else None


def _equalize_pair(first: ir.Node, second: ir.Node) -> np.ndarray:
    w1 = first.inputs[1].const_value.numpy().astype(np.float64)
    w2 = second.inputs[1].const_value.numpy().astype(np.float64)
    depthwise = _second_layout(second) == "depthwise"
    r1 = np.abs(w1).reshape(w1.shape[0], -1).max(1)
    r2 = np.abs(w2).reshape(w2.shape[0], -1).max(1) if depthwise else np.abs(w2).max((0, 2, 3))
    scale = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.maximum(r2, 1e-30)), 1.0)
    _rescale(first, second, scale, depthwise)
    return scale


def _rescale(first: ir.Node, second: ir.Node, scale: np.ndarray, depthwise: bool) -> None:
    w1 = first.inputs[1].const_value.numpy().astype(np.float64)
    w2 = second.inputs[1].const_value.numpy().astype(np.float64)
    column = scale.reshape(-1, *[1] * (w1.ndim - 1))
    _set_float32(first.inputs[1], w1 / column)
    bias = constant_bias(first)
    if bias is not None:
        _set_float32(bias, bias.const_value.numpy() / scale)
    if depthwise:
        _set_float32(second.inputs[1], w2 * column)
    else:
        _set_float32(second.inputs[1], w2 * scale.reshape(1, -1, *[1] * (w2.ndim - 2)))


def _set_float32(value: ir.Value, array: np.ndarray) -> None:
    """The rescaling runs in float64; the weights stay float32."""
    set_constant(value, array.astype(np.float32))
