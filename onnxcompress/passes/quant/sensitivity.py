"""Per-layer sensitivity: the model's output error with one weighted layer alone quantized.

Tells which layers to exclude (``exclude=``) when the whole model loses too much: the error
of a quantized model is dominated by a few layers, and this ranks them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import onnx_ir as ir

from onnxcompress.calibration import Feed
from onnxcompress.graph import node_label
from onnxcompress.passes.quant.plan import activation_tensors, has_constant_weight
from onnxcompress.passes.quant.qparams import QParams
from onnxcompress.validate import Runner, compare

#: Calibration feeds each one-layer model is compared on.
FEEDS = 4

#: Quantizes the given nodes of a model with the given activation parameters.
Rewrite = Callable[[ir.Model, list[ir.Node], dict[str, QParams]], None]


def layer_sensitivity(
    model: ir.Model,
    planned: Sequence[ir.Node],
    params: dict[str, QParams],
    feeds: Sequence[Feed],
    rewrite: Rewrite,
) -> dict[str, float]:
    """Output relative L2 error (worst output) with each weighted layer alone quantized
    (weights and its input and output activations) by ``rewrite``, on up to 4 feeds; by
    report label."""
    proto = ir.to_proto(model)
    order = {id(node): i for i, node in enumerate(model.graph)}
    results = {}
    with Runner(model, "float model") as reference:
        for node in planned:
            if not has_constant_weight(node):
                continue
            copy = ir.from_proto(proto)
            alone = list(copy.graph)[order[id(node)]]
            names = [n for n in activation_tensors([alone]) if n in params]
            rewrite(copy, [alone], {n: params[n] for n in names})
            copy.graph.sort()
            with Runner(copy, "one layer quantized") as candidate:
                validation = compare(reference, candidate, feeds[:FEEDS], latency_runs=0)
            results[node_label(node)] = validation.worst_rel_l2
    return results
