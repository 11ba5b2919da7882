"""Quantization by QuantizeLinear/DequantizeLinear insertion: int8 static (weights per channel,
activations calibrated) and int4 weight-only (blocked DequantizeLinear or MatMulNBits)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import ml_dtypes  # a dependency of onnx: numpy int4/uint4 types
import numpy as np
import onnx_ir as ir

from onnxcompress.calibration import Feed, synthetic_feeds
from onnxcompress.emit import Namer, add_weight, tag
from onnxcompress.errors import BadData
from onnxcompress.graph import default_opset, node_label
from onnxcompress.passes.base import (
    CompressionPass,
    LayerReport,
    PassContext,
    PassReport,
    Skip,
    check_fields,
    name_matches,
)
from onnxcompress.passes.quant.ranges import (
    METHODS,
    TensorStats,
    choose_range,
    collect,
    zero_inclusive,
)
from onnxcompress.validate import Runner, compare

logger = logging.getLogger(__name__)

#: Per-channel DequantizeLinear (the ``axis`` attribute) exists from opset 13.
PER_CHANNEL_OPSET = 13
#: Blocked DequantizeLinear and int4 types exist from opset 21.
BLOCKED_OPSET = 21

WEIGHTED = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
#: Ops whose output must carry the scale of their input (the quantized kernel, or a pure
#: data move, cannot rescale): Concat ties all its inputs too.
SHARED_SCALE = frozenset(
    {"Concat", "MaxPool", "Resize", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}
)
#: Ops that read every float input as an activation; the others read only input 0.
ALL_INPUTS = frozenset({"Add", "Mul", "Concat"})
DEFAULT_OP_TYPES = (
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "Add",
    "Mul",
    "Concat",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Resize",
    "Sigmoid",
    "LeakyRelu",
    "Transpose",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
)
SUPPORTED_OP_TYPES = frozenset(DEFAULT_OP_TYPES) | SHARED_SCALE
#: Activations a quantized producer's output range can absorb (clamping at the zero point).
CLAMPING = frozenset({"Relu", "Clip"})
_INT32 = np.iinfo(np.int32)


@dataclass(frozen=True)
class QParams:
    """Scale and zero point of one per-tensor quantized activation."""

    scale: float
    zero_point: int
    dtype: ir.DataType


class Qdq(CompressionPass):
    """Inserts QuantizeLinear/DequantizeLinear: int8 weights per channel, calibrated activations."""

    name = "qdq"

    @dataclass(frozen=True)
    class Config:
        method: str = "minmax"  # minmax | percentile | entropy | mse
        percentile: float = 99.99
        entropy_guard: bool = True  # entropy: drop KL thresholds that raise the tensor's error
        activation_type: str = "uint8"  # uint8 | int8
        activation_symmetric: bool = False
        per_channel: bool = True  # weights: one scale per output channel, else per tensor
        op_types: tuple[str, ...] = DEFAULT_OP_TYPES
        exclude: tuple[str, ...] = ()  # node-name glob patterns to leave in float
        exclude_first_last: bool = False  # keep the first and last weighted layers in float
        fold_batchnorm: bool = True  # fold Conv -> BatchNormalization before quantizing
        equalize: bool = False  # cross-layer equalization of Conv pairs (Nagel et al. 2019)
        bias_correction: bool = False  # undo the mean shift weight rounding causes
        sensitivity: bool = False  # per weighted layer: output error with it alone quantized

        def __post_init__(self) -> None:
            unknown = sorted(set(self.op_types) - SUPPORTED_OP_TYPES)
            if unknown:
                raise ValueError(f"op_types: unsupported {', '.join(unknown)}")
            check_fields(
                self,
                {
                    "method": (lambda v: v in METHODS, f"one of {', '.join(METHODS)}"),
                    "percentile": (lambda v: 50 < v <= 100, "in (50, 100]"),
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
        report = PassReport(self.name, self.config_dict())
        if self.config.fold_batchnorm:
            folded = fold_batchnorms(model)
            if folded:
                report.notes.append(f"folded {folded} BatchNormalization into Conv")
        planned, skipped = self._plan(model)
        report.layers.extend(skipped)
        if self.config.equalize:
            report.notes.append(equalize(model, planned))
        feeds = _feeds(model, ctx)
        tensors = activation_tensors(planned)
        stats = collect(
            model,
            sorted(tensors),
            feeds,
            histograms=self.config.method != "minmax",
            channel_axes=_input_channel_axes(planned) if self.config.bias_correction else None,
            progress=ctx.progress,
        )
        params = self._activation_params(model, planned, tensors, stats)
        sensitivity = self._sensitivity(model, planned, params, stats, feeds)
        report.layers.extend(
            self._rewrite(model, planned, params, stats, sensitivity, Namer(model))
        )
        model.graph.sort()
        return report

    # -- which nodes ---------------------------------------------------------------------

    def _plan(self, model: ir.Model) -> tuple[list[ir.Node], list[LayerReport]]:
        candidates = [
            n
            for n in model.graph
            if n.op_type in self.config.op_types and n.domain in ("", "ai.onnx")
        ]
        ends = _first_and_last_weighted(candidates) if self.config.exclude_first_last else set()
        planned, skipped = [], []
        for node in candidates:
            try:
                if name_matches(node, self.config.exclude):
                    raise Skip("excluded by name pattern")
                if node in ends:
                    raise Skip("first or last weighted layer (exclude_first_last)")
                _check_quantizable(node)
                planned.append(node)
            except Skip as skip:
                skipped.append(LayerReport.skipped(node, str(skip)))
        return planned, skipped

    # -- ranges --------------------------------------------------------------------------

    def _activation_params(self, model, planned, tensors, stats) -> dict[str, QParams]:
        cfg = self.config
        symmetric = cfg.activation_symmetric
        ranges = {
            name: zero_inclusive(
                *choose_range(
                    stats[name],
                    cfg.method,
                    levels=255,
                    symmetric=symmetric,
                    percentile=cfg.percentile,
                    entropy_guard=cfg.entropy_guard,
                )
            )
            for name in tensors
        }
        ties = _absorb_clamping(model, ranges)
        for group in shared_scale_groups(planned, set(ranges), ties):
            lo = min(ranges[name][0] for name in group)
            hi = max(ranges[name][1] for name in group)
            for name in group:
                ranges[name] = (lo, hi)
        dtype = ir.DataType.UINT8 if cfg.activation_type == "uint8" else ir.DataType.INT8
        return {
            name: activation_qparams(lo, hi, dtype, symmetric) for name, (lo, hi) in ranges.items()
        }

    # -- rewriting -----------------------------------------------------------------------

    def _rewrite(self, model, planned, params, stats, sensitivity, namer) -> list[LayerReport]:
        graph = model.graph
        values = _values_by_name(planned)
        sources = {id(node): node.inputs[0].name for node in planned}
        for name, qparams in params.items():
            insert_qdq(graph, values[name], qparams, namer, self.name)
        layers = []
        for node in planned:
            if node.op_type in WEIGHTED and _constant(node.inputs[1]):
                source = sources[id(node)]
                layer = self._quantize_weighted(
                    graph, node, params[source], stats.get(source), namer
                )
                if node_label(node) in sensitivity:
                    layer.detail["sensitivity_rel_l2"] = sensitivity[node_label(node)]
            else:
                _quantize_constant_inputs(graph, node, params, namer, self.name)
                layer = LayerReport(node_label(node), node.op_type, "rewritten")
                layer.detail["activations"] = (
                    "int8" if self.config.activation_type == "int8" else "uint8"
                )
            layers.append(layer)
        return layers

    def _quantize_weighted(self, graph, node, input_params, input_stats, namer) -> LayerReport:
        weight = node.inputs[1]
        array = np.asarray(weight.const_value.numpy(), np.float32)
        axis = weight_axis(node) if self.config.per_channel else None
        quantized, scales = quantize_symmetric(array, axis)
        restored = dequantize(quantized, scales, axis)
        detail: dict = {"axis": axis, "input_scale": float(f"{input_params.scale:.4g}")}
        bias = _bias_value(node)
        if self.config.bias_correction:
            detail["bias_correction"] = _correct_bias(
                graph, node, array, restored, input_stats, namer
            )
            bias = _bias_value(node)
        zeros = np.zeros(scales.shape, np.int8)  # explicit: QGemm fusion needs B's zero point
        dq_weight = _constant_dq(graph, weight, quantized, scales, zeros, axis, namer, self.name)
        node.replace_input_with(1, dq_weight)
        if bias is not None and _int32_bias_ok(node, bias, axis, scales):
            _quantize_bias(graph, node, bias, input_params.scale * scales, namer, self.name)
        error = float(np.linalg.norm(restored - array) / max(np.linalg.norm(array), 1e-30))
        return LayerReport(
            node=node_label(node),
            op_type=node.op_type,
            action="rewritten",
            detail=detail,
            params_before=array.size,
            params_after=array.size,
            bytes_before=array.nbytes,
            bytes_after=quantized.nbytes + scales.nbytes + zeros.nbytes,
            weight_error=error,
        )

    # -- sensitivity ---------------------------------------------------------------------

    def _sensitivity(self, model, planned, params, stats, feeds) -> dict[str, float]:
        """Output relative L2 error with each weighted layer alone quantized (weights and its
        input and output activations), on up to 4 calibration batches."""
        if not self.config.sensitivity:
            return {}
        reference = Runner(model, "float model")
        proto = ir.to_proto(model)
        order = {id(node): i for i, node in enumerate(model.graph)}
        results = {}
        try:
            for node in planned:
                if node.op_type not in WEIGHTED or not _constant(node.inputs[1]):
                    continue
                copy = ir.from_proto(proto)
                alone = list(copy.graph)[order[id(node)]]
                names = [n for n in activation_tensors([alone]) if n in params]
                self._rewrite(copy, [alone], {n: params[n] for n in names}, stats, {}, Namer(copy))
                copy.graph.sort()
                candidate = Runner(copy, "one layer quantized")
                try:
                    validation = compare(reference, candidate, feeds[:4], latency_runs=0)
                finally:
                    candidate.close()
                results[node_label(node)] = validation.worst_rel_l2
        finally:
            reference.close()
        return results


# -- planning helpers --------------------------------------------------------------------


def _check_quantizable(node: ir.Node) -> None:
    """Skip with the reason a planned node cannot be quantized."""
    outputs = [v for v in node.outputs[:1] if v is not None]
    if not outputs or outputs[0].dtype not in (ir.DataType.FLOAT, None):
        raise Skip("output is not float32")
    first = node.inputs[0] if node.inputs else None
    if first is None or first.const_value is not None:
        raise Skip("first input is a constant")
    if any(_from_dequantize(v) for v in node.inputs if v is not None):
        raise Skip("already quantized (an input comes from DequantizeLinear)")
    if node.op_type not in WEIGHTED:
        return
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if node.op_type == "MatMul" and weight is not None and not _constant(weight):
        return  # activation x activation: both inputs quantized per tensor
    if not _constant(weight):
        raise Skip("weight is not a constant")
    if len(weight.uses()) > 1:
        raise Skip(f"weight is shared by {len(weight.uses())} uses")
    if node.op_type == "ConvTranspose" and node.attributes.get_int("group", 1) != 1:
        raise Skip("grouped ConvTranspose is not quantized")
    if node.op_type == "MatMul" and len(weight.shape or ()) != 2:
        raise Skip("MatMul weight is not 2-D")
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        raise Skip("Gemm with transA")


def _constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and not value.is_graph_input()


def _from_dequantize(value: ir.Value) -> bool:
    producer = value.producer()
    return producer is not None and producer.op_type in ("DequantizeLinear", "QuantizeLinear")


def _first_and_last_weighted(nodes: list[ir.Node]) -> set[ir.Node]:
    weighted = [n for n in nodes if n.op_type in WEIGHTED]
    return {weighted[0], weighted[-1]} if weighted else set()


def _activation_inputs(node: ir.Node) -> list[ir.Value]:
    if node.op_type in ALL_INPUTS:
        chosen = list(node.inputs)
    elif node.op_type == "MatMul" and not _constant(node.inputs[1]):
        chosen = list(node.inputs[:2])
    else:
        chosen = list(node.inputs[:1])
    return [v for v in chosen if v is not None and not _constant(v)]


def activation_tensors(planned: Iterable[ir.Node]) -> set[str]:
    """Names of the float activations to quantize: inputs and first output of each node.

    Graph outputs stay float: their names and precision are the model's contract, and
    onnxruntime has float-output forms of its quantized kernels for them."""
    names = set()
    for node in planned:
        for value in [*_activation_inputs(node), node.outputs[0]]:
            if not value.name or value.is_graph_output():
                continue
            if not _feeds_quantize(value) and not _from_dequantize(value):
                names.add(value.name)
    return names


def _feeds_quantize(value: ir.Value) -> bool:
    return any(use.node.op_type == "QuantizeLinear" for use in value.uses())


def _input_channel_axes(planned: Iterable[ir.Node]) -> dict[str, int]:
    """Where the channels of each weighted layer's input are, for its per-channel mean."""
    axes = {}
    for node in planned:
        if node.op_type in ("Conv", "Gemm") and _constant(node.inputs[1]):
            axes[node.inputs[0].name] = 1
        elif node.op_type == "MatMul" and _constant(node.inputs[1]):
            axes[node.inputs[0].name] = -1
    return axes


