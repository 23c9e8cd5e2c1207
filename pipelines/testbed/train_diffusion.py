"""Training of the two testbed pipelines on pre-encoded latents and pre-encoded captions.

* ``pixart``: ``PixArtTransformer2DModel``, ε-prediction on the linear-β DDPM schedule (what PixArt-α's
  DPM-Solver++ samples), masked T5 captions.
* ``flow``: ``FluxTransformer2DModel``, rectified flow (``x_t = (1 - t) x0 + t ε``, target ``ε - x0``) on 2x2-packed
  latents, CLIP pooled + 512-token T5 sequence, trained on the exact collapsed form of that sequence
  (:func:`.text.collapse_t5_sequence`).

Both drop 10 % of captions to the empty caption's embedding so that classifier-free guidance works, keep an EMA of
the weights, and save the whole pipeline with ``save_pretrained`` (the VAE and text encoders frozen).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .models import assemble_flux, assemble_pixart, build_transformer
from .train_common import (
    EMA,
    Budget,
    dataset,
    images_to_tensor,
    log,
    make_accelerator,
    optimizer_step,
    report_metrics,
    save_ema_pipeline,
    setup_torch,
)

CAPTION_DROPOUT = 0.1


def alt_caption(index: int, objects) -> str:
    """A second caption of training image ``index`` (other position/size mentions), for caption variety."""
    from .shapes import _mention, caption_for

    rng = np.random.default_rng((7, int(index)))
    return caption_for([_mention(rng, o, 0.6, 0.5) for o in objects])


#: Share of a command's ``minutes`` that a VAE trained on the way may use (the denoiser gets what is left).
VAE_BUDGET_SHARE = 1 / 3


def trained_vae_path(vae_path: str | Path | None, output_dir: Path, seed: int, minutes: float | None) -> Path:
    """``vae_path``, or the VAE next to ``output_dir`` (``<output_dir>-vae``), trained first when missing, within
    ``VAE_BUDGET_SHARE`` of the command's ``minutes``."""
    if vae_path is not None:
        return Path(vae_path)
    vae_path = output_dir.parent / f"{output_dir.name}-vae"
    if not (vae_path / "config.json").exists():
        from .train_vae import train_vae

        train_vae(vae_path, seed=seed, minutes=None if minutes is None else minutes * VAE_BUDGET_SHARE)
    return vae_path


def minutes_left(minutes: float | None, started: float) -> float | None:
    """What remains of a wall-clock cap of ``minutes`` begun at ``time.monotonic()`` = ``started`` (at least 0.5)."""
    if minutes is None:
        return None
    return max(minutes - (time.monotonic() - started) / 60.0, 0.5)


def ensure_vae(vae_path: str | Path | None, output_dir: Path, seed: int, minutes: float | None):
    """Load the VAE from ``vae_path``; train one next to ``output_dir`` when none is given."""
    from diffusers import AutoencoderKL

    path = trained_vae_path(vae_path, output_dir, seed, minutes)
    return AutoencoderKL.from_pretrained(str(path)).eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch: int = 500, scale: float = 1.0) -> torch.Tensor:
    """Posterior-mean latents (unscaled) of uint8 images, on the VAE's device; ``scale`` < 1 first resizes the images
    (bilinear, antialiased), as a multi-resolution training set stores smaller pictures."""
    device = vae.device
    out = []
    for i in range(0, len(images), batch):
        x = images_to_tensor(images[i:i + batch]).to(device)
        if scale != 1.0:
            x = F.interpolate(x, scale_factor=scale, mode="bilinear", antialias=True, align_corners=False)
        out.append(vae.encode(x).latent_dist.mode())
    return torch.cat(out)


def caption_table(samples) -> tuple[list[str], np.ndarray]:
    """Unique captions and, per training sample, the indices of its two captions ``[N, 2]``."""
    unique: dict[str, int] = {"": 0}
    table = np.zeros((len(samples), 2), np.int64)
    for i, s in enumerate(samples):
        for j, cap in enumerate((s.caption, alt_caption(i, s.objects))):
            table[i, j] = unique.setdefault(cap, len(unique))
    return list(unique), table


