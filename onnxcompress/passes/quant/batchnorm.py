"""BatchNormalization folded into the Conv before it, exactly, before quantizing.

A separate BatchNormalization would be quantized on its own (an extra rounding of the conv's
output) and blocks onnxruntime's fusion of the conv into QLinearConv; folded, its scale joins
the per-channel weight scales.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcompress.emit import Emitter
from onnxcompress.graph import is_constant
from onnxcompress.passes.quant.plan import constant_bias


def fold_batchnorms(model: ir.Model, emitter: Emitter | None = None) -> int:
    """Fold every BatchNormalization that follows a constant-weight Conv into it (exact);
    returns how many. New weights are made with ``emitter`` (the qdq run's, else a new one)."""
    emitter = emitter or Emitter(model, "qdq")
    folded = 0
    for bn in list(model.graph):
        conv = _foldable_conv(bn)
        if conv is not None:
            _fold_one(emitter, conv, bn)
            folded += 1
    return folded


def _foldable_conv(bn: ir.Node) -> ir.Node | None:
    """The Conv that ``bn`` alone reads, when both have constant parameters."""
    if bn.op_type != "BatchNormalization" or any(o.uses() for o in bn.outputs[1:]):
        return None
    conv = bn.inputs[0].producer() if bn.inputs[0] is not None else None
    if conv is None or conv.op_type != "Conv" or not is_constant(conv.inputs[1]):
        return None
    if len(bn.inputs[0].uses()) != 1 or bn.inputs[0].is_graph_output():
        return None
    if len(conv.inputs[1].uses()) != 1 or not all(is_constant(v) for v in bn.inputs[1:5]):
        return None
    return conv


def _fold_one(emitter: Emitter, conv: ir.Node, bn: ir.Node) -> None:
    gamma, beta, mean, var = (np.asarray(v.const_value.numpy(), np.float64) for v in bn.inputs[1:5])
    factor = gamma / np.sqrt(var + bn.attributes.get_float("epsilon", 1e-5))
    weight = conv.inputs[1].const_value.numpy().astype(np.float64)
    bias = constant_bias(conv)
    old_bias = np.zeros(weight.shape[0]) if bias is None else bias.const_value.numpy()
    new_weight = (weight * factor.reshape(-1, *[1] * (weight.ndim - 1))).astype(np.float32)
    new_bias = ((np.asarray(old_bias, np.float64) - mean) * factor + beta).astype(np.float32)
    folded_weight = emitter.constant(f"{conv.inputs[1].name}_bn", new_weight)
    conv.replace_input_with(1, folded_weight)
    # named after the new weight (W_bn_bn_bias), as the models this pass made always were
    bias_value = emitter.constant(f"{folded_weight.name}_bn_bias", new_bias)
    if len(conv.inputs) < 3:
        conv.resize_inputs(3)
    conv.replace_input_with(2, bias_value)
    _bypass(emitter.graph, bn, conv.outputs[0])


def _bypass(graph: ir.Graph, bn: ir.Node, replacement: ir.Value) -> None:
    """Remove ``bn``, its readers reading ``replacement`` instead; a graph output keeps its
    name (the model's contract), which moves to ``replacement``."""
    output = bn.outputs[0]
    output.replace_all_uses_with(replacement)
    if output.is_graph_output():
        index = graph.outputs.index(output)
        name = output.name
        graph.outputs[index] = replacement
        output.name = None
        replacement.name = name
    graph.remove(bn, safe=True)
