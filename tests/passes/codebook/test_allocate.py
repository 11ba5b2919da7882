"""granularity=auto: choices measured per weight, gains, the budget (bits or size)."""

from __future__ import annotations

import io
import itertools
import time

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxcompress import compress
from onnxcompress.errors import RecipeError
from onnxcompress.passes.codebook.allocate import (
    Choice,
    LayerChoices,
    allocate,
    group_counts,
    grouped_rows,
    measure_choices,
    stored_bytes,
    target_bytes,
    ungrouped,
)
from onnxcompress.passes.codebook.fit import fit_scalar, quantized_rows
from tests.conftest import run
from tests.passes.codebook.models import (
    NO_VALIDATE,
    conv_model,
    decoded_weight,
    matmul_model,
    random_feed,
)


def _spread_channels(channels: int, fan_in: int, seed: int) -> np.ndarray:
    """A 1×1 conv weight whose output channels span four orders of magnitude (what dead
    and live channels of a trained mobile network look like)."""
    rng = np.random.default_rng(seed)
    scales = 10.0 ** rng.uniform(-3, 1, channels)
    return (rng.standard_normal((channels, fan_in)) * scales[:, None]).reshape(
        channels, fan_in, 1, 1
    )


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


# --- the measuring pieces -------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 4, 16, 64])
def test_vectorized_kmeans_matches_the_row_by_row_fit(k):
    rows = np.random.default_rng(k).standard_normal((12, 300))
    fast = quantized_rows(rows, k)
    slow = fit_scalar(rows, k, zero_share=0).decode()
    assert np.square(fast - rows).mean() == pytest.approx(np.square(slow - rows).mean(), rel=0.02)
    assert all(len(np.unique(row)) <= k for row in fast)


def test_vectorized_kmeans_edge_rows():
    constant = np.full((3, 50), 0.25)
    np.testing.assert_array_equal(quantized_rows(constant, 4), constant)
    few = np.random.default_rng(0).standard_normal((2, 9))
    np.testing.assert_array_equal(quantized_rows(few, 16), few)  # k >= values: exact


def test_sorted_groups_round_trip_and_group_counts():
    rows = np.random.default_rng(1).standard_normal((48, 5)) * np.arange(1, 49)[::-1, None]
    grouped, order = grouped_rows(rows, 4)
    assert grouped.shape == (4, 60) and order is not None
    np.testing.assert_array_equal(ungrouped(grouped, order, rows.shape), rows)
    spans = [np.abs(g).max() for g in grouped]
    assert spans == sorted(spans)  # channels of similar range share a codebook
    assert group_counts(48) == [1, 4, 16, 48]
    assert group_counts(1) == [1]


def test_allocation_fits_the_budget_and_pays_for_the_sensitive_layer():
    def layer(name, gain):
        choices = [Choice(b, 1, 1000 * b, 4.0**-b) for b in range(1, 9)]
        return LayerChoices(name, choices, gain=gain)

    layers = [layer("quiet", 0.01), layer("loud", 10.0)]
    plan, fits = allocate(layers, budget=8000)
    assert fits and sum(c.nbytes for c in plan.values()) <= 8000
    assert plan["loud"].bits > plan["quiet"].bits
    plan, fits = allocate(layers, budget=10)
    assert not fits and all(c.bits == 1 for c in plan.values())


def test_target_bytes_parses_ratios_and_sizes():
    assert target_bytes("8x", 800) == 100
    assert target_bytes("2.5MB", 1) == 2.5e6
    assert target_bytes("900kb", 1) == 9e5
    assert target_bytes("1234", 1) == 1234
    with pytest.raises(ValueError, match="size='eight'"):
        target_bytes("eight", 1)


def test_measured_bytes_are_what_the_pass_stores():
    w = _spread_channels(64, 16, seed=2)
    _, report = compress(conv_model(w), ["codebook:bits=4"], options=NO_VALIDATE)
    layer = report.passes[0].layers[0]
    detail = layer.detail
    groups = {"tensor": 1, "channel": 64}.get(detail["granularity"])
    groups = groups or int(detail["granularity"].split()[0])
    stored = detail["indices_bytes"] + detail["codebook_bytes"] + detail.get("order_bytes", 0)
    assert stored == stored_bytes((64, 16), groups, detail["bits"], 4)


# --- the pass -------------------------------------------------------------------------------


