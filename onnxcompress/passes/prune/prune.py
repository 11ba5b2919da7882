"""Structured filter pruning over channel-dependency groups, with closed-form repair."""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxcompress.emit import Emitter
from onnxcompress.errors import BadData
from onnxcompress.graph import node_label, node_macs
from onnxcompress.passes.base import (
    CompressionPass,
    LayerReport,
    PassContext,
    PassReport,
    check_fields,
    name_matches,
)
from onnxcompress.passes.prune.bias_fold import expected_means, fold_bias, measured_means
from onnxcompress.passes.prune.channel_graph import ChannelGraph, Group
from onnxcompress.passes.prune.channel_ops import build
from onnxcompress.passes.prune.channel_removal import apply
from onnxcompress.passes.prune.importance import AGGREGATE, IMPORTANCE, channel_scores
from onnxcompress.passes.prune.reconstruction import (
    GroupSinks,
    collect,
    group_sinks,
    removal_order,
    usable_statistics,
)
from onnxcompress.passes.prune.repair import REFIT_OPTION_RULES, RefitResult, Target, refit
from onnxcompress.passes.prune.selection import Selection, kept_share, parse_layer_ratio
from onnxcompress.passes.prune.targets import LATENCY_MARGIN, Costs, Planner
from onnxcompress.probes import macs_per_sample
from onnxcompress.validate import Runner

logger = logging.getLogger(__name__)
REPAIR = ("auto", "lstsq", "bias", "none")
TARGET_ROUND_TO = 8
#: The search aims at the target itself; a plan within this factor of it is not refused:
#: side-by-side timings on a shared machine still move by a percent or two from run to run.
TIMING_TOLERANCE = 1.02
#: Allocations timed at most for a latency target, each goal corrected by the last timing;
#: a plan no more than this much faster than the target ends the search.
TIMED_ROUNDS = 5
CLOSE_ENOUGH = 1.03
CHANNEL_ORDERS = ("auto", "reconstruction", *IMPORTANCE)
LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class Prune(CompressionPass):
    """Drop the weakest filters of each channel group, fixing every consumer.

    Channel-dependency groups come from the channel graph (``channel_graph`` and its
    handlers); consumers are refitted by least squares on calibration data (``repair``), or get
    a bias fold without data (``bias_fold``)."""

    name = "prune"

    @dataclass(frozen=True)
    class Config:
        """Pruning amount: ``ratio`` (per group), ``layer_ratios`` overrides, or one global
        target (``target_latency``, ``target_macs``, ``target_params``) allocated per group."""

        ratio: float = 0.3  # share of each group's channels to remove
        layer_ratios: tuple[str, ...] = ()  # "node-glob=ratio": groups with a matching producer
        target_latency: float | None = None  # this many times faster (onnxruntime, 1 thread)
        target_macs: float | None = None  # keep this share of MACs
        target_params: float | None = None  # keep this share of the parameters
        # auto: reconstruction with real data, l1 without; reconstruction: the channels the
        # next layers' least-squares refit misses least; l1, l2, bn (|gamma|), activation
        importance: str = "auto"
        aggregate: str = "mean"  # how a channel's scores over its producers combine
        # kept channels per group: a multiple of this; none: 8 with a target (the channel
        # blocks of onnxruntime's CPU conv kernels: odd counts fall off its fast path; Lite1
        # at 74% of its MACs ran 0.89x as fast with any count), else 1
        round_to: int | None = None
        min_channels: int = 1  # never keep fewer channels in a group
        max_ratio: float = 0.9  # never remove more than this share of a group
        exclude: tuple[str, ...] = ()  # producer node-name globs whose groups are left alone
        repair: str = "auto"  # auto (lstsq with real data, a bias fold without), lstsq, bias, none
        # ridge towards the unrepaired weights, relative to mean diag(XᵀX); none: per layer,
        # the one that best predicts held-out calibration feeds
        damping: float | None = None
        max_rows: int = 4096  # rows sampled per batch and layer for the refit

        def __post_init__(self) -> None:
            check_fields(
                self,
                {
                    "ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
                    "target_latency": (lambda v: v >= 1, ">= 1"),
                    "target_macs": (lambda v: 0 < v <= 1, "in (0, 1]"),
                    "target_params": (lambda v: 0 < v <= 1, "in (0, 1]"),
                    "importance": (lambda v: v in CHANNEL_ORDERS, " or ".join(CHANNEL_ORDERS)),
                    "aggregate": (lambda v: v in AGGREGATE, " or ".join(AGGREGATE)),
                    "round_to": (lambda v: v is None or v >= 1, "an integer >= 1"),
                    "min_channels": (lambda v: v >= 1, "an integer >= 1"),
                    "max_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
                    "repair": (lambda v: v in REPAIR, " or ".join(REPAIR)),
                    **REFIT_OPTION_RULES,
                },
            )
            for item in self.layer_ratios:
                parse_layer_ratio(item)
            if len(self.targets()) > 1:
                raise ValueError("give one of target_latency, target_macs, target_params")

        @property
        def rounding(self) -> int:
            """``round_to``, or its default for the target given."""
            if self.round_to is not None:
                return self.round_to
            return TARGET_ROUND_TO if self.targets() else 1

        def targets(self) -> dict[str, float]:
            """The global target given: {"latency" | "macs" | "params": value}."""
            given = {
                "latency": self.target_latency,
                "macs": self.target_macs,
                "params": self.target_params,
            }
            return {kind: value for kind, value in given.items() if value is not None}

    @classmethod
    def applies(cls, node: ir.Node) -> bool:
        return node.op_type in LINEAR and node.domain in ("", "ai.onnx")

    def run(self, model: ir.Model, ctx: PassContext) -> PassReport:
        report = PassReport(self.name, self.config_dict())
        _FilterPruning(self.config, model, ctx, report, Emitter(model, self.name)).run()
        return report