def _values_by_name(planned: list[ir.Node]) -> dict[str, ir.Value]:
    return {
        value.name: value
        for node in planned
        for value in [*node.inputs, *node.outputs]
        if value is not None and value.name
    }


# -- ranges helpers ----------------------------------------------------------------------


def _absorb_clamping(
    model: ir.Model, ranges: dict[str, tuple[float, float]]
) -> list[tuple[str, str]]:
    """A tensor read only by a Relu/Clip(0, ·) whose output is quantized takes that output's
    range: quantizing to it clamps exactly as the activation does, so onnxruntime can drop
    the activation and fuse it into the producer's quantized kernel. Returns the tied pairs."""
    ties = []
    for node in model.graph:
        if node.op_type not in CLAMPING or not node.inputs or node.inputs[0] is None:
            continue
        source, result = node.inputs[0], node.outputs[0]
        if source.name not in ranges or result.name not in ranges or len(source.uses()) != 1:
            continue
        if source.is_graph_output() or not _clamps_at_zero(node):
            continue
        ranges[source.name] = ranges[result.name]
        ties.append((source.name, result.name))
    return ties


def _clamps_at_zero(node: ir.Node) -> bool:
    if node.op_type == "Relu":
        return True
    low = node.inputs[1] if len(node.inputs) > 1 else None
    if low is not None:
        return low.const_value is not None and float(low.const_value.numpy()) == 0.0
    return node.attributes.get_float("min", -np.inf) == 0.0


