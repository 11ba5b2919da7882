"""qdq (int8 static): placement, fusion in onnxruntime, exact float rewrites (BN folding,
equalization), calibration aids, skips, and real models. int4 is in test_int4.py."""

from __future__ import annotations

import gzip

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import Recipe, RecipeError, compress
from onnxcompress.emit import PASS_TAG
from onnxcompress.passes.quant.batchnorm import fold_batchnorms
from onnxcompress.passes.quant.equalize import equalize
from onnxcompress.pipeline import Options
from tests.conftest import parse, run

NO_VALIDATE = Options(validate=False)


def conv_model(batch="N", relu=True, bn=False, depthwise=False, opset=17) -> onnx.ModelProto:
    """x[N,4,8,8] -> Conv(8) [-> BN] [-> Relu] -> Conv(8 pointwise or depthwise) -> GAP ->
    Flatten -> Gemm(3)."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * np.linspace(0.05, 3, 8).reshape(
        -1, 1, 1, 1
    ).astype(np.float32)
    w2 = rng.standard_normal((8, 1, 3, 3) if depthwise else (8, 8, 1, 1)).astype(np.float32)
    inits = [
        numpy_helper.from_array(w1, "W1"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "B1"),
        numpy_helper.from_array(w2, "W2"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "B2"),
        numpy_helper.from_array(rng.standard_normal((3, 8)).astype(np.float32), "W3"),
        numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "B3"),
    ]
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="/conv1/Conv", pads=[1] * 4)]
    last = "c1"
    if bn:
        for name, value in [("g", 1.5), ("b", 0.2), ("m", 0.3), ("v", 2.0)]:
            inits.append(numpy_helper.from_array(np.full(8, value, np.float32), name))
        nodes.append(helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["bn"]))
        last = "bn"
    if relu:
        nodes.append(helper.make_node("Relu", [last], ["r1"], name="/relu/Relu"))
        last = "r1"
    second = dict(group=8, pads=[1] * 4) if depthwise else {}
    nodes += [
        helper.make_node("Conv", [last, "W2", "B2"], ["c2"], name="/conv2/Conv", **second),
        helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="/pool/GAP"),
        helper.make_node("Flatten", ["p"], ["f"], name="/flat/Flatten"),
        helper.make_node("Gemm", ["f", "W3", "B3"], ["y"], name="/fc/Gemm", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def feeds(count=8, batch=4, seed=1, shift=0.0):
    rng = np.random.default_rng(seed)
    return [
        {"x": (rng.standard_normal((batch, 4, 8, 8)) + shift).astype(np.float32)}
        for _ in range(count)
    ]


def optimized_ops(model: ir.Model, tmp_path) -> list[str]:
    """The op types of the graph onnxruntime actually runs (after its QDQ fusions)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def quantize(model, setting="qdq", data=None) -> tuple[ir.Model, object]:
    """Compress a copy of ``model`` (a ModelProto) and return it as an ir.Model."""
    copy = ir.from_proto(model)
    return compress(copy, [setting], calibration=data or feeds(), options=NO_VALIDATE)


# -- structure and fusion -------------------------------------------------------------------


def test_weights_per_channel_int8_bias_int32_activations_uint8():
    model, report = quantize(conv_model(), "qdq:reduce_range=false")  # 8-bit weights anywhere
    ops = [n.op_type for n in model.graph]
    assert ops.count("QuantizeLinear") >= 4 and ops.count("DequantizeLinear") >= 8
    conv1 = next(n for n in model.graph if n.name == "/conv1/Conv")
    weight_dq, bias_dq = conv1.inputs[1].producer(), conv1.inputs[2].producer()
    assert weight_dq.op_type == bias_dq.op_type == "DequantizeLinear"
    assert weight_dq.inputs[0].const_value.dtype == ir.DataType.INT8
    assert weight_dq.attributes.get_int("axis") == 0
    assert weight_dq.inputs[1].const_value.shape == (8,)  # one scale per output channel
    assert bias_dq.inputs[0].const_value.dtype == ir.DataType.INT32
    x_scale = float(conv1.inputs[0].producer().inputs[1].const_value.numpy())
    np.testing.assert_allclose(
        bias_dq.inputs[1].const_value.numpy(),
        x_scale * weight_dq.inputs[1].const_value.numpy(),
        rtol=1e-6,
    )
    gemm = next(n for n in model.graph if n.name == "/fc/Gemm")
    assert gemm.inputs[1].producer().attributes.get_int("axis") == 0  # transB: rows are outputs
    activation_q = [n for n in model.graph if n.op_type == "QuantizeLinear"]
    assert all(n.inputs[2].const_value.dtype == ir.DataType.UINT8 for n in activation_q)
    assert all(n.metadata_props.get(PASS_TAG) == "qdq" for n in activation_q)
    assert {layer.action for layer in report.passes[0].layers} == {"rewritten"}
    conv_layer = report.passes[0].layers[0]
    assert conv_layer.bytes_after == 8 * 4 * 3 * 3 + 8 * 4 + 8  # int8, scales, zero points
    assert 0 < conv_layer.weight_error < 0.01


