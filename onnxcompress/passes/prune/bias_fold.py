"""Bias fold: the cheapest repair after removing input channels from a layer.

A removed input channel with mean ``m`` contributed ``W[:, c]·m`` to the layer's output on
average; adding that to the bias keeps the output's mean where it was. The means are measured
on calibration data (``measured_means``) or, without data, expected from the BatchNormalization
statistics upstream (``expected_means``). For a padded convolution each kernel tap is weighted
by the share of output positions where it reads inside the image (``tap_coverage``): a bias
holds the average over positions, and a tap that reads padding contributes nothing there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxcompress.calibration import Feed
from onnxcompress.emit import Emitter
from onnxcompress.graph import Shapes, node_label, weight_axes
from onnxcompress.passes.prune.channel_graph import ChannelGraph
from onnxcompress.passes.prune.repair import RefitResult, Target
from onnxcompress.stats import ChannelMean, captured_parts, output_shift


class NoBiasFold(Exception):
    """This layer gets no bias fold, for the reason given (a layout or data it cannot use)."""


def fold_bias(
    cg: ChannelGraph,
    targets: Sequence[Target],
    means: dict[str, np.ndarray | None],
    shapes: Shapes,
    pruned: np.ndarray,
    emitter: Emitter,
) -> dict[str, RefitResult]:
    """Fold the mean contribution of each target's removed input channels into its bias.

    ``means`` holds, by input name, the per-channel mean of each target's input before the
    removal (None or NaN where unknown); ``pruned`` is the mask of removed atoms."""
    results = {}
    for target in targets:
        node = target.node
        label = node_label(node)
        removed = pruned[cg.maps[node.inputs[0]].atoms]
        try:
            shift = _removed_contribution(target, removed, means.get(node.inputs[0].name), shapes)
        except NoBiasFold as why:
            results[label] = RefitResult(label, skipped=str(why))
            continue
        if target.out_keep is not None:
            shift = shift[target.out_keep]
        problem = emitter.shift_bias(node, shift, f"{node.inputs[1].name}.bias")
        results[label] = RefitResult(label, skipped=problem)
    return results


def _removed_contribution(
    target: Target, removed: np.ndarray, mean: np.ndarray | None, shapes: Shapes
) -> np.ndarray:
    """E[W·x] over the removed input channels, per output channel of the original weight."""
    node = target.node
    if mean is None or np.isnan(mean[removed]).any():
        raise NoBiasFold("expected value of the removed channels is unknown without data")
    weight = np.asarray(target.weight_before, np.float64)
    coverage = None
    if node.op_type == "Conv":
        if node.attributes.get_int("group", 1) != 1 or weight.ndim != 4:
            raise NoBiasFold("only plain 2-D convolutions get a bias fold")
        coverage = tap_coverage(node, shapes.get(node.inputs[0].name), weight.shape[2:])
    elif node.op_type != "Gemm" or node.attributes.get_float("beta", 1.0) == 0:
        raise NoBiasFold(f"{node.op_type} has no bias to fold into")
    along = [1] * weight.ndim
    along[weight_axes(node).reduced] = -1
    delta = np.where(removed.reshape(along), weight, 0.0)  # what the removal took away
    shift = output_shift(node, delta, np.where(removed, mean, 0.0), tap_weights=coverage)
    if shift is None:
        raise NoBiasFold(f"{node.op_type} weight layout is not understood")
    return shift


def tap_coverage(node: ir.Node, shape, kernel) -> np.ndarray:
    """Per kernel tap, the share of output positions where it reads inside the input."""
    if shape is None or len(shape) != 4 or None in shape[2:]:
        raise NoBiasFold("input spatial size unknown")
    attrs = node.attributes
    if attrs.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise NoBiasFold("auto_pad SAME_* is not folded")
    pads = list(attrs.get_ints("pads", [0, 0, 0, 0]))
    strides = list(attrs.get_ints("strides", [1, 1]))
    dilations = list(attrs.get_ints("dilations", [1, 1]))
    shares = []
    for axis in (0, 1):
        size, k, pad = shape[2 + axis], kernel[axis], pads[axis]
        span = dilations[axis] * (k - 1) + 1
        outputs = (size + pad + pads[axis + 2] - span) // strides[axis] + 1
        starts = np.arange(outputs) * strides[axis] - pad
        reads = starts[:, None] + np.arange(k)[None, :] * dilations[axis]
        shares.append(((reads >= 0) & (reads < size)).mean(0))
    return np.outer(shares[0], shares[1])


def measured_means(
    cg: ChannelGraph, targets: Sequence[Target], model: ir.Model, feeds: Sequence[Feed]
) -> dict[str, np.ndarray | None]:
    """Per-channel mean of each target's input over the calibration feeds, on ``model`` as it
    is now (call it before the removal)."""
    values = {t.node.inputs[0].name: t.node.inputs[0] for t in targets}
    means = {name: ChannelMean(cg.maps[value].axis) for name, value in values.items()}
    for _, found in captured_parts(model, list(values), feeds, "model before pruning"):
        for name, array in found.items():
            means[name].add(array)
    return {name: mean.mean for name, mean in means.items()}


def expected_means(value: ir.Value) -> np.ndarray | None:
    """Per-channel expected value of an activation from BN statistics alone, or None.

    Understood chains: BatchNormalization (mean beta, std |gamma|), then optionally Relu
    (a rectified Gaussian), Identity/Dropout, average pooling (keeps the mean).
    """
    stats = _expected_stats(value)
    return None if stats is None else stats[0]


def _expected_stats(value: ir.Value) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(mean, std or None) per channel of ``value``, walking up to a BatchNormalization."""
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "BatchNormalization":
        gamma, beta = (node.inputs[i].const_value for i in (1, 2))
        if gamma is None or beta is None:
            return None
        return np.asarray(beta.numpy(), np.float64), np.abs(np.asarray(gamma.numpy(), np.float64))
    upstream = _expected_stats(node.inputs[0]) if node.inputs else None
    if upstream is None:
        return None
    if node.op_type in ("Identity", "Dropout"):
        return upstream
    if node.op_type in ("AveragePool", "GlobalAveragePool"):
        return upstream[0], None
    if node.op_type == "Relu" and upstream[1] is not None:
        return _rectified(*upstream), None
    return None


def _rectified(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """E[max(0, x)] for x ~ N(mean, std²), per channel."""
    std = np.maximum(std, 1e-12)
    z = mean / std
    cdf = 0.5 * (1 + np.array([math.erf(v / math.sqrt(2)) for v in z]))
    pdf = np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return mean * cdf + std * pdf
