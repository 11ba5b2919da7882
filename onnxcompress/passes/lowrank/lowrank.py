"""Low-rank factorization of Gemm/MatMul/Conv weights: truncated SVD, Tucker-2 and the
depthwise-separable rewrite, optionally fitted to calibration data (output error, not weight
error). The numerics live in ``factorize.py``; this file sees the graph."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxcompress import latency
from onnxcompress.emit import Emitter
from onnxcompress.errors import CannotRun
from onnxcompress.graph import default_opset
from onnxcompress.passes.base import (
    CompressionPass,
    LayerReport,
    PassContext,
    PassReport,
    Skip,
    check_fields,
    name_matches,
)
from onnxcompress.passes.lowrank import factorize
from onnxcompress.passes.lowrank.fold import fold_rewrites
from onnxcompress.passes.lowrank.layer import Layer, view
from onnxcompress.passes.lowrank.plan import Plan, rewrite
from onnxcompress.passes.lowrank.targets import INPUTS, LayerTargets
from onnxcompress.progress import Steps, tick
from onnxcompress.stats import SecondMoments
from onnxcompress.timing_cache import Timing, TimingCache

#: Gemm without its C input (needed for the first, bias-free factor) exists from opset 11.
GEMM_OPTIONAL_C_OPSET = 11
SCHEMES = ("svd", "tucker2", "separable")
_OPS = ("Gemm", "MatMul", "Conv")


class LowRank(CompressionPass):
    """Gemm/MatMul/Conv -> two thin factors A·F ≈ W by SVD; convs also by Tucker-2 or separable."""

    name = "lowrank"
    _timings: TimingCache | None = None  # min_speedup's timings, one table a run

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
        inputs: str = "student"  # fit to the inputs of the model compressed so far, or teacher

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
                    "inputs": (lambda v: v in INPUTS, f"one of {', '.join(INPUTS)}"),
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
        emitter = Emitter(model, self.name)
        # timings of layer shapes seen before (this run or an earlier one) are not repeated
        self._timings = TimingCache() if self.config.min_speedup is not None else None
        self._timed: dict[int, Timing] = {}
        fit = self._data_fit(ctx, report)
        decided = self._screen(model, candidates, ctx, fit) if fit is not None else {}
        targets = None
        if fit is not None:
            upcoming = [n for n in candidates if id(n) not in decided and self._fits_to_data(n)]
            targets = self._layer_targets(model, candidates, upcoming, ctx, fit)
        steps = Steps(ctx.progress, self._steps_label(targets), len(candidates))
        if candidates:  # a first line at once: the estimate follows after the first layer
            tick(ctx.progress, steps.label, 0, steps.total)
        try:
            for node in candidates:
                try:
                    if id(node) in decided:
                        raise decided[id(node)]
                    report.layers.append(self._compress(model, node, ctx, emitter, targets))
                    if targets:  # the model changed: what later layers receive changed too
                        targets.forget()
                except Skip as skip:
                    report.layers.append(LayerReport.skipped(node, str(skip)))
                steps.done()
        finally:
            if targets:
                report.notes.append(f"calibration: {targets.sweeps} model sweep(s)")
                targets.close()
            if self._timings is not None:
                self._timings.finish(report.notes)
        if self.config.fold:
            fold_rewrites(emitter, report, ctx.shapes, self._protected)
        return report

    def _screen(self, model, candidates, ctx, fit: bool) -> dict[int, Skip]:
        """The layers skipped whatever the data says, found before any capture: where the
        ranks do not depend on the data, the rewrite planned from the weights alone goes
        through the guards (min_saving, min_speedup: they see ranks and shapes, not values)."""
        decided: dict[int, Skip] = {}
        if self.config.max_error is not None:  # every rank follows from the data
            return decided
        steps = Steps(ctx.progress, "lowrank: guards before capture", len(candidates))
        for node in candidates:
            try:
                layer = self._layer(node, with_data=True)
                if self._ranks_need_data(layer, fit):
                    continue
                plan = self._plan(layer, CalibrationFit(None, False))
                self._guard(layer, plan, *_positions(layer, ctx))
                measured = self._latency_guard(model, layer, plan, ctx)
                if measured is not None:
                    self._timed[id(node)] = measured
            except Skip as skip:
                decided[id(node)] = skip
            finally:
                steps.done()
        return decided

    def _ranks_need_data(self, layer: Layer, fit: bool) -> bool:
        """Whether this layer's ranks follow from calibration data (max_error, or an energy
        share of the whitened spectrum)."""
        cfg = self.config
        if cfg.max_error is not None:
            return True
        svd = layer.kind != "Conv" or cfg.scheme == "svd"
        return svd and fit and (cfg.energy is not None or self._no_rule())

    def _steps_label(self, targets: LayerTargets | None) -> str:
        """What each layer's step does, so the progress line says where the time goes."""
        work = ["capture" if targets else None, "fit", "timing" if self._timings else None]
        return f"lowrank: layers ({', '.join(w for w in work if w)})"

    def _protected(self, node: ir.Node) -> bool:
        return name_matches(node, self.config.exclude)

    def _data_fit(self, ctx: PassContext, report: PassReport) -> bool | None:
        """Whether factors are refitted to calibration data (errors are measured on it either
        way); None when there is no data to use."""
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
        return fit

    def _layer_targets(self, model, candidates, upcoming, ctx, fit: bool) -> LayerTargets:
        """Calibration statistics for the layers that will ask for them."""
        cfg = self.config
        return LayerTargets(
            model,
            ctx.teacher,
            ctx.calibration,
            [n.outputs[0].name for n in candidates],
            cfg.max_rows,
            ctx.seed,
            fit,
            upcoming=upcoming,
            shapes=ctx.shapes,
            inputs=cfg.inputs,
        )

    def _fits_to_data(self, node: ir.Node) -> bool:
        """Whether ``_compress`` will ask for this layer's calibration moments."""
        try:
            return self._layer(node, with_data=True).kind != "ConvTranspose"
        except Skip:
            return False

    def _layer(self, node: ir.Node, with_data: bool) -> Layer:
        """The layer behind ``node``, or Skip with the reason this pass leaves it alone."""
        if name_matches(node, self.config.exclude):
            raise Skip("excluded by name pattern")
        layer = view(node)
        if self.config.max_error is not None and not with_data:
            raise Skip("max_error needs calibration data")
        if layer.bias is None and with_data:
            raise Skip("a calibration fit needs a per-output bias (Gemm C is [M, N])")
        return layer

    def _compress(self, model, node, ctx, emitter, targets) -> LayerReport:
        layer = self._layer(node, with_data=targets is not None)
        fit = self._fit(layer, targets)
        positions = _positions(layer, ctx)
        plan = self._plan(layer, fit)
        self._guard(layer, plan, *positions)
        measured = self._timed.pop(id(node), None) or self._latency_guard(model, layer, plan, ctx)
        rewrite(emitter, layer, plan)
        report = _layer_report(layer, plan, *positions)
        if fit.note:
            report.detail["data_fit"] = fit.note
        if measured is not None:
            report.detail["speedup"] = round(measured.speedup, 3)
            report.detail["speedup_source"] = measured.source
        return report

    def _fit(self, layer: Layer, targets: LayerTargets | None) -> CalibrationFit:
        if targets is None:
            return CalibrationFit(None, False)
        if layer.kind == "ConvTranspose":  # no im2col for it yet: factors fit the weights
            if self.config.max_error is not None:
                raise Skip("max_error is not supported for ConvTranspose")
            return CalibrationFit(None, False)
        moments = targets.moments(layer)
        if targets.fit and moments.count < ROWS_PER_FEATURE * moments.inputs:
            # a least-squares fit to fewer rows than this reproduces them and nothing else
            # (Lite1's classifier: 50 rows of 1,280 features, rank 48 of 1,000 "within 8%" on
            # them, top-1 0.07 on other images): plain SVD, its error measured on the data
            note = f"{moments.count} calibration rows for {moments.inputs} input features"
            return CalibrationFit(moments, False, f"not refitted: {note}")
        return CalibrationFit(moments, targets.fit)

    def _plan(self, layer: Layer, fit: CalibrationFit) -> Plan:
        scheme = self.config.scheme if layer.kind == "Conv" else "svd"
        if scheme == "svd":
            plan = self._plan_svd(layer, fit)
        elif scheme == "tucker2":
            plan = self._plan_tucker2(layer, fit)
        else:
            plan = self._plan_separable(layer, fit)
        if fit.moments is not None:
            plan.output_error = fit.error(layer, plan)
        return plan

    def _plan_svd(self, layer: Layer, fit: CalibrationFit) -> Plan:
        full = min(layer.matrix.shape)
        predicted = None
        if fit.refit:
            spectrum, vt, lower = factorize.whitened_svd(fit.moments, layer.matrix)
            basis = factorize.whitened_basis(vt, lower)
            if self.config.max_error is not None:  # every rank's error, from the statistics
                predicted = factorize.refit_errors(fit.moments, basis, layer.kind != "MatMul")

            def make(rank: int) -> Plan:
                first = basis[:rank]
                ranks = {"rank": rank, "full_rank": full}
                return fit.apply(Plan("svd", ranks, [first], first), layer)

        else:
            u, spectrum, vt = factorize.svd(layer.matrix)

            def make(rank: int) -> Plan:
                root = np.sqrt(spectrum[:rank])
                first = root[:, None] * vt[:rank]
                ranks = {"rank": rank, "full_rank": full}
                return Plan("svd", ranks, [first], first, last=u[:, :rank] * root)

        searched = self._search(make, full, fit, layer, predicted)
        return searched or make(self._rank(spectrum, full))

    def _plan_tucker2(self, layer: Layer, fit: CalibrationFit) -> Plan:
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

    def _plan_separable(self, layer: Layer, fit: CalibrationFit) -> Plan:
        if math.prod(layer.weight.shape[2:]) == 1:  # C·m scalings then a 1×1 conv: never smaller
            raise Skip("a 1×1 conv has no kernel to separate (scheme=svd factorizes it)")
        weight = layer.weight.astype(np.float64)
        full = min(weight.shape[0], math.prod(weight.shape[2:]))

        def make(multiplier: int) -> Plan:
            depthwise, pointwise, _ = factorize.separable(weight, multiplier)
            bias = None
            if fit.refit:  # both halves refitted to the data, not only the pointwise conv
                depthwise, pointwise, bias = factorize.refine_separable(
                    fit.moments, depthwise, multiplier
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

    def _search(
        self, make, full: int, fit: CalibrationFit, layer: Layer, predicted=None
    ) -> Plan | None:
        """max_error: the smallest rank whose output error on calibration data is in bound.
        With ``predicted`` (every rank's error from the statistics) that rank is read off and
        its plan verified; otherwise a binary search (errors shrink as ranks grow)."""
        bound = self.config.max_error
        if bound is None:
            return None
        if predicted is not None:
            return _verified(make, full, fit, layer, _first_within(predicted, bound), bound)
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

    def _latency_guard(self, model: ir.Model, layer: Layer, plan: Plan, ctx) -> Timing | None:
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
        rewrite(Emitter(after, self.name), view(alone), plan)
        try:
            measured = self._timings.speedup(before, after)
        except CannotRun as exc:  # e.g. no CPU kernel for this dtype: nothing to compare
            raise Skip(f"min_speedup: {exc}") from None
        if measured.speedup < floor:
            cached = "; timing read from the cache" if measured.source == "cache" else ""
            raise Skip(
                f"{plan.describe()} runs {measured.speedup:.2f}x as fast alone in onnxruntime "
                f"(min_speedup {floor:g}){cached}"
            )
        return measured


def _first_within(errors: np.ndarray, bound: float) -> int:
    """The smallest rank (1-based) whose error is within ``bound``; the last if none is."""
    within = np.flatnonzero(errors <= bound)
    return int(within[0]) + 1 if len(within) else len(errors)


def _verified(make, full, fit: CalibrationFit, layer: Layer, rank: int, bound: float) -> Plan:
    """The plan at ``rank``, or at the next ranks while its error, computed from its own
    factors, is still out of bound (a prediction is off only by the damping of the fits)."""
    plan = make(rank)
    while rank < full and fit.error(layer, plan) > bound:
        rank += 1
        plan = make(rank)
    return plan


#: A data-aware fit needs at least this many calibration rows per input feature.
ROWS_PER_FEATURE = 2


def _positions(layer: Layer, ctx: PassContext) -> tuple[int | None, int | None]:
    """The layer's output and input positions (rows it multiplies), if the shapes are known."""
    return layer.positions(ctx.shapes), layer.positions(ctx.shapes, inputs=True)


def _standard(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


@dataclass
class CalibrationFit:
    """One layer's calibration moments, and whether factors are refitted to them."""

    moments: SecondMoments | None
    refit: bool
    note: str | None = None  # why the data did not refit the factors

    def apply(self, plan: Plan, layer: Layer) -> Plan:
        """Refit the last factor (and the bias) by least squares on the student's inputs
        against the teacher's outputs, so errors do not pile up layer after layer."""
        if self.refit:
            plan.last, plan.bias = factorize.refit_last(
                self.moments, plan.first, layer.kind != "MatMul"
            )
        return plan

    def error(self, layer: Layer, plan: Plan) -> float:
        bias = plan.bias if plan.bias is not None else layer.bias
        return factorize.output_error(self.moments, plan.last @ plan.first, bias)


def _layer_report(layer: Layer, plan: Plan, positions, in_positions) -> LayerReport:
    after = plan.params(layer)
    macs = (
        (layer.macs(positions, in_positions), plan.macs(layer, positions, in_positions))
        if positions
        else (None, None)
    )
    return LayerReport.rewritten(
        layer.node,
        {"scheme": plan.scheme, **plan.ranks, "nodes": plan.node_names},
        original=layer.matrix,
        restored=plan.last @ plan.first,
        params=(layer.matrix.size, after),
        nbytes=(layer.weight.nbytes, after * layer.weight.dtype.itemsize),
        macs=macs,
        output_error=plan.output_error,
    )
