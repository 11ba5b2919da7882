"""Sparse storage of codebook indices (``sparse.py``): the encoding is exact for every advance
width, empty rows, all-zero and fully dense weights; the pass stores it when smaller, decodes
it with ops onnxruntime folds, and the file round-trips."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxcompress import compress, save
from onnxcompress.passes.codebook.fit import CodebookFit, fit_scalar
from onnxcompress.passes.codebook.pack import PackedIndices
from onnxcompress.passes.codebook.sparse import (
    ADVANCE_BITS,
    advances_of,
    cheapest_advance_bits,
    encode,
    entry_count,
    sparse_bytes,
)
from tests.conftest import run
from tests.passes.codebook.models import (
    NO_VALIDATE,
    conv_model,
    correlated_inputs,
    matmul_model,
    random_feed,
)


def sparse_weight(shape, density: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape)
    return np.where(rng.random(shape) < density, w, 0.0)


def decoded(entries, fit: CodebookFit) -> np.ndarray:
    """What the decoder graph computes, in numpy: codewords scattered into zeros."""
    flat = np.zeros(entries.size)
    rows = entries.positions() // fit.indices.shape[1]
    flat[entries.positions()] = fit.codebook[rows, entries.indices, 0]
    return flat.reshape(fit.indices.shape)


@pytest.mark.parametrize("advance_bits", list(ADVANCE_BITS))
def test_every_advance_width_decodes_exactly(advance_bits):
    w = sparse_weight((40, 300), 0.05, seed=advance_bits)
    w[3] = 0  # an empty row
    w[:, -50:] = 0  # a long run at the end (no entries needed)
    fit = fit_scalar(w.reshape(1, -1), 16)
    entries = encode(fit, 4, advance_bits)
    assert entries.advance_bits == advance_bits
    assert entries.advances.max() < 1 << advance_bits
    np.testing.assert_array_equal(decoded(entries, fit), fit.decode())
    assert entries.entries == entry_count(advances_of(fit.decode().ravel() != 0), advance_bits)
    fields = PackedIndices.of(entries.fields()[None], entries.width, 17)
    np.testing.assert_array_equal(fields.unpack()[0], entries.fields())


def test_per_channel_codebooks_and_all_zero_and_dense_weights():
    w = sparse_weight((16, 200), 0.1)
    fit = fit_scalar(w, 8)  # one codebook per row: positions pick their row's codebook
    entries = encode(fit, 3)
    np.testing.assert_array_equal(decoded(entries, fit), fit.decode())
    empty = encode(fit_scalar(np.zeros((1, 500)), 4), 4)
    assert empty.entries == 0
    dense = np.random.default_rng(1).standard_normal((1, 500))
    full = encode(fit_scalar(dense, 16), 4)  # no zero codeword, but no run needs a filler
    assert full.entries == 500 and full.fillers == 0


def test_fillers_decode_to_zero_in_every_row_they_land_in():
    w = np.random.default_rng(2).standard_normal((3, 600))
    w[1, 3:] = 0  # a run across the end of row 1 and ...
    w[2, :590] = 0  # ... most of row 2: fillers land in both
    fit = fit_scalar(w, 8)  # per row: rows 1 and 2 get a zero codeword, row 0 none
    entries = encode(fit, 3, advance_bits=2)
    assert entries.fillers > 100
    np.testing.assert_array_equal(decoded(entries, fit), fit.decode())


def test_cheapest_width_minimizes_the_stored_bits():
    advances = advances_of(sparse_weight((1, 20000), 0.05).ravel() != 0)
    best, entries = cheapest_advance_bits(advances, 4)
    cost = sparse_bytes(entries, best, 4)
    assert all(sparse_bytes(entry_count(advances, a), a, 4) >= cost for a in ADVANCE_BITS)


def optimized_ops(model, tmp_path) -> list[str]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_pass_stores_a_sparse_weight_exactly_folded_and_smaller(granularity, tmp_path):
    w = sparse_weight((512, 128), 0.08)
    proto = matmul_model(w)
    setting = f"codebook:bits=8,granularity={granularity},storage=sparse"
    result, report = compress(proto, [setting], options=NO_VALIDATE)
    layer = report.passes[0].layers[0]
    assert layer.detail["storage"] == "sparse" and layer.detail["entries"] >= (w != 0).sum()
    model = ir.from_proto(result)
    ops = {node.op_type for node in model.graph}
    assert {"ScatterElements", "CumSum"} <= ops
    feed = random_feed(proto)
    dense_setting = setting.replace("storage=sparse", "storage=dense")
    dense, _ = compress(proto, [dense_setting], options=NO_VALIDATE)
    # the same fit stored both ways: the same weight
    np.testing.assert_allclose(run(result, feed)[0], run(dense, feed)[0], atol=1e-6, rtol=1e-6)
    assert optimized_ops(result, tmp_path) == ["MatMul"]  # onnxruntime folds the decoder
    parts = layer.detail["positions_bytes"] + layer.detail["indices_bytes"]
    assert parts == layer.detail["entries_bytes"]
    width = layer.detail["advance_bits"] + 8
    assert 0 <= layer.detail["entries_bytes"] * 8 - layer.detail["entries"] * width < 8 * width
    assert layer.bytes_after < w.size  # fewer bytes than one 8-bit index a weight
    path = tmp_path / "sparse.onnx"
    save(model, path)
    np.testing.assert_array_equal(run(onnx.load(path), feed)[0], run(result, feed)[0])


def test_auto_storage_picks_the_smaller_form():
    sparse, _ = compress(
        matmul_model(sparse_weight((256, 64), 0.05)),
        ["codebook:bits=4,granularity=tensor"],
        options=NO_VALIDATE,
    )
    dense_w = np.random.default_rng(0).standard_normal((256, 64))
    dense, report = compress(
        matmul_model(dense_w), ["codebook:bits=4,granularity=tensor"], options=NO_VALIDATE
    )
    assert "ScatterElements" in {n.op_type for n in sparse.graph.node}
    assert "ScatterElements" not in {n.op_type for n in dense.graph.node}
    assert "storage" not in report.passes[0].layers[0].detail
    half = sparse_weight((256, 64), 0.6)  # 40% zeros: never sparse
    kept, _ = compress(
        matmul_model(half), ["codebook:bits=4,granularity=tensor"], options=NO_VALIDATE
    )
    assert "ScatterElements" not in {n.op_type for n in kept.graph.node}


def test_sparse_conv_weight_with_float16_codebook_is_exact_at_its_distinct_values():
    w = sparse_weight((32, 16, 3, 3), 0.1).round(1)  # few distinct values: an exact codebook
    proto = conv_model(w)
    setting = "codebook:bits=6,granularity=tensor,codebook_dtype=float16,storage=sparse"
    result, report = compress(proto, [setting], options=NO_VALIDATE)
    assert report.passes[0].layers[0].detail["storage"] == "sparse"
    dense, _ = compress(proto, [setting.replace("sparse", "dense")], options=NO_VALIDATE)
    feed = random_feed(proto)
    np.testing.assert_array_equal(run(result, feed)[0], run(dense, feed)[0])
    rounded = conv_model(w.astype(np.float16).astype(np.float32))  # the codebook's precision
    np.testing.assert_allclose(run(result, feed)[0], run(rounded, feed)[0], atol=1e-4, rtol=1e-4)


def test_storage_option_is_checked():
    with pytest.raises(Exception, match="storage"):
        compress(matmul_model(np.ones((64, 64))), ["codebook:storage=csr"], options=NO_VALIDATE)


def test_data_aware_refits_a_sparse_weights_codewords_and_keeps_its_zeros():
    w = sparse_weight((128, 64), 0.15, seed=5)
    proto = matmul_model(w, rows=400)
    x = correlated_inputs(400, 128, 6).astype(np.float32)
    setting = "codebook:bits=1,min_size=1"  # auto: 1 bit a weight on average, zeros included
    plain, _ = compress(proto, [setting], [{"X": x}], options=NO_VALIDATE)
    aware, report = compress(proto, [setting + ",data_aware=true"], [{"X": x}], options=NO_VALIDATE)
    detail = report.passes[0].layers[0].detail
    assert detail["storage"] == "sparse"
    assert detail["output_error"]["after"] < detail["output_error"]["before"]
    assert detail["entries"] - detail["fillers"] == (w != 0).sum()  # the zeros stayed zeros
    want = run(proto, {"X": x})[0]
    errors = [np.linalg.norm(run(m, {"X": x})[0] - want) for m in (plain, aware)]
    assert errors[1] < errors[0]


def test_fold_batchnorm_stores_no_batchnorm_and_keeps_the_outputs():
    from tests.passes.prune.channel_models import COUPLING_CASES, build, feed_for

    proto = build(COUPLING_CASES["conv_bn"])
    setting = "codebook:bits=8,granularity=channel,min_size=1,fold_batchnorm=true"
    result, report = compress(proto, [setting], options=NO_VALIDATE)
    assert "BatchNormalization" not in {node.op_type for node in result.graph.node}
    assert any("folded" in note for note in report.passes[0].notes)
    feed = feed_for(proto)
    want, got = run(proto, feed)[0], run(result, feed)[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.01


def test_a_size_goal_leaves_a_weight_float_when_its_decoder_outweighs_it():
    rng = np.random.default_rng(4)
    proto = matmul_model(rng.standard_normal((12, 12)))  # 576 bytes: less than any decoder
    _, report = compress(proto, ["codebook:size=1.5x,min_size=1"], options=NO_VALIDATE)
    layer = report.passes[0].layers[0]
    assert layer.action == "skipped" and "left float" in layer.reason
