"""Model I/O: every source kind, external data, the traversal guard, atomic saves, metadata."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from onnxcompress import BadModel, compress, model_io
from onnxcompress.pipeline import Options
from tests.conftest import run
from tests.passes.lowrank.test_lowrank import matmul_model

RANK2 = ["lowrank:rank=2"]
NO_VALIDATE = Options(validate=False)


def _model_with_metadata() -> onnx.ModelProto:
    proto = matmul_model([3, 64], k=64, n=64)
    proto.producer_name, proto.producer_version, proto.model_version = "exporter", "9.9", 7
    proto.doc_string = "a model"
    proto.graph.doc_string = "its graph"
    helper.set_model_props(proto, {"character": "abc", "author": "someone"})
    return proto


def test_every_source_kind_comes_back_in_kind(tmp_path):
    import onnx_graphsurgeon as gs

    proto = _model_with_metadata()
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    cases = {
        "path": (str(path), ir.Model),
        "bytes": (proto.SerializeToString(), bytes),
        "proto": (proto, onnx.ModelProto),
        "ir": (ir.from_proto(proto), ir.Model),
        "graphsurgeon": (gs.import_onnx(proto), gs.Graph),
    }
    for kind, (source, expected_type) in cases.items():
        result, report = compress(source, RANK2, options=NO_VALIDATE)
        assert isinstance(result, expected_type), kind
        assert report.passes[0].rewritten, kind


def test_metadata_docstrings_producer_and_names_are_kept():
    proto = _model_with_metadata()
    result, _ = compress(proto, RANK2, options=NO_VALIDATE)
    props = {p.key: p.value for p in result.metadata_props}
    assert props["character"] == "abc" and props["author"] == "someone"
    assert "onnxcompress.recipe" in props
    assert (result.producer_name, result.producer_version) == ("exporter", "9.9")
    assert result.model_version == 7 and result.doc_string == "a model"
    assert result.graph.doc_string == "its graph"
    assert [i.name for i in result.graph.input] == ["X"]
    assert [o.name for o in result.graph.output] == ["Y"]
    assert [(o.domain, o.version) for o in result.opset_import] == [("", 17)]


def _save_external(proto: onnx.ModelProto, folder, location="m.onnx.data"):
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(
        proto,
        folder / "m.onnx",
        save_as_external_data=True,
        location=location,
        size_threshold=0,
    )
    return folder / "m.onnx"


def test_external_data_round_trips_and_stays_external(tmp_path):
    proto = _model_with_metadata()
    src = _save_external(proto, tmp_path / "in")
    loaded = model_io.load(src)
    assert loaded.uses_external_data
    out = tmp_path / "out" / "small.onnx"
    written = model_io.save(loaded.model, out)
    assert [p.name for p in written] == ["small.onnx", "small.onnx.data"]
    feed = {"X": np.ones((3, 64), np.float32)}
    expected = run(_model_with_metadata(), feed)[0]  # onnx.save made ``proto`` external
    np.testing.assert_allclose(run(out, feed)[0], expected, rtol=1e-6)
    assert not list(out.parent.glob(".onnxcompress-*")), "temporary folder left behind"


def test_large_model_path_uses_external_data_above_threshold(tmp_path):
    """A > 2 GiB model must go to external data; a small threshold simulates the size."""
    model = ir.from_proto(_model_with_metadata())
    out = tmp_path / "big.onnx"
    model_io.save(model, out, external_threshold=1000)
    assert (tmp_path / "big.onnx.data").stat().st_size >= 64 * 64 * 4
    assert os.path.getsize(out) < 2000
    reloaded = model_io.load(out)
    assert reloaded.uses_external_data
    np.testing.assert_array_equal(
        reloaded.model.graph.initializers["W"].const_value.numpy(),
        numpy_helper.to_array(_model_with_metadata().graph.initializer[0]),
    )


def test_saving_over_the_input_in_place_keeps_mapped_weights_valid(tmp_path):
    src = _save_external(_model_with_metadata(), tmp_path)
    loaded = model_io.load(src)
    model_io.save(loaded.model, src)  # replaces both files atomically
    assert model_io.load(src).uses_external_data
    run(src, {"X": np.ones((3, 64), np.float32)})


@pytest.mark.parametrize("location", ["../outside.data", "/etc/passwd", "link/outside.data"])
def test_external_data_outside_the_folder_is_refused(tmp_path, location):
    outside = tmp_path / "outside.data"
    outside.write_bytes(b"\0" * 64 * 64 * 4)
    folder = tmp_path / "model"
    (folder / "link").parent.mkdir(parents=True, exist_ok=True)
    os.symlink(tmp_path, folder / "link")
    proto = _model_with_metadata()
    tensor = proto.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(64 * 64 * 4))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    path = folder / "m.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(BadModel, match=r"absolute|outside the model's folder"):
        model_io.load(path)


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    model = ir.from_proto(_model_with_metadata())
    out = tmp_path / "out.onnx"

    def broken_save(model, path, **kwargs):
        with open(path, "wb") as stream:
            stream.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(model_io.ir, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        model_io.save(model, out)
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous")
    monkeypatch.setattr(model_io.ir, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(OSError):
        model_io.save(ir.from_proto(_model_with_metadata()), out)
    assert out.read_bytes() == b"previous"
