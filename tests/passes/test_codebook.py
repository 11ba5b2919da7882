"""codebook: exactness, packing round trips, structure, byte accounting, schemes, data-aware
refinement, skips, and the real models."""

from __future__ import annotations

import gzip

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from fixtures.mnist import mnist_split
from onnxcompress import Recipe, RecipeError, compress
from onnxcompress.emit import PASS_TAG
from onnxcompress.passes.codebook_fit import (
    Fit,
    fit_product,
    fit_scalar,
    kmeans_1d,
    refine_product,
    refine_scalar,
)
from onnxcompress.passes.codebook_pack import layout_for, pack, unpack
from onnxcompress.pipeline import Options
from tests.conftest import FIXTURES, parse, run

NO_VALIDATE = Options(validate=False)


def matmul_model(w: np.ndarray, opset: int = 17, rows: int = 5, bias: bool = False):
    """Y = X·W (+ b), W [k, n]."""
    k, n = w.shape
    nodes = [helper.make_node("MatMul", ["X", "W"], ["H" if bias else "Y"], name="/fc/MatMul")]
    inits = [numpy_helper.from_array(w.astype(np.float32), "W")]
    if bias:
        nodes.append(helper.make_node("Add", ["H", "B"], ["Y"], name="/fc/Add"))
        inits.append(numpy_helper.from_array(np.linspace(-1, 1, n).astype(np.float32), "B"))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [rows, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [rows, n])],
        inits,
    )
    ir_version = 10 if opset >= 21 else 8
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version
    )


