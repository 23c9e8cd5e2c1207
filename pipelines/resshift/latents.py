"""The VAE latent space ResShift works in (the paper's setting): encode HR and bicubic-upsampled LR images to x0
and y0, decode the result. Latents are normalised by the VAE's ``shift_factor``/``scaling_factor`` so that their
variance is ≈ 1, which ResShift's input scaling 1/√(κ²η_t + 1) assumes."""

from __future__ import annotations

import torch


def vae_scale_factor(vae) -> int:
    """Pixel pixels per latent pixel: 2^(number of down blocks − 1)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode(vae, images: torch.Tensor) -> torch.Tensor:
    """Normalised latents of ``images`` in [-1, 1] (the posterior mode: deterministic, as the paper's VQ encoder)."""
    z = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mode()
    shift = vae.config.shift_factor or 0.0
    return (z - shift) * vae.config.scaling_factor


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (clamped) from normalised latents."""
    shift = vae.config.shift_factor or 0.0
    z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift
    return vae.decode(z).sample.clamp(-1, 1)


def lr_condition(low_res: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """The LR image in [-1, 1] at the latent's size, concatenated to the network input (the paper feeds the LR
    pixels; with sf equal to the VAE factor no resizing happens)."""
    if tuple(low_res.shape[-2:]) == tuple(latent_size):
        return low_res
    return torch.nn.functional.interpolate(low_res, size=latent_size, mode="bicubic", align_corners=False)
