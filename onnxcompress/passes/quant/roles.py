"""Which tensors are data and which compute shapes: only data is ever quantized.

Exports compute shapes inside the graph (torch's flatten: Shape -> Gather -> Unsqueeze ->
Concat -> Reshape; an attention mask: int64 input -> Unsqueeze -> Cast -> Sub -> Mul). A Q/DQ
pair on such a tensor is at best useless and at worst invalid (QuantizeLinear takes no int64),
so the plan leaves out every node that reads or makes one. Found statically here, before any
calibration run; calibration then also drops anything that turns out not to be float32.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxcompress.graph import is_constant

#: Inputs that are read as a shape, sizes, axes or bounds, never as data (by op type).
SHAPE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "Slice": (1, 2, 3, 4),
    "Resize": (1, 2, 3),
    "Upsample": (1,),
    "Pad": (1, 3),
    "ConstantOfShape": (0,),
    "Range": (0, 1, 2),
    "TopK": (1,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "Split": (1,),
    "OneHot": (1,),
    "ReduceSum": (1,),
    "ReduceMean": (1,),
    "ReduceMax": (1,),
    "ReduceMin": (1,),
    "ReduceProd": (1,),
    "CumSum": (1,),
}
#: Ops whose output describes their input rather than carries it.
SHAPE_SOURCES = frozenset({"Shape", "Size"})
DATA_TYPES = frozenset({ir.DataType.FLOAT, None})


def shape_tensors(graph: ir.Graph) -> set[str]:
    """Names of the tensors that compute shapes: made from Shape/Size only (forward), read as
    a shape input (backward through the nodes that only feed such inputs), or of a known type
    other than float32. An integer tensor is not followed forward: a mask cast to float and
    added to attention scores is data from the Cast on."""
    nodes = list(graph)
    names: set[str] = set()
    while _forward(nodes, names):  # what Shape/Size make, and everything made from it only
        pass
    names |= {
        value.name
        for node in nodes
        for value in [*node.inputs, *node.outputs]
        if value is not None and value.name and not is_constant(value)
        if value.dtype not in DATA_TYPES
    }
    while _backward(nodes, names):  # what only ever feeds a shape input
        pass
    _follow_integer_moves(nodes, names)
    return names


#: Ops whose output has their first input's type, whatever it is.
TYPE_KEEPING = frozenset(
    {"Unsqueeze", "Squeeze", "Reshape", "Flatten", "Transpose", "Expand", "Tile", "Slice"}
    | {"Identity", "Gather", "Concat"}
)


def _follow_integer_moves(nodes: list[ir.Node], names: set[str]) -> None:
    """Without inferred types, an int64 mask moved by Unsqueeze stays int64 until a Cast."""
    integer = {v.name for n in nodes for v in [*n.inputs, *n.outputs] if v is not None and v.dtype}
    integer = {name for name in integer if name in names}  # typed, and not float32
    for node in nodes:
        first = node.inputs[0] if node.inputs else None
        if node.op_type in TYPE_KEEPING and first is not None and first.name in integer:
            outputs = {v.name for v in node.outputs if v is not None and v.name}
            integer |= outputs
            names |= outputs


def _forward(nodes: list[ir.Node], names: set[str]) -> bool:
    changed = False
    for node in nodes:
        live = [v for v in node.inputs if v is not None and not is_constant(v)]
        if node.op_type in SHAPE_SOURCES or (live and all(v.name in names for v in live)):
            changed |= _add(names, node.outputs)
    return changed


def _backward(nodes: list[ir.Node], names: set[str]) -> bool:
    changed = False
    for node in reversed(nodes):
        positions = SHAPE_INPUTS.get(node.op_type, ())
        changed |= _add(names, [v for i, v in enumerate(node.inputs) if i in positions])
        outputs = [v for v in node.outputs if v is not None]
        feeds_shapes_only = outputs and all(
            v.name in names and not v.is_graph_output() for v in outputs
        )
        if feeds_shapes_only and node.op_type not in SHAPE_SOURCES:
            changed |= _add(names, [v for v in node.inputs if not is_constant(v)])
    return changed


def _add(names: set[str], values) -> bool:
    new = {v.name for v in values if v is not None and v.name and v.name not in names}
    names |= new
    return bool(new)