def conv_model(w: np.ndarray, group: int = 1, opset: int = 17):
    co, cig, _kh, _kw = w.shape
    graph = helper.make_graph(
        [helper.make_node("Conv", ["X", "W", "B"], ["Y"], name="/conv/Conv", group=group)],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, cig * group, 8, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(w.astype(np.float32), "W"),
            numpy_helper.from_array(np.zeros(co, np.float32), "B"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _feed(model: onnx.ModelProto, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    value = model.graph.input[0]
    shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
    return {value.name: rng.standard_normal(shape).astype(np.float32)}


def _few_values(shape, distinct: int, seed: int = 0) -> np.ndarray:
    """A weight with at most ``distinct`` values in each output channel (last axis)."""
    rng = np.random.default_rng(seed)
    palette = rng.standard_normal((distinct, shape[-1]))
    picks = rng.integers(0, distinct, shape)
    return np.take_along_axis(palette, picks.reshape(-1, shape[-1]) % distinct, 0).reshape(shape)


def _decoded_weight(model: ir.Model, name_prefix: str = "W") -> np.ndarray:
    """Evaluate the decoder output by exposing it as a graph output."""
    proto = ir.to_proto(model)
    decoded = next(o for n in proto.graph.node for o in n.output if ".decoded" in o)
    proto.graph.output.append(onnx.ValueInfoProto(name=decoded))
    feed = {proto.graph.input[0].name: _feed(proto)[proto.graph.input[0].name]}
    return run(proto, feed)[-1]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_k_at_least_distinct_values_is_exact(bits, granularity):
    distinct = 1 << bits
    if granularity == "tensor":
        w = np.random.default_rng(bits).choice(np.linspace(-2, 2, distinct), (64, 33))
    else:  # enough rows per channel that per-channel codebooks cost less than the indices
        w = _few_values((1100, 3), distinct, seed=bits)
    proto = matmul_model(w)
    setting = f"codebook:bits={bits},granularity={granularity},min_size=1"
    result, report = compress(proto, [setting], options=NO_VALIDATE)
    layer = report.passes[0].layers[0]
    assert layer.action == "rewritten" and layer.weight_error == 0.0
    feed = _feed(proto)
    np.testing.assert_allclose(run(result, feed)[0], run(proto, feed)[0], atol=1e-5, rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(1, 8),
    groups=st.integers(1, 4),
    count=st.integers(1, 70),
    opset=st.sampled_from([13, 21]),
    seed=st.integers(0, 2**16),
)
def test_packing_round_trips_for_every_bits(bits, groups, count, opset, seed):
    indices = np.random.default_rng(seed).integers(0, 1 << bits, (groups, count)).astype(np.uint8)
    layout = layout_for(bits, opset)
    stored = pack(indices, bits, layout)
    np.testing.assert_array_equal(unpack(stored, bits, layout, count), indices)
    # exactly `bits` per index; each row (each plane's row) padded to whole bytes only
    if layout == "fields":
        assert stored.nbytes == groups * -(-count // (8 // bits))
    elif layout == "planes":
        assert stored.nbytes == bits * groups * -(-count // 8)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8])
def test_decoder_graph_unpacks_like_numpy_for_every_bits(bits):
    """The graph decoder (onnxruntime) gives the same weight as the numpy decode."""
    w = np.random.default_rng(bits).standard_normal((37, 21))  # odd sizes: padding
    proto = matmul_model(w)
    result, report = compress(
        proto, [f"codebook:bits={bits},min_size=1,granularity=tensor"], options=NO_VALIDATE
    )
    model = ir.from_proto(result)
    decoded = _decoded_weight(model)
    error = np.linalg.norm(decoded - w) / np.linalg.norm(w)
    assert error == pytest.approx(report.passes[0].layers[0].weight_error, rel=1e-4, abs=1e-6)
    assert len(np.unique(decoded)) <= 1 << bits


def test_structure_names_tags_and_exact_stored_bytes():
    w = np.random.default_rng(0).standard_normal((256, 64))
    result, report = compress(matmul_model(w), ["codebook"], options=NO_VALIDATE)
    model = ir.from_proto(result)
    ops = [node.op_type for node in model.graph]
    assert ops[-1] == "MatMul" and "GatherND" in ops and "BitShift" in ops
    assert "W" not in model.graph.initializers
    decoders = [node for node in model.graph if node.op_type != "MatMul"]
    assert all(node.metadata_props[PASS_TAG] == "codebook" for node in decoders)
    assert all(node.name.startswith("W.codebook.") for node in decoders)
    layer = report.passes[0].layers[0]
    new_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    assert layer.bytes_after == new_bytes
    assert layer.bytes_before == 256 * 64 * 4
    # 4-bit indices plus 64 float32 codebooks of 16
    assert layer.detail["indices_bytes"] == 256 * 64 // 2
    assert layer.detail["codebook_bytes"] == 64 * 16 * 4
    assert layer.detail["granularity"] == "channel"


def test_native_uint4_storage_at_opset_21():
    w = np.random.default_rng(1).standard_normal((128, 32))
    proto = matmul_model(w, opset=21)
    result, report = compress(proto, ["codebook:bits=4"], options=NO_VALIDATE)
    layer = report.passes[0].layers[0]
    assert layer.detail["layout"] == "uint4"
    model = ir.from_proto(result)
    stored = next(v for v in model.graph.initializers.values() if v.name.endswith("indices"))
    assert stored.const_value.dtype == ir.DataType.UINT4
    proto_indices = [t for t in ir.to_proto(model).graph.initializer if t.name == stored.name]
    assert len(proto_indices[0].raw_data) == 128 * 32 // 2  # two indices a byte on disk
    decoded = _decoded_weight(model)
    error = np.linalg.norm(decoded - w) / np.linalg.norm(w)
    assert error == pytest.approx(layer.weight_error, rel=1e-4)


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
    result, report = compress(proto, ["codebook:bits=4"], options=NO_VALIDATE)
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
    decoded = _decoded_weight(ir.from_proto(result))
    np.testing.assert_array_equal(decoded == 0, w == 0)


def test_results_are_deterministic():
    w = np.random.default_rng(4).standard_normal((96, 48))
    first, _ = compress(matmul_model(w), ["codebook:init=kmeans++"], options=NO_VALIDATE)
    second, _ = compress(matmul_model(w), ["codebook:init=kmeans++"], options=NO_VALIDATE)
    assert first.SerializeToString() == second.SerializeToString()


def test_binary_is_alpha_sign_per_channel_and_25x_smaller():
    w = np.random.default_rng(5).standard_normal((512, 256))
    result, report = compress(matmul_model(w), ["codebook:scheme=binary"], options=NO_VALIDATE)
    decoded = _decoded_weight(ir.from_proto(result))
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
    feed = _feed(proto)
    np.testing.assert_allclose(run(result, feed)[0], run(proto, feed)[0], atol=1e-5, rtol=1e-5)


def test_ternary_values_and_threshold():
    w = np.random.default_rng(7).standard_normal((200, 16))
    result, _ = compress(matmul_model(w), ["codebook:scheme=ternary"], options=NO_VALIDATE)
    decoded = _decoded_weight(ir.from_proto(result))
    for column, original in zip(decoded.T, w.T):
        delta = 0.7 * np.abs(original).mean()
        np.testing.assert_array_equal(column == 0, np.abs(original) <= delta)
        alpha = np.abs(original[np.abs(original) > delta]).mean()
        np.testing.assert_allclose(np.abs(column[column != 0]), alpha, rtol=1e-6)


def test_conv_per_channel_and_float16_codebook():
    w = np.random.default_rng(8).standard_normal((16, 8, 3, 3))
    proto = conv_model(w)
    result, report = compress(proto, ["codebook:codebook_dtype=float16"], options=NO_VALIDATE)
    layer = report.passes[0].layers[0]
    assert layer.detail["codebooks"] == 16 and layer.detail["codebook_bytes"] == 16 * 16 * 2
    assert "Cast" in [n.op_type for n in ir.from_proto(result).graph]
    feed = _feed(proto)
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
    feed = _feed(proto)
    np.testing.assert_allclose(run(result, feed)[0], run(proto, feed)[0], atol=1e-5, rtol=1e-5)
    noisy = rng.standard_normal((64, 24))
    _, report = compress(matmul_model(noisy), ["codebook:scheme=pq,bits=3"], options=NO_VALIDATE)
    assert 0 < report.passes[0].layers[0].weight_error < 1


def _correlated_inputs(n: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((k, k)) * np.linspace(2, 0.05, k)
    return rng.standard_normal((n, k)) @ mixing + 0.5


def test_refinement_lowers_output_error_scalar_and_product():
    rng = np.random.default_rng(10)
    x = _correlated_inputs(400, 32, 11)
    gram = x.T @ x / len(x)
    rows = rng.standard_normal((12, 32))  # 12 output rows over 32 inputs
    fit = fit_scalar(rows, 4, rng=rng)
    _, before, after = refine_scalar(rows, fit, gram)
    assert after < 0.9 * before
    vectors = rows.reshape(12, 8, 4).transpose(1, 0, 2)
    product = fit_product(vectors, 4, seed=0)
    _, before, after = refine_product(vectors, product, gram)
    assert after < 0.9 * before


def test_data_aware_corrects_the_bias_and_lowers_output_error():
    w = np.random.default_rng(12).standard_normal((128, 16))
    proto = matmul_model(w, rows=300, bias=True)
    x = _correlated_inputs(300, 128, 13).astype(np.float32)
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


def test_kmeans_1d_fast_path_matches_lloyd_and_scikit_learn():
    from sklearn.cluster import KMeans

    values = np.random.default_rng(14).standard_normal(20_000)
    centroids, labels = kmeans_1d(values, 16, "linear", 0.05, np.random.default_rng(0))
    assert np.all(np.diff(centroids) > 0)
    for c in range(16):  # converged: each centroid is (nearly) the mean of its members
        assert centroids[c] == pytest.approx(values[labels == c].mean(), abs=5e-3)
    boundaries = (centroids[:-1] + centroids[1:]) / 2  # ...and each value's nearest
    np.testing.assert_array_equal(labels, np.searchsorted(boundaries, values, side="right"))
    seeds = np.linspace(values.min(), values.max(), 16)[:, None]
    reference = KMeans(16, init=seeds, n_init=1).fit(values[:, None])
    inertia = np.square(values - centroids[labels]).sum()
    assert inertia <= 1.01 * reference.inertia_


def test_fit_decode_uses_codebook_rows():
    fit = Fit(np.array([[[1.0], [2.0]], [[3.0], [4.0]]]), np.array([[1, 0], [0, 0]], np.uint8))
    np.testing.assert_array_equal(fit.decode(), [[2.0, 1.0], [3.0, 3.0]])


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
    result, report = compress(proto, ["codebook:bits=8"], options=NO_VALIDATE)
    assert any("-> 13" in note for note in report.normalization)
    feed = _feed(proto)
    got, want = run(result, feed)[0], run(proto, feed)[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.01


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("codebook:bits=9", "bits=9: must be an integer from 1 to 8"),
        ("codebook:scheme=binary,bits=2", "scheme binary stores 1 bit"),
        ("codebook:scheme=kmeans", "scheme='kmeans': must be one of"),
        ("codebook:granularity=group", "group_size goes with granularity=group"),
        ("codebook:codebook_dtype=int8", "codebook_dtype='int8'"),
    ],
)
def test_bad_options_are_rejected_naming_the_key(option, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_options([option]).build()


# --- real models -------------------------------------------------------------------------


def _mnist8_test_set(real):
    with gzip.open(real / "t10k-images-idx3-ubyte.gz") as stream:
        images = np.frombuffer(stream.read(), np.uint8, offset=16).reshape(-1, 1, 1, 28, 28)
    with gzip.open(real / "t10k-labels-idx1-ubyte.gz") as stream:
        labels = np.frombuffer(stream.read(), np.uint8, offset=8)
    return images.astype(np.float32), labels


def _accuracy_mnist8(model, images, labels) -> float:
    from onnxcompress.validate import Runner

    runner = Runner(model)
    hits = sum(int(runner.run({"Input3": x})[0].argmax() == y) for x, y in zip(images, labels))
    return hits / len(labels)


@pytest.mark.slow
def test_mnist8_4bit_per_channel_accuracy_and_bytes(real):
    """All Conv/MatMul weights, 4-bit per-channel, float16 codebooks, on the real test set."""
    images, labels = _mnist8_test_set(real)
    setting = "codebook:bits=4,min_size=1,ops=Conv,MatMul,codebook_dtype=float16"
    model, report = compress(str(real / "mnist-8.onnx"), [setting], options=NO_VALIDATE)
    totals = report.passes[0].totals()
    assert totals["layers_rewritten"] == 3
    assert totals["bytes_before"] / totals["bytes_after"] >= 6
    original = ir.load(str(real / "mnist-8.onnx"))
    drop = _accuracy_mnist8(original, images, labels) - _accuracy_mnist8(model, images, labels)
    assert drop <= 0.003


@pytest.mark.slow
def test_wide_fixture_file_6x_smaller_at_4_bits(tmp_path):
    from onnxcompress import save

    source = FIXTURES / "mnist_wide_mlp.onnx"
    model, _ = compress(str(source), ["codebook:bits=4"], options=NO_VALIDATE)
    out = tmp_path / "small.onnx"
    save(model, out)
    assert source.stat().st_size / out.stat().st_size >= 6
    _, (x, y) = mnist_split()
    feed = {"input": x.reshape(len(x), -1)}
    before = (run(source, feed)[0].argmax(1) == y).mean()
    after = (run(out, feed)[0].argmax(1) == y).mean()
    assert before - after <= 0.005


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "dims"),
    [
        ("ppocr_mobile_v2_cls.onnx", {"x:0": 1, "x:2": 48, "x:3": 192}),
        ("ultraface_rfb320.onnx", {}),
    ],
)
def test_real_models_validate_at_4_bits(real, name, dims):
    options = Options(dims=dims, samples=2, latency_runs=2)
    _, report = compress(str(real / name), ["codebook:bits=4"], options=options)
    assert report.passes[0].totals()["layers_rewritten"] > 0
    assert report.validation.outputs
    assert all(o.cosine > 0.9 for o in report.validation.outputs)
