"""Data-aware refinement of a codebook fit: a fully connected (or pointwise conv) layer's
output error on the calibration inputs, not its weight error, is what is minimized.

Every refiner reads E[x xᵀ] of the layer's input (a Gram matrix G); an output error eᵀ G e
is quadratic in the codewords, so each codeword solve is closed-form. Product quantization
refines its codewords (``refine_product``); scalar codebooks also choose their indices with
error feedback (``fit_with_feedback``), fitted on one half of the calibration batches and
checked on the other. A refinement that does not lower the output error is dropped and the
k-means fit kept.
"""

from __future__ import annotations

import math

import numpy as np

from onnxcompress.passes.codebook.fit import CodebookFit


def refine_product(
    vectors: np.ndarray, fit: CodebookFit, gram: np.ndarray, sweeps: int = 2
) -> tuple[CodebookFit, float, float]:
    """Codewords that minimize the layer's output error, not the weight error (Q-CNN).

    ``vectors`` ``[S, N, d]`` are the sub-vectors of N output rows, each row an input-space
    vector whose subspace s is ``vectors[s, j]``; ``gram`` is E[x xᵀ] of the layer's input
    (over the same input coordinates). For fixed assignments the error Σⱼ eⱼᵀ G eⱼ is
    quadratic in the codewords of one subspace, so each subspace is solved in closed form
    holding the others fixed. Returns the fit and the output error before and after.
    """
    subspaces, count, dim = vectors.shape
    weight = vectors.transpose(1, 0, 2).reshape(count, -1)  # rows in input coordinates
    refined = CodebookFit(fit.codebook.copy(), fit.indices)  # codewords solved in place
    before = _output_error(weight, fit.product_rows(), gram)
    for _ in range(sweeps):
        for s in range(subspaces):
            span = slice(s * dim, (s + 1) * dim)
            residual = weight - refined.product_rows()
            residual[:, span] = weight[:, span]  # what subspace s has to explain
            pulled = residual @ gram[:, span]  # (G aⱼ)_s for every row j
            block = gram[span, span] + _ridge(gram) * np.eye(dim)
            for c in np.unique(fit.indices[s]):
                members = fit.indices[s] == c
                target = pulled[members].mean(0)
                refined.codebook[s, c] = np.linalg.solve(block, target)
    after = _output_error(weight, refined.product_rows(), gram)
    if after > before:  # numerical trouble: keep the weight-space fit
        return fit, before, before
    return refined, before, after


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
    num = float(((diff @ gram) * diff).sum())
    den = float(((weight @ gram) * weight).sum())
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0


#: The codewords are solved for (C·L² work) when C·L² is at most this.
SOLVE_BUDGET = 20_000_000


def fit_with_feedback(
    rows: np.ndarray, fit: CodebookFit, halves: tuple[np.ndarray, np.ndarray], rounds: int = 1
) -> tuple[CodebookFit, float, float]:
    """A scalar fit of ``rows`` ``[C, L]`` (fully connected or pointwise: L input features,
    ``fit`` with G codebooks, each shared by C/G consecutive rows) brought to the layer's
    output error: indices chosen with error feedback (``assign_with_feedback``), then the
    codewords solved in closed form for those indices (``rounds`` times: one did as well as two
    on Lite1), on the first half of the calibration Gram matrices; kept only if the output
    error on the other half falls.
    Returns the fit and the held-out relative output error before and after."""
    fitting, checking = halves
    channels, groups = len(rows), len(fit.codebook)
    owner = np.arange(channels) // (channels // groups)  # the codebook of each row
    before = _output_error(rows, fit.decode().reshape(rows.shape), checking)
    best, best_error = fit, before
    codebook = fit.codebook[:, :, 0]
    solve = rows.size * rows.shape[1] <= SOLVE_BUDGET
    for _ in range(rounds if solve else 1):
        indices = assign_with_feedback(rows, codebook[owner], fitting)
        if solve:
            codebook = solve_codewords(rows, indices, owner, codebook, fitting)
        candidate = CodebookFit(codebook[:, :, None].copy(), indices.reshape(groups, -1))
        error = _output_error(rows, candidate.decode().reshape(rows.shape), checking)
        if error < best_error:
            best, best_error = candidate, error
    return best, before, best_error


#: Input features rounded together before their feedback reaches the features after them
#: in one matrix product (GPTQ's lazy batch update: the same result, BLAS-3 instead of a
#: rank-1 update of the whole row block per feature).
FEEDBACK_BLOCK = 128


