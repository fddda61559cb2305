"""Quantizers: fitted with faiss, applied with plain arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from musiclm.errors import UserError
from musiclm.pipeline.quantizers import assign, fit_kmeans, fit_residual, fit_semantic, residual_decode, residual_encode


def blobs(n: int, k: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)).astype(np.float32) * 5
    labels = rng.integers(0, k, n)
    return centres[labels] + 0.1 * rng.standard_normal((n, d)).astype(np.float32), labels


def test_kmeans_converges_to_means_of_its_cells():
    """Lloyd's fixed point: every centroid is the mean of the points nearest to it."""
    x, _ = blobs(4000, 16, 8)
    c = fit_kmeans(x, 16, niter=30)
    codes = assign(x, c).numpy()
    for k in np.unique(codes):
        np.testing.assert_allclose(c[k], x[codes == k].mean(0), atol=0.05)
    error = ((x - c[codes]) ** 2).sum(1).mean()
    assert error < 0.2 * ((x - x.mean(0)) ** 2).sum(1).mean()


def test_assign_is_the_nearest_centroid():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 12)).astype(np.float32)
    c = rng.standard_normal((37, 12)).astype(np.float32)
    brute = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(assign(x, c, chunk=64).numpy(), brute)


def test_too_few_points_is_a_clear_error():
    with pytest.raises(UserError, match="not enough data to fit semantic k-means: 10 points for 32 codes"):
        fit_semantic(np.zeros((10, 4), np.float32), 32)


def test_residual_levels_reduce_the_error():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3000, 8)).astype(np.float32)
    books = fit_residual(x, 4, 16, niter=10)
    assert books.shape == (4, 16, 8)
    errors = []
    for levels in range(1, 5):
        codes = residual_encode(x, books[:levels])
        errors.append(float(((residual_decode(codes, books[:levels]).numpy() - x) ** 2).mean()))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert residual_encode(torch.from_numpy(x), books).dtype == torch.int64


def test_semantic_quantizer_standardises_features():
    x, _ = blobs(1000, 4, 6)
    x = x * 100 + 7
    centroids, norm = fit_semantic(x, 4)
    np.testing.assert_allclose(norm[0], x.mean(0), rtol=1e-4)
    assert centroids.shape == (4, 6) and np.abs(centroids).max() < 10  # in standardised units


def test_semantic_codes_match_the_fit():
    """The tokenizer assigns every fit point the cell k-means gave it: it standardises exactly as the fit did.

    Per-dimension scales span six orders of magnitude, so a tokenizer that skipped the mean or
    the std would measure distances in other units than the fit and pick other cells.
    """
    from musiclm.config import load_config
    from musiclm.pipeline.tokenizer import Tokenizer

    z, _ = blobs(2000, 8, 6, seed=3)
    scales = np.array([1e3, 1e-3, 1.0, 30.0, 1e-2, 5e2], np.float32)
    features = z * scales + np.array([5e3, -2.0, 0.5, 100.0, 0.0, -7e2], np.float32)
    centroids, norm = fit_semantic(features, 8)

    # the fit's own cells, computed here in float64 without our assign()
    standard = (features.astype(np.float64) - norm[0]) / norm[1]
    fit_labels = ((standard[:, None, :] - centroids[None].astype(np.float64)) ** 2).sum(-1).argmin(1)
    assert len(np.unique(fit_labels)) == 8

    tok = Tokenizer.from_config(load_config("tiny").tokenize)
    tok.quantizers = {"semantic_centroids": centroids, "semantic_norm": norm}
    codes = tok.semantic_codes(torch.from_numpy(features).reshape(40, 50, 6))  # [..., D] keeps the leading shape
    assert codes.shape == (40, 50) and codes.dtype == torch.int64
    np.testing.assert_array_equal(codes.reshape(-1).numpy(), fit_labels)
