"""Which channels of a group go: the ones whose loss the next layers can best make up for.

A group's channels end in *sinks*: the linear layers (Conv, Gemm, MatMul) that read them and
sum over them. Removing channels and refitting a sink by least squares on its other inputs
leaves an error that the Gram matrix ``G`` of the sink's input gives in closed form: for one
input feature ``b`` it is ``|W_b|² / (G⁻¹)_bb`` (Optimal Brain Surgeon; the same criterion as
channel pruning by reconstruction, ThiNet). The order is built greedily, a few channels at a
time: the cheapest channels (summed over the group's sinks, each relative to its output
energy) go, and ``W`` and ``G⁻¹`` are updated for the ones that stay, so correlated channels
are not both kept for the information they share. Weight norms say nothing of this once BN
is folded into the weights.

``Sink`` collects a layer's input Gram on the calibration data; ``removal_order`` gives the
order and, at chosen counts, each sink's refitted matrix (what a probe feeds).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxcompress.calibration import Feed
from onnxcompress.graph import weight_axes
from onnxcompress.passes.prune.channel_graph import ChannelGraph, Group
from onnxcompress.passes.prune.repair import (
    NotRefittable,
    check_refittable,
    current_matrix,
    layer_arrays,
)
from onnxcompress.stats import SecondMoments, captured_parts, layer_rows

#: A sink with more input features than this (a wide k×k conv) is not refitted in the probe
#: and its channels are weighed by their diagonal term alone: its Gram would cost too much.
MAX_FEATURES = 4096
#: Ridge added to each Gram, relative to its mean diagonal: keeps G⁻¹ finite for dead inputs.
RIDGE = 1e-3
#: The greedy order removes about this share of a group's channels per step.
STEP_SHARE = 1 / 64


@dataclass
class Sink:
    """A linear layer reading some of a group's channels: ``features[i]`` are the rows of its
    ``[features(+1), outputs]`` matrix that the group's ``i``-th channel feeds."""

    node: ir.Node
    features: list[np.ndarray]
    intercept: bool
    moments: SecondMoments | None = None

    @property
    def bias(self) -> ir.Value | None:
        return self.node.inputs[2] if self.intercept else None

    def replacement(self, matrix: np.ndarray) -> dict[str, np.ndarray]:
        """What to feed for this sink refitted to ``matrix``: its weight (and bias)."""
        weight, intercept = layer_arrays(self.node, matrix)
        fed = {self.node.inputs[1].name: weight}
        if intercept is not None and self.bias is not None:
            beta = self.node.attributes.get_float("beta", 1.0) if self.node.op_type == "Gemm" else 1
            bias = self.bias.const_value
            fed[self.bias.name] = (intercept / beta).reshape(bias.shape).astype(weight.dtype)
        return fed


@dataclass
class GroupSinks:
    """The sinks of one group, or why its channels cannot be weighed by reconstruction."""

    group: Group
    sinks: list[Sink] = field(default_factory=list)
    problem: str | None = None


def group_sinks(cg: ChannelGraph, groups: Sequence[Group]) -> list[GroupSinks]:
    """Per group, every layer that sums over its channels (from the channel graph's input
    fix-ups); a reader the refit cannot take (a grouped conv's input, a ConvTranspose) marks
    the group as not weighable."""
    owner = {root: (gi, ci) for gi, g in enumerate(groups) for ci, root in enumerate(g.channels)}
    found = [GroupSinks(g) for g in groups]
    sinks: dict[tuple[int, int], Sink] = {}
    for fix in cg.slices:
        if fix.role != "in":
            continue
        roots = [cg.find(a) for a in cg.maps[fix.ref].atoms.tolist()]
        touched = {owner[r][0] for r in roots if r in owner}
        for gi in touched:
            entry = found[gi]
            if entry.problem:
                continue
            key = (gi, id(fix.node))
            if key not in sinks:
                try:
                    sinks[key] = _new_sink(fix.node, entry.group.size)
                except NotRefittable as why:
                    entry.problem = f"{fix.node.name or fix.node.op_type}: {why}"
                    continue
                entry.sinks.append(sinks[key])
            sink = sinks[key]
            per_position = _features_per_position(fix.node)
            for position, root in enumerate(roots):
                if owner.get(root, (None,))[0] == gi:
                    rows = np.arange(position * per_position, (position + 1) * per_position)
                    channel = owner[root][1]
                    sink.features[channel] = np.concatenate([sink.features[channel], rows])
    for entry in found:
        if not entry.sinks and not entry.problem:
            entry.problem = "no layer reads its channels"
    return found


def _new_sink(node: ir.Node, channels: int) -> Sink:
    check_refittable(node)
    if _features_per_position(node) * _positions(node) > MAX_FEATURES:
        raise NotRefittable(f"over {MAX_FEATURES} input features")
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    intercept = bias is not None and bias.const_value is not None and len(bias.uses()) == 1
    empty = [np.zeros(0, dtype=np.int64) for _ in range(channels)]
    return Sink(node, empty, intercept)