def shared_scale_groups(
    planned: Iterable[ir.Node], names: set[str], ties: Iterable[tuple[str, str]] = ()
) -> list[set[str]]:
    """Sets of quantized tensors that must share one scale (Concat, pure data moves, and the
    given ``ties``)."""
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    for node in planned:
        if node.op_type not in SHARED_SCALE:
            continue
        inputs = node.inputs if node.op_type == "Concat" else node.inputs[:1]
        tied = [v.name for v in [*inputs, node.outputs[0]] if v is not None and v.name in names]
        for other in tied[1:]:
            parent[root(other)] = root(tied[0])
    for first, second in ties:
        parent[root(second)] = root(first)
    groups: dict[str, set[str]] = {}
    for name in parent:
        groups.setdefault(root(name), set()).add(name)
    return [group for group in groups.values() if len(group) > 1]


def activation_qparams(lo: float, hi: float, dtype: ir.DataType, symmetric: bool) -> QParams:
    """Scale and zero point mapping [lo, hi] (which holds 0) onto the type's 256 levels."""
    if symmetric:
        bound = max(-lo, hi)
        scale = bound / 127.0 if bound > 0 else 1.0
        zero = 128 if dtype == ir.DataType.UINT8 else 0
        return QParams(float(np.float32(scale)), zero, dtype)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    scale = float(np.float32(scale))
    qmin = 0 if dtype == ir.DataType.UINT8 else -128
    zero = int(np.clip(round(qmin - lo / scale), qmin, qmin + 255))
    return QParams(scale, zero, dtype)


