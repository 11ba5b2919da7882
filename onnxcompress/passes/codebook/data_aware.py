"""Calibration statistics for the data-aware codebook: per layer, the input mean (for bias
correction) and, for fully connected layers, the input Gram matrix E[x xᵀ] (for refining the
codewords against the output error), gathered in one sweep over the calibration feeds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxcompress.calibration import Feed
from onnxcompress.emit import Emitter
from onnxcompress.errors import CannotRun
from onnxcompress.graph import is_pointwise_conv, weight_axes
from onnxcompress.stats import ChannelMean, SecondMoments, captured, captured_parts, output_shift

#: Gram matrices are kept for inputs up to this many features, and this many bytes in all.
MAX_GRAM_FEATURES = 4096
GRAM_BUDGET_BYTES = 128 << 20  # counted as two float64 sums while they are gathered
#: A pointwise conv's Gram matrix takes at most this many pixels of each sample.
GRAM_ROWS = 1024
#: Fully connected inputs are captured whole feeds at a time, this many bytes of them per feed.
FEED_GROUP_BYTES = 64 << 20
_LABEL = "model for calibration statistics"


@dataclass(frozen=True)
class InputStats:
    """What the calibration data says about one layer's input."""

    node: ir.Node  # the Conv/Gemm/MatMul that reads the weight
    mean: np.ndarray  # E[x] per input channel (Conv) or feature (Gemm/MatMul)
    gram: np.ndarray | None  # E[x xᵀ] over the input features (fully connected layers)
    power: np.ndarray | None = None  # E[x²] per input channel or feature
    #: E[x xᵀ] of alternate batches, shrunk toward its diagonal as far as its rows are few
    #: against the features: a fit on one half is checked on the other
    halves: tuple[np.ndarray, np.ndarray] | None = None


class _Accumulator:
    """Running sums of one layer's input, a batch at a time."""

    def __init__(self, node: ir.Node, conv: bool, want_gram: bool) -> None:
        self.node, self.input, self.conv = node, node.inputs[0].name, conv
        self.rng = np.random.default_rng(0)
        self.channels = ChannelMean(axis=1 if conv else -1)
        self.squares = ChannelMean(axis=1 if conv else -1)
        self.halves = None  # Σ x xᵀ of alternate samples (or rows), kept apart
        if want_gram:
            self.halves = (SecondMoments(intercept=False), SecondMoments(intercept=False))
        self.turn = 0

    def add(self, activation: np.ndarray) -> None:
        self.channels.add(activation)
        self.squares.add(np.square(activation, dtype=np.float64))
        if self.halves is not None:
            features = np.moveaxis(activation, 1, -1) if self.conv else activation
            rows = features.reshape(-1, features.shape[-1])
            if self.conv and len(rows) > GRAM_ROWS:  # pixels of one image are much alike
                rows = rows[self.rng.choice(len(rows), GRAM_ROWS, replace=False)]
            if self.conv:  # a sample at a time: the halves alternate by sample
                self.halves[self.turn].add(rows)
                self.turn = 1 - self.turn
            else:  # a feed at a time: by row
                self.halves[0].add(rows[0::2])
                self.halves[1].add(rows[1::2])

    def finish(self) -> InputStats:
        mean = self.channels.mean
        if mean is None:
            raise RuntimeError(f"internal: no calibration batch reached {self.node.name}")
        gram = halves = None
        if self.halves is not None:
            filled = [half for half in self.halves if half.count]
            total = sum(half.xx for half in filled)
            gram = (total / sum(half.count for half in filled)).astype(np.float32)
            if len(filled) == 2:
                halves = tuple(_shrunk(half).astype(np.float32) for half in self.halves)
            self.halves = None
        return InputStats(self.node, mean, gram, self.squares.mean, halves)


def _shrunk(moments: SecondMoments) -> np.ndarray:
    """E[x xᵀ] pulled toward its diagonal by d / (n + d) for n rows of d features: a Gram
    matrix of fewer rows than features is singular, and a fit to it would chase noise."""
    gram = moments.xx / moments.count
    share = len(gram) / (moments.count + len(gram))
    return (1 - share) * gram + share * np.diag(np.diag(gram))


def collect_stats(
    model: ir.Model, weights: list[ir.Value], feeds: list[Feed], with_gram: bool
) -> tuple[dict[str, InputStats], list[str]]:
    """Input statistics of every layer whose weight is in ``weights``, over ``feeds``, by
    weight name; and notes for the report.

    Conv inputs fold a sample at a time (``captured_parts``). Fully connected inputs fold a
    whole feed at a time, as their Gram matrix always has (a least-squares refit would carry
    the last bits of sums taken in another order into the codewords), in groups of at most
    ``FEED_GROUP_BYTES`` of values per feed (sizes seen in the first sweep)."""
    if not feeds:
        return {}, ["data_aware: no calibration feeds, nothing refined"]
    layers = _accumulators(weights, with_gram)
    if not layers:
        return {}, ["data_aware: no Conv/Gemm/MatMul weight with a single use to refine"]
    try:
        sample_bytes = _fold_parts(model, list(layers.values()), feeds)
        _fold_whole_feeds(model, [a for a in layers.values() if not a.conv], feeds, sample_bytes)
    except CannotRun as exc:
        return {}, [f"data_aware: statistics failed ({exc}); nothing refined"]
    stats = {name: layer.finish() for name, layer in layers.items()}
    return stats, [f"data_aware: statistics of {len(stats)} layer input(s) on {len(feeds)} feed(s)"]


