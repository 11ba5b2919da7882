"""lowrank on Gemm/MatMul: exactness at full rank, structure, rank rules, skips, real use."""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import Recipe, RecipeError, compress
from onnxcompress.emit import PASS_TAG
from onnxcompress.pipeline import Options
from tests.conftest import FIXTURES, parse, run

FULL = ["lowrank:ratio=1,min_saving=-1"]  # full rank, allowed to grow: must be exact
NO_VALIDATE = Options(validate=False)


def gemm_model(trans_a=0, trans_b=0, alpha=1.0, beta=1.0, bias=(6,), m=4, k=8, n=6, opset=17):
    rng = np.random.default_rng(1)
    a_shape = [k, m] if trans_a else [m, k]
    w = rng.standard_normal([n, k] if trans_b else [k, n]).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")]
    inputs = ["A", "W"]
    if bias is not None:
        inits.append(numpy_helper.from_array(rng.standard_normal(bias).astype(np.float32), "C"))
        inputs.append("C")
    node = helper.make_node(
        "Gemm",
        inputs,
        ["Y"],
        name="/fc/Gemm",
        alpha=alpha,
        beta=beta,
        transA=trans_a,
        transB=trans_b,
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, a_shape)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def matmul_model(x_shape, k=8, n=6, dtype=np.float32):
    w = np.random.default_rng(2).standard_normal([k, n]).astype(dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"], name="/mm/MatMul")],
        "g",
        [helper.make_tensor_value_info("X", elem, x_shape)],
        [helper.make_tensor_value_info("Y", elem, None)],
        [numpy_helper.from_array(w, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feed_for(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    feeds = {}
    for value in model.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def _ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


GEMM_FORMS = [
    dict(trans_a=ta, trans_b=tb, alpha=alpha, beta=beta, bias=bias)
    for ta, tb, (alpha, beta), bias in itertools.product(
        (0, 1), (0, 1), ((1.0, 1.0), (0.5, 2.0)), (None, (6,), (4, 6), (1, 6))
    )
]


@pytest.mark.parametrize(
    "form", GEMM_FORMS, ids=lambda f: "-".join(f"{k}{v}" for k, v in f.items())
)
def test_full_rank_reproduces_every_gemm_form(form):
    proto = gemm_model(**form)
    result, report = compress(proto, FULL, options=NO_VALIDATE)
    assert _ops(ir.from_proto(result)) == ["Gemm", "Gemm"]
    feed = _feed_for(proto)
    np.testing.assert_allclose(run(result, feed)[0], run(proto, feed)[0], atol=1e-5, rtol=1e-5)
    layer = report.passes[0].layers[0]
    assert layer.action == "rewritten" and layer.weight_error < 1e-6


@pytest.mark.parametrize("x_shape", [[8], [3, 8], [2, 3, 8], [2, 2, 3, 8]])
def test_full_rank_reproduces_matmul_of_any_left_rank(x_shape):
    proto = matmul_model(x_shape)
    result, _ = compress(proto, FULL, options=NO_VALIDATE)
    assert _ops(ir.from_proto(result)) == ["MatMul", "MatMul"]
    feed = _feed_for(proto)
    np.testing.assert_allclose(run(result, feed)[0], run(proto, feed)[0], atol=1e-5, rtol=1e-5)


def test_float16_weights_stay_float16():
    proto = matmul_model([3, 8], dtype=np.float16)
    result, _ = compress(proto, FULL, options=NO_VALIDATE)
    model = ir.from_proto(result)
    assert {v.dtype for v in model.graph.initializers.values()} == {ir.DataType.FLOAT16}
    feed = _feed_for(proto)
    np.testing.assert_allclose(run(result, feed)[0], run(proto, feed)[0], atol=2e-2, rtol=2e-2)


def test_structure_names_tags_and_bias_on_second_factor():
    proto = gemm_model(trans_b=1, k=64, n=48, m=4, bias=(48,))
    result, report = compress(proto, ["lowrank:rank=8"], options=NO_VALIDATE)
    model = ir.from_proto(result)
    first, second = list(model.graph)
    assert (first.name, second.name) == ("/fc/Gemm.lowrank.0", "/fc/Gemm.lowrank.1")
    assert first.metadata_props[PASS_TAG] == second.metadata_props[PASS_TAG] == "lowrank"
    assert [v.name for v in first.inputs] == ["A", "W.lowrank.0"]
    assert second.inputs[2].name == "C" and len(first.inputs) == 2
    # transB=1 layout is kept: factors are stored [r, k] and [n, r]
    assert list(first.inputs[1].shape) == [8, 64] and list(second.inputs[1].shape) == [48, 8]
    assert model.graph.outputs[0].name == "Y"
    layer = report.passes[0].layers[0]
    assert (layer.params_before, layer.params_after) == (64 * 48, 8 * (64 + 48))
    assert (layer.macs_before, layer.macs_after) == (4 * 64 * 48, 4 * 8 * (64 + 48))


def test_weight_error_matches_numpy_truncation():
    proto = matmul_model([5, 40], k=40, n=30)
    w = numpy_helper.to_array(proto.graph.initializer[0]).astype(np.float64)
    s = np.linalg.svd(w, compute_uv=False)
    _, report = compress(proto, ["lowrank:rank=5"], options=NO_VALIDATE)
    expected = np.sqrt((s[5:] ** 2).sum() / (s**2).sum())
    assert report.passes[0].layers[0].weight_error == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    ("option", "rank"),
    [("rank=7", 7), ("ratio=0.25", 10), ("rank=7,round_to=8", 8), ("rank=1000", 40)],
)
def test_rank_rules(option, rank):
    proto = matmul_model([5, 40], k=40, n=60)
    _, report = compress(proto, [f"lowrank:{option},min_saving=-1"], options=NO_VALIDATE)
    assert report.passes[0].layers[0].detail["rank"] == rank


def test_energy_rank_is_smallest_holding_the_share():
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((50, 50)))
    v, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    s = np.array([10.0, 5.0, 2.0, 1.0] + [0.01] * 36)
    w = (u[:, :40] * s) @ v.T
    proto = matmul_model([3, 50], k=50, n=40)
    proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(w.astype(np.float32), "W"))
    share = (100 + 25) / (100 + 25 + 4 + 1 + 36e-4)
    _, report = compress(proto, [f"lowrank:energy={share - 1e-4}"], options=NO_VALIDATE)
    assert report.passes[0].layers[0].detail["rank"] == 2


def test_min_saving_skips_with_reason():
    proto = matmul_model([3, 8], k=8, n=6)
    result, report = compress(proto, ["lowrank:rank=4"], options=NO_VALIDATE)
    layer = report.passes[0].layers[0]
    assert layer.action == "skipped" and "saves" in layer.reason and "min_saving" in layer.reason
    assert _ops(ir.from_proto(result)) == ["MatMul"]


NEGATIVE = {
    "weight is a graph input": """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[4, 64] X, float[64, 64] W) => (float[4, 64] Y) { Y = MatMul(X, W) }
    """,
    "weight is shared by 2 uses": """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[4, 64] X) => (float[4, 64] Y)
        <float[64, 64] W = {WEIGHTS}> { H = MatMul(X, W)  Y = MatMul(H, W) }
    """,
    "weight is 3-D": """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4, 64] X) => (float[2, 4, 64] Y)
        <float[2, 64, 64] W = {WEIGHTS3}> { Y = MatMul(X, W) }
    """,
    "weight dtype INT32 is not float": """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int32[4, 64] X) => (int32[4, 64] Y)
        <int32[64, 64] W = {WEIGHTS}> { Y = MatMul(X, W) }
    """,
}


@pytest.mark.parametrize("reason", list(NEGATIVE))
def test_unsupported_weights_are_skipped_with_reason(reason):
    text = NEGATIVE[reason]
    text = text.replace("{WEIGHTS3}", "{" + ", ".join(["1"] * 2 * 64 * 64) + "}")
    text = text.replace("{WEIGHTS}", "{" + ", ".join(["1"] * 64 * 64) + "}")
    _, report = compress(parse(text), ["lowrank:rank=2"], options=NO_VALIDATE)
    reasons = [layer.reason for layer in report.passes[0].layers]
    assert any(reason in (r or "") for r in reasons), reasons
    assert not report.passes[0].rewritten


def test_exclude_pattern_skips_matching_nodes():
    proto = gemm_model(k=64, n=64, bias=(64,), m=4)
    _, report = compress(proto, ["lowrank:rank=4,exclude=/fc/*"], options=NO_VALIDATE)
    assert report.passes[0].layers[0].reason == "excluded by name pattern"


def test_old_opset_gemm_is_upgraded_and_exact():
    proto = gemm_model(opset=9, bias=(6,))
    result, report = compress(proto, FULL, options=NO_VALIDATE)
    assert any("upgraded opset 9 -> 11" in note for note in report.normalization)
    feed = _feed_for(proto)
    np.testing.assert_allclose(run(result, feed)[0], run(proto, feed)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("lowrank:energy=1.5", "energy=1.5: must be in (0, 1]"),
        ("lowrank:rank=4,energy=0.5", "give only one of rank, ratio, energy"),
        ("lowrank:bogus=1", "unknown option 'bogus'"),
        ("lowrank:rank=abc", "expected an integer"),
        ("nosuchpass", "unknown pass 'nosuchpass'"),
    ],
)
def test_bad_options_are_rejected_naming_the_key(option, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Recipe.from_options([option]).build()


def test_data_aware_fit_lowers_output_error_on_the_trained_mlp():
    from fixtures.mnist import mnist_split

    (x_train, _), _ = mnist_split()
    # 2,000 rows: a refit needs at least 2 a feature (fc1 reads 784)
    feeds = [{"input": x_train[i : i + 200].reshape(200, -1)} for i in range(0, 2000, 200)]
    errors = {}
    for aware in ("false", "true"):
        _, report = compress(
            str(FIXTURES / "mnist_mlp.onnx"),
            [f"lowrank:rank=16,data_aware={aware}"],
            calibration=feeds,
            options=NO_VALIDATE,
        )
        errors[aware] = {layer.node: layer.output_error for layer in report.passes[0].rewritten}
    assert set(errors["true"]) == {"/fc1/Gemm", "/fc2/MatMul"}
    for node, plain in errors["false"].items():
        assert errors["true"][node] < 0.8 * plain, (node, plain, errors["true"][node])


def test_calibration_fit_needs_a_per_output_gemm_bias():
    proto = gemm_model(k=64, n=64, m=4, bias=(4, 64))
    feeds = [{"A": np.ones((4, 64), np.float32)}]
    _, report = compress(proto, ["lowrank:rank=2"], calibration=feeds, options=NO_VALIDATE)
    assert "per-output bias" in report.passes[0].layers[0].reason


def _mnist_feeds(rows: int, batch: int) -> list[dict[str, np.ndarray]]:
    from fixtures.mnist import mnist_split

    (x_train, _), _ = mnist_split()
    flat = x_train[:rows].reshape(rows, -1)
    return [{"input": flat[i : i + batch]} for i in range(0, rows, batch)]


def test_too_few_rows_for_the_features_means_no_refit():
    """16 rows of 784 pixels: a least-squares refit would reproduce those rows only."""
    setting = "lowrank:rank=16"
    _, report = compress(
        str(FIXTURES / "mnist_mlp.onnx"), [setting], calibration=_mnist_feeds(16, 8)
    )
    fc1 = next(layer for layer in report.passes[0].rewritten if layer.node == "/fc1/Gemm")
    assert fc1.detail["data_fit"] == "not refitted: 16 calibration rows for 784 input features"
    _, enough = compress(
        str(FIXTURES / "mnist_mlp.onnx"), [setting], calibration=_mnist_feeds(2000, 200)
    )
    assert all("data_fit" not in layer.detail for layer in enough.passes[0].rewritten)


def test_a_wave_captures_several_layers_in_one_sweep_with_the_same_sums(monkeypatch):
    """Nothing rewritten between them, the layers of one wave get exactly the sums that a
    capture per layer gives, from one student sweep instead of one per layer; with teacher
    inputs (the same values while nothing is rewritten) from one teacher sweep alone."""
    from onnxcompress.passes.lowrank import targets as targets_module
    from onnxcompress.passes.lowrank.layer import view
    from onnxcompress.pipeline import resolve_shapes
    from onnxcompress.validate import Runner

    model = ir.load(str(FIXTURES / "mnist_mlp.onnx"))
    layers = [node for node in model.graph if node.op_type in ("Gemm", "MatMul")]
    feeds = _mnist_feeds(400, 200)
    shapes = resolve_shapes(model, {"input": [200, 784]})
    sums, sweeps = {}, {}
    for wave, inputs in ((1, "student"), (8, "student"), (1, "teacher")):
        monkeypatch.setattr(targets_module, "WAVE_LAYERS", wave)
        with Runner(ir.load(str(FIXTURES / "mnist_mlp.onnx")), "teacher") as teacher:
            outputs = [node.outputs[0].name for node in layers]
            targets = targets_module.LayerTargets(
                model, teacher, feeds, outputs, 64, 0, True, layers, shapes, inputs
            )
            sums[wave, inputs] = [targets.moments(view(node)) for node in layers]
            sweeps[wave, inputs] = targets.sweeps
            targets.close()
    assert len(layers) >= 2
    # waves of 1, 2, 4... layers: nothing is rewritten, so each wave doubles the last
    doubling = 2 * math.ceil(math.log2(len(layers) + 1))
    assert sweeps == {(1, "student"): doubling, (8, "student"): 2, (1, "teacher"): 1}
    for one, many, teacher in zip(*sums.values()):
        assert one.count == many.count == teacher.count
        np.testing.assert_allclose(one.xx, many.xx, rtol=1e-6)
        np.testing.assert_allclose(one.xy, many.xy, rtol=1e-6)
        # another session: float32 kernels may round differently, by far less than a sample
        for ours, theirs in ((one.xx, teacher.xx), (one.xy, teacher.xy)):
            np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6 * abs(ours).max())


@pytest.mark.parametrize("setting", ["lowrank:max_error=0.05", "lowrank:rank=16,ops=Gemm"])
def test_waves_choose_what_a_capture_per_layer_chooses(monkeypatch, setting):
    """After a rewrite the sums captured ahead are dropped, so a layer never sees an input
    from before an earlier layer changed."""
    from onnxcompress.passes.lowrank import targets as targets_module

    chosen = {}
    for wave in (1, 8):
        monkeypatch.setattr(targets_module, "WAVE_LAYERS", wave)
        _, report = compress(
            str(FIXTURES / "mnist_mlp.onnx"),
            [setting],
            calibration=_mnist_feeds(2000, 200),
            options=NO_VALIDATE,
        )
        chosen[wave] = [
            (layer.node, layer.action, layer.detail.get("rank"), round(layer.output_error or 0, 6))
            for layer in report.passes[0].layers
        ]
    assert chosen[1] == chosen[8]
