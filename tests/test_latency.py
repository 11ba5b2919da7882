"""Timing one layer alone: the isolated model, the edge reorders left out, the ratio."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from onnxcompress import latency
from tests.conftest import run
from tests.passes.lowrank.test_lowrank_conv import _feed, conv_model


def _node_and_opsets(proto: onnx.ModelProto) -> tuple[ir.Node, dict[str, int]]:
    model = ir.from_proto(proto)
    return next(iter(model.graph)), dict(model.opset_imports)


def test_an_isolated_node_computes_what_it_did_in_its_model():
    proto = conv_model(strides=[2, 2], pads=[1, 0, 1, 0], dilations=[1, 2])
    node, opsets = _node_and_opsets(proto)
    alone = latency.isolate(node, [2, 4, 9, 11], opsets)
    assert [n.op_type for n in alone.graph] == ["Conv"] and len(alone.graph.initializers) == 2
    feed = _feed(proto)
    np.testing.assert_array_equal(run(alone, feed)[0], run(proto, feed)[0])
    assert len(list(node.graph)) == 1  # the original model keeps its node


def test_only_layout_conversions_at_the_edges_are_left_out():
    nodes = [
        helper.make_node("ReorderInput", ["x"], ["a"], name="in", domain="com.microsoft.nchwc"),
        helper.make_node("Conv", ["a", "w"], ["b"], name="conv", domain="com.microsoft.nchwc"),
        helper.make_node("ReorderOutput", ["b"], ["c"], name="mid", domain="com.microsoft.nchwc"),
        helper.make_node("Conv", ["c", "v"], ["d"], name="conv2"),
        helper.make_node("ReorderOutput", ["d"], ["y"], name="out", domain="com.microsoft.nchwc"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
    )
    assert latency._edge_reorders(helper.make_model(graph)) == {"in", "out"}


def test_kernel_time_and_speedup_are_measured():
    node, opsets = _node_and_opsets(conv_model(out=16, channels=16, spatial=(32, 32)))
    alone = latency.isolate(node, [2, 16, 32, 32], opsets)
    assert latency.kernel_microseconds(alone, runs=5) > 0
    ratio = latency.speedup(alone, alone, runs=5, rounds=1)
    assert math.isfinite(ratio) and ratio > 0  # a value, not a timing claim: CI is noisy
