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

This module holds the records and the walk's state (atoms, union-find, blocking, groups); the
per-op handlers are in ``channel_ops`` / ``channel_producers`` (``channel_ops.build`` walks a
graph with all of them) and the removal in ``channel_removal``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxcompress.graph import Shapes, node_label, weight_problem


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
    def walk(self, handlers: Mapping[str, Handler]) -> ChannelGraph:
        """Visit every node in topological order with the handler of its op type."""
        for node in list(self.graph):
            tracked = [v for v in node.inputs if v is not None and v in self.maps]
            if node.domain not in ("", "ai.onnx"):
                self._give_up(node, tracked, f"custom op {node.domain}::{node.op_type}")
                continue
            handler = handlers.get(node.op_type)
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
        return self

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
        problem = weight_problem(param, allow_shared=True)
        if problem:
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
        by_key: dict[tuple[int, ...], Group] = {}
        for root, atoms in self.members().items():
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
        """The atoms of every channel, by union-find root."""
        found: dict[int, list[int]] = {}
        for atom in range(len(self.parent)):
            found.setdefault(self.find(atom), []).append(atom)
        return found


Handler = Callable[[ChannelGraph, ir.Node], None]


class Handlers(dict):
    """Op type -> handler; ``@handlers("Relu", ...)`` registers a function for those ops."""

    def __call__(self, *ops: str) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            for op in ops:
                self[op] = handler
            return handler

        return register


def kept_positions(cg: ChannelGraph, value: ir.Value, pruned: np.ndarray) -> np.ndarray:
    """Indices along ``value``'s channel axis that survive, given a mask of pruned atoms."""
    return np.flatnonzero(~pruned[cg.maps[value].atoms])


def pruned_atoms(cg: ChannelGraph, channels: Sequence[int]) -> np.ndarray:
    """A mask over atoms: True for every atom of the given channels (union-find roots)."""
    chosen = set(channels)
    return np.array([cg.find(a) in chosen for a in range(len(cg.parent))], dtype=bool)
