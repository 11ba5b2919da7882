"""Channel-graph handlers of the layers that create channels: Conv, ConvTranspose, Gemm and
MatMul with a constant weight. Each output filter becomes an atom, the weight (and bias) is
recorded to shrink with it, and the input channels the layer reduces over are recorded to be
cut from its weight. Grouped convolutions are per-channel ops (depthwise) or must lose as many
channels in every group."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcompress.graph import bias_input, weight_axes, weight_problem
from onnxcompress.passes.prune.channel_graph import (
    AttrFix,
    Blocked,
    ChannelGraph,
    ChannelMap,
    Handlers,
    SliceFix,
    Source,
)

PRODUCERS = Handlers()


def _producer_weight(node: ir.Node) -> tuple[ir.Value, int, int] | None:
    """(weight, output-filter axis, input-channel axis) of a producer, None if not one: the
    weight must be a constant, and a 2-D matrix for Gemm/MatMul."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is None or weight.const_value is None:
        return None
    if node.op_type in ("Gemm", "MatMul") and len(weight.const_value.shape) != 2:
        return None
    axes = weight_axes(node)
    return weight, axes.out, axes.reduced


@PRODUCERS("Conv", "ConvTranspose")
def _conv(cg: ChannelGraph, node: ir.Node) -> None:
    found = _producer_weight(node)
    groups = node.attributes.get_int("group", 1)
    cmap = cg.maps.get(node.inputs[0])
    if found is None:
        if cmap is not None:
            raise Blocked("weight is not a constant")
        return
    weight, out_axis, in_axis = found
    shape = weight.const_value.shape
    if groups > 1:
        return _grouped_conv(cg, node, weight, groups, cmap)
    if cmap is not None:
        if cmap.axis != 1:
            raise Blocked("channel axis is not axis 1")
        cg.slice_const(node, weight, in_axis, node.inputs[0], "in")
        cg.use(node, 0)
    _new_source(cg, node, weight, out_axis, shape[out_axis], len(shape))


def _new_source(cg, node: ir.Node, weight: ir.Value, axis: int, count: int, rank: int) -> None:
    problem = weight_problem(weight)
    output = node.outputs[0]
    index = len(cg.sources)
    cg.sources.append(Source(node, weight, axis, output))
    reason = f"weight {problem}" if problem else None
    out_axis = rank - 1 if node.op_type in ("Gemm", "MatMul") else 1
    cg.maps[output] = ChannelMap(out_axis, rank, cg.new_atoms(count, index, reason))
    if problem:
        return
    cg.slices.append(SliceFix(node, weight, axis, output, "out"))
    bias = bias_input(node)
    if bias is not None:
        bias_shape = cg.shape(bias)
        if bias_shape and bias_shape[-1] == count and count > 1:
            try:
                cg.slice_const(node, bias, len(bias_shape) - 1, output, "out")
            except Blocked as why:
                cg.block(cg.maps[output].atoms, str(why))


def _grouped_conv(cg, node, weight, groups: int, cmap: ChannelMap | None) -> None:
    """Depthwise (one input channel per group): a per-channel op whose group count shrinks."""
    shape = weight.const_value.shape
    if node.op_type != "Conv" or shape[0] % groups:
        raise Blocked(f"grouped {node.op_type} (group={groups}) is not pruned")
    if shape[1] != 1 or shape[0] != groups:
        return _even_groups(cg, node, weight, groups, cmap)
    if cmap is None:
        return
    if cmap.axis != 1 or len(cmap.atoms) != groups:
        raise Blocked("depthwise conv does not line up with the channel axis")
    cg.slice_const(node, weight, 0, node.outputs[0], "param")
    bias = bias_input(node)
    if bias is not None:
        cg.slice_const(node, bias, 0, node.outputs[0], "param")
    cg.attrs.append(AttrFix(node, "group", {"ref": node.outputs[0]}))
    cg.use(node, *range(len(node.inputs)))
    cg.maps[node.outputs[0]] = ChannelMap(1, cmap.rank, cmap.atoms)


def _even_groups(cg, node, weight, groups: int, cmap: ChannelMap | None) -> None:
    """Grouped conv: every group must lose as many input (and output) channels as the others.

    The weight [C_out, C_in/g, k, k] is rebuilt group by group at removal time.
    """
    shape = weight.const_value.shape
    if weight_problem(weight):
        raise Blocked(f"weight {weight_problem(weight)}")
    if cmap is not None:
        if cmap.axis != 1 or len(cmap.atoms) != shape[1] * groups:
            raise Blocked("grouped conv does not line up with the channel axis")
        cg.partitions.append(np.split(cmap.atoms, groups))
        cg.use(node, 0)
    index = len(cg.sources)
    output = node.outputs[0]
    cg.sources.append(Source(node, weight, 0, output))
    cg.maps[output] = ChannelMap(1, len(shape), cg.new_atoms(shape[0], index))
    cg.partitions.append(np.split(cg.maps[output].atoms, groups))
    info = {"weight": weight, "groups": groups, "input": node.inputs[0], "output": output}
    cg.attrs.append(AttrFix(node, "grouped", info))
    bias = bias_input(node)
    if bias is not None:
        cg.slice_const(node, bias, 0, output, "out")


@PRODUCERS("Gemm", "MatMul")
def _dense(cg: ChannelGraph, node: ir.Node) -> None:
    found = _producer_weight(node)
    cmap = cg.maps.get(node.inputs[0])
    if found is None or node.inputs[0] is None or node.inputs[0].const_value is not None:
        if cmap is not None or (len(node.inputs) > 1 and node.inputs[1] in cg.maps):
            raise Blocked(f"{node.op_type} between two activations")
        return
    weight, out_axis, in_axis = found
    if cmap is not None:
        trans_a = node.op_type == "Gemm" and node.attributes.get_int("transA", 0)
        wanted = (0 if trans_a else 1) if node.op_type == "Gemm" else cmap.rank - 1
        if cmap.axis != wanted:
            raise Blocked("channels are not the reduced axis")
        cg.slice_const(node, weight, in_axis, node.inputs[0], "in")
        cg.use(node, 0)
    rank = 2 if node.op_type == "Gemm" else cg.rank(node.inputs[0])
    if rank is None:
        return
    _new_source(cg, node, weight, out_axis, weight.const_value.shape[out_axis], rank)
