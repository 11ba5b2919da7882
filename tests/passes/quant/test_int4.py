"""int4 weight-only: each form's structure, its numerics against a plain numpy reference in
onnxruntime, the choice ``form=auto`` makes per layer, embedding tables, skips, and real models."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import Recipe, RecipeError, compress
from onnxcompress.passes.quant.int4_forms import nbits_pays
from onnxcompress.pipeline import Options
from tests.conftest import parse, run

NO_VALIDATE = Options(validate=False)
RNG = np.random.default_rng(4)


def int4(model, setting="int4", data=None) -> tuple[ir.Model, object]:
    return compress(ir.from_proto(model), [setting], calibration=data, options=NO_VALIDATE)


def reference(w: np.ndarray, block: int, symmetric: bool) -> np.ndarray:
    """w [K, N] quantized to int4 in blocks of ``block`` rows per column, written out plainly:
    the weight every form must compute."""
    out = np.empty_like(w)
    for start in range(0, len(w), block):
        part = w[start : start + block]
        if symmetric:
            scale = np.abs(part).max(0) / np.float32(7)
            scale[scale == 0] = 1
            out[start : start + block] = np.clip(np.round(part / scale), -8, 7) * scale
        else:
            low, high = np.minimum(part.min(0), 0), np.maximum(part.max(0), 0)
            scale = (high - low) / np.float32(15)
            scale[scale == 0] = 1
            zero = np.clip(np.round(-low / scale), 0, 15)
            out[start : start + block] = (
                np.clip(np.round(part / scale) + zero, 0, 15) - zero
            ) * scale
    return out


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def runtime_ops(model: ir.Model | str, tmp_path) -> list[str]:
    """The op types of the graph onnxruntime runs after its own optimizations (all but the
    hardware-specific layout ones)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    source = model if isinstance(model, str) else ir.to_proto(model).SerializeToString()
    ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]


def matmul_model(k=96, n=16, opset=17, weight=None):
    w = RNG.standard_normal((k, n)).astype(np.float32) if weight is None else weight
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="/mm/MatMul")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
        [numpy_helper.from_array(w, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), w


def gemm_model(k=40, n=24, trans_a=0, beta=0.5):
    w = RNG.standard_normal((n, k)).astype(np.float32)  # transB=1: [N, K]
    b = RNG.standard_normal(n).astype(np.float32)
    x_shape = [k, "N"] if trans_a else ["N", k]
    node = helper.make_node(
        "Gemm", ["x", "W", "B"], ["y"], name="/fc/Gemm", transA=trans_a, transB=1, beta=beta
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), w, b


def gather_model(vocab=200, hidden=100):
    """ids int64 [B, S] -> Gather(table [vocab, hidden]) -> y [B, S, hidden]."""
    table = RNG.standard_normal((vocab, hidden)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["T", "ids"], ["y"], name="/emb/Gather")],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", hidden])],
        [numpy_helper.from_array(table, "T")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), table


def x_feed(k, rows=3):
    return {"x": RNG.standard_normal((rows, k)).astype(np.float32)}


def layer(report, index=0):
    return report.passes[0].layers[index]


# -- form=auto: MatMulNBits where it pays, folded elsewhere ----------------------------------


