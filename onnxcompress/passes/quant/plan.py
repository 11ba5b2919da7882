"""Which nodes and tensors qdq quantizes, and which tensors must share one scale.

The plan is made on the float graph before anything is inserted: a node is quantized with its
float activations (inputs it reads as activations, and its first output), and tensors that a
kernel cannot rescale between (Concat, pure data moves, a clamping activation absorbed into its
producer) are tied into groups that get one range.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from onnxcompress.graph import bias_input, is_constant, values_problem, weight_array
from onnxcompress.passes.base import LayerReport, Skip, name_matches
from onnxcompress.passes.quant.roles import shape_tensors

WEIGHTED = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
#: Ops whose output must carry the scale of their input (the quantized kernel, or a pure
#: data move, cannot rescale): Concat ties all its inputs too.
SHARED_SCALE = frozenset(
    {"Concat", "MaxPool", "Resize", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}
    | {"Pad"}
)
#: Ops that read every float input as an activation; the others read only input 0.
ALL_INPUTS = frozenset({"Add", "Mul", "Concat"})
DEFAULT_OP_TYPES = (
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "Add",
    "Mul",
    "Concat",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Resize",
    "Sigmoid",
    "LeakyRelu",
    "Transpose",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Pad",
    "Relu",
    "Clip",
)
#: Activations a quantized producer's output range can absorb (clamping at the zero point).
CLAMPING = frozenset({"Relu", "Clip"})
SUPPORTED_OP_TYPES = frozenset(DEFAULT_OP_TYPES) | SHARED_SCALE | CLAMPING

Range = tuple[float, float]


def plan_nodes(
    model: ir.Model, op_types: Sequence[str], exclude: Sequence[str], exclude_first_last: bool
) -> tuple[list[ir.Node], list[LayerReport]]:
    """The default-domain nodes of ``op_types`` to quantize, and the skipped ones with why."""
    candidates = [n for n in model.graph if n.op_type in op_types and n.domain in ("", "ai.onnx")]
    ends = _first_and_last_weighted(candidates) if exclude_first_last else set()
    shapes = shape_tensors(model.graph)
    planned, skipped = [], []
    for node in candidates:
        try:
            if name_matches(node, tuple(exclude)):
                raise Skip("excluded by name pattern")
            if node in ends:
                raise Skip("first or last weighted layer (exclude_first_last)")
            _check_data(node, shapes)
            _check_quantizable(node)
            planned.append(node)
        except Skip as skip:
            skipped.append(LayerReport.skipped(node, str(skip)))
    return planned, skipped


def has_constant_weight(node: ir.Node) -> bool:
    """A Conv/ConvTranspose/Gemm/MatMul whose input 1 is a constant: its weight is quantized
    per channel (the other weighted nodes multiply two activations)."""
    return node.op_type in WEIGHTED and is_constant(node.inputs[1])


def constant_bias(node: ir.Node) -> ir.Value | None:
    """The bias of a Conv/ConvTranspose/Gemm when it is a constant."""
    bias = bias_input(node)
    return bias if is_constant(bias) else None


def _check_data(node: ir.Node, shapes: set[str]) -> None:
    """Skip a node that reads or makes a shape computation or a non-float tensor."""
    values = [*_activation_inputs(node), node.outputs[0]]
    touching = [v.name for v in values if v is not None and v.name in shapes]
    if touching:
        raise Skip(f"computes a shape or reads a non-float tensor ({touching[0]!r}), not data")


def _check_quantizable(node: ir.Node) -> None:
    """Skip with the reason a planned node cannot be quantized."""
    outputs = [v for v in node.outputs[:1] if v is not None]
    if not outputs or outputs[0].dtype not in (ir.DataType.FLOAT, None):
        raise Skip("output is not float32")
    first = node.inputs[0] if node.inputs else None
    if first is None or first.const_value is not None:
        raise Skip("first input is a constant")
    if any(from_dequantize(v) for v in node.inputs if v is not None):
        raise Skip("already quantized (an input comes from DequantizeLinear)")
    if node.op_type in WEIGHTED:
        _check_weight(node)
    if node.op_type == "Pad" and not _pads_with_zero_or_copies(node):
        raise Skip("pads with a constant other than 0 (not representable in the input's range)")
    if node.op_type in CLAMPING and not _clamps_at_zero(node):
        raise Skip("clamps at a lower bound other than 0 (not absorbed by a quantized range)")


def _pads_with_zero_or_copies(node: ir.Node) -> bool:
    if node.attributes.get_string("mode", "constant") != "constant":
        return True  # edge / reflect / wrap copy input values
    value = node.inputs[2] if len(node.inputs) > 2 else None
    if value is None:
        return True
    return is_constant(value) and not np.any(weight_array(value))


def _check_weight(node: ir.Node) -> None:
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if node.op_type == "MatMul" and weight is not None and not is_constant(weight):
        return  # activation x activation: both inputs quantized per tensor
    if not is_constant(weight):
        raise Skip("weight is not a constant")
    if len(weight.uses()) > 1:
        raise Skip(f"weight is shared by {len(weight.uses())} uses")
    if node.op_type == "ConvTranspose" and node.attributes.get_int("group", 1) != 1:
        raise Skip("grouped ConvTranspose is not quantized")
    if node.op_type == "MatMul" and len(weight.shape or ()) != 2:
        raise Skip("MatMul weight is not 2-D")
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        raise Skip("Gemm with transA")
    problem = values_problem(weight_array(weight))
    if problem:
        raise Skip(problem)


def from_dequantize(value: ir.Value) -> bool:
    """Whether ``value`` is already the output of a QuantizeLinear/DequantizeLinear."""
    producer = value.producer()
    return producer is not None and producer.op_type in ("DequantizeLinear", "QuantizeLinear")


def _first_and_last_weighted(nodes: list[ir.Node]) -> set[ir.Node]:
    weighted = [n for n in nodes if n.op_type in WEIGHTED]
    return {weighted[0], weighted[-1]} if weighted else set()


def _activation_inputs(node: ir.Node) -> list[ir.Value]:
    if node.op_type in ALL_INPUTS:
        chosen = list(node.inputs)
    elif node.op_type == "MatMul" and not is_constant(node.inputs[1]):
        chosen = list(node.inputs[:2])
    else:
        chosen = list(node.inputs[:1])
    return [v for v in chosen if v is not None and not is_constant(v)]


def activation_tensors(planned: Iterable[ir.Node]) -> set[str]:
    """Names of the float activations to quantize: inputs and first output of each node.

    Graph outputs stay float: their names and precision are the model's contract, and
    onnxruntime has float-output forms of its quantized kernels for them."""
    planned = list(planned)
    chosen = set(map(id, planned))
    names = set()
    for node in planned:
        output = node.outputs[0]
        outputs = [] if output.is_graph_output() or _only_float_readers(node, chosen) else [output]
        # an input that is also a graph output is quantized for its readers; the graph output
        # itself stays the float value
        for value in [*_activation_inputs(node), *outputs]:
            if value.name and not _feeds_quantize(value) and not from_dequantize(value):
                names.add(value.name)
    return names


def _only_float_readers(node: ir.Node, chosen: set[int]) -> bool:
    """An Add/Mul whose result only float ops read (an attention mask added to the scores
    before Softmax): quantizing that result would only add error, and a mask's -10000 would
    leave the scores one level."""
    readers = [use.node for use in node.outputs[0].uses()]
    return node.op_type in ("Add", "Mul") and not any(id(r) in chosen for r in readers)


def split_by_tensors(
    planned: list[ir.Node], names: set[str]
) -> tuple[list[ir.Node], list[ir.Node]]:
    """The planned nodes that read or make none of ``names``, and those that do."""
    kept, touching = [], []
    for node in planned:
        values = [*_activation_inputs(node), node.outputs[0]]
        (touching if any(v.name in names for v in values) else kept).append(node)
    return kept, touching


def _feeds_quantize(value: ir.Value) -> bool:
    return any(use.node.op_type == "QuantizeLinear" for use in value.uses())


def input_channel_axes(planned: Iterable[ir.Node]) -> dict[str, int]:
    """Where the channels of each weighted layer's input are, for its per-channel mean."""
    axes = {}
    for node in planned:
        if node.op_type in ("Conv", "Gemm") and is_constant(node.inputs[1]):
            axes[node.inputs[0].name] = 1
        elif node.op_type == "MatMul" and is_constant(node.inputs[1]):
            axes[node.inputs[0].name] = -1
    return axes