def test_auto_is_never_worse_than_the_byte_rule_for_the_same_bytes():
    """The byte-only rule gave this small-fan-in layer one codebook (granularity=channel
    falls back to tensor: 64 codebooks of 16 outweigh 16 indices a channel); auto weighs
    that choice among the others, so for the same bytes its error is no larger."""
    w = _spread_channels(64, 16, seed=3)
    proto = conv_model(w)
    _, old_report = compress(proto, ["codebook:bits=4,granularity=channel"], options=NO_VALIDATE)
    old_layer = old_report.passes[0].layers[0]
    assert old_layer.detail["granularity"].startswith("tensor (per-channel")
    stored = old_layer.detail["indices_bytes"] + old_layer.detail["codebook_bytes"]
    for bits in (stored * 8 / w.size, stored * 8 / w.size + 0.5):
        _, report = compress(proto, [f"codebook:bits={bits}"], options=NO_VALIDATE)
        layer = report.passes[0].layers[0]
        spent = sum(layer.detail.get(k, 0) for k in ("indices_bytes", "codebook_bytes"))
        assert spent + layer.detail.get("order_bytes", 0) <= bits * w.size / 8
        assert layer.weight_error <= old_layer.weight_error * 1.001


def test_sorted_groups_decode_to_the_reported_weight():
    """Channels in four range bands: groups of channels sorted by range are the cheap fit,
    and the decoder must put the channels back in their stored order."""
    rng = np.random.default_rng(4)
    bands = np.repeat([0.01, 0.1, 1.0, 10.0], 16)
    rng.shuffle(bands)
    w = rng.standard_normal((64, 32)) * bands[:, None]
    proto = conv_model(w.reshape(64, 32, 1, 1))
    result, report = compress(proto, ["codebook:bits=3"], options=NO_VALIDATE)
    layer = report.passes[0].layers[0]
    assert layer.detail["granularity"].endswith("groups"), layer.detail
    model = ir.from_proto(result)
    assert "Gather" in [node.op_type for node in model.graph]
    decoded = decoded_weight(model).reshape(64, 32)
    assert _relative(decoded, w) == pytest.approx(layer.weight_error, rel=1e-4)
    per_channel = np.linalg.norm(decoded - w, axis=1) / np.linalg.norm(w, axis=1)
    assert per_channel.max() < 0.6  # every band kept (one codebook: 1.0 for the small)


def test_exact_when_the_budget_allows_it():
    values = np.linspace(-1, 1, 16)
    w = np.random.default_rng(5).choice(values, (128, 64))
    proto = matmul_model(w)
    result, report = compress(proto, ["codebook:bits=8"], options=NO_VALIDATE)
    assert report.passes[0].layers[0].detail["bits"] <= 4  # 16 values need no more
    feed = random_feed(proto)
    np.testing.assert_allclose(run(result, feed)[0], run(proto, feed)[0], rtol=1e-5, atol=1e-5)


def test_average_bits_budget_holds_over_layers():
    rng = np.random.default_rng(6)
    shapes = [(256, 64), (64, 32)]
    proto = _two_matmuls([rng.standard_normal(s) for s in shapes])
    _, report = compress(proto, ["codebook:bits=3"], options=NO_VALIDATE)
    layers = [layer for layer in report.passes[0].layers if layer.action == "rewritten"]
    kinds = ("indices_bytes", "codebook_bytes", "order_bytes")
    stored = sum(layer.detail.get(kind, 0) for layer in layers for kind in kinds)
    assert stored <= sum(a * b for a, b in shapes) * 3 / 8
    assert {layer.detail["bits"] for layer in layers} <= set(range(1, 9))
    assert any("3 bits per weight on average" in note for note in report.passes[0].notes)


def test_size_target_is_met_within_5_percent():
    rng = np.random.default_rng(7)
    proto = _two_matmuls([rng.standard_normal((512, 256)), rng.standard_normal((256, 64))])
    before = len(proto.SerializeToString())
    result, _ = compress(proto, ["codebook:size=8x"], options=NO_VALIDATE)
    ratio = before / len(result.SerializeToString())
    assert 8 * 0.95 <= ratio <= 8 * 1.05, ratio


def test_gain_of_an_output_layer_is_about_one_with_data():
    """The model's output is the layer's output: the measured gain must say so."""
    rng = np.random.default_rng(8)
    proto = matmul_model(rng.standard_normal((64, 32)), rows=64)
    feeds = [{"X": rng.standard_normal((64, 64)).astype(np.float32)} for _ in range(4)]
    _, report = compress(proto, ["codebook:bits=3"], feeds, options=NO_VALIDATE)
    detail = report.passes[0].layers[0].detail
    assert detail["predicted_output_error"] == pytest.approx(detail["layer_error"], rel=0.25)
    assert any("gain to the outputs" in note for note in report.passes[0].notes)


def test_without_data_every_gain_is_one():
    proto = matmul_model(np.random.default_rng(9).standard_normal((64, 32)))
    _, report = compress(proto, ["codebook:bits=3"], options=NO_VALIDATE)
    detail = report.passes[0].layers[0].detail
    assert detail["predicted_output_error"] == detail["layer_error"]
    assert any("weighed alike" in note for note in report.passes[0].notes)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("codebook:bits=4.5,granularity=channel", "an average needs granularity=auto"),
        ("codebook:size=8x,bits=4", "bits .an average. or size, not both"),
        ("codebook:size=eight", "size='eight'"),
        ("codebook:size=8x,granularity=tensor", "size goes with granularity=auto"),
    ],
)
def test_bad_budget_options_are_rejected(option, message):
    with pytest.raises(RecipeError, match=message):
        compress(matmul_model(np.ones((64, 64))), [option], options=NO_VALIDATE)


