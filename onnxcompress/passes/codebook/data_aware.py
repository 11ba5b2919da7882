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
from onnxcompress.stats import ChannelMean, SecondMoments, captured_parts, output_shift

#: Gram matrices are kept for inputs up to this many features, and this many bytes in all.
MAX_GRAM_FEATURES = 4096
GRAM_BUDGET_BYTES = 128 << 20  # counted as two float64 sums while they are gathered
#: A pointwise conv's Gram matrix takes at most this many pixels of each sample: on
#: EfficientNet-Lite1 (50 images a fold) 256 gave the same top-1, agreement and logits error
#: as 1024 (0.87 / 0.94 / 0.078) with the per-fold time from 43 s to 29 s.
GRAM_ROWS = 256
#: Rows of a Gram matrix held before they are multiplied (see ``_BufferedGram``).
PENDING_ROWS = 256
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
        self.squares = ChannelMean(axis=1 if conv else -1, squares=True)
        self.halves = None  # Σ x xᵀ of alternate samples (or rows), kept apart
        if want_gram:
            self.halves = (_BufferedGram(), _BufferedGram())
        self.turn = 0

    def add(self, activation: np.ndarray) -> None:
        self.channels.add(activation)
        self.squares.add(activation)
        if self.halves is not None:
            if self.conv:  # a sample at a time: the halves alternate by sample
                self.halves[self.turn].add(self._pixels(activation))
                self.turn = 1 - self.turn
            else:  # by row, alternating across parts (a part may hold a single row)
                rows = activation.reshape(-1, activation.shape[-1])
                for half, share in ((self.turn, rows[0::2]), (1 - self.turn, rows[1::2])):
                    if len(share):
                        self.halves[half].add(share)
                self.turn = (self.turn + len(rows)) % 2

    def _pixels(self, activation: np.ndarray) -> np.ndarray:
        """A conv input's pixels as rows [P, C], at most ``GRAM_ROWS`` of them (the pixels
        of one image are much alike), picked before anything is copied."""
        channels = activation.shape[1]
        columns = np.moveaxis(activation, 1, 0).reshape(channels, -1)  # a view for one sample
        if columns.shape[1] > GRAM_ROWS:
            columns = columns[:, self.rng.choice(columns.shape[1], GRAM_ROWS, replace=False)]
        return columns.T

    def finish(self) -> InputStats:
        mean = self.channels.mean
        if mean is None:
            raise RuntimeError(f"internal: no calibration batch reached {self.node.name}")
        gram = halves = None
        if self.halves is not None:
            filled = [half.moments() for half in self.halves if half.rows]
            total = sum(half.xx for half in filled)
            gram = (total / sum(half.count for half in filled)).astype(np.float32)
            if len(filled) == 2:
                halves = tuple(_shrunk(half).astype(np.float32) for half in filled)
            self.halves = None
        return InputStats(self.node, mean, gram, self.squares.mean, halves)


class _BufferedGram:
    """Σ x xᵀ of rows that come a few at a time (one pixel sample, one fully connected row):
    held until they are as many as the features (``PENDING_ROWS`` at most, so that the rows
    held for all layers at once stay a few MB), then multiplied at once: the [D, D] sum is
    touched once per D rows, not once per sample. Products in float32 (half the time), sums
    in float64."""

    def __init__(self) -> None:
        self.sums = SecondMoments(intercept=False, product_dtype=np.float32)
        self.pending: list[np.ndarray] = []
        self.rows = 0

    def add(self, rows: np.ndarray) -> None:
        self.pending.append(np.array(rows, np.float32))  # a copy: the part's arrays go
        self.rows += len(rows)
        if sum(len(block) for block in self.pending) >= min(rows.shape[1], PENDING_ROWS):
            self._flush()

    def moments(self) -> SecondMoments:
        self._flush()
        return self.sums

    def _flush(self) -> None:
        if self.pending:
            self.sums.add(np.concatenate(self.pending))
            self.pending = []


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

    Inputs fold a sample at a time as one sweep runs (``captured_parts``)."""
    if not feeds:
        return {}, ["data_aware: no calibration feeds, nothing refined"]
    layers = _accumulators(weights, with_gram)
    if not layers:
        return {}, ["data_aware: no Conv/Gemm/MatMul weight with a single use to refine"]
    inputs = list(dict.fromkeys(layer.input for layer in layers.values()))
    try:
        for _, activations in captured_parts(model, inputs, feeds, _LABEL):
            for layer in layers.values():
                layer.add(activations[layer.input])
    except CannotRun as exc:
        return {}, [f"data_aware: statistics failed ({exc}); nothing refined"]
    stats = {name: layer.finish() for name, layer in layers.items()}
    return stats, [f"data_aware: statistics of {len(stats)} layer input(s) on {len(feeds)} feed(s)"]


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
