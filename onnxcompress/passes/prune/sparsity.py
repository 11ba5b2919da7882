"""Unstructured magnitude sparsity: zero the smallest weights of each linear layer, or those
under one global threshold, and optionally refit the kept ones by least squares (the masked
solve of ``prune.repair``). Shapes and MACs stay; the zeros pay off once the model is stored
compressed or run by a sparse kernel."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxcompress.emit import Emitter
from onnxcompress.graph import (
    node_label,
    set_constant,
    values_problem,
    weight_array,
    weight_axes,
    weight_problem,
)
from onnxcompress.passes.base import (
    CompressionPass,
    LayerReport,
    PassContext,
    PassReport,
    check_fields,
    name_matches,
)
from onnxcompress.passes.prune.repair import REFIT_OPTION_RULES, RefitResult, Target, refit
from onnxcompress.validate import Runner

LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_FLOAT = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)


class Sparsity(CompressionPass):
    """Zero the smallest-magnitude weights per layer or under one global threshold.

    With ``repair=lstsq`` and calibration data each layer's kept weights are refitted by least
    squares to the original layer's outputs, the zeros staying zeros."""

    name = "sparsity"

    @dataclass(frozen=True)
    class Config:
        """``ratio`` of the weights set to zero, per layer or over all layers (``scope``)."""

        ratio: float = 0.3  # share of the weights to set to zero
        scope: str = "layer"  # one magnitude threshold per "layer" or a "global" one
        exclude: tuple[str, ...] = ()  # node-name globs left alone
        repair: str = "none"  # none, or lstsq: refit the kept weights on calibration data
        # which weights go: magnitude, or activation (|w|·‖x‖ on the data, chosen again after
        # each of `steps` refits); auto: activation with repair=lstsq and data
        select: str = "auto"
        steps: int = 8  # select=activation: refits on the way to `ratio`
        damping: float = 0.1  # ridge towards the unrepaired weights, relative to mean diag(XᵀX)
        max_rows: int = 4096  # rows sampled per batch and layer for the refit

        def __post_init__(self) -> None:
            check_fields(
                self,
                {
                    "ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
                    "scope": (lambda v: v in ("layer", "global"), "layer or global"),
                    "repair": (lambda v: v in ("none", "lstsq"), "none or lstsq"),
                    "select": (
                        lambda v: v in ("auto", "magnitude", "activation"),
                        "auto, magnitude or activation",
                    ),
                    "steps": (lambda v: v >= 1, "an integer >= 1"),
                    **REFIT_OPTION_RULES,
                },
            )

    @classmethod
    def applies(cls, node: ir.Node) -> bool:
        return node.op_type in LINEAR and node.domain in ("", "ai.onnx")

    def run(self, model: ir.Model, ctx: PassContext) -> PassReport:
        report = PassReport(self.name, self.config_dict())
        layers = self._candidates(model, report)
        originals = {id(node): _weight(node) for node in layers}
        threshold = self._global_threshold(layers) if self.config.scope == "global" else None
        masks = {id(node): self._mask(originals[id(node)], threshold) for node in layers}
        targets = self._repair_targets(layers, masks, self._reselect_steps(ctx), originals)
        with self._teacher(model, targets, ctx) or nullcontext() as teacher:
            for node in layers:
                set_constant(node.inputs[1], np.where(masks[id(node)], originals[id(node)], 0))
            repaired = self._repair(model, targets, teacher, ctx)
        _report(report, layers, originals, repaired)
        return report

    def _candidates(self, model: ir.Model, report: PassReport) -> list[ir.Node]:
        """The linear layers with a float constant weight of their own, not excluded."""
        found = []
        for node in model.graph:
            if not self.applies(node):
                continue
            weight = node.inputs[1] if len(node.inputs) > 1 else None
            problem = weight_problem(weight)
            if problem is None and weight.const_value.dtype not in _FLOAT:
                problem = f"weight dtype {weight.const_value.dtype.name} is not float"
            if problem is None:
                problem = values_problem(weight_array(weight))
            if problem is None and name_matches(node, self.config.exclude):
                problem = "excluded by name pattern"
            if problem:
                report.layers.append(LayerReport.skipped(node, problem))
            else:
                found.append(node)
        return found

    def _global_threshold(self, layers: list[ir.Node]) -> float:
        """The magnitude at or under which the smallest ``ratio`` of all weights lie."""
        if not layers:
            return -1.0
        magnitudes = np.concatenate([np.abs(_weight(n).astype(np.float32)).ravel() for n in layers])
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
        if count:  # a partition, not a sort: 0.2 s against 3 s on 10 M weights
            keep[np.argpartition(magnitude, count - 1, axis=None)[:count]] = False
        return keep.reshape(weight.shape)

    def _reselect_steps(self, ctx: PassContext) -> int | None:
        """Refit steps of the activation-aware choice (``reselect_mask``); None: by magnitude
        (without a refit, without data, or on seeded noise, whose norms say nothing)."""
        select = self.config.select
        if select == "auto":
            real_data = bool(ctx.calibration) and not ctx.synthetic_calibration
            select = "activation" if self.config.repair == "lstsq" and real_data else "magnitude"
        if select != "activation" or self.config.repair != "lstsq":
            return None
        return self.config.steps

    def _repair_targets(self, layers, masks, reselect_steps: int | None, originals) -> list[Target]:
        """With ``repair=lstsq``: every layer, its mask laid out as the refit's
        ``[inputs, outputs]`` matrix."""
        if self.config.repair != "lstsq":
            return []
        targets = []
        for node in layers:
            mask, out = masks[id(node)], weight_axes(node).out
            flat = np.moveaxis(mask, out, -1).reshape(-1, mask.shape[out])
            original = originals[id(node)] if reselect_steps else None
            targets.append(
                Target(node, mask=flat, reselect_steps=reselect_steps, weight_before=original)
            )
        return targets

    def _teacher(self, model, targets: list[Target], ctx: PassContext) -> Runner | None:
        """A session on the model before the zeros, exposing the targets' outputs."""
        if not targets or not ctx.calibration:
            return None
        names = [t.node.outputs[0].name for t in targets]
        return Runner(model, "model before sparsity", extra_outputs=names)

    def _repair(self, model, targets, teacher, ctx: PassContext) -> dict[str, RefitResult]:
        if teacher is None:
            return {}
        results = refit(
            model,
            targets,
            teacher,
            ctx.calibration,
            emitter=Emitter(model, self.name),
            damping=self.config.damping,
            max_rows=self.config.max_rows,
            seed=ctx.seed,
        )
        return {r.node: r for r in results}


def _report(report: PassReport, layers, originals, repaired: dict[str, RefitResult]) -> None:
    """A rewritten entry per layer (its sparsity, weight error and repair) and the total."""
    zeros_total = size_total = 0
    for node in layers:
        weight = _weight(node)
        zeros = int((weight == 0).sum())
        zeros_total, size_total = zeros_total + zeros, size_total + weight.size
        detail = {"sparsity": zeros / max(weight.size, 1)}
        fit = repaired.get(node_label(node))
        if fit is not None:
            detail["repair"] = fit.detail()
        report.layers.append(
            LayerReport.rewritten(
                node,
                detail,
                original=originals[id(node)],
                restored=weight,
                params=(weight.size, weight.size),
                nbytes=(weight.nbytes, weight.nbytes),
            )
        )
    share = zeros_total / size_total if size_total else 0.0
    report.notes.append(f"achieved sparsity {share:.4f} over {len(layers)} layers")


def _weight(node: ir.Node) -> np.ndarray:
    return np.asarray(node.inputs[1].const_value.numpy())
