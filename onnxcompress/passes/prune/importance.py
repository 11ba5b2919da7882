"""How important each channel is: a score per atom (the producer filter's L1 or L2 norm, the
|gamma| of the BatchNormalization it passes through, or its mean |activation| on calibration
data), combined over the atoms that make up one channel (a residual Add ties several)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxcompress.calibration import Feed
from onnxcompress.passes.prune.channel_graph import ChannelGraph
from onnxcompress.stats import ChannelMean, captured_parts

IMPORTANCE = ("l1", "l2", "bn", "activation")
AGGREGATE = {"mean": np.mean, "sum": np.sum, "max": np.max}


def channel_scores(
    cg: ChannelGraph,
    method: str,
    aggregate: str,
    model: ir.Model,
    feeds: Sequence[Feed] | None,
) -> dict[int, float]:
    """A score per channel (union-find root): its atoms' scores combined by ``aggregate``;
    atoms without a score (not made by a producer) are left out, 0 when none has one."""
    atom_scores = _atom_scores(cg, method, model, feeds)
    combine = AGGREGATE[aggregate]
    scores = {}
    for root, atoms in cg.members().items():
        known = [atom_scores[a] for a in atoms if not math.isnan(atom_scores[a])]
        scores[root] = float(combine(known)) if known else 0.0
    return scores


def _atom_scores(cg: ChannelGraph, method: str, model: ir.Model, feeds) -> np.ndarray:
    """Filter norms first; ``bn`` and ``activation`` then override the atoms they know."""
    scores = np.full(len(cg.parent), np.nan)
    for source in cg.sources:
        atoms = cg.maps[source.output].atoms if source.output in cg.maps else None
        if atoms is None:
            continue
        weight = np.asarray(source.weight.const_value.numpy(), np.float64)
        rows = np.moveaxis(weight, source.axis, 0).reshape(weight.shape[source.axis], -1)
        norms = np.sqrt(np.square(rows).sum(1)) if method == "l2" else np.abs(rows).sum(1)
        scores[atoms] = norms
    if method == "bn":
        for atom, scale in cg.bn_scale.items():
            scores[atom] = scale
    elif method == "activation":
        _activation_scores(cg, scores, model, feeds or [])
    return scores


def _activation_scores(cg: ChannelGraph, scores: np.ndarray, model: ir.Model, feeds) -> None:
    """Mean |activation| of each producer's output channels over the calibration data."""
    outputs = {s.output.name: s.output for s in cg.sources if s.output in cg.maps}
    means = {name: ChannelMean(cg.maps[value].axis) for name, value in outputs.items()}
    for _, found in captured_parts(model, list(outputs), feeds, "model being pruned"):
        for name, array in found.items():
            means[name].add(np.abs(array))
    for name, mean in means.items():
        if mean.mean is not None:
            scores[cg.maps[outputs[name]].atoms] = mean.mean
