"""Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD² with the cubic polynomial kernel.

Kernel k(x, y) = (xᵀy / d + 1)³ on d-dimensional features. For samples X (m) and Y (n) the unbiased estimator is::

    MMD²_u = 1/(m(m−1)) Σ_{i≠j} k(xᵢ,xⱼ) + 1/(n(n−1)) Σ_{i≠j} k(yᵢ,yⱼ) − 2/(mn) Σ_{i,j} k(xᵢ,yⱼ)

KID averages it over ``num_subsets`` random subsets of ``subset_size`` drawn without replacement from each set
(the protocol of torch-fidelity / clean-fid: 100 subsets of 1000), and reports mean and standard deviation.
No library computes this for us without torchvision here, and it is ten lines of numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .frechet import _as_2d_float64


def polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                             coef0: float = 1.0) -> float:
    """Unbiased MMD² between ``x [m, d]`` and ``y [n, d]`` with k(a, b) = (γ·aᵀb + c₀)^degree, γ = 1/d by default."""
    x = _as_2d_float64(x)
    y = _as_2d_float64(y)
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError("MMD needs at least 2 samples per set.")
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    k_xx = (gamma * x @ x.T + coef0) ** degree
    k_yy = (gamma * y @ y.T + coef0) ** degree
    k_xy = (gamma * x @ y.T + coef0) ** degree
    term_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    term_yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(term_xx + term_yy - 2.0 * k_xy.mean())


def kernel_inception_distance(features1: Any, features2: Any, num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID mean and standard deviation over random subsets (subset size capped by the smaller set).

    Returns ``(mean, std)`` of the per-subset unbiased polynomial MMD². Deterministic for a given ``seed``.
    """
    x = _as_2d_float64(features1)
    y = _as_2d_float64(features2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}.")
    size = min(subset_size, x.shape[0], y.shape[0])
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets, dtype=np.float64)
    for index in range(num_subsets):
        xs = x[rng.choice(x.shape[0], size, replace=False)]
        ys = y[rng.choice(y.shape[0], size, replace=False)]
        values[index] = polynomial_mmd2_unbiased(xs, ys)
    return float(values.mean()), float(values.std())
