"""Channel-dependency groups for structured pruning (the DepGraph idea, for ONNX graphs).

One walk over the graph, in topological order, gives every activation that carries prunable
channels a *channel map*: the axis that holds them and, per position on that axis, an *atom*
id. Producers (Conv, ConvTranspose, Gemm, MatMul with a constant weight) create one atom per
output filter; pass-through ops copy the map; Concat concatenates maps, Split/Slice cut them,
Flatten/Reshape repeat each atom over the block of features it becomes, Transpose moves the
axis. Ops that tie channels together (a residual Add, Mul of two feature maps) merge atoms
position by position (union-find): merged atoms form one *channel*, removed as a unit.

While walking, every constant that must shrink with a channel is recorded as a fix-up (weights
of producers and consumers, biases, BN/IN parameters, PRelu slopes, per-channel Mul/Add
constants, Q/DQ scales) together with attribute fix-ups (depthwise group, Split sizes, Slice
bounds, Reshape shapes). Anything the walk does not understand, graph outputs, values read by
subgraphs and shared weights block the atoms they touch, with the reason. Never guess.

A *group* is the set of channels created by the same set of producers; importance and the
pruning ratio apply per group.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxcompress.emit import Namer, add_weight
from onnxcompress.graph import Shapes, node_label, weight_problem

logger = logging.getLogger(__name__)

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
PRODUCERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


class Blocked(Exception):
    """Raised by a handler: the tracked inputs of this node cannot be pruned, for this reason."""


@dataclass
class ChannelMap:
    """Which axis of a value carries prunable channels, and the atom id at each position."""

    axis: int
    rank: int
    atoms: np.ndarray


@dataclass
class Source:
    """A producer whose output filters create atoms: ``weight`` sliced on ``axis``."""

    node: ir.Node
    weight: ir.Value
    axis: int
    output: ir.Value


@dataclass
class SliceFix:
    """Keep in constant ``param``, along ``axis``, the positions of ``ref`` that survive."""

    node: ir.Node
    param: ir.Value
    axis: int
    ref: ir.Value
    role: str  # "out", "in" or "param": how the report counts it


@dataclass
class AttrFix:
    """A node whose attributes or shape inputs are recomputed from its values' kept channels."""

    node: ir.Node
    kind: str  # "group", "split", "slice", "reshape", "resize"
    info: dict = field(default_factory=dict)


@dataclass
class Group:
    """Channels created by the same producers: pruned together at one ratio."""

    sources: list[Source]
    channels: list[int]  # union-find roots
    blocked: list[str]
    blocks: list[list[int]] | None = None  # grouped conv: remove as many from each block

    @property
    def size(self) -> int:
        return len(self.channels)

    @property
    def label(self) -> str:
        return "+".join(node_label(s.node) for s in self.sources) or "(no producer)"