def test_auto_stores_a_small_layer_folded_and_runs_it_as_float(tmp_path):
    model, w = matmul_model(k=96, n=16)
    quantized, report = int4(model, data=[x_feed(96)])
    rewritten = layer(report)
    assert rewritten.detail["form"] == "folded" and "too small" in rewritten.detail["why"]
    assert rewritten.bytes_after < rewritten.bytes_before / 5
    ops = runtime_ops(quantized, tmp_path)  # the decoder reads only initializers: folded
    assert ops == ["MatMul"]
    feed = x_feed(96)
    expected = feed["x"] @ reference(w, 32, True)
    np.testing.assert_allclose(run(quantized, feed)[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [75, 100, 128])  # odd, a partial last block, whole blocks
def test_folded_form_is_exact(k, symmetric):
    model, w = matmul_model(k=k, n=12)
    flag = str(symmetric).lower()
    quantized, report = int4(model, f"int4:form=folded,symmetric={flag}")
    assert layer(report).detail["form"] == "folded"
    feed = x_feed(k)
    expected = feed["x"] @ reference(w, 32, symmetric)
    np.testing.assert_allclose(run(quantized, feed)[0], expected, rtol=1e-5, atol=1e-5)


def test_auto_picks_matmulnbits_where_it_pays():
    model, w = matmul_model(k=512, n=512)
    one_row = [x_feed(512, rows=1)]
    quantized, report = int4(model, "int4:block_size=128", one_row)
    rewritten = layer(report)
    assert rewritten.detail == {
        "form": "MatMulNBits",
        "block_size": 128,
        "symmetric": True,
        "accuracy_level": 4,
    }
    (node,) = list(quantized.graph)
    assert node.op_type == "MatMulNBits" and node.domain == "com.microsoft"
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    assert attrs == {"K": 512, "N": 512, "bits": 4, "block_size": 128, "accuracy_level": 4}
    feed = x_feed(512, rows=1)
    expected = feed["x"] @ reference(w, 128, True)
    assert rel_error(expected, run(quantized, feed)[0]) < 0.02  # int8 activations
    _, report = int4(model, "int4:block_size=128", [x_feed(512, rows=8)])
    assert layer(report).detail["form"] == "MatMulNBits"  # 512x512 pays at 8 rows too


def test_the_size_rule():
    assert nbits_pays(1, 512, 512, 32, 4) is None  # one row: reading the weight dominates
    assert "too small" in nbits_pays(1, 128, 256, 32, 4)
    assert "too small" in nbits_pays(1, 256, 1024, 16, 4)
    assert nbits_pays(128, 384, 1536, 128, 4) is None
    assert "too small" in nbits_pays(128, 384, 384, 128, 4)
    assert "too small" in nbits_pays(40, 120, 6625, 128, 4)
    assert "too small" in nbits_pays(None, 512, 512, 32, 4)  # unknown rows: judged as many
    assert nbits_pays(128, 2048, 512, 32, 4) is None
    assert "K >= 2048" in nbits_pays(128, 1536, 384, 16, 4)  # block 16
    assert nbits_pays(128, 3072, 768, 16, 4) is None
    assert "accuracy_level 4 only" in nbits_pays(1, 4096, 4096, 128, 0)


def test_min_speedup_times_the_layer_both_ways():
    model, _ = matmul_model(k=256, n=256)
    _, report = int4(model, "int4:block_size=128,min_speedup=1", [x_feed(256, rows=4)])
    detail = layer(report).detail
    assert detail["form"] == "MatMulNBits" or "measured" in detail["why"]


# -- MatMulNBits ------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_matmulnbits_operands_and_numerics(symmetric):
    model, w = matmul_model(k=80, n=16)  # 80 = 2.5 blocks of 32
    flag = str(symmetric).lower()
    quantized, _ = int4(model, f"int4:form=matmulnbits,accuracy_level=0,symmetric={flag}")
    (node,) = list(quantized.graph)
    assert node.inputs[1].const_value.shape == (16, 3, 16)  # [N, blocks, block / 2]
    assert node.inputs[2].const_value.shape == (48,)
    zeros = node.inputs[3] if len(node.inputs) > 3 else None
    assert (zeros is None) == symmetric
    if zeros is not None:
        assert zeros.const_value.shape == (32,)  # two blocks' zero points a byte, per column
    feed = x_feed(80)
    expected = feed["x"] @ reference(w, 32, symmetric)
    np.testing.assert_allclose(run(quantized, feed)[0], expected, rtol=1e-5, atol=1e-5)


def test_matmulnbits_matches_blocked_dequantize():
    model, _ = matmul_model(k=80)
    feed = x_feed(80)
    for symmetric in ("true", "false"):
        setting = f"block_size=32,symmetric={symmetric}"
        nbits, _ = int4(model, f"int4:matmulnbits=true,{setting}")  # the older spelling
        blocked, _ = int4(model, f"int4:form=dq,{setting}")
        assert [n.op_type for n in nbits.graph] == ["MatMulNBits"]
        expected = run(model, feed)[0]
        nbits_error = rel_error(expected, run(nbits, feed)[0])
        blocked_error = rel_error(expected, run(blocked, feed)[0])
        assert nbits_error < 0.15 and abs(nbits_error - blocked_error) < 0.02


def test_gemm_becomes_matmulnbits_with_its_bias():
    model, w, b = gemm_model(k=40, n=24, beta=0.5)
    quantized, report = int4(model, "int4:form=matmulnbits,accuracy_level=0,block_size=16")
    (node,) = list(quantized.graph)
    assert node.op_type == "MatMulNBits" and len(node.inputs) == 6 and node.inputs[4] is None
    feed = x_feed(40)
    expected = feed["x"] @ reference(w.T, 16, True) + 0.5 * b
    np.testing.assert_allclose(run(quantized, feed)[0], expected, rtol=1e-5, atol=1e-5)
    assert layer(report).bytes_before == w.nbytes + b.nbytes


def test_gemm_folded_transposes_back():
    model, w, b = gemm_model(k=40, n=24)
    quantized, report = int4(model, "int4:block_size=16")
    assert layer(report).detail["form"] == "folded"
    feed = x_feed(40)
    expected = feed["x"] @ reference(w.T, 16, True) + 0.5 * b
    np.testing.assert_allclose(run(quantized, feed)[0], expected, rtol=1e-5, atol=1e-5)


def test_a_gemm_matmulnbits_cannot_compute_is_folded_or_skipped():
    model, _, _ = gemm_model(trans_a=1)
    _, report = int4(model, "int4:form=matmulnbits")
    assert layer(report).reason == "MatMulNBits cannot transpose the activation (Gemm transA=1)"
    _, report = int4(model)
    assert layer(report).detail["form"] == "folded"
    assert "transA" in layer(report).detail["why"]


# -- blocked DequantizeLinear ---------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block", [32, 64])
def test_blocked_dequantize(symmetric, block):
    model, _ = matmul_model(k=96)  # 96 = 1.5 blocks of 64: a partial last block
    flag = str(symmetric).lower()
    quantized, report = int4(model, f"int4:form=dq,block_size={block},symmetric={flag}")
    dq = next(n for n in quantized.graph if n.op_type == "DequantizeLinear")
    assert dq.attributes.get_int("block_size") == block
    assert dq.inputs[0].const_value.dtype == (ir.DataType.INT4 if symmetric else ir.DataType.UINT4)
    assert dq.inputs[1].const_value.shape == (-(-96 // block), 16)
    rewritten = layer(report)
    assert rewritten.bytes_after < rewritten.bytes_before / 5 and rewritten.weight_error < 0.15
    feed = x_feed(96)
    assert rel_error(run(model, feed)[0], run(quantized, feed)[0]) < 0.15


def test_gemm_blocks_run_along_the_reduction_axis():
    model, _, _ = gemm_model(k=40, n=24)  # W is [N, K] (transB=1): blocks along axis 1
    quantized, report = int4(model, "int4:form=dq,block_size=16")
    dq = next(n for n in quantized.graph if n.op_type == "DequantizeLinear")
    assert dq.attributes.get_int("axis") == 1 and dq.inputs[1].const_value.shape == (24, 3)
    assert layer(report).node == "/fc/Gemm" and layer(report).action == "rewritten"


# -- embedding tables -------------------------------------------------------------------------


def ids_feed(vocab=200, shape=(2, 5)):
    return {"ids": RNG.integers(0, vocab, shape).astype(np.int64)}


@pytest.mark.parametrize("symmetric", [True, False])
def test_gather_block_quantized_reads_int4_rows(symmetric):
    model, table = gather_model(vocab=200, hidden=100)  # 100 = 3 blocks of 32 and a part
    quantized, report = int4(model, f"int4:symmetric={str(symmetric).lower()}")
    (node,) = list(quantized.graph)
    assert node.op_type == "GatherBlockQuantized" and node.domain == "com.microsoft"
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    assert attrs == {"bits": 4, "block_size": 32, "gather_axis": 0, "quantize_axis": 1}
    data, scales = node.inputs[0].const_value, node.inputs[2].const_value
    assert data.dtype == ir.DataType.UINT8 and data.shape == (200, 50)
    assert scales.shape == (200, 4)
    assert (len(node.inputs) == 3) == symmetric  # zero points [200, 2] when asymmetric
    rewritten = layer(report)
    assert rewritten.detail["form"] == "GatherBlockQuantized"
    assert rewritten.bytes_after < rewritten.bytes_before / 5
    feed = ids_feed()
    expected = reference(table.T, 32, symmetric).T[feed["ids"]]
    np.testing.assert_allclose(run(quantized, feed)[0], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("form", ["folded", "dq"])
def test_gather_in_the_standard_forms(form):
    model, table = gather_model(vocab=60, hidden=48)
    quantized, report = int4(model, f"int4:form={form},block_size=16")
    assert "Gather" in [n.op_type for n in quantized.graph]
    assert layer(report).action == "rewritten"
    feed = ids_feed(60)
    expected = reference(table.T, 16, True).T[feed["ids"]]
    np.testing.assert_allclose(run(quantized, feed)[0], expected, rtol=1e-6, atol=1e-6)


def test_gathers_left_alone_with_a_reason():
    table = RNG.standard_normal((8, 64)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["x", "ids"], ["rows"], name="/rows/Gather"),
        helper.make_node("Gather", ["T", "three"], ["first"], name="/first/Gather"),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["width"], name="/width/Gather"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["K"]),
        ],
        [
            helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["K", 64]),
            helper.make_tensor_value_info("first", TensorProto.FLOAT, [1, 64]),
            helper.make_tensor_value_info("width", TensorProto.INT64, []),
        ],
        [
            numpy_helper.from_array(table, "T"),
            numpy_helper.from_array(np.array([3], np.int64), "three"),
            numpy_helper.from_array(np.array(1, np.int64), "one"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _, report = int4(model)
    reasons = {item.node: item.reason for item in report.passes[0].layers}
    assert reasons == {  # the shape Gather (int64) is no candidate
        "/rows/Gather": "table is not a constant",
        "/first/Gather": "indices are constant: the rows read are fixed (onnxruntime folds them)",
    }
    _, report = int4(model, "int4:gather=false")
    assert report.passes[0].layers == []


def test_a_table_tied_to_the_output_projection_is_left_whole():
    table = RNG.standard_normal((50, 32)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["T", "ids"], ["h"], name="/emb/Gather"),
        helper.make_node("Gemm", ["h2", "T"], ["logits"], name="/head/Gemm", transB=1),
        helper.make_node("Reshape", ["h", "shape"], ["h2"]),
    ]
    graph = helper.make_graph(
        nodes[:1] + nodes[2:] + nodes[1:2],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [4, 50])],
        [numpy_helper.from_array(table, "T"), numpy_helper.from_array(np.array([4, 32]), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _, report = int4(model)
    reasons = {item.node: item.reason for item in report.passes[0].layers}
    assert reasons == {
        "/emb/Gather": "table is shared by 2 uses",
        "/head/Gemm": "weight is shared by 2 uses",
    }


def test_a_small_encoder_by_default(tmp_path):
    from fixtures.transformer import token_feeds, transformer_model

    model = transformer_model(vocab=512, hidden=64, layers=1, ffn=128, heads=4)
    data = token_feeds(512, 2, batch=2, seq=16)
    quantized, report = int4(model, data=data)
    forms = [item.detail.get("form") for item in report.passes[0].layers]
    assert forms.count("GatherBlockQuantized") == 1 and forms.count("folded") == 6
    skipped = [item for item in report.passes[0].layers if item.action == "skipped"]
    assert {item.reason for item in skipped} == {"weight is not a constant"}  # attention
    assert "GatherBlockQuantized" in runtime_ops(quantized, tmp_path)
    expected, got = run(model, data[1])[0], run(quantized, data[1])[0]
    assert rel_error(expected, got) < 0.3
    folded, _ = int4(model, "int4:form=folded", data)  # runs float's very graph
    assert sorted(runtime_ops(folded, tmp_path)) == sorted(
        runtime_ops(ir.from_proto(model), tmp_path)
    )


# -- options, opsets, real models --------------------------------------------------------------


def test_options():
    for bad in (
        "int4:form=fast",
        "int4:accuracy_level=5",
        "int4:matmulnbits=true,form=dq",
        "int4:form=folded,min_speedup=1.1",
        "int4:block_size=48",
    ):
        with pytest.raises(RecipeError):
            Recipe.from_options([bad]).build()
    (built,) = Recipe.from_options(["int4:matmulnbits=false"]).build()
    assert built.config.form == "dq"


def test_opsets_each_form_needs():
    model, _ = matmul_model(k=64, n=8, opset=10)
    for setting, opset in (("int4", 11), ("int4:form=dq", 21), ("int4:form=matmulnbits", 10)):
        quantized, _ = int4(model, setting, [x_feed(64)])
        assert quantized.opset_imports[""] == opset, setting
        feed = x_feed(64)
        assert rel_error(run(model, feed)[0], run(quantized, feed)[0]) < 0.25  # int4, random W


def test_skips_activation_weights():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x, float[4, 3] W) => (float[N, 3] y) { y = MatMul(x, W) }
        """
    )
    _, report = int4(model)
    assert layer(report).reason == "weight is not a constant"


@pytest.mark.slow
def test_int4_on_ppocrv4_rec_runs_as_float(real, tmp_path):
    from onnxcompress import load, synthetic_feeds

    dims = {"p2o.DynamicDimension.0": 1, "x:2": 48, "p2o.DynamicDimension.1": 160}
    path = str(real / "ppocrv4_rec.onnx")
    data = synthetic_feeds(load(path), dims, samples=1)
    quantized, report = compress(path, ["int4"], data, options=Options(dims=dims))
    forms = [item.detail.get("form") for item in report.passes[0].layers]
    assert forms.count("folded") == 9  # every constant MatMul: K <= 240, too small to pay
    assert report.validation.outputs[0].rel_l2 < 0.5
    assert quantized.metadata_props.get("character")
    # onnxruntime folds every decoder at load: it runs the float model's very graph
    assert sorted(runtime_ops(quantized, tmp_path)) == sorted(runtime_ops(path, tmp_path))
