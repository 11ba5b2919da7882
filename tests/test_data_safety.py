"""Issue 11, data lost or leaked: each case once overwrote or read a user's file, or let a
broken result through a gate. Every test fails on the code before the fix."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import compress, load
from onnxcompress.errors import BadData, BadModel
from onnxcompress.pipeline import Options
from tests.conftest import FIXTURES, run, sha256
from tests.passes.lowrank.test_lowrank import matmul_model
from tests.test_cli import assert_one_clear_line, invoke


def _external(folder, name="m.onnx", location="m.onnx.data"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save(
        matmul_model([3, 64], k=64, n=64),
        path,
        save_as_external_data=True,
        location=location,
        size_threshold=0,
    )
    return path


def _fingerprints(folder) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}


def test_output_whose_data_file_is_the_inputs_data_file_is_refused(tmp_path):
    source = _external(tmp_path, "in.onnx", location="out.onnx.data")
    before = _fingerprints(tmp_path)
    result = invoke("compress", source, "-o", tmp_path / "out.onnx", "-p", "int4")
    assert_one_clear_line(result, 2, "out.onnx.data", "overwrite an input")
    assert _fingerprints(tmp_path) == before


def test_output_naming_the_inputs_data_file_is_refused(tmp_path):
    source = _external(tmp_path, location="w.bin")
    before = _fingerprints(tmp_path)
    result = invoke("compress", source, "-o", tmp_path / "w.bin", "-p", "int4")
    assert_one_clear_line(result, 2, "w.bin", "overwrite an input")
    assert _fingerprints(tmp_path) == before


def test_report_naming_the_input_or_the_output_is_refused(tmp_path):
    source = tmp_path / "m.onnx"
    onnx.save(matmul_model([3, 64], k=64, n=64), source)
    before = _fingerprints(tmp_path)
    out = tmp_path / "o.onnx"
    result = invoke("compress", source, "-o", out, "-p", "int4", "--report", source)
    assert_one_clear_line(result, 2, "report", "overwrite an input")
    result = invoke("compress", source, "-o", out, "-p", "int4", "--report", out)
    assert_one_clear_line(result, 2, "the report and the output are the same file")
    assert _fingerprints(tmp_path) == before


@pytest.mark.parametrize("where", ["folder", "proc"])
def test_an_unwritable_report_fails_before_the_model_is_written(tmp_path, where):
    source = tmp_path / "m.onnx"
    onnx.save(matmul_model([3, 64], k=64, n=64), source)
    report = tmp_path if where == "folder" else "/proc/onnxcompress-report.json"
    out = tmp_path / "o.onnx"
    result = invoke("compress", source, "-o", out, "-p", "int4", "--report", report)
    assert_one_clear_line(result, 2, "report")
    assert not out.exists()


def test_batch_into_its_own_input_folder_is_refused(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("a.onnx", "b.onnx"):
        onnx.save(matmul_model([3, 64], k=64, n=64), folder / name)
    before = _fingerprints(folder)
    result = invoke("batch", folder, "-o", folder, "-p", "int4", "--no-validate")
    assert_one_clear_line(result, 2, "overwrite an input")
    assert _fingerprints(folder) == before


def test_batch_gives_every_member_its_own_output(tmp_path):
    """d1/m.onnx and d2/m.onnx once got m.onnx and m-1.onnx, and d3/m-1.onnx got m-1.onnx too."""
    sources = []
    for folder, name in (("d1", "m.onnx"), ("d2", "m.onnx"), ("d3", "m-1.onnx")):
        (tmp_path / folder).mkdir()
        sources.append(tmp_path / folder / name)
        onnx.save(matmul_model([3, 64], k=64, n=64), sources[-1])
    out = tmp_path / "out"
    result = invoke("batch", *sources, "-o", out, "-p", "int4", "--no-validate")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())["models"]
    outputs = [member["output"] for member in summary]
    assert len(set(outputs)) == 3 and all(os.path.exists(o) for o in outputs)


def _constant_with_external_data(folder, location: str) -> onnx.ModelProto:
    """A Constant node whose tensor points at ``location`` (outside the model's folder)."""
    tensor = numpy_helper.from_array(np.ones((64, 64), np.float32), "W")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(64 * 64 * 4))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["W"], value=tensor),
            helper.make_node("MatMul", ["X", "W"], ["Y"]),
        ],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [3, 64])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, 64])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("absolute", [False, True])