class _FilterPruning:
    """One run of structured pruning: groups, scores, selection, removal, repair, report."""

    def __init__(
        self, config, model: ir.Model, ctx: PassContext, report: PassReport, emitter: Emitter
    ) -> None:
        self.config, self.model, self.ctx, self.report = config, model, ctx, report
        self.name = emitter.pass_name
        self.emitter = emitter
        self.cg: ChannelGraph = build(model.graph, ctx.shapes)
        self.groups = self.cg.groups()
        self.plan = None  # with a target: (kind, value, Plan)

    def run(self) -> None:
        problems = {id(g): self._group_problem(g) for g in self.groups}
        prunable = [g for g in self.groups if problems[id(g)] is None]
        pruned = self._choose(prunable)
        self.report.notes.append(
            f"{len(self.groups)} channel groups, {len(prunable)} prunable; "
            f"{int(pruned.sum())} of {len(pruned)} channel atoms removed"
        )
        before = self._sizes_before()
        targets = self._repair_targets(pruned)
        means = self._input_means(targets)
        with self._teacher(targets) or nullcontext() as teacher:
            apply(self.cg, pruned, self.emitter)
            repaired = self._repair(targets, teacher, pruned, means)
        _Report(self.cg, self.groups, problems, pruned).write(
            self.report, self._touched_nodes(), before, repaired
        )
        if self.plan is not None:
            self._report_target(*self.plan)

    def _report_target(self, kind: str, value: float, plan) -> None:
        """The allocation, what it predicts, and for latency the measured speed-up; a target
        not reached is a miss the pipeline refuses."""
        report = self.report
        report.allocation = plan.rows
        report.notes.append(
            f"allocation: the probes' output errors sum to {plan.predicted_error:.4g} "
            "(relative squared error of the outputs on calibration data)"
        )
        predicted = plan.total_cost / max(plan.predicted_cost, 1e-12)
        if kind == "latency":
            measured = plan.measured
            report.notes.append(
                f"target_latency={value}: predicted {predicted:.2f}x, measured {measured:.2f}x "
                "faster (onnxruntime, 1 thread, batch 1, interleaved with the model before)"
            )
            if measured * TIMING_TOLERANCE < value:
                report.missed.append(f"prune: measured {measured:.2f}x faster, target {value}x")
            return
        share = plan.predicted_cost / max(plan.total_cost, 1e-12)
        report.notes.append(f"target_{kind}={value}: {share:.3f} of the {kind} kept")
        if share > value * 1.001:
            report.missed.append(f"prune: {share:.3f} of the {kind} kept, target {value}")

    def _group_problem(self, group: Group) -> str | None:
        if group.blocked:
            return group.blocked[0]
        if any(name_matches(s.node, self.config.exclude) for s in group.sources):
            return "excluded by name pattern"
        return None

    def _choose(self, prunable: list[Group]) -> np.ndarray:
        config, ctx = self.config, self.ctx
        base = "l1" if config.importance in ("auto", "reconstruction") else config.importance
        scores = channel_scores(self.cg, base, config.aggregate, self.model, ctx.calibration)
        selection = Selection(config, self.cg, self.model, ctx.shapes)
        weighed = self._weighed(prunable)
        try:
            targets = config.targets()
            if targets:
                return self._for_target(*targets.items(), prunable, selection, scores, weighed)
            for entry in weighed:
                if entry.problem is None:
                    order = removal_order(entry.sinks, entry.group.size, [])
                    for rank, index in enumerate(order):
                        scores[entry.group.channels[index]] = float(rank)
            return selection.choose(prunable, scores)
        finally:  # the Grams (80 MB on Lite1) are not needed past the choice
            for entry in weighed:
                for sink in entry.sinks:
                    sink.moments = None

    def _weighed(self, prunable: list[Group]) -> list[GroupSinks]:
        """The groups with their sinks' input Grams, when channels go by reconstruction;
        with a target, every group (those without usable sinks probed by zeroing)."""
        order = self.config.importance
        reconstruct = order == "reconstruction" or (order == "auto" and not self._data_free)
        if not self.ctx.calibration or not (reconstruct or self.config.targets()):
            return []
        entries = group_sinks(self.cg, prunable)
        if not reconstruct:
            for entry in entries:
                entry.problem = entry.problem or f"importance={order}"
        sinks = [s for e in entries if e.problem is None for s in e.sinks]
        if sinks:
            self._progress("prune: input statistics of the layers that read the groups")
            collect(self.model, sinks, self.ctx.calibration, self.config.max_rows, self.ctx.seed)
            usable_statistics(entries)
        return entries

    def _for_target(self, target, prunable, selection, scores, weighed) -> np.ndarray:
        kind, value = target
        ctx = self.ctx
        if not ctx.calibration:
            raise BadData("prune: a target needs calibration data to weigh the channel groups")
        costs = Costs(kind, self.model, ctx.shapes, self.cg, ctx.calibration[0])
        try:
            planner = Planner(selection, self.cg, costs, scores)
            self._progress(f"prune: probing {len(weighed)} channel groups")
            macs = macs_per_sample(self.model, ctx.shapes, ctx.calibration)
            options = planner.options(self.model, weighed, ctx.calibration, macs)
            if kind == "latency":
                plan, pruned = self._timed_plan(planner, prunable, options, costs, value)
            else:
                plan, pruned = planner.allocate(prunable, options, costs.total * value)
        finally:
            costs.close()
        self.plan = (kind, value, plan)
        return pruned

    def _timed_plan(self, planner: Planner, prunable, options, costs: Costs, value: float):
        """Allocate, prune a copy, time it beside the original, and move the goal by what the
        timing showed: the profile's prediction misses either way (a conv whose channels
        become a multiple of 8 switches to a faster kernel), and overshooting costs accuracy.
        The goal is scaled by the first miss, then bisected between the tightest goal that
        missed and the loosest that met. Returns the plan with the least predicted error that
        meets the target, else the fastest."""
        goal = costs.total / (value * LATENCY_MARGIN)
        met, missed, tried = None, None, []  # goals (µs) known to meet / miss the target
        for _ in range(TIMED_ROUNDS):
            plan, pruned = planner.allocate(prunable, options, goal)
            self._progress("prune: timing a pruned copy beside the original")
            plan.measured = costs.measured_speedup(self._pruned_copy(pruned))
            tried.append((plan, pruned))
            logger.info(
                "prune: goal %.0f us, predicted %.2fx, measured %.2fx",
                goal, plan.total_cost / max(plan.predicted_cost, 1e-12), plan.measured,
            )  # fmt: skip
            meets = plan.measured >= value
            if meets and plan.measured <= value * CLOSE_ENOUGH:
                break
            if meets:
                met = goal if met is None else max(met, goal)
            else:
                missed = goal if missed is None else min(missed, goal)
            if met is not None and missed is not None:
                goal = math.sqrt(met * missed)
            else:
                goal *= plan.measured / (value * LATENCY_MARGIN)
        meeting = [t for t in tried if t[0].measured >= value]
        if meeting:
            return min(meeting, key=lambda t: t[0].predicted_error)
        return max(tried, key=lambda t: t[0].measured)

    def _pruned_copy(self, pruned: np.ndarray) -> ir.Model:
        """The model with ``pruned`` removed and no repair (it runs as fast as the repaired
        one): a clone sharing the unchanged weights, walked again (the same atoms)."""
        trial = self.model.clone()
        graph = build(trial.graph, self.ctx.shapes)
        if len(graph.parent) != len(self.cg.parent):
            raise AssertionError("the channel walk of a clone differs from the model's")
        apply(graph, pruned, Emitter(trial, self.name))
        return trial

    def _progress(self, message: str) -> None:
        if self.ctx.progress is not None:
            self.ctx.progress(message)

    def _touched_nodes(self) -> list[ir.Node]:
        nodes = {id(f.node): f.node for f in [*self.cg.slices, *self.cg.attrs]}
        return [n for n in self.model.graph if id(n) in nodes]

    def _sizes_before(self) -> dict[int, tuple[int, int, int | None]]:
        """Per touched node: params, bytes and MACs before the removal."""
        return {
            id(node): (*_const_sizes(node), node_macs(node, self.ctx.shapes))
            for node in self._touched_nodes()
        }

    # --- repair ---------------------------------------------------------------------------------
    def _repair_mode(self) -> str:
        """auto: least squares on the user's data; a data-free bias fold without it."""
        if self.config.repair != "auto":
            return self.config.repair
        return "bias" if self._data_free else "lstsq"

    @property
    def _data_free(self) -> bool:
        return self.ctx.synthetic_calibration or not self.ctx.calibration

    def _repair_targets(self, pruned: np.ndarray) -> list[Target]:
        """Consumers that lost input channels, matched on their kept output channels."""
        targets, seen = [], set()
        for fix in self.cg.slices:
            node = fix.node
            if fix.role != "in" or id(node) in seen or node.op_type not in LINEAR:
                continue
            if not pruned[self.cg.maps[fix.ref].atoms].any():
                continue
            seen.add(id(node))
            out_map = self.cg.maps.get(node.outputs[0])
            keep = None if out_map is None else np.flatnonzero(~pruned[out_map.atoms])
            weight = node.inputs[1].const_value.numpy()
            targets.append(Target(node, out_keep=keep, weight_before=weight))
        return targets

    def _input_means(self, targets: list[Target]) -> dict[str, np.ndarray | None]:
        """For a bias fold: the targets' per-channel input means before the removal, measured
        on the calibration data or, data-free, expected from BN statistics."""
        if self._repair_mode() != "bias" or not targets:
            return {}
        if self._data_free:
            return {t.node.inputs[0].name: expected_means(t.node.inputs[0]) for t in targets}
        return measured_means(self.cg, targets, self.model, self.ctx.calibration)

    def _teacher(self, targets: list[Target]) -> Runner | None:
        """For a refit: a session on the model as the pass found it, exposing the targets'
        outputs (opened before the removal)."""
        if self._repair_mode() != "lstsq" or not targets or not self.ctx.calibration:
            return None
        names = [t.node.outputs[0].name for t in targets]
        return Runner(self.model, "model before pruning", extra_outputs=names)

    def _repair(self, targets, teacher: Runner | None, pruned, means) -> dict[str, RefitResult]:
        mode = self._repair_mode()
        if mode == "bias" and self._data_free:
            self.report.notes.append("repair: bias fold of expected values from BN statistics")
        elif mode == "none" or not targets:
            return {}
        elif not self.ctx.calibration:
            self.report.notes.append("repair skipped: no calibration data")
            return {}
        if mode == "bias":
            return fold_bias(self.cg, targets, means, self.ctx.shapes, pruned, self.emitter)
        if self.ctx.synthetic_calibration:
            self.report.notes.append("repair fitted on synthetic data: pass real calibration")
        results = refit(
            self.model,
            targets,
            teacher,
            self.ctx.calibration,
            emitter=self.emitter,
            damping=self.config.damping,
            max_rows=self.config.max_rows,
            seed=self.ctx.seed,
        )
        return {r.node: r for r in results}


