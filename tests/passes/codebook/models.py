"""Small models and helpers for the codebook tests."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.pipeline import Options
from tests.conftest import run

NO_VALIDATE = Options(validate=False)


def matmul_model(w: np.ndarray, opset: int = 17, rows: int = 5, bias: bool = False):
    """Y = X·W (+ b), W [k, n]."""
    k, n = w.shape
    nodes = [helper.make_node("MatMul", ["X", "W"], ["H" if bias else "Y"], name="/fc/MatMul")]
    inits = [numpy_helper.from_array(w.astype(np.float32), "W")]
    if bias:
        nodes.append(helper.make_node("Add", ["H", "B"], ["Y"], name="/fc/Add"))
        inits.append(numpy_helper.from_array(np.linspace(-1, 1, n).astype(np.float32), "B"))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [rows, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [rows, n])],
        inits,
    )
    ir_version = 10 if opset >= 21 else 8
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version
    )


def conv_model(w: np.ndarray, group: int = 1, opset: int = 17, bias: bool = True):
    """Y = Conv(X, W (, B = 0)), X [2, C, 8, 8]."""
    co, cig, _kh, _kw = w.shape
    inits = [numpy_helper.from_array(w.astype(np.float32), "W")]
    if bias:
        inits.append(numpy_helper.from_array(np.zeros(co, np.float32), "B"))
    graph = helper.make_graph(
        [
            helper.make_node(
                "Conv", ["X", "W", "B"][: 2 + bias], ["Y"], name="/conv/Conv", group=group
            )
        ],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, cig * group, 8, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def random_feed(model: onnx.ModelProto, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    value = model.graph.input[0]
    shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
    return {value.name: rng.standard_normal(shape).astype(np.float32)}


def few_values(shape, distinct: int, seed: int = 0) -> np.ndarray:
    """A weight with at most ``distinct`` values in each output channel (last axis)."""
    rng = np.random.default_rng(seed)
    palette = rng.standard_normal((distinct, shape[-1]))
    picks = rng.integers(0, distinct, shape)
    return np.take_along_axis(palette, picks.reshape(-1, shape[-1]) % distinct, 0).reshape(shape)


def decoded_weight(model: ir.Model, name_prefix: str = "W") -> np.ndarray:
    """Evaluate the decoder output by exposing it as a graph output."""
    proto = ir.to_proto(model)
    decoded = next(o for n in proto.graph.node for o in n.output if ".decoded" in o)
    proto.graph.output.append(onnx.ValueInfoProto(name=decoded))
    feed = {proto.graph.input[0].name: random_feed(proto)[proto.graph.input[0].name]}
    return run(proto, feed)[-1]


def correlated_inputs(n: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((k, k)) * np.linspace(2, 0.05, k)
    return rng.standard_normal((n, k)) @ mixing + 0.5