# ------------------------------------------------------------------------------------------------ text
@torch.no_grad()
def encode_pixart_text(pipe, captions: list[str], max_length: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked T5 embeddings exactly as ``PixArtAlphaPipeline.encode_prompt`` makes them (shorter padding is exact:
    masked positions never reach a kept one)."""
    embeds, masks = [], []
    for i in range(0, len(captions), 512):
        e, m, _, _ = pipe.encode_prompt(captions[i:i + 512], do_classifier_free_guidance=False, device=pipe.device,
                                        clean_caption=False, max_sequence_length=max_length)
        embeds.append(e)
        masks.append(m)
    return torch.cat(embeds), torch.cat(masks)


@torch.no_grad()
def encode_flux_text(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows [U, 41, D], log_counts [U, 41], pooled [U, D])``: ``FluxPipeline.encode_prompt`` at its default 512
    tokens, collapsed."""
    from .text import collapse_t5_sequence

    rows, counts, pooled = [], [], []
    for i in range(0, len(captions), 128):
        chunk = captions[i:i + 128]
        e, p, _ = pipe.encode_prompt(prompt=chunk, prompt_2=chunk, device=pipe.device, max_sequence_length=512)
        r, c = collapse_t5_sequence(e)
        rows.append(r)
        counts.append(c)
        pooled.append(p)
    return torch.cat(rows), torch.cat(counts), torch.cat(pooled)


# ------------------------------------------------------------------------------------------------ losses
class PixArtObjective:
    """ε-prediction MSE on the DDPM linear-β schedule."""

    def __init__(self, pipe, captions: list[str], latents: torch.Tensor, scaling: float):
        self.x0 = latents * scaling
        self.embeds, self.masks = encode_pixart_text(pipe, captions)
        betas = torch.linspace(0.0001, 0.02, 1000, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).float().to(latents.device)

    def loss(self, model, idx: torch.Tensor, caption_idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x0 = self.x0[idx]
        b = len(idx)
        t = torch.randint(0, 1000, (b,), generator=gen, device=x0.device)
        noise = torch.randn(x0.shape, generator=gen, device=x0.device)
        ab = self.alphas_cumprod[t].view(b, 1, 1, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        out = model(xt, encoder_hidden_states=self.embeds[caption_idx], encoder_attention_mask=self.masks[caption_idx],
                    timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        return F.mse_loss(out[:, : x0.shape[1]], noise)


class FlowObjective:
    """Rectified-flow velocity MSE on packed latents, logit-normal timesteps.

    ``latents``: one latent set per training resolution (the same images, index for index; the first is the full
    resolution), picked per step with ``loss(..., res=i)``; each gets its own position ids, as Flux's
    multi-resolution training does."""

    def __init__(self, pipe, captions: list[str], latents: list[torch.Tensor], scaling: float, shift: float):
        from diffusers import FluxPipeline

        from ...diffusers_internals import pack_latents, prepare_latent_image_ids

        self.x0: list[torch.Tensor] = []
        self.img_ids: list[torch.Tensor] = []
        for lat in latents:
            x0 = (lat - shift) * scaling
            b, c, h, w = x0.shape
            self.x0.append(pack_latents(FluxPipeline, x0, b, c, h, w))
            self.img_ids.append(prepare_latent_image_ids(FluxPipeline, b, h // 2, w // 2, x0.device, torch.float32))
        self.rows, self.log_counts, self.pooled = encode_flux_text(pipe, captions)
        self.txt_ids = torch.zeros(self.rows.shape[1], 3, device=self.x0[0].device)

    def loss(self, model, idx: torch.Tensor, caption_idx: torch.Tensor, gen: torch.Generator,
             res: int = 0) -> torch.Tensor:
        x0 = self.x0[res][idx]
        b = len(idx)
        t = torch.sigmoid(torch.randn(b, generator=gen, device=x0.device))
        noise = torch.randn(x0.shape, generator=gen, device=x0.device)
        xt = (1 - t.view(b, 1, 1)) * x0 + t.view(b, 1, 1) * noise
        bias = torch.cat([self.log_counts[caption_idx], x0.new_zeros(b, x0.shape[1])], dim=1).view(b, 1, 1, -1)
        out = model(hidden_states=xt, encoder_hidden_states=self.rows[caption_idx],
                    pooled_projections=self.pooled[caption_idx], timestep=t, img_ids=self.img_ids[res],
                    txt_ids=self.txt_ids, joint_attention_kwargs={"attention_mask": bias}, return_dict=False)[0]
        return F.mse_loss(out, noise - x0)


# ------------------------------------------------------------------------------------------------ main
@torch.no_grad()
def text_gain(model, objective, table: np.ndarray, num_train: int, samples: int = 64) -> float:
    """How much the captions help: (loss with the empty caption - loss with the real one) / loss with the empty one,
    on a fixed batch, same noise and timesteps. Near 0 means the model still ignores its text."""
    device = next(model.parameters()).device
    idx = np.arange(samples) % num_train
    losses = []
    for caption_idx in (np.zeros(samples, np.int64), table[idx, 0]):
        gen = torch.Generator(device=device).manual_seed(1234)
        losses.append(float(objective.loss(model, torch.from_numpy(idx).to(device),
                                           torch.from_numpy(caption_idx).to(device), gen)))
    return (losses[0] - losses[1]) / max(losses[0], 1e-12)


def train_pipeline(name: str, output_dir: str | Path, seed: int = 0, minutes: float | None = None,
                   vae_path: str | Path | None = None, num_train: int = 20000, steps: int = 6000,
                   batch_size: int = 32, lr: float = 8e-4, eval_prompts: int = 64,
                   init_from: str | Path | None = None, low_res_share: float = 0.0) -> dict[str, Any]:
    """Train testbed pipeline ``name`` ("pixart" or "flow") and ``save_pretrained`` it to ``output_dir``.

    ``minutes`` caps the whole call: data, a VAE trained on the way (at most ``VAE_BUDGET_SHARE``) and the training
    loop, which gets what is left. ``init_from``: a saved pipeline folder whose transformer weights start the run.
    ``low_res_share`` (flow only): fraction of steps trained on the same images at half resolution (32x32 pixels), so
    that the model, like the multi-resolution models Bottleneck Sampling targets, can denoise a low-resolution stage."""
    if not 0.0 <= low_res_share < 1.0:
        raise ValueError(f"low_res_share={low_res_share} must be in [0, 1): the share of steps at half resolution.")
    if low_res_share and name != "flow":
        raise ValueError("low_res_share is for the flow testbed (Bottleneck Sampling's model class); set it to 0 for "
                         f"{name!r}.")
    started = time.monotonic()
    output_dir = Path(output_dir)
    setup_torch(seed)
    log(f"{name}: generating {num_train} images")
    images, samples = dataset("train", num_train)  # worker processes: fork before any CUDA context exists
    accelerator = make_accelerator()
    device = accelerator.device
    vae = ensure_vae(vae_path, output_dir, seed, minutes).to(device)
    log(f"{name}: encoding {num_train} images on {device}")
    latents = encode_latents(vae, images)
    low_latents = encode_latents(vae, images, scale=0.5) if low_res_share else None
    del images
    captions, table = caption_table(samples)
    log(f"{name}: {len(captions)} unique captions; encoding text")
    scaling = float(vae.config.scaling_factor)
    transformer = build_transformer(name, "quality", seed)
    if init_from is not None:
        from safetensors.torch import load_file

        weights = Path(init_from) / "transformer" / "diffusion_pytorch_model.safetensors"
        transformer.load_state_dict(load_file(str(weights)))
        log(f"{name}: transformer initialised from {init_from}")
    if name == "pixart":
        pipe = assemble_pixart(transformer, vae, seed).to(device)
        objective: Any = PixArtObjective(pipe, captions, latents, scaling)
    else:
        pipe = assemble_flux(transformer, vae, seed).to(device)
        objective = FlowObjective(pipe, captions, [lat for lat in (latents, low_latents) if lat is not None],
                                  scaling, float(vae.config.shift_factor or 0.0))
    log(f"{name}: text encoded; transformer has {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f}M params")

    ema = EMA(transformer, decay=0.999)
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    budget = Budget(steps, minutes_left(minutes, started))
    sched = budget.lr_scheduler(opt, warmup=200, floor=0.05)
    model, opt = accelerator.prepare(transformer, opt)
    rng = np.random.default_rng(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    model.train()
    running = []
    for step in budget.steps():
        idx = rng.integers(0, num_train, size=batch_size)
        caption_idx = table[idx, rng.integers(0, 2, size=batch_size)]
        caption_idx[rng.random(batch_size) < CAPTION_DROPOUT] = 0  # the empty caption
        # the resolution is drawn only when asked for, so single-resolution runs keep their random stream
        res = {"res": int(rng.random() < low_res_share)} if low_res_share else {}
        loss = objective.loss(model, torch.from_numpy(idx).to(device), torch.from_numpy(caption_idx).to(device), gen,
                              **res)
        optimizer_step(accelerator, model, opt, sched, loss, clip_norm=1.0)
        ema.update(accelerator.unwrap_model(model), step)
        running.append(loss.detach())  # no .item() per step: a GPU would sync every step
        if step % 100 == 0:
            gain = f" text gain {text_gain(model, objective, table, num_train):.3f}" if step % 500 == 0 else ""
            log(f"{name} step {step} loss {torch.stack(running).mean().item():.4f}{gain} "
                f"({budget.elapsed_min():.1f} min)")
            running = []
    train_minutes = budget.elapsed_min()
    save_ema_pipeline(pipe, ema, output_dir)
    metrics: dict[str, Any] = {"train_minutes": train_minutes, "steps": step + 1, "batch_size": batch_size,
                               "lr": lr, "num_train": num_train, "device": str(device),
                               **({"low_res_share": low_res_share} if low_res_share else {}),
                               "final_loss": torch.stack(running).mean().item() if running else math.nan}
    if eval_prompts:
        from .evaluate import evaluate_pipeline

        metrics.update(evaluate_pipeline(name, output_dir, num_prompts=eval_prompts))
    return report_metrics(name, output_dir, metrics, "train_metrics.json")
