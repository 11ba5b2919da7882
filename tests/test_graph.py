"""MACs and params accounting against counts made independently here, and constant folding."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import inspect_model, load
from onnxcompress.graph import infer_shapes, model_macs, weight_params
from tests.conftest import FIXTURES


def _zeros(*shape):
    return numpy_helper.from_array(np.zeros(shape, np.float32))


def accounting_model():
    """Conv (stride 2, pads, groups 2) -> ConvTranspose -> Flatten -> Gemm(transA) ... MatMul."""
    inits = {
        "cw": _zeros(8, 2, 3, 3),
        "tw": _zeros(8, 4, 2, 2),  # ConvTranspose weight [C_in, C_out/g, k, k]
        "gw": _zeros(5, 4 * 14 * 14),
        "mw": _zeros(5, 7),
    }
    for name, tensor in inits.items():
        tensor.name = name
    nodes = [
        helper.make_node("Conv", ["x", "cw"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1], group=2),
        helper.make_node("ConvTranspose", ["c", "tw"], ["t"], strides=[2, 2]),
        helper.make_node("Flatten", ["t"], ["f"]),
        helper.make_node("Transpose", ["f"], ["ft"], perm=[1, 0]),
        helper.make_node("Gemm", ["ft", "gw"], ["g"], transA=1, transB=1),
        helper.make_node("Unsqueeze", ["g", "ax"], ["u"]),
        helper.make_node("MatMul", ["u", "mw"], ["y"]),
    ]
    inits["ax"] = numpy_helper.from_array(np.array([0], np.int64), "ax")
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4, 14, 14])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        list(inits.values()),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_macs_match_a_hand_count():
    model = load(accounting_model())
    conv = 3 * 8 * 7 * 7 * (2 * 3 * 3)  # N * C_out * H_out * W_out * (C_in/g * k * k)
    transpose = 3 * 8 * 7 * 7 * (4 * 2 * 2)  # N * C_in * H_in * W_in * (C_out/g * k * k)
    gemm = 3 * 5 * (4 * 14 * 14)
    matmul = 1 * 3 * 7 * 5
    assert model_macs(model, infer_shapes(model)) == conv + transpose + gemm + matmul


def test_params_and_macs_of_the_cnn_fixture_match_an_independent_count():
    """Params from the raw initializers; MACs from shapes onnxruntime actually produces."""
    path = FIXTURES / "mnist_cnn.onnx"
    model = load(str(path))
    params, nbytes = weight_params(model)
    arrays = [v.const_value.numpy() for v in model.graph.initializers.values()]
    assert params == sum(a.size for a in arrays) and nbytes == sum(a.nbytes for a in arrays)

    proto = ir.to_proto(model)
    wanted = [n.output[0] for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
    proto.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in wanted)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    shapes = dict(
        zip(
            wanted,
            (o.shape for o in session.run(wanted, {"input": np.zeros((2, 1, 28, 28), np.float32)})),
        )
    )
    weights = {v.name: v.const_value.shape for v in model.graph.initializers.values()}
    expected = 0
    for node in proto.graph.node:
        out = shapes.get(node.output[0])
        if node.op_type == "Conv":
            expected += int(np.prod(out)) * int(np.prod(weights[node.input[1]][1:]))
        elif node.op_type == "Gemm":
            expected += int(np.prod(out)) * weights[node.input[1]][1]  # transB=1: [n, k]
    inspection = inspect_model(str(path), {"N": 2})
    assert inspection.macs == expected
    assert inspection.params == params


def test_weight_layout_ops_on_constants_are_folded(real):
    inspection = inspect_model(str(real / "mnist-8.onnx"))
    assert any("folded 1 layout op" in note for note in inspection.notes)
    assert "lowrank" in next(
        layer.passes for layer in inspection.layers if layer.op_type == "MatMul"
    )
