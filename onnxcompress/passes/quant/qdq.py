"""The qdq pass: int8 static quantization by QuantizeLinear/DequantizeLinear insertion
(weights per channel, activations calibrated), with its optional float aids before it
(BatchNormalization folding, cross-layer equalization, bias correction)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxcompress.calibration import Feed, synthetic_feeds
from onnxcompress.emit import Emitter
from onnxcompress.errors import BadData, CannotRun
from onnxcompress.graph import default_opset, node_label, weight_axes
from onnxcompress.passes.base import (
    CompressionPass,
    LayerReport,
    PassContext,
    PassReport,
    check_fields,
)
from onnxcompress.passes.quant.batchnorm import fold_batchnorms
from onnxcompress.passes.quant.bias_correction import correct_bias
from onnxcompress.passes.quant.equalize import equalize
from onnxcompress.passes.quant.insert import (
    absorbed_clamp,
    constant_dq,
    insert_qdq,
    int32_bias_ok,
    quantize_bias,
    quantize_constant_inputs,
    remove_clamp,
)
from onnxcompress.passes.quant.plan import (
    CLAMPING,
    DEFAULT_OP_TYPES,
    SUPPORTED_OP_TYPES,
    activation_tensors,
    constant_bias,
    has_constant_weight,
    input_channel_axes,
    plan_nodes,
    split_by_tensors,
    tie_shared_ranges,
    values_by_name,
)
from onnxcompress.passes.quant.qparams import (
    QParams,
    activation_qparams,
    bias_scale_floor,
    dequantize,
    quantize_symmetric,
)
from onnxcompress.passes.quant.ranges import (
    METHODS,
    TensorStats,
    choose_range,
    collect,
    zero_inclusive,
)
from onnxcompress.passes.quant.saturation import int8_products_saturate
from onnxcompress.passes.quant.sensitivity import layer_sensitivity

logger = logging.getLogger(__name__)

#: Per-channel DequantizeLinear (the ``axis`` attribute) exists from opset 13.
PER_CHANNEL_OPSET = 13


class Qdq(CompressionPass):
    """Inserts QuantizeLinear/DequantizeLinear: int8 weights per channel, calibrated activations."""

    name = "qdq"

    @dataclass(frozen=True)
    class Config:
        # mse (with the holdout guard) by default: lower output error than minmax on every
        # real model of bench/qdq.py; unguarded, on 16 text lines it lost 19 points on ppocr_cls
        method: str = "mse"  # minmax | percentile | entropy | mse
        percentile: float = 99.99
        entropy_guard: bool = True  # entropy: drop KL thresholds that raise the tensor's error
        # histogram methods: keep a clipped range only if, fitted on half of the calibration
        # batches, it beats min/max on the other half
        holdout_guard: bool = True
        activation_type: str = "uint8"  # uint8 | int8
        activation_symmetric: bool = False
        per_channel: bool = True  # weights: one scale per output channel, else per tensor
        op_types: tuple[str, ...] = DEFAULT_OP_TYPES
        exclude: tuple[str, ...] = ()  # node-name glob patterns to leave in float
        exclude_first_last: bool = False  # keep the first and last weighted layers in float
        fold_batchnorm: bool = True  # fold Conv -> BatchNormalization before quantizing
        equalize: bool = False  # cross-layer equalization of Conv pairs (Nagel et al. 2019)
        # undo the mean shift weight rounding causes; None: on with the user's calibration
        # data, off with synthetic feeds (whose means say nothing about real inputs)
        bias_correction: bool | None = None
        sensitivity: bool = False  # per weighted layer: output error with it alone quantized
        keep_float: int = 0  # mixed precision: the N most sensitive weighted layers stay float
        # 7-bit weights (±63): None (auto) when this machine's onnxruntime clips the sum of two
        # 8-bit products (x86-64 without VNNI); true for such a deployment target
        reduce_range: bool | None = None

        def __post_init__(self) -> None:
            unknown = sorted(set(self.op_types) - SUPPORTED_OP_TYPES)
            if unknown:
                raise ValueError(f"op_types: unsupported {', '.join(unknown)}")
            check_fields(
                self,
                {
                    "method": (lambda v: v in METHODS, f"one of {', '.join(METHODS)}"),
                    "percentile": (lambda v: 50 < v <= 100, "in (50, 100]"),
                    "keep_float": (lambda v: v >= 0, ">= 0"),
                    "activation_type": (lambda v: v in ("uint8", "int8"), "uint8 or int8"),
                },
            )

    def required_opset(self, model: ir.Model) -> int | None:
        opset = default_opset(model) or PER_CHANNEL_OPSET
        return PER_CHANNEL_OPSET if opset < PER_CHANNEL_OPSET else None

    @classmethod
    def applies(cls, node: ir.Node) -> bool:
        return node.op_type in DEFAULT_OP_TYPES and node.domain in ("", "ai.onnx")

    def run(self, model: ir.Model, ctx: PassContext) -> PassReport:
        cfg = self.config
        report = PassReport(self.name, self.config_dict())
        emitter = Emitter(model, self.name)
        self._correct = (
            cfg.bias_correction
            if cfg.bias_correction is not None
            else bool(ctx.calibration) and not ctx.synthetic_calibration
        )
        self._weight_levels = self._levels(report)
        if cfg.fold_batchnorm:
            folded = fold_batchnorms(model, emitter)
            if folded:
                report.notes.append(f"folded {folded} BatchNormalization into Conv")
        planned, skipped = plan_nodes(model, cfg.op_types, cfg.exclude, cfg.exclude_first_last)
        report.layers.extend(skipped)
        equalized: dict[str, str] = {}
        if cfg.equalize:
            report.notes.append(equalize(model, planned, details=equalized))
        feeds = _feeds(model, ctx)
        tensors = activation_tensors(planned)
        stats = collect(
            model,
            sorted(tensors),
            feeds,
            histograms=cfg.method != "minmax",
            channel_axes=input_channel_axes(planned) if self._correct else None,
            progress=ctx.progress,
        )
        planned, tensors = self._float32_only(planned, stats, report)
        params = self._activation_params(model, planned, tensors, stats)
        sensitivity = self._sensitivity(model, planned, params, stats, feeds)
        if cfg.keep_float:
            planned, kept = self._keep_most_sensitive(planned, sensitivity, report)
            params = self._activation_params(model, planned, activation_tensors(planned), stats)
            for node in kept:  # no Q/DQ around a float layer: see _keep_most_sensitive
                params.pop(node.outputs[0].name, None)
                if len(node.inputs[0].uses()) == 1:
                    params.pop(node.inputs[0].name, None)
        layers = self._rewrite(emitter, planned, params, stats, sensitivity)
        for layer in layers:
            if layer.node in equalized:
                layer.detail["equalized"] = equalized[layer.node]
        report.layers.extend(layers)
        model.graph.sort()
        return report

    def _levels(self, report: PassReport) -> int:
        """Weight levels either side of zero: 127, or 63 with ``reduce_range``."""
        reduce = self.config.reduce_range
        if reduce is None:
            try:
                reduce = int8_products_saturate(self.config.activation_type)
            except CannotRun as exc:
                report.notes.append(f"{exc}: weights keep 8 bits")
                reduce = False
            if reduce:
                report.notes.append(
                    "weights in 7 bits (reduce_range): onnxruntime on this CPU clips the sum of "
                    "two 8-bit products (x86-64 without VNNI); reduce_range=false for a VNNI target"
                )
        return 63 if reduce else 127

    def _float32_only(self, planned, stats, report) -> tuple[list[ir.Node], set[str]]:
        """Only float32 activations get a Q/DQ pair: a node that reads or makes anything else
        on the calibration data (an int64 shape computation, a float16 tensor) stays as it is."""
        other = {name for name, tensor in stats.items() if not tensor.float32}
        planned, skipped = split_by_tensors(planned, other)
        for node in skipped:
            reason = "reads or makes a tensor that is not float32 (a shape computation?)"
            report.layers.append(LayerReport.skipped(node, reason))
        infinite = {name for name, tensor in stats.items() if not tensor.finite}
        planned, skipped = split_by_tensors(planned, infinite)
        for node in skipped:
            reason = "reads or makes a tensor with infinite values on the calibration data"
            report.layers.append(LayerReport.skipped(node, reason))
        return planned, activation_tensors(planned)

    def _activation_params(self, model, planned, tensors, stats) -> dict[str, QParams]:
        """Per tensor: its range by the chosen method, widened to hold 0 and tied to its
        shared-scale group, as scale and zero point of the activation type."""
        cfg = self.config
        ranges = {name: zero_inclusive(*self._range(stats[name])) for name in sorted(tensors)}
        tie_shared_ranges(model, planned, ranges)
        dtype = ir.DataType.UINT8 if cfg.activation_type == "uint8" else ir.DataType.INT8
        return {
            name: activation_qparams(lo, hi, dtype, cfg.activation_symmetric)
            for name, (lo, hi) in ranges.items()
        }

    def _range(self, stats: TensorStats) -> tuple[float, float]:
        cfg = self.config
        return choose_range(
            stats,
            cfg.method,
            levels=255,
            symmetric=cfg.activation_symmetric,
            percentile=cfg.percentile,
            entropy_guard=cfg.entropy_guard,
            holdout=cfg.holdout_guard,
        )

    def _sensitivity(self, model, planned, params, stats, feeds) -> dict[str, float]:
        """With ``sensitivity``: each weighted layer's output error when quantized alone."""
        if not (self.config.sensitivity or self.config.keep_float):
            return {}

        def rewrite(copy: ir.Model, nodes: list[ir.Node], chosen: dict[str, QParams]) -> None:
            self._rewrite(Emitter(copy, self.name), nodes, chosen, stats)

        return layer_sensitivity(model, planned, params, feeds, rewrite)

    def _keep_most_sensitive(self, planned, sensitivity, report):
        """The planned nodes without the ``keep_float`` layers whose quantization alone costs
        the most, and those layers. A kept layer's input (when it alone reads it) and output
        get no Q/DQ: onnxruntime (1.32) quantizes the float weights of a Conv that reads a
        DequantizeLinear itself, per tensor, which on lite1's first depthwise conv raised the
        model's error 2.5x."""
        ranked = sorted(sensitivity, key=sensitivity.get, reverse=True)[: self.config.keep_float]
        kept = [node for node in planned if node_label(node) in ranked]
        for node in kept:
            error = sensitivity[node_label(node)]
            reason = f"kept in float (keep_float): output rel L2 {error:.3g} quantized alone"
            report.layers.append(LayerReport.skipped(node, reason))
        return [node for node in planned if node not in kept], kept

    def _rewrite(self, emitter, planned, params, stats, sensitivity=None) -> list[LayerReport]:
        """Insert Q/DQ on every activation in ``params``, then quantize each planned node's
        weight (and bias) or constant operands; one report per node, with its ``sensitivity``
        when measured."""
        sensitivity = sensitivity or {}
        values = values_by_name(planned)
        params = dict(params)
        order = {node.name: i for i, node in enumerate(planned)}  # reports in graph order
        layers = []
        for node in [n for n in planned if absorbed_clamp(n, params)]:
            params.pop(node.outputs[0].name, None)
            remove_clamp(emitter.graph, node)
            planned = [n for n in planned if n is not node]
            reason = "removed: its input's quantized range clamps the same"
            layers.append(LayerReport.rewritten(node, {"absorbed": reason}))
        # the names of the float inputs, before insert_qdq points the nodes at their DQ copies
        sources = {id(node): node.inputs[0].name for node in planned}
        for name, qparams in params.items():
            insert_qdq(emitter, values[name], qparams)
        for node in planned:
            source = sources[id(node)]
            if node.op_type in CLAMPING:
                layer = LayerReport.skipped(node, "kept in float: its input's range is wider")
            elif has_constant_weight(node) and source not in params:
                layer = LayerReport.skipped(node, "its input is not quantized (no input scale)")
            elif has_constant_weight(node):
                layer = self._quantize_weighted(emitter, node, params[source], stats.get(source))
                if node_label(node) in sensitivity:
                    layer.detail["sensitivity_rel_l2"] = sensitivity[node_label(node)]
            else:
                quantize_constant_inputs(emitter, node, params)
                layer = LayerReport.rewritten(node, {"activations": self.config.activation_type})
            layers.append(layer)
        return sorted(layers, key=lambda layer: order.get(layer.node, len(order)))

    def _quantize_weighted(
        self,
        emitter: Emitter,
        node: ir.Node,
        input_params: QParams,
        input_stats: TensorStats | None,
    ) -> LayerReport:
        """Weight -> int8 per channel (or per tensor) through a DequantizeLinear, after bias
        correction when asked; a bias the kernels can take becomes int32 with scale s_x·s_w."""
        weight = node.inputs[1]
        array = np.asarray(weight.const_value.numpy(), np.float32)
        axis = weight_axes(node).out if self.config.per_channel else None
        bias = constant_bias(node)
        channels = None if axis is None else array.shape[axis]
        int32_bias = bias is not None and int32_bias_ok(node, bias, channels)
        floor = _bias_floor_for(bias, input_params) if int32_bias else None
        quantized, scales = quantize_symmetric(array, axis, self._weight_levels, floor)
        restored = dequantize(quantized, scales, axis)
        detail: dict = {"axis": axis, "input_scale": float(f"{input_params.scale:.4g}")}
        if floor is not None and np.any(scales == floor):
            detail["scales_raised_for_bias"] = int(np.sum(scales == floor))
        if self._correct:
            mean = None if input_stats is None else input_stats.channel_mean
            detail["bias_correction"] = correct_bias(emitter, node, array, restored, mean)
            bias = constant_bias(node)
            int32_bias = bias is not None and int32_bias_ok(node, bias, channels)
        zeros = np.zeros(scales.shape, np.int8)  # explicit: QGemm fusion needs B's zero point
        node.replace_input_with(1, constant_dq(emitter, weight, quantized, scales, zeros, axis))
        if int32_bias:
            quantize_bias(emitter, node, bias, input_params.scale * scales)
        return LayerReport.rewritten(
            node,
            detail,
            original=array,
            restored=restored,
            params=(array.size, array.size),
            nbytes=(array.nbytes, quantized.nbytes + scales.nbytes + zeros.nbytes),
        )


def _bias_floor_for(bias: ir.Value, input_params: QParams) -> np.ndarray:
    return bias_scale_floor(np.asarray(bias.const_value.numpy()), input_params.scale)


def _feeds(model: ir.Model, ctx: PassContext) -> list[Feed]:
    """The user's calibration feeds, else seeded synthetic ones (ranges need some data)."""
    if ctx.calibration:
        return list(ctx.calibration)
    try:
        return synthetic_feeds(model, ctx.dims, seed=ctx.seed)
    except BadData as exc:
        raise BadData(f"qdq needs calibration data (--calibration): {exc}") from None
