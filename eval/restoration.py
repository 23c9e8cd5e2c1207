"""Full-reference restoration metrics with pinned definitions (used by the super-resolution benchmark).

* **PSNR**: 10 log10(1 / MSE) per image on RGB in [0, 1] (all three channels, no border crop, no Y-channel
  conversion), then averaged over images.
* **SSIM**: Wang, Bovik, Sheikh & Simoncelli, "Image quality assessment: from error visibility to structural
  similarity", IEEE TIP 13(4), 2004, with the paper's constants: an 11x11 Gaussian window with σ = 1.5,
  K1 = 0.01, K2 = 0.03, dynamic range L = 1 (RGB in [0, 1]), population (biased) local statistics, the mean over
  'valid' window positions only (no padding), computed per channel and averaged over the three channels, then over
  images. This is ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1, channel_axis=-1)``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _as_nchw(images) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images).double()
    if x.ndim == 3:
        x = x[None]
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    return x


def psnr(images, reference) -> np.ndarray:
    """Per-image PSNR in dB of ``images`` against ``reference`` (both RGB in [0, 1], NHWC or NCHW)."""
    a, b = _as_nchw(images), _as_nchw(reference)
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return (10.0 * torch.log10(1.0 / mse)).numpy()


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(images, reference, window: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03,
         data_range: float = 1.0) -> np.ndarray:
    """Per-image SSIM (definition in the module docstring)."""
    a, b = _as_nchw(images), _as_nchw(reference)
    c = a.shape[1]
    w = gaussian_window(window, sigma).expand(c, 1, window, window).contiguous()

    def filt(x):
        return F.conv2d(x, w, groups=c)

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a**2
    var_b = filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).numpy()
