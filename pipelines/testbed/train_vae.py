"""Training of the shared testbed ``AutoencoderKL`` (64x64x3 ↔ 16x16x4) on generator images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .models import build_vae
from .shapes import make_batch
from .train_common import (
    EMA,
    Budget,
    images_to_tensor,
    log,
    make_accelerator,
    optimizer_step,
    report_metrics,
    setup_torch,
)


@torch.no_grad()
def latent_statistics(vae, images: torch.Tensor, batch: int = 250) -> tuple[float, float]:
    """Mean and standard deviation of posterior-mean latents of ``images`` (in [-1, 1])."""
    zs = torch.cat([vae.encode(images[i:i + batch]).latent_dist.mode() for i in range(0, len(images), batch)])
    return float(zs.mean()), float(zs.std())


@torch.no_grad()
def reconstruction_metrics(vae, count: int = 500) -> dict[str, float]:
    """PSNR of reconstructions of fresh test images and shapes-net accuracy on them (when shapes-net exists)."""
    images, samples = make_batch("test", 0, count)
    x = images_to_tensor(images)
    rec = torch.cat([vae.decode(vae.encode(x[i:i + 250]).latent_dist.mode()).sample for i in range(0, count, 250)])
    rec_u8 = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    mse = np.mean((rec_u8.astype(np.float64) - images.astype(np.float64)) ** 2, axis=(1, 2, 3))
    metrics = {"psnr": float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))))}
    try:
        from .shapes_net import adherence

        full = [" and ".join(f"a {o.colour} {o.shape} in the {o.position_name}" for o in s.objects) for s in samples]
        metrics["shapes_net_acc_on_reconstructions"] = float(adherence(list(rec_u8), full))
    except FileNotFoundError:
        pass
    return metrics


def train_vae(output_dir: str | Path, seed: int = 0, minutes: float | None = None, num_train: int = 30000,
              steps: int = 1500, batch_size: int = 16, kl_weight: float = 1e-5, lr: float = 1e-3,
              init_from: str | Path | None = None, decoder_only: bool = False) -> dict[str, Any]:
    """Train the VAE (L1 + MSE + a small KL), set ``scaling_factor``/``shift_factor`` from the latent statistics,
    and ``save_pretrained`` it to ``output_dir``. ``init_from``: a saved VAE folder to continue from;
    ``decoder_only``: keep its encoder (so its latent space and scaling) frozen and improve the decoder only."""
    setup_torch(seed)
    accelerator = make_accelerator()
    log(f"generating {num_train} images")
    images, _ = make_batch("train", 0, num_train)
    vae = build_vae(seed)
    if init_from is not None:
        from diffusers import AutoencoderKL

        source = AutoencoderKL.from_pretrained(str(init_from))
        vae.load_state_dict(source.state_dict())
        vae.register_to_config(scaling_factor=source.config.scaling_factor, shift_factor=source.config.shift_factor)
        log(f"vae initialised from {init_from}")
    if decoder_only:
        if init_from is None:
            raise ValueError("decoder_only needs init_from (a trained VAE whose encoder is kept)")
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    ema = EMA(vae, decay=0.995)
    trainable = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    budget = Budget(steps, minutes)
    sched = budget.lr_scheduler(opt, warmup=50, floor=0.05)
    vae, opt = accelerator.prepare(vae, opt)
    rng = np.random.default_rng(seed)
    vae.train()
    for step in budget.steps():
        x = images_to_tensor(images[rng.integers(0, num_train, size=batch_size)]).to(accelerator.device)
        with torch.set_grad_enabled(not decoder_only):
            posterior = accelerator.unwrap_model(vae).encode(x).latent_dist
            kl = 0.5 * (posterior.mean ** 2 + posterior.var - 1.0 - posterior.logvar).mean()
        rec = accelerator.unwrap_model(vae).decode(posterior.sample()).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + kl_weight * kl
        optimizer_step(accelerator, vae, opt, sched, loss, clip_norm=1.0)
        ema.update(accelerator.unwrap_model(vae), step)
        if step % 50 == 0:
            log(f"vae step {step} loss {loss.item():.4f} kl {kl.item():.3f}")
    vae = ema.model.eval()
    mean, std = latent_statistics(vae, images_to_tensor(images[:2000]))
    if not decoder_only:  # a frozen encoder keeps the scaling the pipelines were trained with
        vae.register_to_config(scaling_factor=1.0 / std, shift_factor=mean)
    metrics = {"latent_mean": mean, "latent_std": std, "train_minutes": budget.elapsed_min(),
               **reconstruction_metrics(vae)}
    vae.save_pretrained(output_dir)
    return report_metrics("vae", output_dir, metrics)
