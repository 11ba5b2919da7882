"""prune: exactness at ratio 0, every coupling case through the pipeline, importance and
amount rules, repair, accounting against an independent count, random stacks, and the trained
CNN fixture."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from onnxcompress import Recipe, RecipeError, compress
from onnxcompress.pipeline import Options
from tests.conftest import FIXTURES, run
from tests.passes.prune.channel_models import (
    COUPLING_CASES,
    StackBuilder,
    build,
    feed_for,
    masked_oracle,
    random_pruning,
    walk,
)
from tests.passes.prune.measures import calibration_feeds, initializers, output_error

NO_VALIDATE = Options(validate=False)


@pytest.mark.parametrize("case", list(COUPLING_CASES))
def test_ratio_zero_reproduces_the_original(case):
    proto = build(COUPLING_CASES[case])
    feeds = calibration_feeds(proto, 2)
    result, report = compress(proto, ["prune:ratio=0"], calibration=feeds, options=NO_VALIDATE)
    for feed in feeds:
        for want, got in zip(run(proto, feed), run(result, feed)):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert report.after.params == report.before.params


@pytest.mark.parametrize("case", list(COUPLING_CASES))
def test_every_coupling_case_prunes_through_the_pipeline(case):
    """The pipeline checks the result (checker, strict shape inference, onnxruntime)."""
    proto = build(COUPLING_CASES[case])
    feeds = calibration_feeds(proto, 2)
    result, report = compress(
        proto, ["prune:ratio=0.5,repair=none"], calibration=feeds, options=NO_VALIDATE
    )
    assert report.after.params < report.before.params
    for feed in feeds:
        for want, got in zip(run(proto, feed), run(result, feed)):
            assert got.shape == want.shape and np.isfinite(got).all()
    assert all(layer.params_after <= layer.params_before for layer in report.passes[0].layers)


def _kept_filters(result, name: str) -> int:
    init = next(i for i in result.graph.initializer if i.name == name)
    return numpy_helper.to_array(init).shape[0]


def _conv_bn_with_known_scores() -> onnx.ModelProto:
    """Filter norms grow with the index; |gamma| shrinks with it."""
    proto = build(COUPLING_CASES["conv_bn"])
    weights = {i.name: numpy_helper.to_array(i).copy() for i in proto.graph.initializer}
    weights["W1"] = (
        np.ones_like(weights["W1"]) * (1 + np.arange(8, dtype=np.float32))[:, None, None, None]
    )
    weights["P1"] = (8 - np.arange(8)).astype(np.float32)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items())
    return proto


@pytest.mark.parametrize(
    ("importance", "kept"),
    [("l1", [4, 5, 6, 7]), ("l2", [4, 5, 6, 7]), ("bn", [0, 1, 2, 3])],
)
def test_importance_picks_the_filters_to_keep(importance, kept):
    proto = _conv_bn_with_known_scores()
    setting = f"prune:ratio=0.5,importance={importance},repair=none"
    result, _ = compress(proto, [setting], options=NO_VALIDATE)
    weight = numpy_helper.to_array(next(i for i in result.graph.initializer if i.name == "W1"))
    np.testing.assert_array_equal(weight[:, 0, 0, 0], np.array(kept) + 1.0)


def test_activation_importance_uses_calibration_data():
    proto = _conv_bn_with_known_scores()
    feeds = calibration_feeds(proto)
    setting = "prune:ratio=0.5,importance=activation,repair=none"
    result, _ = compress(proto, [setting], calibration=feeds, options=NO_VALIDATE)
    assert _kept_filters(result, "W1") == 4


@pytest.mark.parametrize(
    ("options", "kept"),
    [
        ("ratio=0.3", 6),  # 8 - floor(2.4)
        ("ratio=0.3,round_to=4", 8),
        ("ratio=0.7,round_to=4", 4),
        ("ratio=0.8,min_channels=3", 3),
        ("ratio=0.8,max_ratio=0.5", 4),
        ("ratio=0.5,exclude=conv*", 8),
        ("ratio=0.5,layer_ratios=first=0.25", 6),
    ],
)
def test_amount_rules(options, kept):
    proto = build(COUPLING_CASES["conv_bn"])
    proto.graph.node[0].name = "first"
    proto.graph.node[-1].name = "last"
    if "exclude" in options:
        proto.graph.node[0].name = "conv_first"
    result, report = compress(proto, [f"prune:{options},repair=none"], options=NO_VALIDATE)
    assert _kept_filters(result, "W1") == kept
    if "exclude" in options:
        skipped = [layer for layer in report.passes[0].layers if layer.action == "skipped"]
        assert skipped[0].reason == "excluded by name pattern"


def test_target_macs_reaches_the_share():
    proto = onnx.load(FIXTURES / "mnist_cnn.onnx")
    feeds = [{"input": np.random.default_rng(0).random((2, 1, 28, 28), np.float32)}]
    _, report = compress(
        proto, ["prune:target_macs=0.6,repair=none"], calibration=feeds, options=NO_VALIDATE
    )
    share = report.after.macs / report.before.macs
    assert 0.5 < share <= 0.6


@pytest.mark.parametrize(
    "option",
    ["ratio=1", "importance=l3", "aggregate=median", "mode=channels", "layer_ratios=x=2"],
)
def test_bad_config_is_rejected_naming_the_key(option):
    with pytest.raises(RecipeError, match=option.split("=")[0]):
        Recipe.from_options([f"prune:{option}"]).build()


def test_report_lists_rewritten_and_skipped_layers():
    proto = build(COUPLING_CASES["concat"])
    proto.graph.node[-1].name = "last"
    _, report = compress(proto, ["prune:ratio=0.5,repair=none"], options=NO_VALIDATE)
    layers = {layer.node: layer for layer in report.passes[0].layers}
    rewritten = [layer for layer in layers.values() if layer.action == "rewritten"]
    assert {layer.detail.get("out_channels", [0, 0])[0] for layer in rewritten} >= {8, 6}
    consumer = next(layer for layer in rewritten if "in_channels" in layer.detail)
    assert consumer.detail["in_channels"] == [17, 3 + 4 + 3]
    last = layers["last"]  # its inputs shrink, its filters reach the graph output
    assert last.action == "rewritten" and "graph output" in last.detail["filters"]


# --- accounting -------------------------------------------------------------------------------
def _independent_counts(proto: onnx.ModelProto, input_shape: list[int]) -> tuple[int, int]:
    """Params from the initializers, MACs from onnx shape inference and textbook formulas."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    for dim, size in zip(dims, input_shape):
        dim.dim_value = size
    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    }
    shapes.update({i.name: list(i.dims) for i in proto.graph.initializer})
    params = sum(math.prod(i.dims) for i in proto.graph.initializer)
    macs = 0
    for node in proto.graph.node:
        if node.op_type == "Conv":
            out, weight = shapes[node.output[0]], shapes[node.input[1]]
            macs += math.prod(out) * math.prod(weight[1:])  # each output: C_in/group·k·k
        elif node.op_type == "Gemm":
            out, a = shapes[node.output[0]], shapes[node.input[0]]
            macs += math.prod(out) * a[1]
    return params, macs


