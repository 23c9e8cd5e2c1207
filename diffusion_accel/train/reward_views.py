"""Randomised views of a decoded image for a reward that a student should not be able to game with textures.

A classifier used as a differentiable reward has directions a generator can climb that no one would call the
prompt's content: on ``testbed:pixart`` the direct shapes-net reward at β = 0.1 turned 2-step samples into textured
artefacts within 300 steps (README, RG-LCD). Those directions are small, high-frequency and tied to exact pixel
positions. Averaging the reward over random views, the expectation over transformations of adversarial-robustness
work (Athalye et al., "Synthesizing Robust Adversarial Examples", arXiv 1707.07397), keeps the gradient of what
survives every view (the object's colour, shape and place) and averages away what does not:

    R_views(x) = 1/V · Σ_v R( blur_σ( shift_{s_v}(x) ) + n_v ),   s_v ~ U{−S..S}², n_v ~ N(0, ν²)

with V = ``views``, S = ``max_shift`` pixels (edge-replicated, so no object wraps around), σ = ``blur_sigma``
pixels (a separable Gaussian) and ν = ``noise_std`` (in the image range [-1, 1]). A shift of a few pixels keeps each
object in its grid cell of the 3x3 layout the captions name (cells are 21 px wide at 64 px), so the caption stays
true of every view.

The draws (:func:`draw_views`) are made for the global batch from a generator the caller seeds from the step's
draw, so a resumed run and a run split over processes see the same views, like every other draw of the stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RewardViews:
    """How the reward sees an image: ``views`` random views (1 with every other setting at 0 = the image as is)."""

    views: int = 1
    max_shift: int = 0
    blur_sigma: float = 0.0
    noise_std: float = 0.0

    def __post_init__(self) -> None:
        if self.views < 1:
            raise ValueError(f"--reward_views must be >= 1, got {self.views}.")
        if self.max_shift < 0 or self.blur_sigma < 0 or self.noise_std < 0:
            raise ValueError("--reward_max_shift, --reward_blur_sigma and --reward_noise_std must be >= 0.")

    @property
    def identity(self) -> bool:
        return self.views == 1 and self.max_shift == 0 and self.blur_sigma == 0 and self.noise_std == 0


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` with edge replication (radius ⌈3σ⌉); σ = 0 returns the input."""
    if sigma <= 0:
        return images
    radius = max(1, int(torch.tensor(3.0 * sigma).ceil()))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    x = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def shift(images: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image ``i`` by ``(dx[i], dy[i])`` whole pixels (|d| ≤ ``max_shift``), replicating the edges."""
    if max_shift == 0:
        return images
    height, width = images.shape[-2:]
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    rows = [padded[i, :, max_shift - int(dy[i]):max_shift - int(dy[i]) + height,
                   max_shift - int(dx[i]):max_shift - int(dx[i]) + width] for i in range(images.shape[0])]
    return torch.stack(rows)


@dataclass
class ViewDraws:
    """The random part of every view, drawn for the *global* batch so each process can take its rows: integer
    shifts ``[V, 2, G]`` (dx, dy) and pixel noise ``[V, G, C, H, W]`` (``None`` when ``noise_std`` is 0)."""

    shifts: torch.Tensor
    noise: torch.Tensor | None

    def rows(self, rows: slice) -> ViewDraws:
        return ViewDraws(self.shifts[:, :, rows], None if self.noise is None else self.noise[:, rows])


def draw_views(settings: RewardViews, global_batch: int, image_shape: tuple[int, ...],
               generator: torch.Generator) -> ViewDraws:
    """Shifts and noise of ``settings.views`` views of ``global_batch`` images of ``image_shape`` (C, H, W)."""
    s = settings.max_shift
    shifts = torch.randint(-s, s + 1, (settings.views, 2, global_batch), generator=generator)
    noise = (torch.randn((settings.views, global_batch, *image_shape), generator=generator)
             if settings.noise_std > 0 else None)
    return ViewDraws(shifts, noise)


def random_views(images: torch.Tensor, settings: RewardViews, draws: ViewDraws) -> torch.Tensor:
    """``[V·B, C, H, W]``: view ``v`` of image ``i`` at row ``v·B + i``, differentiable in ``images``; ``draws``
    holds this batch's rows (:meth:`ViewDraws.rows`)."""
    if settings.identity:
        return images
    out = []
    for v in range(settings.views):
        view = gaussian_blur(shift(images, draws.shifts[v, 0], draws.shifts[v, 1], settings.max_shift),
                             settings.blur_sigma)
        if draws.noise is not None:
            view = view + settings.noise_std * draws.noise[v].to(view.device, view.dtype)
        out.append(view)
    return torch.cat(out)