def test_external_data_of_a_constant_node_may_not_leave_the_folder(tmp_path, absolute):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.full(64 * 64, 7, np.float32).tobytes())
    folder = tmp_path / "models"
    folder.mkdir()
    location = str(secret) if absolute else "../secret.bin"
    source = folder / "m.onnx"
    source.write_bytes(_constant_with_external_data(folder, location).SerializeToString())
    out = folder / "o.onnx"
    result = invoke("compress", source, "-o", out, "-p", "int4", "--no-validate")
    assert_one_clear_line(result, 2, "external data location")
    assert not out.exists()


def test_nan_in_calibration_data_is_refused():
    feeds = [{"input": np.ones((4, 1, 28, 28), np.float32)}]
    feeds[0]["input"][0, 0, 0, 0] = np.nan
    with pytest.raises(BadData, match="NaN or infinite"):
        compress(str(FIXTURES / "mnist_cnn.onnx"), ["prune:ratio=0.3"], calibration=feeds)


def test_huge_calibration_values_never_give_non_finite_weights():
    """A value of 3e38 overflowed the repair's sums: it wrote all-NaN weights, and the gate
    passed on a `rel L2 nan`."""
    rng = np.random.default_rng(0)
    feeds = [{"input": rng.random((8, 1, 28, 28), np.float32)} for _ in range(2)]
    feeds[0]["input"][0, 0, 5, 5] = 3e38
    model, _ = compress(
        str(FIXTURES / "mnist_cnn.onnx"),
        ["prune:ratio=0.3"],
        calibration=feeds,
        options=Options(validate=False),
    )
    for value in model.graph.initializers.values():
        assert np.isfinite(value.const_value.numpy()).all(), value.name


def test_opset_upgrade_keeps_finding_external_data_from_another_folder(tmp_path, monkeypatch):
    """int4:form=dq upgrades the opset; the rebuilt model once looked for its data in the
    working directory (FileNotFoundError), which also bypassed the folder guard."""
    source = _external(tmp_path / "models")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = tmp_path / "out" / "o.onnx"
    result = invoke("compress", source, "-o", out, "-p", "int4:form=dq")
    assert result.exit_code == 0, result.output
    feed = {"X": np.ones((3, 64), np.float32)}
    expected = run(source, feed)[0]
    error = np.linalg.norm(run(out, feed)[0] - expected) / np.linalg.norm(expected)
    assert error < 0.2  # int4 on random weights: close, not exact


def test_a_sparse_initializer_is_kept(tmp_path):
    """It was dropped on load: the original 'could not run', and --no-validate wrote a model
    missing the weight."""
    dense = np.zeros((64, 64), np.float32)
    dense[np.arange(64), np.arange(64)] = np.arange(64, dtype=np.float32)
    indices = np.flatnonzero(dense).astype(np.int64)
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(dense.reshape(-1)[indices], "W"),
        numpy_helper.from_array(indices, "W_indices"),
        [64, 64],
    )
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [3, 64])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, 64])],
        sparse_initializer=[sparse],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = load(proto)
    assert np.array_equal(model.graph.initializers["W"].const_value.numpy(), dense)
    result, report = compress(proto, ["lowrank:rank=64,min_saving=-10"])
    feed = {"X": np.ones((3, 64), np.float32)}
    np.testing.assert_allclose(run(result, feed)[0], feed["X"] @ dense, rtol=1e-5, atol=1e-4)
    assert any("sparse initializer 'W'" in note for note in report.normalization)


def test_in_place_on_a_symlink_writes_through_to_its_target(tmp_path):
    target = tmp_path / "real.onnx"
    onnx.save(matmul_model([3, 64], k=64, n=64), target)
    link = tmp_path / "link.onnx"
    link.symlink_to(target)
    before = sha256(target)
    result = invoke("compress", link, "--in-place", "-p", "int4", "--no-validate")
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert sha256(target) != before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_model_from_bytes_with_external_data_is_refused():
    with pytest.raises(BadModel, match="external data"):
        load(_constant_with_external_data(None, "w.bin").SerializeToString())