def test_macs_and_params_match_an_independent_count():
    proto = onnx.load(FIXTURES / "mnist_cnn.onnx")
    feeds = [{"input": np.random.default_rng(0).random((4, 1, 28, 28), np.float32)}]
    result, report = compress(proto, ["prune:ratio=0.4"], calibration=feeds, options=NO_VALIDATE)
    assert (report.before.params, report.before.macs) == _independent_counts(proto, [4, 1, 28, 28])
    assert (report.after.params, report.after.macs) == _independent_counts(result, [4, 1, 28, 28])
    assert report.after.macs < 0.6 * report.before.macs
    totals = report.passes[0].totals()
    assert totals["macs_before"] - totals["macs_after"] == report.before.macs - report.after.macs


# --- repair -----------------------------------------------------------------------------------
LINEAR_PAIR = """
g (float[1, 3, 8, 8] X, float[8, 3, 3, 3] W1, float[8] B1, float[5, 8, 3, 3] W2, float[5] B2)
  => (float[1, 5, 8, 8] Y) {
    c = Conv <pads = [1, 1, 1, 1]> (X, W1, B1)
    Y = Conv <pads = [1, 1, 1, 1]> (c, W2, B2)
}"""


def test_least_squares_repair_recovers_redundant_filters_exactly():
    """Filters 4..7 are small mixes of 0..3: removing them loses nothing a refit cannot undo."""
    proto = build(LINEAR_PAIR, seed=3)
    weights = initializers(proto)
    mix = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32) * 0.1
    weights["W1"][4:] = np.einsum("rk,kchw->rchw", mix, weights["W1"][:4])
    weights["B1"][4:] = mix @ weights["B1"][:4]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items())
    calibration, held_out = calibration_feeds(proto, 8), calibration_feeds(proto, 10)[8:]
    errors = {}
    for repair in ("none", "lstsq", "bias"):
        result, _ = compress(
            proto, [f"prune:ratio=0.5,repair={repair},damping=0"], calibration=calibration,
            options=NO_VALIDATE,
        )  # fmt: skip
        assert _kept_filters(result, "W1") == 4
        errors[repair] = output_error(proto, result, held_out)
    assert errors["none"] > 0.05 and errors["lstsq"] < 1e-4
    assert errors["bias"] < errors["none"]