def test_relu_is_absorbed_and_onnxruntime_fuses_quantized_kernels(tmp_path):
    model, report = quantize(conv_model())
    assert not [n for n in model.graph if n.op_type == "Relu"]  # the Q of conv1 clamps instead
    conv1 = next(n for n in model.graph if n.name == "/conv1/Conv")
    quantize_node = next(iter(conv1.outputs[0].uses())).node
    assert quantize_node.op_type == "QuantizeLinear"
    assert int(quantize_node.inputs[2].const_value.numpy()) == 0  # zero point at the bottom
    relu = next(layer for layer in report.passes[0].layers if layer.op_type == "Relu")
    assert relu.action == "rewritten" and "removed" in relu.detail["absorbed"]
    ops = optimized_ops(model, tmp_path)
    assert ops.count("QLinearConv") == 2
    assert "QGemm" in ops
    assert "Relu" not in ops
    assert "QLinearGlobalAveragePool" in ops


def test_concat_inputs_and_output_share_one_scale(tmp_path):
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] a, float[N, 4] b, float[8, 2] W) => (float[N, 2] y)
        {
            sa = Relu(a)
            big = Mul(b, b)
            c = Concat<axis = 1>(sa, big)
            y = MatMul(c, W)
        }
        """
    )
    weight = np.random.default_rng(0).standard_normal((8, 2)).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(weight, "W"))
    del model.graph.input[2]
    rng = np.random.default_rng(2)
    data = [
        {
            "a": rng.standard_normal((2, 4)).astype(np.float32),
            "b": 3 * rng.standard_normal((2, 4)).astype(np.float32),
        }
        for _ in range(4)
    ]
    quantized, _ = quantize(model, data=data)
    concat = next(n for n in quantized.graph if n.op_type == "Concat")
    scales = {float(v.producer().inputs[1].const_value.numpy()) for v in concat.inputs}
    out_q = next(iter(concat.outputs[0].uses())).node
    scales.add(float(out_q.inputs[1].const_value.numpy()))
    assert len(scales) == 1
    assert "QLinearConcat" in optimized_ops(quantized, tmp_path)


def test_options_exclude_first_last_and_op_types():
    _, report = quantize(conv_model(), "qdq:exclude_first_last=true")
    reasons = {layer.node: layer.reason for layer in report.passes[0].layers}
    assert (
        reasons["/conv1/Conv"]
        == reasons["/fc/Gemm"]
        == ("first or last weighted layer (exclude_first_last)")
    )
    assert reasons["/conv2/Conv"] is None
    _, report = quantize(conv_model(), "qdq:op_types=Conv,exclude=/conv2/*")
    layers = {layer.node: layer for layer in report.passes[0].layers}
    assert set(layers) == {"/conv1/Conv", "/conv2/Conv"}
    assert layers["/conv2/Conv"].reason == "excluded by name pattern"


def test_bad_options_are_rejected():
    for setting in ("qdq:method=kl", "qdq:activation_type=int16", "qdq:op_types=Softmax"):
        with pytest.raises(RecipeError):
            Recipe.from_options([setting]).build()
    with pytest.raises(RecipeError):
        Recipe.from_options(["int4:block_size=48"]).build()


# -- numerics ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_every_method_stays_close_to_float(method):
    model = conv_model()
    quantized, _ = quantize(model, f"qdq:method={method}")
    test = feeds(2, seed=7)[1]
    error = rel_error(run(model, test)[0], run(quantized, test)[0])
    assert error < 0.08, f"{method}: relative error {error:.3f}"


def test_int8_symmetric_activations():
    model = conv_model()
    quantized, _ = quantize(model, "qdq:activation_type=int8,activation_symmetric=true")
    q_nodes = [n for n in quantized.graph if n.op_type == "QuantizeLinear"]
    assert all(int(n.inputs[2].const_value.numpy()) == 0 for n in q_nodes)
    assert all(n.inputs[2].const_value.dtype == ir.DataType.INT8 for n in q_nodes)
    test = feeds(1, seed=9)[0]
    assert rel_error(run(model, test)[0], run(quantized, test)[0]) < 0.08


def test_batchnorm_folding_is_exact():
    proto = conv_model(bn=True)
    model = ir.from_proto(proto)
    assert fold_batchnorms(model) == 1
    assert "BatchNormalization" not in [n.op_type for n in model.graph]
    test = feeds(1)[0]
    np.testing.assert_allclose(run(model, test)[0], run(proto, test)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("depthwise", [False, True])
def test_equalization_is_exact_in_float_and_balances_ranges(depthwise):
    proto = conv_model(depthwise=depthwise)
    model = ir.from_proto(proto)
    planned = list(model.graph)
    assert equalize(model, planned) == "equalized 1 conv pair(s)"
    test = feeds(1)[0]
    np.testing.assert_allclose(run(model, test)[0], run(proto, test)[0], atol=1e-5, rtol=1e-5)
    w1 = model.graph.initializers["W1"].const_value.numpy()
    ranges = np.abs(w1).reshape(8, -1).max(1)
    original = np.abs(numpy_helper.to_array(proto.graph.initializer[0])).reshape(8, -1).max(1)
    assert ranges.max() / ranges.min() < original.max() / original.min()


def test_equalization_skips_non_homogeneous_activation():
    model = ir.from_proto(conv_model(relu=False))
    assert equalize(model, list(model.graph)) == "equalized 1 conv pair(s)"  # no activation
    proto = conv_model()
    proto.graph.node[1].op_type = "Sigmoid"  # not positively homogeneous
    model = ir.from_proto(proto)
    assert equalize(model, list(model.graph)) == "equalized 0 conv pair(s)"


def test_equalization_reduces_error_with_per_tensor_weights():
    model = conv_model(depthwise=True)
    test = feeds(4, seed=5)
    errors = {}
    for flag in ("false", "true"):
        setting = f"qdq:per_channel=false,equalize={flag},reduce_range=false"
        quantized, report = quantize(model, setting)
        errors[flag] = np.mean([rel_error(run(model, f)[0], run(quantized, f)[0]) for f in test])
    assert errors["true"] < errors["false"]
    details = {layer.node: layer.detail.get("equalized") for layer in report.passes[0].layers}
    assert details["/conv1/Conv"].startswith("outputs / s, s in [")
    assert details["/conv2/Conv"].endswith("with /conv1/Conv")


def test_equalization_says_why_relu6_pairs_are_left_alone():
    proto = conv_model()
    relu = proto.graph.node[1]
    relu.op_type = "Clip"
    proto.graph.initializer.extend(
        [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("lo", 0), ("hi", 6))]
    )
    relu.input.extend(["lo", "hi"])
    model = ir.from_proto(proto)
    note = equalize(model, list(model.graph))
    assert note.startswith("equalized 0 conv pair(s); 1 Conv -> Clip -> Conv pair(s) left alone")


def test_bias_correction_removes_the_mean_shift():
    model = conv_model(relu=False)
    calibration = feeds(8, shift=3.0)
    shifts = {}
    for flag in ("false", "true"):
        quantized, report = quantize(
            model, f"qdq:per_channel=false,bias_correction={flag}", calibration
        )
        outs = [(run(model, f)[0], run(quantized, f)[0]) for f in feeds(4, seed=11, shift=3.0)]
        shifts[flag] = abs(np.mean([(q - r).mean() for r, q in outs]))
    assert "max shift" in report.passes[0].layers[0].detail["bias_correction"]
    assert shifts["true"] < shifts["false"]


def test_sensitivity_reports_each_weighted_layer():
    _, report = quantize(conv_model(), "qdq:sensitivity=true")
    layers = report.passes[0].layers
    values = [x.detail["sensitivity_rel_l2"] for x in layers if x.op_type in ("Conv", "Gemm")]
    assert len(values) == 3 and all(0 < v < 0.1 for v in values)


def test_dynamic_batch():
    model = conv_model()
    quantized, _ = quantize(model, data=feeds(4, batch=2))
    test = {"x": np.random.default_rng(3).standard_normal((5, 4, 8, 8)).astype(np.float32)}
    assert run(quantized, test)[0].shape == (5, 3)
    assert rel_error(run(model, test)[0], run(quantized, test)[0]) < 0.08


def test_old_opset_is_upgraded_for_per_channel_scales():
    _, report = quantize(conv_model(opset=11))
    assert any("upgraded opset 11 -> 13" in note for note in report.normalization)


# -- negative ------------------------------------------------------------------------------


def test_weight_graph_input_is_skipped_with_reason():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x, float[4, 3] W) => (float[N, 3] y) { y = Gemm(x, W) }
        """
    )
    data = [{"x": np.ones((2, 4), np.float32), "W": np.ones((4, 3), np.float32)}]
    _, report = quantize(model, data=data)
    assert report.passes[0].layers[0].reason == "weight is not a constant"


