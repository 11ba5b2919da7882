"""Channel-graph handlers of the ops that carry channels without creating them: pass-through
and elementwise ops, normalization, Q/DQ, and the layout ops that move, join, cut or reshape
the channel axis (Concat, Split, Slice, Transpose, Flatten, Reshape, Pad, Resize). ``build``
walks a graph with these and the producers of ``channel_producers``."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from onnxcompress.graph import Shapes, node_label
from onnxcompress.passes.prune.channel_graph import (
    AttrFix,
    Blocked,
    ChannelGraph,
    ChannelMap,
    Handlers,
)
from onnxcompress.passes.prune.channel_producers import PRODUCERS

PASS_THROUGH = frozenset(
    {
        "Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu",
        "Selu", "Softplus", "Softsign", "Gelu", "Mish", "Abs", "Neg", "Exp", "Sqrt", "Erf",
        "Reciprocal", "Floor", "Ceil", "Round", "Identity", "Dropout", "Cast",
        "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
        "GlobalLpPool",
    }
)  # fmt: skip
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "PRelu"})

OPS = Handlers()


def build(graph: ir.Graph, shapes: Shapes) -> ChannelGraph:
    """Walk ``graph`` once and return its channel maps, fix-ups and groups."""
    return ChannelGraph(graph, shapes).walk({**OPS, **PRODUCERS})


def _int_list(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(v) for v in np.asarray(value.const_value.numpy()).reshape(-1)]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


@OPS(*PASS_THROUGH)
def _pass_through(cg: ChannelGraph, node: ir.Node) -> None:
    source = node.inputs[0]
    if source not in cg.maps:
        return
    cmap = cg.maps[source]
    if node.op_type in ("MaxPool", "AveragePool", "LpPool") and cmap.axis != 1:
        raise Blocked("pooling over the channel axis")
    cg.use(node, *range(len(node.inputs)))
    for output in node.outputs[: 2 if node.op_type == "Dropout" else 1]:
        cg.maps[output] = ChannelMap(cmap.axis, cmap.rank, cmap.atoms)


@OPS("Softmax", "LogSoftmax")
def _softmax(cg: ChannelGraph, node: ir.Node) -> None:
    cmap = cg.maps.get(node.inputs[0])
    if cmap is None:
        return
    opset = node.version or cg.graph.opset_imports.get("", 13)
    default = -1 if opset >= 13 else 1
    if _axis(node.attributes.get_int("axis", default), cmap.rank) == cmap.axis:
        raise Blocked(f"{node.op_type} normalizes over the channel axis")
    _pass_through(cg, node)


@OPS("Resize", "Upsample")
def _resize(cg: ChannelGraph, node: ir.Node) -> None:
    cmap = cg.maps.get(node.inputs[0])
    if cmap is None:
        return
    extra = list(node.inputs[1:])
    scales = (
        extra[1] if node.op_type == "Resize" and len(extra) > 1 else extra[0] if extra else None
    )
    sizes = extra[2] if node.op_type == "Resize" and len(extra) > 2 else None
    if sizes is not None:
        if _int_list(sizes) is None:
            raise Blocked("Resize sizes are computed at run time")
        cg.attrs.append(AttrFix(node, "resize", {"ref": node.inputs[0]}))
    elif scales is None and "scales" in node.attributes:  # Upsample before opset 9
        if node.attributes.get_floats("scales")[cmap.axis] != 1:
            raise Blocked("Upsample scales the channel axis")
    elif scales is not None:
        values = None if scales.const_value is None else scales.const_value.numpy().reshape(-1)
        if values is not None and len(values) and values[cmap.axis] != 1:
            raise Blocked("Resize scales the channel axis")
        if values is None:
            raise Blocked("Resize scales are computed at run time")
    cg.use(node, *range(len(node.inputs)))
    cg.maps[node.outputs[0]] = ChannelMap(cmap.axis, cmap.rank, cmap.atoms)


@OPS("Pad")
def _pad(cg: ChannelGraph, node: ir.Node) -> None:
    cmap = cg.maps.get(node.inputs[0])
    if cmap is None:
        return
    pads = _int_list(node.inputs[1]) if len(node.inputs) > 1 else None
    if pads is None and "pads" in node.attributes:
        pads = list(node.attributes.get_ints("pads"))
    axes = _int_list(node.inputs[3]) if len(node.inputs) > 3 else None
    if pads is None:
        raise Blocked("Pad amounts are computed at run time")
    axes = [_axis(a, cmap.rank) for a in axes] if axes else list(range(cmap.rank))
    half = len(pads) // 2
    for i, axis in enumerate(axes):
        if axis == cmap.axis and (pads[i] or pads[i + half]):
            raise Blocked("Pad adds channels")
    _pass_through(cg, node)


def _broadcast_axis(cmap: ChannelMap, shape: tuple) -> int | None:
    """The axis of ``shape`` aligned with the channel axis under numpy broadcasting."""
    axis = cmap.axis - (cmap.rank - len(shape))
    return axis if axis >= 0 else None


@OPS(*ELEMENTWISE)
def _elementwise(cg: ChannelGraph, node: ir.Node) -> None:
    tracked = [(i, v) for i, v in enumerate(node.inputs) if v is not None and v in cg.maps]
    if not tracked:
        return
    full = [(i, cg.maps[v]) for i, v in tracked if len(cg.maps[v].atoms) > 1]
    if not full:  # only single-channel tensors (e.g. an attention map): nothing to prune
        for _, v in tracked:
            cg.block(cg.maps[v].atoms, f"broadcast over channels at {node_label(node)}")
        cg.use(node, *range(len(node.inputs)))
        return
    lead_index, lead = full[0]
    ranks = [cg.rank(v) or 0 for v in node.inputs if v is not None]
    out_rank = max([*ranks, *(cg.maps[v].rank for _, v in tracked)])
    lead = ChannelMap(lead.axis + out_rank - lead.rank, out_rank, lead.atoms)
    for i, v in tracked:
        cmap = cg.maps[v]
        if len(cmap.atoms) == 1:
            cg.block(cmap.atoms, f"broadcast over channels at {node_label(node)}")
        elif cmap.axis + out_rank - cmap.rank != lead.axis or len(cmap.atoms) != len(lead.atoms):
            raise Blocked("channel axes do not line up")
        else:
            cg.unite(lead.atoms, cmap.atoms)
        cg.use(node, i)
    _other_inputs(cg, node, lead_index, lead, {i for i, _ in tracked})
    cg.maps[node.outputs[0]] = lead


def _other_inputs(cg, node, lead_index, lead: ChannelMap, tracked: set[int]) -> None:
    """Untracked inputs of an elementwise op: per-channel constants are sliced, broadcasts kept."""
    for i, value in enumerate(node.inputs):
        if value is None or i in tracked or i == lead_index:
            continue
        shape = cg.shape(value)
        if shape is None:
            raise Blocked(f"shape of {value.name} is unknown")
        axis = _broadcast_axis(lead, shape)
        if axis is None or shape[axis] == 1:
            cg.use(node, i)
        elif shape[axis] == len(lead.atoms) and value.const_value is not None:
            cg.slice_const(node, value, axis, node.outputs[0], "param")
            cg.use(node, i)
        else:
            raise Blocked(f"{value.name} varies over the channels and is not a constant")


@OPS("BatchNormalization", "InstanceNormalization")
def _normalization(cg: ChannelGraph, node: ir.Node) -> None:
    cmap = cg.maps.get(node.inputs[0])
    if cmap is None:
        return
    if cmap.axis != 1:
        raise Blocked("channel axis is not axis 1")
    if len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
        raise Blocked("training-mode outputs are used")
    for param in node.inputs[1:]:
        if param is not None:
            cg.slice_const(node, param, 0, node.outputs[0], "param")
    gamma = node.inputs[1].const_value.numpy() if node.inputs[1].const_value is not None else None
    if gamma is not None:
        for atom, scale in zip(cmap.atoms.tolist(), np.abs(gamma).tolist()):
            cg.bn_scale.setdefault(atom, scale)
    cg.use(node, *range(len(node.inputs)))
    cg.maps[node.outputs[0]] = ChannelMap(1, cmap.rank, cmap.atoms)


@OPS("QuantizeLinear", "DequantizeLinear")
def _qdq(cg: ChannelGraph, node: ir.Node) -> None:
    cmap = cg.maps.get(node.inputs[0])
    if cmap is None:
        if any(v in cg.maps for v in node.inputs[1:] if v is not None):
            raise Blocked("scale computed from channels")
        return
    axis = _axis(node.attributes.get_int("axis", 1), cmap.rank)
    for param in node.inputs[1:3]:
        if param is None:
            continue
        shape = cg.shape(param)
        if shape is None or math.prod(shape) == 1:
            continue
        if len(shape) != 1 or axis != cmap.axis or shape[0] != len(cmap.atoms):
            raise Blocked("per-channel scale is not on the channel axis")
        cg.slice_const(node, param, 0, node.outputs[0], "param")
    cg.use(node, *range(len(node.inputs)))
    cg.maps[node.outputs[0]] = ChannelMap(cmap.axis, cmap.rank, cmap.atoms)


@OPS("Concat")
def _concat(cg: ChannelGraph, node: ir.Node) -> None:
    tracked = [v for v in node.inputs if v in cg.maps]
    if not tracked:
        return
    first = cg.maps[tracked[0]]
    axis = _axis(node.attributes.get_int("axis", 1), first.rank)
    if any(cg.maps[v].axis != first.axis for v in tracked):
        raise Blocked("inputs carry channels on different axes")
    if axis != first.axis:  # joined along another axis: the same channels everywhere
        _elementwise_same(cg, node, tracked, first)
        return
    parts = []
    for value in node.inputs:
        if value in cg.maps:
            parts.append(cg.maps[value].atoms)
            continue
        shape = cg.shape(value)
        if shape is None or shape[axis] is None:
            raise Blocked(f"channel count of {value.name} is unknown")
        parts.append(cg.new_atoms(shape[axis], reason=f"comes from {value.name}, not a producer"))
    cg.use(node, *range(len(node.inputs)))
    cg.maps[node.outputs[0]] = ChannelMap(axis, first.rank, np.concatenate(parts))


def _elementwise_same(cg, node: ir.Node, tracked: list[ir.Value], first: ChannelMap) -> None:
    if len(tracked) != len(node.inputs):
        raise Blocked("joined with a tensor whose channels are not tracked")
    for value in tracked:
        if len(cg.maps[value].atoms) != len(first.atoms):
            raise Blocked("channel counts differ")
        cg.unite(first.atoms, cg.maps[value].atoms)
    cg.use(node, *range(len(node.inputs)))
    cg.maps[node.outputs[0]] = ChannelMap(first.axis, first.rank, first.atoms)


@OPS("Split")
def _split(cg: ChannelGraph, node: ir.Node) -> None:
    cmap = cg.maps.get(node.inputs[0])
    if cmap is None:
        return
    axis = _axis(node.attributes.get_int("axis", 0), cmap.rank)
    if axis != cmap.axis:
        cg.use(node, *range(len(node.inputs)))
        for output in node.outputs:
            cg.maps[output] = ChannelMap(cmap.axis, cmap.rank, cmap.atoms)
        return
    sizes = _split_sizes(node, len(cmap.atoms))
    cg.attrs.append(AttrFix(node, "split"))
    cg.use(node, *range(len(node.inputs)))
    for output, chunk in zip(node.outputs, np.split(cmap.atoms, np.cumsum(sizes)[:-1])):
        cg.maps[output] = ChannelMap(axis, cmap.rank, chunk)


def _split_sizes(node: ir.Node, total: int) -> list[int]:
    sizes = _int_list(node.inputs[1]) if len(node.inputs) > 1 else None
    if sizes is None and "split" in node.attributes:
        sizes = list(node.attributes.get_ints("split"))
    if sizes is None:
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            raise Blocked("split sizes are computed at run time")
        count = len(node.outputs)
        chunk = -(-total // count)
        sizes = [min(chunk, total - i * chunk) for i in range(count)]
    return sizes


@OPS("Slice")
def _slice(cg: ChannelGraph, node: ir.Node) -> None:
    cmap = cg.maps.get(node.inputs[0])
    if cmap is None:
        return
    starts, ends = _int_list(node.inputs[1]), _int_list(node.inputs[2])
    axes = _int_list(node.inputs[3]) if len(node.inputs) > 3 else None
    steps = _int_list(node.inputs[4]) if len(node.inputs) > 4 else None
    if starts is None or ends is None or len(node.inputs) < 3:
        raise Blocked("Slice bounds are computed at run time")
    axes = [_axis(a, cmap.rank) for a in (axes or range(len(starts)))]
    cg.use(node, *range(len(node.inputs)))
    atoms = cmap.atoms
    if cmap.axis in axes:
        i = axes.index(cmap.axis)
        if steps and steps[i] != 1:
            raise Blocked("Slice with a step on the channel axis")
        start, stop, _ = slice(starts[i], ends[i]).indices(len(atoms))
        atoms = atoms[start:stop]
        cg.attrs.append(AttrFix(node, "slice", {"index": i, "start": start, "stop": stop}))
    cg.maps[node.outputs[0]] = ChannelMap(cmap.axis, cmap.rank, atoms)


@OPS("Transpose")
def _transpose(cg: ChannelGraph, node: ir.Node) -> None:
    cmap = cg.maps.get(node.inputs[0])
    if cmap is None:
        return
    perm = node.attributes.get_ints("perm", None) or list(reversed(range(cmap.rank)))
    cg.use(node, 0)
    cg.maps[node.outputs[0]] = ChannelMap(list(perm).index(cmap.axis), cmap.rank, cmap.atoms)


@OPS("Flatten")
def _flatten(cg: ChannelGraph, node: ir.Node) -> None:
    cmap = cg.maps.get(node.inputs[0])
    if cmap is None:
        return
    axis = _axis(node.attributes.get_int("axis", 1), cmap.rank)
    shape = cg.shape(node.inputs[0])
    if axis > cmap.axis:
        raise Blocked("Flatten merges channels into the leading axis")
    if shape is None or any(d is None for d in shape[axis:]):
        raise Blocked("Flatten over dimensions of unknown size")
    inner, outer = math.prod(shape[cmap.axis + 1 :]), math.prod(shape[axis : cmap.axis])
    cg.use(node, 0)
    cg.maps[node.outputs[0]] = ChannelMap(1, 2, np.tile(np.repeat(cmap.atoms, inner), outer))


@OPS("Reshape")
def _reshape(cg: ChannelGraph, node: ir.Node) -> None:
    cmap = cg.maps.get(node.inputs[0])
    if cmap is None:
        return
    target = _int_list(node.inputs[1])
    before, after = cg.shape(node.inputs[0]), cg.shape(node.outputs[0])
    if target is None:
        raise Blocked("Reshape target is computed at run time")
    if before is None or after is None or None in before or None in after:
        raise Blocked("Reshape of unknown shapes")
    out_axis, inner = _reshape_axis(before, after, cmap.axis, len(cmap.atoms))
    cg.attrs.append(AttrFix(node, "reshape", {"axis": out_axis, "inner": inner}))
    cg.use(node, 0, 1)
    cg.maps[node.outputs[0]] = ChannelMap(out_axis, len(after), np.repeat(cmap.atoms, inner))


def _reshape_axis(before, after, axis: int, channels: int) -> tuple[int, int]:
    """The output axis holding the channels and the block of features each one becomes.

    Supported: the dims before the channel axis keep their product, and the channel axis is
    merged with (a prefix of) the dims after it.
    """
    lead = math.prod(before[:axis])
    blocks = {math.prod(before[axis + 1 : axis + 1 + k]) for k in range(len(before) - axis)}
    for out_axis in range(len(after)):
        if math.prod(after[:out_axis]) != lead or after[out_axis] % channels:
            continue
        if after[out_axis] // channels in blocks:
            return out_axis, after[out_axis] // channels
    raise Blocked("Reshape splits or mixes the channel axis")
