"""A corpus of models that once broke the tool (issue 11): valid ones it must rewrite into
models that pass onnx's full check or leave alone with a reason, and malformed ones it must
refuse with one line. ``valid_models()`` and ``malformed_models()`` list them by name; the
builders are shared with the focused tests in ``test_robustness.py``."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: A metadata entry every valid corpus model carries; every output must keep it.
METADATA_KEY = "corpus.dictionary"


def random_weights(*names: str) -> list[onnx.TensorProto]:
    rng = np.random.default_rng(0)
    return [
        numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), name)
        for name in names
    ]


def weight_as_output() -> onnx.ModelProto:
    """A model that exposes a weight as a graph output (some exporters do, for debugging)."""
    weights = random_weights("W1", "W2")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["y"]),
            helper.make_node("MatMul", ["y", "W2"], ["z"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
        [
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, 64]),
            helper.make_tensor_value_info("W2", TensorProto.FLOAT, [64, 64]),
        ],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def single_matmul(weight: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Relu", ["y"], ["z"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, weight.shape[0]])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, weight.shape[1]])],
        [numpy_helper.from_array(weight, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def bad_weight(kind: str) -> np.ndarray:
    if kind == "empty":
        return np.zeros((0, 8), np.float32)
    weight = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    weight[3, 4] = np.nan if kind == "nan" else np.inf
    return weight


def two_in_three_out() -> onnx.ModelProto:
    """Two inputs, three outputs, one output also feeding the next layer (KeyError: 'y1')."""
    weights = random_weights("W1", "W2")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["a", "W1"], ["y1"]),
            helper.make_node("MatMul", ["y1", "W2"], ["y2"]),
            helper.make_node("Add", ["y2", "b"], ["y3"]),
        ],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3, 64]) for n in ("a", "b")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3, 64]) for n in ("y1", "y2", "y3")],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def input_is_an_output() -> onnx.ModelProto:
    """The graph input is listed as a graph output too (KeyError: 'x')."""
    weight = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3, 64]) for n in ("x", "y")],
        [numpy_helper.from_array(weight, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def matmul_graph(nodes=None, inputs=None, outputs=None, weight=None, **model_fields):
    weight = weight or numpy_helper.from_array(np.ones((64, 64), np.float32), "W")
    graph = helper.make_graph(
        nodes or [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
        outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 64])],
        [weight],
    )
    opsets = model_fields.pop("opsets", [helper.make_opsetid("", 17)])
    model = helper.make_model(graph, opset_imports=opsets)
    for key, value in model_fields.items():
        setattr(model, key, value)
    return model


def raw_weight(data: bytes, dims=(64, 64)) -> onnx.TensorProto:
    tensor = onnx.TensorProto(name="W", data_type=TensorProto.FLOAT, dims=list(dims))
    tensor.raw_data = data
    return tensor


def malformed() -> dict[str, tuple[onnx.ModelProto, str]]:
    """name -> (model, a fragment of the one line it must get)."""
    relu_b = helper.make_node("Relu", ["y"], ["b"])
    return {
        "cycle": (
            matmul_graph(
                [
                    helper.make_node("MatMul", ["x", "W"], ["a"]),
                    helper.make_node("Add", ["a", "b"], ["y"]),
                    relu_b,
                ]
            ),
            "before it is made (a cycle",
        ),
        "undefined tensor": (
            matmul_graph(
                [
                    helper.make_node("MatMul", ["x", "W"], ["a"]),
                    helper.make_node("Add", ["a", "nosuch"], ["y"]),
                ]
            ),
            "reads 'nosuch', which nothing defines",
        ),
        "output nobody makes": (
            matmul_graph([helper.make_node("MatMul", ["x", "W"], ["a"])]),
            "graph output 'y' is made by no node",
        ),
        "ir_version 99": (matmul_graph(ir_version=99), "IR version 99"),
        "duplicate opset": (
            matmul_graph(opsets=[helper.make_opsetid("", 17), helper.make_opsetid("", 13)]),
            "more than once",
        ),
        "negative input size": (
            matmul_graph(inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [-3, 64])]),
            "negative size",
        ),
        "short raw data": (matmul_graph(weight=raw_weight(b"\0" * 100)), "too short"),
        "long raw data": (matmul_graph(weight=raw_weight(b"\0" * 16784)), "too long"),
        "dims of 2**40": (
            matmul_graph(weight=raw_weight(b"\0" * 16, dims=(1 << 20, 1 << 20))),
            "too short",
        ),
        "input of 2**40": (
            matmul_graph(
                inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [1 << 40, 64])]
            ),
            "too large for synthetic data",
        ),
    }


def flatten_by_shape_path() -> onnx.ModelProto:
    """Conv -> Reshape to [N, -1] with the target computed from Shape -> Gather -> Concat,
    the way torch exports EfficientNet's flatten (int64 tensors on the way)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
        numpy_helper.from_array(rng.standard_normal((8 * 6 * 6, 10)).astype(np.float32), "F"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"]),
        helper.make_node("Shape", ["c"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "zero_axes"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["c", "target"], ["flat"]),
        helper.make_node("MatMul", ["flat", "F"], ["y"]),
    ]
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "zero_axes"))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def with_local_function() -> onnx.ModelProto:
    """A layer written as a model-local function (domain ``local``) next to a plain MatMul."""
    dense = helper.make_function(
        "local",
        "Dense",
        ["x", "w"],
        ["y"],
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [helper.make_opsetid("", 17)],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Dense", ["x", "W1"], ["h"], domain="local"),
            helper.make_node("MatMul", ["h", "W2"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 64])],
        random_weights("W1", "W2"),
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=[dense])


