"""Folding a rewrite's last 1×1 conv into the linear 1×1 conv it feeds: exact, fewer nodes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import compress
from onnxcompress.pipeline import Options
from tests.conftest import run

NO_VALIDATE = Options(validate=False)
SEPARABLE = "scheme=separable,rank=1,min_saving=-100"


def branches_model(*, relu=False, pads=None, side_input=False, expose=False):
    """X → two 3×3 convs → Concat(channels) → 1×1 conv K → Y; options break the pattern."""
    rng = np.random.default_rng(1)

    def weight(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    inits = [weight("WA", 6, 4, 3, 3), weight("BA", 6), weight("WB", 5, 4, 3, 3)]
    nodes = [
        helper.make_node("Conv", ["X", "WA", "BA"], ["a"], name="A", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["X", "WB"], ["b"], name="B", pads=[1, 1, 1, 1]),
    ]
    branch = "a"
    if relu:
        nodes.append(helper.make_node("Relu", ["a"], ["a_relu"], name="relu"))
        branch = "a_relu"
    members = [branch, "b"] + (["X"] if side_input else [])
    nodes.append(helper.make_node("Concat", members, ["cat"], name="cat", axis=1))
    width = 11 + (4 if side_input else 0)
    inits += [weight("WK", 7, width, 1, 1), weight("BK", 7)]
    attrs = {"pads": pads} if pads else {}
    nodes.append(helper.make_node("Conv", ["cat", "WK", "BK"], ["Y"], name="K", **attrs))
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)]
    if expose:
        outputs.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 4, 8, 9])],
        outputs,
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feed(seed=3):
    return {"X": np.random.default_rng(seed).standard_normal((2, 4, 8, 9)).astype(np.float32)}


def _ops(model) -> list[str]:
    return [n.op_type for n in ir.from_proto(model).graph]


def _check_same(result, reference):
    feed = _feed()
    for got, want in zip(run(result, feed), run(reference, feed)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def _unfolded(proto, setting):
    return compress(proto, [f"lowrank:{setting},fold=false"], options=NO_VALIDATE)[0]


def test_pointwise_halves_of_both_branches_merge_into_the_conv_after_the_concat():
    proto = branches_model()
    result, report = compress(proto, [f"lowrank:{SEPARABLE}"], options=NO_VALIDATE)
    assert _ops(result) == ["Conv", "Conv", "Concat", "Conv"]  # two depthwise, concat, K
    layers = report.passes[0].rewritten
    assert [layer.detail["merged_into"] for layer in layers] == ["K", "K"]
    assert all(len(layer.detail["nodes"]) == 1 for layer in layers)
    absorbing = next(n for n in ir.from_proto(result).graph if n.name == "K")
    assert list(absorbing.inputs[1].shape) == [7, 4 + 4, 1, 1]  # the two depthwise outputs
    _check_same(result, _unfolded(proto, SEPARABLE))  # the merge itself is exact


def test_a_channel_split_factor_feeding_a_1x1_conv_narrows_it_to_the_rank():
    proto = branches_model(side_input=True)
    result, report = compress(proto, ["lowrank:rank=2,min_saving=-100"], options=NO_VALIDATE)
    # K is split too (15 → 2 → 7): A's and B's r→O factors merge into its first half
    merged = {layer.node: layer.detail.get("merged_into") for layer in report.passes[0].layers}
    assert merged == {"A": "K.lowrank.0", "B": "K.lowrank.0", "K": None}
    absorbing = next(n for n in ir.from_proto(result).graph if n.name == "K.lowrank.0")
    assert list(absorbing.inputs[1].shape) == [2, 2 + 2 + 4, 1, 1]  # ranks + the side input
    _check_same(result, _unfolded(proto, "rank=2,min_saving=-100"))
    full, report = compress(proto, ["lowrank:ratio=1,min_saving=-100"], options=NO_VALIDATE)
    assert {layer.detail.get("merged_into") for layer in report.passes[0].rewritten} == {
        "K.lowrank.0",
        None,
    }
    _check_same(full, proto)  # full rank and merged: the original, to 1e-5


@pytest.mark.parametrize(
    ("variant", "setting"),
    [
        ({"relu": True}, SEPARABLE),  # a non-linearity in between: branch A stays unmerged
        ({"pads": [1, 1, 1, 1]}, SEPARABLE),  # K pads: its border would see P's bias
        ({"expose": True}, SEPARABLE),  # A's output is also a graph output
        ({}, f"{SEPARABLE},exclude=K"),  # the user excluded the absorbing conv
        ({}, f"{SEPARABLE},fold=false"),
    ],
)
def test_folding_leaves_the_graph_alone_when_the_pattern_does_not_hold(variant, setting):
    proto = branches_model(**variant)
    result, report = compress(proto, [f"lowrank:{setting}"], options=NO_VALIDATE)
    first = report.passes[0].rewritten[0]
    assert "merged_into" not in first.detail and len(first.detail["nodes"]) == 2
    _check_same(result, _unfolded(proto, setting.replace(",fold=false", "")))


def test_merged_layers_report_the_params_and_macs_that_remain():
    proto = branches_model()
    _, folded = compress(proto, [f"lowrank:{SEPARABLE}"], options=NO_VALIDATE)
    _, kept = compress(proto, [f"lowrank:{SEPARABLE},fold=false"], options=NO_VALIDATE)
    for merged, whole in zip(folded.passes[0].rewritten, kept.passes[0].rewritten):
        pointwise = whole.params_after - 4 * 9  # minus the depthwise 3×3 weights (C·m = 4)
        assert merged.params_after == whole.params_after - pointwise + merged_delta(merged)
    assert folded.after.macs < kept.after.macs


def merged_delta(layer) -> int:
    """The absorbing conv's change is booked on the first merged layer: K goes from 11 input
    channels to the 4 + 4 depthwise outputs, 7 outputs each."""
    return 7 * (8 - 11) if layer.node == "A" else 0


def test_a_wider_merge_is_not_made():
    proto = branches_model()  # multiplier 6: the depthwise outputs (24 + 20) outnumber K's 11
    _, report = compress(
        proto, ["lowrank:scheme=separable,rank=6,min_saving=-100"], options=NO_VALIDATE
    )
    assert all("merged_into" not in layer.detail for layer in report.passes[0].rewritten)
