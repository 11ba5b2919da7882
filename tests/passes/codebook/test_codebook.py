"""codebook: exactness, structure, byte accounting, schemes, data-aware refinement
and bias correction, skips."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxcompress import Recipe, RecipeError, compress
from onnxcompress.emit import PASS_TAG
from tests.conftest import parse, run
from tests.passes.codebook.models import (
    NO_VALIDATE,
    conv_model,
    correlated_inputs,
    decoded_weight,
    few_values,
    matmul_model,
    random_feed,
)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_k_at_least_distinct_values_is_exact(bits, granularity):
    distinct = 1 << bits
    if granularity == "tensor":
        w = np.random.default_rng(bits).choice(np.linspace(-2, 2, distinct), (64, 33))
    else:  # enough rows per channel that per-channel codebooks cost less than the indices
        w = few_values((1100, 3), distinct, seed=bits)
    proto = matmul_model(w)
    setting = f"codebook:bits={bits},granularity={granularity},min_size=1"
    result, report = compress(proto, [setting], options=NO_VALIDATE)
    layer = report.passes[0].layers[0]
    assert layer.action == "rewritten" and layer.weight_error == 0.0
    feed = random_feed(proto)
    np.testing.assert_allclose(run(result, feed)[0], run(proto, feed)[0], atol=1e-5, rtol=1e-5)


def test_structure_names_tags_and_exact_stored_bytes():
    w = np.random.default_rng(0).standard_normal((256, 64))
    result, report = compress(
        matmul_model(w), ["codebook:granularity=channel"], options=NO_VALIDATE
    )
    model = ir.from_proto(result)
    ops = [node.op_type for node in model.graph]
    assert ops[-1] == "MatMul" and "GatherND" in ops and "BitShift" in ops
    assert "W" not in model.graph.initializers
    decoders = [node for node in model.graph if node.op_type != "MatMul"]
    assert all(node.metadata_props[PASS_TAG] == "codebook" for node in decoders)
    assert model.graph.node(-1).inputs[1].name == "W.decoded"
    layer = report.passes[0].layers[0]
    new_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    assert layer.bytes_after == new_bytes
    assert layer.bytes_before == 256 * 64 * 4
    # 4-bit indices plus 64 float32 codebooks of 16
    assert layer.detail["indices_bytes"] == 256 * 64 // 2
    assert layer.detail["codebook_bytes"] == 64 * 16 * 4
    assert layer.detail["granularity"] == "channel"


def test_embedding_table_read_by_gather_is_compressed():
    table = np.random.default_rng(2).standard_normal((500, 24)).astype(np.float32)
    proto = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[3, 7] ids) => (float[3, 7, 24] Y) <float[500, 24] E = {VALUES}> {
            Y = Gather(E, ids)
        }
        """.replace("{VALUES}", "{" + ", ".join(map(str, table.ravel().tolist())) + "}")
    )
    result, report = compress(proto, ["codebook:bits=4,granularity=channel"], options=NO_VALIDATE)
    layer = report.passes[0].layers[0]
    assert layer.action == "rewritten" and layer.op_type == "Gather"
    assert layer.detail["granularity"] == "channel" and layer.detail["codebooks"] == 24
    assert layer.bytes_before / layer.bytes_after > 6
    ids = np.random.default_rng(0).integers(0, 500, (3, 7))
    got, want = run(result, {"ids": ids})[0], run(proto, {"ids": ids})[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.15


def test_sparse_weight_keeps_exact_zeros():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((128, 40)) * (rng.random((128, 40)) > 0.6)
    result, _report = compress(matmul_model(w), ["codebook:bits=3"], options=NO_VALIDATE)
    decoded = decoded_weight(ir.from_proto(result))
    np.testing.assert_array_equal(decoded == 0, w == 0)


def test_results_are_deterministic():
    w = np.random.default_rng(4).standard_normal((96, 48))
    first, _ = compress(matmul_model(w), ["codebook:init=kmeans++"], options=NO_VALIDATE)
    second, _ = compress(matmul_model(w), ["codebook:init=kmeans++"], options=NO_VALIDATE)
    assert first.SerializeToString() == second.SerializeToString()


def test_binary_is_alpha_sign_per_channel_and_25x_smaller():
    w = np.random.default_rng(5).standard_normal((512, 256))
    result, report = compress(matmul_model(w), ["codebook:scheme=binary"], options=NO_VALIDATE)
    decoded = decoded_weight(ir.from_proto(result))
    alpha = np.abs(w).mean(axis=0)  # MatMul: output channels on the last axis
    np.testing.assert_allclose(decoded, np.where(w >= 0, 1, -1) * alpha, rtol=1e-6)
    layer = report.passes[0].layers[0]
    assert layer.bytes_before / layer.bytes_after >= 25


def test_binary_is_lossless_for_a_binary_trained_weight():
    rng = np.random.default_rng(6)
    w = np.sign(rng.standard_normal((64, 32))) * rng.uniform(0.1, 1.0, 32)
    proto = matmul_model(w)
    result, report = compress(proto, ["codebook:scheme=binary"], options=NO_VALIDATE)
    assert report.passes[0].layers[0].weight_error < 1e-7
    feed = random_feed(proto)
    np.testing.assert_allclose(run(result, feed)[0], run(proto, feed)[0], atol=1e-5, rtol=1e-5)


def test_ternary_values_and_threshold():
    w = np.random.default_rng(7).standard_normal((200, 16))
    result, _ = compress(matmul_model(w), ["codebook:scheme=ternary"], options=NO_VALIDATE)
    decoded = decoded_weight(ir.from_proto(result))
    for column, original in zip(decoded.T, w.T):
        delta = 0.7 * np.abs(original).mean()
        np.testing.assert_array_equal(column == 0, np.abs(original) <= delta)
        alpha = np.abs(original[np.abs(original) > delta]).mean()
        np.testing.assert_allclose(np.abs(column[column != 0]), alpha, rtol=1e-6)


def test_conv_per_channel_and_float16_codebook():
    w = np.random.default_rng(8).standard_normal((16, 8, 3, 3))
    proto = conv_model(w)
    result, report = compress(
        proto, ["codebook:codebook_dtype=float16,granularity=channel"], options=NO_VALIDATE
    )
    layer = report.passes[0].layers[0]
    assert layer.detail["codebooks"] == 16 and layer.detail["codebook_bytes"] == 16 * 16 * 2
    assert "Cast" in [n.op_type for n in ir.from_proto(result).graph]
    feed = random_feed(proto)
    got, want = run(result, feed)[0], run(proto, feed)[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.15


def test_product_quantization_exact_with_few_subvectors_and_lossy_otherwise():
    rng = np.random.default_rng(9)
    codewords = rng.standard_normal((4, 4))
    w = codewords[rng.integers(0, 4, (64 // 4) * 24)].reshape(24, 64).T  # [k=64, n=24]
    proto = matmul_model(w)
    result, report = compress(proto, ["codebook:scheme=pq,bits=2"], options=NO_VALIDATE)
    layer = report.passes[0].layers[0]
    assert layer.detail["subspaces"] == 16 and layer.weight_error < 1e-6
    feed = random_feed(proto)
    np.testing.assert_allclose(run(result, feed)[0], run(proto, feed)[0], atol=1e-5, rtol=1e-5)
    noisy = rng.standard_normal((64, 24))
    _, report = compress(matmul_model(noisy), ["codebook:scheme=pq,bits=3"], options=NO_VALIDATE)
    assert 0 < report.passes[0].layers[0].weight_error < 1


def test_data_aware_corrects_the_bias_and_lowers_output_error():
    w = np.random.default_rng(12).standard_normal((128, 16))
    proto = matmul_model(w, rows=300, bias=True)
    x = correlated_inputs(300, 128, 13).astype(np.float32)
    feeds = [{"X": x}]
    plain, _ = compress(proto, ["codebook:bits=2,min_size=1"], options=NO_VALIDATE)
    aware, report = compress(
        proto, ["codebook:bits=2,min_size=1,data_aware=true"], feeds, options=NO_VALIDATE
    )
    layer = report.passes[0].layers[0]
    assert layer.detail["bias_correction"] > 0
    assert layer.detail["output_error"]["after"] < layer.detail["output_error"]["before"]
    want = run(proto, feeds[0])[0]
    plain_error = np.linalg.norm(run(plain, feeds[0])[0] - want)
    aware_error = np.linalg.norm(run(aware, feeds[0])[0] - want)
    assert aware_error < 0.99 * plain_error  # fixed assignments: a modest, real gain
    mean_shift = (run(aware, feeds[0])[0] - want).mean(0)
    assert np.abs(mean_shift).max() < 1e-3 * np.abs(want).max() + 1e-4


@pytest.mark.parametrize("bias", [True, False])
def test_data_aware_corrects_a_conv_bias_and_gives_one_to_a_conv_without(bias):
    w = np.random.default_rng(16).standard_normal((8, 4, 3, 3))
    proto = conv_model(w, bias=bias)
    feeds = [{"X": random_feed(proto, seed)["X"] + 1.0} for seed in range(8)]
    setting = "codebook:bits=2,min_size=1,data_aware=true"
    aware, report = compress(proto, [setting], feeds, options=NO_VALIDATE)
    assert report.passes[0].layers[0].detail["bias_correction"] > 0
    conv = next(node for node in ir.from_proto(aware).graph if node.op_type == "Conv")
    assert conv.inputs[2].name == ("B" if bias else "W.codebook.bias")
    plain, _ = compress(proto, ["codebook:bits=2,min_size=1"], options=NO_VALIDATE)
    want = np.concatenate([run(proto, feed)[0] for feed in feeds])
    shift = {  # the mean output error per channel, over the calibration data
        name: np.abs((np.concatenate([run(m, f)[0] for f in feeds]) - want).mean((0, 2, 3))).max()
        for name, m in (("plain", plain), ("aware", aware))
    }
    assert shift["aware"] < 0.1 * shift["plain"]  # up to the border taps that see less


NEGATIVE = {
    "values < min_size": ("codebook", (8, 8), {}),
    "read by MatMul, not in ops": ("codebook:ops=Conv", (64, 64), {}),
    "excluded by name pattern": ("codebook:exclude=/fc/*", (64, 64), {}),
    "channels do not split into groups of 3": (
        "codebook:granularity=group,group_size=3",
        (64, 64),
        {},
    ),
    "do not split into sub-vectors of 5": ("codebook:scheme=pq,subvector=5", (64, 64), {}),
}


@pytest.mark.parametrize("reason", list(NEGATIVE))
def test_unsupported_weights_are_skipped_with_reason(reason):
    setting, shape, _ = NEGATIVE[reason]
    proto = matmul_model(np.random.default_rng(0).standard_normal(shape))
    result, report = compress(proto, [setting], options=NO_VALIDATE)
    layer = report.passes[0].layers[0]
    assert layer.action == "skipped" and reason in layer.reason, layer.reason
    assert [n.op_type for n in ir.from_proto(result).graph] == ["MatMul"]


def test_weight_that_is_a_graph_output_is_skipped_and_biases_untouched():
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[4, 64] X) => (float[4, 64] Y, float[64, 64] W)
        <float[64, 64] W = {WEIGHTS}, float[64] B = {BIAS}> { H = MatMul(X, W)  Y = Add(H, B) }
    """
    text = text.replace("{WEIGHTS}", "{" + ", ".join(["0.5"] * 64 * 64) + "}")
    text = text.replace("{BIAS}", "{" + ", ".join(["1.0"] * 64) + "}")
    _, report = compress(parse(text), ["codebook:min_size=1"], options=NO_VALIDATE)
    layers = report.passes[0].layers
    assert [(layer.action, layer.reason) for layer in layers] == [
        ("skipped", "weight is also a graph output")
    ]


def test_old_opset_is_upgraded_for_the_decoder():
    w = np.random.default_rng(15).standard_normal((64, 32))
    proto = matmul_model(w, opset=9)
    result, report = compress(proto, ["codebook:bits=8,granularity=tensor"], options=NO_VALIDATE)
    assert any("-> 13" in note for note in report.normalization)
    feed = random_feed(proto)
    got, want = run(result, feed)[0], run(proto, feed)[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.01


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("codebook:bits=9", r"bits=9(\.0)?: must be from 1 to 8"),
        ("codebook:scheme=binary,bits=2", "scheme binary stores 1 bit"),
        ("codebook:scheme=kmeans", "scheme='kmeans': must be one of"),
        ("codebook:granularity=group", "group_size goes with granularity=group"),
        ("codebook:codebook_dtype=int8", "codebook_dtype='int8'"),
    ],
)
def test_bad_options_are_rejected_naming_the_key(option, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_options([option]).build()
