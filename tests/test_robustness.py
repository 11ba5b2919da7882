"""Issue 11, valid models that once crashed or came out invalid: every pass either rewrites
them into a model that passes onnx's full check, or leaves layers alone with a reason."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests import corpus
from tests.conftest import FIXTURES, run
from tests.test_cli import assert_one_clear_line, invoke

PASS_SETTINGS = [
    "lowrank:rank=8",
    "int4",
    "int4:form=dq",  # upgrades the opset to 21
    "codebook",
    "prune:ratio=0.3",
    "sparsity:ratio=0.5",
    "qdq",
]


@pytest.mark.parametrize("setting", PASS_SETTINGS)
def test_a_weight_that_is_a_graph_output_survives_every_pass(tmp_path, setting):
    """The saved file once lost the output's type (`Field 'type' of 'value_info' is required`)."""
    source, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(corpus.weight_as_output(), source)
    result = invoke("compress", source, "-o", out, "-p", setting)
    assert result.exit_code == 0, result.output
    saved = onnx.load(out)
    onnx.checker.check_model(saved, full_check=True)
    assert [o.name for o in saved.graph.output] == ["z", "W2"]


@pytest.mark.parametrize("kind", ["empty", "nan", "inf"])
@pytest.mark.parametrize(
    "setting", ["lowrank:rank=8", "codebook:min_size=1", "sparsity", "int4", "qdq"]
)
def test_weights_that_cannot_be_compressed_are_skipped_with_a_reason(tmp_path, kind, setting):
    """An empty weight once raised ZeroDivisionError, a NaN one `SVD did not converge`."""
    source, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(corpus.single_matmul(corpus.bad_weight(kind)), source)
    if kind == "empty" and setting == "qdq":
        pytest.skip("an input of size 0 leaves qdq no data to calibrate on (a clear exit 2)")
    result = invoke("compress", source, "-o", out, "-p", setting, "--no-validate")
    assert result.exit_code == 0, result.output
    reason = "weight is empty" if kind == "empty" else "weight holds NaN or infinite values"
    if not (kind == "empty" and setting.startswith("codebook")):  # not a candidate at all
        assert f"skipped: {reason}" in result.output


@pytest.mark.parametrize("build", [corpus.two_in_three_out, corpus.input_is_an_output])
@pytest.mark.parametrize("setting", PASS_SETTINGS)
def test_outputs_that_are_read_or_are_inputs_survive_every_pass(tmp_path, build, setting):
    source, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(build(), source)
    result = invoke("compress", source, "-o", out, "-p", setting)
    assert result.exit_code == 0, result.output
    saved = onnx.load(out)
    onnx.checker.check_model(saved, full_check=True)
    assert [o.name for o in saved.graph.output] == [o.name for o in build().graph.output]


@pytest.mark.parametrize("case", sorted(corpus.malformed()))
@pytest.mark.parametrize("command", ["compress", "compress-no-validate", "inspect"])
def test_malformed_models_get_one_line_and_exit_2(tmp_path, case, command):
    """Issue 11: each once ended in exit 3 (a traceback's last line), a MemoryError, or, with
    --no-validate, a model written as if nothing were wrong."""
    model, fragment = corpus.malformed()[case]
    source, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    source.write_bytes(model.SerializeToString())
    if command == "inspect":
        result = invoke("inspect", source)
        if case == "input of 2**40":
            assert result.exit_code == 0, result.output  # accounting only: no data is made
            return
    else:
        extra = ["--no-validate"] if command == "compress-no-validate" else []
        if case == "input of 2**40" and extra:
            pytest.skip("without validation no synthetic data is made: nothing is too large")
        result = invoke("compress", source, "-o", out, "-p", "lowrank:rank=8", *extra)
    assert_one_clear_line(result, 2, fragment)
    assert not out.exists()


def test_nodes_merely_out_of_order_are_sorted_not_refused(tmp_path):
    model = corpus.matmul_graph(
        [helper.make_node("Relu", ["a"], ["y"]), helper.make_node("MatMul", ["x", "W"], ["a"])]
    )
    source, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    source.write_bytes(model.SerializeToString())
    result = invoke("compress", source, "-o", out, "-p", "lowrank:rank=8")
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_default_qdq_leaves_shape_computations_alone(tmp_path):
    """Issue 11: an int64 shape path got a QuantizeLinear and the run ended in exit 3."""
    source, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(corpus.flatten_by_shape_path(), source)
    result = invoke("compress", source, "-o", out, "-p", "qdq")
    assert result.exit_code == 0, result.output
    assert "computes a shape" in result.output
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_qdq_on_a_float16_model_is_skipped_with_a_reason(tmp_path):
    weight = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Relu", ["y"], ["z"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [3, 64])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT16, [3, 64])],
        [numpy_helper.from_array(weight, "W")],
    )
    source, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    result = invoke("compress", source, "-o", out, "-p", "qdq")
    assert result.exit_code == 0, result.output
    assert "skipped" in result.output
    onnx.checker.check_model(onnx.load(out), full_check=True)


