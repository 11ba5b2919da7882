"""Probes (``onnxcompress.probes``): output errors with initializers replaced, a few probes to
a session, measured before an output's Softmax or Sigmoid when asked."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import probes
from onnxcompress.runner import Runner
from tests.test_runner import LAYERS, WIDTH, chain_model, feeds


def _probe_errors(per_session: int, monkeypatch) -> list[float]:
    """Each chain weight's probe (the weight halved), ``per_session`` probes a session."""
    monkeypatch.setattr(probes, "PROBES_PER_SESSION", per_session)
    model = ir.from_proto(chain_model())
    weights = [model.graph.initializers[f"W{i}"] for i in range(LAYERS)]
    opened = []
    monkeypatch.setattr(Runner, "with_overridable", _counting(Runner.with_overridable, opened))
    with probes.ProbeSession(model, [[w] for w in weights], feeds(2, 3), 4, "chain") as session:
        errors = [session.output_error({w.name: w.const_value.numpy() / 2}) for w in weights]
        with pytest.raises(RuntimeError, match="no probe declared"):
            session.output_error({"W0": weights[0].const_value.numpy(), "R": np.eye(WIDTH)})
    assert len(opened) == -(-LAYERS // per_session)  # one session per chunk of probes
    return errors


def _counting(method, calls: list):
    def counted(self, *args, **kwargs):
        calls.append(args)
        return method(self, *args, **kwargs)

    return counted


def test_probes_in_sessions_of_a_few_measure_what_one_session_measures(monkeypatch):
    one_session = _probe_errors(LAYERS, monkeypatch)
    few_each = _probe_errors(5, monkeypatch)
    assert all(error > 1e-3 for error in one_session)  # every probe moved the outputs
    assert np.allclose(few_each, one_session, rtol=1e-5)


def test_an_overridable_initializer_takes_a_fed_value_and_keeps_its_own_otherwise():
    model, feed = ir.from_proto(chain_model()), feeds(1, batch=2)[0]
    with Runner(model) as plain, plain.with_overridable(["W3"]) as probe:
        assert np.array_equal(probe.run(feed)[0], plain.run(feed)[0])
        zero = {**feed, "W3": np.zeros((WIDTH, WIDTH), np.float32)}
        assert not np.any(probe.run(zero)[0])  # a zero weight before ReLUs zeroes the output
        assert "W3" not in {i.name for i in plain.session.get_inputs()}


def softmax_classifier(scale: float) -> ir.Model:
    """X [N, 8] -> MatMul W [8, 4] -> Softmax -> Identity: a classifier whose logits are
    ``scale`` times larger than a standard normal's, confident when ``scale`` is large."""
    rng = np.random.default_rng(3)
    weight = (scale * rng.standard_normal((8, 4))).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "W"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
            helper.make_node("Identity", ["probabilities"], ["P"]),
        ],
        "classifier",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("P", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(weight, "W")],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_unsquashed_looks_through_rearranging_ops_to_the_softmax_input():
    assert probes.unsquashed(softmax_classifier(1.0)) == ["logits"]
    assert probes.unsquashed(ir.from_proto(chain_model())) == ["Y", "S"]  # nothing squashed


def test_a_confident_softmax_hides_an_error_that_its_logits_show():
    model = softmax_classifier(scale=20.0)
    weight = model.graph.initializers["W"]
    noisy = weight.const_value.numpy() * 1.1  # a 10% weight error: 1% of the logits' energy
    data = [{"X": np.random.default_rng(4).standard_normal((1, 8)).astype(np.float32)}]
    errors = {}
    for before in (False, True):
        with probes.ProbeSession(model, [[weight]], data, 4, "c", before_squashing=before) as s:
            errors[before] = s.output_error({"W": noisy})
    assert errors[True] == pytest.approx(0.01, rel=1e-3)  # (1.1 - 1)² of the logits
    assert errors[False] < 1e-4  # the saturated probabilities hardly moved