# -- rewriting helpers -------------------------------------------------------------------


def _qparam_values(graph, namer, base: str, qparams: QParams) -> tuple[ir.Value, ir.Value]:
    scale = add_weight(graph, namer, f"{base}_scale", np.array(qparams.scale, np.float32))
    zero_dtype = np.uint8 if qparams.dtype == ir.DataType.UINT8 else np.int8
    zero = add_weight(graph, namer, f"{base}_zero_point", np.array(qparams.zero_point, zero_dtype))
    return scale, zero


def insert_qdq(graph: ir.Graph, value: ir.Value, qparams: QParams, namer: Namer, pass_name: str):
    """value -> QuantizeLinear -> DequantizeLinear; every reader reads the dequantized copy.

    A graph output keeps its float value (its name is the model's contract)."""
    scale, zero = _qparam_values(graph, namer, value.name, qparams)
    quantize = ir.node("QuantizeLinear", [value, scale, zero])
    dequantize_ = ir.node("DequantizeLinear", [quantize.outputs[0], scale, zero])
    for new, suffix in ((quantize, "QuantizeLinear"), (dequantize_, "DequantizeLinear")):
        new.name = namer.fresh(f"{value.name}_{suffix}")
        new.outputs[0].name = namer.fresh(f"{value.name}_{suffix}_out")
        tag(new, pass_name)
    quantize.outputs[0].dtype = qparams.dtype
    dequantize_.outputs[0].dtype = ir.DataType.FLOAT
    dequantize_.outputs[0].shape = value.shape
    for use in list(value.uses()):
        if use.node is not quantize:
            use.node.replace_input_with(use.idx, dequantize_.outputs[0])
    producer = value.producer()
    if producer is not None:
        graph.insert_after(producer, [quantize, dequantize_])
    else:
        graph.insert_before(graph.node(0), [quantize, dequantize_])


def weight_axis(node: ir.Node) -> int:
    """The output-channel axis of a weighted node's weight."""
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    if node.op_type == "MatMul":
        return 1
    return 0


