"""The command line: bad inputs give one clear line and exit 2 with nothing written and the
input untouched; gates exit 1; batch goes on past a broken model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.cli import main
from tests.conftest import parse, run, sha256
from tests.passes.lowrank.test_lowrank import matmul_model

LOWRANK = ["-p", "lowrank:rank=2"]


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_clear_line(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.onnx"
    onnx.save(matmul_model([3, 64], k=64, n=64), path)
    return path


def _custom_op_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "W")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "W"], ["H"], name="mm"),
            helper.make_node("Foo", ["H"], ["Y"], name="custom", domain="my.ops"),
        ],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [3, 64])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, 64])],
        [w],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("my.ops", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _bad_inputs(tmp_path, good_bytes: bytes) -> dict[str, tuple]:
    """name -> (path to give, fragment of the expected message)."""
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "empty.onnx").write_bytes(b"")
    (folder / "random.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    (folder / "truncated.onnx").write_bytes(good_bytes[: len(good_bytes) // 2])
    (folder / "dir.onnx").mkdir()
    proto = onnx.load_from_string(good_bytes)
    tensor = proto.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../../secret.bin"), ("offset", "0"), ("length", "16384")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    (folder / "escape.onnx").write_bytes(proto.SerializeToString())
    old = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["X"], ["Y"])],
            "g",
            [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2])],
        ),
        opset_imports=[helper.make_opsetid("", 5)],
    )
    (folder / "opset5.onnx").write_bytes(old.SerializeToString())
    return {
        "missing": (folder / "nope.onnx", "no such file"),
        "directory": (folder / "dir.onnx", "is a directory"),
        "empty": (folder / "empty.onnx", "is empty"),
        "random bytes": (folder / "random.onnx", "not an ONNX model"),
        "truncated": (folder / "truncated.onnx", "truncated"),
        "external data outside": (folder / "escape.onnx", "outside the model's folder"),
        "unsupported opset": (folder / "opset5.onnx", "unsupported opset 5"),
    }


BAD_NAMES = [
    "missing",
    "directory",
    "empty",
    "random bytes",
    "truncated",
    "external data outside",
    "unsupported opset",
]


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("command", ["compress", "inspect", "validate"])
def test_bad_input_gives_one_line_exit_2_and_writes_nothing(tmp_path, good, name, command):
    path, fragment = _bad_inputs(tmp_path, good.read_bytes())[name]
    before = sha256(path) if path.is_file() else None
    out = tmp_path / "out.onnx"
    if command == "compress":
        result = invoke("compress", path, "-o", out, *LOWRANK)
    elif command == "inspect":
        result = invoke("inspect", path)
    else:
        result = invoke("validate", good, path)
    assert_one_clear_line(result, 2, fragment)
    assert not out.exists()
    if before is not None:
        assert sha256(path) == before
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".onnxcompress")]
    assert not leftovers


def test_symbolic_dim_without_value_names_the_fix(tmp_path):
    """A dynamic batch (axis 0) defaults to 1; any other symbolic size needs --dim."""
    path = tmp_path / "dyn.onnx"
    onnx.save(matmul_model(["N", "T", 64], k=64, n=64), path)
    before = sha256(path)
    result = invoke("compress", path, "-o", tmp_path / "o.onnx", *LOWRANK)
    assert_one_clear_line(result, 2, "input 'X' axis 1", "--dim T=VALUE")
    assert not (tmp_path / "o.onnx").exists() and sha256(path) == before
    result = invoke("compress", path, "-o", tmp_path / "o.onnx", *LOWRANK, "--dim", "T=2")
    assert result.exit_code == 0, result.output


def test_a_dynamic_batch_needs_no_flag(tmp_path):
    """Issue 11: torch exports with a dynamic batch once needed --dim N=1 for inspect and for
    compress without data; the batch now defaults to 1, said once in the report."""
    path = tmp_path / "dyn.onnx"
    onnx.save(matmul_model(["N", 64], k=64, n=64), path)
    result = invoke("inspect", path)
    assert result.exit_code == 0, result.output
    assert "batch axis (N) set to 1" in result.output
    report = tmp_path / "r.json"
    result = invoke("compress", path, "-o", tmp_path / "o.onnx", *LOWRANK, "--report", report)
    assert result.exit_code == 0, result.output
    notes = json.loads(report.read_text())["normalization"]
    assert sum("batch axis (N) set to 1" in note for note in notes) == 1
    assert json.loads(report.read_text())["before"]["macs"] == 64 * 64


def test_weight_that_is_a_graph_input_is_skipped_with_reason(tmp_path):
    path = tmp_path / "w_input.onnx"
    onnx.save(
        parse(
            """<ir_version: 8, opset_import: ["" : 17]>
            g (float[4, 64] X, float[64, 64] W) => (float[4, 64] Y) { Y = MatMul(X, W) }"""
        ),
        path,
    )
    before = sha256(path)
    out = tmp_path / "o.onnx"
    result = invoke("compress", path, "-o", out, *LOWRANK, "--json")
    assert result.exit_code == 0, result.output
    layer = json.loads(result.stdout)["passes"][0]["layers"][0]
    assert (
        layer["action"] == "skipped"
        and layer["reason"] == "weight is a graph input (not a constant)"
    )
    assert sha256(path) == before


def test_custom_op_is_left_alone_and_validation_says_it_cannot_run(tmp_path, good):
    path = tmp_path / "custom.onnx"
    onnx.save(_custom_op_model(), path)
    before = sha256(path)
    out = tmp_path / "o.onnx"
    result = invoke("compress", path, "-o", out, *LOWRANK)
    assert_one_clear_line(result, 2, "onnxruntime cannot run", "my.ops", "--no-validate")
    assert not out.exists()
    result = invoke("compress", path, "-o", out, *LOWRANK, "--no-validate", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert any("custom op my.ops::Foo" in note for note in report["normalization"])
    assert report["passes"][0]["layers"][0]["action"] == "rewritten"
    assert [n.op_type for n in onnx.load(out).graph.node] == ["MatMul", "MatMul", "Foo"]
    result = invoke("validate", path, out)
    assert_one_clear_line(result, 2, "onnxruntime cannot run the reference model")
    assert sha256(path) == before


def test_gate_miss_exits_1_and_writes_nothing_unless_keep_failed(tmp_path, good):
    out = tmp_path / "o.onnx"
    report = tmp_path / "r.json"
    args = ["compress", good, "-o", out, *LOWRANK, "--max-rel-error", "1e-6", "--report", report]
    result = invoke(*args)
    assert result.exit_code == 1 and "gate missed" in result.stderr
    assert "relative error" in result.stderr and "nothing written" in result.stderr
    assert not out.exists()
    assert json.loads(report.read_text())["gates"]["passed"] is False
    result = invoke(*args, "--keep-failed")
    assert result.exit_code == 1 and out.exists()


def test_compress_prints_report_and_json_report(tmp_path, good):
    out, report_path = tmp_path / "o.onnx", tmp_path / "r.json"
    result = invoke(
        "compress", good, "-o", out, *LOWRANK, "--report", report_path, "--max-rel-error", "2"
    )
    assert result.exit_code == 0, result.output
    assert "pass lowrank" in result.stdout and "validation on 8 feed(s)" in result.stdout
    report = json.loads(report_path.read_text())
    assert report["schema"] == "onnxcompress.report/1"
    assert report["before"]["params"] == 64 * 64 and report["after"]["params"] == 2 * 128
    assert report["after"]["file_bytes"] == out.stat().st_size
    assert report["gates"] == {"max_rel_error": 2.0, "passed": True, "failures": []}


def test_refuses_to_overwrite_input_without_in_place(tmp_path, good):
    before = sha256(good)
    result = invoke("compress", good, "-o", good, *LOWRANK)
    assert result.exit_code == 2 and "--in-place" in result.output
    assert sha256(good) == before
    result = invoke("compress", good, "--in-place", *LOWRANK)
    assert result.exit_code == 0 and sha256(good) != before


def test_external_data_model_round_trips_through_compress(tmp_path):
    src = tmp_path / "in" / "m.onnx"
    src.parent.mkdir()
    onnx.save(
        matmul_model([3, 64], k=64, n=64),
        src,
        save_as_external_data=True,
        location="m.onnx.data",
        size_threshold=0,
    )
    hashes = (sha256(src), sha256(src.parent / "m.onnx.data"))
    out = tmp_path / "out" / "c.onnx"
    result = invoke("compress", src, "-o", out, *LOWRANK)
    assert result.exit_code == 0, result.output
    assert (out.parent / "c.onnx.data").exists()
    assert (sha256(src), sha256(src.parent / "m.onnx.data")) == hashes
    feed = {"X": np.ones((3, 64), np.float32)}
    assert run(out, feed)[0].shape == (3, 64)


def test_recipe_files_toml_and_json(tmp_path, good):
    toml = tmp_path / "r.toml"
    toml.write_text('[[passes]]\nname = "lowrank"\nrank = 2\nexclude = ["nothing*"]\n')
    js = tmp_path / "r.json"
    js.write_text(json.dumps({"passes": [{"name": "lowrank", "rank": 2}]}))
    for recipe in (toml, js):
        result = invoke("compress", good, "-o", tmp_path / "o.onnx", "--recipe", recipe)
        assert result.exit_code == 0, result.output
        assert "rank=2" in result.stdout
    js.write_text(json.dumps({"passes": [{"name": "lowrank", "rnak": 2}]}))
    result = invoke("compress", good, "-o", tmp_path / "o.onnx", "--recipe", js)
    assert_one_clear_line(result, 2, "unknown option 'rnak'")


def test_batch_converts_good_models_and_reports_the_corrupt_one(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    for i in range(3):
        onnx.save(matmul_model([3, 64], k=64, n=64 + i), folder / f"m{i}.onnx")
    (folder / "corrupt.onnx").write_bytes(b"\x08\x07garbage" * 20)
    out = tmp_path / "out"
    result = invoke("batch", folder, "-o", out, *LOWRANK)
    assert result.exit_code == 1, result.output
    summary = json.loads((out / "summary.json").read_text())["models"]
    status = {entry["model"].split("/")[-1]: entry["status"] for entry in summary}
    assert status == {"corrupt.onnx": "failed", "m0.onnx": "ok", "m1.onnx": "ok", "m2.onnx": "ok"}
    assert sorted(p.name for p in out.glob("*.onnx")) == ["m0.onnx", "m1.onnx", "m2.onnx"]
    assert len(list(out.glob("*.report.json"))) == 3
    assert "1 of 4 models failed" in result.stderr


def test_batch_in_parallel_gives_the_same_result(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    for i in range(2):
        onnx.save(matmul_model([3, 64], k=64, n=64 + i), folder / f"m{i}.onnx")
    result = invoke(
        "batch", str(folder / "*.onnx"), "-o", tmp_path / "out", *LOWRANK, "--jobs", "2"
    )
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "out").glob("*.onnx"))) == 2


def test_inspect_and_passes_commands(good):
    result = invoke("inspect", good, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["params"] == 64 * 64 and "lowrank" in data["layers"][0]["passes"]
    assert data["macs"] == 3 * 64 * 64
    result = invoke("passes")
    assert "lowrank:" in result.stdout and "min_saving = 0.1" in result.stdout


def test_usage_errors_exit_2(good, tmp_path):
    assert invoke("compress", good, *LOWRANK).exit_code == 2  # no -o
    assert invoke("compress", good, "-o", tmp_path / "o.onnx").exit_code == 2  # no passes
    result = invoke("compress", good, "-o", tmp_path / "o.onnx", "--dim", "N=x", *LOWRANK)
    assert_one_clear_line(result, 2, "bad --dim")


def test_a_pass_that_breaks_the_graph_stops_the_run_naming_it(tmp_path, good, monkeypatch):
    """Exit 3, the pass and the failing node named, nothing written."""
    import onnx_ir as ir

    from onnxcompress.passes import PASSES
    from onnxcompress.passes.lowrank import LowRank

    class Broken(LowRank):
        def run(self, model, ctx):
            report = super().run(model, ctx)
            node = next(n for n in model.graph if n.op_type == "MatMul")
            node.replace_input_with(1, _bad_weight(model))  # 5x5 where 2 rows are needed
            return report

    def _bad_weight(model):
        value = ir.Value(name="bad", const_value=ir.tensor(np.ones((5, 5), np.float32)))
        value.shape, value.dtype = ir.Shape([5, 5]), ir.DataType.FLOAT
        model.graph.register_initializer(value)
        return value

    monkeypatch.setitem(PASSES, "lowrank", Broken)
    out = tmp_path / "o.onnx"
    result = invoke("compress", good, "-o", out, *LOWRANK)
    assert_one_clear_line(result, 3, "pass lowrank broke the", "MatMul")
    assert not out.exists()


def test_compress_validates_on_separate_data_when_given(tmp_path, good):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", X=rng.standard_normal((6, 3, 64)).astype(np.float32)[:, 0])
    np.savez(tmp_path / "held.npz", X=rng.standard_normal((12, 64)).astype(np.float32))
    result = invoke(
        "compress",
        good,
        "-o",
        tmp_path / "o.onnx",
        *LOWRANK,
        "--json",
        "--calibration",
        tmp_path / "calib.npz",
        "--data",
        tmp_path / "held.npz",
        "--batch-size",
        "3",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["validation"]["feeds"] == 4  # 12 held-out rows by 3


def test_with_calibration_data_the_report_shows_each_layer_output_error(tmp_path, good):
    np.savez(tmp_path / "calib.npz", X=np.random.default_rng(0).standard_normal((6, 64)))
    args = ["compress", good, "-o", tmp_path / "o.onnx", *LOWRANK, "--batch-size", "3"]
    plain = invoke(*args)
    assert plain.exit_code == 0 and "output err" not in plain.stdout
    measured = invoke(*args, "--calibration", tmp_path / "calib.npz")
    assert measured.exit_code == 0, measured.output
    header = next(line for line in measured.stdout.splitlines() if line.startswith("layer"))
    assert header.split()[-2:] == ["output", "err"]
