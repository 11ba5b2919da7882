"""A global target instead of one ratio: how many channels each group gives up.

``target_latency`` (times faster in onnxruntime, one thread, batch 1), ``target_macs`` or
``target_params`` (the share kept) set what must be saved. Each group is probed at a few
shares: its channels go in reconstruction order (``reconstruction``), its sinks are refitted
to the channels left, and the model's output error on calibration data is measured with
that group alone pruned (a few probes to a session, ``probes.ProbeSession``).
What a share saves comes from each layer's own cost: its onnxruntime kernel time from a
profile of the whole model, its multiply-adds or its parameters, scaled by the share of its
channels kept. The shares are then allocated where they cost least error per unit saved (a
Lagrangian sweep), the narrow early groups and the residual streams many blocks read keep
theirs when that is where the error comes from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxcompress.calibration import Feed
from onnxcompress.graph import node_macs
from onnxcompress.latency import node_times
from onnxcompress.passes.prune.channel_graph import ChannelGraph, Group, pruned_atoms
from onnxcompress.passes.prune.reconstruction import GroupSinks, removal_order
from onnxcompress.passes.prune.selection import Selection, kept_share
from onnxcompress.probes import ProbeSession, probe_samples
from onnxcompress.runner import Runner
from onnxcompress.validate import measure_latency

#: Shares of a group probed (then rounded to ``round_to``): the allocation chooses among them.
PROBED_SHARES = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
#: Allocations at most while layers shared by two groups make savings overlap, each asking
#: for the last one's shortfall on top.
ALLOCATION_ROUNDS = 12
#: Multiply-adds a probe may run: the model's output error after pruning a group is a small
#: difference, and probes on 16 samples of EfficientNet-Lite1 allocated better than on 4
#: (held-out top-1 at 1.3x faster: 0.72 against 0.60).
PROBE_MACS = 20_000_000_000
#: Allocation aims this much past a latency target: the profile's per-kernel prediction
#: misses the measured time by a few percent either way.
LATENCY_MARGIN = 1.03


@dataclass
class Option:
    """Removing ``count`` channels of a group: the probe's output error and what it saves."""

    count: int
    error: float
    saving: float


@dataclass
class Plan:
    """Per group (by id) the channels to remove, and what the plan predicts."""

    counts: dict[int, int] = field(default_factory=dict)
    predicted_cost: float = 0.0  # the cost (µs, MACs, params) once pruned
    total_cost: float = 0.0  # before
    predicted_error: float = 0.0  # the probes' errors summed
    measured: float | None = None  # a latency target's side-by-side speed-up
    rows: list[dict] = field(default_factory=list)  # the allocation, per group, for the report


class Costs:
    """What each MAC layer costs in the target's unit, and what a pruning mask saves."""

    def __init__(self, kind: str, model: ir.Model, shapes, cg: ChannelGraph, feed: Feed):
        self.cg = cg
        self.nodes = [n for n in model.graph if node_macs(n, shapes)]
        self.feed = single_sample(model, feed)
        self._before: Runner | None = None
        if kind == "latency":
            times = node_times(model, self.feed)
            # the model as it was, for side-by-side timings once pruned copies exist (its
            # session opens at the first timing, after the probes' session has closed)
            self._before = Runner(model, "model before pruning", threads=1)
            self._before.release()
            self.cost = np.array([times.get(n, 0.0) for n in self.nodes])
            self.fixed = sum(times.values()) - float(self.cost.sum())
        elif kind == "macs":
            self.cost = np.array([float(node_macs(n, shapes)) for n in self.nodes])
            self.fixed = 0.0
        else:
            self.cost = np.array([float(_params(n)) for n in self.nodes])
            self.fixed = float(_all_params(model)) - float(self.cost.sum())
        self.total = float(self.cost.sum()) + self.fixed

    def after(self, pruned: np.ndarray) -> float:
        shares = np.array([kept_share(self.cg, n, pruned) for n in self.nodes])
        return float((self.cost * shares).sum()) + self.fixed

    def measured_speedup(self, pruned_model: ir.Model) -> float:
        """How many times faster the pruned model runs than the model before: the wall clock
        a user sees (one thread, batch 1), median of interleaved runs, about 1.5 s each."""
        runs = int(np.clip(1.5e6 / max(self.total, 1.0), 20, 200))
        after = Runner(pruned_model, "pruned model", threads=1)
        try:
            old, new = measure_latency([self._before, after], self.feed, runs)
        finally:
            after.close()
        return old / new if new > 0 else math.inf

    def close(self) -> None:
        if self._before is not None:
            self._before.close()