def _fold_parts(model: ir.Model, layers: list[_Accumulator], feeds) -> dict[str, int]:
    """Fold the conv inputs a sample at a time; return the bytes a sample of each input takes."""
    sample_bytes: dict[str, int] = {}
    for _, activations in captured_parts(model, [a.input for a in layers], feeds, _LABEL):
        for layer in layers:
            value = activations[layer.input]
            sample_bytes[layer.input] = value.nbytes // (len(value) if value.ndim else 1)
            if layer.conv:
                layer.add(value)
    return sample_bytes


def _fold_whole_feeds(model: ir.Model, layers: list[_Accumulator], feeds, sample_bytes) -> None:
    first = next(iter(feeds[0].values()))
    samples = len(first) if np.ndim(first) else 1
    for group in _feed_groups(layers, sample_bytes, samples):
        for activations in captured(model, [layer.input for layer in group], feeds, _LABEL):
            for layer in group:
                layer.add(activations[layer.input])


def _feed_groups(
    layers: list[_Accumulator], sample_bytes: dict[str, int], samples: int
) -> list[list[_Accumulator]]:
    """``layers`` in groups whose inputs take at most ``FEED_GROUP_BYTES`` per feed."""
    groups: list[list[_Accumulator]] = []
    room = 0
    for layer in layers:
        size = sample_bytes.get(layer.input, 0) * samples
        if not groups or size > room:
            groups.append([])
            room = FEED_GROUP_BYTES
        groups[-1].append(layer)
        room -= size
    return groups


def _accumulators(weights: list[ir.Value], with_gram: bool) -> dict[str, _Accumulator]:
    """One accumulator per weight read by a single layer; Gram matrices while they fit
    ``MAX_GRAM_FEATURES`` and, in all, ``GRAM_BUDGET_BYTES``."""
    layers: dict[str, _Accumulator] = {}
    budget = GRAM_BUDGET_BYTES
    for value in weights:
        node = _layer_of(value)
        if node is None:
            continue
        conv = node.op_type == "Conv"
        features = value.const_value.shape[weight_axes(node).reduced]
        want = (
            with_gram
            and (not conv or is_pointwise_conv(node, stride_one=True))
            and features <= MAX_GRAM_FEATURES
        )
        want = want and budget >= 16 * features * features
        budget -= 16 * features * features if want else 0
        layers[value.name] = _Accumulator(node, conv, want)
    return layers


def _layer_of(value: ir.Value) -> ir.Node | None:
    """The one Conv, Gemm (transA=0) or 2-D MatMul reading ``value`` as its weight."""
    uses = value.uses()
    if len(uses) != 1:
        return None
    node, index = uses[0]
    if index != 1 or node.inputs[0] is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Conv":
        return node
    if node.op_type == "Gemm" and not node.attributes.get_int("transA", 0):
        return node
    if node.op_type == "MatMul" and len(value.const_value.shape) == 2:
        return node
    return None


def correct_bias(
    emitter: Emitter, value: ir.Value, weight: np.ndarray, approx: np.ndarray, stats: InputStats
) -> dict:
    """Shift the layer's bias by the mean output error the new weight causes on the data
    (a Conv/Gemm without a bias gets one)."""
    delta = (approx - weight).astype(np.float64)
    shift = output_shift(stats.node, delta, stats.mean)
    if shift is None:
        return {"bias_correction": "weight layout not understood"}
    if not np.any(shift):  # an exact fit: nothing to correct, and no bias worth adding
        return {"bias_correction": 0.0}
    problem = emitter.shift_bias(stats.node, -shift, f"{value.name}.codebook.bias")
    if problem is not None:
        return {"bias_correction": problem}
    return {"bias_correction": float(np.abs(shift).max(initial=0.0))}


def input_power(stats: InputStats | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """E[x²] of the input each weight of a ``shape`` weight multiplies, in that shape (None
    without statistics or for a layout this does not understand)."""
    if stats is None or stats.power is None:
        return None
    node, power = stats.node, stats.power
    if node.op_type == "Conv":
        groups = node.attributes.get_int("group", 1)
        out_channels, per_group = shape[0], shape[1]
        if power.size != groups * per_group or out_channels % groups:
            return None
        group_of = np.arange(out_channels) // (out_channels // groups)
        channel = group_of[:, None] * per_group + np.arange(per_group)[None, :]
        taps = [1] * (len(shape) - 2)
        return np.broadcast_to(power[channel].reshape(*channel.shape, *taps), shape)
    axis = weight_axes(node, 1, len(shape)).reduced
    if len(shape) != 2 or axis is None or power.size != shape[axis]:
        return None
    return np.broadcast_to(np.expand_dims(power, 1 - axis), shape)
