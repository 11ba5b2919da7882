"""Validation metrics on known differences, gates, and where feeds come from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import BadData, Gates, load, validate
from onnxcompress.calibration import load_feeds, parse_dims, synthetic_feeds
from onnxcompress.errors import BadOption
from onnxcompress.validate import gate_failures


def scale_model(scale: float, shift: float = 0.0, shape=("N", 4)) -> onnx.ModelProto:
    """Y = X * scale + shift: a candidate with a known, exact difference from scale=1."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["X", "s"], ["H"]), helper.make_node("Add", ["H", "b"], ["Y"])],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, list(shape))],
        [
            numpy_helper.from_array(np.array(scale, np.float32), "s"),
            numpy_helper.from_array(np.array([shift, 0, 0, 0], np.float32), "b"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_metrics_match_closed_form():
    feeds = [
        {"X": np.random.default_rng(i).standard_normal((5, 4)).astype(np.float32)} for i in range(3)
    ]
    result = validate(load(scale_model(1.0)), load(scale_model(1.1)), feeds, latency_runs=3)
    metrics = result.outputs[0]
    x = np.concatenate([f["X"] for f in feeds])
    assert metrics.rel_l2 == pytest.approx(0.1, rel=1e-5)
    assert metrics.cosine == pytest.approx(1.0, abs=1e-6)
    assert metrics.max_abs == pytest.approx(np.abs(0.1 * x).max(), rel=1e-5)
    assert metrics.mean_abs == pytest.approx(np.abs(0.1 * x).mean(), rel=1e-5)
    assert metrics.top1_agreement == 1.0  # scaling keeps the argmax
    assert metrics.kl > 0
    assert result.latency_ratio is not None and result.feeds == 3


def test_agreement_counts_changed_argmax():
    x = np.array([[0.0, 1.0, 0.5, 0.2], [1.0, 0.0, 0.0, 0.0]], np.float32)
    result = validate(
        load(scale_model(1.0)), load(scale_model(1.0, shift=1.5)), [{"X": x}], latency_runs=0
    )
    assert result.outputs[0].top1_agreement == 0.5  # first row flips to class 0
    assert result.latency_ratio is None


def test_identical_models_have_zero_error():
    feeds = synthetic_feeds(load(scale_model(1.0)), {"N": 2})
    result = validate(load(scale_model(1.0)), load(scale_model(1.0)), feeds, latency_runs=0)
    assert result.outputs[0].rel_l2 == 0 and result.outputs[0].kl == pytest.approx(0, abs=1e-9)


def test_gates_report_each_miss():
    feeds = [{"X": np.ones((2, 4), np.float32)}]
    result = validate(load(scale_model(1.0)), load(scale_model(1.5)), feeds, latency_runs=0)
    assert gate_failures(result, max_rel_error=0.6) == []
    failures = gate_failures(result, max_rel_error=0.1, min_agreement=1.0)
    assert len(failures) == 1 and "relative error 0.5 > 0.1" in failures[0]
    assert gate_failures(result, max_rel_error=0.6, outputs=["Y"]) == []


def test_gates_fail_closed():
    """Issue 11: a gate on an output the model does not have, or a figure that is not a
    number, is a miss (it once passed silently); a NaN or negative threshold is refused."""
    feeds = [{"X": np.ones((2, 4), np.float32)}]
    result = validate(load(scale_model(1.0)), load(scale_model(1.5)), feeds, latency_runs=0)
    assert gate_failures(result, max_rel_error=0.6, outputs=["NOSUCH"]) == [
        "no output named 'NOSUCH'"
    ]
    result.outputs[0].rel_l2 = float("nan")
    (failure,) = gate_failures(result, max_rel_error=0.05)
    assert "relative error nan > 0.05" in failure
    for bad in (float("nan"), float("inf"), -0.1):
        with pytest.raises(BadOption, match="max_rel_error"):
            Gates(max_rel_error=bad)
    with pytest.raises(BadOption, match="min_agreement"):
        Gates(min_agreement=float("nan"))


def test_synthetic_feeds_are_seeded_and_need_every_dim():
    model = load(scale_model(1.0))
    a, b = (
        synthetic_feeds(model, {"N": 3}, samples=2, seed=7),
        synthetic_feeds(model, {"N": 3}, 2, 7),
    )
    assert a[0]["X"].shape == (3, 4) and np.array_equal(a[1]["X"], b[1]["X"])
    assert synthetic_feeds(model, {"X:0": 5})[0]["X"].shape == (5, 4)
    with pytest.raises(BadData, match=r"axis 0 .* --dim N=VALUE"):
        synthetic_feeds(model, {})


def test_npz_and_npy_folder_feeds_are_batched(tmp_path):
    model = load(scale_model(1.0))
    data = np.arange(40, dtype=np.float64).reshape(10, 4)  # float64 is cast to the model's float32
    np.savez(tmp_path / "d.npz", X=data)
    feeds = load_feeds(tmp_path / "d.npz", model, batch_size=4)
    assert [f["X"].shape[0] for f in feeds] == [4, 4, 2] and feeds[0]["X"].dtype == np.float32
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "X.npy", data)
    assert len(load_feeds(folder, model, batch_size=5)) == 2
    other = tmp_path / "batches"
    other.mkdir()
    for i in range(3):
        np.save(other / f"{i}.npy", data[:2])
    assert len(load_feeds(other, model)) == 3


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("kind", ["npy folder", "npz", "compressed npz"])
def test_feeds_are_read_a_batch_at_a_time_and_keep_no_file_mapped(tmp_path, kind):
    """Calibration data is read from its file when a batch is asked for, as an array of its
    own: between uses nothing is held or left mapped (a mapping's pages count as the
    process's memory for as long as it is open), whatever the number of samples."""
    data = np.arange(400, dtype=np.float32).reshape(100, 4)
    if kind == "npy folder":
        source = tmp_path / "data"
        source.mkdir()
        file = source / "X.npy"
        np.save(file, data)
    else:
        source = file = tmp_path / "data.npz"
        (np.savez if kind == "npz" else np.savez_compressed)(file, X=data)
    feeds = load_feeds(source, load(scale_model(1.0)), batch_size=8)
    assert len(feeds) == 13 and str(file) not in Path("/proc/self/maps").read_text()
    last = feeds[12]["X"]
    assert last.flags.owndata and np.array_equal(last, data[96:])
    assert str(file) not in Path("/proc/self/maps").read_text()
    assert np.array_equal(np.concatenate([feed["X"] for feed in feeds[1:3]]), data[8:24])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"Y": np.ones((2, 4))}, "no array for input"),
        ({"X": np.ones((2, 4, 1))}, "has 3 dims"),
        ({"X": np.ones((2, 5))}, "axis 1 is 5"),
        ({"X": np.array([["a"] * 4])}, "data is <U1"),
    ],
)
def test_bad_feeds_are_named(tmp_path, content, message):
    np.savez(tmp_path / "d.npz", **content)
    with pytest.raises(BadData, match=message):
        load_feeds(tmp_path / "d.npz", load(scale_model(1.0)))