class Planner:
    """Probes every group at a few shares and allocates counts to reach a goal cost."""

    def __init__(self, selection: Selection, cg: ChannelGraph, costs: Costs, scores) -> None:
        self.selection, self.cg, self.costs, self.scores = selection, cg, costs, scores

    def options(
        self,
        model: ir.Model,
        weighed: Sequence[GroupSinks],
        feeds: Sequence[Feed],
        macs_per_sample: float,
    ) -> dict[int, list[Option]]:
        """Per group (by id): removing nothing, then each probed share."""
        found: dict[int, list[Option]] = {}
        fed = [_fed_values(self.cg, entry) for entry in weighed]
        samples = probe_samples(macs_per_sample, PROBE_MACS)
        with ProbeSession(model, fed, feeds, samples, "model for prune sensitivity") as session:
            for entry in weighed:
                found[id(entry.group)] = self._probe_group(entry, session)
        return found

    def _probe_group(self, entry: GroupSinks, session: ProbeSession) -> list[Option]:
        group = entry.group
        counts = sorted(
            {self.selection.count_to_remove(group.size, share) for share in PROBED_SHARES} - {0}
        )
        errors: dict[int, float] = {}

        def probe(count: int, fed: dict[str, np.ndarray]) -> None:
            errors[count] = session.output_error(fed)

        if entry.problem is None:
            order = removal_order(entry.sinks, group.size, counts, probe)
            for rank, index in enumerate(order):  # the order becomes the channels' scores
                self.scores[group.channels[index]] = float(rank)
        else:  # by the channel scores, the readers' inputs zeroed (as removal leaves them)
            order = sorted(range(group.size), key=lambda i: self.scores[group.channels[i]])
            for count in counts:
                probe(count, _zeroed(self.cg, {group.channels[i] for i in order[:count]}))
        options = [Option(0, 0.0, 0.0)]
        for count in counts:
            chosen = [group.channels[i] for i in order[:count]]
            saving = self.costs.total - self.costs.after(pruned_atoms(self.cg, chosen))
            options.append(Option(count, errors[count], saving))
        return options

    def allocate(self, groups: Sequence[Group], options: dict[int, list[Option]], goal: float):
        """The counts that reach ``goal`` (a cost) at the least summed error; the need grows
        by the shortfall while layers shared by two groups make savings overlap."""
        need = self.costs.total - goal
        plan = Plan(total_cost=self.costs.total)
        for _ in range(ALLOCATION_ROUNDS):
            picks = _sweep(options, need)
            plan.counts = {gid: options[gid][i].count for gid, i in picks.items()}
            pruned = self.selection.pruned_with(groups, self.scores, plan.counts)
            plan.predicted_cost = self.costs.after(pruned)
            plan.predicted_error = sum(options[gid][i].error for gid, i in picks.items())
            short = plan.predicted_cost - goal
            if short <= 0 or all(i == len(options[g]) - 1 for g, i in picks.items()):
                break
            need += short
        plan.rows = _rows(groups, options, plan.counts)
        return plan, pruned


def _sweep(options: dict[int, list[Option]], need: float) -> dict[int, int]:
    """Per group the option minimizing error − λ·saving, for the least λ whose savings reach
    ``need`` (bisection in log λ); the largest savings when none does."""

    def picks(lam: float) -> dict[int, int]:
        return {
            gid: min(range(len(opts)), key=lambda i: (opts[i].error - lam * opts[i].saving, i))
            for gid, opts in options.items()
        }

    def saved(chosen: dict[int, int]) -> float:
        return sum(options[gid][i].saving for gid, i in chosen.items())

    if need <= 0:
        return {gid: 0 for gid in options}
    low, high = -40.0, 40.0
    if saved(picks(math.exp(high))) < need:
        return picks(math.exp(high))
    for _ in range(60):
        middle = (low + high) / 2
        if saved(picks(math.exp(middle))) >= need:
            high = middle
        else:
            low = middle
    return picks(math.exp(high))


def _rows(groups: Sequence[Group], options, counts: dict[int, int]) -> list[dict]:
    rows = []
    for group in groups:
        found = options.get(id(group))
        count = counts.get(id(group), 0)
        option = next((o for o in found or [] if o.count == count), None)
        rows.append(
            {
                "group": group.label,
                "channels": group.size,
                "kept": group.size - count,
                "probe_error": None if option is None else float(f"{option.error:.4g}"),
                "saving": None if option is None else float(f"{option.saving:.4g}"),
            }
        )
    return rows


def _zeroed(cg: ChannelGraph, removed: set[int]) -> dict[str, np.ndarray]:
    """The weights of the layers reading ``removed`` channels with those inputs zeroed."""
    fed = {}
    for fix in _reader_fixes(cg, removed):
        array = fed.get(fix.param.name)
        array = fix.param.const_value.numpy().copy() if array is None else array
        roots = [cg.find(a) for a in cg.maps[fix.ref].atoms.tolist()]
        hit = [i for i, root in enumerate(roots) if root in removed]
        index = [slice(None)] * array.ndim
        index[fix.axis] = hit
        array[tuple(index)] = 0
        fed[fix.param.name] = array
    return fed


def _reader_fixes(cg: ChannelGraph, channels: set[int]):
    for fix in cg.slices:
        if fix.role == "in" and any(cg.find(a) in channels for a in cg.maps[fix.ref].atoms):
            yield fix


def _fed_values(cg: ChannelGraph, entry: GroupSinks) -> list[ir.Value]:
    if entry.problem is not None:
        return [fix.param for fix in _reader_fixes(cg, set(entry.group.channels))]
    values = []
    for sink in entry.sinks:
        values.append(sink.node.inputs[1])
        if sink.bias is not None:
            values.append(sink.bias)
    return values


def single_sample(model: ir.Model, feed: Feed) -> Feed:
    """Batch 1: the first sample of each input whose leading axis the model leaves open."""
    open_batch = {v.name for v in model.graph.inputs if v.shape and not isinstance(v.shape[0], int)}
    return {
        name: array[:1] if name in open_batch and np.ndim(array) else array
        for name, array in feed.items()
    }


def _params(node: ir.Node) -> int:
    return sum(v.const_value.size for v in node.inputs if v is not None and v.const_value)


def _all_params(model: ir.Model) -> int:
    return sum(v.const_value.size for v in model.graph.initializers.values() if v.const_value)
