"""The numerics of lowrank, free of graphs: truncated SVD, Tucker-2, depthwise-separable fits,
and the data-aware pieces on a layer's calibration moments (``stats.SecondMoments``):
whitening, least-squares refits, output errors.

A layer is seen as ``y = M·x + b`` with ``M`` [O, D]: for a Conv, ``x`` is a patch (im2col row,
D = C·prod(kernel)); for Gemm/MatMul it is a row of the left operand. Every scheme produces a
first stage ``F`` [r, D] (one or two ops before the last) and a last factor ``A`` [O, r].
"""

from __future__ import annotations

import math

import numpy as np

from onnxcompress.stats import SecondMoments

#: Relative damping added to covariance diagonals: dead (always-zero) inputs are common after
#: ReLU and would make them singular.
DAMPING = 1e-6


def svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.linalg.svd(matrix.astype(np.float64), full_matrices=False)


def rank_for_energy(singular_values: np.ndarray, share: float) -> int:
    """Smallest rank whose singular values hold ``share`` of sum(s^2)."""
    energy = np.cumsum(np.square(singular_values))
    total = energy[-1] if len(energy) and energy[-1] > 0 else 1.0
    return int(np.searchsorted(energy / total, share - 1e-12)) + 1


def unfold_bases(weight: np.ndarray) -> tuple[tuple, tuple]:
    """SVDs (u, s) of the output-channel and input-channel unfoldings of a conv weight."""
    out_u, out_s, _ = svd(weight.reshape(weight.shape[0], -1))
    in_unfold = np.moveaxis(weight, 1, 0).reshape(weight.shape[1], -1)
    in_u, in_s, _ = svd(in_unfold)
    return (out_u, out_s), (in_u, in_s)


def tucker2(weight: np.ndarray, rank_in: int, rank_out: int):
    """Tucker-2 of a conv weight [O, C, *k]: (u_in [C, r1], core [r2, r1, *k], u_out [O, r2]),
    with weight ≈ core ×0 u_out ×1 u_in (HOSVD: leading singular vectors of each unfolding)."""
    (out_u, _), (in_u, _) = unfold_bases(weight)
    u_out, u_in = out_u[:, :rank_out], in_u[:, :rank_in]
    core = np.einsum("oc...,or,cs->rs...", weight.astype(np.float64), u_out, u_in)
    return u_in, core, u_out


def tucker2_first_stage(u_in: np.ndarray, core: np.ndarray) -> np.ndarray:
    """The [r2, C·k] map from a patch to the last 1×1 conv's input: core ∘ (1×1 conv u_inᵀ)."""
    kernel = core.shape[2:]
    composite = np.einsum("rs...,cs->rc...", core, u_in)  # [r2, C, *k]
    return composite.reshape(core.shape[0], u_in.shape[0] * math.prod(kernel))


