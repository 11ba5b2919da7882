"""Streaming calibration statistics and the four range methods."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcompress.passes.quant.ranges import (
    BINS,
    TensorStats,
    choose_range,
    collect,
    fake_quantize,
)
from tests.passes.quant.test_qdq import conv_model, feeds


def stats_of(values: np.ndarray) -> TensorStats:
    stats = TensorStats()
    for chunk in np.array_split(values, 4):  # several batches, as calibration sees them
        stats.add_extremes(chunk)
    for chunk in np.array_split(values, 4):
        stats.add_histogram(chunk)
    return stats


def test_calibration_streams_running_statistics():
    model = ir.from_proto(conv_model())
    data = feeds(5)
    lines = []
    stats = collect(
        model, ["x", "r1"], data, histograms=True, channel_axes={"x": 1}, progress=lines.append
    )
    everything = np.concatenate([f["x"] for f in data])
    assert stats["x"].lo == everything.min() and stats["x"].hi == everything.max()
    np.testing.assert_allclose(stats["x"].channel_mean, everything.mean((0, 2, 3)), atol=1e-6)
    assert stats["x"].hist.sum() + stats["x"].zeros == everything.size
    assert stats["r1"].zeros > 0  # ReLU zeros are counted apart from the histogram
    assert lines[-1].startswith("calibration [") and lines[-1].endswith("5/5")


def test_histogram_edge_grows_in_one_sweep_without_losing_counts():
    """A later batch reaching past the edge doubles it, merging bin pairs: the result is the
    histogram of everything over the final edge (bar float rounding at bin boundaries)."""
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal(5000).astype(np.float32) * scale for scale in (1, 7, 2)]
    stats = TensorStats()
    for batch in batches:
        stats.add_extremes(batch)
        stats.add_histogram(batch)
    everything = np.concatenate(batches)
    assert stats.edge >= np.abs(everything).max()
    assert stats.edge < 2 * np.abs(everything).max() * 2  # doubled only as often as needed
    reference, _ = np.histogram(everything, bins=BINS, range=(-stats.edge, stats.edge))
    assert stats.hist.sum() + stats.zeros == everything.size
    assert np.abs(stats.hist - reference).sum() <= everything.size // 1000


def test_range_methods_clip_outliers():
    values = np.random.default_rng(0).standard_normal(200_000).astype(np.float32)
    values[:5] = 40.0  # a few outliers far out
    stats = stats_of(values)
    assert choose_range(stats, "minmax", levels=255, symmetric=False) == (stats.lo, stats.hi)
    for method in ("percentile", "entropy"):
        lo, hi = choose_range(stats, method, levels=255, symmetric=False, entropy_guard=False)
        assert stats.lo <= lo < 0 < hi < 20, method
    # five far outliers weigh more in the squared error than rounding 200,000 values: mse,
    # and entropy guarded by it, keep them
    for method in ("mse", "entropy"):
        lo, hi = choose_range(stats, method, levels=255, symmetric=False)
        assert stats.lo <= lo < 0 < hi <= stats.hi


def test_one_sided_tensor_keeps_its_zero_and_uses_every_level():
    values = np.maximum(np.random.default_rng(1).exponential(1.0, 100_000), 0).astype(np.float32)
    values[::2] = 0.0  # half exact zeros, as after a ReLU
    stats = stats_of(values)
    assert stats.zeros == 50_000
    for method in ("percentile", "entropy", "mse"):
        lo, hi = choose_range(stats, method, levels=255, symmetric=False)
        assert lo == 0.0 and 2.0 < hi <= stats.hi, (method, hi)


def test_symmetric_ranges_stay_inside_the_seen_values():
    values = np.random.default_rng(2).standard_normal(50_000).astype(np.float32) + 0.5
    stats = stats_of(values)
    for method in ("percentile", "entropy", "mse"):
        lo, hi = choose_range(stats, method, levels=255, symmetric=True)
        assert stats.lo <= lo < 0 < hi <= stats.hi, method


def test_fake_quantize_is_exact_on_the_grid_and_clamps_outside():
    grid = (np.arange(256) - 40) * 0.02  # [-0.8, 4.3]: zero is a level
    np.testing.assert_allclose(fake_quantize(grid, -0.8, 4.3, 255), grid, atol=1e-9)
    np.testing.assert_allclose(fake_quantize(np.array([-5.0, 9.0]), -0.8, 4.3, 255), [-0.8, 4.3])


def test_no_values_gives_an_empty_range():
    assert choose_range(TensorStats(), "entropy", levels=255, symmetric=False) == (0.0, 0.0)


def test_entropy_guard_never_raises_the_histogram_error_above_min_max():
    from onnxcompress.passes.quant.ranges import _HistogramError

    values = np.random.default_rng(3).exponential(1.0, 200_000).astype(np.float32)
    stats = stats_of(values)
    error = _HistogramError(stats, 255, False)
    pure = choose_range(stats, "entropy", levels=255, symmetric=False, entropy_guard=False)
    guarded = choose_range(stats, "entropy", levels=255, symmetric=False)
    assert pure[1] < stats.hi  # KL clips the exponential tail
    assert error(*guarded) <= error(stats.lo, stats.hi)


def _batched(batches: list[np.ndarray]) -> TensorStats:
    stats = TensorStats()
    for batch in batches:
        stats.add_extremes(batch)
    for batch in batches:
        stats.add_histogram(batch)
    return stats


def test_holdout_guard_keeps_a_clip_both_halves_agree_on():
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(4):  # every batch: a bulk and a few far outliers
        batch = rng.standard_normal(20000).astype(np.float32)
        batch[:3] = rng.uniform(60, 100, 3)
        batches.append(batch)
    stats = _batched(batches)
    clipped = choose_range(stats, "mse", levels=255, symmetric=False)
    assert clipped[1] < stats.hi  # mse clips the rare tail
    assert choose_range(stats, "mse", levels=255, symmetric=False, holdout=True) == clipped


def test_holdout_guard_refuses_a_clip_the_other_half_contradicts():
    """One half of the batches is narrow, the other carries a wide, well-populated band: a
    range fitted on the narrow half clips what the other half needs, so min/max stays."""
    rng = np.random.default_rng(1)
    narrow = [rng.standard_normal(20000).astype(np.float32) for _ in range(2)]
    wide = [rng.uniform(-40, 40, 20000).astype(np.float32) for _ in range(2)]
    stats = _batched([narrow[0], wide[0], narrow[1], wide[1]])  # halves: even narrow, odd wide
    guarded = choose_range(stats, "percentile", levels=255, symmetric=False, holdout=True)
    assert guarded == (stats.lo, stats.hi)
    assert stats.halves() is not None and _batched(narrow[:1]).halves() is None
