"""ResShift super-resolution trainer (Yue et al., arXiv 2307.12348 / 2403.07319) and its matched baselines, on the
shared training stack: ``diffusion-accel train resshift --objective resshift|regression|ddpm --degradation
bicubic|realistic``.

Data: HR shapes images (``pipelines/testbed/shapes.py``), LR made by ``--degradation`` (seeded per image), both
encoded once into the VAE latent space of ``--pretrained_teacher_model`` (the testbed VAE: 64x64 → 16x16x4):
x0 = E(HR), y0 = E(bicubic_up(LR)). Objectives (the same denoiser, same parameter count, same budget):

* ``resshift`` (the paper's loss, x0-prediction, ``weighted_mse`` off):
  t_idx ~ U{0..T−1}, x_t = x0 + η_t (y0 − x0) + κ √η_t ε, L = ‖f_θ([x_t/√(κ²η_t+1), LR], t_idx) − x0‖²;
* ``regression``: L = ‖f_θ([y0, LR], 0) − x0‖² (one pass at inference);
* ``ddpm`` (SR3-style, v-prediction: see :mod:`diffusion_accel.pipelines.resshift.baselines`):
  x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε, L = ‖f_θ([x_t, LR], t) − (√ᾱ_t ε − √(1−ᾱ_t) x0)‖².

The shipped network is an EMA of the weights (the paper validates and releases EMA weights; constant rate, not
Diffusers' ``EMAModel`` warm-up). Artefact: a :class:`ResShiftPipeline` folder (``resshift``), or ``unet/`` +
``baseline.json`` (baselines, sampled by :mod:`diffusion_accel.pipelines.resshift.baselines`).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .options import LR_SCHEDULERS, TrainOptions
from .recipe import Recipe

OBJECTIVES = ("resshift", "regression", "ddpm")


@dataclass
class ResShiftOptions(TrainOptions):
    """ResShift (or a matched baseline) for ×4 super-resolution of the testbed shapes images."""

    pretrained_teacher_model: str = field(default="testbed:pixart", metadata={
        "help": "the pipeline whose VAE defines the latent space (its vae/ folder); nothing else is used"})
    learning_rate: float = 5e-4
    lr_scheduler: str = field(default="cosine", metadata={"choices": LR_SCHEDULERS})
    lr_warmup_steps: int = 100
    train_batch_size: int = 32
    objective: str = field(default="resshift", metadata={"choices": OBJECTIVES})
    degradation: str = field(default="bicubic", metadata={"choices": ("bicubic", "realistic")})
    scale_factor: int = field(default=4, metadata={"help": "sf: HR side / LR side"})
    resolution: int = field(default=64, metadata={"help": "HR image side"})
    num_train_timesteps: int = field(default=4, metadata={"help": "T of ResShift (4: journal, 15: conference)"})
    kappa: float = field(default=2.0, metadata={"help": "κ of ResShift"})
    power: float = field(default=0.3, metadata={"help": "p of the η schedule"})
    min_noise_level: float = field(default=0.2, metadata={"help": "√η_1 = min(this/κ, this); 0.2 for T=4, 0.04 for "
                                                                  "T=15 (the released configs)"})
    etas_end: float = field(default=0.99, metadata={"help": "√η_T"})
    block_out_channels: str = field(default="32,64", metadata={"help": "UNet widths per level"})
    layers_per_block: int = 1
    ema_decay: float = field(default=0.995, metadata={"help": "constant EMA rate of the shipped weights"})
    num_validation_images: int = 4

    def validate(self) -> None:
        super().validate()
        if self.scale_factor < 1 or self.resolution % self.scale_factor:
            raise ValueError(f"--resolution {self.resolution} must be a multiple of --scale_factor "
                             f"{self.scale_factor} (>= 1).")
        if self.num_train_timesteps < 1:
            raise ValueError("--num_train_timesteps must be >= 1.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema_decay must be in [0, 1), got {self.ema_decay}.")

    def channels(self) -> tuple[int, ...]:
        try:
            return tuple(int(c) for c in self.block_out_channels.split(","))
        except ValueError as exc:
            raise ValueError(f"--block_out_channels {self.block_out_channels!r}: give comma-separated integers, "
                             "e.g. 32,64.") from exc


def load_vae(name: str):
    """The VAE of pipeline ``name`` (``testbed:<name>``, a folder or a cached Hub id), without its other parts."""
    from diffusers import AutoencoderKL

    if name.startswith("testbed:"):
        from ..pipelines.testbed.registry import testbed_path

        return AutoencoderKL.from_pretrained(str(testbed_path(name.split(":", 1)[1]) / "vae"))
    return AutoencoderKL.from_pretrained(name, subfolder="vae")


def sr_data(vae, degradation: str, scale_factor: int, split: str, count: int, start: int = 0,
            batch: int = 256) -> dict[str, torch.Tensor]:
    """HR images in [0, 1], LR images in [-1, 1], x0 and y0 latents of ``count`` shapes images of ``split``."""
    from ..pipelines.resshift.degrade import bicubic_up, degrade
    from ..pipelines.resshift.latents import encode
    from ..pipelines.testbed.train_common import dataset

    images, _ = dataset(split, count, start=start)
    hr = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    seeds = np.arange(start, start + count)
    lr = degrade(hr, degradation, scale_factor, seeds) * 2.0 - 1.0
    x0, y0 = [], []
    for i in range(0, count, batch):
        x0.append(encode(vae, hr[i:i + batch] * 2.0 - 1.0).float())
        y0.append(encode(vae, bicubic_up(lr[i:i + batch], scale_factor)).float())
    return {"hr": hr, "lr": lr, "x0": torch.cat(x0), "y0": torch.cat(y0)}


class ResShift(Recipe):
    name = "resshift"
    summary = "ResShift super-resolution (or a matched regression / SR3-DDPM baseline) in a VAE latent space"
    options_class = ResShiftOptions

    def load_teacher(self) -> None:
        self.vae = load_vae(self.options.pretrained_teacher_model).eval().requires_grad_(False)
        self.vae.to(self.accelerator.device)

    def check(self) -> None:
        from ..pipelines.resshift.latents import vae_scale_factor

        opts: ResShiftOptions = self.options  # type: ignore[assignment]
        opts.channels()
        f = vae_scale_factor(self.vae)
        if opts.resolution % f:
            raise ValueError(f"--resolution {opts.resolution} is not a multiple of the VAE's factor {f}.")
        self.latent_size = opts.resolution // f

    def run_record(self) -> dict[str, Any]:
        return {"vae_from": self.options.pretrained_teacher_model, "objective": self.options.objective,
                "degradation": self.options.degradation}

    def scheduler(self):
        from ..pipelines.resshift.scheduler import ResShiftScheduler

        o: ResShiftOptions = self.options  # type: ignore[assignment]
        return ResShiftScheduler(num_train_timesteps=o.num_train_timesteps, kappa=o.kappa, power=o.power,
                                 min_noise_level=o.min_noise_level, etas_end=o.etas_end, prediction_type="sample")

    def setup(self, stream_factory) -> torch.nn.Module:
        from ..pipelines.resshift.baselines import ddpm_train_scheduler
        from ..pipelines.resshift.denoiser import build_denoiser

        o: ResShiftOptions = self.options  # type: ignore[assignment]
        device = self.accelerator.device
        data = sr_data(self.vae, o.degradation, o.scale_factor, "train", o.num_train_samples,
                       start=o.dataloader_seed_offset)
        self.lq = data["lr"].to(device)
        self.x0 = data["x0"].to(device)
        self.y0 = data["y0"].to(device)
        self.num_samples = len(self.x0)
        val = sr_data(self.vae, o.degradation, o.scale_factor, "val", o.num_validation_images)
        self.val_lr, self.val_hr = val["lr"], val["hr"]
        self.sched = self.scheduler()
        self.ddpm = ddpm_train_scheduler()
        model = build_denoiser(self.vae.config.latent_channels, 3, self.latent_size, o.channels(), o.layers_per_block)
        self.ema = copy.deepcopy(model).eval().requires_grad_(False).to(device)
        return model.train()

    def checkpoint_objects(self) -> list[Any]:
        return [self.ema]

    def loss(self, model, stream, step, micro):
        o: ResShiftOptions = self.options  # type: ignore[assignment]
        draw = stream.draw(step, micro)
        local = stream.local()
        device = self.x0.device
        idx = torch.from_numpy(draw.indices[local]).to(device)
        x0, y0, lq = self.x0[idx], self.y0[idx], self.lq[idx]
        noise = stream.global_noise(draw, tuple(x0.shape[1:]), device)[local]
        u = draw.uniforms[local]
        if o.objective == "resshift":
            t = torch.from_numpy(np.minimum((u * o.num_train_timesteps).astype(np.int64),
                                            o.num_train_timesteps - 1)).to(device)
            x_t = self.sched.add_noise(x0, noise, t, y0)
            pred = model(torch.cat([self.sched.scale_model_input(x_t, t), lq], 1), t).sample
            target = x0
        elif o.objective == "regression":
            t = torch.zeros(len(x0), dtype=torch.long, device=device)
            pred = model(torch.cat([y0, lq], 1), t).sample
            target = x0
        else:
            n = self.ddpm.config.num_train_timesteps
            t = torch.from_numpy(np.minimum((u * n).astype(np.int64), n - 1)).to(device)
            x_t = self.ddpm.add_noise(x0, noise, t)
            pred = model(torch.cat([x_t, lq], 1), t).sample
            target = self.ddpm.get_velocity(x0, noise, t) if self.ddpm.config.prediction_type == "v_prediction" \
                else noise
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        return loss, {"loss": float(loss.detach())}

    @torch.no_grad()
    def after_optimizer_step(self, model, step):
        online = [p.detach() for p in self.accelerator.unwrap_model(model).parameters()]
        torch._foreach_lerp_(list(self.ema.parameters()), online, 1.0 - self.options.ema_decay)
        return {}

    # -- validation and the artefact ----------------------------------------------------------------------------
    def pipeline(self, unet):
        from ..pipelines.resshift.pipeline import ResShiftPipeline

        pipe = ResShiftPipeline(unet=unet, vae=self.vae, scheduler=self.scheduler(),
                                scale_factor=self.options.scale_factor)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def super_resolve(self, unet, low_res: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """HR images in [-1, 1] by this run's objective (the benchmark has the full set of samplers)."""
        from ..pipelines.resshift.baselines import ddpm_sr, regression_sr

        o: ResShiftOptions = self.options  # type: ignore[assignment]
        if o.objective == "resshift":
            out = self.pipeline(unet)((low_res + 1) / 2, generator=torch.Generator().manual_seed(seed),
                                      output_type="pt").images
            return out * 2 - 1
        if o.objective == "regression":
            return regression_sr(unet, self.vae, low_res, o.scale_factor)
        return ddpm_sr(unet, self.vae, low_res, 50, torch.Generator().manual_seed(seed), o.scale_factor)

    @torch.no_grad()
    def validation_images(self, model):
        from PIL import Image

        from ..pipelines.resshift.degrade import bicubic_up

        sr = (self.super_resolve(self.ema, self.val_lr) + 1) / 2
        up = (bicubic_up(self.val_lr, self.options.scale_factor) + 1) / 2
        images = []
        for row in (up, sr, self.val_hr):  # rows: bicubic, this model, ground truth
            for im in row:
                arr = (im.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
                images.append(Image.fromarray(arr))
        return images

    def save(self, model, output_dir: str) -> dict[str, Any]:
        o: ResShiftOptions = self.options  # type: ignore[assignment]
        out = Path(output_dir)
        unet = copy.deepcopy(self.ema).eval().requires_grad_(False).to("cpu")
        record = {"objective": o.objective, "degradation": o.degradation, "scale_factor": o.scale_factor,
                  "vae_from": o.pretrained_teacher_model, "ema_decay": o.ema_decay,
                  "parameters": sum(p.numel() for p in unet.parameters())}
        if o.objective == "resshift":
            pipe = self.pipeline(unet)
            pipe.to("cpu")
            pipe.save_pretrained(str(out))
            record["scheduler"] = dict(pipe.scheduler.config)
        else:
            unet.save_pretrained(str(out / "unet"))
            if o.objective == "ddpm":
                self.ddpm.save_pretrained(str(out / "scheduler"))
        (out / "baseline.json" if o.objective != "resshift" else out / "resshift.json").write_text(
            json.dumps(record, indent=2, default=str))
        return record