def _features_per_position(node: ir.Node) -> int:
    """Rows of the layer's matrix per input channel: a conv's kernel taps, else one."""
    if node.op_type == "Conv":
        return int(np.prod(node.inputs[1].const_value.shape[2:]))
    return 1


def _positions(node: ir.Node) -> int:
    shape = node.inputs[1].const_value.shape
    features = int(np.prod(shape)) // shape[weight_axes(node).out]
    return features // _features_per_position(node)


def collect(
    model: ir.Model, sinks: Sequence[Sink], feeds: Sequence[Feed], max_rows: int, seed: int
) -> None:
    """Each sink's input Gram over the calibration data (one pass; rows sampled as the
    refit samples them)."""
    rng = np.random.default_rng(seed)
    by_node = {id(s.node): s for s in sinks}
    unique = list(by_node.values())
    names = [n for s in unique for n in (s.node.inputs[0].name, s.node.outputs[0].name)]
    for _, values in captured_parts(model, names, feeds, "model being pruned"):
        for sink in unique:
            node = sink.node
            x, y = values[node.inputs[0].name], values[node.outputs[0].name]
            x_rows, _ = layer_rows(node, x, y, max_rows, rng)
            if sink.moments is None:
                sink.moments = SecondMoments(sink.intercept, product_dtype=np.float32)
            sink.moments.add(x_rows)
    for sink in sinks:  # a node read by two groups shares one Gram
        sink.moments = by_node[id(sink.node)].moments


def usable_statistics(entries: Sequence[GroupSinks]) -> None:
    """Give a group whose sinks saw no data, or sums that overflowed, a problem: its
    channels then go by their scores."""
    for entry in entries:
        for sink in entry.sinks if entry.problem is None else []:
            if sink.moments is None:
                entry.problem = "no calibration statistics"
            elif not np.isfinite(sink.moments.xx).all():
                entry.problem = "calibration statistics overflow (values too large)"


class _SinkState:
    """A sink during the greedy order: its matrix and inverse Gram as channels go."""

    def __init__(self, sink: Sink) -> None:
        gram = sink.moments.xx
        self.sink = sink
        self.matrix = current_matrix(sink.node, len(gram))
        ridge = RIDGE * max(float(np.trace(gram)) / len(gram), 1e-12)
        self.inverse = np.linalg.pinv(gram + ridge * np.eye(len(gram)), hermitian=True)
        energy = float(np.sum(self.matrix * (gram @ self.matrix)))
        self.scale = 1.0 / energy if energy > 0 else 0.0

    def costs(self, channels: np.ndarray) -> np.ndarray:
        """Each channel's error if it alone went now (its features' diagonal terms)."""
        diag = np.maximum(np.diag(self.inverse), 1e-30)
        rows = np.square(self.matrix).sum(1) / diag
        return np.array([rows[self.sink.features[c]].sum() for c in channels]) * self.scale

    def remove(self, channels: Sequence[int]) -> None:
        rows = np.concatenate([self.sink.features[c] for c in channels])
        if not len(rows):
            return
        block = self.inverse[np.ix_(rows, rows)]
        solve = np.linalg.pinv(block, hermitian=True)
        columns = self.inverse[:, rows]
        self.matrix = self.matrix - columns @ (solve @ self.matrix[rows])
        self.inverse = self.inverse - columns @ solve @ columns.T
        self.matrix[rows] = 0.0
        self.inverse[rows] = 0.0
        self.inverse[:, rows] = 0.0


def removal_order(
    sinks: Sequence[Sink],
    size: int,
    stops: Sequence[int],
    at_stop: Callable[[int, dict[str, np.ndarray]], None] | None = None,
) -> list[int]:
    """Channel indices of the group (0..size-1) in the order they go; at each count in
    ``stops`` (increasing), ``at_stop(count, replacement)`` gets the sinks refitted to the
    channels left."""
    states = [_SinkState(s) for s in sinks]
    left = np.arange(size)
    order: list[int] = []
    step = max(1, math.ceil(size * STEP_SHARE))
    pending = sorted(set(stops))
    last = pending[-1] if pending else 0
    while len(order) < last:
        target = next(s for s in pending if s > len(order))
        take = min(step, target - len(order))
        cost = sum(state.costs(left) for state in states)
        chosen = left[np.argsort(cost, kind="stable")[:take]]
        for state in states:
            state.remove(chosen.tolist())
        order.extend(chosen.tolist())
        left = np.setdiff1d(left, chosen)
        if len(order) == target and at_stop is not None:
            fed = {}
            for state in states:
                fed.update(state.sink.replacement(state.matrix))
            at_stop(target, fed)
    if len(order) < size:  # the rest in the order they would go next
        cost = sum(state.costs(left) for state in states)
        order.extend(left[np.argsort(cost, kind="stable")].tolist())
    return order
