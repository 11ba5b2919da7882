"""Weight-space fits of the codebook pass: 1-D k-means, binarization, ternarization and
product quantization.

Every fitter takes the weight as rows ``[G, M]`` (one row per codebook; for product
quantization sub-vectors ``[S, N, d]``, one codebook per subspace) and returns a
``CodebookFit(codebook [G, K, d], indices [G, N])``; scalar schemes have ``d = 1``. What
the fit stands for is decoded here in numpy exactly as the decoder graph computes it, so
the reported error is the error of the emitted model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Lloyd iterations at most; each costs O(k log n) on sorted values, so this is cheap.
MAX_ITER = 300
#: Stop when the centroids move less than this share of the values' variance (Σ shift²):
#: scikit-learn's criterion, 100x tighter. 1-D Lloyd creeps in the tails for hundreds of
#: iterations while the error no longer changes.
TOLERANCE = 1e-6
#: k-means++ seeding looks at this many values at most (seeding is O(n·k)).
SEED_SAMPLE = 20_000
#: TWN's threshold: weights within 0.7·mean|W| of zero become zero.
TERNARY_THRESHOLD = 0.7


@dataclass
class CodebookFit:
    """Codebooks and the index of each weight (or sub-vector) into its row's codebook."""

    codebook: np.ndarray  # [G, K, d] float64
    indices: np.ndarray  # [G, N] uint8, each < K

    def gathered(self) -> np.ndarray:
        """The codeword of every index, ``[G, N, d]`` (what GatherND computes)."""
        return np.take_along_axis(self.codebook, self.indices[:, :, None].astype(np.int64), 1)

    def decode(self) -> np.ndarray:
        """The rows the codebook stands for, ``[G, N·d]``."""
        return self.gathered().reshape(len(self.codebook), -1)

    def product_rows(self) -> np.ndarray:
        """For product quantization (one codebook per subspace, indices ``[S, N]``): the N
        rows ``[N, S·d]`` in input coordinates, subspace after subspace."""
        return self.gathered().transpose(1, 0, 2).reshape(self.indices.shape[1], -1)


def fit_scalar(
    rows: np.ndarray,
    k: int,
    init: str = "linear",
    zero_share: float = 0.05,
    rng: np.random.Generator | None = None,
) -> CodebookFit:
    """k-means of each row's values with ``k`` centroids (the 1-D fast path)."""
    codebook = np.zeros((len(rows), k, 1))
    indices = np.zeros(rows.shape, np.uint8)
    rng = rng or np.random.default_rng(0)
    for g, row in enumerate(rows):
        centroids, labels = kmeans_1d(row, k, init, zero_share, rng)
        codebook[g, : len(centroids), 0] = centroids
        indices[g] = labels
    return CodebookFit(codebook, indices)


