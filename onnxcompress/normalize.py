"""Bring a freshly loaded model into the form every pass expects, and say what was done."""

from __future__ import annotations

import contextlib
import logging
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator
from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass

from onnxcompress.errors import BadModel
from onnxcompress.graph import default_opset
from onnxcompress.simplify import fold_pads_into_convs, fold_small_constants, replace_by_constant

logger = logging.getLogger(__name__)

#: onnxruntime runs the default domain from opset 7 on; older models must be converted first.
MIN_OPSET = 7
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
CONTROL_FLOW = frozenset({"If", "Loop", "Scan", "SequenceMap"})


def normalize(model: ir.Model) -> list[str]:
    """Check the opset, lift Constant weights, drop initializers from the inputs; return notes.

    The notes say what changed and what passes will stay away from (custom ops, subgraphs).
    """
    check_opset(model)
    check_structure(model)
    notes = [
        *_lift_constants(model),
        *_initializers_out_of_inputs(model),
        *_fold_weight_layout_ops(model),
        *fold_small_constants(model, _evaluate),
        *fold_pads_into_convs(model),
        *_custom_ops(model),
        *_subgraphs(model),
    ]
    for note in notes:
        logger.info("normalize: %s", note)
    return notes


def check_opset(model: ir.Model) -> None:
    opset = default_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if opset is None:
        return  # e.g. a pure ai.onnx.ml model: nothing for the passes, but not an error
    if opset < MIN_OPSET or opset > newest:
        raise BadModel(
            f"unsupported opset {opset} for the default ONNX domain "
            f"(supported: {MIN_OPSET} to {newest})"
        )


def check_structure(model: ir.Model) -> None:
    """Refuse, before any pass and whatever the flags, a graph that no runtime could execute:
    a node reading a tensor nothing defines, a cycle, a graph output no node makes, an IR
    version newer than onnx knows. Such a model would otherwise be rewritten and written out
    as it came. (onnx's checker refuses these too, but also models onnxruntime runs, such as
    an output declared without a shape.)"""
    if model.ir_version > onnx.IR_VERSION:
        raise BadModel(
            f"IR version {model.ir_version} is newer than this onnx knows ({onnx.IR_VERSION})"
        )
    problem = _first_unavailable(model.graph)
    if problem and not problem[0]:  # nodes merely out of order are sorted; a cycle cannot be
        with contextlib.suppress(Exception):
            model.graph.sort()
        problem = _first_unavailable(model.graph)
    if problem:
        raise BadModel(f"not a valid ONNX model: {problem[1]}")


def _first_unavailable(graph: ir.Graph) -> tuple[bool, str] | None:
    """The first value read (or output) before anything in the graph makes it, as (whether
    nothing makes it at all, why), or None when every value is available in time."""
    available = {id(v) for v in graph.inputs} | {id(v) for v in graph.initializers.values()}
    for node in graph:
        for value in node.inputs:
            if value is not None and id(value) not in available:
                return value.producer() is None, _undefined(node, value)
        available.update(id(output) for output in node.outputs)
    for output in graph.outputs:
        if id(output) not in available:
            return True, f"graph output {output.name!r} is made by no node"
    return None


def _undefined(node: ir.Node, value: ir.Value) -> str:
    producer = value.producer()
    where = f"node {node.name or node.op_type!r}"
    if producer is None:
        return f"{where} reads {value.name!r}, which nothing defines"
    return f"{where} reads {value.name!r} before it is made (a cycle, or nodes out of order)"


def _lift_constants(model: ir.Model) -> list[str]:
    before = _count_constant_nodes(model)
    LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)(model)
    lifted = before - _count_constant_nodes(model)
    return [f"lifted {lifted} Constant-node tensors to initializers"] if lifted else []


#: Layout ops that exporters put between a stored weight and its use (mnist-8 reshapes its
#: MatMul weight, TF exports transpose, fp16 exports cast). Folding them exposes the weight.
#: Nothing that can grow a tensor (Expand, Tile) or undo quantization (DequantizeLinear).
_FOLDABLE = frozenset(
    {"Reshape", "Transpose", "Cast", "Squeeze", "Unsqueeze", "Flatten", "Identity"}
)


def _fold_weight_layout_ops(model: ir.Model) -> list[str]:
    folded = []
    for node in list(model.graph):
        if node.op_type not in _FOLDABLE or node.domain not in ("", "ai.onnx"):
            continue
        inputs = [v for v in node.inputs if v is not None]
        if not inputs or any(v.const_value is None or v.is_graph_input() for v in inputs):
            continue
        output = node.outputs[0]
        if output.is_graph_output():
            continue
        replace_by_constant(model, node, _evaluate(node, model))
        folded.append(node.op_type)
    RemoveUnusedNodesPass()(model)
    if not folded:
        return []
    kinds = ", ".join(f"{n} {op}" for op, n in sorted(Counter(folded).items()))
    return [f"folded {len(folded)} layout op(s) on constant weights ({kinds})"]


def _evaluate(node: ir.Node, model: ir.Model) -> np.ndarray:
    """Run one node on its constant inputs with onnx's reference evaluator."""
    names = [f"in{i}" if v is not None else "" for i, v in enumerate(node.inputs)]
    proto_node = onnx.helper.make_node(
        node.op_type,
        names,
        ["out"],
        **{name: _attribute_value(attr) for name, attr in node.attributes.items()},
    )
    opset = default_opset(model) or onnx.defs.onnx_opset_version()
    evaluator = ReferenceEvaluator(
        onnx.helper.make_graph(
            [proto_node],
            "fold",
            [
                onnx.helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None)
                for n in names
                if n
            ],
            [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.UNDEFINED, None)],
        ),
        opsets={"": opset},
    )
    feeds = {n: v.const_value.numpy() for n, v in zip(names, node.inputs) if v is not None}
    return np.asarray(evaluator.run(None, feeds)[0])


def _attribute_value(attr: ir.Attr):
    if attr.type == ir.AttributeType.TENSOR:  # e.g. ConstantOfShape's value
        return ir.serde.serialize_tensor(attr.value)
    return attr.value


def _count_constant_nodes(model: ir.Model) -> int:
    return sum(1 for g in model.graphs() for n in g if n.op_type == "Constant")


def _initializers_out_of_inputs(model: ir.Model) -> list[str]:
    """Old exporters (IR < 4) list every initializer as a graph input too.

    Such an input is overridable in principle, but in practice it is the weight; we treat it
    as a constant so it can be compressed, and say so.
    """
    graph = model.graph
    overridable = [v for v in graph.inputs if v.const_value is not None]
    if not overridable:
        return []
    kept = [v for v in graph.inputs if v.const_value is None]
    graph.inputs.clear()
    graph.inputs.extend(kept)
    model.ir_version = max(model.ir_version, 4)
    return [
        f"{len(overridable)} initializers were also graph inputs (IR < 4 style); "
        "treated as constants and removed from the inputs"
    ]


def _custom_ops(model: ir.Model) -> list[str]:
    custom = Counter(
        (node.domain, node.op_type)
        for graph in model.graphs()
        for node in graph
        if node.domain not in STANDARD_DOMAINS
    )
    return [
        f"custom op {domain}::{op} ({count} node(s)) is left alone by every pass"
        for (domain, op), count in sorted(custom.items())
    ]


def _subgraphs(model: ir.Model) -> list[str]:
    flow = Counter(n.op_type for n in model.graph if n.op_type in CONTROL_FLOW)
    return [
        f"{count} {op} node(s) hold subgraphs: their bodies are not rewritten"
        for op, count in sorted(flow.items())
    ]
