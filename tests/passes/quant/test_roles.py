"""qdq quantizes data only: shape computations and integer tensors never get a Q/DQ pair, and
the ops exporters put between two convs (Relu/Clip, Pad) are placed the way onnxruntime fuses."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import compress
from onnxcompress.passes.quant.roles import shape_tensors
from onnxcompress.pipeline import Options
from tests import corpus


def attention_with_int64_mask() -> onnx.ModelProto:
    """One attention head as torch exports BERT's: the int64 mask goes Unsqueeze -> Cast ->
    Sub(1, m) -> Mul(-10000) and is added to the scores."""
    rng = np.random.default_rng(0)
    d = 8
    inits = [
        numpy_helper.from_array(rng.standard_normal((d, d)).astype(np.float32), name)
        for name in ("Wq", "Wk", "Wv")
    ]
    inits += [
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(-10000.0, np.float32), "big"),
    ]
    nodes = [
        helper.make_node("MatMul", ["h", "Wq"], ["q"]),
        helper.make_node("MatMul", ["h", "Wk"], ["k"]),
        helper.make_node("MatMul", ["h", "Wv"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Unsqueeze", ["mask", "axis1"], ["mask3"]),
        helper.make_node("Cast", ["mask3"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "maskf"], ["inverted"]),
        helper.make_node("Mul", ["inverted", "big"], ["bias"]),
        helper.make_node("Add", ["scores", "bias"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["weights"], axis=-1),
        helper.make_node("MatMul", ["weights", "v"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "attention",
        [
            helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 6, d]),
            helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", 6]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, d])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def attention_feeds(count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    feeds = []
    for _ in range(count):
        mask = np.ones((2, 6), np.int64)
        mask[:, rng.integers(3, 6) :] = 0
        feeds.append({"h": rng.standard_normal((2, 6, 8)).astype(np.float32), "mask": mask})
    return feeds


def quantized_inputs(model: ir.Model) -> set[str]:
    return {n.inputs[0].name for n in model.graph if n.op_type == "QuantizeLinear"}


def test_shape_paths_and_integer_tensors_are_found_before_calibration():
    flatten = ir.from_proto(corpus.flatten_by_shape_path())
    assert {"shape", "batch", "batch1", "target"} <= shape_tensors(flatten.graph)
    assert not {"x", "c", "flat", "y"} & shape_tensors(flatten.graph)
    attention = ir.from_proto(attention_with_int64_mask())
    found = shape_tensors(attention.graph)
    assert {"mask", "mask3"} <= found
    assert not {"h", "q", "scores", "maskf", "bias", "masked", "y"} & found


def test_int64_attention_mask_gets_no_qdq_and_the_model_validates():
    proto = attention_with_int64_mask()
    feeds = attention_feeds(4)
    quantized, report = compress(proto, ["qdq"], feeds, options=Options(latency_runs=0))
    model = ir.from_proto(quantized)
    assert not {"mask", "mask3"} & quantized_inputs(model)
    assert {"h", "scores"} <= quantized_inputs(model)
    unsqueeze = next(layer for layer in report.passes[0].layers if layer.op_type == "Unsqueeze")
    assert unsqueeze.action == "skipped" and "computes a shape" in unsqueeze.reason
    assert report.validation.outputs[0].rel_l2 < 0.1
    onnx.checker.check_model(quantized, full_check=True)


def test_torch_flatten_keeps_its_shape_path_float_free():
    quantized, report = compress(corpus.flatten_by_shape_path(), ["qdq"], options=Options())
    model = ir.from_proto(quantized)
    assert not {"shape", "batch", "batch1", "target"} & quantized_inputs(model)
    assert "c" in quantized_inputs(model)
    assert report.validation.outputs[0].rel_l2 < 0.1


def relu6_reflect_pad_conv() -> onnx.ModelProto:
    """Conv -> Clip(0, 6) -> Pad(reflect) -> Conv: the reflect Pad stays (a conv cannot take
    it), carries its input's scale, and the Clip is absorbed into the first conv's range."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32), "W2"),
        numpy_helper.from_array(np.array(0.0, np.float32), "low"),
        numpy_helper.from_array(np.array(6.0, np.float32), "high"),
        numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"]),
        helper.make_node("Clip", ["c1", "low", "high"], ["r"]),
        helper.make_node("Pad", ["r", "pads"], ["p"], mode="reflect"),
        helper.make_node("Conv", ["p", "W2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_clip_is_absorbed_and_pad_carries_its_inputs_scale():
    proto = relu6_reflect_pad_conv()
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.standard_normal((2, 3, 10, 10)).astype(np.float32)} for _ in range(4)]
    quantized, report = compress(proto, ["qdq"], feeds, options=Options(latency_runs=0))
    model = ir.from_proto(quantized)
    ops = [n.op_type for n in model.graph]
    assert "Clip" not in ops and "Pad" in ops
    pad = next(n for n in model.graph if n.op_type == "Pad")
    before, after = pad.inputs[0].producer(), next(iter(pad.outputs[0].uses())).node
    assert before.op_type == "DequantizeLinear" and after.op_type == "QuantizeLinear"
    scale = [float(n.inputs[1].const_value.numpy()) for n in (before, after)]
    assert scale[0] == scale[1]
    assert float(scale[0]) <= 6.0 / 255 * (1 + 1e-6)  # the clipped range, not the conv's
    assert report.validation.outputs[0].rel_l2 < 0.05
