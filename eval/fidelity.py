"""Fidelity to a reference image: PSNR and SSIM (pure code, no weights).

Pinned definitions (documented next to every score):

* **PSNR** on 8-bit RGB: ``10·log10(255² / MSE)`` over all pixels and channels; ``inf`` for identical images.
* **SSIM**: Wang et al. 2004 with a Gaussian window σ = 1.5 truncated at 3.5σ (11x11), K1 = 0.01, K2 = 0.03,
  data range 1 (images scaled to [0, 1]), population covariances, computed per channel and averaged over channels
  and the valid (unpadded) area. This is scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1.0, channel_axis=-1)``; the filtering is SciPy's ``gaussian_filter``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

SSIM_DEFINITION = "gaussian sigma=1.5 truncate=3.5, K1=0.01, K2=0.03, data_range=1, per-channel mean"


def _as_float01(image: Any) -> np.ndarray:
    """uint8 ``[H, W, C]`` (or a torch tensor / float array in [0, 1]) → float64 ``[H, W, C]`` in [0, 1]."""
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.moveaxis(array, 0, -1)  # CHW tensors
    if array.ndim == 2:
        array = array[..., None]
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    return np.clip(array.astype(np.float64), 0.0, 1.0)


def psnr(image: Any, reference: Any) -> float:
    """Peak signal-to-noise ratio in dB between two images of the same shape (8-bit scale)."""
    a, b = _as_float01(image), _as_float01(reference)
    if a.shape != b.shape:
        raise ValueError(f"psnr needs images of the same shape, got {a.shape} and {b.shape}.")
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def ssim(image: Any, reference: Any) -> float:
    """Structural similarity (pinned definition above) between two images of the same shape."""
    from scipy.ndimage import gaussian_filter

    a, b = _as_float01(image), _as_float01(reference)
    if a.shape != b.shape:
        raise ValueError(f"ssim needs images of the same shape, got {a.shape} and {b.shape}.")
    sigma, truncate = 1.5, 3.5
    radius = int(truncate * sigma + 0.5)
    c1, c2 = 0.01**2, 0.03**2
    scores = []
    for channel in range(a.shape[-1]):
        x, y = a[..., channel], b[..., channel]

        def blur(z: np.ndarray) -> np.ndarray:
            return gaussian_filter(z, sigma=sigma, truncate=truncate, mode="reflect")

        mu_x, mu_y = blur(x), blur(y)
        sxx = blur(x * x) - mu_x**2
        syy = blur(y * y) - mu_y**2
        sxy = blur(x * y) - mu_x * mu_y
        ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
        inner = ssim_map[radius:-radius, radius:-radius] if min(x.shape) > 2 * radius else ssim_map
        scores.append(float(inner.mean()))
    return float(np.mean(scores))
