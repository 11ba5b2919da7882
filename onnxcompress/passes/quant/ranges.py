"""Activation ranges for quantization, from running statistics over calibration feeds.

Feeds stream through onnxruntime one batch at a time, exposing only the tensors that need a
range; each batch is folded into fixed-size statistics (min/max, per-channel means, a
histogram) and dropped, so memory stays bounded by one batch whatever the number of samples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx_ir as ir

from onnxcompress.calibration import Feed
from onnxcompress.progress import tick
from onnxcompress.stats import ChannelMean, captured_parts

logger = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy", "mse")
#: Histogram bins over [-m, m] (m = the largest magnitude seen): 2048 per side.
BINS = 4096


@dataclass
class TensorStats:
    """Running statistics of one tensor over every calibration batch."""

    lo: float = np.inf
    hi: float = -np.inf
    channels: ChannelMean | None = None  # per-channel means (for bias correction), if asked
    hist: np.ndarray | None = None  # counts over [-edge, edge], exact zeros left out
    edge: float = 0.0
    zeros: int = 0  # exact zeros (ReLU outputs): representable exactly, so never clipped
    float32: bool = True  # every value seen was float32 (int64 shape paths, float16 are not)
    finite: bool = True  # no infinity or NaN seen
    batches: int = 0  # batches counted into the histogram
    odd: np.ndarray | None = None  # the histogram of the odd-numbered batches alone
    odd_zeros: int = 0

    @property
    def channel_mean(self) -> np.ndarray | None:
        return None if self.channels is None else self.channels.mean

    def add_extremes(self, array: np.ndarray) -> None:
        if array.dtype != np.float32:
            self.float32 = False
        if array.size == 0 or not self.float32:
            return
        low, high = float(array.min()), float(array.max())  # NaN if any value is NaN
        self.finite = self.finite and bool(np.isfinite(low) and np.isfinite(high))
        self.lo, self.hi = min(self.lo, low), max(self.hi, high)
        if self.channels is not None and array.ndim > self.channels.axis:
            self.channels.add(array)

    def add_histogram(self, array: np.ndarray, batch: int | None = None) -> None:
        """Count ``array`` into the histogram over [-edge, edge], doubling the edge (and
        merging bin pairs, exactly) whenever a batch reaches past it: one sweep suffices.
        ``batch`` is the calibration batch it comes from (the holdout halves alternate by
        batch, however capture splits one); by default each call is a batch of its own."""
        if not self.float32 or not self.finite or array.size == 0:
            return
        reach = float(max(-array.min(), array.max()))
        if self.hist is None:
            self.edge = max(reach, 1e-12)
            self.hist, self.odd = np.zeros(BINS, np.int64), np.zeros(BINS, np.int64)
        while reach > self.edge:
            self._double_edge()
        per_bin = np.float32(BINS / (2 * self.edge))
        bins = np.multiply(array.ravel(), per_bin, dtype=np.float32)
        bins += np.float32(BINS // 2)  # 0.0 lands on the first bin of the positive half
        indices = np.clip(bins, 0, BINS - 1).astype(np.intp)
        counts = np.bincount(indices, minlength=BINS)
        zeros = int(array.size - np.count_nonzero(array))
        counts[BINS // 2] -= zeros
        self.hist += counts
        self.zeros += zeros
        if (self.batches if batch is None else batch) % 2:
            self.odd += counts
            self.odd_zeros += zeros
        self.batches += 1

    def _double_edge(self) -> None:
        self.hist, self.odd, self.edge = _merged(self.hist), _merged(self.odd), 2 * self.edge

    def halves(self) -> tuple[TensorStats, TensorStats] | None:
        """The statistics of the even- and odd-numbered batches apart (the extremes are the
        whole set's), or None with fewer than two batches."""
        if self.batches < 2 or self.hist is None or self.odd is None or not self.odd.any():
            return None
        even = replace(self, hist=self.hist - self.odd, zeros=self.zeros - self.odd_zeros)
        return even, replace(self, hist=self.odd, zeros=self.odd_zeros)


def _merged(hist: np.ndarray) -> np.ndarray:
    """The histogram over twice the edge: bin pairs merged into the middle half."""
    merged = np.zeros(BINS, np.int64)
    merged[BINS // 4 : 3 * BINS // 4] = hist.reshape(-1, 2).sum(1)
    return merged


def collect(
    model: ir.Model,
    names: Sequence[str],
    feeds: Sequence[Feed],
    *,
    histograms: bool,
    channel_axes: Mapping[str, int] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, TensorStats]:
    """Statistics of the named tensors over ``feeds``, a batch at a time.

    One sweep gathers min/max (and per-channel means of the tensors in ``channel_axes``)
    and, for the histogram methods, histograms whose edge grows as batches need it.
    """
    axes = channel_axes or {}
    stats = {
        name: TensorStats(channels=ChannelMean(axes[name]) if name in axes else None)
        for name in names
    }
    label = "model being calibrated"
    for i, values in captured_parts(model, names, feeds, label):
        for name, array in values.items():
            stats[name].add_extremes(array)
            if histograms:
                # halves alternate by feed; one feed alone is split by capture's parts
                stats[name].add_histogram(array, i if len(feeds) > 1 else None)
        tick(progress, "calibration", i + 1, len(feeds))
    missing = [n for n, s in stats.items() if s.lo > s.hi]
    if missing:
        logger.debug("no values seen for %d tensors", len(missing))
    return stats


def choose_range(
    stats: TensorStats,
    method: str,
    *,
    levels: int,
    symmetric: bool,
    percentile: float = 99.99,
    entropy_guard: bool = True,
    holdout: bool = False,
) -> tuple[float, float]:
    """The clipping range [lo, hi] of one tensor for ``method``.

    ``levels`` is the number of quantization steps (255 for uint8/int8); ``symmetric`` ranges
    are centred on zero, as int8 with a zero point of 0 needs. With ``entropy_guard``, a KL
    threshold is kept only when it does not raise the tensor's own squared quantization
    error above that of min/max: KL alone happily clips heavy tails (ReLU outputs) that the
    next layers need. With ``holdout``, a clipped range is kept only when, chosen on one half
    of the calibration batches, it beats min/max on the other half (both ways round): a
    small calibration set shows too little of the tails to clip them safely.
    """
    options = dict(
        levels=levels, symmetric=symmetric, percentile=percentile, entropy_guard=entropy_guard
    )
    chosen = _method_range(stats, method, **options)
    if holdout and chosen != (stats.lo, stats.hi) and not _holds_out(stats, method, options):
        return stats.lo, stats.hi
    return chosen


def _method_range(
    stats: TensorStats,
    method: str,
    *,
    levels: int,
    symmetric: bool,
    percentile: float,
    entropy_guard: bool,
) -> tuple[float, float]:
    if stats.lo > stats.hi:
        return 0.0, 0.0
    if method == "minmax" or stats.hist is None or stats.hist.sum() == 0:
        return stats.lo, stats.hi
    if method == "percentile":
        lo, hi = _percentile_range(stats, percentile)
    elif method == "mse":
        lo, hi = _mse_range(stats, levels, symmetric)
    elif method == "entropy":
        lo, hi = _entropy_range(stats, levels, symmetric)
        if entropy_guard and _HistogramError(stats, levels, symmetric).worse(
            (lo, hi), (stats.lo, stats.hi)
        ):
            lo, hi = stats.lo, stats.hi
    else:
        raise ValueError(f"unknown calibration method {method!r}")
    return max(lo, stats.lo), min(hi, stats.hi)


def _holds_out(stats: TensorStats, method: str, options: dict) -> bool:
    """Whether ``method``'s range, fitted on each half of the batches, has less squared error
    than min/max on the other half, summed over both ways round."""
    halves = stats.halves()
    if halves is None:
        return False
    levels, symmetric = options["levels"], options["symmetric"]
    clipped = plain = 0.0
    for train, test in (halves, halves[::-1]):
        error = _HistogramError(test, levels, symmetric)
        clipped += error(*_method_range(train, method, **options))
        plain += error(stats.lo, stats.hi)
    return clipped < plain


def _centers(stats: TensorStats) -> np.ndarray:
    width = 2 * stats.edge / BINS
    return -stats.edge + width * (np.arange(BINS) + 0.5)


def _percentile_range(stats: TensorStats, percentile: float) -> tuple[float, float]:
    """Keep the central ``percentile``% of the values: half of the rest is cut off each end
    (the lower cut is moot for a one-sided tensor, whose range starts at zero anyway)."""
    assert stats.hist is not None
    counts = stats.hist.copy()
    counts[BINS // 2] += stats.zeros
    cumulative = np.cumsum(counts) / counts.sum()
    tail = (100.0 - percentile) / 200.0
    edges = np.linspace(-stats.edge, stats.edge, BINS + 1)
    hi = edges[min(int(np.searchsorted(cumulative, 1 - tail)) + 1, BINS)]
    lo = edges[int(np.searchsorted(cumulative, tail, side="right"))]
    return (min(lo, 0.0) if stats.lo < 0 else stats.lo), hi


class _HistogramError:
    """Squared quantization error of a range, summed over a tensor's histogram."""

    def __init__(self, stats: TensorStats, levels: int, symmetric: bool) -> None:
        assert stats.hist is not None
        counts = stats.hist.astype(np.float64)
        counts[BINS // 2] += stats.zeros
        used = counts > 0
        self.centers, self.counts = _centers(stats)[used], counts[used]
        self.levels, self.symmetric = levels, symmetric

    def __call__(self, lo: float, hi: float) -> float:
        lo, hi = zero_inclusive(lo, hi, self.symmetric)
        restored = fake_quantize(self.centers, lo, hi, self.levels)
        return float(self.counts @ np.square(self.centers - restored))

    def worse(self, candidate: tuple[float, float], baseline: tuple[float, float]) -> bool:
        return self(*candidate) > self(*baseline)


def _mse_range(stats: TensorStats, levels: int, symmetric: bool) -> tuple[float, float]:
    """Shrink each end of the min/max range (in turn, twice) to the point that minimizes the
    histogram's squared quantization error; symmetric ranges shrink both ends together."""
    error = _HistogramError(stats, levels, symmetric)
    factors = np.linspace(0.05, 1.0, 96)
    lo, hi = stats.lo, stats.hi
    for _ in range(1 if symmetric else 2):
        if symmetric:
            best = min(factors, key=lambda f: error(stats.lo * f, stats.hi * f))
            lo, hi = stats.lo * best, stats.hi * best
            continue
        hi = stats.hi * min(factors, key=lambda f: error(lo, stats.hi * f))
        lo = stats.lo * min(factors, key=lambda f: error(stats.lo * f, hi))
    return zero_inclusive(lo, hi, symmetric)


def zero_inclusive(lo: float, hi: float, symmetric: bool = False) -> tuple[float, float]:
    """[lo, hi] widened to hold zero (which must be exactly representable), and centred on it
    when ``symmetric``."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        bound = max(-lo, hi)
        return -bound, bound
    return lo, hi


def fake_quantize(values: np.ndarray, lo: float, hi: float, levels: int) -> np.ndarray:
    """Quantize then dequantize ``values`` on ``levels`` uniform steps spanning [lo, hi]."""
    scale = (hi - lo) / levels if hi > lo else 1.0
    zero = np.round(-lo / scale)
    q = np.clip(np.round(values / scale) + zero, 0, levels)
    return (q - zero) * scale


def _entropy_range(stats: TensorStats, levels: int, symmetric: bool) -> tuple[float, float]:
    """Thresholds whose quantized histogram keeps the least KL divergence (TensorRT style).

    A symmetric type folds both sides into magnitudes and searches one threshold with half
    the levels. An asymmetric type searches each side on its own, with the share of levels
    that side holds in the min/max range. Exact zeros are left out of the histogram: the zero
    point represents them exactly, and their spike would otherwise pull thresholds far down.
    """
    assert stats.hist is not None
    half = BINS // 2
    positive = stats.hist[half:].astype(np.float64)
    negative = stats.hist[:half][::-1].astype(np.float64)
    if symmetric:
        threshold = _kl_threshold(positive + negative, (levels + 1) // 2, stats.edge)
        return -threshold, threshold
    lo, hi = min(stats.lo, 0.0), max(stats.hi, 0.0)
    share = hi / (hi - lo) if hi > lo else 1.0
    upper = _kl_threshold(positive, round(levels * share), stats.edge) if hi > 0 else 0.0
    lower = _kl_threshold(negative, levels - round(levels * share), stats.edge) if lo < 0 else 0.0
    return -lower, upper


def _kl_threshold(magnitudes: np.ndarray, target: int, edge: float) -> float:
    """The magnitude at which to clip one side, searched over the bins that hold values."""
    used = int(np.flatnonzero(magnitudes)[-1]) + 1 if magnitudes.any() else 0
    if target < 8 or used <= target:
        return edge * used / len(magnitudes)  # too few levels or bins to gain from clipping
    best_bins, best_kl = used, np.inf
    for bins in range(target, used + 1, max(1, (used - target) // 128)):
        kl = _kl_after_quantizing(magnitudes, bins, target)
        if kl < best_kl:
            best_bins, best_kl = bins, kl
    return edge * best_bins / len(magnitudes)


def _kl_after_quantizing(magnitudes: np.ndarray, bins: int, target: int) -> float:
    """KL(P || Q): P is the histogram clipped at ``bins`` (outliers in its last bin), Q the
    same bins merged into ``target`` levels and spread back over the bins that held values."""
    kept = magnitudes[:bins]
    reference = kept.copy()
    reference[-1] += magnitudes[bins:].sum()
    level_of_bin = (np.arange(bins) * target) // bins
    nonzero = (kept > 0).astype(np.float64)
    level_sum = np.bincount(level_of_bin, weights=kept, minlength=target)
    level_nonzero = np.bincount(level_of_bin, weights=nonzero, minlength=target)
    spread = np.where(
        nonzero > 0, level_sum[level_of_bin] / np.maximum(level_nonzero, 1)[level_of_bin], 0
    )
    p_total, q_total = reference.sum(), spread.sum()
    if p_total <= 0 or q_total <= 0:
        return np.inf
    p, q = reference / p_total, spread / q_total
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
