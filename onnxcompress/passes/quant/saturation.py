"""Whether this machine's onnxruntime saturates 8-bit products.

On x86-64 CPUs without VNNI (AVX2 only, as on many AMD EPYC and older Intel parts),
onnxruntime's uint8 x int8 kernels add pairs of products in 16 bits (``vpmaddubsw``): two
products of 255 x 127 overflow them, and the sum is clipped. Weights that use the full int8
range then lose accuracy in QLinearConv and MatMulInteger on those machines (a Relu6 conv
fixture went from relative L2 0.03 to 0.07, ppocr_mobile_v2_cls's top-1 agreement from 0.9
to 0.6). Seven-bit weights (±63) keep every pair within 16 bits, which is what onnxruntime's
own quantizer offers as ``reduce_range``.

Rather than read CPU flags, the probe runs the case that overflows: a 1×1 QDQ conv whose
every input is 255 (or 127 for int8 activations) and every weight 127, and compares the
result with the exact sum.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.errors import CannotRun

_CHANNELS = 64  # input channels: 32 pairs, each one over 16 bits when saturating


@functools.cache
def int8_products_saturate(activation_type: str = "uint8") -> bool:
    """True when onnxruntime on this machine clips the sum of two 8-bit products (then
    weights should use 7 bits); False when it is exact or the probe cannot run."""
    import onnxruntime as ort

    top = 255 if activation_type == "uint8" else 127
    model = _probe_model(activation_type, float(top))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        feed = np.full((1, _CHANNELS, 1, 1), top, np.float32)
        (got,) = session.run(None, {"x": feed})
    except Exception as exc:  # any failure means "cannot tell"
        raise CannotRun(f"8-bit saturation probe: {exc}") from exc
    exact = top * 127.0 * _CHANNELS
    return bool(abs(float(got.ravel()[0]) - exact) > 0.05 * exact)


def _probe_model(activation_type: str, top: float) -> onnx.ModelProto:
    """x -> Q/DQ (scale 1) -> Conv 1×1 with int8 weights of 127 -> Q/DQ -> y."""
    zero = np.uint8(0) if activation_type == "uint8" else np.int8(0)  # sets the Q type
    exact = top * 127.0 * _CHANNELS
    initializers = [
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(zero), "zero"),
        numpy_helper.from_array(np.array(exact / 100.0, np.float32), "y_scale"),
        numpy_helper.from_array(np.full((1, _CHANNELS, 1, 1), 127, np.int8), "w_q"),
        numpy_helper.from_array(np.array(0, np.int8), "w_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "one", "zero"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "one", "zero"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "one", "w_zero"], ["w"]),
        helper.make_node("Conv", ["x_dq", "w"], ["conv"]),
        helper.make_node("QuantizeLinear", ["conv", "y_scale", "zero"], ["y_q"]),
        helper.make_node("DequantizeLinear", ["y_q", "y_scale", "zero"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "saturation_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, _CHANNELS, 1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 1, 1])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