def _write_bad_data(folder, kind: str):
    """A calibration source of the given broken kind, for the MLP fixture (input [N, 784])."""
    if kind == "object array":
        path = folder / "data.npz"
        np.savez(path, input=np.array([{"a": 1}], dtype=object))
    elif kind == "corrupt zip":
        path = folder / "data.npz"
        path.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    elif kind == "0-d array":
        path = folder / "data.npz"
        np.savez(path, input=np.array(1.0, np.float32))
    elif kind == "npy header of 2**46 values":
        path = folder / "data"
        path.mkdir()
        header = {"descr": "<f4", "fortran_order": False, "shape": (1 << 46,)}
        with open(path / "input.npy", "wb") as stream:
            np.lib.format.write_array_header_1_0(stream, header)
            stream.write(b"\x00" * 64)
    elif kind == "fifo":
        path = folder / "data"
        path.mkdir()
        os.mkfifo(path / "input.npy")
    return path


@pytest.mark.parametrize(
    "kind", ["object array", "corrupt zip", "0-d array", "npy header of 2**46 values", "fifo"]
)
def test_bad_calibration_data_gets_one_line_and_exit_2(tmp_path, kind):
    data = _write_bad_data(tmp_path, kind)
    out = tmp_path / "o.onnx"
    model = FIXTURES / "mnist_mlp.onnx"
    result = invoke("compress", model, "-o", out, "-p", "lowrank:rank=8", "--calibration", data)
    assert_one_clear_line(result, 2)
    assert not out.exists()


def _write_bad_recipe(folder, kind: str):
    path = folder / ("recipe.json" if kind == "deep JSON" else "recipe.toml")
    if kind == "list for a number":
        path.write_text('[[passes]]\nname = "lowrank"\nrank = [1, 2]\n')
    elif kind == "table for a word":
        path.write_text('[[passes]]\nname = "lowrank"\nscheme = {a = 1}\n')
    elif kind == "not UTF-8":
        path.write_bytes(b"\xff\xfe[[passes]]")
    elif kind == "deep JSON":
        path.write_text("[" * 100_000)
    elif kind == "too large":
        path.write_text("# padding\n" * 200_000)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "/dev/zero":
        return "/dev/zero"
    return path


@pytest.mark.parametrize(
    "kind",
    ["list for a number", "table for a word", "not UTF-8", "deep JSON", "too large", "fifo",
     "/dev/zero"],
)  # fmt: skip
def test_bad_recipes_get_one_line_and_exit_2(tmp_path, kind):
    recipe = _write_bad_recipe(tmp_path, kind)
    out = tmp_path / "o.onnx"
    result = invoke("compress", FIXTURES / "mnist_mlp.onnx", "-o", out, "--recipe", recipe)
    assert_one_clear_line(result, 2)
    assert not out.exists()


@pytest.mark.parametrize(
    "option", [["--batch-size", "0"], ["--samples", "0"], ["--seed", "-1"], ["--dim", "N=²"]]
)
def test_bad_option_values_exit_2_without_a_traceback(tmp_path, option):
    out = tmp_path / "o.onnx"
    result = invoke("compress", FIXTURES / "mnist_mlp.onnx", "-o", out, "-p", "lowrank", *option)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "Error" in result.output
    assert not out.exists()


@pytest.mark.parametrize("setting", PASS_SETTINGS)
def test_local_functions_survive_every_pass(tmp_path, setting):
    """int4:form=dq upgrades the opset, and onnx's converter dropped the function: onnxruntime then
    could not load the result (`local:Dense(-1) is not a registered function/op`)."""
    source, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(corpus.with_local_function(), source)
    result = invoke("compress", source, "-o", out, "-p", setting)
    assert result.exit_code == 0, result.output
    saved = onnx.load(out)
    onnx.checker.check_model(saved, full_check=True)
    assert [f.name for f in saved.functions] == ["Dense"]
    feed = {"x": np.ones((3, 64), np.float32)}
    assert np.isfinite(run(out, feed)[0]).all()
