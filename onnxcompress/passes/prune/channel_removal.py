"""Removing pruned channels from a walked channel graph: every recorded constant is cut to the
kept positions, attributes and shape inputs are recomputed (depthwise group counts, grouped
conv weights, Split sizes, Slice bounds, Reshape targets, Resize sizes) and activation shapes
are updated, so the graph stays valid and checkable."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcompress.emit import Emitter
from onnxcompress.graph import node_label, set_constant
from onnxcompress.passes.prune.channel_graph import AttrFix, ChannelGraph, kept_positions


def apply(cg: ChannelGraph, pruned: np.ndarray, emitter: Emitter) -> None:
    """Remove the pruned atoms everywhere: constants, attributes, activation shapes. New
    shape constants (Split sizes, Slice bounds, Reshape targets) come from ``emitter``."""
    done: set[tuple[int, int]] = set()
    for fix in cg.slices:
        if (id(fix.param), fix.axis) in done:
            continue
        done.add((id(fix.param), fix.axis))
        array = np.asarray(fix.param.const_value.numpy())
        kept = kept_positions(cg, fix.ref, pruned)
        set_constant(fix.param, np.take(array, kept, axis=fix.axis))
    for fix in cg.attrs:
        _ATTR_FIXES[fix.kind](cg, fix, pruned, emitter)
    for value, cmap in cg.maps.items():
        if value.shape is not None and len(value.shape) == cmap.rank:
            dims = list(value.shape)
            dims[cmap.axis] = int((~pruned[cmap.atoms]).sum())
            value.shape = ir.Shape(dims)


def _replace_input(node: ir.Node, index: int, array: np.ndarray, emitter: Emitter) -> None:
    """Give ``node`` a fresh constant input (the old one may be shared), dropping the old."""
    old = node.inputs[index]
    base = old.name if old is not None and old.name else f"{node.name or node.op_type}.{index}"
    new = emitter.constant(f"{base}.pruned", array)
    while len(node.inputs) <= index:
        node.resize_inputs(len(node.inputs) + 1)
    node.replace_input_with(index, new)
    unused = old is not None and not old.uses() and old.name in node.graph.initializers
    if unused and not old.is_graph_input() and not old.is_graph_output():
        node.graph.initializers.pop(old.name)


def _kept_count(cg: ChannelGraph, value: ir.Value, pruned: np.ndarray) -> int:
    return int((~pruned[cg.maps[value].atoms]).sum())


def _fix_group(cg, fix: AttrFix, pruned, emitter: Emitter) -> None:
    count = _kept_count(cg, fix.info["ref"], pruned)
    fix.node.attributes["group"] = ir.AttrInt64("group", count)


def _fix_split(cg, fix: AttrFix, pruned, emitter: Emitter) -> None:
    node = fix.node
    sizes = np.array([_kept_count(cg, out, pruned) for out in node.outputs], dtype=np.int64)
    opset = cg.graph.opset_imports.get("", 13)
    if opset >= 13:
        node.attributes.pop("num_outputs", None)
        _replace_input(node, 1, sizes, emitter)
    else:
        node.attributes["split"] = ir.AttrInt64s("split", sizes.tolist())


def _fix_slice(cg, fix: AttrFix, pruned, emitter: Emitter) -> None:
    node, index = fix.node, fix.info["index"]
    kept_before = np.cumsum(np.concatenate([[0], ~pruned[cg.maps[node.inputs[0]].atoms]]))
    for input_index, bound in ((1, fix.info["start"]), (2, fix.info["stop"])):
        values = np.asarray(node.inputs[input_index].const_value.numpy()).copy()
        values[index] = kept_before[bound]
        _replace_input(node, input_index, values, emitter)


def _fix_reshape(cg, fix: AttrFix, pruned, emitter: Emitter) -> None:
    node, axis = fix.node, fix.info["axis"]
    target = np.asarray(node.inputs[1].const_value.numpy()).copy()
    if target[axis] > 0:
        target[axis] = _kept_count(cg, node.inputs[0], pruned) * fix.info["inner"]
        _replace_input(node, 1, target, emitter)


def _fix_resize(cg, fix: AttrFix, pruned, emitter: Emitter) -> None:
    node, source = fix.node, fix.info["ref"]
    sizes = np.asarray(node.inputs[3].const_value.numpy()).copy()
    sizes[cg.maps[source].axis] = _kept_count(cg, source, pruned)
    _replace_input(node, 3, sizes, emitter)


def _fix_grouped(cg, fix: AttrFix, pruned, emitter: Emitter) -> None:
    """Rebuild a grouped conv weight: each group keeps its own kept rows and columns."""
    info = fix.info
    weight = np.asarray(info["weight"].const_value.numpy())
    groups, rows_per, cols_per = info["groups"], weight.shape[0] // info["groups"], weight.shape[1]
    out_keep = ~pruned[cg.maps[info["output"]].atoms]
    source = info["input"]
    in_keep = (
        ~pruned[cg.maps[source].atoms] if source in cg.maps else np.ones(groups * cols_per, bool)
    )
    parts = []
    for g in range(groups):
        rows = weight[g * rows_per : (g + 1) * rows_per][
            out_keep[g * rows_per : (g + 1) * rows_per]
        ]
        parts.append(rows[:, in_keep[g * cols_per : (g + 1) * cols_per]])
    if len({p.shape[1] for p in parts}) != 1:
        raise ValueError(f"{node_label(fix.node)}: groups lost different numbers of channels")
    set_constant(info["weight"], np.concatenate(parts, axis=0))


_ATTR_FIXES = {
    "grouped": _fix_grouped,
    "group": _fix_group,
    "split": _fix_split,
    "slice": _fix_slice,
    "reshape": _fix_reshape,
    "resize": _fix_resize,
}
