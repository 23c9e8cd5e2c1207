from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_pipe():
    """A ResShiftPipeline around a tiny random UNet and a tiny random VAE (factor 4, 4 latent channels)."""
    from diffusers import AutoencoderKL
    from diffusion_accel.pipelines.resshift import ResShiftPipeline, ResShiftScheduler, build_denoiser

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1, sample_size=32).eval()
    unet = build_denoiser(4, 3, 8, (16, 32), 1).eval()
    pipe = ResShiftPipeline(unet=unet, vae=vae, scheduler=ResShiftScheduler(), scale_factor=4)
    pipe.set_progress_bar_config(disable=True)
    return pipe
