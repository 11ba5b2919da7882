"""Exact simplifications every pass benefits from, run by normalize.

Exporters leave small constant computations in the graph (torch's TF-style "same" padding
computes each Pad's pads from a dozen int64 nodes) and explicit zero ``Pad`` nodes in front of
convolutions. Both hide the structure passes look for: a quantized Conv must read its
input's DequantizeLinear directly for onnxruntime to fuse it, and a channel walk has one op
less to cross. Folding them is exact; onnxruntime does the same at session creation.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxcompress.graph import default_opset, is_constant

#: A node is folded only when everything it reads and makes is at most this many elements:
#: shape arithmetic, never a weight (weights keep their own layout folding in normalize).
SMALL = 4096
#: Ops that give a different result on every run, or that hold a subgraph, are never folded.
_NEVER = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"}
    | {"Bernoulli", "If", "Loop", "Scan", "SequenceMap", "Constant"}
)


def fold_small_constants(model: ir.Model, evaluate) -> list[str]:
    """Replace each default-domain node whose inputs are all small constants by its value.

    ``evaluate(node, model)`` computes one node (onnx's reference evaluator). Runs in graph
    order, so a chain of such nodes folds in one sweep."""
    folded = Counter()
    for node in list(model.graph):
        if not _foldable(node):
            continue
        try:
            array = np.asarray(evaluate(node, model))
        except Exception:  # an op the reference cannot run stays as it is
            continue
        if array.size > SMALL or array.dtype == object:
            continue
        replace_by_constant(model, node, array)
        folded[node.op_type] += 1
    if not folded:
        return []
    RemoveUnusedNodesPass()(model)
    kinds = ", ".join(f"{n} {op}" for op, n in sorted(folded.items()))
    return [f"folded {sum(folded.values())} node(s) computing small constants ({kinds})"]


def _foldable(node: ir.Node) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type in _NEVER or len(node.outputs) != 1:
        return False
    if node.outputs[0].is_graph_output():
        return False
    inputs = [v for v in node.inputs if v is not None]
    return all(
        is_constant(v) and not v.is_graph_input() and v.const_value.size <= SMALL for v in inputs
    )


def replace_by_constant(model: ir.Model, node: ir.Node, array: np.ndarray) -> None:
    """``node``'s only output becomes an initializer holding ``array``; the node goes."""
    output = node.outputs[0]
    constant = ir.Value(
        name=output.name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.Tensor(array, name=output.name),
    )
    output.replace_all_uses_with(constant)
    model.graph.remove(node, safe=True)
    model.graph.register_initializer(constant)


def fold_pads_into_convs(model: ir.Model) -> list[str]:
    """A constant-mode, zero-valued ``Pad`` of the spatial axes read only by Convs becomes the
    Convs' own ``pads`` (exact: a conv pads with zeros)."""
    if (default_opset(model) or 0) < 11:  # pads became an input in opset 11
        return []
    count = 0
    for node in list(model.graph):
        amounts = _spatial_zero_pads(node)
        if amounts is None:
            continue
        uses = list(node.outputs[0].uses())
        readers = [use.node for use in uses]
        if not uses or any(u.idx != 0 or not _takes_pads(u.node, len(amounts)) for u in uses):
            continue
        for reader in readers:
            _add_pads(reader, amounts)
            reader.replace_input_with(0, node.inputs[0])
        model.graph.remove(node, safe=True)
        count += 1
    return [f"folded {count} zero Pad node(s) into the Conv after them"] if count else []


def _spatial_zero_pads(node: ir.Node) -> list[int] | None:
    """The pads (begin and end of each spatial axis) of a zero Pad on N, C, spatial... axes,
    or None when it is anything else (other modes, a value, axes, negative or on N/C)."""
    if node.op_type != "Pad" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    if node.attributes.get_string("mode", "constant") != "constant":
        return None
    if node.outputs[0].is_graph_output() or not is_constant(node.inputs[1]):
        return None
    extra = [v for v in node.inputs[2:] if v is not None]
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        return None  # explicit axes: rare, left alone
    if extra and not (is_constant(extra[0]) and not np.any(extra[0].const_value.numpy())):
        return None
    pads = np.asarray(node.inputs[1].const_value.numpy()).astype(np.int64).ravel()
    rank = len(pads) // 2
    if rank < 3 or np.any(pads < 0):
        return None
    begins, ends = pads[:rank], pads[rank:]
    if begins[:2].any() or ends[:2].any():
        return None
    return [int(p) for p in (*begins[2:], *ends[2:])]


def _takes_pads(node: ir.Node, count: int) -> bool:
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
        return False
    if node.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
        return False
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    spatial = len(weight.shape) - 2 if weight is not None and weight.shape is not None else None
    return spatial is not None and 2 * spatial == count


def _add_pads(node: ir.Node, amounts: list[int]) -> None:
    current = node.attributes.get_ints("pads", None) or [0] * len(amounts)
    node.attributes["pads"] = ir.AttrInt64s("pads", [a + b for a, b in zip(current, amounts)])
