"""Degradations that make the low-resolution (LR) training and test inputs from HR images, and the bicubic
upsampling every method starts from.

* ``bicubic``: ×sf bicubic downsampling with antialiasing (the classical SR setting; ResShift's ``bicx4`` task).
* ``realistic``: a one-stage version of the paper's real-world setting (RealESRGAN degradation, far simpler):
  Gaussian blur at HR (σ ~ U[0.2, 1.5] px), ×sf bicubic downsampling, Gaussian noise (σ ~ U[1, 10] / 255) and
  JPEG compression (quality ~ U{50..95}, PIL). Every draw is seeded by the image's index, so a data set and the
  benchmark's test set are reproducible.

Images are float tensors ``[N, 3, H, W]`` in [0, 1] here; the pipeline works in [-1, 1].
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F

DEGRADATIONS = ("bicubic", "realistic")


def bicubic_down(images: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """×``scale_factor`` bicubic downsampling with antialiasing (as PIL's/Matlab's imresize), clamped to [0, 1]."""
    h, w = images.shape[-2:]
    if h % scale_factor or w % scale_factor:
        raise ValueError(f"HR size {h}x{w} is not a multiple of the scale factor {scale_factor}.")
    out = F.interpolate(images, size=(h // scale_factor, w // scale_factor), mode="bicubic", align_corners=False,
                        antialias=True)
    return out.clamp(0, 1)


def bicubic_up(images: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """×``scale_factor`` bicubic upsampling (the paper's first step: the LR image is upsampled, then encoded)."""
    out = F.interpolate(images, scale_factor=scale_factor, mode="bicubic", align_corners=False)
    return out.clamp(-1, 1) if images.min() < 0 else out.clamp(0, 1)


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(np.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    c = image.shape[0]
    img = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    img = F.conv2d(img, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    img = F.conv2d(img, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return img[0]


def _jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    from PIL import Image

    arr = (image.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    out = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(out).permute(2, 0, 1)


def realistic_down(images: torch.Tensor, scale_factor: int, seeds: list[int] | np.ndarray) -> torch.Tensor:
    """Blur → bicubic ×sf down → noise → JPEG, one random draw per image seeded by ``seeds[i]``."""
    out = []
    for image, seed in zip(images, seeds, strict=True):
        rng = np.random.default_rng((7919, int(seed)))
        sigma_blur = rng.uniform(0.2, 1.5)
        sigma_noise = rng.uniform(1.0, 10.0) / 255.0
        quality = int(rng.integers(50, 96))
        lr = bicubic_down(_gaussian_blur(image, sigma_blur)[None], scale_factor)[0]
        noise = torch.from_numpy(rng.standard_normal(lr.shape).astype(np.float32))
        lr = (lr + sigma_noise * noise).clamp(0, 1)
        out.append(_jpeg(lr, quality))
    return torch.stack(out)


def degrade(images: torch.Tensor, kind: str, scale_factor: int, seeds: list[int] | np.ndarray) -> torch.Tensor:
    """LR images ``[N, 3, H/sf, W/sf]`` in [0, 1] from HR ``images`` in [0, 1]."""
    if kind == "bicubic":
        return bicubic_down(images, scale_factor)
    if kind == "realistic":
        return realistic_down(images, scale_factor, seeds)
    raise ValueError(f"unknown degradation {kind!r}; choose one of {', '.join(DEGRADATIONS)}.")
