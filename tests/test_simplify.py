"""normalize's exact simplifications: small constant computations folded, zero Pads folded
into the Conv after them (torch's TF-style "same" padding), everything else left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.normalize import normalize
from tests.conftest import run


def padded_conv(mode: str = "constant", value: float | None = 0.0, reader: str = "Conv"):
    """x -> Pad (pads computed from constants by a small int64 subgraph) -> reader."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(np.array([4], np.int64), "count"),
        numpy_helper.from_array(np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64), "spatial"),
        numpy_helper.from_array(np.array([-1], np.int64), "flat"),
    ]
    nodes = [
        helper.make_node(
            "ConstantOfShape",
            ["count"],
            ["zeros"],
            value=numpy_helper.from_array(np.array([0], np.int64)),
        ),
        helper.make_node("Add", ["spatial", "zeros8"], ["summed"]),
        helper.make_node("Concat", ["zeros", "zeros"], ["zeros8"], axis=0),
        helper.make_node("Reshape", ["summed", "flat"], ["pads"]),
    ]
    pad_inputs = ["x", "pads"]
    if value is not None:
        inits.append(numpy_helper.from_array(np.array(value, np.float32), "value"))
        pad_inputs.append("value")
    nodes.append(helper.make_node("Pad", pad_inputs, ["padded"], mode=mode))
    if reader == "Conv":
        nodes.append(helper.make_node("Conv", ["padded", "W"], ["y"]))
    else:
        nodes.append(helper.make_node("Relu", ["padded"], ["y"]))
    nodes[1], nodes[2] = nodes[2], nodes[1]  # graph order: Concat before Add
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _simplified(proto: onnx.ModelProto) -> tuple[ir.Model, list[str]]:
    model = ir.from_proto(proto)
    return model, normalize(model)


def test_zero_pad_from_a_shape_subgraph_becomes_the_convs_pads():
    proto = padded_conv()
    model, notes = _simplified(proto)
    assert [n.op_type for n in model.graph] == ["Conv"]
    assert list(model.graph.node(0).attributes.get_ints("pads")) == [1, 2, 2, 1]
    assert any("folded 4 node(s) computing small constants" in note for note in notes)
    assert any("folded 1 zero Pad" in note for note in notes)
    x = {"x": np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(model, x)[0], run(proto, x)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", [{"mode": "reflect"}, {"value": 1.5}, {"reader": "Relu"}], ids=str)
def test_pads_that_a_conv_cannot_take_stay(case):
    model, notes = _simplified(padded_conv(**case))
    assert "Pad" in [n.op_type for n in model.graph]
    assert not any("zero Pad" in note for note in notes)
