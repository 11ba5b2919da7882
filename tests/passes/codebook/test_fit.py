"""codebook: the k-means, product-quantization and refinement numerics."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcompress.passes.codebook.fit import (
    CodebookFit,
    RowQuantizer,
    fit_product,
    fit_scalar,
    kmeans_1d,
)
from onnxcompress.passes.codebook.refine import fit_with_feedback, refine_product
from tests.passes.codebook.models import correlated_inputs


def test_refinement_lowers_output_error_scalar_and_product():
    rng = np.random.default_rng(10)
    x = correlated_inputs(400, 32, 11)
    gram = x.T @ x / len(x)
    rows = rng.standard_normal((12, 32))  # 12 output rows over 32 inputs
    fit = fit_scalar(rows, 4, rng=rng)
    _, before, after = fit_with_feedback(rows, fit, (gram, gram))
    assert after < 0.9 * before
    few = correlated_inputs(6, 32, 12)  # a Gram matrix of 6 rows: a fit to it chases noise
    _, before, after = fit_with_feedback(rows, fit, (few.T @ few / 6, gram))
    assert after <= before  # checked on the other half: never worse there
    vectors = rows.reshape(12, 8, 4).transpose(1, 0, 2)
    product = fit_product(vectors, 4, seed=0)
    _, before, after = refine_product(vectors, product, gram)
    assert after < 0.9 * before


def test_kmeans_1d_fast_path_matches_lloyd_and_scikit_learn():
    from sklearn.cluster import KMeans

    values = np.random.default_rng(14).standard_normal(20_000)
    centroids, labels = kmeans_1d(values, 16, "linear", 0.05, np.random.default_rng(0))
    assert np.all(np.diff(centroids) > 0)
    for c in range(16):  # converged: each centroid is (nearly) the mean of its members
        assert centroids[c] == pytest.approx(values[labels == c].mean(), abs=5e-3)
    boundaries = (centroids[:-1] + centroids[1:]) / 2  # ...and each value's nearest
    np.testing.assert_array_equal(labels, np.searchsorted(boundaries, values, side="right"))
    seeds = np.linspace(values.min(), values.max(), 16)[:, None]
    reference = KMeans(16, init=seeds, n_init=1).fit(values[:, None])
    inertia = np.square(values - centroids[labels]).sum()
    assert inertia <= 1.01 * reference.inertia_


def test_fit_decode_uses_codebook_rows():
    fit = CodebookFit(
        np.array([[[1.0], [2.0]], [[3.0], [4.0]]]), np.array([[1, 0], [0, 0]], np.uint8)
    )
    np.testing.assert_array_equal(fit.decode(), [[2.0, 1.0], [3.0, 3.0]])


def test_product_rows_put_subspaces_side_by_side():
    codebook = np.arange(2 * 2 * 3, dtype=float).reshape(2, 2, 3)  # 2 subspaces, d=3
    fit = CodebookFit(codebook, np.array([[1, 0], [0, 1]], np.uint8))  # 2 rows
    np.testing.assert_array_equal(fit.product_rows(), [[3, 4, 5, 6, 7, 8], [0, 1, 2, 9, 10, 11]])


def test_centroids_seeded_in_the_empty_stretch_of_a_heavy_tail_are_put_to_use():
    """A BN-folded weight: values within about ±0.5 but for a few up to 29 (PP-OCRv4's
    recognizer has such 1×1 convs). Linear seeds over [min, max] leave most centroids with
    no value; moved into the costliest clusters, 8 bits are close to exact again."""
    rng = np.random.default_rng(3)
    values = rng.standard_normal(100_000) * 0.17
    values[rng.choice(values.size, 12, replace=False)] = rng.uniform(3, 29, 12)
    energy = np.linalg.norm(values)
    fit = fit_scalar(values[None], 256)
    scalar_error = np.linalg.norm(fit.decode()[0] - values) / energy
    weighed = np.sqrt(RowQuantizer(values[None]).squared_error(256)) / energy
    assert scalar_error < 0.01, scalar_error  # linear seeds alone: 0.066
    assert weighed < 0.03, weighed  # linear seeds alone: 0.124
    assert len(np.unique(fit.indices)) > 200