class ChannelGraph:
    """The walk's result: channel maps, producers, fix-ups, blocked atoms, groups."""

    def __init__(self, graph: ir.Graph, shapes: Shapes) -> None:
        self.graph = graph
        self.shapes = shapes
        self.maps: dict[ir.Value, ChannelMap] = {}
        self.sources: list[Source] = []
        self.atom_source: list[int] = []  # source index per atom, -1 for none
        self.parent: list[int] = []
        self.blocked: dict[int, str] = {}  # atom -> first reason
        self.slices: list[SliceFix] = []
        self.attrs: list[AttrFix] = []
        self.bn_scale: dict[int, float] = {}  # atom -> |gamma| of the BN it passes through
        self.partitions: list[list[np.ndarray]] = []  # grouped conv blocks of atoms
        self.handled: set[tuple[int, int]] = set()  # (id(node), input index) understood
        self._walk()

    # --- atoms -----------------------------------------------------------------------------
    def new_atoms(self, count: int, source: int = -1, reason: str | None = None) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        self.atom_source.extend([source] * count)
        atoms = np.arange(start, start + count)
        if reason:
            self.block(atoms, reason)
        return atoms

    def find(self, atom: int) -> int:
        root = atom
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[atom] != root:
            self.parent[atom], atom = root, self.parent[atom]
        return root

    def unite(self, left: np.ndarray, right: np.ndarray) -> None:
        for a, b in zip(left.tolist(), right.tolist()):
            ra, rb = self.find(a), self.find(b)
            if ra != rb:
                self.parent[rb] = ra

    def block(self, atoms: np.ndarray, reason: str) -> None:
        for atom in atoms.tolist():
            self.blocked.setdefault(atom, reason)

    # --- the walk --------------------------------------------------------------------------
    def _walk(self) -> None:
        for node in list(self.graph):
            tracked = [v for v in node.inputs if v is not None and v in self.maps]
            if node.domain not in ("", "ai.onnx"):
                self._give_up(node, tracked, f"custom op {node.domain}::{node.op_type}")
                continue
            handler = _HANDLERS.get(node.op_type)
            if handler is None:
                if tracked:
                    self._give_up(node, tracked, f"{node.op_type} is not understood")
                continue
            recorded = (len(self.slices), len(self.attrs))
            try:
                handler(self, node)
            except Blocked as why:
                del self.slices[recorded[0] :], self.attrs[recorded[1] :]
                self._give_up(node, tracked, str(why))
        self._block_unhandled_uses()
        self._block_inconsistent_shared()

    def _give_up(self, node: ir.Node, tracked: list[ir.Value], reason: str) -> None:
        for value in tracked:
            self.block(self.maps[value].atoms, f"{reason} at {node_label(node)}")
        for value in node.outputs:
            self.maps.pop(value, None)

    def _block_unhandled_uses(self) -> None:
        outputs = set(self.graph.outputs)
        for value, cmap in self.maps.items():
            if value in outputs:
                self.block(cmap.atoms, f"reaches graph output {value.name}")
            for use in value.uses():
                if (id(use.node), use.idx) in self.handled:
                    continue
                where = "a subgraph" if use.node.graph is not self.graph else use.node.op_type
                self.block(cmap.atoms, f"read by {where} ({node_label(use.node)})")

    def use(self, node: ir.Node, *indices: int) -> None:
        """Mark inputs of ``node`` as understood (their channels' fix-ups are recorded)."""
        for index in indices:
            self.handled.add((id(node), index))

    # --- helpers for handlers --------------------------------------------------------------
    def shape(self, value: ir.Value | None) -> tuple[int | None, ...] | None:
        if value is None:
            return None
        if value.const_value is not None:
            return tuple(value.const_value.shape)
        found = self.shapes.get(value.name or "")
        if found is not None:
            return found
        if value.shape is not None:
            return tuple(d if isinstance(d, int) else None for d in value.shape)
        return None

    def rank(self, value: ir.Value) -> int | None:
        shape = self.shape(value)
        return len(shape) if shape is not None else None

    def slice_const(self, node: ir.Node, param: ir.Value, axis: int, ref: ir.Value, role: str):
        """Record that ``param`` shrinks with ``ref``'s channels (shared constants: see below)."""
        problem = weight_problem(param)
        if problem and not problem.startswith("weight is shared"):
            raise Blocked(f"{role} constant {param.name}: {problem}")
        self.slices.append(SliceFix(node, param, axis, ref, role))

    def _block_inconsistent_shared(self) -> None:
        """A constant read by several nodes (a Q/DQ pair's scale) may shrink only when every
        reader slices it on the same axis for the same channels."""
        fixes: dict[ir.Value, list[SliceFix]] = {}
        for fix in self.slices:
            fixes.setdefault(fix.param, []).append(fix)
        for param, found in fixes.items():
            if len(param.uses()) < 2:
                continue
            roots = [[self.find(a) for a in self.maps[f.ref].atoms.tolist()] for f in found]
            consistent = len(found) == len(param.uses()) and all(
                f.axis == found[0].axis and r == roots[0] for f, r in zip(found, roots)
            )
            if not consistent:
                for fix in found:
                    self.block(self.maps[fix.ref].atoms, f"constant {param.name} is shared")

    def groups(self) -> list[Group]:
        """Channels (union-find roots) grouped by the set of producers that create them."""
        members: dict[int, list[int]] = {}
        for atom in range(len(self.parent)):
            members.setdefault(self.find(atom), []).append(atom)
        by_key: dict[tuple[int, ...], Group] = {}
        for root, atoms in members.items():
            key = tuple(sorted({self.atom_source[a] for a in atoms if self.atom_source[a] >= 0}))
            group = by_key.setdefault(key, Group([self.sources[i] for i in key], [], []))
            group.channels.append(root)
            for atom in atoms:
                reason = self.blocked.get(atom) or (None if key else "no producer")
                if reason and reason not in group.blocked:
                    group.blocked.append(reason)
        groups = list(by_key.values())
        self._attach_partitions(groups)
        return groups

    def _attach_partitions(self, groups: list[Group]) -> None:
        """Give each group the grouped-conv blocks it must shrink evenly, or block it."""
        owner = {root: group for group in groups for root in group.channels}
        for partition in self.partitions:
            blocks = [sorted({self.find(a) for a in block.tolist()}) for block in partition]
            roots = [r for block in blocks for r in block]
            touched = {id(owner[r]): owner[r] for r in roots}
            group = next(iter(touched.values()))
            fits = len(touched) == 1 and len(set(roots)) == len(roots) == group.size
            fits = fits and len({len(b) for b in blocks}) == 1
            if fits and group.blocks not in (None, blocks):
                fits = sorted(map(tuple, group.blocks)) == sorted(map(tuple, blocks))
            if fits:
                group.blocks = blocks
                continue
            for found in touched.values():
                found.blocked.append("grouped conv blocks do not match the channel groups")

    def members(self) -> dict[int, list[int]]:
        found: dict[int, list[int]] = {}
        for atom in range(len(self.parent)):
            found.setdefault(self.find(atom), []).append(atom)
        return found