def test_bias_fold_is_exact_for_a_constant_channel_under_a_1x1_consumer():
    text = """
    g (float[2, 3, 6, 6] X, float[4, 3, 3, 3] W1, float[4] B1, float[5, 4, 1, 1] W2, float[5] B2)
      => (float[2, 5, 6, 6] Y) {
        c = Conv <pads = [1, 1, 1, 1]> (X, W1, B1)
        Y = Conv (c, W2, B2)
    }"""
    proto = build(text)
    w1 = numpy_helper.to_array(proto.graph.initializer[0]).copy()
    w1[2] = 0  # channel 2 is its bias, a constant: the smallest L1 norm
    proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(w1, "W1"))
    feeds = calibration_feeds(proto, 2)
    setting = "prune:ratio=0.25,repair=bias"
    result, _ = compress(proto, [setting], calibration=feeds, options=NO_VALIDATE)
    assert _kept_filters(result, "W1") == 3
    for feed in feeds:
        np.testing.assert_allclose(run(result, feed)[0], run(proto, feed)[0], atol=1e-5)


# --- random stacks ----------------------------------------------------------------------------
STEP = st.tuples(
    st.sampled_from(["conv", "residual", "concat", "depthwise", "grouped", "pool"]),
    st.integers(2, 8),
    st.sampled_from(["Relu", "Sigmoid", "none", "swish"]),
    st.booleans(),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(STEP, min_size=1, max_size=5),
    ratio=st.floats(0.0, 0.9),
    seed=st.integers(0, 1000),
    trans_b=st.booleans(),
)
def test_random_stacks_stay_valid_with_unchanged_output_shape(steps, ratio, seed, trans_b):
    builder = StackBuilder(seed)
    for step in steps:
        builder.step(*step)
    proto = builder.finish(5, trans_b)
    feed = feed_for(proto, seed)
    setting = f"prune:ratio={ratio},repair=none,max_ratio=0.95"
    result, _ = compress(proto, [setting], calibration=[feed], options=NO_VALIDATE)
    assert run(result, feed)[0].shape == (2, 5)
    # and the same walk, pruned at random, equals the masked original
    model, cg = walk(proto)
    pruned = random_pruning(cg, np.random.default_rng(seed), share=ratio)
    oracle = masked_oracle(model, cg, pruned)
    from tests.passes.prune.channel_models import prune_in_place

    pruned_proto = prune_in_place(model, cg, pruned)
    expected = run(oracle, feed)[0]
    np.testing.assert_allclose(run(pruned_proto, feed)[0], expected, rtol=1e-4, atol=1e-4)


# --- the trained CNN fixture ------------------------------------------------------------------
@pytest.fixture(scope="module")
def mnist():
    from fixtures.mnist import mnist_split

    (train_x, _), (held_x, held_y) = mnist_split()
    calibration = [{"input": train_x[i : i + 64]} for i in range(0, 512, 64)]
    held_out = [{"input": held_x[i : i + 500]} for i in range(0, 2000, 500)]
    return calibration, held_out, held_y


def _accuracy(model, feeds, labels) -> float:
    predictions = np.concatenate([run(model, feed)[0].argmax(1) for feed in feeds])
    return float((predictions == labels).mean())


def test_trained_cnn_30_percent_with_repair(mnist):
    calibration, held_out, labels = mnist
    source = FIXTURES / "mnist_cnn.onnx"
    original = onnx.load(source)
    results = {}
    for repair in ("none", "lstsq"):
        model, report = compress(
            str(source), [f"prune:ratio=0.3,repair={repair}"], calibration=calibration,
            options=Options(latency_runs=2),
        )  # fmt: skip
        results[repair] = (ir.to_proto(model), report)
    error_none = output_error(original, results["none"][0], held_out)
    error_fit = output_error(original, results["lstsq"][0], held_out)
    assert error_fit * 2 <= error_none
    assert (
        _accuracy(results["lstsq"][0], held_out, labels)
        > _accuracy(original, held_out, labels) - 0.03
    )
    report = results["lstsq"][1]
    assert report.validation is not None and report.after.macs < 0.6 * report.before.macs
    kinds = {layer.op_type for layer in report.passes[0].rewritten}
    assert {"Conv", "Gemm", "BatchNormalization"} <= kinds


