"""The numerics of the codebook pass: 1-D k-means, binarization, product quantization.

Every fitter takes the weight as rows ``[G, M]`` (one row per codebook) and returns
``Fit(codebook [G, K, d], indices [G, N])``; scalar schemes have ``d = 1``.
"""

from __future__ import annotations

import math
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
class Fit:
    codebook: np.ndarray  # [G, K, d] float64
    indices: np.ndarray  # [G, N] uint8, each < K

    def decode(self) -> np.ndarray:
        """The rows the codebook stands for, ``[G, N·d]``."""
        gathered = np.take_along_axis(self.codebook, self.indices[:, :, None].astype(np.int64), 1)
        return gathered.reshape(len(self.codebook), -1)


def fit_scalar(
    rows: np.ndarray,
    k: int,
    init: str = "linear",
    zero_share: float = 0.05,
    rng: np.random.Generator | None = None,
) -> Fit:
    """k-means of each row's values with ``k`` centroids (the 1-D fast path)."""
    codebook = np.zeros((len(rows), k, 1))
    indices = np.zeros(rows.shape, np.uint8)
    rng = rng or np.random.default_rng(0)
    for g, row in enumerate(rows):
        centroids, labels = kmeans_1d(row, k, init, zero_share, rng)
        codebook[g, : len(centroids), 0] = centroids
        indices[g] = labels
    return Fit(codebook, indices)


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
    time it takes to sort it.
    """
    prefix = np.concatenate(([0.0], np.cumsum(ordered, dtype=np.float64)))
    tolerance = TOLERANCE * float(ordered.var())
    centroids = _initial_centroids(ordered, k, init, rng)
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
    return centroids


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


def fit_binary(rows: np.ndarray) -> Fit:
    """α·sign(W) per row with α = mean|W| (the closed-form optimum of XNOR-Net's BWN)."""
    alpha = np.abs(rows).mean(axis=1)
    codebook = np.stack([-alpha, alpha], axis=1)[:, :, None]
    return Fit(codebook, (rows >= 0).astype(np.uint8))


def fit_ternary(rows: np.ndarray) -> Fit:
    """{-α, 0, +α} per row (TWN): threshold Δ = 0.7·mean|W|, α = mean|W| above it."""
    magnitude = np.abs(rows)
    delta = TERNARY_THRESHOLD * magnitude.mean(axis=1, keepdims=True)
    kept = magnitude > delta
    alpha = (magnitude * kept).sum(axis=1) / np.maximum(kept.sum(axis=1), 1)
    zero = np.zeros_like(alpha)
    codebook = np.stack([-alpha, zero, alpha, zero], axis=1)[:, :, None]
    indices = np.where(kept, np.where(rows > 0, 2, 0), 1).astype(np.uint8)
    return Fit(codebook, indices)


def fit_product(vectors: np.ndarray, k: int, seed: int) -> Fit:
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
    return Fit(codebook, indices)


def _nearest(codewords: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Index of the nearest codeword for every point (chunked to bound memory)."""
    labels = np.empty(len(points), np.int64)
    step = max(1, 2_000_000 // max(len(codewords), 1))
    for start in range(0, len(points), step):
        chunk = points[start : start + step]
        distance = np.square(chunk[:, None, :] - codewords[None]).sum(-1)
        labels[start : start + step] = distance.argmin(1)
    return labels


def refine_product(
    vectors: np.ndarray, fit: Fit, gram: np.ndarray, sweeps: int = 2
) -> tuple[Fit, float, float]:
    """Codewords that minimize the layer's output error, not the weight error (Q-CNN).

    ``vectors`` ``[S, N, d]`` are the sub-vectors of N output rows, each row an input-space
    vector whose subspace s is ``vectors[s, j]``; ``gram`` is E[x xᵀ] of the layer's input
    (over the same input coordinates). For fixed assignments the error Σⱼ eⱼᵀ G eⱼ is
    quadratic in the codewords of one subspace, so each subspace is solved in closed form
    holding the others fixed. Returns the fit and the output error before and after.
    """
    subspaces, count, dim = vectors.shape
    weight = vectors.transpose(1, 0, 2).reshape(count, -1)  # rows in input coordinates
    codebook = fit.codebook.copy()
    before = _output_error(weight, _rebuild(codebook, fit.indices), gram)
    for _ in range(sweeps):
        for s in range(subspaces):
            span = slice(s * dim, (s + 1) * dim)
            residual = weight - _rebuild(codebook, fit.indices)
            residual[:, span] = weight[:, span]  # what subspace s has to explain
            pulled = residual @ gram[:, span]  # (G aⱼ)_s for every row j
            block = gram[span, span] + _ridge(gram) * np.eye(dim)
            for c in np.unique(fit.indices[s]):
                members = fit.indices[s] == c
                target = pulled[members].mean(0)
                codebook[s, c] = np.linalg.solve(block, target)
    after = _output_error(weight, _rebuild(codebook, fit.indices), gram)
    if after > before:  # numerical trouble: keep the weight-space fit
        return fit, before, before
    return Fit(codebook, fit.indices), before, after


def _rebuild(codebook: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Rows ``[N, S·d]`` from per-subspace codewords and indices ``[S, N]``."""
    gathered = np.take_along_axis(codebook, indices[:, :, None].astype(np.int64), 1)
    return gathered.transpose(1, 0, 2).reshape(indices.shape[1], -1)


def refine_scalar(rows: np.ndarray, fit: Fit, gram: np.ndarray) -> tuple[Fit, float, float]:
    """Centroids that minimize the output error of each output row, assignments fixed.

    ``rows`` ``[N, k]`` are output rows in input coordinates, one codebook each (per-channel
    codebooks of a fully connected layer); for row j with one-hot assignment A the error
    (A c − w)ᵀ G (A c − w) is minimized by (Aᵀ G A) c = Aᵀ G w.
    """
    codebook = fit.codebook.copy()
    ridge = _ridge(gram)
    pulled_all = rows @ gram  # (G w)ᵀ for every row
    for j, labels in enumerate(fit.indices):
        used, system = _cluster_gram(gram, labels)
        system += ridge * np.eye(len(used))
        target = np.bincount(labels, weights=pulled_all[j], minlength=codebook.shape[1])[used]
        codebook[j, used, 0] = np.linalg.solve(system, target)
    new = Fit(codebook, fit.indices)
    before = _output_error(rows, fit.decode(), gram)
    after = _output_error(rows, new.decode(), gram)
    return (new, before, after) if after <= before else (fit, before, before)


def _cluster_gram(gram: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Aᵀ G A for one-hot assignments A, by summing G's rows and columns per cluster.

    O(k²) instead of the O(k²·K) of the matrix products; returns the used labels too.
    """
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    columns = np.add.reduceat(gram[:, order], starts, axis=1)  # G A
    return sorted_labels[starts], np.add.reduceat(columns[order], starts, axis=0)


def _ridge(gram: np.ndarray) -> float:
    return 1e-6 * float(np.trace(gram)) / max(len(gram), 1) + 1e-12


def _output_error(weight: np.ndarray, approx: np.ndarray, gram: np.ndarray) -> float:
    """Relative output error sqrt(Σ eᵀGe / Σ wᵀGw) over rows."""
    diff = weight - approx
    num = float(np.einsum("ij,jk,ik->", diff, gram, diff))
    den = float(np.einsum("ij,jk,ik->", weight, gram, weight))
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0
