"""Closed-form refit: recovers a layer from its teacher, honours masks, every Gemm form."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from onnxcompress.emit import Emitter
from onnxcompress.passes.prune.repair import Target, refit
from onnxcompress.validate import Runner
from tests.conftest import run


def _conv(weight, bias=None, **attrs) -> ir.Model:
    inputs = ["X", "W"] + (["B"] if bias is not None else [])
    node = helper.make_node("Conv", inputs, ["Y"], **attrs)
    inits = {"W": weight} | ({"B": bias} if bias is not None else {})
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("X", 1, [2, 3, 7, 7])],
        [helper.make_tensor_value_info("Y", 1, None)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )  # fmt: skip
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _emitter(model: ir.Model) -> Emitter:
    return Emitter(model, "prune")


def _feeds(shape, count=6):
    rng = np.random.default_rng(5)
    return [{"X": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


CONV_FORMS = [
    {"pads": [1, 1, 1, 1]},
    {"strides": [2, 2]},
    {"dilations": [2, 2], "pads": [2, 2, 2, 2]},
    {"pads": [0, 1, 2, 1], "strides": [2, 1]},
]


@pytest.mark.parametrize("attrs", CONV_FORMS, ids=str)
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_refit_recovers_the_teacher(attrs, with_bias):
    rng = np.random.default_rng(0)
    weight, bias = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    teacher_model = _conv(weight, bias if with_bias else None, **attrs)
    student = _conv(weight + 0.3 * rng.standard_normal(weight.shape), None, **attrs)
    feeds = _feeds([2, 3, 7, 7])
    teacher = Runner(teacher_model, extra_outputs=["Y"])
    node = next(iter(student.graph))
    results = refit(student, [Target(node)], teacher, feeds, emitter=_emitter(student), damping=0)
    assert results[0].error_after < 1e-4 < results[0].error_before
    np.testing.assert_allclose(
        run(student, feeds[0])[0], run(teacher_model, feeds[0])[0], atol=1e-3
    )


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_refit_with_alpha_beta_and_matmul_without_bias(trans_b):
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((6, 5) if trans_b else (5, 6))

    def gemm(w, c):
        node = helper.make_node("Gemm", ["X", "W", "C"], ["Y"], alpha=0.5, beta=2.0, transB=trans_b)
        graph = helper.make_graph(
            [node], "g", [helper.make_tensor_value_info("X", 1, [8, 5])],
            [helper.make_tensor_value_info("Y", 1, [8, 6])],
            [numpy_helper.from_array(w.astype(np.float32), "W"),
             numpy_helper.from_array(c.astype(np.float32), "C")],
        )  # fmt: skip
        return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))

    teacher_model = gemm(weight, rng.standard_normal(6))
    student = gemm(weight + 0.2 * rng.standard_normal(weight.shape), np.zeros(6))
    feeds = _feeds([8, 5])
    teacher = Runner(teacher_model, extra_outputs=["Y"])
    targets = [Target(next(iter(student.graph)))]
    refit(student, targets, teacher, feeds, emitter=_emitter(student), damping=0)
    np.testing.assert_allclose(
        run(student, feeds[0])[0], run(teacher_model, feeds[0])[0], atol=1e-3
    )


def test_masked_refit_keeps_the_zeros():
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((3, 8, 3, 3))
    teacher_model = _conv(weight[:, :3], rng.standard_normal(3), pads=[1, 1, 1, 1])
    mask = np.abs(weight[:, :3]) > 0.5
    student = _conv(np.where(mask, weight[:, :3], 0), rng.standard_normal(3), pads=[1, 1, 1, 1])
    teacher = Runner(teacher_model, extra_outputs=["Y"])
    node = next(iter(student.graph))
    flat_mask = mask.reshape(3, -1).T
    targets = [Target(node, mask=flat_mask)]
    results = refit(student, targets, teacher, _feeds([2, 3, 7, 7]), emitter=_emitter(student))
    fitted = student.graph.initializers["W"].const_value.numpy()
    assert (fitted[~mask] == 0).all()
    assert results[0].error_after < results[0].error_before


def test_waves_put_dependent_layers_after_their_inputs():
    from onnxcompress.passes.prune.repair import _waves

    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 3, 4, 4] X) => (float[1, 3, 4, 4] Y) {
        a = Relu (X)
        b = Relu (a)
        c = Relu (X)
        Y = Add (b, c)
    }"""
    model = ir.from_onnx_text(text)
    nodes = list(model.graph)
    waves = _waves(model.graph, [Target(nodes[0]), Target(nodes[1]), Target(nodes[2])])
    assert [[t.node for t in wave] for wave in waves] == [[nodes[0], nodes[2]], [nodes[1]]]
