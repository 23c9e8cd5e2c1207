"""The pinned PSNR/SSIM definitions against independent implementations (numpy/scipy)."""

from __future__ import annotations

import numpy as np
import pytest
from diffusion_accel.eval.restoration import psnr, ssim
from scipy.ndimage import gaussian_filter


def _ssim_scipy(a, b):
    """Wang et al. 2004 as scikit-image computes it (gaussian_weights=True, σ=1.5, truncate 3.5 → 11x11 window,
    population statistics, borders of 5 px cropped), per channel, then the channel mean."""
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for ch in range(3):
        x, y = a[..., ch], b[..., ch]
        f = lambda z: gaussian_filter(z, 1.5, truncate=3.5)  # noqa: E731
        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        vals.append(s[5:-5, 5:-5].mean())
    return np.mean(vals)


def test_ssim_matches_the_reference_definition():
    rng = np.random.default_rng(0)
    a = rng.random((3, 32, 32, 3))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    ours = ssim(b, a)
    ref = [_ssim_scipy(b[i], a[i]) for i in range(3)]
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    assert ssim(a, a) == pytest.approx(1.0)
    assert (ssim(np.clip(a + rng.normal(0, 0.3, a.shape), 0, 1), a) < ours).all()


def test_psnr_definition():
    a = np.zeros((1, 8, 8, 3))
    assert psnr(a + 0.1, a)[0] == pytest.approx(20.0)  # MSE 0.01 on [0, 1] → 20 dB
