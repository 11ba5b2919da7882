"""Low-rank factorization of Gemm/MatMul/Conv weights: truncated SVD, Tucker-2 and the
depthwise-separable rewrite, optionally fitted to calibration data (output error, not weight
error). The numerics live in ``factorize.py``; this file sees the graph."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxcompress import latency
from onnxcompress.conv import ConvGeometry
from onnxcompress.emit import Namer
from onnxcompress.errors import CannotRun
from onnxcompress.graph import (
    default_opset,
    node_label,
    weight_array,
    weight_problem,
)
from onnxcompress.passes import factorize
from onnxcompress.passes.base import (
    CompressionPass,
    LayerReport,
    PassContext,
    PassReport,
    Skip,
    check_fields,
    name_matches,
)
from onnxcompress.passes.factorize import LayerStats
from onnxcompress.passes.lowrank_fold import fold_pointwise
from onnxcompress.passes.lowrank_graph import Plan, rewrite
from onnxcompress.passes.lowrank_stats import StatsCollector

#: Gemm without its C input (needed for the first, bias-free factor) exists from opset 11.
GEMM_OPTIONAL_C_OPSET = 11
SCHEMES = ("svd", "tucker2", "separable")
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)
_OPS = ("Gemm", "MatMul", "Conv")


@dataclass
class Layer:
    """A candidate seen as y = matrix·x + bias, x a row (Gemm/MatMul) or a patch (Conv)."""

    node: ir.Node
    weight: np.ndarray  # as stored
    matrix: np.ndarray  # [O, D], float64
    bias: np.ndarray | None  # effective per-output bias; None when it is not per-output
    geometry: ConvGeometry | None = None

    @property
    def kind(self) -> str:
        return self.node.op_type

    @property
    def is_conv(self) -> bool:
        return self.kind in ("Conv", "ConvTranspose")

    def macs(self, positions: int, in_positions: int | None) -> int:
        """MACs at these output rows (a ConvTranspose works per input position)."""
        rows = in_positions if self.kind == "ConvTranspose" else positions
        return self.matrix.size * (rows or positions)


class LowRank(CompressionPass):
    """Gemm/MatMul/Conv -> two thin factors A·F ≈ W by SVD; convs also by Tucker-2 or separable."""

    name = "lowrank"

    @dataclass(frozen=True)
    class Config:
        """Ranks by exactly one of rank, ratio, energy, max_error (energy=0.95 if none)."""

        scheme: str = "svd"  # conv rewrite: svd (k×k r filters + 1×1), tucker2, separable
        rank: int | None = None  # rank (tucker2: both ranks; separable: depth multiplier)
        ratio: float | None = None  # share of each layer's full rank, 0 < ratio <= 1
        energy: float | None = None  # keep singular values holding this share of sum(s^2)
        max_error: float | None = None  # smallest rank with output rel. error <= this
        data_aware: bool | None = None  # fit to calibration data (default: when it is given)
        min_saving: float = 0.1  # skip unless params and MACs drop by this share
        min_speedup: float | None = None  # skip unless it runs this many times faster (measured)
        round_to: int = 1  # round ranks up to a multiple of this (kernel-friendly)
        fold: bool = True  # merge a new 1×1 conv into the linear 1×1 conv it feeds
        ops: tuple[str, ...] | None = None  # op types (default: all; Conv for conv schemes)
        exclude: tuple[str, ...] = ()  # node-name glob patterns to leave alone
        max_rows: int = 4096  # calibration rows sampled per batch and layer

        def __post_init__(self) -> None:
            rules = ("rank", "ratio", "energy", "max_error")
            chosen = [k for k in rules if getattr(self, k) is not None]
            if len(chosen) > 1:
                raise ValueError(f"give only one of {', '.join(rules)} (got {', '.join(chosen)})")
            check_fields(
                self,
                {
                    "scheme": (lambda v: v in SCHEMES, f"one of {', '.join(SCHEMES)}"),
                    "rank": (lambda v: v >= 1, "an integer >= 1"),
                    "ratio": (lambda v: 0 < v <= 1, "in (0, 1]"),
                    "energy": (lambda v: 0 < v <= 1, "in (0, 1]"),
                    "max_error": (lambda v: v > 0, "above 0"),
                    "min_saving": (lambda v: v < 1, "below 1 (negative allows growth)"),
                    "min_speedup": (lambda v: v > 0, "above 0 (1 keeps any rewrite not slower)"),
                    "round_to": (lambda v: v >= 1, "an integer >= 1"),
                    "ops": (lambda v: v and set(v) <= set(_OPS), f"among {', '.join(_OPS)}"),
                    "max_rows": (lambda v: v >= 16, "an integer >= 16"),
                },
            )

        @property
        def op_types(self) -> tuple[str, ...]:
            """Tucker-2 and separable are conv rewrites: their ranks mean nothing for Gemm."""
            if self.ops is not None:
                return self.ops
            return _OPS if self.scheme == "svd" else ("Conv",)

    def required_opset(self, model: ir.Model) -> int | None:
        opset = default_opset(model) or GEMM_OPTIONAL_C_OPSET
        ops = self.config.op_types
        has_gemm = "Gemm" in ops and any(n.op_type == "Gemm" for n in model.graph)
        return GEMM_OPTIONAL_C_OPSET if has_gemm and opset < GEMM_OPTIONAL_C_OPSET else None

    @classmethod
    def applies(cls, node: ir.Node) -> bool:
        try:
            view(node)
            return True
        except Skip:
            return False

    def run(self, model: ir.Model, ctx: PassContext) -> PassReport:
        report = PassReport(self.name, self.config_dict())
        ops = set(self.config.op_types)
        ops |= {"ConvTranspose"} if "Conv" in ops else set()
        candidates = [n for n in model.graph if n.op_type in ops and _standard(n)]
        stats = self._stats_collector(model, candidates, ctx, report)
        namer = Namer(model)
        try:
            for node in candidates:
                try:
                    report.layers.append(self._compress(model, node, ctx, namer, stats))
                except Skip as skip:
                    report.layers.append(LayerReport.skipped(node, str(skip)))
        finally:
            if stats:
                stats.close()
        if self.config.fold:
            self._fold(model, report, namer, ctx)
        return report

    def _fold(self, model: ir.Model, report: PassReport, namer: Namer, ctx) -> None:
        """Merge each rewrite's last 1×1 conv into a linear 1×1 conv it feeds, if any."""
        by_node = {layer.detail["nodes"][-1]: layer for layer in report.rewritten}
        nodes = {node.name: node for node in model.graph if node.name in by_node}
        costs = {name: _Cost.of(node, ctx) for name, node in nodes.items()}  # before they go

        def ours(node: ir.Node) -> bool:
            return node.name in by_node

        def protected(node: ir.Node) -> bool:
            return name_matches(node, self.config.exclude)

        for name in by_node:
            node = nodes.get(name)
            if node is None or node.graph is None:  # already merged with a sibling
                continue
            folded = fold_pointwise(model.graph, node, namer, ours, protected)
            if folded is None:
                continue
            into = node_label(folded.into)
            for gone in folded.removed:
                layer = by_node[gone]
                layer.detail["nodes"] = [n for n in layer.detail["nodes"] if n != gone]
                layer.detail["merged_into"] = into
                costs[gone].book(layer, -1)
            # the absorbing conv narrows (or keeps its width): booked on the first merged layer
            absorbing = _Cost.of(folded.into, ctx, params=folded.params_delta)
            absorbing.book(by_node[folded.removed[0]], +1)

    def _stats_collector(self, model, candidates, ctx, report) -> StatsCollector | None:
        """Calibration statistics when the fit or the rank rule needs them."""
        cfg = self.config
        user_data = bool(ctx.calibration) and not ctx.synthetic_calibration
        fit = user_data if cfg.data_aware is None else cfg.data_aware  # never fit to noise
        if not (fit or user_data or cfg.max_error is not None):
            return None  # with the user's data, output errors are measured even without a fit
        if not ctx.calibration or ctx.teacher is None:
            report.notes.append("no calibration data: factors fitted to the weights only")
            return None
        if ctx.synthetic_calibration:
            report.notes.append("calibration data is synthetic: output errors are indicative")
        outputs = [n.outputs[0].name for n in candidates]
        return StatsCollector(
            model, ctx.teacher, ctx.calibration, outputs, cfg.max_rows, ctx.seed, fit
        )

    def _compress(self, model, node, ctx, namer, collector) -> LayerReport:
        if name_matches(node, self.config.exclude):
            raise Skip("excluded by name pattern")
        layer = view(node)
        if self.config.max_error is not None and collector is None:
            raise Skip("max_error needs calibration data")
        if layer.bias is None and collector is not None:
            raise Skip("a calibration fit needs a per-output bias (Gemm C is [M, N])")
        fit = self._fit(layer, collector)
        positions = _positions(node, ctx, layer), _positions(node, ctx, layer, inputs=True)
        plan = self._plan(layer, fit)
        self._guard(layer, plan, *positions)
        measured = self._latency_guard(model, layer, plan, ctx)
        rewrite(model.graph, layer, plan, namer, self.name)
        report = _layer_report(layer, plan, *positions)
        if measured is not None:
            report.detail["speedup"] = round(measured, 3)
        return report

    def _fit(self, layer: Layer, collector: StatsCollector | None) -> Fit:
        if collector is None:
            return Fit(None, False)
        if layer.kind == "ConvTranspose":  # no im2col for it yet: factors fit the weights
            if self.config.max_error is not None:
                raise Skip("max_error is not supported for ConvTranspose")
            return Fit(None, False)
        return Fit(collector.collect(layer), collector.fit)

    def _plan(self, layer: Layer, fit: Fit) -> Plan:
        scheme = self.config.scheme if layer.kind == "Conv" else "svd"
        if scheme == "svd":
            plan = self._plan_svd(layer, fit)
        elif scheme == "tucker2":
            plan = self._plan_tucker2(layer, fit)
        else:
            plan = self._plan_separable(layer, fit)
        plan.weight_error = _relative(layer.matrix - plan.last @ plan.first, layer.matrix)
        if fit.stats is not None:
            plan.output_error = fit.error(layer, plan)
        return plan

    def _plan_svd(self, layer: Layer, fit: Fit) -> Plan:
        full = min(layer.matrix.shape)
        if fit.refit:
            spectrum, vt, lower = fit.stats.whitened_svd(layer.matrix)

            def make(rank: int) -> Plan:
                first = factorize.whitened_first_stage(vt, lower, rank)
                ranks = {"rank": rank, "full_rank": full}
                return fit.apply(Plan("svd", ranks, [first], first), layer)

        else:
            u, spectrum, vt = factorize.svd(layer.matrix)

            def make(rank: int) -> Plan:
                root = np.sqrt(spectrum[:rank])
                first = root[:, None] * vt[:rank]
                ranks = {"rank": rank, "full_rank": full}
                return Plan("svd", ranks, [first], first, last=u[:, :rank] * root)

        return self._search(make, full, fit, layer) or make(self._rank(spectrum, full))

    def _plan_tucker2(self, layer: Layer, fit: Fit) -> Plan:
        weight = layer.weight.astype(np.float64)
        (_, out_s), (_, in_s) = factorize.unfold_bases(weight)
        out_full, in_full = len(out_s), len(in_s)

        def make_ranks(rank_in: int, rank_out: int) -> Plan:
            u_in, core, u_out = factorize.tucker2(weight, rank_in, rank_out)
            first = factorize.tucker2_first_stage(u_in, core)
            plan = Plan("tucker2", {"ranks": [rank_in, rank_out]}, [u_in, core], first, u_out)
            return fit.apply(plan, layer)

        widest = max(in_full, out_full)

        def make(step: int) -> Plan:  # one knob for max_error: both ranks grow together
            return make_ranks(
                math.ceil(step * in_full / widest), math.ceil(step * out_full / widest)
            )

        searched = self._search(make, widest, fit, layer)
        return searched or make_ranks(self._rank(in_s, in_full), self._rank(out_s, out_full))

    def _plan_separable(self, layer: Layer, fit: Fit) -> Plan:
        if math.prod(layer.weight.shape[2:]) == 1:  # C·m scalings then a 1×1 conv: never smaller
            raise Skip("a 1×1 conv has no kernel to separate (scheme=svd factorizes it)")
        weight = layer.weight.astype(np.float64)
        full = min(weight.shape[0], math.prod(weight.shape[2:]))

        def make(multiplier: int) -> Plan:
            depthwise, pointwise, _ = factorize.separable(weight, multiplier)
            bias = None
            if fit.refit:  # both halves refitted to the data, not only the pointwise conv
                depthwise, pointwise, bias = factorize.refine_separable(
                    fit.stats, depthwise, multiplier
                )
            first = factorize.separable_first_stage(depthwise, multiplier)
            ranks = {"multiplier": multiplier}
            return Plan("separable", ranks, [depthwise], first, pointwise, bias=bias)

        if self.config.max_error is not None:
            return self._search(make, full, fit, layer)
        if self.config.energy is not None or self._no_rule():
            share = self.config.energy if self.config.energy is not None else 0.95
            return make(factorize.separable_multiplier_for_energy(weight, share))
        return make(self._rank(None, full, round_ranks=False))

    def _no_rule(self) -> bool:
        cfg = self.config
        return all(getattr(cfg, k) is None for k in ("rank", "ratio", "energy", "max_error"))

    def _rank(self, spectrum: np.ndarray | None, full: int, round_ranks: bool = True) -> int:
        cfg = self.config
        if cfg.rank is not None:
            rank = cfg.rank
        elif cfg.ratio is not None:
            rank = math.ceil(cfg.ratio * full)
        else:
            share = cfg.energy if cfg.energy is not None else 0.95
            rank = factorize.rank_for_energy(spectrum, share)
        if round_ranks:
            rank = math.ceil(rank / cfg.round_to) * cfg.round_to
        return max(1, min(rank, full))

    def _search(self, make, full: int, fit: Fit, layer: Layer) -> Plan | None:
        """max_error: the smallest rank whose output error on calibration data is in bound
        (errors shrink as ranks grow, so a binary search finds it)."""
        bound = self.config.max_error
        if bound is None:
            return None
        low, high = 1, full
        while low < high:
            middle = (low + high) // 2
            plan = make(middle)
            if fit.error(layer, plan) <= bound:
                high = middle
            else:
                low = middle + 1
        return make(low)

    def _guard(self, layer: Layer, plan: Plan, positions: int | None, in_positions) -> None:
        """Skip a layer whose params or MACs would not drop by ``min_saving``."""
        saving = 1 - plan.params(layer) / layer.matrix.size
        macs_saving = saving
        if positions is not None:
            before = layer.macs(positions, in_positions)
            macs_saving = 1 - plan.macs(layer, positions, in_positions) / before
        floor = self.config.min_saving
        worst = min(saving, macs_saving)
        if worst < floor or (worst <= 0 and floor >= 0):
            what = "params" if saving <= macs_saving else "MACs"
            raise Skip(f"{plan.describe()} saves {worst:.0%} of {what} (min_saving {floor:.0%})")

    def _latency_guard(self, model: ir.Model, layer: Layer, plan: Plan, ctx) -> float | None:
        """With ``min_speedup``: time the layer and its rewrite alone in onnxruntime on this
        machine (one thread, kernels only) and skip a rewrite that is not that much faster."""
        floor = self.config.min_speedup
        if floor is None:
            return None
        shape = ctx.shapes.get(layer.node.inputs[0].name or "")
        if not shape or any(not isinstance(d, int) for d in shape):
            raise Skip("min_speedup needs the layer's input shape (give --dim or calibration data)")
        opsets = dict(model.opset_imports)
        before = latency.isolate(layer.node, shape, opsets)
        after = latency.isolate(layer.node, shape, opsets)
        (alone,) = after.graph
        rewrite(after.graph, view(alone), plan, Namer(after), self.name)
        try:
            measured = latency.speedup(before, after)
        except CannotRun as exc:  # e.g. no CPU kernel for this dtype: nothing to compare
            raise Skip(f"min_speedup: {exc}") from None
        if measured < floor:
            raise Skip(
                f"{plan.describe()} runs {measured:.2f}x as fast alone in onnxruntime "
                f"(min_speedup {floor:g})"
            )
        return measured


