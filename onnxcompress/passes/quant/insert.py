"""The Q/DQ nodes qdq and int4 add to a graph: a QuantizeLinear -> DequantizeLinear pair on an
activation, and constants stored quantized and read through a DequantizeLinear (weights, int32
biases, constant operands of Add/Mul/Concat).

onnxruntime recognizes these patterns around a float op and replaces the group by its integer
kernel (QLinearConv, QGemm, QLinearAdd…), so the float graph stays valid and runnable as is.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcompress.emit import Emitter
from onnxcompress.graph import is_constant
from onnxcompress.passes.quant.plan import ALL_INPUTS, CLAMPING, clamp_bounds
from onnxcompress.passes.quant.qparams import QParams, activation_qparams, quantize_with

_INT32 = np.iinfo(np.int32)


def insert_qdq(emitter: Emitter, value: ir.Value, qparams: QParams) -> None:
    """value -> QuantizeLinear -> DequantizeLinear; every reader reads the dequantized copy.

    A graph output keeps its float value (its name is the model's contract)."""
    scale, zero = _qparam_constants(emitter, value.name, qparams)
    quantize = emitter.node(
        "QuantizeLinear",
        [value, scale, zero],
        name=f"{value.name}_QuantizeLinear",
        output=f"{value.name}_QuantizeLinear_out",
    )
    dequantize = emitter.node(
        "DequantizeLinear",
        [quantize.outputs[0], scale, zero],
        name=f"{value.name}_DequantizeLinear",
        output=f"{value.name}_DequantizeLinear_out",
    )
    quantize.outputs[0].dtype = qparams.dtype
    dequantize.outputs[0].dtype = ir.DataType.FLOAT
    dequantize.outputs[0].shape = value.shape
    for use in list(value.uses()):
        if use.node is not quantize:
            use.node.replace_input_with(use.idx, dequantize.outputs[0])
    graph = emitter.graph
    producer = value.producer()
    if producer is not None:
        graph.insert_after(producer, [quantize, dequantize])
    else:
        graph.insert_before(graph.node(0), [quantize, dequantize])


def _qparam_constants(emitter: Emitter, base: str, qparams: QParams) -> tuple[ir.Value, ir.Value]:
    scale = emitter.constant(f"{base}_scale", np.array(qparams.scale, np.float32))
    zero_dtype = np.uint8 if qparams.dtype == ir.DataType.UINT8 else np.int8
    zero = emitter.constant(f"{base}_zero_point", np.array(qparams.zero_point, zero_dtype))
    return scale, zero


def constant_dq(
    emitter: Emitter,
    original: ir.Value,
    values: np.ndarray,
    scales: np.ndarray,
    zeros: np.ndarray | None,
    axis: int | None,
    block: int | None = None,
) -> ir.Value:
    """The constant ``original`` as an initializer of quantized ``values`` read through a
    DequantizeLinear (per ``axis``, in blocks of ``block`` along it when given); returns the
    dequantized value for the reader to take instead."""
    base = original.name
    inputs = [
        emitter.constant(f"{base}_quantized", values),
        emitter.constant(f"{base}_scale", scales),
    ]
    if zeros is not None:
        inputs.append(emitter.constant(f"{base}_zero_point", zeros))
    attributes = {} if axis is None else {"axis": axis}
    if block is not None:
        attributes["block_size"] = block
    node = emitter.node(
        "DequantizeLinear",
        inputs,
        attributes,
        name=f"{base}_DequantizeLinear",
        output=f"{base}_dequantized",
    )
    node.outputs[0].dtype = ir.DataType.FLOAT
    node.outputs[0].shape = ir.Shape(original.const_value.shape)
    emitter.graph.insert_before(emitter.graph.node(0), [node])
    return node.outputs[0]


def int32_bias_ok(node: ir.Node, bias: ir.Value, channels: int | None) -> bool:
    """Whether the bias can be stored as int32 with scale s_x * s_w (what the kernels want)."""
    if len(bias.shape or ()) != 1 or len(bias.uses()) != 1:
        return False
    if node.op_type == "Gemm":
        attrs = node.attributes
        if attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0:
            return False
    return channels is None or bias.shape[0] == channels


def quantize_bias(emitter: Emitter, node: ir.Node, bias: ir.Value, scales: np.ndarray) -> None:
    """Bias as int32 with scale s_x * s_w: the integer kernels add it to their accumulator."""
    array = np.asarray(bias.const_value.numpy(), np.float64)
    scales = np.broadcast_to(np.asarray(scales, np.float32), array.shape).copy()
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    q = np.clip(np.round(array / scales), _INT32.min, _INT32.max).astype(np.int32)
    zeros = np.zeros(array.shape, np.int32)
    node.replace_input_with(2, constant_dq(emitter, bias, q, scales, zeros, 0))


def quantize_constant_inputs(emitter: Emitter, node: ir.Node, params: dict[str, QParams]) -> None:
    """Constant operands of Add/Mul/Concat join the quantized kernel as quantized constants,
    each with its own min/max range in the activations' type."""
    if node.op_type not in ALL_INPUTS:
        return
    dtype = next(iter(params.values())).dtype if params else ir.DataType.UINT8
    for idx, value in enumerate(node.inputs):
        if not is_constant(value) or value.dtype != ir.DataType.FLOAT:
            continue
        array = np.asarray(value.const_value.numpy(), np.float32)
        qparams = activation_qparams(
            min(float(array.min(initial=0)), 0.0),
            max(float(array.max(initial=0)), 0.0),
            dtype,
            False,
        )
        q = quantize_with(array, qparams)
        scale, zero = np.array(qparams.scale, np.float32), np.array(qparams.zero_point, q.dtype)
        node.replace_input_with(idx, constant_dq(emitter, value, q, scale, zero, None))


def absorbed_clamp(node: ir.Node, params: dict[str, QParams]) -> bool:
    """Whether a Relu/Clip is redundant once its input is quantized: every value the input's
    Q/DQ can give back already lies within the clamp's bounds (onnxruntime's quantizer drops
    such activations the same way, so that the producer's integer kernel clamps)."""
    if node.op_type not in CLAMPING or node.outputs[0].is_graph_output():
        return False
    source = node.inputs[0]
    bounds = clamp_bounds(node)
    if source is None or source.name not in params or bounds is None or len(source.uses()) != 1:
        return False
    qparams = params[source.name]
    qmin = 0 if qparams.dtype == ir.DataType.UINT8 else -128
    low = (qmin - qparams.zero_point) * qparams.scale
    high = (qmin + 255 - qparams.zero_point) * qparams.scale
    slack = 1e-6 * max(1.0, abs(bounds[1])) if np.isfinite(bounds[1]) else 0.0
    return low >= bounds[0] and high <= bounds[1] + slack


def remove_clamp(graph: ir.Graph, node: ir.Node) -> None:
    """Readers of the clamp read its input instead; the clamp goes."""
    node.outputs[0].replace_all_uses_with(node.inputs[0])
    graph.remove(node, safe=True)