def _two_matmuls(weights: list[np.ndarray]) -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    k, n = weights[0].shape[0], weights[1].shape[1]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "W1"], ["H"], name="/fc1/MatMul"),
            helper.make_node("MatMul", ["H", "W2"], ["Y"], name="/fc2/MatMul"),
        ],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [4, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4, n])],
        [numpy_helper.from_array(w.astype(np.float32), f"W{i + 1}") for i, w in enumerate(weights)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, io.BytesIO())  # a valid proto
    return model


def test_measure_choices_covers_every_width_and_granularity():
    rows = np.random.default_rng(10).standard_normal((16, 200))
    layer = measure_choices("W", rows, None, 4, float_bytes=rows.size * 4)
    kinds = {(c.bits, c.groups) for c in layer.choices}
    assert {(None, 0), (2, 1), (8, 1), (4, 4), (4, 16)} <= kinds
    assert (5, 16) not in kinds  # 16 codebooks of 32 outweigh the indices: not weighed
    assert (1, 1) not in kinds  # a 1-bit codebook loses a third of the output: not weighed
    errors = [c.error for c in layer.choices if c.groups == 16]
    assert len(errors) == 3 and all(a > b for a, b in itertools.pairwise(errors))
    assert max(c.error for c in layer.choices) <= 0.15


def test_large_weights_are_weighed_on_a_sample_of_columns(monkeypatch):
    import onnxcompress.passes.codebook.allocate as allocate_module

    rows = np.random.default_rng(11).standard_normal((16, 4000)) * np.arange(1, 17)[:, None]
    full = measure_choices("W", rows, None, 4)
    monkeypatch.setattr(allocate_module, "MEASURED_VALUES", 16_000)
    sampled = measure_choices("W", rows, None, 4)
    assert [c.nbytes for c in sampled.choices] == [c.nbytes for c in full.choices]
    for a, b in zip(full.choices, sampled.choices):
        if a.bits is not None and a.bits <= 4:  # wider codebooks fit a sample's tails closer
            assert b.error == pytest.approx(a.error, rel=0.25)


def test_a_failure_while_weighing_stops_the_probes_running_beside_it(monkeypatch):
    """The gains are probed in a thread while the choices are weighed: when weighing fails
    (or Ctrl-C), the probes stop at the next weight and the failure reaches the caller."""
    from onnxcompress.passes.codebook import plan, sensitivity

    probed, weighed = [], []
    original_probe, original_weigh = plan._probe, plan._weigh

    def slow_probe(value, **kwargs):
        probed.append(value.name)
        time.sleep(0.2)  # time for the weighing to fail while probes remain
        return original_probe(value, **kwargs)

    def failing_weigh(value, *args):
        weighed.append(value.name)
        if len(weighed) == 2:
            raise KeyboardInterrupt
        return original_weigh(value, *args)

    monkeypatch.setattr(plan, "_probe", slow_probe)
    monkeypatch.setattr(plan, "_weigh", failing_weigh)
    stopped = []

    def recorded_gains(*args):
        try:
            return sensitivity.output_gains(*args)
        except sensitivity.ProbesCancelled as exc:
            stopped.append(exc)
            raise

    monkeypatch.setattr(plan, "output_gains", recorded_gains)
    rng = np.random.default_rng(10)
    proto = _chain_of_matmuls(rng, layers=6)
    feeds = [{"X": rng.standard_normal((16, 32)).astype(np.float32)} for _ in range(2)]
    with pytest.raises(KeyboardInterrupt):
        compress(proto, ["codebook:bits=3"], feeds, options=NO_VALIDATE)
    assert len(probed) < 6 and stopped


def _chain_of_matmuls(rng: np.random.Generator, layers: int) -> onnx.ModelProto:
    """X [N, 32] through ``layers`` 32×32 MatMuls with ReLUs between."""
    nodes, inits, current = [], [], "X"
    for i in range(layers):
        inits.append(
            onnx.numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), f"W{i}")
        )
        nodes.append(onnx.helper.make_node("MatMul", [current, f"W{i}"], [f"m{i}"]))
        nodes.append(onnx.helper.make_node("Relu", [f"m{i}"], [f"r{i}"]))
        current = f"r{i}"
    graph = onnx.helper.make_graph(
        nodes,
        "chain",
        [onnx.helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, ["N", 32])],
        [onnx.helper.make_tensor_value_info(current, onnx.TensorProto.FLOAT, ["N", 32])],
        inits,
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
