"""Small helpers over onnx_ir: constant weights and their axes, shapes, MACs."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

logger = logging.getLogger(__name__)

#: Weights above this many bytes are left out of the protos handed to onnx's C++ checks.
_STRIP_ABOVE_BYTES = 1024

Shapes = dict[str, tuple[int | None, ...]]


def default_opset(model: ir.Model) -> int | None:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx"))


def weight_problem(value: ir.Value | None, allow_shared: bool = False) -> str | None:
    """Why ``value`` cannot be rewritten as a weight, or None when it is a constant weight.

    ``allow_shared`` accepts a constant read by several nodes (the caller handles sharing)."""
    if value is None:
        return "weight input is missing"
    if value.is_graph_input():
        return "weight is a graph input (not a constant)"
    if value.const_value is None:
        producer = value.producer()
        what = f"computed by {producer.op_type}" if producer else "has no value"
        return f"weight is not a constant ({what})"
    if value.is_graph_output():
        return "weight is also a graph output"
    if len(value.uses()) > 1 and not allow_shared:
        return f"weight is shared by {len(value.uses())} uses"
    return None


def values_problem(array: np.ndarray) -> str | None:
    """Why a weight's values cannot be compressed (empty, or NaN/infinite, which break SVD,
    k-means and scales alike), or None."""
    if array.size == 0:
        return "weight is empty"
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        return "weight holds NaN or infinite values"
    return None


def is_constant(value: ir.Value | None) -> bool:
    """A value with a constant tensor that the user cannot feed (not a graph input)."""
    return value is not None and value.const_value is not None and not value.is_graph_input()


def weight_array(value: ir.Value) -> np.ndarray:
    """The constant tensor of ``value`` as a numpy array."""
    if value.const_value is None:
        raise ValueError(f"{value.name} is not a constant")
    return np.asarray(value.const_value.numpy())


def set_constant(value: ir.Value, array: np.ndarray) -> None:
    """Give the constant ``value`` new contents under the same name, and their shape."""
    value.const_value = ir.Tensor(np.ascontiguousarray(array), name=value.name)
    value.shape = ir.Shape(array.shape)


@dataclass(frozen=True)
class WeightAxes:
    """Where a weight keeps its output channels (or features) and the inputs it sums over."""

    out: int | None
    reduced: int | None


def weight_axes(node: ir.Node, index: int = 1, rank: int | None = None) -> WeightAxes:
    """The axes of the constant that ``node`` reads at input ``index``, as the op defines
    them; ``WeightAxes(None, None)`` when the op gives that input no channel meaning."""
    op = node.op_type
    if rank is None:
        value = node.inputs[index] if index < len(node.inputs) else None
        tensor = value.const_value if value is not None else None
        rank = len(tensor.shape) if tensor is not None else 2
    if index == 1 and op == "Conv":
        return WeightAxes(0, 1)
    if index == 1 and op == "ConvTranspose":
        return WeightAxes(1, 0)
    if index == 1 and op == "Gemm":
        return WeightAxes(0, 1) if node.attributes.get_int("transB", 0) else WeightAxes(1, 0)
    if index == 1 and op == "MatMul":
        return WeightAxes(rank - 1, rank - 2)
    if index == 0 and op == "Gather" and node.attributes.get_int("axis", 0) == 0:
        return WeightAxes(rank - 1, None)  # an embedding table: rows are looked up, not summed
    return WeightAxes(None, None)


def bias_input(node: ir.Node) -> ir.Value | None:
    """The bias input of a Conv/ConvTranspose/Gemm (input 2), if it has one."""
    if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.inputs) < 3:
        return None
    return node.inputs[2]


def output_bias(node: ir.Node) -> tuple[ir.Value | None, float]:
    """The bias added to a layer's output and the factor it is scaled by: a Conv/Gemm's
    input 2 (Gemm's beta), or for MatMul the other operand of a lone Add after it."""
    if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
        beta = node.attributes.get_float("beta", 1.0) if node.op_type == "Gemm" else 1.0
        return bias_input(node), beta
    uses = node.outputs[0].uses() if node.outputs else []
    if node.op_type == "MatMul" and len(uses) == 1 and uses[0].node.op_type == "Add":
        add, index = uses[0]
        return add.inputs[1 - index], 1.0
    return None, 1.0


def node_label(node: ir.Node) -> str:
    """A readable handle for a node in reports: its name, else op type and first output."""
    if node.name:
        return node.name
    first = node.outputs[0].name if node.outputs else "?"
    return f"{node.op_type}({first})"


@contextlib.contextmanager
def stripped_proto(model: ir.Model) -> Iterator[onnx.ModelProto]:
    """Yield a ModelProto of ``model`` whose large weights became typed graph inputs.

    onnx's checker and shape inference need a proto; copying gigabytes of weights into one
    only to look at types and shapes would be wasteful (and fails past 2 GiB).
    """
    graph = model.graph
    moved: list[tuple[ir.Value, ir.TensorProtocol, ir.Shape | None, ir.TypeProtocol | None]] = []
    n_inputs = len(graph.inputs)
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        if tensor is None or tensor.nbytes <= _STRIP_ABOVE_BYTES:
            continue
        moved.append((value, tensor, value.shape, value.type))
        value.shape = value.shape or ir.Shape(tensor.shape)
        value.dtype = value.dtype or tensor.dtype
        graph.initializers.pop(value.name)
        value.const_value = None
        if not value.is_graph_input():
            graph.inputs.append(value)
    try:
        yield ir.serde.serialize_model(model)
    finally:
        while len(graph.inputs) > n_inputs:
            graph.inputs.pop()
        for value, tensor, shape, type_ in moved:
            value.const_value = tensor
            value.shape, value.type = shape, type_  # so no value_info is added on save
            graph.register_initializer(value)


def infer_shapes(
    model: ir.Model, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> Shapes:
    """Static shapes of every value onnx can infer, with graph inputs pinned to ``input_shapes``.

    Unknown dimensions come back as None. A failed inference gives what is known without it.
    """
    with stripped_proto(model) as proto:
        for graph_input in proto.graph.input:
            fixed = (input_shapes or {}).get(graph_input.name)
            if fixed is not None:
                _pin_shape(graph_input, fixed)
        try:
            proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
        except Exception as exc:  # inference is best-effort accounting, never fatal
            logger.debug("shape inference failed: %s", exc)
    shapes: Shapes = {}
    graph = proto.graph
    for info in [*graph.input, *graph.value_info, *graph.output]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            dims = info.type.tensor_type.shape.dim
            shapes[info.name] = tuple(d.dim_value if d.dim_value > 0 else None for d in dims)
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def _pin_shape(info: onnx.ValueInfoProto, dims: Sequence[int]) -> None:
    shape = info.type.tensor_type.shape
    shape.ClearField("dim")
    for size in dims:
        shape.dim.add().dim_value = int(size)


def _known(shape: Sequence[int | None] | None) -> bool:
    return shape is not None and all(d is not None for d in shape)


def node_macs(node: ir.Node, shapes: Shapes) -> int | None:
    """Multiply-accumulates of a Conv/ConvTranspose/Gemm/MatMul, None if shapes are unknown."""
    ins = [shapes.get(v.name) if v is not None else None for v in node.inputs]
    out = shapes.get(node.outputs[0].name) if node.outputs else None
    op = node.op_type
    if op in ("Conv", "ConvTranspose") and len(ins) >= 2 and _known(ins[1]):
        weight = ins[1]
        per_position = math.prod(weight[1:]) * weight[0]  # one output (or input) position
        spatial = out if op == "Conv" else ins[0]
        if not _known(spatial):
            return None
        return per_position * math.prod(spatial[2:]) * spatial[0]
    if op == "Gemm" and _known(out) and len(ins) >= 2 and _known(ins[0]):
        trans_a = node.attributes.get_int("transA", 0)
        inner = ins[0][0] if trans_a else ins[0][1]
        return out[0] * out[1] * inner
    if op == "MatMul" and _known(out) and len(ins) >= 2 and _known(ins[0]):
        inner = ins[0][-1]
        return math.prod(out) * inner
    return None


def mac_operands(model: ir.Model) -> set[str]:
    """Names of the activations whose shapes MAC counting needs."""
    names = set()
    for node in model.graph:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and node.inputs:
            names.update(v.name for v in (node.inputs[0], node.outputs[0]) if v is not None)
    return names


def model_macs(model: ir.Model, shapes: Shapes) -> int:
    """Total MACs of the Conv/ConvTranspose/Gemm/MatMul nodes whose shapes are known."""
    return sum(node_macs(node, shapes) or 0 for graph in model.graphs() for node in graph)


def weight_params(model: ir.Model) -> tuple[int, int]:
    """(parameter count, bytes) over every initializer."""
    params = nbytes = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                params += value.const_value.size
                nbytes += value.const_value.nbytes
    return params, nbytes


def is_pointwise_conv(node: ir.Node, stride_one: bool) -> bool:
    """A float 1×1 Conv with constant weights, group 1, no padding: a fully connected layer
    at every position it reads (``stride_one``: at every position, as a producer whose
    reader may sample any of them, or a layer whose input statistics are its rows')."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return False
    if weight_problem(node.inputs[1]) is not None:
        return False
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and bias.const_value is None:
        return False
    attrs = node.attributes
    shape = node.inputs[1].const_value.shape
    if any(d != 1 for d in shape[2:]) or attrs.get_int("group", 1) != 1:
        return False
    if attrs.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return False
    if any(attrs.get_ints("pads", [])):
        return False
    return not stride_one or all(s == 1 for s in attrs.get_ints("strides", []))