def assign_with_feedback(rows: np.ndarray, codebooks: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """Indices ``[C, L]`` of each row's weights into its row of ``codebooks`` ``[C, K]``,
    input feature after input feature; each rounding error is carried onto the features not
    yet rounded so as to cancel it at the layer's output (GPTQ's update: the rows of the
    upper Cholesky factor of the inverse Gram matrix)."""
    length = rows.shape[1]
    damped = gram + (0.01 * float(np.mean(np.diag(gram))) + 1e-12) * np.eye(length)
    factor = np.linalg.cholesky(np.linalg.inv(damped)).T  # upper: inverse = factorᵀ·factor
    work = rows.astype(np.float64).copy()
    indices = np.empty(rows.shape, np.uint8)
    every_row = np.arange(len(codebooks))
    for start in range(0, length, FEEDBACK_BLOCK):
        stop = min(start + FEEDBACK_BLOCK, length)
        errors = np.empty((len(rows), stop - start))
        for i in range(start, stop):
            column = work[:, i]
            nearest = np.abs(column[:, None] - codebooks).argmin(axis=1)
            indices[:, i] = nearest
            error = (column - codebooks[every_row, nearest]) / factor[i, i]
            work[:, i + 1 : stop] -= error[:, None] * factor[i, i + 1 : stop][None, :]
            errors[:, i - start] = error
        work[:, stop:] -= errors @ factor[start:stop, stop:]
    return indices


def refit_codewords(
    rows: np.ndarray, fit: CodebookFit, halves: tuple[np.ndarray, np.ndarray]
) -> tuple[CodebookFit, float, float]:
    """The codewords of a sparse weight's fit solved for the layer's output error on the first
    half of the calibration Gram matrices, its indices kept (feedback would turn its zeros
    into codewords) and its zero codewords held at zero; kept only if the error on the other
    half falls. Each row adds only its non-zeros to the normal equations, so the work is
    Σ (non-zeros of a row)², not C·L². Returns the fit and the held-out relative output error
    before and after."""
    fitting, checking = halves
    channels, groups = len(rows), len(fit.codebook)
    owner = np.arange(channels) // (channels // groups)
    codebook = fit.codebook[:, :, 0]
    before = _output_error(rows, fit.decode().reshape(rows.shape), checking)
    k = codebook.shape[1]
    systems, targets = np.zeros((groups, k, k)), np.zeros((groups, k))
    indices = fit.indices.reshape(rows.shape).astype(np.int64)
    for row, labels in enumerate(indices):
        g = owner[row]
        kept = np.flatnonzero(codebook[g][labels] != 0)
        if not len(kept):
            continue
        sub = fitting[np.ix_(kept, kept)]
        used, system = _cluster_gram(sub, labels[kept])
        systems[g][np.ix_(used, used)] += system
        targets[g] += np.bincount(labels[kept], weights=sub @ rows[row, kept], minlength=k)
    solved = codebook.astype(np.float64).copy()
    for g in range(groups):
        used = np.flatnonzero((np.diag(systems[g]) > 0) & (codebook[g] != 0))
        if len(used):
            block = systems[g][np.ix_(used, used)] + _ridge(fitting) * np.eye(len(used))
            solved[g, used] = np.linalg.solve(block, targets[g, used])
    candidate = CodebookFit(solved[:, :, None], fit.indices)
    after = _output_error(rows, candidate.decode().reshape(rows.shape), checking)
    return (candidate, before, after) if after < before else (fit, before, before)


def solve_codewords(
    rows: np.ndarray, indices: np.ndarray, owner: np.ndarray, codebook: np.ndarray, gram
) -> np.ndarray:
    """Codewords ``[G, K]`` minimizing Σ eᵀ G e over the rows for fixed ``indices``: per
    codebook, (Σ Aᵀ G A) c = Σ Aᵀ G w over the rows that share it. Unused codewords stay."""
    groups, k = codebook.shape
    systems = np.zeros((groups, k, k))
    targets = np.zeros((groups, k))
    pulled = rows @ gram  # (G w)ᵀ of every row
    for row, labels in enumerate(indices):
        used, system = _cluster_gram(gram, labels.astype(np.int64))
        systems[owner[row]][np.ix_(used, used)] += system
        targets[owner[row]] += np.bincount(labels, weights=pulled[row], minlength=k)
    solved = codebook.astype(np.float64).copy()
    ridge = _ridge(gram)
    for g in range(groups):
        used = np.flatnonzero(np.diag(systems[g]) > 0)
        if len(used):
            block = systems[g][np.ix_(used, used)] + ridge * np.eye(len(used))
            solved[g, used] = np.linalg.solve(block, targets[g, used])
    return solved