# --- real models ------------------------------------------------------------------------------
def test_ultraface_30_percent_validates_and_repair_halves_the_error(real):
    """On held-out photos: the refit halves the error of norm-chosen filters, and filters
    chosen by reconstruction (the default with data) do better still."""
    from fixtures.photos import ultraface_feeds

    feeds = ultraface_feeds(real)
    calibration, held_out = feeds[:4], feeds[6:]
    source = str(real / "ultraface_rfb320.onnx")
    errors = {}
    for order, repair in (("l1", "none"), ("l1", "lstsq"), ("auto", "lstsq")):
        model, report = compress(
            source, [f"prune:ratio=0.3,importance={order},repair={repair},max_rows=1024"],
            calibration=calibration, options=Options(latency_runs=2),
        )  # fmt: skip
        assert report.validation is not None
        errors[order, repair] = output_error(onnx.load(source), ir.to_proto(model), held_out)
    assert errors["l1", "lstsq"] * 2 <= errors["l1", "none"], errors
    assert errors["auto", "lstsq"] < errors["l1", "lstsq"], errors
    assert report.after.macs < 0.7 * report.before.macs
    heads = [layer for layer in report.passes[0].layers if "filters" in layer.detail]
    assert len(heads) == 8  # score and box heads feed graph outputs: their filters stay


def test_ppocrv4_det_prunes_and_validates(real):
    from fixtures.photos import ppocr_det_feeds

    pages = ppocr_det_feeds(3)
    _, report = compress(
        str(real / "ppocrv4_det.onnx"), ["prune:ratio=0.3,max_rows=512"], calibration=pages,
        options=Options(latency_runs=2),
    )  # fmt: skip
    assert report.validation is not None and report.validation.outputs[0].cosine > 0.8
    ops = {layer.op_type for layer in report.passes[0].rewritten}
    assert {"Conv", "ConvTranspose"} <= ops
    assert report.after.params < 0.6 * report.before.params
    assert "lifted" in " ".join(report.normalization)  # the weights were Constant nodes


def test_grouped_conv_loses_as_many_channels_in_every_group():
    proto = build(COUPLING_CASES["grouped"])
    result, _ = compress(proto, ["prune:ratio=0.5,repair=none"], options=NO_VALIDATE)
    weights = initializers(result)
    assert weights["W1"].shape[0] == 4 and weights["W2"].shape == (6, 2, 3, 3)
    assert weights["B2"].shape == (6,) and weights["W3"].shape == (5, 6, 1, 1)
    groups = [a.i for n in result.graph.node for a in n.attribute if a.name == "group"]
    assert groups == [2]


def test_without_data_auto_repair_folds_bn_expectations_into_the_bias():
    """BN running statistics that match the data make the data-free fold an improvement."""
    from onnxcompress.validate import Runner

    proto = build(COUPLING_CASES["conv_bn"], seed=4)
    feeds = [feed_for(proto, seed=100 + i) for i in range(32)]
    runner = Runner(ir.from_proto(proto), extra_outputs=["c1"])
    conv_out = np.concatenate([runner.capture(feed)["c1"] for feed in feeds])
    weights = initializers(proto)
    weights["P3"], weights["V1"] = conv_out.mean((0, 2, 3)), conv_out.var((0, 2, 3))
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items())
    errors = {}
    for repair in ("none", "auto"):
        result, report = compress(proto, [f"prune:ratio=0.5,repair={repair}"], options=NO_VALIDATE)
        errors[repair] = output_error(proto, result, feeds[:8])
    assert any("bias fold of expected values" in note for note in report.passes[0].notes)
    assert errors["auto"] < 0.8 * errors["none"]


def test_synthetic_calibration_is_flagged_and_auto_repair_stays_data_free():
    proto = build(COUPLING_CASES["conv_bn"])
    _, report = compress(proto, ["prune:ratio=0.5"], options=Options(latency_runs=1))
    assert any("bias fold of expected values" in n for n in report.passes[0].notes)
    feeds = calibration_feeds(proto, 4)
    _, report = compress(proto, ["prune:ratio=0.5"], calibration=feeds, options=NO_VALIDATE)
    assert not any("bias fold" in n for n in report.passes[0].notes)
    refitted = [layer for layer in report.passes[0].layers if "repair" in layer.detail]
    assert refitted and isinstance(refitted[0].detail["repair"], dict)