def test_already_quantized_tensors_are_left_alone():
    model, _ = quantize(conv_model())
    counts = [n.op_type for n in model.graph].count("QuantizeLinear")
    again, report = quantize(ir.to_proto(model))
    assert [n.op_type for n in again.graph].count("QuantizeLinear") == counts
    reasons = {layer.reason for layer in report.passes[0].layers}
    assert "already quantized (an input comes from DequantizeLinear)" in reasons


def test_float16_is_skipped():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float16[N, 4] x) => (float16[N, 4] y) { y = Sigmoid(x) }
        """
    )
    _, report = quantize(model, data=[{"x": np.ones((2, 4), np.float16)}])
    assert "non-float" in report.passes[0].layers[0].reason


# -- real models ---------------------------------------------------------------------------


def mnist8_test_set(real):
    with gzip.open(real / "t10k-images-idx3-ubyte.gz") as stream:
        images = np.frombuffer(stream.read(), np.uint8, offset=16).reshape(-1, 1, 1, 28, 28)
    with gzip.open(real / "t10k-labels-idx1-ubyte.gz") as stream:
        labels = np.frombuffer(stream.read(), np.uint8, offset=8)
    return images.astype(np.float32), labels


def test_mnist8_int8_accuracy_on_the_real_test_set(real, tmp_path):
    images, labels = mnist8_test_set(real)
    calibration = [{"Input3": image} for image in images[::100]]  # 100 images
    quantized, _ = compress(str(real / "mnist-8.onnx"), ["qdq"], calibration, options=NO_VALIDATE)
    accuracies = []
    for model in (str(real / "mnist-8.onnx"), ir.to_proto(quantized).SerializeToString()):
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        predictions = [session.run(None, {"Input3": image})[0].argmax() for image in images]
        accuracies.append(float(np.mean(np.array(predictions) == labels)))
    assert accuracies[0] == pytest.approx(0.9891)
    assert accuracies[0] - accuracies[1] <= 0.002, accuracies
    ops = optimized_ops(quantized, tmp_path)
    assert ops.count("QLinearConv") == 2 and "QLinearMatMul" in ops


@pytest.mark.slow
def test_ppocr_cls_quantized_agrees_and_fuses(real, tmp_path):
    from fixtures.photos import cls_inputs

    images = cls_inputs(32)
    data = [{"x": images[i : i + 8]} for i in range(0, 32, 8)]
    path = str(real / "ppocr_mobile_v2_cls.onnx")
    quantized, report = compress(path, ["qdq"], data[:2], options=NO_VALIDATE)
    assert "folded 35 BatchNormalization into Conv" in report.passes[0].notes
    reference = np.concatenate([run(path, f)[0] for f in data[2:]])
    candidate = np.concatenate([run(quantized, f)[0] for f in data[2:]])
    assert np.mean(reference.argmax(-1) == candidate.argmax(-1)) >= 0.85
    assert optimized_ops(quantized, tmp_path).count("QLinearConv") == 53


def test_the_same_run_writes_the_same_bytes_whatever_the_hash_seed(tmp_path):
    """qdq once ordered its Q/DQ nodes and constants by Python set iteration, so two runs of
    the same recipe wrote different files (PYTHONHASHSEED): a toolchain comparing hashes saw
    a change where there was none."""
    import os
    import subprocess
    import sys

    source = tmp_path / "m.onnx"
    onnx.save(conv_model(bn=True), source)
    digests = set()
    for seed in ("1", "2", "3"):
        out = tmp_path / f"o{seed}.onnx"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        command = [sys.executable, "-m", "onnxcompress", "compress", str(source), "-o", str(out)]
        subprocess.run([*command, "-p", "qdq", "--no-validate"], env=env, check=True)
        digests.add(out.read_bytes())
    assert len(digests) == 1


def test_keep_float_leaves_the_most_sensitive_layer_float_and_unwrapped(tmp_path):
    """Mixed precision: the layer whose quantization alone costs the most stays float, with no
    DequantizeLinear on its input (onnxruntime would quantize the weights of a Conv reading
    one itself, per tensor) and no Q/DQ on its output."""
    model = conv_model()
    _, measured = quantize(model, "qdq:sensitivity=true")
    errors = {
        layer.node: layer.detail["sensitivity_rel_l2"]
        for layer in measured.passes[0].layers
        if "sensitivity_rel_l2" in layer.detail
    }
    worst = max(errors, key=errors.get)
    quantized, report = quantize(model, "qdq:keep_float=1")
    kept = next(layer for layer in report.passes[0].layers if layer.node == worst)
    assert kept.action == "skipped" and kept.reason.startswith("kept in float (keep_float)")
    node = next(n for n in quantized.graph if n.name == worst)
    assert node.inputs[1].producer() is None  # the float weight itself
    assert all(use.node.op_type != "QuantizeLinear" for use in node.outputs[0].uses())
    others = [n for n in quantized.graph if n.op_type in ("Conv", "Gemm") and n.name != worst]
    assert all(n.inputs[1].producer().op_type == "DequantizeLinear" for n in others)
    errors = {}
    for setting in ("qdq", "qdq:keep_float=1"):
        candidate, _ = quantize(model, setting)
        test = feeds(4, seed=9)
        errors[setting] = np.mean([rel_error(run(model, f)[0], run(candidate, f)[0]) for f in test])
    assert errors["qdq:keep_float=1"] < errors["qdq"]


def _weight_codes(model: ir.Model) -> list[np.ndarray]:
    """The int8 weights every Conv reads through its DequantizeLinear."""
    convs = [n for n in model.graph if n.op_type == "Conv"]
    return [n.inputs[1].producer().inputs[0].const_value.numpy() for n in convs]


@pytest.mark.parametrize("saturates", [True, False])
def test_auto_reduce_range_follows_the_saturation_probe(monkeypatch, saturates):
    import onnxcompress.passes.quant.qdq as qdq_module

    monkeypatch.setattr(qdq_module, "int8_products_saturate", lambda _type: saturates)
    model, report = quantize(conv_model())
    top = max(int(np.abs(codes).max()) for codes in _weight_codes(model))
    assert top == (63 if saturates else 127)  # each channel's largest weight takes the top code
    assert any("reduce_range" in note for note in report.passes[0].notes) == saturates


def test_reduce_range_true_keeps_weights_within_7_bits_and_validates():
    proto = conv_model()
    model, _ = quantize(proto, "qdq:reduce_range=true")
    assert max(int(np.abs(codes).max()) for codes in _weight_codes(model)) == 63
    for feed in feeds(2, seed=9):
        assert rel_error(run(proto, feed)[0], run(model, feed)[0]) < 0.05


def test_saturation_probe_is_exact_with_7_bit_weights():
    """The probe's model computes the exact sum when no pair of products overflows 16 bits
    (weights of 63), on any CPU: a probe that misreads saturation would fail here."""
    from onnxcompress.passes.quant import saturation

    for activation_type, top in (("uint8", 255.0), ("int8", 127.0)):
        proto = saturation._probe_model(activation_type, top)
        weight = next(t for t in proto.graph.initializer if t.name == "w_q")
        weight.CopyFrom(numpy_helper.from_array(np.full((1, 64, 1, 1), 63, np.int8), "w_q"))
        session = ort.InferenceSession(
            proto.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        (got,) = session.run(None, {"x": np.full((1, 64, 1, 1), top, np.float32)})
        exact = top * 63 * 64
        assert abs(float(got.ravel()[0]) - exact) < 0.02 * exact
        assert isinstance(saturation.int8_products_saturate(activation_type), bool)
