"""Which channels to remove: per group the lowest-scoring share (``ratio``, ``layer_ratios``,
rounding and floors) or a count chosen for it (``targets``); never a value left without
channels. Also the share of a layer's MACs left, shared with the targets and the report."""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import onnx_ir as ir

from onnxcompress.graph import Shapes
from onnxcompress.passes.base import name_matches
from onnxcompress.passes.prune.channel_graph import ChannelGraph, Group, pruned_atoms


class Amounts(Protocol):
    """The options of the Prune config that decide how much to remove."""

    ratio: float
    layer_ratios: tuple[str, ...]
    rounding: int  # kept channels: a multiple of this
    min_channels: int
    max_ratio: float


def parse_layer_ratio(item: str) -> tuple[str, float]:
    """``node-glob=ratio`` as (glob, ratio); ValueError when it is not that."""
    pattern, eq, ratio = item.rpartition("=")
    try:
        value = float(ratio)
    except ValueError:
        value = -1.0
    if not eq or not pattern or not 0 <= value < 1:
        raise ValueError(
            f"layer_ratios item {item!r}: must be node-glob=ratio with ratio in [0, 1)"
        )
    return pattern, value


class Selection:
    """Chooses the atoms to prune in one channel graph, from channel scores."""

    def __init__(self, amounts: Amounts, cg: ChannelGraph, model: ir.Model, shapes: Shapes):
        self.amounts, self.cg, self.model, self.shapes = amounts, cg, model, shapes
        self.members = cg.members()

    def choose(self, prunable: list[Group], scores: dict[int, float]) -> np.ndarray:
        """The mask of pruned atoms at the configured ratios."""
        return self._pruned_at(prunable, scores, None)

    def _pruned_at(self, prunable, scores, ratio: float | None) -> np.ndarray:
        counts = {}
        for group in prunable:
            share = self._group_ratio(group) if ratio is None else ratio
            counts[id(group)] = self.count_to_remove(group.size, share)
        return self.pruned_with(prunable, scores, counts)

    def pruned_with(self, prunable, scores, counts: dict[int, int]) -> np.ndarray:
        """The mask that removes ``counts[id(group)]`` of each group's lowest-scoring channels
        (a grouped conv's evenly from each block)."""
        chosen: list[int] = []
        for group in prunable:
            count = counts.get(id(group), 0)
            for block in group.blocks or [group.channels]:
                ranked = sorted(block, key=lambda c: scores[c])
                chosen.extend(ranked[: count // len(group.blocks or [block])])
        pruned = pruned_atoms(self.cg, chosen)
        return self._keep_every_value_alive(pruned, scores)

    def _group_ratio(self, group: Group) -> float:
        for item in self.amounts.layer_ratios:
            pattern, ratio = parse_layer_ratio(item)
            if any(name_matches(s.node, (pattern,)) for s in group.sources):
                return ratio
        return self.amounts.ratio

    def count_to_remove(self, size: int, ratio: float) -> int:
        """How many of ``size`` channels go at ``ratio``, after rounding and floors."""
        amounts = self.amounts
        keep = size - math.floor(ratio * size + 1e-9)
        keep = max(keep, amounts.min_channels, math.ceil(size * (1 - amounts.max_ratio) - 1e-9))
        keep = math.ceil(keep / amounts.rounding) * amounts.rounding
        return max(0, size - min(keep, size))

    def _keep_every_value_alive(self, pruned: np.ndarray, scores) -> np.ndarray:
        """A Split or Slice output could lose all its channels: give back its best one."""
        for cmap in self.cg.maps.values():
            if len(cmap.atoms) and pruned[cmap.atoms].all():
                best = max({self.cg.find(a) for a in cmap.atoms}, key=lambda c: scores[c])
                pruned[[a for a in self.members[best]]] = False
        return pruned


def kept_share(cg: ChannelGraph, node: ir.Node, pruned: np.ndarray) -> float:
    """The share of ``node``'s MACs left once ``pruned`` is removed: its kept shares of input
    and output channels multiplied (a depthwise conv scales with its outputs only)."""
    share = 1.0
    depthwise = node.op_type == "Conv" and node.attributes.get_int("group", 1) > 1
    ends = [node.outputs[0]] if depthwise else [node.inputs[0], node.outputs[0]]
    for value in ends:
        cmap = cg.maps.get(value)
        if cmap is not None and len(cmap.atoms):
            share *= float((~pruned[cmap.atoms]).mean())
    return share