def values_by_name(planned: list[ir.Node]) -> dict[str, ir.Value]:
    """The planned nodes' inputs and outputs, by name (to find a tensor to quantize)."""
    return {
        value.name: value
        for node in planned
        for value in [*node.inputs, *node.outputs]
        if value is not None and value.name
    }


def absorb_clamping(model: ir.Model, ranges: dict[str, Range]) -> list[tuple[str, str]]:
    """A tensor read only by a Relu/Clip(0, ·) whose output is quantized takes that output's
    range: quantizing to it clamps exactly as the activation does, so onnxruntime can drop
    the activation and fuse it into the producer's quantized kernel. Returns the tied pairs."""
    ties = []
    for node in model.graph:
        if node.op_type not in CLAMPING or not node.inputs or node.inputs[0] is None:
            continue
        source, result = node.inputs[0], node.outputs[0]
        if source.name not in ranges or result.name not in ranges or len(source.uses()) != 1:
            continue
        if source.is_graph_output() or not _clamps_at_zero(node):
            continue
        ranges[source.name] = ranges[result.name]
        ties.append((source.name, result.name))
    return ties


def _clamps_at_zero(node: ir.Node) -> bool:
    bounds = clamp_bounds(node)
    return bounds is not None and bounds[0] == 0.0


def clamp_bounds(node: ir.Node) -> tuple[float, float] | None:
    """[low, high] of a Relu or a Clip with constant bounds (inputs from opset 11, else
    attributes); None when a bound is computed at run time."""
    if node.op_type == "Relu":
        return 0.0, np.inf
    if len(node.inputs) > 1:  # opset 11+: optional inputs
        bounds = []
        for index, default in ((1, -np.inf), (2, np.inf)):
            value = node.inputs[index] if len(node.inputs) > index else None
            if value is not None and not is_constant(value):
                return None
            bounds.append(default if value is None else float(weight_array(value)))
        return bounds[0], bounds[1]
    attributes = node.attributes
    return attributes.get_float("min", -np.inf), attributes.get_float("max", np.inf)


