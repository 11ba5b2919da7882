"""Small helpers over onnx_ir: constant weights, naming and tagging new nodes, shapes, MACs."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

logger = logging.getLogger(__name__)

PASS_TAG = "onnxcompress.pass"
#: Weights above this many bytes are left out of the protos handed to onnx's C++ checks.
_STRIP_ABOVE_BYTES = 1024

Shapes = dict[str, tuple[int | None, ...]]


def default_opset(model: ir.Model) -> int | None:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx"))


def weight_problem(value: ir.Value | None) -> str | None:
    """Why ``value`` cannot be rewritten as a weight, or None when it is a constant weight."""
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
    if len(value.uses()) > 1:
        return f"weight is shared by {len(value.uses())} uses"
    return None


def weight_array(value: ir.Value) -> np.ndarray:
    assert value.const_value is not None
    return np.asarray(value.const_value.numpy())


class Namer:
    """Hands out node and value names that are not taken yet in a model."""

    def __init__(self, model: ir.Model) -> None:
        self._taken: set[str] = set()
        for graph in model.graphs():
            self._taken.update(v.name for v in graph.inputs if v.name)
            self._taken.update(graph.initializers)
            for node in graph:
                self._taken.add(node.name or "")
                self._taken.update(o.name for o in node.outputs if o.name)

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._taken:
            name, i = f"{base}_{i}", i + 1
        self._taken.add(name)
        return name


def node_label(node: ir.Node) -> str:
    """A readable handle for a node in reports: its name, else op type and first output."""
    if node.name:
        return node.name
    first = node.outputs[0].name if node.outputs else "?"
    return f"{node.op_type}({first})"


def add_weight(graph: ir.Graph, namer: Namer, base: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer and return its value."""
    name = namer.fresh(base)
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.Tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value


def tag(node: ir.Node, pass_name: str) -> ir.Node:
    node.metadata_props[PASS_TAG] = pass_name
    return node


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
