"""Merge a new pointwise conv into the linear 1×1 conv it feeds.

A rewrite ends in a 1×1 conv P (the pointwise half of a separable pair, the r→O factor of a
channel split). When P's only reader is another 1×1 conv K, directly or through a Concat along
channels that only K reads, with nothing non-linear in between, K·(P·x + b₁) + b₂ is one 1×1
conv (K·P)·x + (K·b₁ + b₂): P's node goes, K gets the product. Exact up to rounding; it saves a
node and its MACs (onnxruntime spends ~10 µs per small conv on a CPU). RFB-style blocks
(branches → Concat → 1×1 "ConvLinear") and linear bottlenecks have this shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxcompress.emit import Emitter
from onnxcompress.graph import Shapes, is_pointwise_conv, node_label, weight_array
from onnxcompress.passes.base import LayerReport, PassReport


def fold_rewrites(
    emitter: Emitter,
    report: PassReport,
    shapes: Shapes,
    protected: Callable[[ir.Node], bool],
) -> None:
    """Merge each rewrite's last 1×1 conv into a linear 1×1 conv it feeds, if any, and move
    the weights and MACs between the layer reports accordingly."""
    by_node = {layer.detail["nodes"][-1]: layer for layer in report.rewritten}
    nodes = {node.name: node for node in emitter.graph if node.name in by_node}
    costs = {name: _Cost.of(node, shapes) for name, node in nodes.items()}  # before they go

    def ours(node: ir.Node) -> bool:
        return node.name in by_node

    for name in by_node:
        node = nodes.get(name)
        if node is None or node.graph is None:  # already merged with a sibling
            continue
        folded = fold_pointwise(emitter, node, ours, protected)
        if folded is None:
            continue
        into = node_label(folded.into)
        for gone in folded.removed:
            layer = by_node[gone]
            layer.detail["nodes"] = [n for n in layer.detail["nodes"] if n != gone]
            layer.detail["merged_into"] = into
            costs[gone].book(layer, -1)
        # the absorbing conv narrows (or keeps its width): booked on the first merged layer
        absorbing = _Cost.of(folded.into, shapes, params=folded.params_delta)
        absorbing.book(by_node[folded.removed[0]], +1)


@dataclass
class _Cost:
    """A conv's weights and MACs, to move between layer reports when a fold merges nodes."""

    params: int
    itemsize: int
    positions: int | None  # output rows, when shapes are known

    @classmethod
    def of(cls, node: ir.Node, shapes: Shapes, params: int | None = None) -> _Cost:
        weight = node.inputs[1].const_value
        shape = shapes.get(node.outputs[0].name or "")
        known = bool(shape) and all(isinstance(d, int) for d in shape)
        positions = shape[0] * math.prod(shape[2:]) if known else None
        itemsize = int(weight.dtype.itemsize)
        return cls(weight.size if params is None else params, itemsize, positions)

    def book(self, layer: LayerReport, sign: int) -> None:
        layer.params_after += sign * self.params
        layer.bytes_after += sign * self.params * self.itemsize
        if self.positions is not None and layer.macs_after is not None:
            layer.macs_after += sign * self.params * self.positions


@dataclass
class Folded:
    """What a fold did: the conv that absorbed the pointwise ones, and its size change."""

    into: ir.Node
    removed: list[str]  # names of the pointwise convs merged away
    params_delta: int  # change of the absorbing conv's params (<= 0)


def fold_pointwise(
    emitter: Emitter,
    node: ir.Node,
    ours: Callable[[ir.Node], bool],
    protected: Callable[[ir.Node], bool],
) -> Folded | None:
    """Fold ``node`` (a 1×1 conv) into the 1×1 conv it feeds, with every other conv beside it
    in a Concat for which ``ours`` holds (made by the calling pass); None when the pattern
    does not hold or the absorbing conv is ``protected`` (excluded by the user)."""
    if not is_pointwise_conv(node, stride_one=True):
        return None
    reader, via = _single_reader(node.outputs[0]), None
    if reader is not None and reader.op_type == "Concat":
        via, reader = reader, _single_reader(reader.outputs[0])
        if not _channel_concat(via, node):
            return None
    if reader is None or protected(reader) or not is_pointwise_conv(reader, stride_one=False):
        return None
    if via is not None and reader.inputs[0] is not via.outputs[0]:
        return None
    if via is None and reader.inputs[0] is not node.outputs[0]:
        return None
    sources = list(via.inputs) if via is not None else [node.outputs[0]]
    return _fold(emitter, reader, via, sources, ours)


