"""The denoiser shared by ResShift and its baselines: a Diffusers ``UNet2DModel`` whose input is the latent x_t
(or y0 for the regression baseline) concatenated with the LR image (the paper's conditioning by concatenation),
and whose output is a latent (x0 for ResShift and regression, ε for the DDPM baseline). One builder, so every
method has the same parameter count."""

from __future__ import annotations

from diffusers import UNet2DModel


def build_denoiser(latent_channels: int = 4, image_channels: int = 3, sample_size: int = 16,
                   block_out_channels: tuple[int, ...] = (32, 64), layers_per_block: int = 1) -> UNet2DModel:
    """A small UNet: plain residual blocks at full latent resolution, self-attention at the lower levels."""
    n = len(block_out_channels)
    down = ("DownBlock2D",) + ("AttnDownBlock2D",) * (n - 1)
    up = ("AttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    return UNet2DModel(sample_size=sample_size, in_channels=latent_channels + image_channels,
                       out_channels=latent_channels, block_out_channels=tuple(block_out_channels),
                       layers_per_block=layers_per_block, down_block_types=down, up_block_types=up,
                       norm_num_groups=16, attention_head_dim=32)