def quantize_symmetric(
    array: np.ndarray, axis: int | None, levels: int = 127
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 values and their scales (one per slice along ``axis``, or one)."""
    if axis is None:
        bound = np.array(np.abs(array).max(initial=0.0), np.float32)
        shape = ()
    else:
        moved = np.moveaxis(np.abs(array), axis, 0).reshape(array.shape[axis], -1)
        bound = moved.max(1, initial=0.0).astype(np.float32)
        shape = [1] * array.ndim
        shape[axis] = -1
    scales = np.where(bound > 0, bound / levels, 1.0).astype(np.float32)
    q = np.clip(np.round(array / scales.reshape(shape)), -levels, levels).astype(np.int8)
    return q, scales


def dequantize(q: np.ndarray, scales: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None:
        return q.astype(np.float32) * scales
    shape = [1] * q.ndim
    shape[axis] = -1
    return q.astype(np.float32) * scales.reshape(shape)


def _constant_dq(graph, weight, values, scales, zeros, axis, namer, pass_name, block=None):
    """An initializer of quantized ``values`` read through a DequantizeLinear."""
    base = weight.name
    data = add_weight(graph, namer, f"{base}_quantized", values)
    scale = add_weight(graph, namer, f"{base}_scale", scales)
    inputs = [data, scale]
    if zeros is not None:
        inputs.append(add_weight(graph, namer, f"{base}_zero_point", zeros))
    attributes = {} if axis is None else {"axis": axis}
    if block is not None:
        attributes["block_size"] = block
    node = ir.node("DequantizeLinear", inputs, attributes)
    node.name = namer.fresh(f"{base}_DequantizeLinear")
    node.outputs[0].name = namer.fresh(f"{base}_dequantized")
    node.outputs[0].dtype = ir.DataType.FLOAT
    node.outputs[0].shape = ir.Shape(weight.const_value.shape)
    tag(node, pass_name)
    graph.insert_before(graph.node(0), [node])
    return node.outputs[0]


def _bias_value(node: ir.Node) -> ir.Value | None:
    if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.inputs) < 3:
        return None
    bias = node.inputs[2]
    return bias if _constant(bias) else None


def _int32_bias_ok(node: ir.Node, bias: ir.Value, axis: int | None, scales) -> bool:
    """Whether the bias can be stored as int32 with scale s_x * s_w (what the kernels want)."""
    if len(bias.shape or ()) != 1 or len(bias.uses()) != 1:
        return False
    if node.op_type == "Gemm":
        attrs = node.attributes
        if attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0:
            return False
    return axis is None or bias.shape[0] == np.size(scales)


def _quantize_bias(graph, node, bias, scales: np.ndarray, namer, pass_name) -> None:
    """Bias as int32 with scale s_x * s_w: the integer kernels add it to their accumulator."""
    array = np.asarray(bias.const_value.numpy(), np.float64)
    scales = np.broadcast_to(np.asarray(scales, np.float32), array.shape).copy()
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    q = np.clip(np.round(array / scales), _INT32.min, _INT32.max).astype(np.int32)

    zeros = np.zeros(array.shape, np.int32)
    dq = _constant_dq(graph, bias, q, scales, zeros, 0, namer, pass_name)
    node.replace_input_with(2, dq)


def _quantize_constant_inputs(graph, node, params, namer, pass_name) -> None:
    """Constant operands of Add/Mul/Concat join the quantized kernel as quantized constants."""
    if node.op_type not in ALL_INPUTS:
        return
    dtype = next(iter(params.values())).dtype if params else ir.DataType.UINT8
    for idx, value in enumerate(node.inputs):
        if not _constant(value) or value.dtype != ir.DataType.FLOAT:
            continue
        array = np.asarray(value.const_value.numpy(), np.float32)
        qparams = activation_qparams(
            min(float(array.min(initial=0)), 0.0),
            max(float(array.max(initial=0)), 0.0),
            dtype,
            False,
        )
        qmin = 0 if dtype == ir.DataType.UINT8 else -128
        q = np.clip(np.round(array / qparams.scale) + qparams.zero_point, qmin, qmin + 255)
        q = q.astype(np.uint8 if dtype == ir.DataType.UINT8 else np.int8)
        zero = np.array(qparams.zero_point, q.dtype)
        dq = _constant_dq(
            graph, value, q, np.array(qparams.scale, np.float32), zero, None, namer, pass_name
        )
        node.replace_input_with(idx, dq)


def _correct_bias(graph, node, weight, restored, input_stats, namer) -> str:
    """Subtract the mean output shift (W_q - W)·E[x] from the bias (Nagel et al. 2019, the
    empirical form: E[x] per input channel from calibration)."""
    mean = (input_stats or TensorStats()).channel_mean
    if node.op_type not in ("Conv", "Gemm"):
        return f"skipped: {node.op_type} has no bias to correct"
    if mean is None:
        return "skipped: no input statistics"
    shift = _output_shift(node, restored - weight, mean.astype(np.float64))
    if shift is None:
        return "skipped: unsupported layout"
    bias = _bias_value(node)
    if bias is None and len(node.inputs) > 2 and node.inputs[2] is not None:
        return "skipped: bias is not a constant"
    base = np.zeros(shift.shape, np.float32) if bias is None else bias.const_value.numpy()
    corrected = (np.asarray(base, np.float64) - shift).astype(np.float32)
    new_bias = add_weight(graph, namer, f"{node.inputs[1].name}_bias_corrected", corrected)
    if len(node.inputs) > 2:
        node.replace_input_with(2, new_bias)
    else:
        node.resize_inputs(3)
        node.replace_input_with(2, new_bias)
    return f"max shift {float(np.abs(shift).max(initial=0)):.3g}"


def _output_shift(node, delta: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    if node.op_type == "Conv":
        groups = node.attributes.get_int("group", 1)
        out_channels, per_group = delta.shape[0], delta.shape[1]
        if mean.size != groups * per_group:
            return None
        summed = delta.reshape(out_channels, per_group, -1).sum(-1)
        group_of = np.arange(out_channels) // (out_channels // groups)
        return np.einsum("oc,oc->o", summed, mean.reshape(groups, per_group)[group_of])
    attrs = node.attributes
    if attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0:
        return None
    matrix = delta.T if attrs.get_int("transB", 0) else delta
    return mean @ matrix if mean.size == matrix.shape[0] else None


# -- BatchNormalization folding ------------------------------------------------------------


def fold_batchnorms(model: ir.Model) -> int:
    """Fold every BatchNormalization that follows a constant-weight Conv into it (exact)."""
    folded = 0
    namer = Namer(model)
    for bn in list(model.graph):
        if bn.op_type != "BatchNormalization" or any(o.uses() for o in bn.outputs[1:]):
            continue
        conv = bn.inputs[0].producer() if bn.inputs[0] is not None else None
        if conv is None or conv.op_type != "Conv" or not _constant(conv.inputs[1]):
            continue
        if len(bn.inputs[0].uses()) != 1 or bn.inputs[0].is_graph_output():
            continue
        if len(conv.inputs[1].uses()) != 1 or not all(_constant(v) for v in bn.inputs[1:5]):
            continue
        _fold_one(model.graph, conv, bn, namer)
        folded += 1
    return folded


def _fold_one(graph: ir.Graph, conv: ir.Node, bn: ir.Node, namer: Namer) -> None:
    gamma, beta, mean, var = (np.asarray(v.const_value.numpy(), np.float64) for v in bn.inputs[1:5])
    factor = gamma / np.sqrt(var + bn.attributes.get_float("epsilon", 1e-5))
    weight = conv.inputs[1].const_value.numpy().astype(np.float64)
    bias = _bias_value(conv)
    old_bias = np.zeros(weight.shape[0]) if bias is None else bias.const_value.numpy()
    new_weight = (weight * factor.reshape(-1, *[1] * (weight.ndim - 1))).astype(np.float32)
    new_bias = ((np.asarray(old_bias, np.float64) - mean) * factor + beta).astype(np.float32)
    conv.replace_input_with(1, add_weight(graph, namer, f"{conv.inputs[1].name}_bn", new_weight))
    bias_value = add_weight(graph, namer, f"{conv.inputs[1].name}_bn_bias", new_bias)
    if len(conv.inputs) < 3:
        conv.resize_inputs(3)
    conv.replace_input_with(2, bias_value)
    bn.outputs[0].replace_all_uses_with(conv.outputs[0])
    if bn.outputs[0].is_graph_output():
        index = graph.outputs.index(bn.outputs[0])
        name = bn.outputs[0].name
        graph.outputs[index] = conv.outputs[0]
        bn.outputs[0].name = None
        conv.outputs[0].name = name
    graph.remove(bn, safe=True)


# -- cross-layer equalization --------------------------------------------------------------


def equalize(model: ir.Model, planned: list[ir.Node], rounds: int = 4) -> str:
    """Rescale channels between Conv pairs so both weights share their range (exact in float).

    W1[i] /= s_i, b1[i] /= s_i, W2[:, i] *= s_i with s_i = sqrt(r1_i / r2_i), through a ReLU
    (positively homogeneous) or nothing; the second conv may be depthwise.
    """
    chosen = set(map(id, planned))
    pairs = [p for p in _equalizable_pairs(model) if id(p[0]) in chosen and id(p[1]) in chosen]
    for _ in range(rounds):
        for first, second in pairs:
            _equalize_pair(first, second)
    return f"equalized {len(pairs)} conv pair(s)"


def _equalizable_pairs(model: ir.Model) -> list[tuple[ir.Node, ir.Node]]:
    pairs = []
    for first in model.graph:
        if first.op_type != "Conv" or not _constant(first.inputs[1]):
            continue
        second = _single_reader(first.outputs[0])
        if second is not None and second.op_type == "Relu":
            second = _single_reader(second.outputs[0])
        if second is None or second.op_type != "Conv" or not _constant(second.inputs[1]):
            continue
        if _second_layout(second) is None:
            continue
        if len(first.inputs) > 2 and first.inputs[2] is not None and _bias_value(first) is None:
            continue  # a computed bias cannot be rescaled
        if len(first.inputs[1].uses()) == 1 and len(second.inputs[1].uses()) == 1:
            pairs.append((first, second))
    return pairs


def _single_reader(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def _second_layout(conv: ir.Node) -> str | None:
    """'dense' (group 1: input channel i is W[:, i]) or 'depthwise' (W[i]); else None."""
    groups = conv.attributes.get_int("group", 1)
    if groups == 1:
        return "dense"
    weight_shape = conv.inputs[1].const_value.shape
    return "depthwise" if weight_shape[1] == 1 and weight_shape[0] == groups else None


def _equalize_pair(first: ir.Node, second: ir.Node) -> None:
    w1 = first.inputs[1].const_value.numpy().astype(np.float64)
    w2 = second.inputs[1].const_value.numpy().astype(np.float64)
    depthwise = _second_layout(second) == "depthwise"
    r1 = np.abs(w1).reshape(w1.shape[0], -1).max(1)
    r2 = np.abs(w2).reshape(w2.shape[0], -1).max(1) if depthwise else np.abs(w2).max((0, 2, 3))
    scale = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.maximum(r2, 1e-30)), 1.0)
    column = scale.reshape(-1, *[1] * (w1.ndim - 1))
    _set_constant(first.inputs[1], w1 / column)
    bias = _bias_value(first)
    if bias is not None:
        _set_constant(bias, bias.const_value.numpy() / scale)
    if depthwise:
        _set_constant(second.inputs[1], w2 * column)
    else:
        _set_constant(second.inputs[1], w2 * scale.reshape(1, -1, *[1] * (w2.ndim - 2)))


def _set_constant(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.Tensor(np.asarray(array, np.float32), name=value.name)


def _feeds(model: ir.Model, ctx: PassContext) -> list[Feed]:
    if ctx.calibration:
        return list(ctx.calibration)
    try:
        return synthetic_feeds(model, {}, seed=ctx.seed)
    except BadData as exc:
        raise BadData(f"qdq needs calibration data (--calibration): {exc}") from None


# -- int4 weight-only ----------------------------------------------------------------------


class Int4(CompressionPass):
    """MatMul/Gemm weights -> int4 blocks read through blocked DequantizeLinear (or MatMulNBits)."""

    name = "int4"

    @dataclass(frozen=True)
    class Config:
        block_size: int = 32  # weights per scale along the reduction axis (a power of 2, 16-256)
        symmetric: bool = True  # int4 with no zero point, else uint4 with one per block
        matmulnbits: bool = False  # com.microsoft MatMulNBits (onnxruntime) instead of DQ
        exclude: tuple[str, ...] = ()

        def __post_init__(self) -> None:
            check_fields(
                self,
                {"block_size": (lambda v: v in (16, 32, 64, 128, 256), "16, 32, 64, 128 or 256")},
            )

    def required_opset(self, model: ir.Model) -> int | None:
        if self.config.matmulnbits:
            return None
        opset = default_opset(model) or BLOCKED_OPSET
        return BLOCKED_OPSET if opset < BLOCKED_OPSET else None

    @classmethod
    def applies(cls, node: ir.Node) -> bool:
        return node.op_type in ("MatMul", "Gemm") and node.domain in ("", "ai.onnx")

    def run(self, model: ir.Model, ctx: PassContext) -> PassReport:
        report = PassReport(self.name, self.config_dict())
        namer = Namer(model)
        for node in list(model.graph):
            if not self.applies(node):
                continue
            try:
                report.layers.append(self._quantize(model, node, namer))
            except Skip as skip:
                report.layers.append(LayerReport.skipped(node, str(skip)))
        return report

    def _quantize(self, model: ir.Model, node: ir.Node, namer: Namer) -> LayerReport:
        if name_matches(node, self.config.exclude):
            raise Skip("excluded by name pattern")
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        if not _constant(weight):
            raise Skip("weight is not a constant")
        if len(weight.uses()) > 1:
            raise Skip(f"weight is shared by {len(weight.uses())} uses")
        if weight.dtype != ir.DataType.FLOAT or len(weight.shape or ()) != 2:
            raise Skip("weight is not a 2-D float32 matrix")
        array = np.asarray(weight.const_value.numpy(), np.float32)
        axis = 1 if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else 0
        blocks = quantize_blocks(
            np.moveaxis(array, axis, 0), self.config.block_size, self.config.symmetric
        )
        restored = np.moveaxis(blocks.restore(), 0, axis)
        if self.config.matmulnbits:
            packed_bytes = self._nbits(model.graph, node, array, namer)
        else:
            packed_bytes = self._blocked_dq(model.graph, node, blocks, axis, namer)
        k, n = array.shape
        return LayerReport(
            node=node_label(node),
            op_type=node.op_type,
            action="rewritten",
            detail={
                "block_size": self.config.block_size,
                "symmetric": self.config.symmetric,
                "form": "MatMulNBits" if self.config.matmulnbits else "DequantizeLinear",
            },
            params_before=k * n,
            params_after=k * n,
            bytes_before=array.nbytes,
            bytes_after=packed_bytes,
            weight_error=float(
                np.linalg.norm(restored - array) / max(np.linalg.norm(array), 1e-30)
            ),
        )

    def _blocked_dq(self, graph, node, blocks: Int4Blocks, axis: int, namer) -> int:
        values = np.moveaxis(blocks.values, 0, axis)
        scales = np.moveaxis(blocks.scales, 0, axis)
        zeros = None if blocks.zeros is None else np.moveaxis(blocks.zeros, 0, axis)
        dq = _constant_dq(
            graph,
            node.inputs[1],
            values,
            scales,
            zeros,
            axis,
            namer,
            self.name,
            block=self.config.block_size,
        )
        node.replace_input_with(1, dq)
        return (
            math.ceil(values.size / 2)
            + scales.nbytes
            + (0 if zeros is None else math.ceil(zeros.size / 2))
        )

    def _nbits(self, graph, node, array: np.ndarray, namer) -> int:
        if node.op_type != "MatMul":
            raise Skip("MatMulNBits replaces MatMul only")
        packed, scales, zeros = pack_matmulnbits(
            array, self.config.block_size, self.config.symmetric
        )
        k, n = array.shape
        base = node.inputs[1].name
        inputs = [
            node.inputs[0],
            add_weight(graph, namer, f"{base}_q4", packed),
            add_weight(graph, namer, f"{base}_scales", scales),
        ]
        if zeros is not None:
            inputs.append(add_weight(graph, namer, f"{base}_zero_points", zeros))
        new = ir.node(
            "MatMulNBits",
            inputs,
            {"K": k, "N": n, "bits": 4, "block_size": self.config.block_size},
            domain="com.microsoft",
        )
        new.name = namer.fresh(f"{node.name or base}.int4")
        tag(new, self.name)
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], [new], [node.outputs[0]], [new.outputs[0]]
        )
        if "com.microsoft" not in graph.opset_imports:
            graph.opset_imports["com.microsoft"] = 1
        return packed.nbytes + scales.nbytes + (0 if zeros is None else zeros.nbytes)


@dataclass
class Int4Blocks:
    """int4 values of a [K, N] matrix quantized in blocks of rows; scales [ceil(K/B), N]."""

    values: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None
    block: int

    def restore(self) -> np.ndarray:
        rows = np.arange(self.values.shape[0]) // self.block
        zero = 0 if self.zeros is None else self.zeros.astype(np.float32)[rows]
        return (self.values.astype(np.float32) - zero) * self.scales[rows]


def quantize_blocks(matrix: np.ndarray, block: int, symmetric: bool) -> Int4Blocks:
    """Quantize ``matrix`` [K, N] in blocks of ``block`` rows, per column."""
    k = matrix.shape[0]
    padded = np.zeros((math.ceil(k / block) * block, matrix.shape[1]), np.float32)
    padded[:k] = matrix
    grouped = padded.reshape(-1, block, matrix.shape[1])
    if symmetric:
        bound = np.abs(grouped).max(1)
        scales = np.where(bound > 0, bound / 7.0, 1.0).astype(np.float32)
        rows = np.arange(k) // block
        values = np.clip(np.round(matrix / scales[rows]), -8, 7).astype(ml_dtypes.int4)
        return Int4Blocks(values, scales, None, block)
    low, high = np.minimum(grouped.min(1), 0), np.maximum(grouped.max(1), 0)
    scales = np.where(high > low, (high - low) / 15.0, 1.0).astype(np.float32)
    zeros_f = np.clip(np.round(-low / scales), 0, 15)
    rows = np.arange(k) // block
    values = np.clip(np.round(matrix / scales[rows]) + zeros_f[rows], 0, 15).astype(ml_dtypes.uint4)
    return Int4Blocks(values, scales, zeros_f.astype(ml_dtypes.uint4), block)


def pack_matmulnbits(matrix: np.ndarray, block: int, symmetric: bool):
    """MatMulNBits operands for W [K, N]: B [N, blocks, block/2] uint8 (two 4-bit values per
    byte, low nibble first), scales [N * blocks], zero points packed the same way."""
    k, n = matrix.shape
    blocks = math.ceil(k / block)
    padded = np.zeros((blocks * block, n), np.float32)
    padded[:k] = matrix
    grouped = padded.T.reshape(n, blocks, block)
    if symmetric:
        bound = np.abs(grouped).max(-1)
        scales = np.where(bound > 0, bound / 7.0, 1.0).astype(np.float32)
        zeros = np.full((n, blocks), 8.0)
    else:
        low, high = np.minimum(grouped.min(-1), 0), np.maximum(grouped.max(-1), 0)
        scales = np.where(high > low, (high - low) / 15.0, 1.0).astype(np.float32)
        zeros = np.clip(np.round(-low / scales), 0, 15)
    q = np.clip(np.round(grouped / scales[..., None]) + zeros[..., None], 0, 15).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    if symmetric:
        return packed, scales.reshape(-1), None
    zeros_u8 = zeros.astype(np.uint8)
    if blocks % 2:
        zeros_u8 = np.concatenate([zeros_u8, np.zeros((n, 1), np.uint8)], 1)
    packed_zeros = (zeros_u8[:, 0::2] | (zeros_u8[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
    return packed, scales.reshape(-1), packed_zeros