def _standard(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def view(node: ir.Node) -> Layer:
    """The layer behind a Gemm/MatMul/Conv node, or Skip with the reason it is not one."""
    weight_value = node.inputs[1] if len(node.inputs) > 1 else None
    problem = weight_problem(weight_value)
    if problem:
        raise Skip(problem)
    if weight_value.const_value.dtype not in _FLOAT_TYPES:
        raise Skip(f"weight dtype {weight_value.const_value.dtype.name} is not float")
    if node.inputs[0] is not None and node.inputs[0].const_value is not None:
        raise Skip("left operand is constant too")
    if node.op_type in ("Conv", "ConvTranspose"):
        return _conv_view(node, weight_array(weight_value))
    if len(weight_value.const_value.shape) != 2:
        raise Skip(f"weight is {len(weight_value.const_value.shape)}-D; only 2-D is factorized")
    stored = weight_array(weight_value)
    if node.op_type == "MatMul":
        return Layer(node, stored, stored.T.astype(np.float64), np.zeros(stored.shape[1]))
    return _gemm_view(node, stored)


def _conv_view(node: ir.Node, weight: np.ndarray) -> Layer:
    if weight.ndim < 3:
        raise Skip(f"conv weight is {weight.ndim}-D")
    if node.attributes.get_int("group", 1) != 1:
        raise Skip("grouped or depthwise conv (group > 1) is not factorized")
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    if bias_value is not None and bias_value.const_value is None:
        raise Skip("conv bias is not a constant")
    if node.op_type == "ConvTranspose":  # weight [C, O, *k]: output channels second
        matrix = np.moveaxis(weight, 1, 0).reshape(weight.shape[1], -1).astype(np.float64)
        geometry = None
    else:
        matrix = weight.reshape(weight.shape[0], -1).astype(np.float64)
        geometry = ConvGeometry.of(node, tuple(weight.shape[2:]))
    bias = (
        weight_array(bias_value).astype(np.float64)
        if bias_value is not None
        else np.zeros(matrix.shape[0])
    )
    return Layer(node, weight, matrix, bias, geometry)


def _gemm_view(node: ir.Node, stored: np.ndarray) -> Layer:
    attrs = node.attributes
    alpha, beta = attrs.get_float("alpha", 1.0), attrs.get_float("beta", 1.0)
    if alpha == 0:
        raise Skip("Gemm alpha is 0")
    op_b = stored.T if attrs.get_int("transB", 0) else stored  # [K, N]
    matrix = alpha * op_b.T.astype(np.float64)
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    bias: np.ndarray | None = np.zeros(matrix.shape[0])
    if bias_value is not None:
        if bias_value.const_value is None:
            raise Skip("Gemm C is not a constant")
        c = weight_array(bias_value).astype(np.float64)
        per_output = c.size in (1, matrix.shape[0]) and (c.ndim < 2 or c.shape[0] == 1)
        bias = beta * np.broadcast_to(c.reshape(-1), matrix.shape[:1]) if per_output else None
    return Layer(node, stored, matrix, bias)


def _positions(node: ir.Node, ctx: PassContext, layer: Layer, inputs: bool = False) -> int | None:
    """Rows the layer multiplies: output positions (conv) or rows (Gemm/MatMul), if known;
    with ``inputs``, the positions of its input (where Tucker-2's first 1×1 conv runs)."""
    value = node.inputs[0] if inputs else node.outputs[0]
    shape = ctx.shapes.get(value.name or "")
    if not shape or any(d is None for d in shape):
        return None
    if layer.is_conv:
        return shape[0] * math.prod(shape[2:])
    return math.prod(shape[:-1])


def _relative(difference: np.ndarray, reference: np.ndarray) -> float:
    norm = float(np.linalg.norm(reference))
    return float(np.linalg.norm(difference)) / norm if norm > 0 else 0.0


@dataclass
class Fit:
    """One layer's calibration statistics, and whether factors are refitted to them."""

    stats: LayerStats | None
    refit: bool

    def apply(self, plan: Plan, layer: Layer) -> Plan:
        """Refit the last factor (and the bias) by least squares on the student's inputs
        against the teacher's outputs, so errors do not pile up layer after layer."""
        if self.refit:
            plan.last, plan.bias = self.stats.refit(plan.first, layer.kind != "MatMul")
        return plan

    def error(self, layer: Layer, plan: Plan) -> float:
        bias = plan.bias if plan.bias is not None else layer.bias
        return self.stats.error(plan.last @ plan.first, bias)


@dataclass
class _Cost:
    """A conv's weights and MACs, to move between layer reports when a fold merges nodes."""

    params: int
    itemsize: int
    positions: int | None  # output rows, when shapes are known

    @classmethod
    def of(cls, node: ir.Node, ctx: PassContext, params: int | None = None) -> _Cost:
        weight = node.inputs[1].const_value
        shape = ctx.shapes.get(node.outputs[0].name or "")
        known = bool(shape) and all(isinstance(d, int) for d in shape)
        positions = shape[0] * math.prod(shape[2:]) if known else None
        itemsize = int(weight.dtype.itemsize)
        return cls(weight.size if params is None else params, itemsize, positions)

    def book(self, layer: LayerReport, sign: int) -> None:
        layer.params_after += sign * self.params
        layer.bytes_after += sign * self.params * self.itemsize
        if self.positions is not None and layer.macs_after is not None:
            layer.macs_after += sign * self.params * self.positions


def _layer_report(layer: Layer, plan: Plan, positions, in_positions) -> LayerReport:
    before = layer.matrix.size
    after = plan.params(layer)
    itemsize = layer.weight.dtype.itemsize
    return LayerReport(
        node=node_label(layer.node),
        op_type=layer.kind,
        action="rewritten",
        detail={"scheme": plan.scheme, **plan.ranks, "nodes": plan.node_names},
        params_before=before,
        params_after=after,
        bytes_before=layer.weight.nbytes,
        bytes_after=after * itemsize,
        macs_before=layer.macs(positions, in_positions) if positions else None,
        macs_after=plan.macs(layer, positions, in_positions) if positions else None,
        weight_error=plan.weight_error,
        output_error=plan.output_error,
    )
