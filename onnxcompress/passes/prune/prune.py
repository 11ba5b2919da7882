"""Structured filter pruning over channel-dependency groups, with closed-form repair; and
unstructured magnitude sparsity."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxcompress.emit import Namer, add_weight
from onnxcompress.graph import node_label, node_macs, weight_problem
from onnxcompress.passes.base import (
    CompressionPass,
    LayerReport,
    PassContext,
    PassReport,
    check_fields,
    name_matches,
)
from onnxcompress.passes.prune import channel_graph as channels
from onnxcompress.passes.prune.channel_graph import ChannelGraph, Group
from onnxcompress.passes.prune.repair import RefitResult, Target, refit
from onnxcompress.validate import Runner

logger = logging.getLogger(__name__)

IMPORTANCE = ("l1", "l2", "bn", "activation")
AGGREGATE = {"mean": np.mean, "sum": np.sum, "max": np.max}
REPAIR = ("auto", "lstsq", "bias", "none")
LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_FLOAT = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)


class Prune(CompressionPass):
    """Drop the weakest filters of each channel group, fixing every consumer; or zero small weights.

    Structured (mode=filters): channel-dependency groups from ``channels.py``; consumers are
    refitted by least squares on calibration data (or get a bias fold without data).
    Unstructured (mode=sparsity): the smallest-magnitude weights per layer or globally."""

    name = "prune"

    @dataclass(frozen=True)
    class Config:
        """Pruning amount: ``ratio`` (per group), ``layer_ratios`` overrides, or ``target_macs``."""

        mode: str = "filters"  # "filters" (structured) or "sparsity" (zero single weights)
        ratio: float = 0.3  # share of each group's channels (or of weights) to remove
        layer_ratios: tuple[str, ...] = ()  # "node-glob=ratio": groups with a matching producer
        target_macs: float | None = None  # keep this share of MACs (searches a global ratio)
        importance: str = "l1"  # l1, l2, bn (|gamma|, l1 where no BN), activation (mean |a|)
        aggregate: str = "mean"  # how a channel's scores over its producers combine
        round_to: int = 1  # kept channels per group: a multiple of this
        min_channels: int = 1  # never keep fewer channels in a group
        max_ratio: float = 0.9  # never remove more than this share of a group
        exclude: tuple[str, ...] = ()  # producer node-name globs whose groups are left alone
        scope: str = "layer"  # sparsity: per "layer" or one "global" magnitude threshold
        repair: str = "auto"  # auto (lstsq for filters, none for sparsity), lstsq, bias, none
        damping: float = 0.1  # ridge towards the unrepaired weights, relative to mean diag(XᵀX)
        max_rows: int = 4096  # rows sampled per batch and layer for the refit

        def __post_init__(self) -> None:
            check_fields(
                self,
                {
                    "mode": (lambda v: v in ("filters", "sparsity"), "filters or sparsity"),
                    "ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
                    "target_macs": (lambda v: 0 < v <= 1, "in (0, 1]"),
                    "importance": (lambda v: v in IMPORTANCE, " or ".join(IMPORTANCE)),
                    "aggregate": (lambda v: v in AGGREGATE, " or ".join(AGGREGATE)),
                    "round_to": (lambda v: v >= 1, "an integer >= 1"),
                    "min_channels": (lambda v: v >= 1, "an integer >= 1"),
                    "max_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
                    "scope": (lambda v: v in ("layer", "global"), "layer or global"),
                    "repair": (lambda v: v in REPAIR, " or ".join(REPAIR)),
                    "damping": (lambda v: v >= 0, ">= 0"),
                    "max_rows": (lambda v: v >= 1, "an integer >= 1"),
                },
            )
            for item in self.layer_ratios:
                _parse_layer_ratio(item)

    @classmethod
    def applies(cls, node: ir.Node) -> bool:
        return node.op_type in LINEAR and node.domain in ("", "ai.onnx")

    def run(self, model: ir.Model, ctx: PassContext) -> PassReport:
        report = PassReport(self.name, self.config_dict())
        if self.config.mode == "sparsity":
            _Sparsify(self.config, model, ctx, report).run()
        else:
            _FilterPruning(self.config, model, ctx, report).run()
        return report


def _parse_layer_ratio(item: str) -> tuple[str, float]:
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


class _FilterPruning:
    """One run of structured pruning: groups, scores, selection, removal, repair, report."""

    def __init__(self, config, model: ir.Model, ctx: PassContext, report: PassReport) -> None:
        self.config, self.model, self.ctx, self.report = config, model, ctx, report
        self.cg: ChannelGraph = channels.build(model.graph, ctx.shapes)
        self.groups = self.cg.groups()
        self.members = self.cg.members()
        self.namer = Namer(model)

    def run(self) -> None:
        prunable = [g for g in self.groups if self._group_problem(g) is None]
        scores = self._channel_scores()
        pruned = self._select(prunable, scores)
        self.report.notes.append(
            f"{len(self.groups)} channel groups, {len(prunable)} prunable; "
            f"{int(pruned.sum())} of {len(pruned)} channel atoms removed"
        )
        before = self._snapshot()
        targets = self._repair_targets(pruned)
        teacher = self._teacher(targets)
        means = {t.node.inputs[0].name: _expected_means(t.node.inputs[0]) for t in targets}
        channels.apply(self.cg, pruned, self.namer)
        repaired = self._repair(targets, teacher, pruned, means)
        self._report_layers(before, pruned, repaired)

    # --- which groups, how important, how many --------------------------------------------
    def _group_problem(self, group: Group) -> str | None:
        if group.blocked:
            return group.blocked[0]
        if any(name_matches(s.node, self.config.exclude) for s in group.sources):
            return "excluded by name pattern"
        return None

    def _channel_scores(self) -> dict[int, float]:
        atom_scores = self._atom_scores()
        combine = AGGREGATE[self.config.aggregate]
        scores = {}
        for root, atoms in self.members.items():
            known = [atom_scores[a] for a in atoms if not math.isnan(atom_scores[a])]
            scores[root] = float(combine(known)) if known else 0.0
        return scores

    def _atom_scores(self) -> np.ndarray:
        scores = np.full(len(self.cg.parent), np.nan)
        method = self.config.importance
        for source in self.cg.sources:
            atoms = self.cg.maps[source.output].atoms if source.output in self.cg.maps else None
            if atoms is None:
                continue
            weight = np.asarray(source.weight.const_value.numpy(), np.float64)
            rows = np.moveaxis(weight, source.axis, 0).reshape(weight.shape[source.axis], -1)
            norms = np.sqrt(np.square(rows).sum(1)) if method == "l2" else np.abs(rows).sum(1)
            scores[atoms] = norms
        if method == "bn":
            for atom, scale in self.cg.bn_scale.items():
                scores[atom] = scale
        elif method == "activation":
            self._activation_scores(scores)
        return scores

    def _activation_scores(self, scores: np.ndarray) -> None:
        """Mean |activation| of each producer's output channels over the calibration data."""
        outputs = {s.output.name: s.output for s in self.cg.sources if s.output in self.cg.maps}
        runner = Runner(self.model, "model being pruned", extra_outputs=list(outputs))
        sums: dict[str, np.ndarray] = {}
        try:
            for feed in self.ctx.calibration or []:
                for name, array in runner.capture(feed).items():
                    cmap = self.cg.maps[outputs[name]]
                    moved = np.moveaxis(np.abs(array), cmap.axis, 0)
                    sums[name] = sums.get(name, 0) + moved.reshape(len(moved), -1).mean(1)
        finally:
            runner.close()
        for name, total in sums.items():
            scores[self.cg.maps[outputs[name]].atoms] = total

    def _select(self, prunable: list[Group], scores: dict[int, float]) -> np.ndarray:
        if self.config.target_macs is not None:
            return self._select_for_macs(prunable, scores)
        return self._pruned_at(prunable, scores, None)

    def _pruned_at(self, prunable, scores, ratio: float | None) -> np.ndarray:
        chosen: list[int] = []
        for group in prunable:
            share = self._group_ratio(group) if ratio is None else ratio
            count = self._count_to_remove(group.size, share)
            for block in group.blocks or [group.channels]:  # grouped conv: evenly per block
                ranked = sorted(block, key=lambda c: scores[c])
                chosen.extend(ranked[: count // len(group.blocks or [block])])
        pruned = channels.pruned_atoms(self.cg, chosen)
        return self._keep_every_value_alive(pruned, scores)

    def _group_ratio(self, group: Group) -> float:
        for item in self.config.layer_ratios:
            pattern, ratio = _parse_layer_ratio(item)
            if any(name_matches(s.node, (pattern,)) for s in group.sources):
                return ratio
        return self.config.ratio

    def _count_to_remove(self, size: int, ratio: float) -> int:
        cfg = self.config
        keep = size - math.floor(ratio * size + 1e-9)
        keep = max(keep, cfg.min_channels, math.ceil(size * (1 - cfg.max_ratio) - 1e-9))
        keep = math.ceil(keep / cfg.round_to) * cfg.round_to
        return max(0, size - min(keep, size))

    def _keep_every_value_alive(self, pruned: np.ndarray, scores) -> np.ndarray:
        """A Split or Slice output could lose all its channels: give back its best one."""
        for cmap in self.cg.maps.values():
            if len(cmap.atoms) and pruned[cmap.atoms].all():
                best = max({self.cg.find(a) for a in cmap.atoms}, key=lambda c: scores[c])
                pruned[[a for a in self.members[best]]] = False
        return pruned

    def _select_for_macs(self, prunable, scores) -> np.ndarray:
        """Bisect a global ratio for the least pruning whose MACs share reaches the target."""
        total = self._macs_after(np.zeros(len(self.cg.parent), dtype=bool))
        low, high = 0.0, self.config.max_ratio
        best = self._pruned_at(prunable, scores, high)
        for _ in range(20):
            middle = (low + high) / 2
            pruned = self._pruned_at(prunable, scores, middle)
            if not total or self._macs_after(pruned) / total <= self.config.target_macs:
                high, best = middle, pruned
            else:
                low = middle
        return best

    def _macs_after(self, pruned: np.ndarray) -> int:
        """MACs once ``pruned`` is removed: each layer scales with its kept in/out shares."""
        total = 0
        for node in self.model.graph:
            macs = node_macs(node, self.ctx.shapes)
            if macs:
                total += round(macs * self._kept_share(node, pruned))
        return total

    def _kept_share(self, node: ir.Node, pruned: np.ndarray) -> float:
        share = 1.0
        depthwise = node.op_type == "Conv" and node.attributes.get_int("group", 1) > 1
        ends = [node.outputs[0]] if depthwise else [node.inputs[0], node.outputs[0]]
        for value in ends:
            cmap = self.cg.maps.get(value)
            if cmap is not None and len(cmap.atoms):
                share *= float((~pruned[cmap.atoms]).mean())
        return share

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
            target = Target(node, out_keep=keep)
            target.stats["original_weight"] = node.inputs[1].const_value.numpy()
            targets.append(target)
        return targets

    def _teacher(self, targets: list[Target]) -> Runner | None:
        """A session on the model as the pass found it, exposing the targets' outputs."""
        mode = self._repair_mode()
        if mode == "none" or not targets or (mode == "bias" and self._data_free):
            return None
        if not self.ctx.calibration:
            return None
        names = [t.node.outputs[0].name for t in targets]
        if mode == "bias":
            names = [t.node.inputs[0].name for t in targets]
        return Runner(self.model, "model before pruning", extra_outputs=names)

    def _repair(self, targets, teacher: Runner | None, pruned, means) -> dict[str, RefitResult]:
        mode = self._repair_mode()
        if mode == "bias" and self._data_free:
            self.report.notes.append("repair: bias fold of expected values from BN statistics")
            return _fold_bias(self.cg, targets, means, self.ctx, pruned, self.namer)
        if teacher is None:
            if targets and mode != "none":
                self.report.notes.append("repair skipped: no calibration data")
            return {}
        if mode == "lstsq" and self.ctx.synthetic_calibration:
            self.report.notes.append("repair fitted on synthetic data: pass real calibration")
        try:
            if mode == "bias":
                means = _input_means(self.cg, targets, teacher, self.ctx)
                return _fold_bias(self.cg, targets, means, self.ctx, pruned, self.namer)
            results = refit(
                self.model,
                targets,
                teacher,
                self.ctx.calibration or [],
                damping=self.config.damping,
                max_rows=self.config.max_rows,
                seed=self.ctx.seed,
            )
        finally:
            teacher.close()
        return {r.node: r for r in results}

    # --- report ---------------------------------------------------------------------------------
    def _touched_nodes(self) -> list[ir.Node]:
        nodes = {id(f.node): f.node for f in [*self.cg.slices, *self.cg.attrs]}
        return [n for n in self.model.graph if id(n) in nodes]

    def _snapshot(self) -> dict[int, tuple[int, int, int | None, float]]:
        """Per touched node: params, bytes, MACs before (and the share of MACs to keep later)."""
        return {
            id(node): (*_const_sizes(node), node_macs(node, self.ctx.shapes), 0.0)
            for node in self._touched_nodes()
        }

    def _report_layers(self, before, pruned, repaired: dict[str, RefitResult]) -> None:
        for node in self._touched_nodes():
            params, nbytes, macs, _ = before[id(node)]
            params_after, bytes_after = _const_sizes(node)
            if params_after == params and node_label(node) not in repaired:
                continue
            detail = _shape_detail(self.cg, node, pruned)
            if id(node) in self._blocked_sources:
                detail["filters"] = f"not pruned: {self._blocked_sources[id(node)]}"
            fit = repaired.get(node_label(node))
            if fit is not None:
                detail["repair"] = _repair_detail(fit)
            share = self._kept_share(node, pruned) if macs else None
            self.report.layers.append(
                LayerReport(
                    node_label(node), node.op_type, "rewritten", None, detail, params,
                    params_after, nbytes, bytes_after, macs,
                    round(macs * share) if macs else None,
                )
            )  # fmt: skip
        self._report_skipped()

    @property
    def _blocked_sources(self) -> dict[int, str]:
        found = {}
        for group in self.groups:
            problem = self._group_problem(group)
            for source in group.sources if problem else []:
                found.setdefault(id(source.node), problem)
        return found

    def _report_skipped(self) -> None:
        reported = {layer.node for layer in self.report.layers}
        for group in self.groups:
            problem = self._group_problem(group)
            for source in group.sources if problem else []:
                if node_label(source.node) not in reported:
                    reported.add(node_label(source.node))
                    self.report.layers.append(LayerReport.skipped(source.node, problem))


def _repair_detail(fit: RefitResult) -> str | dict[str, float]:
    """What the repair did to a layer: its output error on calibration data, or why not."""
    if fit.skipped:
        return fit.skipped
    if fit.error_before is None:
        return "bias fold"
    return {"error_before": round(fit.error_before, 4), "error_after": round(fit.error_after, 4)}


def _const_sizes(node: ir.Node) -> tuple[int, int]:
    params = nbytes = 0
    for value in node.inputs:
        if value is not None and value.const_value is not None:
            params += value.const_value.size
            nbytes += value.const_value.nbytes
    return params, nbytes


def _shape_detail(cg: ChannelGraph, node: ir.Node, pruned: np.ndarray) -> dict:
    detail = {}
    for key, value in (("in_channels", node.inputs[0]), ("out_channels", node.outputs[0])):
        cmap = cg.maps.get(value) if value is not None else None
        if cmap is not None:
            detail[key] = [len(cmap.atoms), int((~pruned[cmap.atoms]).sum())]
    return detail


def _fold_bias(cg, targets: list[Target], means: dict, ctx: PassContext, pruned, namer):
    """Fold the mean contribution of removed input channels into each consumer's bias.

    The means are measured on the calibration feeds, or without data expected from the BN
    statistics upstream. For a padded convolution each kernel tap is weighted by the share
    of output positions where it reads inside the image (a bias holds the average).
    """
    results = {}
    for target in targets:
        node = target.node
        removed = np.flatnonzero(pruned[cg.maps[node.inputs[0]].atoms])
        label = node_label(node)
        mean = means.get(node.inputs[0].name)
        try:
            if mean is None or np.isnan(mean[removed]).any():
                raise ValueError("expected value of the removed channels is unknown without data")
            shift = _removed_contribution(node, target, removed, mean, ctx)
        except ValueError as why:
            results[label] = RefitResult(label, skipped=str(why))
            continue
        if target.out_keep is not None:
            shift = shift[target.out_keep]
        _add_to_bias(node, shift, namer)
        results[label] = RefitResult(label)
    return results


def _expected_means(value: ir.Value) -> np.ndarray | None:
    """Per-channel expected value of an activation from BN statistics alone, or None.

    Understood chains: BatchNormalization (mean beta, std |gamma|), then optionally Relu
    (a rectified Gaussian), Identity/Dropout, average pooling (keeps the mean).
    """
    stats = _expected_stats(value)
    return None if stats is None else stats[0]


def _expected_stats(value: ir.Value) -> tuple[np.ndarray, np.ndarray | None] | None:
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "BatchNormalization":
        gamma, beta = (node.inputs[i].const_value for i in (1, 2))
        if gamma is None or beta is None:
            return None
        return np.asarray(beta.numpy(), np.float64), np.abs(np.asarray(gamma.numpy(), np.float64))
    upstream = _expected_stats(node.inputs[0]) if node.inputs else None
    if upstream is None:
        return None
    if node.op_type in ("Identity", "Dropout"):
        return upstream
    if node.op_type in ("AveragePool", "GlobalAveragePool"):
        return upstream[0], None
    if node.op_type == "Relu" and upstream[1] is not None:
        return _rectified(*upstream), None
    return None


def _rectified(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """E[max(0, x)] for x ~ N(mean, std²), per channel."""
    std = np.maximum(std, 1e-12)
    z = mean / std
    cdf = 0.5 * (1 + np.array([math.erf(v / math.sqrt(2)) for v in z]))
    pdf = np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return mean * cdf + std * pdf


def _input_means(cg, targets, teacher: Runner, ctx: PassContext) -> dict[str, np.ndarray]:
    sums: dict[str, np.ndarray] = {}
    batches = 0
    for feed in ctx.calibration or []:
        batches += 1
        for name, array in teacher.capture(feed).items():
            value = next(t.node.inputs[0] for t in targets if t.node.inputs[0].name == name)
            moved = np.moveaxis(array, cg.maps[value].axis, 0)
            sums[name] = sums.get(name, 0) + moved.reshape(len(moved), -1).mean(1)
    return {name: total / max(batches, 1) for name, total in sums.items()}


def _removed_contribution(node, target: Target, removed, means, ctx: PassContext) -> np.ndarray:
    weight = np.asarray(target.stats["original_weight"], np.float64)
    if node.op_type == "Conv":
        if node.attributes.get_int("group", 1) != 1 or weight.ndim != 4:
            raise ValueError("only plain 2-D convolutions get a bias fold")
        coverage = _tap_coverage(node, ctx.shapes.get(node.inputs[0].name), weight.shape[2:])
        taps = (weight[:, removed] * coverage).sum(axis=(2, 3))  # [O, removed]
        return taps @ means[removed]
    if node.op_type == "Gemm" and node.attributes.get_float("beta", 1.0) != 0:
        trans_b = node.attributes.get_int("transB", 0)
        rows = (weight.T if trans_b else weight)[removed]  # [removed, N]
        alpha, beta = (node.attributes.get_float(k, 1.0) for k in ("alpha", "beta"))
        return alpha * (means[removed] @ rows) / beta
    raise ValueError(f"{node.op_type} has no bias to fold into")


def _tap_coverage(node: ir.Node, shape, kernel) -> np.ndarray:
    """Per kernel tap, the share of output positions where it reads inside the input."""
    if shape is None or len(shape) != 4 or None in shape[2:]:
        raise ValueError("input spatial size unknown")
    attrs = node.attributes
    if attrs.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise ValueError("auto_pad SAME_* is not folded")
    pads = list(attrs.get_ints("pads", [0, 0, 0, 0]))
    strides = list(attrs.get_ints("strides", [1, 1]))
    dilations = list(attrs.get_ints("dilations", [1, 1]))
    shares = []
    for axis in (0, 1):
        size, k, pad = shape[2 + axis], kernel[axis], pads[axis]
        span = dilations[axis] * (k - 1) + 1
        outputs = (size + pad + pads[axis + 2] - span) // strides[axis] + 1
        starts = np.arange(outputs) * strides[axis] - pad
        reads = starts[:, None] + np.arange(k)[None, :] * dilations[axis]
        shares.append(((reads >= 0) & (reads < size)).mean(0))
    return np.outer(shares[0], shares[1])


def _add_to_bias(node: ir.Node, shift: np.ndarray, namer: Namer) -> None:
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    dtype = node.inputs[1].const_value.dtype.numpy()
    if bias is None:
        bias = add_weight(node.graph, namer, f"{node.inputs[1].name}.bias", shift.astype(dtype))
        node.resize_inputs(3)
        node.replace_input_with(2, bias)
        return
    current = np.asarray(bias.const_value.numpy(), np.float64)
    if current.size == shift.size:
        shift = shift.reshape(current.shape)
    _set_weight(bias, (current + shift).astype(dtype))


class _Sparsify:
    """Zero the smallest-magnitude weights per layer or under one global threshold."""

    def __init__(self, config, model: ir.Model, ctx: PassContext, report: PassReport) -> None:
        self.config, self.model, self.ctx, self.report = config, model, ctx, report

    def run(self) -> None:
        layers = self._candidates()
        threshold = self._global_threshold(layers) if self.config.scope == "global" else None
        masks = {}
        originals = {}
        for node in layers:
            weight = np.asarray(node.inputs[1].const_value.numpy())
            originals[id(node)] = weight
            masks[id(node)] = self._mask(weight, threshold)
        targets = self._repair_targets(layers, masks)
        teacher = self._teacher(targets)
        for node in layers:
            _set_weight(node.inputs[1], np.where(masks[id(node)], originals[id(node)], 0))
        repaired = self._repair(targets, teacher)
        self._report(layers, masks, originals, repaired)

    def _candidates(self) -> list[ir.Node]:
        found = []
        for node in self.model.graph:
            if node.op_type not in LINEAR or node.domain not in ("", "ai.onnx"):
                continue
            weight = node.inputs[1] if len(node.inputs) > 1 else None
            problem = weight_problem(weight)
            if problem is None and weight.const_value.dtype not in _FLOAT:
                problem = f"weight dtype {weight.const_value.dtype.name} is not float"
            if problem is None and name_matches(node, self.config.exclude):
                problem = "excluded by name pattern"
            if problem:
                self.report.layers.append(LayerReport.skipped(node, problem))
            else:
                found.append(node)
        return found

    def _global_threshold(self, layers: list[ir.Node]) -> float:
        if not layers:
            return -1.0
        magnitudes = np.concatenate([np.abs(_weight_of(n)).ravel() for n in layers])
        count = math.floor(self.config.ratio * magnitudes.size)
        if count == 0:
            return -1.0
        return float(np.partition(magnitudes, count - 1)[count - 1])

    def _mask(self, weight: np.ndarray, threshold: float | None) -> np.ndarray:
        """True where a weight is kept."""
        magnitude = np.abs(weight.astype(np.float32))
        if threshold is not None:
            return magnitude > threshold
        count = math.floor(self.config.ratio * weight.size)
        keep = np.ones(weight.size, dtype=bool)
        keep[np.argsort(magnitude, axis=None, kind="stable")[:count]] = False
        return keep.reshape(weight.shape)

    def _repair_targets(self, layers, masks) -> list[Target]:
        if self.config.repair not in ("lstsq",):
            return []
        targets = []
        for node in layers:
            mask = masks[id(node)]
            if node.op_type == "Conv":
                flat = mask.reshape(mask.shape[0], -1).T
            elif node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
                flat = mask.T
            else:
                flat = mask
            targets.append(Target(node, mask=flat))
        return targets

    def _teacher(self, targets: list[Target]) -> Runner | None:
        if not targets or not self.ctx.calibration:
            return None
        names = [t.node.outputs[0].name for t in targets]
        return Runner(self.model, "model before sparsity", extra_outputs=names)

    def _repair(self, targets, teacher) -> dict[str, RefitResult]:
        if teacher is None:
            return {}
        try:
            results = refit(
                self.model, targets, teacher, self.ctx.calibration or [],
                damping=self.config.damping, max_rows=self.config.max_rows, seed=self.ctx.seed,
            )  # fmt: skip
        finally:
            teacher.close()
        return {r.node: r for r in results}

    def _report(self, layers, masks, originals, repaired) -> None:
        zeros_total = size_total = 0
        for node in layers:
            weight = np.asarray(node.inputs[1].const_value.numpy())
            zeros = int((weight == 0).sum())
            zeros_total, size_total = zeros_total + zeros, size_total + weight.size
            error = np.linalg.norm(weight - originals[id(node)]) / max(
                np.linalg.norm(originals[id(node)]), 1e-30
            )
            detail = {"sparsity": zeros / max(weight.size, 1)}
            fit = repaired.get(node_label(node))
            if fit is not None:
                detail["repair"] = _repair_detail(fit)
            self.report.layers.append(
                LayerReport(
                    node_label(node), node.op_type, "rewritten", None, detail,
                    weight.size, weight.size, weight.nbytes, weight.nbytes,
                    weight_error=float(error),
                )
            )  # fmt: skip
        share = zeros_total / size_total if size_total else 0.0
        self.report.notes.append(f"achieved sparsity {share:.4f} over {len(layers)} layers")


def _weight_of(node: ir.Node) -> np.ndarray:
    return np.asarray(node.inputs[1].const_value.numpy(), np.float32)


def _set_weight(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.Tensor(np.ascontiguousarray(array), name=value.name)
    value.shape = ir.Shape(array.shape)