def kmeans_1d(
    values: np.ndarray, k: int, init: str, zero_share: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (at most ``k``) and each value's label, for one codebook.

    Exact when there are at most ``k`` distinct values. When at least ``zero_share`` of the
    values are exactly zero (a pruned weight), centroid 0 is an exact zero and the other
    ``k - 1`` are fitted to the non-zero values, so zeros stay zero.
    """
    flat = np.asarray(values).ravel()
    # Sort in the stored precision (fast), search in float64 once: mixing dtypes in
    # searchsorted would copy the whole array on every iteration.
    ordered = np.sort(flat).astype(np.float64, copy=False)
    distinct = ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))]
    if len(distinct) <= k:
        return distinct.astype(np.float64), np.searchsorted(distinct, flat).astype(np.uint8)
    zeros = flat == 0
    if k >= 2 and zeros.mean() >= zero_share > 0:
        nonzero = ordered[ordered != 0]
        centroids = _lloyd_sorted(nonzero, k - 1, init, rng)
        labels = _assign(centroids, flat) + 1
        labels[zeros] = 0
        return np.concatenate(([0.0], centroids)), labels.astype(np.uint8)
    centroids = _lloyd_sorted(ordered, k, init, rng)
    return centroids, _assign(centroids, flat).astype(np.uint8)


def _assign(centroids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Label of the nearest centroid (centroids ascending): count the midpoints below."""
    bounds = (centroids[:-1] + centroids[1:]) / 2
    return np.searchsorted(bounds, values, side="right")


def _lloyd_sorted(ordered: np.ndarray, k: int, init: str, rng: np.random.Generator) -> np.ndarray:
    """Lloyd's k-means on ascending values: clusters are intervals, means come from prefix sums.

    Each iteration costs O(k log n), so a 10-million-value tensor clusters in about the
    time it takes to sort it. Centroids left with no value (seeds in the empty stretches of a
    heavy-tailed weight) are moved into the clusters that cost the most, and Lloyd goes on
    (``reseed_dead``)."""
    prefix = np.concatenate(([0.0], np.cumsum(ordered, dtype=np.float64)))
    squares = np.concatenate(([0.0], np.cumsum(np.square(ordered), dtype=np.float64)))
    tolerance = TOLERANCE * float(ordered.var())
    centroids, cuts = _lloyd_rounds(
        ordered, prefix, _initial_centroids(ordered, k, init, rng), tolerance
    )
    for _ in range(RESEED_ROUNDS):
        starts, ends = np.concatenate(([0], cuts)), np.concatenate((cuts, [len(ordered)]))
        moved = reseed_dead(ordered[None], prefix[None], squares[None], centroids[None],
                            starts[None], ends[None])  # fmt: skip
        if moved is None:
            break
        centroids, cuts = _lloyd_rounds(ordered, prefix, moved[0], tolerance)
    return centroids


def _lloyd_rounds(ordered, prefix, centroids, tolerance) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd iterations from ``centroids`` until they settle; the centroids and the cuts
    between their clusters."""
    cuts = None
    for _ in range(MAX_ITER):
        bounds = (centroids[:-1] + centroids[1:]) / 2
        new_cuts = np.searchsorted(ordered, bounds, side="left")
        if cuts is not None and np.array_equal(new_cuts, cuts):
            break
        cuts = new_cuts
        starts = np.concatenate(([0], cuts))
        ends = np.concatenate((cuts, [len(ordered)]))
        counts = ends - starts
        sums = prefix[ends] - prefix[starts]
        filled = counts > 0
        previous, centroids = centroids, centroids.copy()
        centroids[filled] = sums[filled] / counts[filled]
        centroids.sort()
        if np.square(centroids - previous).sum() <= tolerance:
            break
    bounds = (centroids[:-1] + centroids[1:]) / 2
    return centroids, np.searchsorted(ordered, bounds, side="left")


#: Times the centroids left empty are moved and Lloyd resumed. On PP-OCRv4's recognizer a
#: BN-folded 1×1 conv (values within ±0.9 but for a few up to 29) used 63 of 256 linear
#: seeds: relative error 6.1% at 8 bits, 0.9% with the empty ones moved. Weighing choices
#: (``RowQuantizer``) moves them once: on EfficientNet-Lite1 one round took the mean 4-bit
#: error from 0.0176 to 0.0149 and more rounds to 0.0149, for 40% more weighing time each.
RESEED_ROUNDS = 2


def reseed_dead(ordered, prefix, squares, centroids, starts, ends) -> np.ndarray | None:
    """Rows ``[G, M]`` of ascending values with ``centroids`` ``[G, k]`` whose clusters are
    ``[starts, ends)``: each centroid with no value is moved into one of its row's costliest
    clusters (the most squared error), part of the way into its values, so the next Lloyd
    rounds split it. The new centroids (ascending), or None when no row has an empty
    centroid and a cluster with error to split."""
    counts = ends - starts
    dead = counts == 0
    rows = np.arange(len(ordered))
    sums = _between(prefix, rows, starts, ends)
    cost = _between(squares, rows, starts, ends) - sums**2 / np.maximum(counts, 1)
    cost = np.where(dead, -np.inf, cost)
    useful = dead.any(axis=1) & (cost.max(axis=1) > 0)
    if not useful.any():
        return None
    worst = np.argsort(-cost, axis=1)  # each row's clusters, costliest first
    # the j-th empty centroid goes to the (j mod n)-th costliest of the n clusters with
    # values; when they are more than n, a cluster takes several, spread through its values
    alive = np.maximum((~dead).sum(axis=1, keepdims=True), 1)
    rank = np.clip(np.cumsum(dead, axis=1) - 1, 0, None)
    target = np.take_along_axis(worst, rank % alive, axis=1)
    share = (rank // alive + 1) / (dead.sum(axis=1, keepdims=True) // alive + 2)
    start = np.take_along_axis(starts, target, 1)
    end = np.take_along_axis(ends, target, 1)
    length = ordered.shape[1]
    inside = np.clip(start + ((end - start) * share).astype(np.int64), 0, length - 1)
    seeds = ordered.ravel()[(rows * length)[:, None] + inside]
    moved = np.where(dead & useful[:, None], seeds, centroids)
    moved.sort(axis=1)
    return moved


def _initial_centroids(
    ordered: np.ndarray, k: int, init: str, rng: np.random.Generator
) -> np.ndarray:
    low, high = float(ordered[0]), float(ordered[-1])
    if init == "linear":  # Deep Compression's finding: spread over [min, max]
        return np.linspace(low, high, k)
    sample = ordered
    if len(ordered) > SEED_SAMPLE:
        sample = np.sort(rng.choice(ordered, SEED_SAMPLE, replace=False))
    sample = sample.astype(np.float64)
    chosen = [float(sample[rng.integers(len(sample))])]
    distance = np.square(sample - chosen[0])
    for _ in range(k - 1):  # k-means++: the next seed with probability ∝ squared distance
        total = distance.sum()
        pick = (
            rng.choice(len(sample), p=distance / total) if total > 0 else rng.integers(len(sample))
        )
        chosen.append(float(sample[pick]))
        distance = np.minimum(distance, np.square(sample - chosen[-1]))
    return np.sort(np.array(chosen))


def fit_binary(rows: np.ndarray) -> CodebookFit:
    """α·sign(W) per row with α = mean|W| (the closed-form optimum of XNOR-Net's BWN)."""
    alpha = np.abs(rows).mean(axis=1)
    codebook = np.stack([-alpha, alpha], axis=1)[:, :, None]
    return CodebookFit(codebook, (rows >= 0).astype(np.uint8))


def fit_ternary(rows: np.ndarray) -> CodebookFit:
    """{-α, 0, +α} per row (TWN): threshold Δ = 0.7·mean|W|, α = mean|W| above it."""
    magnitude = np.abs(rows)
    delta = TERNARY_THRESHOLD * magnitude.mean(axis=1, keepdims=True)
    kept = magnitude > delta
    alpha = (magnitude * kept).sum(axis=1) / np.maximum(kept.sum(axis=1), 1)
    zero = np.zeros_like(alpha)
    codebook = np.stack([-alpha, zero, alpha, zero], axis=1)[:, :, None]
    indices = np.where(kept, np.where(rows > 0, 2, 0), 1).astype(np.uint8)
    return CodebookFit(codebook, indices)


def fit_product(vectors: np.ndarray, k: int, seed: int) -> CodebookFit:
    """Product quantization: k-means per subspace. ``vectors`` is ``[S, N, d]``."""
    from sklearn.cluster import KMeans  # imported here: only PQ needs it

    subspaces, count, dim = vectors.shape
    codebook = np.zeros((subspaces, k, dim))
    indices = np.zeros((subspaces, count), np.uint8)
    for s, points in enumerate(vectors.astype(np.float64)):
        unique = np.unique(points, axis=0)
        if len(unique) <= k:  # exact: every distinct sub-vector is a codeword
            codebook[s, : len(unique)] = unique
            indices[s] = _nearest(unique, points)
            continue
        model = KMeans(n_clusters=k, n_init=1, random_state=seed + s, max_iter=100)
        indices[s] = model.fit_predict(points)
        codebook[s] = model.cluster_centers_
    return CodebookFit(codebook, indices)


def _nearest(codewords: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Index of the nearest codeword for every point (chunked to bound memory)."""
    labels = np.empty(len(points), np.int64)
    step = max(1, 2_000_000 // max(len(codewords), 1))
    for start in range(0, len(points), step):
        chunk = points[start : start + step]
        distance = np.square(chunk[:, None, :] - codewords[None]).sum(-1)
        labels[start : start + step] = distance.argmin(1)
    return labels


def quantized_rows(rows: np.ndarray, k: int) -> np.ndarray:
    """Every value of each row replaced by the nearest of ``k`` centroids fitted to its row
    (``RowQuantizer``)."""
    return RowQuantizer(rows).quantized(k)


class RowQuantizer:
    """1-D k-means of every row of ``rows`` ``[G, M]`` at once, from a linear seeding (as
    ``fit_scalar`` with its defaults, less the zero centroid), for any k. For weighing
    choices: hundreds of fits per weight, each a few vector operations on values sorted
    once, where ``fit_scalar`` goes row by row."""

    ITERATIONS = 20  # the error settles long before the centroids stop moving
    RESEED_ROUNDS = 1  # empty centroids moved (``reseed_dead``) once when weighing

    def __init__(self, rows: np.ndarray) -> None:
        groups, length = rows.shape
        self.shape = rows.shape
        self.order = np.argsort(rows, axis=1)
        ordered = np.take_along_axis(rows, self.order, 1).astype(np.float64)
        self.low, self.high = ordered[:, :1], ordered[:, -1:]
        self.span = np.where(self.high > self.low, self.high - self.low, 1.0)
        self.offsets = 2.0 * np.arange(groups)[:, None]  # row i's keys in [2i, 2i + 1]
        self.keys = ((ordered - self.low) / self.span + self.offsets).ravel()
        self.prefix = np.concatenate((np.zeros((groups, 1)), np.cumsum(ordered, axis=1)), 1)
        self.first = (np.arange(groups) * length)[:, None]
        self.every = np.arange(groups)
        self.rows = rows
        self._ordered = ordered
        self._moments: tuple[np.ndarray, ...] | None = None
        self._weighted = False
        self._square_prefix: np.ndarray | None = None

    def squared_error(self, k: int, weights: np.ndarray | None = None) -> float:
        """Σ w·(x − c)² over every value x and its centroid c at ``k`` (w: ``weights``
        broadcastable to the rows, 1 without), from per-cluster sums: no array the size of
        the rows is made, so every width of a large weight is weighed in a few milliseconds."""
        if k >= self.shape[1]:
            return 0.0
        if self._moments is None or self._weighted is not (weights is not None):
            self._moments = self._weighted_prefixes(weights)
            self._weighted = weights is not None
        mass, first, second = self._moments
        centroids, _ = self.fit(k, labels=False)
        starts, ends = self._intervals(centroids, self.every)

        def within(prefix: np.ndarray) -> np.ndarray:
            return _between(prefix, self.every, starts, ends)

        error = within(second) - 2 * centroids * within(first) + centroids**2 * within(mass)
        return float(max(error.sum(), 0.0))

    def _weighted_prefixes(self, weights: np.ndarray | None) -> tuple[np.ndarray, ...]:
        """Running sums of w, w·x and w·x² over each row's sorted values."""
        ordered = self._ordered
        mass = np.ones(self.shape)
        if weights is not None:
            mass = np.take_along_axis(np.broadcast_to(weights, self.shape), self.order, 1)
        zero = np.zeros((self.shape[0], 1))
        return tuple(
            np.concatenate((zero, np.cumsum(values, axis=1)), 1)
            for values in (mass, mass * ordered, mass * ordered * ordered)
        )

    def quantized(self, k: int) -> np.ndarray:
        """The rows with each value replaced by its centroid."""
        if k >= self.shape[1]:
            return self.rows.astype(np.float64)
        centroids, labels = self.fit(k)
        approx = np.empty(self.shape)
        np.put_along_axis(approx, self.order, np.take_along_axis(centroids, labels, 1), 1)
        return approx

    def fit(self, k: int, labels: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Centroids ``[G, k]`` (ascending) and the label of every sorted value ``[G, M]``
        (None when not asked for). Empty centroids are moved as ``fit_scalar`` moves them
        (``reseed_dead``)."""
        length = self.shape[1]
        centroids = self.low + (self.high - self.low) * np.linspace(0.0, 1.0, k)
        self._lloyd(centroids, self.every)
        for _ in range(self.RESEED_ROUNDS):
            starts, ends = self._intervals(centroids, self.every)
            moved = reseed_dead(
                self._ordered, self.prefix, self._squares(), centroids, starts, ends
            )
            if moved is None:
                break
            changed = np.flatnonzero(np.any(moved != centroids, axis=1))
            centroids[changed] = moved[changed]
            self._lloyd(centroids, changed)
        if not labels:
            return centroids, None
        starts, _ = self._intervals(centroids, self.every)
        return centroids, _labels(starts, length)

    def _lloyd(self, centroids: np.ndarray, active: np.ndarray) -> None:
        """Lloyd iterations on the ``active`` rows' centroids, in place, each row until its
        centroids settle."""
        for _ in range(self.ITERATIONS):
            if not active.size:
                break
            current = centroids[active]
            starts, ends = self._intervals(current, active)
            counts = ends - starts
            sums = _between(self.prefix, active, starts, ends)
            moved = np.where(counts > 0, sums / np.maximum(counts, 1), current)
            moved.sort(axis=1)
            centroids[active] = moved
            # a row has settled when none of its centroids moves by a thousandth of its span
            active = active[np.any(np.abs(moved - current) > 1e-3 * self.span[active], axis=1)]

    def _squares(self) -> np.ndarray:
        """Running sums of the squared sorted values of each row (made once, when needed)."""
        if self._square_prefix is None:
            zero = np.zeros((self.shape[0], 1))
            self._square_prefix = np.concatenate((zero, np.cumsum(self._ordered**2, axis=1)), 1)
        return self._square_prefix

    def _intervals(self, centroids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        """Each cluster's [start, end) among the sorted values of its row, for ``rows``."""
        length = self.shape[1]
        bounds = (centroids[:, :-1] + centroids[:, 1:]) / 2
        keys = ((bounds - self.low[rows]) / self.span[rows] + self.offsets[rows]).ravel()
        cuts = np.searchsorted(self.keys, keys).reshape(len(rows), -1) - self.first[rows]
        starts = np.concatenate((np.zeros((len(rows), 1), np.int64), cuts), axis=1)
        ends = np.concatenate((cuts, np.full((len(rows), 1), length)), axis=1)
        return starts, ends


def _between(prefix: np.ndarray, rows: np.ndarray, starts: np.ndarray, ends: np.ndarray):
    """prefix[row, end] − prefix[row, start] for each of ``rows`` (gathered flat: no copy of
    the rows' prefixes)."""
    flat, base = prefix.ravel(), (rows * prefix.shape[1])[:, None]
    return flat[base + ends] - flat[base + starts]


def _labels(starts: np.ndarray, length: int) -> np.ndarray:
    """The cluster of every sorted position: how many cluster starts (after the first) lie at
    or before it."""
    groups = len(starts)
    flat = (starts[:, 1:] + (np.arange(groups) * (length + 1))[:, None]).ravel()
    steps = np.bincount(flat, minlength=groups * (length + 1)).reshape(groups, length + 1)
    return np.cumsum(steps[:, :length], axis=1)
