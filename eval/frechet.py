"""Fréchet distance between Gaussians fitted to features (the maths of FID, sFID, FD-DINOv2, FVD).

For two feature sets with means μ₁, μ₂ and covariances Σ₁, Σ₂ (Heusel et al. 2017, eq. 6)::

    d² = ‖μ₁ − μ₂‖² + tr(Σ₁) + tr(Σ₂) − 2·tr((Σ₁Σ₂)^½)

The trace term is computed in float64 with the *symmetric* formulation: Σ₁Σ₂ is similar to the symmetric PSD
matrix M = Σ₁^½ Σ₂ Σ₁^½ (Σ₁Σ₂ = Σ₁^½ M Σ₁^-½ when Σ₁ is invertible, and by continuity otherwise), so
tr((Σ₁Σ₂)^½) = Σᵢ √λᵢ(M). Both square roots come from ``numpy.linalg.eigh`` with negative round-off eigenvalues
clipped to 0, so the result is always real. We do not use ``scipy.linalg.sqrtm`` here: its ``disp`` argument (used by
pytorch-fid and clean-fid) is removed in SciPy 1.18, it works on the non-symmetric product, and it can return complex
values with spurious imaginary parts. It remains the cross-check in the tests.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _as_2d_float64(features: Any) -> np.ndarray:
    """``[N, D]`` float64 copy of a numpy array or a torch tensor (any dtype / device)."""
    if hasattr(features, "detach"):
        features = features.detach().to("cpu").double().numpy()
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"features must be a 2-D [N, D] array, got shape {array.shape}.")
    return array


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean μ (``[D]``) and unbiased covariance Σ (``[D, D]``, ``np.cov(rowvar=False)``), both float64."""
    x = _as_2d_float64(features)
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {x.shape[0]}.")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root via eigh: V·diag(√max(λ, 0))·Vᵀ."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((Σ₁Σ₂)^½) = Σᵢ √λᵢ(Σ₁^½ Σ₂ Σ₁^½), in float64."""
    s1 = np.asarray(sigma1, dtype=np.float64)
    s2 = np.asarray(sigma2, dtype=np.float64)
    root1 = _sqrt_psd(s1)
    middle = root1 @ s2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Squared Fréchet distance d² = ‖μ₁−μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr((Σ₁Σ₂)^½) between N(μ₁,Σ₁) and N(μ₂,Σ₂).

    This is what "FID" reports (the square is not taken back). Clipped at 0 against round-off.
    """
    m1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    m2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    s1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if m1.shape != m2.shape or s1.shape != s2.shape or s1.shape != (m1.size, m1.size):
        raise ValueError(f"shape mismatch: mu {m1.shape}/{m2.shape}, sigma {s1.shape}/{s2.shape}.")
    if not (np.isfinite(s1).all() and np.isfinite(s2).all() and np.isfinite(m1).all() and np.isfinite(m2).all()):
        raise ValueError("statistics contain NaN or inf.")
    diff = m1 - m2
    value = float(diff @ diff) + float(np.trace(s1)) + float(np.trace(s2)) - 2.0 * trace_sqrt_product(s1, s2)
    return max(value, 0.0)


def frechet_distance_from_features(features1: Any, features2: Any) -> float:
    """:func:`frechet_distance` of the statistics of two ``[N, D]`` feature sets.

    When a set has fewer samples than dimensions (N ≤ D, e.g. a few hundred pool3 vectors), the same value is
    computed exactly in the sample space instead of from D×D matrices: with Σ₁ = AAᵀ, Σ₂ = BBᵀ where
    A = X̃₁ᵀ/√(N₁−1), B = X̃₂ᵀ/√(N₂−1) (centred features), the non-zero eigenvalues of Σ₁Σ₂ are those of
    (AᵀB)(AᵀB)ᵀ, so tr((Σ₁Σ₂)^½) = ‖AᵀB‖_* (sum of singular values of the N₁×N₂ matrix AᵀB) and tr Σᵢ = ‖·‖²_F.
    """
    x, y = _as_2d_float64(features1), _as_2d_float64(features2)
    if x.shape[0] > y.shape[0]:
        x, y = y, x  # d² is symmetric; keep the smaller set first
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}.")
    if min(x.shape[0], y.shape[0]) <= x.shape[1]:
        mu_x, mu_y = x.mean(axis=0), y.mean(axis=0)
        a = (x - mu_x) / np.sqrt(x.shape[0] - 1)
        b = (y - mu_y) / np.sqrt(y.shape[0] - 1)
        trace_sqrt = float(np.linalg.svd(a @ b.T, compute_uv=False).sum())
        diff = mu_x - mu_y
        return max(float(diff @ diff + (a * a).sum() + (b * b).sum() - 2.0 * trace_sqrt), 0.0)
    return frechet_distance(*feature_statistics(x), *feature_statistics(y))


def frechet_distance_to_statistics(features: Any, mu: Any, sigma: Any) -> float:
    """d² between the Gaussian of ``features [N, D]`` and N(μ, Σ) (e.g. reference statistics from an ``.npz``).

    For N ≤ D it is computed exactly in sample space: with Σ_f = AAᵀ, A = X̃ᵀ/√(N−1), the non-zero eigenvalues of
    Σ_f Σ equal those of the N×N symmetric PSD matrix AᵀΣA, so tr((Σ_f Σ)^½) = Σᵢ √λᵢ(AᵀΣA).
    """
    x = _as_2d_float64(features)
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if sigma.shape != (x.shape[1], x.shape[1]) or mu.shape != (x.shape[1],):
        raise ValueError(f"shape mismatch: features {x.shape}, mu {mu.shape}, sigma {sigma.shape}.")
    if x.shape[0] > x.shape[1]:
        return frechet_distance(*feature_statistics(x), mu, sigma)
    mu_x = x.mean(axis=0)
    a = (x - mu_x) / np.sqrt(x.shape[0] - 1)
    middle = a @ sigma @ a.T
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    diff = mu_x - mu
    value = diff @ diff + (a * a).sum() + np.trace(sigma) - 2.0 * np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    return max(float(value), 0.0)