def _fold(emitter: Emitter, reader: ir.Node, via: ir.Node | None, sources, ours) -> Folded | None:
    weight = weight_array(reader.inputs[1])
    outer = weight.reshape(weight.shape[0], -1).astype(np.float64)  # [O2, ΣC]
    bias = _bias(reader, outer.shape[0])
    widths = [_channels(value) for value in sources]
    if None in widths or sum(widths) != outer.shape[1]:
        return None
    blocks, new_bias, new_sources, folded = [], bias.copy(), [], []
    start = 0
    for value, width in zip(sources, widths):
        columns = outer[:, start : start + width]
        start += width
        producer = value.producer()
        if producer is not None and ours(producer) and _foldable_source(producer, value, sources):
            inner = weight_array(producer.inputs[1])
            inner = inner.reshape(inner.shape[0], -1).astype(np.float64)  # [C, C0]
            blocks.append(columns @ inner)
            new_bias += columns @ _bias(producer, inner.shape[0])
            new_sources.append(producer.inputs[0])
            folded.append(producer)
        else:
            blocks.append(columns)
            new_sources.append(value)
    merged = np.concatenate(blocks, axis=1)
    if not folded or merged.shape[1] > outer.shape[1]:  # never widen the absorbing conv
        return None
    _rewire(emitter, reader, via, new_sources, folded, merged, new_bias, weight)
    return Folded(reader, [p.name for p in folded], int(merged.size - outer.size))


def _rewire(emitter: Emitter, reader, via, sources, folded, merged, bias, weight) -> None:
    base = reader.name or node_label(reader)
    shape = (merged.shape[0], merged.shape[1], *weight.shape[2:])
    new_weight = emitter.constant(f"{base}.folded", merged.reshape(shape).astype(weight.dtype))
    new_bias = emitter.constant(f"{base}.folded_bias", bias.astype(weight.dtype))
    if via is not None:
        for index, value in enumerate(sources):
            via.replace_input_with(index, value)
    else:
        reader.replace_input_with(0, sources[0])
    reader.replace_input_with(1, new_weight)
    if len(reader.inputs) < 3:
        reader.resize_inputs(3)
    reader.replace_input_with(2, new_bias)
    for producer in folded:
        emitter.graph.remove(producer, safe=True)


def _single_reader(value: ir.Value) -> ir.Node | None:
    uses = value.uses()
    if value.is_graph_output() or len(uses) != 1:
        return None
    return uses[0].node


def _channel_concat(concat: ir.Node, member: ir.Node) -> bool:
    rank = len(member.inputs[1].const_value.shape)
    axis = concat.attributes.get_int("axis", 0)
    return axis in (1, 1 - rank)


def _foldable_source(producer: ir.Node, value: ir.Value, sources) -> bool:
    """A pointwise conv whose output is read once, by this Concat/conv, at one position."""
    return (
        is_pointwise_conv(producer, stride_one=True)
        and len(value.uses()) == 1
        and not value.is_graph_output()
        and sum(v is value for v in sources) == 1
    )


def _channels(value: ir.Value) -> int | None:
    producer = value.producer()
    if producer is not None and producer.op_type == "Conv" and len(producer.inputs) > 1:
        weight = producer.inputs[1]
        if weight.const_value is not None:
            return int(weight.const_value.shape[0])
    shape = value.shape
    if shape is not None and len(shape) > 1 and isinstance(shape[1], int):
        return int(shape[1])
    return None


def _bias(node: ir.Node, channels: int) -> np.ndarray:
    value = node.inputs[2] if len(node.inputs) > 2 else None
    if value is None:
        return np.zeros(channels)
    return weight_array(value).astype(np.float64).reshape(channels)