def conv_chain() -> onnx.ModelProto:
    """Grouped, dilated, depthwise, transposed and strided convs one after another."""
    rng = np.random.default_rng(0)

    def weight(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "w2"], ["c2"], group=4, pads=[2] * 4, dilations=[2, 2]),
        helper.make_node("Conv", ["c2", "w3"], ["c3"], group=16, pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["c3", "w4"], ["c4"], strides=[2, 2], pads=[1] * 4),
        helper.make_node("Relu", ["c4"], ["r4"]),
        helper.make_node("Conv", ["r4", "w5", "b5"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1]),
    ]
    inits = [
        weight("w1", 16, 3, 3, 3),
        weight("w2", 16, 4, 3, 3),
        weight("w3", 16, 1, 3, 3),
        weight("w4", 16, 8, 3, 3),
        weight("w5", 32, 8, 3, 3),
        weight("b5", 32),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 16, 16])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def typed_matmul(elem_type: int) -> onnx.ModelProto:
    """MatMul -> Relu in float16 or float64 from end to end."""
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    weight = np.random.default_rng(0).standard_normal((64, 64)).astype(dtype)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Relu", ["y"], ["z"])],
        "g",
        [helper.make_tensor_value_info("x", elem_type, [3, 64])],
        [helper.make_tensor_value_info("z", elem_type, [3, 64])],
        [numpy_helper.from_array(weight, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def constant_node_weights() -> onnx.ModelProto:
    """Weights in Constant nodes, as Paddle exports them, with a dynamic batch."""
    (weight,) = random_weights("W")
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["W"], value=weight),
            helper.make_node("MatMul", ["x", "W"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def unsorted_nodes() -> onnx.ModelProto:
    return matmul_graph(
        [helper.make_node("Relu", ["a"], ["y"]), helper.make_node("MatMul", ["x", "W"], ["a"])]
    )


def valid_models() -> dict[str, onnx.ModelProto]:
    """Valid models that once crashed a pass (exit 3) or came out invalid, each carrying a
    metadata entry that must survive (the OCR models keep their dictionary there)."""
    models = {
        "weight as graph output": weight_as_output(),
        "two inputs, three outputs": two_in_three_out(),
        "input listed as output": input_is_an_output(),
        "model-local function": with_local_function(),
        "int64 shape path": flatten_by_shape_path(),
        "conv chain": conv_chain(),
        "float16": typed_matmul(TensorProto.FLOAT16),
        "float64": typed_matmul(TensorProto.DOUBLE),
        "Constant-node weights, dynamic batch": constant_node_weights(),
        "nodes out of order": unsorted_nodes(),
        "NaN weight": single_matmul(bad_weight("nan")),
        "infinite weight": single_matmul(bad_weight("inf")),
    }
    for model in models.values():
        helper.set_model_props(model, {METADATA_KEY: "kept"})
    return models


def malformed_models() -> dict[str, tuple[bytes, str]]:
    """Malformed files, as bytes, and a fragment of the one line each must get."""
    found = {name: (model.SerializeToString(), text) for name, (model, text) in malformed().items()}
    good = matmul_graph().SerializeToString()
    found["not ONNX"] = (b"this is not a model", "not an ONNX model")
    found["truncated"] = (good[: len(good) // 2], "ONNX model")
    found["empty file"] = (b"", "is empty")
    return found
