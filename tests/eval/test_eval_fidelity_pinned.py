"""PSNR / SSIM: the pinned definitions behave as documented."""

from __future__ import annotations

import math

import numpy as np
import pytest
from diffusion_accel.eval.fidelity import psnr, ssim


def _pair(noise: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-noise, noise + 1, a.shape), 0, 255).astype(np.uint8)
    return a, b


def test_psnr_matches_its_formula():
    a, b = _pair(10)
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / mse), rel=1e-12)
    assert psnr(a, a) == math.inf


def test_ssim_properties():
    a, b = _pair(10)
    _, c = _pair(60)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, b) == pytest.approx(ssim(b, a), rel=1e-12)
    assert 1.0 > ssim(a, b) > ssim(a, c) > 0
    chw = np.moveaxis(a, -1, 0).astype(np.float32) / 255
    assert ssim(chw, b) == pytest.approx(ssim(a, b), rel=1e-6)  # CHW float input is accepted


def test_shape_mismatch_is_an_error():
    a, _ = _pair(1)
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, a[:10])
