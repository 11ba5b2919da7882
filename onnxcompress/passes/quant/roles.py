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
    """Names of the tensors that compute shapes: made from Shape/Size (forward), read as a
    shape input (backward through the nodes that only feed such inputs), or of a known type
    other than float32."""
    names: set[str] = set()
    nodes = list(graph)
    changed = True
    while changed:  # forward and backward until nothing new: graphs are small, sweeps few
        changed = _forward(nodes, names) | _backward(nodes, names)
    for node in nodes:
        for value in [*node.inputs, *node.outputs]:
            if value is not None and value.name and value.dtype not in DATA_TYPES:
                names.add(value.name)
    return names


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
