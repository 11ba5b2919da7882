"""lowrank on convolutions: every scheme exact at full rank over strides, pads, dilations, 1-D
and bias/no bias; structure; the data-aware fit; max_error; skips; real models."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures.mnist import mnist_split
from onnxcompress import compress, load
from onnxcompress.conv import ConvGeometry, im2col
from onnxcompress.pipeline import Options
from tests.conftest import FIXTURES, run

NO_VALIDATE = Options(validate=False)
FULL = "ratio=1,min_saving=-100"  # full rank, growth allowed: every scheme must be exact


def conv_model(out=6, channels=4, kernel=(3, 3), spatial=(9, 11), bias=True, group=1, **attrs):
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((out, channels // group, *kernel)).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "W")]
    inputs = ["X", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(out).astype(np.float32), "B"))
        inputs.append("B")
    node = helper.make_node("Conv", inputs, ["Y"], name="/conv/Conv", group=group, **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, channels, *spatial])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feed(proto: onnx.ModelProto, seed: int = 5) -> dict[str, np.ndarray]:
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    return {"X": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


GEOMETRIES = {
    "plain": dict(),
    "stride2-pads": dict(strides=[2, 2], pads=[1, 2, 0, 1]),
    "dilation": dict(dilations=[2, 1], pads=[2, 1, 2, 1]),
    "same-upper": dict(auto_pad="SAME_UPPER", strides=[2, 1]),
    "no-bias": dict(bias=False, pads=[1, 1, 1, 1]),
    "1d": dict(kernel=(5,), spatial=(17,), strides=[3], pads=[2, 2], dilations=[2]),
    "1x1": dict(kernel=(1, 1), out=8, channels=12),
}


@pytest.mark.parametrize(
    ("scheme", "geometry"),
    [
        (scheme, geometry)
        for scheme in ("svd", "tucker2", "separable")
        for geometry in GEOMETRIES
        if (scheme, geometry) != ("separable", "1x1")  # left to svd: see the next test
    ],
)
def test_every_scheme_at_full_rank_reproduces_the_conv(scheme, geometry):
    proto = conv_model(**GEOMETRIES[geometry])
    result, report = compress(proto, [f"lowrank:scheme={scheme},{FULL}"], options=NO_VALIDATE)
    assert report.passes[0].rewritten, report.passes[0].layers[0].reason
    feed = _feed(proto)
    np.testing.assert_allclose(run(result, feed)[0], run(proto, feed)[0], atol=1e-5, rtol=1e-5)


def test_separable_leaves_a_1x1_conv_alone_with_reason():
    proto = conv_model(**GEOMETRIES["1x1"])
    result, report = compress(proto, [f"lowrank:scheme=separable,{FULL}"], options=NO_VALIDATE)
    assert "1×1 conv has no kernel to separate" in report.passes[0].layers[0].reason
    assert [n.op_type for n in ir.from_proto(result).graph] == ["Conv"]


@pytest.mark.parametrize(
    ("setting", "ops", "detail"),
    [
        ("scheme=svd,rank=3", ["Conv", "Conv"], {"rank": 3, "full_rank": 6}),
        ("scheme=tucker2,ratio=0.5", ["Conv", "Conv", "Conv"], {"ranks": [2, 3]}),
        ("scheme=separable,rank=2", ["Conv", "Conv"], {"multiplier": 2}),
    ],
)
def test_structure_of_each_scheme(setting, ops, detail):
    proto = conv_model(out=6, channels=4, strides=[2, 2], pads=[1, 1, 1, 1])
    result, report = compress(proto, [f"lowrank:{setting},min_saving=-10"], options=NO_VALIDATE)
    model = ir.from_proto(result)
    nodes = list(model.graph)
    assert [n.op_type for n in nodes] == ops
    layer = report.passes[0].layers[0]
    assert {k: layer.detail[k] for k in detail} == detail
    spatial = nodes[1] if "tucker2" in setting else nodes[0]  # the k×k conv keeps the geometry
    assert list(spatial.attributes.get_ints("strides")) == [2, 2]
    assert list(spatial.attributes.get_ints("pads")) == [1, 1, 1, 1]
    if "separable" in setting:
        assert spatial.attributes.get_int("group") == 4
        assert list(spatial.inputs[1].shape) == [8, 1, 3, 3]
    assert nodes[-1].inputs[2].name == "B"  # bias stays on the last conv
    assert all(n.name.startswith("/conv/Conv.lowrank.") for n in nodes)
    assert model.graph.outputs[0].name == "Y"


def test_params_and_macs_of_a_channel_split():
    proto = conv_model(out=32, channels=16, spatial=(8, 8), pads=[1, 1, 1, 1])
    _, report = compress(proto, ["lowrank:rank=4"], options=NO_VALIDATE)
    layer = report.passes[0].layers[0]
    assert layer.params_before == 32 * 16 * 9 and layer.params_after == 4 * (16 * 9 + 32)
    assert layer.macs_before == 2 * 64 * 32 * 16 * 9
    assert layer.macs_after == 2 * 64 * 4 * (16 * 9 + 32)


@pytest.mark.parametrize(
    ("proto", "reason"),
    [
        (conv_model(channels=4, group=2), "grouped or depthwise conv"),
        (conv_model(channels=4, out=4, group=4), "grouped or depthwise conv"),
    ],
)
def test_grouped_convs_are_skipped_with_reason(proto, reason):
    _, report = compress(proto, ["lowrank:rank=1"], options=NO_VALIDATE)
    assert reason in report.passes[0].layers[0].reason


def conv_transpose_model(bias=True, group=1, **attrs):
    rng = np.random.default_rng(6)
    weight = rng.standard_normal((4, 6 // group, 3, 3)).astype(np.float32)  # [C, O/g, k, k]
    inits = [numpy_helper.from_array(weight, "Wt")]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "Bt"))
    node = helper.make_node(
        "ConvTranspose", ["X", "Wt", "Bt"][: 2 + bias], ["Y"], name="up", group=group, **attrs
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 4, 5, 6])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    "attrs",
    [
        dict(),
        dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]),
        dict(strides=[2, 1], dilations=[1, 2], bias=False),
    ],
)
def test_conv_transpose_at_full_rank_is_exact(attrs):
    proto = conv_transpose_model(**attrs)
    result, report = compress(proto, [f"lowrank:{FULL}"], options=NO_VALIDATE)
    model = ir.from_proto(result)
    assert [n.op_type for n in model.graph] == ["ConvTranspose", "Conv"]
    assert report.passes[0].layers[0].detail["full_rank"] == 6
    feed = _feed(proto)
    np.testing.assert_allclose(run(result, feed)[0], run(proto, feed)[0], atol=1e-5, rtol=1e-5)


def test_conv_transpose_macs_count_input_positions():
    proto = conv_transpose_model(strides=[2, 2])
    _, report = compress(proto, ["lowrank:rank=2,min_saving=-10"], options=NO_VALIDATE)
    layer = report.passes[0].layers[0]
    inputs, outputs = 2 * 5 * 6, 2 * 11 * 13  # positions before and after the upsampling
    assert layer.macs_before == 4 * 6 * 9 * inputs
    assert layer.macs_after == 2 * 4 * 9 * inputs + 2 * 6 * outputs


def test_grouped_conv_transpose_and_dynamic_weights_are_skipped_with_reason():
    graph = helper.make_graph(
        [helper.make_node("Conv", ["X", "Wd"], ["Y"], name="dyn")],
        "g",
        [
            helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 6, 5, 5]),
            helper.make_tensor_value_info("Wd", TensorProto.FLOAT, [6, 6, 3, 3]),
        ],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _, report = compress(proto, ["lowrank:rank=1"], options=NO_VALIDATE)
    assert report.passes[0].layers[0].reason == "weight is a graph input (not a constant)"
    _, report = compress(conv_transpose_model(group=2), ["lowrank:rank=1"], options=NO_VALIDATE)
    assert "group > 1" in report.passes[0].layers[0].reason


def test_im2col_matches_onnxruntime_conv():
    proto = conv_model(strides=[2, 1], pads=[1, 0, 2, 1], dilations=[1, 2], bias=False)
    feed = _feed(proto)
    weight = numpy_helper.to_array(proto.graph.initializer[0])
    node = next(iter(load(proto).graph))
    patches = im2col(feed["X"], ConvGeometry.of(node, weight.shape[2:]))
    expected = np.moveaxis(run(proto, feed)[0], 1, -1).reshape(-1, weight.shape[0])
    np.testing.assert_allclose(patches @ weight.reshape(len(weight), -1).T, expected, atol=1e-5)


def _cnn_feeds(count: int = 4, batch: int = 50):
    (x_train, _), _ = mnist_split()
    return [{"input": x_train[i * batch : (i + 1) * batch]} for i in range(count)]


def test_data_aware_fit_beats_plain_svd_at_equal_rank_on_the_trained_cnn():
    source = str(FIXTURES / "mnist_cnn.onnx")
    setting = "lowrank:rank=4,ops=Conv,min_saving=0"
    feeds = _cnn_feeds(2)
    errors = {}
    for aware in ("false", "true"):
        _, report = compress(
            source, [f"{setting},data_aware={aware}"], calibration=feeds, options=NO_VALIDATE
        )
        errors[aware] = {layer.node: layer.output_error for layer in report.passes[0].rewritten}
    assert errors["true"].keys() == errors["false"].keys() and len(errors["true"]) >= 2
    for name, plain in errors["false"].items():
        assert errors["true"][name] < plain, name


def test_data_aware_at_full_rank_is_still_exact():
    proto = conv_model(strides=[2, 2], pads=[1, 1, 1, 1])
    feeds = [_feed(proto, seed) for seed in range(3)]
    result, report = compress(
        proto, [f"lowrank:{FULL},data_aware=true"], calibration=feeds, options=NO_VALIDATE
    )
    assert report.passes[0].layers[0].output_error < 1e-4
    feed = _feed(proto, 9)
    np.testing.assert_allclose(run(result, feed)[0], run(proto, feed)[0], atol=1e-3, rtol=1e-3)


def test_max_error_picks_the_smallest_rank_within_bound():
    source = str(FIXTURES / "mnist_cnn.onnx")
    feeds = _cnn_feeds(2)
    _, report = compress(
        source,
        ["lowrank:max_error=0.05,ops=Conv,min_saving=-10,data_aware=false"],
        calibration=feeds,
        options=NO_VALIDATE,
    )
    layers = report.passes[0].rewritten
    assert layers and all(layer.output_error <= 0.05 for layer in layers)
    assert any(layer.detail["rank"] < layer.detail["full_rank"] for layer in layers)


def test_max_error_without_data_is_skipped_with_reason():
    _, report = compress(conv_model(), ["lowrank:max_error=0.1"], options=NO_VALIDATE)
    assert report.passes[0].layers[0].reason == "max_error needs calibration data"


def test_separable_runs_on_every_eligible_conv_of_ultraface(real):
    _, report = compress(
        str(real / "ultraface_rfb320.onnx"),
        ["lowrank:scheme=separable,ratio=1,min_saving=-100,ops=Conv"],
        options=Options(samples=1),
    )
    layers = report.passes[0].layers
    eligible = [layer for layer in layers if layer.action == "rewritten"]
    assert len(eligible) == 10  # the stem, seven 3×3 convs of the RFB block, two 3×3 heads
    others = {layer.reason.split(" (")[0] for layer in layers if layer.action == "skipped"}
    assert others == {
        "grouped or depthwise conv",
        "a 1×1 conv has no kernel to separate",
    }
    assert report.validation.outputs[0].rel_l2 < 1e-4  # full multiplier: exact


def test_conv_schemes_leave_gemm_alone_unless_asked():
    source = str(FIXTURES / "mnist_cnn.onnx")
    _, report = compress(source, ["lowrank:scheme=separable,rank=1"], options=NO_VALIDATE)
    assert {layer.op_type for layer in report.passes[0].layers} == {"Conv"}
    _, report = compress(
        source, ["lowrank:scheme=separable,rank=1,ops=Conv,Gemm"], options=NO_VALIDATE
    )
    assert "Gemm" in {layer.op_type for layer in report.passes[0].layers}


def test_min_speedup_keeps_only_rewrites_measured_faster():
    proto = conv_model(out=32, channels=32, spatial=(16, 16), pads=[1, 1, 1, 1])
    result, report = compress(proto, ["lowrank:rank=4,min_speedup=1000"], options=NO_VALIDATE)
    reason = report.passes[0].layers[0].reason
    assert "as fast alone in onnxruntime (min_speedup 1000)" in reason
    assert [n.op_type for n in ir.from_proto(result).graph] == ["Conv"]
    result, report = compress(proto, ["lowrank:rank=4,min_speedup=0.001"], options=NO_VALIDATE)
    assert report.passes[0].layers[0].detail["speedup"] > 0
    assert [n.op_type for n in ir.from_proto(result).graph] == ["Conv", "Conv"]


def test_min_speedup_times_a_repeated_shape_once_and_remembers_it(tmp_path, monkeypatch):
    from onnxcompress import latency

    monkeypatch.setenv("ONNXCOMPRESS_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(latency, "speedup_times", lambda *models: calls.append(1) or (3.0, 1.0))
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((16, 16, 3, 3)).astype(np.float32) for _ in range(2)]
    nodes = [
        helper.make_node("Conv", ["X", "W0"], ["H"], name="/a/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["H", "W1"], ["Y"], name="/b/Conv", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 16, 12, 12])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, f"W{i}") for i, w in enumerate(weights)],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    recipe = ["lowrank:rank=4,min_speedup=1.5,fold=false"]
    _, report = compress(proto, recipe, options=NO_VALIDATE)
    stage = report.passes[0]
    assert [layer.detail["speedup_source"] for layer in stage.layers] == ["measured", "cache"]
    assert [layer.detail["speedup"] for layer in stage.layers] == [3.0, 3.0]
    assert any("1 measured, 1 read from the timing cache" in note for note in stage.notes)
    assert len(calls) == 1
    _, report = compress(proto, recipe, options=NO_VALIDATE)  # a later run: from the file
    assert {layer.detail["speedup_source"] for layer in report.passes[0].layers} == {"cache"}
    assert len(calls) == 1


def test_min_speedup_without_the_input_shape_is_skipped_with_reason():
    from onnxcompress.passes.base import PassContext
    from onnxcompress.passes.lowrank import LowRank

    model = ir.from_proto(conv_model())
    report = LowRank(LowRank.Config(rank=2, min_speedup=1.1)).run(model, PassContext())
    assert report.layers[0].reason.startswith("min_speedup needs the layer's input shape")


def test_a_second_lowrank_pass_fits_layers_the_first_created():
    source = str(FIXTURES / "mnist_cnn.onnx")
    steps = ["lowrank:scheme=separable,rank=1,ops=Conv", "lowrank:rank=2,ops=Conv,min_saving=-10"]
    _, report = compress(source, steps, calibration=_cnn_feeds(2), options=NO_VALIDATE)
    created = [layer for layer in report.passes[1].rewritten if ".lowrank." in layer.node]
    assert created and all(layer.output_error is not None for layer in created)


def test_exclude_matches_the_label_and_output_of_an_unnamed_node():
    proto = conv_model()
    proto.graph.node[0].name = ""
    for pattern in ("Conv(Y)", "Y", "Conv(*"):
        _, report = compress(proto, [f"lowrank:rank=2,exclude={pattern}"], options=NO_VALIDATE)
        assert report.passes[0].layers[0].reason == "excluded by name pattern", pattern
