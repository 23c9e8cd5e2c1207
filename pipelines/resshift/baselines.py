"""The honest baselines of the super-resolution benchmark, on the same denoiser (:func:`.denoiser.build_denoiser`,
same parameter count) and the same latent space as ResShift:

* **regression**: one pass, x̂0 = f_θ([y0, LR], 0), trained by MSE to x0 (the PSNR-optimal point estimate);
* **conditional DDPM** (SR3-style, Saharia et al. 2021, in latent space): a 1000-step cosine DDPM schedule
  (Diffusers' ``DDPMScheduler``, ``squaredcos_cap_v2``) and v-prediction from [x_t, LR], sampled from pure noise
  with Diffusers' ``DDIMScheduler`` (η = 0, ``trailing`` spacing, which is what few-step DDIM needs) at any step
  count. Why v and not SR3's ε: the cosine schedule ends at ᾱ_999 ≈ 0 (zero terminal SNR), where ε-prediction
  cannot give x0 (x̂0 = (x − √(1−ᾱ) ε̂)/√ᾱ divides the network's error by √ᾱ ≈ 1e-4); trailing spacing starts
  exactly there. A first ε-run sampled this way gave 13.8 dB at 50 *and* 4 steps (Lin et al., "Common Diffusion
  Noise Schedules and Sample Steps are Flawed", 2023: zero SNR needs v-prediction).

Both take LR images in [-1, 1] ``[N, 3, h, w]`` and return decoded HR images in [-1, 1].
"""

from __future__ import annotations

import torch

from .degrade import bicubic_up
from .latents import decode, encode, lr_condition

DDPM_TRAIN_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                     "prediction_type": "v_prediction", "clip_sample": False}


def ddpm_train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**DDPM_TRAIN_CONFIG)


def ddim_sampler(config: dict | None = None):
    from diffusers import DDIMScheduler

    cfg = {**DDPM_TRAIN_CONFIG, **(config or {})}
    cfg.pop("variance_type", None)
    return DDIMScheduler(**{k: v for k, v in cfg.items() if not k.startswith("_")}, timestep_spacing="trailing",
                         set_alpha_to_one=True)


@torch.no_grad()
def regression_sr(unet, vae, low_res: torch.Tensor, scale_factor: int = 4) -> torch.Tensor:
    y0 = encode(vae, bicubic_up(low_res, scale_factor))
    lq = lr_condition(low_res, tuple(y0.shape[-2:]))
    t = torch.zeros(len(y0), dtype=torch.long)
    return decode(vae, unet(torch.cat([y0, lq], 1), t).sample)


@torch.no_grad()
def ddpm_sr(unet, vae, low_res: torch.Tensor, num_inference_steps: int, generator: torch.Generator,
            scale_factor: int = 4, scheduler_config: dict | None = None) -> torch.Tensor:
    sched = ddim_sampler(scheduler_config)
    sched.set_timesteps(num_inference_steps)
    h, w = low_res.shape[-2:]
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (len(low_res), vae.config.latent_channels, h * scale_factor // vae_factor, w * scale_factor // vae_factor)
    lq = lr_condition(low_res, shape[-2:])
    x = torch.randn(shape, generator=generator)
    for t in sched.timesteps:
        t_batch = torch.full((len(x),), int(t), dtype=torch.long)
        out = unet(torch.cat([x, lq], 1), t_batch).sample
        x = sched.step(out, t, x, eta=0.0).prev_sample
    return decode(vae, x)