class _Report:
    """The layers of one pruning run: what each touched node lost, and why groups stayed."""

    def __init__(self, cg: ChannelGraph, groups, problems: dict[int, str | None], pruned):
        self.cg, self.pruned = cg, pruned
        self.refused = [(g, problems[id(g)]) for g in groups if problems[id(g)]]
        self.blocked: dict[int, str] = {}  # id(producer node) -> why its group stayed
        for group, problem in self.refused:
            for source in group.sources:
                self.blocked.setdefault(id(source.node), problem)

    def write(self, report: PassReport, touched, before, repaired) -> None:
        """A rewritten entry per touched node that changed, then the producers left alone."""
        for node in touched:
            params, nbytes, macs = before[id(node)]
            params_after, bytes_after = _const_sizes(node)
            if params_after == params and node_label(node) not in repaired:
                continue
            macs_after = round(macs * kept_share(self.cg, node, self.pruned)) if macs else None
            report.layers.append(
                LayerReport.rewritten(
                    node,
                    self._detail(node, repaired.get(node_label(node))),
                    params=(params, params_after),
                    nbytes=(nbytes, bytes_after),
                    macs=(macs, macs_after),
                )
            )
        self._skipped(report)

    def _detail(self, node: ir.Node, fit: RefitResult | None) -> dict:
        detail = {}
        for key, value in (("in_channels", node.inputs[0]), ("out_channels", node.outputs[0])):
            cmap = self.cg.maps.get(value) if value is not None else None
            if cmap is not None:
                detail[key] = [len(cmap.atoms), int((~self.pruned[cmap.atoms]).sum())]
        if id(node) in self.blocked:
            detail["filters"] = f"not pruned: {self.blocked[id(node)]}"
        if fit is not None:
            detail["repair"] = fit.detail()
        return detail

    def _skipped(self, report: PassReport) -> None:
        """Each producer of a group left alone, once, unless it was reported rewritten."""
        reported = {layer.node for layer in report.layers}
        for group, problem in self.refused:
            for source in group.sources:
                if node_label(source.node) not in reported:
                    reported.add(node_label(source.node))
                    report.layers.append(LayerReport.skipped(source.node, problem))


def _const_sizes(node: ir.Node) -> tuple[int, int]:
    params = nbytes = 0
    for value in node.inputs:
        if value is not None and value.const_value is not None:
            params += value.const_value.size
            nbytes += value.const_value.nbytes
    return params, nbytes
