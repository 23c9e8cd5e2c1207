"""Latent packing per layout: from what a pipeline's ``output_type="latent"`` returns to a spatial tensor and back.

Uses each pipeline's own static ``_pack_latents`` / ``_unpack_latents`` so positions match what the pipeline
builds (Flux packs 2x2 patches into tokens; LTX packs ``p_t x p x p`` patches).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .diffusers_internals import pack_latents, unpack_latents
from .pipelines.adapters import ModelAdapter


def spatial_factor(adapter: ModelAdapter, pipe: Any) -> int:
    """What a resolution must be divisible by: VAE factor × transformer patch, or the pipeline's own rule."""
    factor = _grid_factor(adapter, pipe)
    multiple = int(adapter.extra.get("resolution_multiple", 1))
    return factor * multiple // math.gcd(factor, multiple)


def _grid_factor(adapter: ModelAdapter, pipe: Any) -> int:
    if adapter.latent_layout == "packed_image":
        return pipe.vae_scale_factor * 2
    if adapter.latent_layout == "packed_video":
        return pipe.vae_spatial_compression_ratio * pipe.transformer_spatial_patch_size
    vae = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", 8)
    patch = getattr(adapter.get_denoiser(pipe).config, "patch_size", 1) or 1
    if isinstance(patch, (tuple, list)):
        patch = patch[-1]
    return int(vae) * int(patch)


def _ltx_latent_frames(pipe: Any, num_frames: int) -> int:
    return (num_frames - 1) // pipe.vae_temporal_compression_ratio + 1


def unpack(adapter: ModelAdapter, pipe: Any, latents: torch.Tensor, height: int, width: int,
           num_frames: int | None = None) -> torch.Tensor:
    """Pipeline latents → ``[B, C, h, w]`` (images) or ``[B, C, F, h, w]`` (videos)."""
    if adapter.latent_layout == "packed_image":
        return unpack_latents(type(pipe), latents, height, width, pipe.vae_scale_factor)
    if adapter.latent_layout == "packed_video":
        s = pipe.vae_spatial_compression_ratio
        return unpack_latents(type(pipe), latents, _ltx_latent_frames(pipe, num_frames), height // s, width // s,
                              pipe.transformer_spatial_patch_size, pipe.transformer_temporal_patch_size)
    return latents


def pack(adapter: ModelAdapter, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`unpack`."""
    if adapter.latent_layout == "packed_image":
        b, c, h, w = latents.shape
        return pack_latents(type(pipe), latents, b, c, h, w)
    if adapter.latent_layout == "packed_video":
        return pack_latents(type(pipe), latents, pipe.transformer_spatial_patch_size,
                            pipe.transformer_temporal_patch_size)
    return latents


RESIZE_FILTERS = ("nearest", "bilinear", "bicubic", "area")


def resize_spatial(latents: torch.Tensor, size: tuple[int, int], mode: str = "bicubic",
                   antialias: bool = True) -> torch.Tensor:
    """Resize the last two (spatial) dims; videos ``[B, C, F, h, w]`` keep their frames."""
    if mode not in RESIZE_FILTERS:
        raise ValueError(f"Unknown resize filter {mode!r}; choose one of {RESIZE_FILTERS}.")
    if tuple(latents.shape[-2:]) == tuple(size):
        return latents
    video = latents.ndim == 5
    x = latents
    if video:
        b, c, f, h, w = x.shape
        x = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    kwargs: dict[str, Any] = {"mode": mode}
    if mode in ("bilinear", "bicubic"):
        kwargs.update(align_corners=False, antialias=antialias)
    x = F.interpolate(x.float(), size=size, **kwargs).to(latents.dtype)
    if video:
        x = x.reshape(b, f, c, *size).permute(0, 2, 1, 3, 4)
    return x