def shared_scale_groups(
    planned: Iterable[ir.Node], names: set[str], ties: Iterable[tuple[str, str]] = ()
) -> list[set[str]]:
    """Sets of quantized tensors that must share one scale (Concat, pure data moves, and the
    given ``ties``)."""
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    for node in planned:
        if node.op_type not in SHARED_SCALE:
            continue
        inputs = node.inputs if node.op_type == "Concat" else node.inputs[:1]
        tied = [v.name for v in [*inputs, node.outputs[0]] if v is not None and v.name in names]
        for other in tied[1:]:
            parent[root(other)] = root(tied[0])
    for first, second in ties:
        parent[root(second)] = root(first)
    groups: dict[str, set[str]] = {}
    for name in parent:
        groups.setdefault(root(name), set()).add(name)
    return [group for group in groups.values() if len(group) > 1]


def tie_shared_ranges(
    model: ir.Model, planned: Iterable[ir.Node], ranges: dict[str, Range]
) -> None:
    """Give every tensor of a shared-scale group (clamping ties included) the group's range."""
    ties = absorb_clamping(model, ranges)
    for group in shared_scale_groups(planned, set(ranges), ties):
        lo = min(ranges[name][0] for name in group)
        hi = max(ranges[name][1] for name in group)
        for name in group:
            ranges[name] = (lo, hi)
