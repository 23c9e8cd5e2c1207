"""Fréchet distance and KID: our float64 symmetric-eigh implementation against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from diffusion_accel.eval import (
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    frechet_distance_to_statistics,
    kernel_inception_distance,
)


def _random_statistics(d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian statistics with a full-rank, well-spread covariance (Wishart-like)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, 2 * d)) / np.sqrt(2 * d)
    return rng.normal(size=d), a @ a.T + 0.01 * np.eye(d)


def _scipy_reference(mu1, s1, mu2, s2) -> float:
    """The documented formula with scipy.linalg.sqrtm on Σ₁Σ₂ (float64), as pytorch-fid / clean-fid compute it."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = 1e-6 * np.eye(s1.shape[0])
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fid_matches_scipy_reference_d64():
    mu1, s1 = _random_statistics(64, 0)
    mu2, s2 = _random_statistics(64, 1)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_scipy_reference(mu1, s1, mu2, s2), rel=1e-6)


@pytest.mark.slow
def test_fid_matches_scipy_reference_d2048():
    mu1, s1 = _random_statistics(2048, 2)
    mu2, s2 = _random_statistics(2048, 3)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_scipy_reference(mu1, s1, mu2, s2), rel=1e-6)


def test_fid_matches_pytorch_fid_algorithm_on_features():
    """Same features → pytorch-fid's algorithm (np.cov of float32 features, scipy sqrtm) agrees to 1e-3."""
    rng = np.random.default_rng(4)
    d, n = 128, 600  # ReLU features like pool3, N > d
    f1 = np.maximum(rng.normal(size=(n, d)), 0).astype(np.float32)
    f2 = np.maximum(rng.normal(0.2, 1.1, size=(n, d)), 0).astype(np.float32)
    reference = _scipy_reference(np.mean(f1, axis=0), np.cov(f1, rowvar=False),
                                 np.mean(f2, axis=0), np.cov(f2, rowvar=False))
    ours = frechet_distance_from_features(torch.from_numpy(f1), f2)  # tensors and arrays both accepted
    assert ours == pytest.approx(reference, abs=1e-3)


@pytest.mark.parametrize("d", [256, pytest.param(2048, marks=pytest.mark.slow)])
def test_closed_form_for_commuting_covariances(d: int):
    """Σ₁ = Q diag(a) Qᵀ, Σ₂ = Q diag(b) Qᵀ: d² = ‖Δμ‖² + Σ(√a − √b)² (d = 2048 without scipy: slow)."""
    rng = np.random.default_rng(5)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-8)


def test_identity_symmetry_and_rank_deficiency():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(40, 64))  # N < d: singular covariance, as at small N
    y = rng.normal(0.5, 1.0, size=(40, 64))
    mu_x, s_x = feature_statistics(x)
    mu_y, s_y = feature_statistics(y)
    assert s_x.dtype == np.float64 and s_x.shape == (64, 64)
    np.testing.assert_allclose(s_x, np.cov(x, rowvar=False))
    assert frechet_distance(mu_x, s_x, mu_x, s_x) == pytest.approx(0.0, abs=1e-8)
    forward, backward = frechet_distance(mu_x, s_x, mu_y, s_y), frechet_distance(mu_y, s_y, mu_x, s_x)
    assert forward > 0 and forward == pytest.approx(backward, rel=1e-9)
    assert forward == pytest.approx(_scipy_reference(mu_x, s_x, mu_y, s_y), abs=1e-4)


@pytest.mark.parametrize("n1, n2", [(30, 45), (200, 50)])
def test_sample_space_path_equals_covariance_path(n1: int, n2: int):
    """With N ≤ D the features path uses the nuclear norm of AᵀB; it must equal the D×D computation."""
    rng = np.random.default_rng(9)
    x = np.maximum(rng.normal(size=(n1, 64)), 0)
    y = np.maximum(rng.normal(0.3, 1.2, size=(n2, 64)), 0)
    expected = frechet_distance(*feature_statistics(x), *feature_statistics(y))
    assert frechet_distance_from_features(x, y) == pytest.approx(expected, rel=1e-7)  # eigh: √(round-off) terms
    assert frechet_distance_to_statistics(x, *feature_statistics(y)) == pytest.approx(expected, rel=1e-7)


def test_invalid_inputs_are_rejected():
    mu, s = _random_statistics(8, 7)
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(mu, s, mu[:4], s[:4, :4])
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(mu, s * np.nan, mu, s)
    with pytest.raises(ValueError, match="2-D"):
        feature_statistics(np.zeros(5))


def test_kid_is_unbiased_near_zero_and_detects_a_shift():
    rng = np.random.default_rng(8)
    same_a, same_b = rng.normal(size=(300, 32)), rng.normal(size=(300, 32))
    shifted = rng.normal(0.3, 1.0, size=(300, 32))
    null_mean, null_std = kernel_inception_distance(same_a, same_b, num_subsets=20, subset_size=100)
    shift_mean, _ = kernel_inception_distance(same_a, shifted, num_subsets=20, subset_size=100)
    assert abs(null_mean) < 3 * null_std + 1e-3
    assert shift_mean > 10 * max(abs(null_mean), null_std)
    assert kernel_inception_distance(same_a, same_b, 5, 50, seed=1) == kernel_inception_distance(
        same_a, same_b, 5, 50, seed=1)
