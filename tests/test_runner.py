"""onnxruntime sessions: captures run a sample at a time and give the same bits as a whole
batch, shapes are read without the values, sessions let their memory go."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.errors import CannotRun
from onnxcompress.passes.quant.ranges import collect
from onnxcompress.runner import Runner, observe_shapes
from onnxcompress.stats import captured, captured_parts

WIDTH, LAYERS = 32, 12


def chain_model() -> onnx.ModelProto:
    """X [N, 32] through 12 x (MatMul, Relu), and Shape(X): 24 activations of N rows and one
    value that is not a sample (its length is the batch's rank)."""
    rng = np.random.default_rng(0)
    nodes, weights, last = [], [], "X"
    for i in range(LAYERS):
        weight = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        weights.append(numpy_helper.from_array(weight, f"W{i}"))
        nodes += [
            helper.make_node("MatMul", [last, f"W{i}"], [f"m{i}"]),
            helper.make_node("Relu", [f"m{i}"], [f"r{i}"]),
        ]
        last = f"r{i}"
    nodes += [helper.make_node("Identity", [last], ["Y"]), helper.make_node("Shape", ["X"], ["S"])]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", WIDTH])],
        [
            helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", WIDTH]),
            helper.make_tensor_value_info("S", TensorProto.INT64, [2]),
        ],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


ACTIVATIONS = [f"{kind}{i}" for i in range(LAYERS) for kind in ("m", "r")]


def feeds(count: int, batch: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"X": rng.standard_normal((batch, WIDTH)).astype(np.float32)} for _ in range(count)]


def whole_batch(names: list[str], feed) -> dict[str, np.ndarray]:
    """The values as one onnxruntime session exposing them all gives them on the whole feed
    (what captures did before they went a sample at a time)."""
    proto = chain_model()
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, feed)))


@pytest.fixture
def samples_per_run(monkeypatch) -> list[int]:
    """The number of samples of every onnxruntime run made while capturing."""
    seen: list[int] = []
    run = Runner._run

    def counting(self, names, feed):
        if self.extra_outputs:
            seen.append(len(next(iter(feed.values()))))
        return run(self, names, feed)

    monkeypatch.setattr(Runner, "_run", counting)
    return seen


def test_calibration_holds_one_sample_of_activations_however_large_the_batch(samples_per_run):
    """Every activation of every sample of a batch at once is what took capture to a GB: a
    statistics sweep runs and holds one sample at a time, and lets it go before the next."""
    model, data = ir.from_proto(chain_model()), feeds(3, batch=16)
    held, previous = [], None
    for _, values in captured_parts(model, ACTIVATIONS, data):
        if previous is not None:
            assert previous == {}, "a part is let go when the next is asked for"
        held.append(max(len(a) for a in values.values()))
        previous = values
    assert held == [1] * 48 and set(samples_per_run) == {1}
    stats = collect(model, ACTIVATIONS, data, histograms=True)
    batches = [whole_batch(ACTIVATIONS, feed) for feed in data]
    for name in ACTIVATIONS:  # the same ranges and histograms as the whole batches give
        values = np.concatenate([batch[name] for batch in batches])
        assert (stats[name].lo, stats[name].hi) == (values.min(), values.max())
        assert stats[name].hist.sum() + stats[name].zeros == values.size


def test_a_whole_capture_joins_samples_into_the_same_bits(samples_per_run):
    model, feed = ir.from_proto(chain_model()), feeds(1, batch=8)[0]
    names = [*ACTIVATIONS, "S"]
    with Runner(model, extra_outputs=names) as runner:
        got = runner.capture(feed, ["m3", "r11", "X"])
    expected = whole_batch(names, feed)
    assert np.array_equal(got["m3"], expected["m3"]) and np.array_equal(got["r11"], expected["r11"])
    assert got["X"] is feed["X"] and set(samples_per_run) == {1}
    # a value that is not one per sample (Shape) cannot be joined: the feed runs whole
    with Runner(model, extra_outputs=names) as runner:
        whole = runner.capture(feed, ["S", "r0"])
    assert whole["S"].tolist() == [8, WIDTH] and np.array_equal(whole["r0"], expected["r0"])
    assert next(captured(model, ["S"], [feed]))["S"].tolist() == [8, WIDTH]


def test_identical_samples_are_not_mistaken_for_a_constant(samples_per_run):
    """Two parts that agree may be a constant: the feed then runs whole, with the same result."""
    model = ir.from_proto(chain_model())
    feed = {"X": np.ones((4, WIDTH), np.float32)}
    with Runner(model, extra_outputs=ACTIVATIONS) as runner:
        got = runner.capture(feed, ["r5"])
    expected = whole_batch(ACTIVATIONS, feed)["r5"]
    assert np.array_equal(got["r5"], expected) and 4 in samples_per_run


def test_a_fixed_batch_runs_whole(samples_per_run):
    proto = chain_model()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    model, feed = ir.from_proto(proto), feeds(1, batch=4)[0]
    for _, values in captured_parts(model, ACTIVATIONS, [feed]):
        assert len(values["r0"]) == 4
    assert set(samples_per_run) == {4}


def test_observed_shapes_are_read_without_the_values():
    model, feed = ir.from_proto(chain_model()), feeds(1, batch=5)[0]
    assert observe_shapes(model, feed, ["m0", "r11", "X"]) == {
        "m0": (5, WIDTH),
        "r11": (5, WIDTH),
        "X": (5, WIDTH),
    }
    with Runner(model, extra_outputs=["m0", "r11"], shapes_only=True) as runner:
        read = runner.capture(feed)
    assert all(value.dtype == np.int64 and value.shape == (2,) for value in read.values())


def test_a_released_session_reopens_and_a_closed_one_refuses():
    model, feed = ir.from_proto(chain_model()), feeds(1, batch=2)[0]
    runner = Runner(model)
    before = runner.run(feed)[0]
    runner.release()
    assert runner.session is None
    assert np.array_equal(runner.run(feed)[0], before) and runner.session is not None
    folder = Path(runner._origin).parent  # the model's temporary file and its weights
    runner.close()
    assert not folder.exists()
    with pytest.raises(CannotRun, match="closed"):
        runner.run(feed)


def test_an_unclosed_runner_leaves_no_temporary_files():
    runner = Runner(ir.from_proto(chain_model()))
    folder = Path(runner._origin).parent
    assert folder.exists()
    del runner
    gc.collect()
    assert not folder.exists()


def test_the_sweep_makes_the_next_part_ahead_in_order_and_raises_its_failures_here():
    from onnxcompress.stats import _one_ahead

    assert list(_one_ahead(iter(range(50)))) == list(range(50))

    def failing():
        yield 1
        raise CannotRun("onnxruntime failed to run: boom")

    with pytest.raises(CannotRun, match="boom"):
        list(_one_ahead(failing()))

    made = []

    def endless():
        while True:
            made.append(len(made))
            yield made[-1]

    ahead = _one_ahead(endless())
    assert [next(ahead) for _ in range(3)] == [0, 1, 2]
    ahead.close()  # the caller stops early: the thread stops too
    count = len(made)
    assert count <= 6 and len(made) == count