def separable(weight: np.ndarray, multiplier: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Depthwise [C·m, 1, *k] and pointwise [O, C·m] fitted per input channel by a rank-m SVD of
    weight[:, c] as an O × prod(k) matrix; exact when m = min(O, prod(k)). Also the relative
    Frobenius error."""
    out_channels, in_channels, *kernel = weight.shape
    taps = math.prod(kernel)
    depthwise = np.zeros((in_channels * multiplier, taps))
    pointwise = np.zeros((out_channels, in_channels * multiplier))
    dropped = 0.0
    for c in range(in_channels):
        u, s, vt = svd(weight[:, c].reshape(out_channels, taps))
        m = min(multiplier, len(s))
        root = np.sqrt(s[:m])
        rows = slice(c * multiplier, c * multiplier + m)
        depthwise[rows] = root[:, None] * vt[:m]
        pointwise[:, rows] = u[:, :m] * root
        dropped += float(np.square(s[m:]).sum())
    total = float(np.square(weight.astype(np.float64)).sum())
    error = math.sqrt(dropped / total) if total > 0 else 0.0
    return depthwise.reshape(in_channels * multiplier, 1, *kernel), pointwise, error


def separable_multiplier_for_energy(weight: np.ndarray, share: float) -> int:
    """Smallest depth multiplier keeping ``share`` of the weight's energy over all channels."""
    out_channels, in_channels = weight.shape[:2]
    kept = sum(
        np.cumsum(np.square(svd(weight[:, c].reshape(out_channels, -1))[1]))
        for c in range(in_channels)
    )
    total = kept[-1] if kept[-1] > 0 else 1.0
    return int(np.searchsorted(kept / total, share - 1e-12)) + 1


def separable_first_stage(depthwise: np.ndarray, multiplier: int) -> np.ndarray:
    """The [C·m, C·k] map from a patch to the pointwise conv's input: row c·m + j applies
    depthwise filter j of channel c to that channel's k taps (block diagonal)."""
    channels_m, _, *kernel = depthwise.shape
    taps = math.prod(kernel)
    filters = depthwise.reshape(channels_m, taps)
    first = np.zeros((channels_m, channels_m // multiplier * taps))
    for row in range(channels_m):
        channel = row // multiplier
        first[row, channel * taps : (channel + 1) * taps] = filters[row]
    return first


def output_error(moments: SecondMoments, matrix: np.ndarray, bias: np.ndarray | None) -> float:
    """Relative output error |y - (M x + b)| / |y| over the calibration rows."""
    affine = np.concatenate([matrix, _column(bias, matrix.shape[0])], axis=1)  # [O, D+1]
    return moments.error(affine.T)


def refit_last(
    moments: SecondMoments, first: np.ndarray, with_bias: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Least-squares last factor A [O, r] (and bias) given the first stage F [r, D]:
    minimizes |y - (A F x + b)| on the calibration rows."""
    rank = len(first)
    lift = _lift(first, with_bias)
    zz = lift @ moments.xx @ lift.T
    zy = lift @ moments.xy
    solution = np.linalg.solve(_damped(zz), zy).T
    return (solution[:, :rank], solution[:, rank]) if with_bias else (solution, None)


def refit_errors(moments: SecondMoments, basis: np.ndarray, with_bias: bool) -> np.ndarray:
    """The relative output error that ``refit_last`` leaves for every rank at once: entry
    r - 1 is the error with the first r rows of ``basis`` [R, D] as the first stage.

    Least squares on nested regressors: with the Cholesky factor C of their Gram matrix
    (intercept first, so every rank has it), w = C⁻¹·Σzy holds each regressor's share of
    the explained |y|², and the residual of the first k is |y|² minus the first k shares.
    One factorization instead of a refit per candidate rank."""
    lift = _lift(basis, with_bias)
    if with_bias:  # the intercept first: every rank keeps it
        lift = np.roll(lift, 1, axis=0)
    gram = _damped(lift @ moments.xx @ lift.T)
    shares = np.square(np.linalg.solve(np.linalg.cholesky(gram), lift @ moments.xy)).sum(1)
    explained = np.cumsum(shares)[int(with_bias) :]
    if moments.yy <= 0:
        return np.zeros(len(basis))
    return np.sqrt(np.maximum(moments.yy - explained, 0.0) / moments.yy)


def _lift(first: np.ndarray, with_bias: bool) -> np.ndarray:
    """[F 0; 0 1] (the intercept row last), without it when there is no bias: the map from
    x̃ = [x, 1] to the last factor's input."""
    rank, inputs = first.shape
    lift = np.zeros((rank + 1, inputs + 1))
    lift[:rank, :inputs] = first
    lift[rank, inputs] = 1.0
    return lift if with_bias else lift[:rank]


def whitened_svd(
    moments: SecondMoments, matrix: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(s, vt, L) of the SVD of M·L where L Lᵀ is the centred input covariance: truncating it
    minimizes the output error, not the weight error."""
    inputs = matrix.shape[1]
    mean = moments.mean_input()
    covariance = moments.xx[:inputs, :inputs] / max(moments.count, 1) - np.outer(mean, mean)
    lower = np.linalg.cholesky(_damped(covariance))
    _, s, vt = np.linalg.svd(matrix @ lower, full_matrices=False)
    return s, vt, lower


def refine_separable(
    moments: SecondMoments, depthwise: np.ndarray, multiplier: int, iterations: int = 3
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Alternating least squares on calibration data for a depthwise-separable pair: with the
    pointwise conv fixed the depthwise filters are linear in the output, and the other way
    round, so each half-step is an exact least-squares solve. Returns (depthwise [C·m, 1, *k],
    pointwise [O, C·m], bias [O])."""
    kernel = depthwise.shape[2:]
    first = separable_first_stage(depthwise, multiplier)
    pointwise, bias = refit_last(moments, first, with_bias=True)
    for _ in range(iterations):
        depthwise = _depthwise_step(moments, pointwise, bias, multiplier).reshape(-1, 1, *kernel)
        first = separable_first_stage(depthwise, multiplier)
        pointwise, bias = refit_last(moments, first, with_bias=True)
    return depthwise, pointwise, bias


def _depthwise_step(
    moments: SecondMoments, pointwise: np.ndarray, bias: np.ndarray, multiplier: int
) -> np.ndarray:
    """Depthwise filters [C·m, k] minimizing |y - b - P·D(x)| with P and b fixed."""
    inputs = moments.inputs
    channels = pointwise.shape[1] // multiplier
    taps = inputs // channels
    xx = moments.xx[:inputs, :inputs].reshape(channels, taps, channels, taps)
    gram = (pointwise.T @ pointwise).reshape(channels, multiplier, channels, multiplier)
    lhs = np.einsum("ajbk,atbs->ajtbks", gram, xx).reshape(channels * multiplier * taps, -1)
    target = moments.xy[:inputs].T - np.outer(bias, moments.xx[:inputs, inputs])  # Σ (y-b) xᵀ
    rhs = np.einsum(
        "oaj,oat->ajt",
        pointwise.reshape(-1, channels, multiplier),
        target.reshape(-1, channels, taps),
    )
    solution = np.linalg.solve(_damped(lhs), rhs.reshape(-1))
    return solution.reshape(channels * multiplier, taps)


def whitened_basis(vt: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """Vᵀ L⁻¹: the first stage of the whitened truncation at full rank; rank r keeps its
    first r rows (one solve for every rank a search tries)."""
    return np.linalg.solve(lower.T, vt.T).T


def _damped(matrix: np.ndarray) -> np.ndarray:
    scale = float(np.trace(matrix)) / max(len(matrix), 1)
    return matrix + np.eye(len(matrix)) * max(scale, 1e-12) * DAMPING


def _column(bias: np.ndarray | None, rows: int) -> np.ndarray:
    return (np.zeros(rows) if bias is None else bias.astype(np.float64)).reshape(rows, 1)