# --- handlers: one small function per op family ------------------------------------------------
Handler = Callable[[ChannelGraph, ir.Node], None]
_HANDLERS: dict[str, Handler] = {}


def handles(*ops: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        for op in ops:
            _HANDLERS[op] = handler
        return handler

    return register


def _int_list(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(v) for v in np.asarray(value.const_value.numpy()).reshape(-1)]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


@handles(*PASS_THROUGH)
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


@handles("Softmax", "LogSoftmax")
def _softmax(cg: ChannelGraph, node: ir.Node) -> None:
    cmap = cg.maps.get(node.inputs[0])
    if cmap is None:
        return
    opset = node.version or cg.graph.opset_imports.get("", 13)
    default = -1 if opset >= 13 else 1
    if _axis(node.attributes.get_int("axis", default), cmap.rank) == cmap.axis:
        raise Blocked(f"{node.op_type} normalizes over the channel axis")
    _pass_through(cg, node)


@handles("Resize", "Upsample")
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


@handles("Pad")
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


@handles(*ELEMENTWISE)
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


def _producer_weight(node: ir.Node) -> tuple[ir.Value, int, int] | None:
    """(weight, output-filter axis, input-channel axis) of a producer, None if not one."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is None or weight.const_value is None:
        return None
    rank = len(weight.const_value.shape)
    if node.op_type == "Conv":
        return weight, 0, 1
    if node.op_type == "ConvTranspose":
        return weight, 1, 0
    if rank != 2:
        return None
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        return weight, 0, 1
    return weight, 1, 0


@handles("Conv", "ConvTranspose")
def _conv(cg: ChannelGraph, node: ir.Node) -> None:
    found = _producer_weight(node)
    groups = node.attributes.get_int("group", 1)
    cmap = cg.maps.get(node.inputs[0])
    if found is None:
        if cmap is not None:
            raise Blocked("weight is not a constant")
        return
    weight, out_axis, in_axis = found
    shape = weight.const_value.shape
    if groups > 1:
        return _grouped_conv(cg, node, weight, groups, cmap)
    if cmap is not None:
        if cmap.axis != 1:
            raise Blocked("channel axis is not axis 1")
        cg.slice_const(node, weight, in_axis, node.inputs[0], "in")
        cg.use(node, 0)
    _new_source(cg, node, weight, out_axis, shape[out_axis], len(shape))


def _new_source(cg, node: ir.Node, weight: ir.Value, axis: int, count: int, rank: int) -> None:
    problem = weight_problem(weight)
    output = node.outputs[0]
    index = len(cg.sources)
    cg.sources.append(Source(node, weight, axis, output))
    reason = f"weight {problem}" if problem else None
    out_axis = rank - 1 if node.op_type in ("Gemm", "MatMul") else 1
    cg.maps[output] = ChannelMap(out_axis, rank, cg.new_atoms(count, index, reason))
    if problem:
        return
    cg.slices.append(SliceFix(node, weight, axis, output, "out"))
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None:
        bias_shape = cg.shape(bias)
        if bias_shape and bias_shape[-1] == count and count > 1:
            try:
                cg.slice_const(node, bias, len(bias_shape) - 1, output, "out")
            except Blocked as why:
                cg.block(cg.maps[output].atoms, str(why))


def _grouped_conv(cg, node, weight, groups: int, cmap: ChannelMap | None) -> None:
    """Depthwise (one input channel per group): a per-channel op whose group count shrinks."""
    shape = weight.const_value.shape
    if node.op_type != "Conv" or shape[0] % groups:
        raise Blocked(f"grouped {node.op_type} (group={groups}) is not pruned")
    if shape[1] != 1 or shape[0] != groups:
        return _even_groups(cg, node, weight, groups, cmap)
    if cmap is None:
        return
    if cmap.axis != 1 or len(cmap.atoms) != groups:
        raise Blocked("depthwise conv does not line up with the channel axis")
    cg.slice_const(node, weight, 0, node.outputs[0], "param")
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None:
        cg.slice_const(node, bias, 0, node.outputs[0], "param")
    cg.attrs.append(AttrFix(node, "group", {"ref": node.outputs[0]}))
    cg.use(node, *range(len(node.inputs)))
    cg.maps[node.outputs[0]] = ChannelMap(1, cmap.rank, cmap.atoms)


def _even_groups(cg, node, weight, groups: int, cmap: ChannelMap | None) -> None:
    """Grouped conv: every group must lose as many input (and output) channels as the others.

    The weight [C_out, C_in/g, k, k] is rebuilt group by group at removal time.
    """
    shape = weight.const_value.shape
    if weight_problem(weight):
        raise Blocked(f"weight {weight_problem(weight)}")
    if cmap is not None:
        if cmap.axis != 1 or len(cmap.atoms) != shape[1] * groups:
            raise Blocked("grouped conv does not line up with the channel axis")
        cg.partitions.append(np.split(cmap.atoms, groups))
        cg.use(node, 0)
    index = len(cg.sources)
    output = node.outputs[0]
    cg.sources.append(Source(node, weight, 0, output))
    cg.maps[output] = ChannelMap(1, len(shape), cg.new_atoms(shape[0], index))
    cg.partitions.append(np.split(cg.maps[output].atoms, groups))
    info = {"weight": weight, "groups": groups, "input": node.inputs[0], "output": output}
    cg.attrs.append(AttrFix(node, "grouped", info))
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None:
        cg.slice_const(node, bias, 0, output, "out")


@handles("Gemm", "MatMul")
def _dense(cg: ChannelGraph, node: ir.Node) -> None:
    found = _producer_weight(node)
    cmap = cg.maps.get(node.inputs[0])
    if found is None or node.inputs[0] is None or node.inputs[0].const_value is not None:
        if cmap is not None or (len(node.inputs) > 1 and node.inputs[1] in cg.maps):
            raise Blocked(f"{node.op_type} between two activations")
        return
    weight, out_axis, in_axis = found
    if cmap is not None:
        trans_a = node.op_type == "Gemm" and node.attributes.get_int("transA", 0)
        wanted = (0 if trans_a else 1) if node.op_type == "Gemm" else cmap.rank - 1
        if cmap.axis != wanted:
            raise Blocked("channels are not the reduced axis")
        cg.slice_const(node, weight, in_axis, node.inputs[0], "in")
        cg.use(node, 0)
    rank = 2 if node.op_type == "Gemm" else cg.rank(node.inputs[0])
    if rank is None:
        return
    _new_source(cg, node, weight, out_axis, weight.const_value.shape[out_axis], rank)


@handles("BatchNormalization", "InstanceNormalization")
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


@handles("QuantizeLinear", "DequantizeLinear")
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


@handles("Concat")
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


@handles("Split")
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


@handles("Slice")
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


@handles("Transpose")
def _transpose(cg: ChannelGraph, node: ir.Node) -> None:
    cmap = cg.maps.get(node.inputs[0])
    if cmap is None:
        return
    perm = node.attributes.get_ints("perm", None) or list(reversed(range(cmap.rank)))
    cg.use(node, 0)
    cg.maps[node.outputs[0]] = ChannelMap(list(perm).index(cmap.axis), cmap.rank, cmap.atoms)


@handles("Flatten")
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


@handles("Reshape")
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


def build(graph: ir.Graph, shapes: Shapes) -> ChannelGraph:
    """Walk ``graph`` once and return its channel maps, fix-ups and groups."""
    return ChannelGraph(graph, shapes)


def kept_positions(cg: ChannelGraph, value: ir.Value, pruned: np.ndarray) -> np.ndarray:
    """Indices along ``value``'s channel axis that survive, given a mask of pruned atoms."""
    return np.flatnonzero(~pruned[cg.maps[value].atoms])


def pruned_atoms(cg: ChannelGraph, channels: Sequence[int]) -> np.ndarray:
    """A mask over atoms: True for every atom of the given channels (union-find roots)."""
    chosen = set(channels)
    return np.array([cg.find(a) in chosen for a in range(len(cg.parent))], dtype=bool)


def apply(cg: ChannelGraph, pruned: np.ndarray, namer: Namer) -> None:
    """Remove the pruned atoms everywhere: constants, attributes, activation shapes."""
    done: set[tuple[int, int]] = set()
    for fix in cg.slices:
        if (id(fix.param), fix.axis) in done:
            continue
        done.add((id(fix.param), fix.axis))
        array = np.asarray(fix.param.const_value.numpy())
        kept = kept_positions(cg, fix.ref, pruned)
        _set_const(fix.param, np.take(array, kept, axis=fix.axis))
    for fix in cg.attrs:
        _ATTR_FIXES[fix.kind](cg, fix, pruned, namer)
    for value, cmap in cg.maps.items():
        if value.shape is not None and len(value.shape) == cmap.rank:
            dims = list(value.shape)
            dims[cmap.axis] = int((~pruned[cmap.atoms]).sum())
            value.shape = ir.Shape(dims)


def _set_const(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.Tensor(np.ascontiguousarray(array), name=value.name)
    value.shape = ir.Shape(array.shape)


def _replace_input(node: ir.Node, index: int, array: np.ndarray, namer: Namer) -> None:
    """Give ``node`` a fresh constant input (the old one may be shared), dropping the old."""
    old = node.inputs[index]
    base = old.name if old is not None and old.name else f"{node.name or node.op_type}.{index}"
    new = add_weight(node.graph, namer, f"{base}.pruned", array)
    while len(node.inputs) <= index:
        node.resize_inputs(len(node.inputs) + 1)
    node.replace_input_with(index, new)
    unused = old is not None and not old.uses() and old.name in node.graph.initializers
    if unused and not old.is_graph_input() and not old.is_graph_output():
        node.graph.initializers.pop(old.name)


def _kept_count(cg: ChannelGraph, value: ir.Value, pruned: np.ndarray) -> int:
    return int((~pruned[cg.maps[value].atoms]).sum())


def _fix_group(cg, fix: AttrFix, pruned, namer) -> None:
    count = _kept_count(cg, fix.info["ref"], pruned)
    fix.node.attributes["group"] = ir.AttrInt64("group", count)


def _fix_split(cg, fix: AttrFix, pruned, namer) -> None:
    node = fix.node
    sizes = np.array([_kept_count(cg, out, pruned) for out in node.outputs], dtype=np.int64)
    opset = cg.graph.opset_imports.get("", 13)
    if opset >= 13:
        node.attributes.pop("num_outputs", None)
        _replace_input(node, 1, sizes, namer)
    else:
        node.attributes["split"] = ir.AttrInt64s("split", sizes.tolist())


def _fix_slice(cg, fix: AttrFix, pruned, namer) -> None:
    node, index = fix.node, fix.info["index"]
    kept_before = np.cumsum(np.concatenate([[0], ~pruned[cg.maps[node.inputs[0]].atoms]]))
    for input_index, bound in ((1, fix.info["start"]), (2, fix.info["stop"])):
        values = np.asarray(node.inputs[input_index].const_value.numpy()).copy()
        values[index] = kept_before[bound]
        _replace_input(node, input_index, values, namer)


def _fix_reshape(cg, fix: AttrFix, pruned, namer) -> None:
    node, axis = fix.node, fix.info["axis"]
    target = np.asarray(node.inputs[1].const_value.numpy()).copy()
    if target[axis] > 0:
        target[axis] = _kept_count(cg, node.inputs[0], pruned) * fix.info["inner"]
        _replace_input(node, 1, target, namer)


def _fix_resize(cg, fix: AttrFix, pruned, namer) -> None:
    node, source = fix.node, fix.info["ref"]
    sizes = np.asarray(node.inputs[3].const_value.numpy()).copy()
    sizes[cg.maps[source].axis] = _kept_count(cg, source, pruned)
    _replace_input(node, 3, sizes, namer)


def _fix_grouped(cg, fix: AttrFix, pruned, namer) -> None:
    """Rebuild a grouped conv weight: each group keeps its own kept rows and columns."""
    info = fix.info
    weight = np.asarray(info["weight"].const_value.numpy())
    groups, rows_per, cols_per = info["groups"], weight.shape[0] // info["groups"], weight.shape[1]
    out_keep = ~pruned[cg.maps[info["output"]].atoms]
    source = info["input"]
    in_keep = (
        ~pruned[cg.maps[source].atoms] if source in cg.maps else np.ones(groups * cols_per, bool)
    )
    parts = []
    for g in range(groups):
        rows = weight[g * rows_per : (g + 1) * rows_per][
            out_keep[g * rows_per : (g + 1) * rows_per]
        ]
        parts.append(rows[:, in_keep[g * cols_per : (g + 1) * cols_per]])
    if len({p.shape[1] for p in parts}) != 1:
        raise ValueError(f"{node_label(fix.node)}: groups lost different numbers of channels")
    _set_const(info["weight"], np.concatenate(parts, axis=0))


_ATTR_FIXES = {
    "grouped": _fix_grouped,
    "group": _fix_group,
    "split": _fix_split,
    "slice": _fix_slice,
    "reshape": _fix_reshape,
    "resize": _fix_resize,
}


def describe(groups: Sequence[Group]) -> list[str]:
    return [
        f"{g.label}: {g.size} channels" + (f", not prunable: {g.blocked[0]}" if g.blocked else "")
        for g in groups
    ]