def test_pickled_npy_is_refused(tmp_path):
    np.save(tmp_path / "X.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BadData, match="not a readable"):
        load_feeds(tmp_path, load(scale_model(1.0)))


def test_parse_dims():
    assert parse_dims(["N=2", "x:2=48", "p2o.Dim.0=3"]) == {"N": 2, "x:2": 48, "p2o.Dim.0": 3}
    for bad in ("N", "N=0", "N=x", "=3"):
        with pytest.raises(BadData, match="bad --dim"):
            parse_dims([bad])


def test_runner_captures_intermediate_activations_without_changing_outputs(tmp_path):
    from onnxcompress.validate import Runner

    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    model = load(scale_model(2.0, shift=1.0))
    runner = Runner(model, extra_outputs=["H", "Y"])
    (y,) = runner.run({"X": x})
    captured = runner.capture({"X": x})
    assert runner.output_names == ["Y"] and sorted(captured) == ["H", "Y"]
    np.testing.assert_allclose(captured["H"], 2 * x)
    np.testing.assert_allclose(y, captured["Y"])
    path = tmp_path / "m.onnx"
    onnx.save(scale_model(2.0), path)
    assert sorted(Runner(str(path), extra_outputs=["H"]).capture({"X": x})) == ["H"]
    assert list(runner.capture({"X": x}, names=["H"])) == ["H"]  # only the names asked for


def test_with_outputs_opens_the_same_model_with_other_extras(tmp_path):
    from onnxcompress.validate import Runner

    x = np.ones((2, 4), np.float32)
    model = load(scale_model(3.0))
    runner = Runner(model)
    import onnx_ir as ir

    # passes change the working copy; the runner (the teacher) keeps the original
    model.graph.initializers["s"].const_value = ir.tensor(np.array(5.0, np.float32))
    teacher = runner.with_outputs(["H"])
    np.testing.assert_allclose(teacher.capture({"X": x})["H"], 3 * x)
    np.testing.assert_allclose(teacher.run({"X": x})[0], runner.run({"X": x})[0])
    path = tmp_path / "ext.onnx"
    onnx.save(
        scale_model(3.0), path, save_as_external_data=True, size_threshold=0, location="ext.data"
    )
    from_file = Runner(str(path)).with_outputs(["H"])
    np.testing.assert_allclose(from_file.capture({"X": x})["H"], 3 * x)
