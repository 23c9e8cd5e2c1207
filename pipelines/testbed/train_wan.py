"""Training of the video testbed ``testbed:wan``: its ``AutoencoderKLWan`` on the clips, then its
``WanTransformer3DModel`` on the pre-encoded latents, saved as a whole ``WanPipeline``.

* VAE: L1 + MSE + a small KL on whole 9-frame clips drawn fresh every step (the causal 3D VAE must see the
  first-frame path and the 4-frame chunks it compresses after it), with the object's pixels weighted
  ``FOREGROUND_WEIGHT`` times (:func:`foreground_weights`): the object covers ~5 % of a frame, and with a plain loss
  a small VAE on a short budget settles on the background alone (measured: a 15-min CPU run, PSNR 21.5 dB, decoded
  clips with no object at all, shapes-net 0 %). Then ``latents_mean`` / ``latents_std`` are set to the per-channel
  statistics of the posterior means, which is where ``WanPipeline`` reads its latent normalisation.
* Transformer: rectified flow as Wan trains it (``x_t = (1 - σ) x0 + σ ε``, target ``ε - x0``, timestep ``1000 σ``),
  logit-normal σ, 10 % of captions dropped to the empty caption (the contract's negative prompt) for guidance,
  captions pre-encoded exactly as ``WanPipeline.encode_prompt`` makes them, EMA of the weights.
* Decoder fine-tuning (:func:`train_wan_decoder`, :data:`WAN_DECODER_RECIPE`): the same VAE loss with the encoder,
  ``quant_conv`` and the latent statistics frozen, so every network trained in the latent space stays valid.

:data:`WAN_RECIPES` holds the GPU recipe (``shipped``), two sized for a 2-core CPU (``cpu``, 31 min; ``cpu-long``,
~2.3 h, stages sized to reach the 8x VAE's ceiling) and the 4x-VAE chain on either (``shipped-4x``, ``cpu-4x``).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .perceptual import perceptual_distance
from .train_common import (
    EMA,
    Budget,
    log,
    make_accelerator,
    optimizer_step,
    report_metrics,
    save_ema_pipeline,
    setup_torch,
)
from .video_data import NUM_FRAMES, SPLIT_TRAIN, SPLIT_VAL, make_clips

CAPTION_DROPOUT = 0.1
FOREGROUND_WEIGHT = 20.0

#: Stages per recipe. ``shipped``: sized for ~10 min on one H100/H200 (VAE ~3 min, transformer ~6 min; both models
#: are tiny, so the batch, not the GPU, is the limit); ``assets/testbed-wan`` came from it cut to 4 minutes (its
#: ``train_metrics.json``: the VAE reached 421 steps in 1.5 min). ``cpu``: ~31 min on 1 thread of 2 shared cores
#: (VAE 12, encoding the clips ~2.5, transformer 16); it learns colour only. ``cpu-long``: ~2.3 h on 2 cores, each
#: stage sized by a CPU run that reached its ceiling: the 8x VAE with a narrow posterior (40 min: reconstructions
#: 100 / 31.2 / 100 % on colour / shape / direction, ``wan_vae_cpu_variants/8x.json``) and the transformer on 30 000
#: clips (85 min, 34 357 steps, one thread, on the shipped VAE's latents: generated clips 100 / 31.2 / 100 %, the
#: VAE's ceiling on every attribute, ``wan_cpu_long/``); the chain as a whole has not been run.
WAN_RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "shipped": {"vae": {"steps": 6000, "batch_size": 32, "lr": 1e-3, "minutes": 3.0},
                "transformer": {"steps": 40000, "batch_size": 512, "lr": 8e-4, "num_train": 60000, "minutes": 6.0}},
    "cpu": {"vae": {"steps": 100000, "batch_size": 4, "lr": 1e-3, "minutes": 12.0},
            "transformer": {"steps": 100000, "batch_size": 64, "lr": 8e-4, "num_train": 6000, "minutes": 16.0}},
    "cpu-long": {"vae": {"steps": 10**6, "batch_size": 8, "lr": 1e-3, "minutes": 40.0, "logvar_init": -10.0},
                 "transformer": {"steps": 10**6, "batch_size": 64, "lr": 8e-4, "num_train": 30000, "minutes": 85.0}},
    "shipped-4x": {"vae": {"steps": 10**6, "batch_size": 32, "lr": 1e-3, "minutes": 4.0, "spatial_compression": 4,
                           "logvar_init": -10.0},
                   "transformer": {"steps": 40000, "batch_size": 512, "lr": 8e-4, "num_train": 60000, "minutes": 5.0},
                   "decoder": {"steps": 10**6, "batch_size": 32, "lr": 1e-3, "minutes": 5.0, "decoder_only": True}},
    "cpu-4x": {"vae": {"steps": 10**6, "batch_size": 8, "lr": 1e-3, "minutes": 45.0, "spatial_compression": 4,
                       "logvar_init": -10.0},
               "transformer": {"steps": 10**6, "batch_size": 64, "lr": 8e-4, "num_train": 12000, "minutes": 90.0},
               "decoder": {"steps": 10**6, "batch_size": 8, "lr": 1e-3, "minutes": 90.0, "decoder_only": True}},
}
#: ``cpu-4x``: the 4x VAE (:func:`.wan.vae_config`) trained with its encoder and a narrow posterior, then, on its
#: frozen encoder's latents, the transformer (192 tokens, :func:`.wan.transformer_config`) and a decoder-only
#: continuation, which do not depend on each other, so :func:`train_wan_recipe` trains them side by side, one process
#: and one thread each: 45 + 90 minutes of wall clock on 2 cores. ``shipped-4x``: the same chain at GPU batch sizes,
#: ~10 min on one GPU (the two side-by-side stages share it); untested: no GPU has been lent since it was written.

#: The decoder of ``assets/testbed-wan/vae`` fine-tuned with its encoder, ``quant_conv`` and latent statistics
#: frozen (``testbed train wan-decoder``), so the shipped transformer and the students trained in its latent space
#: stay valid: the GPU recipe's 421 VAE steps left a decoder that draws every shape round. Stages chained from
#: ``init_from`` (:func:`train_wan_decoder`); the step counts are those the shipped decoder reached in wall-clock
#: budgets of 10 and 52 minutes on one thread of a shared 2-core CPU (62 min in all; run by steps, the stages follow
#: the same schedule shape, not the same bits). Reconstruction PSNR on 64 validation clips: 19.0 → 20.8 → 23.6 dB;
#: on the 64 held-out clips (``testbed eval wan``) colour 72 → 100 % and direction 94 → 100 %, but shape stays at
#: 31 % (chance 33 %): the blobs sharpen, not into shapes (``docs/results/testbed_training/wan_decoder_eval.json``).
WAN_DECODER_RECIPE: tuple[dict[str, Any], ...] = (
    {"steps": 349, "batch_size": 8, "lr": 1e-3, "decoder_only": True},
    {"steps": 2468, "batch_size": 8, "lr": 1e-3, "decoder_only": True},
)

#: The cycle of ``(frames, batch_size)`` steps (``train_wan_vae(clip_schedule=...)``) that teaches the 8x decoder the
#: shapes. The causal encoder encodes a clip's first frame alone and each later chunk of 4 after it, so a 1-frame or
#: 5-frame prefix has exactly the first latent frames of its whole clip: the decoder trains on the latents the
#: transformer generates, at a fraction of the cost (decoder-only step on 2 threads: 6 ms per first frame at batch 128,
#: 49 ms per 5-frame prefix, 93-123 ms per whole clip). The cycle sees ~27 independent clips a second against 8-11 for
#: whole clips; its one whole-clip step in four keeps the second chunk, decoded after a full one, tracking the motion.
#: Why samples: the shipped decoder's 22 500 whole clips left every shape round, while 134 000 first frames alone
#: taught its first frame the shapes (``docs/results/testbed_training/wan_decoder_first_frames/``).
WAN_SHAPE_DECODER_SCHEDULE: tuple[tuple[int, int], ...] = ((1, 128), (5, 32), (5, 32), (9, 16))

#: ``testbed train wan-shape-decoder``: from the shipped decoder (encoder, ``quant_conv`` and latent statistics
#: frozen), first frames alone, then :data:`WAN_SHAPE_DECODER_SCHEDULE` at two learning rates. The step counts are
#: those the measured stages reached in 35, 65 and 40 minutes on 2 threads (the third stage ran with seed 1; run from
#: the recipe every stage takes the command's seed); the results are in the README ("The video testbed").
WAN_SHAPE_DECODER_RECIPE: tuple[dict[str, Any], ...] = (
    {"steps": 4179, "clip_schedule": ((1, 32),), "lr": 1e-3, "decoder_only": True},
    {"steps": 2117, "clip_schedule": WAN_SHAPE_DECODER_SCHEDULE, "lr": 1e-3, "decoder_only": True},
    {"steps": 1315, "clip_schedule": WAN_SHAPE_DECODER_SCHEDULE, "lr": 5e-4, "decoder_only": True},
)


def clips_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, T, H, W, 3]`` → float ``[N, 3, T, H, W]`` in [-1, 1] (the VAE's layout)."""
    return torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def tensor_to_clips(video: torch.Tensor) -> np.ndarray:
    """float ``[N, 3, T, H, W]`` in [-1, 1] → uint8 ``[N, T, H, W, 3]``."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).cpu().numpy()


def _make_chunk(args: tuple[str, int, int]) -> tuple[np.ndarray, list[str]]:
    frames, clips = make_clips(*args)
    return frames, [c.caption for c in clips]


def clip_dataset(split: str, count: int, workers: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Frames and captions of clips ``0 .. count - 1`` of ``split``; generated in ``workers`` processes (default
    ``DA_THREADS``) when many are asked for. Every clip is seeded by its index, so the result does not depend on it."""
    workers = workers or int(os.environ.get("DA_THREADS", "2"))
    if workers <= 1 or count < 4000:
        return _make_chunk((split, 0, count))
    import multiprocessing

    step = -(-count // workers)
    chunks = [(split, s, min(step, count - s)) for s in range(0, count, step)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        parts = pool.map(_make_chunk, chunks)
    return np.concatenate([p[0] for p in parts]), [c for p in parts for c in p[1]]


# ------------------------------------------------------------------------------------------------ VAE
def foreground_weights(x: torch.Tensor, weight: float = FOREGROUND_WEIGHT) -> torch.Tensor:
    """Per-pixel loss weights ``[N, 1, T, H, W]``: ``weight`` where a pixel differs from its frame's background
    colour (the median of the frame's border, as :func:`.video_judge.object_track` finds the object), else 1."""
    from .video_judge import MASK_THRESHOLD

    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)  # [N, 3, T, 4W]
    background = border.median(dim=-1).values[..., None, None]
    mask = (x - background).abs().amax(dim=1, keepdim=True) > MASK_THRESHOLD / 127.5
    return 1.0 + (weight - 1.0) * mask.float()


@torch.no_grad()
def encode_clips(vae, frames: np.ndarray, batch: int = 64) -> torch.Tensor:
    """Posterior-mean latents (unnormalised) ``[N, Z, 3, H/c, W/c]`` (``c`` the spatial compression) of uint8
    clips, on the VAE's device."""
    out = [vae.encode(clips_to_tensor(frames[i:i + batch]).to(vae.device)).latent_dist.mode()
           for i in range(0, len(frames), batch)]
    return torch.cat(out)


def normalise_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Posterior means ``[N, Z, T, h, w]`` → the normalised latents the transformer is trained on and generates
    (``(z - latents_mean) / latents_std`` per channel, the inverse of what ``WanPipeline`` does before decoding)."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(shape)
    std = torch.tensor(vae.config.latents_std, device=latents.device).view(shape)
    return (latents - mean) / std


@torch.no_grad()
def vae_reconstruction_metrics(vae, count: int = 64) -> dict[str, Any]:
    """PSNR of reconstructions of validation clips, shapes-net's per-frame accuracy on them and the video judge's
    adherence per attribute (the ceiling any generated clip can reach through this decoder)."""
    from .shapes_net import adherence
    from .video_judge import judge_clips, video_scores

    frames, captions = clip_dataset(SPLIT_VAL, count, workers=1)
    rec = []
    for i in range(0, count, 16):
        x = clips_to_tensor(frames[i:i + 16]).to(vae.device)
        rec.append(tensor_to_clips(vae.decode(vae.encode(x).latent_dist.mode()).sample))
    rec_u8 = np.concatenate(rec)
    mse = ((rec_u8.astype(np.float64) - frames.astype(np.float64)) ** 2).mean(axis=(1, 2, 3, 4))
    prompts = [c for c in captions for _ in range(frames.shape[1])]
    return {"psnr": float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10)))),
            "frame_adherence_on_reconstructions": float(adherence(list(rec_u8.reshape(-1, *rec_u8.shape[2:])),
                                                                  prompts)),
            "clip_adherence_on_reconstructions": video_scores(judge_clips(rec_u8, captions))}


def start_posterior_narrow(vae, logvar_init: float) -> None:
    """Start the posterior's log-variance at ``logvar_init`` everywhere (the log-variance half of ``quant_conv``:
    zero weights, that bias). From the default initialisation (log σ² ≈ 0, σ ≈ 1) the tiny KL weight never pulls σ
    down within a CPU or GPU budget, so the decoder trains on latents whose noise is as wide as their spread (measured
    on the shipped VAE: σ 0.50-0.88 against per-channel spreads of 0.30-2.6) and learns to ignore what the noise
    hides: the shape. A narrow posterior keeps it; the reconstruction loss can still widen σ where it costs nothing."""
    z_dim = vae.config.z_dim
    with torch.no_grad():
        vae.quant_conv.weight[z_dim:].zero_()
        vae.quant_conv.bias[z_dim:].fill_(logvar_init)


def check_clip_schedule(schedule: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """``schedule`` as a tuple of ``(frames, batch_size)`` pairs, after checking each: ``frames`` a length the causal
    VAE encodes (``4k + 1``, the first frame alone, then chunks of 4) no longer than the clips (``NUM_FRAMES``),
    ``batch_size`` ≥ 1."""
    pairs = tuple((int(f), int(b)) for f, b in schedule)
    valid = [f for f in range(1, NUM_FRAMES + 1) if f % 4 == 1]
    for frames, batch in pairs:
        if frames not in valid or batch < 1:
            raise ValueError(f"clip_schedule entry ({frames}, {batch}): frames must be one of {valid} (4k + 1, at most "
                             f"the clips' {NUM_FRAMES}) and the batch size at least 1.")
    if not pairs:
        raise ValueError("clip_schedule is empty; give at least one (frames, batch_size) pair.")
    return pairs


def train_wan_vae(output_dir: str | Path, seed: int = 0, minutes: float | None = None, steps: int = 3000,
                  batch_size: int | None = None, lr: float = 1e-3, kl_weight: float = 1e-5,
                  num_train: int = 200_000, init_from: str | Path | None = None, decoder_only: bool = False,
                  logvar_init: float | None = None, spatial_compression: int = 8,
                  vae_overrides: dict[str, Any] | None = None, adversarial_weight: float = 0.0,
                  disc_lr: float = 2e-4, clip_schedule: tuple[tuple[int, int], ...] | None = None,
                  perceptual_weight: float = 0.0, perceptual_net: str | Path | None = None,
                  perceptual_frames: int = 1) -> dict[str, Any]:
    """Train the testbed ``AutoencoderKLWan`` on fresh clips (index drawn from ``num_train``), set its latent
    statistics and ``save_pretrained`` it to ``output_dir``. ``init_from``: a saved VAE folder to continue from;
    ``decoder_only``: keep its encoder and ``quant_conv`` frozen (encoded without gradients) and its
    ``latents_mean`` / ``latents_std`` as they are, so its latent space, and every network trained in it, stays
    valid; only the decoder side (``post_quant_conv``, ``decoder``) is optimised, on the posterior means: what the
    transformer was trained on and generates (the posterior's noise is as wide as the means' spread on several
    channels of the shipped VAE, and a decoder trained on samples of it draws every shape round).
    ``logvar_init``: a fresh VAE's posterior starts narrow (:func:`start_posterior_narrow`); ``spatial_compression``
    and ``vae_overrides``: a fresh VAE's 8x or 4x and other config keys (:func:`.wan.build_vae`).
    ``adversarial_weight`` > 0: add a patch discriminator's hinge term (:mod:`.adversarial`), weighted by that factor
    times VQGAN's adaptive λ, the discriminator trained at ``disc_lr``; 0 trains the plain L1 + L2 + KL VAE.
    ``perceptual_weight`` > 0: add that times the LPIPS-style distance (:mod:`.perceptual`) in the features of the
    frame net saved at ``perceptual_net`` (frozen), on ``perceptual_frames`` frames of each step's clips drawn at
    random (on every frame, the net's forward and backward made a CPU step ~5x slower; measured).
    ``batch_size`` (default 4) whole clips a step, or ``clip_schedule``: the steps cycle through its
    ``(frames, batch_size)`` pairs (:func:`check_clip_schedule`), each step on the first ``frames`` frames of its
    clips; see :data:`WAN_SHAPE_DECODER_SCHEDULE` for why."""
    from .video_data import make_clip
    from .wan import build_vae

    whole_clips = clip_schedule is None
    if not whole_clips and batch_size is not None:
        raise ValueError("clip_schedule sets each step's batch size; drop batch_size or drop clip_schedule.")
    clip_schedule = check_clip_schedule(((NUM_FRAMES, batch_size or 4),) if whole_clips else clip_schedule)

    fresh_only = {"logvar_init": logvar_init is not None, "spatial_compression": spatial_compression != 8,
                  "vae_overrides": bool(vae_overrides)}
    if init_from is not None and any(fresh_only.values()):
        raise ValueError(f"{', '.join(k for k, v in fresh_only.items() if v)} shape a fresh VAE; a VAE continued from "
                         f"{init_from} keeps its own architecture and posterior: drop them or drop init_from.")
    setup_torch(seed)
    accelerator = make_accelerator()
    percept = load_perceptual_net(perceptual_net, accelerator.device) if perceptual_weight > 0 else None
    frame_gen = torch.Generator().manual_seed(seed)
    if init_from is not None:
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(str(init_from))
        log(f"wan vae initialised from {init_from}")
    elif decoder_only:
        raise ValueError("decoder_only needs init_from (a trained VAE whose encoder is kept)")
    else:
        vae = build_vae(seed, spatial_compression, **(vae_overrides or {}))
        if logvar_init is not None:
            start_posterior_narrow(vae, logvar_init)
    if decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    vae = vae.to(accelerator.device)  # before the EMA copy, which must live on the same device
    ema = EMA(vae, decay=0.995)
    trainable = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    budget = Budget(steps, minutes)
    sched = budget.lr_scheduler(opt, warmup=50, floor=0.05)
    vae, opt = accelerator.prepare(vae, opt)
    adversary = Adversary(accelerator, disc_lr, seed) if adversarial_weight > 0 else None
    rng = np.random.default_rng(seed)
    vae.train()
    running = []
    step = -1
    for step in budget.steps():
        clip_frames, clips = clip_schedule[step % len(clip_schedule)]
        frames = np.stack([make_clip(SPLIT_TRAIN, int(i)).frames[:clip_frames]
                           for i in rng.integers(0, num_train, clips)])
        x = clips_to_tensor(frames).to(accelerator.device)
        model = accelerator.unwrap_model(vae)
        with torch.set_grad_enabled(not decoder_only):
            posterior = model.encode(x).latent_dist
            kl = 0.5 * (posterior.mean ** 2 + posterior.var - 1.0 - posterior.logvar).mean()
        rec = model.decode(posterior.mode() if decoder_only else posterior.sample()).sample
        weights = foreground_weights(x)
        error = rec - x
        loss = ((weights * (error.abs() + error ** 2)).sum() / (weights.sum() * x.shape[1])) + kl_weight * kl
        if percept is not None:
            picked = torch.randperm(x.shape[2], generator=frame_gen)[:perceptual_frames].to(x.device)
            loss = loss + perceptual_weight * perceptual_distance(percept, rec[:, :, picked], x[:, :, picked])
        if adversary is not None:
            loss = loss + adversarial_weight * adversary.decoder_term(loss, rec, model.decoder.conv_out.weight)
        optimizer_step(accelerator, vae, opt, sched, loss, clip_norm=1.0)
        if adversary is not None:
            adversary.step(x, rec)
        ema.update(model, step)
        running.append(torch.stack([loss.detach(), error.abs().mul(weights > 1).sum() / (weights > 1).sum().clamp(min=1)
                                    / x.shape[1]]))
        if step % 50 == 0:
            mean_loss, object_l1 = torch.stack(running).mean(0).tolist()
            log(f"wan vae step {step} loss {mean_loss:.4f} object L1 {object_l1:.3f} kl {kl.item():.3f} "
                f"{'' if adversary is None else adversary.describe()}({budget.elapsed_min():.1f} min)")
            running = []
    vae = ema.model.eval()
    if not decoder_only:  # a frozen encoder keeps the normalisation the transformer was trained with
        frames, _ = clip_dataset(SPLIT_TRAIN, 512, workers=1)
        z = encode_clips(vae, frames)
        mean, std = z.mean(dim=(0, 2, 3, 4)), z.std(dim=(0, 2, 3, 4))
        vae.register_to_config(latents_mean=[float(v) for v in mean], latents_std=[float(v) for v in std])
    batches = ({"batch_size": clip_schedule[0][1]} if whole_clips
               else {"clip_schedule": [list(pair) for pair in clip_schedule]})
    metrics = {"train_minutes": budget.elapsed_min(), "steps": step + 1, **batches, "lr": lr,
               "decoder_only": decoder_only, "init_from": None if init_from is None else str(init_from),
               "logvar_init": logvar_init, "spatial_compression": vae.config.scale_factor_spatial,
               "adversarial_weight": adversarial_weight, "perceptual_weight": perceptual_weight,
               "perceptual_net": None if percept is None else str(perceptual_net),
               "perceptual_frames": None if percept is None else perceptual_frames,
               "device": str(accelerator.device), **vae_reconstruction_metrics(vae)}
    vae.to("cpu").save_pretrained(output_dir)
    return report_metrics("wan vae", output_dir, metrics)


def load_perceptual_net(path: str | Path | None, device) -> Any:
    """The frozen :class:`.perceptual.FramePerceptualNet` saved at ``path`` (train one with
    :func:`.perceptual.train_frame_perceptual_net`)."""
    from .perceptual import FramePerceptualNet

    if path is None or not (Path(path) / "config.json").is_file():
        raise ValueError(f"perceptual_weight > 0 needs perceptual_net, a saved FramePerceptualNet folder; {path} is "
                         "not one. Train one with perceptual.train_frame_perceptual_net(folder).")
    net = FramePerceptualNet.from_pretrained(str(path)).to(device).eval()
    return net.requires_grad_(False)


class Adversary:
    """The discriminator side of adversarial VAE training: its network, optimiser and last losses."""

    def __init__(self, accelerator, lr: float, seed: int):
        from .adversarial import PatchDiscriminator

        self.accelerator = accelerator
        with torch.random.fork_rng():  # its own initialisation, leaving the VAE's random stream as it was
            torch.manual_seed(seed + 1)
            disc = PatchDiscriminator().to(accelerator.device)
        opt = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.9))
        self.disc, self.opt = accelerator.prepare(disc, opt)
        self.last = {"d": float("nan"), "g": float("nan"), "lambda": float("nan")}

    def decoder_term(self, reconstruction_loss: torch.Tensor, rec: torch.Tensor,
                     last_layer: torch.Tensor) -> torch.Tensor:
        """``λ · (−E[D(x̂)])`` with VQGAN's adaptive λ; the discriminator's own weights get no gradient from it."""
        from .adversarial import adaptive_weight, generator_loss

        self.disc.requires_grad_(False)
        g = generator_loss(self.disc(rec))
        self.disc.requires_grad_(True)
        lam = adaptive_weight(reconstruction_loss, g, last_layer)
        self.last.update(g=g.item(), **{"lambda": lam.item()})
        return lam * g

    def step(self, real: torch.Tensor, rec: torch.Tensor) -> None:
        """One hinge update of the discriminator on this step's real clips and (detached) reconstructions."""
        from .adversarial import discriminator_hinge_loss

        loss = discriminator_hinge_loss(self.disc(real), self.disc(rec.detach()))
        self.opt.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        self.opt.step()
        self.last["d"] = loss.item()

    def describe(self) -> str:
        return f"D {self.last['d']:.3f} G {self.last['g']:.3f} λ {self.last['lambda']:.3g} "


def train_wan_decoder(output_dir: str | Path, init_from: str | Path | None = None, seed: int = 0,
                      minutes: float | None = None,
                      stages: tuple[dict[str, Any], ...] | None = None) -> dict[str, Any]:
    """Fine-tune the decoder of the Wan VAE at ``init_from`` (default: the shipped ``testbed:wan``'s) by
    ``stages`` (default :data:`WAN_DECODER_RECIPE`) into ``output_dir``; its encoder side is kept bit for bit."""
    from .registry import testbed_path
    from .train import train_vae_recipe

    init_from = Path(init_from) if init_from is not None else testbed_path("wan") / "vae"
    if not (init_from / "config.json").is_file():  # before from_pretrained, which would look on the Hub
        raise ValueError(f"--init-from {init_from}: no saved AutoencoderKLWan there (no config.json); pass a VAE "
                         "folder such as assets/testbed-wan/vae or the vae/ of a `testbed train wan` output.")
    return train_vae_recipe(output_dir, seed=seed, minutes=minutes, stages=stages or WAN_DECODER_RECIPE,
                            init_from=init_from, trainer=train_wan_vae)


# ------------------------------------------------------------------------------------------------ transformer
class WanFlowObjective:
    """Wan's rectified-flow velocity loss on normalised latents, logit-normal σ, captions pre-encoded."""

    def __init__(self, pipe, captions: list[str], latents: torch.Tensor):
        from .wan import UMT5_MAX_LENGTH

        self.x0 = normalise_latents(pipe.vae, latents)
        with torch.no_grad():
            self.embeds = torch.cat([
                pipe.encode_prompt(captions[i:i + 256], do_classifier_free_guidance=False, device=latents.device,
                                   max_sequence_length=UMT5_MAX_LENGTH)[0]
                for i in range(0, len(captions), 256)])

    def loss(self, model, idx: torch.Tensor, caption_idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x0 = self.x0[idx]
        b = len(idx)
        sigma = torch.sigmoid(torch.randn(b, generator=gen, device=x0.device))
        noise = torch.randn(x0.shape, generator=gen, device=x0.device)
        s = sigma.view(b, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        out = model(xt, timestep=sigma * 1000, encoder_hidden_states=self.embeds[caption_idx], return_dict=False)[0]
        return F.mse_loss(out, noise - x0)


@torch.no_grad()
def caption_gain(model, objective: WanFlowObjective, caption_idx: np.ndarray, samples: int = 64) -> float:
    """(loss with the empty caption − loss with the real one) / loss with the empty one on a fixed batch (same noise
    and σ): how much the model uses its text; near 0 means it ignores it."""
    device = objective.x0.device
    idx = torch.arange(samples, device=device) % len(objective.x0)
    losses = []
    for caps in (torch.zeros(samples, dtype=torch.long, device=device),
                 torch.from_numpy(caption_idx[idx.cpu().numpy()]).to(device)):
        gen = torch.Generator(device=device).manual_seed(1234)
        losses.append(float(objective.loss(model, idx, caps, gen)))
    return (losses[0] - losses[1]) / max(losses[0], 1e-12)


def train_wan_transformer(output_dir: str | Path, vae_path: str | Path, seed: int = 0, minutes: float | None = None,
                          steps: int = 20000, batch_size: int = 64, lr: float = 8e-4, num_train: int = 4000,
                          init_from: str | Path | None = None) -> dict[str, Any]:
    """Train the transformer on ``num_train`` clips encoded by the VAE at ``vae_path`` and ``save_pretrained`` the
    whole ``WanPipeline`` to ``output_dir``. ``minutes`` caps the optimisation loop only."""
    from diffusers import AutoencoderKLWan

    from .wan import assemble, build_transformer

    setup_torch(seed)
    output_dir = Path(output_dir)
    log(f"wan: generating {num_train} clips")
    frames, clip_captions = clip_dataset(SPLIT_TRAIN, num_train)
    accelerator = make_accelerator()
    device = accelerator.device
    vae = AutoencoderKLWan.from_pretrained(str(vae_path)).eval().requires_grad_(False).to(device)
    started = time.monotonic()
    latents = encode_clips(vae, frames)
    del frames
    log(f"wan: encoded {num_train} clips in {(time.monotonic() - started) / 60:.1f} min")
    captions = ["", *sorted(set(clip_captions))]
    caption_idx = np.array([captions.index(c) for c in clip_captions], np.int64)
    transformer = build_transformer("quality", seed, latent_channels=vae.config.z_dim)
    if init_from is not None:
        from safetensors.torch import load_file

        weights = Path(init_from) / "transformer" / "diffusion_pytorch_model.safetensors"
        transformer.load_state_dict(load_file(str(weights)))
        log(f"wan: transformer initialised from {init_from}")
    pipe = assemble(transformer, vae, seed).to(device)
    objective = WanFlowObjective(pipe, captions, latents)
    ema = EMA(transformer, decay=0.999)
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    budget = Budget(steps, minutes)
    sched = budget.lr_scheduler(opt, warmup=200, floor=0.05)
    model, opt = accelerator.prepare(transformer, opt)
    rng = np.random.default_rng(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    model.train()
    running: list[torch.Tensor] = []
    step = -1
    for step in budget.steps():
        idx = rng.integers(0, num_train, size=batch_size)
        caps = caption_idx[idx].copy()
        caps[rng.random(batch_size) < CAPTION_DROPOUT] = 0
        loss = objective.loss(model, torch.from_numpy(idx).to(device), torch.from_numpy(caps).to(device), gen)
        optimizer_step(accelerator, model, opt, sched, loss, clip_norm=1.0)
        ema.update(accelerator.unwrap_model(model), step)
        running.append(loss.detach())
        if step % 200 == 0:
            gain = f" caption gain {caption_gain(model, objective, caption_idx):.3f}" if step % 1000 == 0 else ""
            log(f"wan step {step} loss {torch.stack(running).mean().item():.4f}{gain} ({budget.elapsed_min():.1f} min)")
            running = []
    save_ema_pipeline(pipe, ema, output_dir)
    metrics = {"train_minutes": budget.elapsed_min(), "steps": step + 1, "batch_size": batch_size, "lr": lr,
               "num_train": num_train, "device": str(device),
               "caption_gain": caption_gain(pipe.transformer.to(device), objective, caption_idx),
               "final_loss": torch.stack(running).mean().item() if running else math.nan}
    pipe.transformer.to("cpu")
    return report_metrics("wan", output_dir, metrics, "train_metrics.json")


def train_wan_recipe(output_dir: str | Path, recipe: str = "cpu", seed: int = 0, vae_path: str | Path | None = None,
                     minutes: float | None = None, side_by_side: bool = True) -> dict[str, Any]:
    """The whole testbed: the VAE into ``<output_dir>-vae`` (unless ``vae_path`` is given), then the pipeline into
    ``output_dir``; where the recipe has a ``decoder`` stage, that VAE's decoder is fine-tuned (encoder frozen) into
    ``<output_dir>-decoder`` while the transformer trains (:func:`run_side_by_side`, unless ``side_by_side`` is
    off), then put in the pipeline's ``vae/``. ``minutes`` (optional): the wall clock of the stages run here
    (:func:`scale_to_wall_clock`; a VAE given by ``vae_path`` takes no share)."""
    if recipe not in WAN_RECIPES:
        raise ValueError(f"Unknown recipe {recipe!r}; choose one of {', '.join(WAN_RECIPES)}.")
    stages = {name: dict(stage) for name, stage in WAN_RECIPES[recipe].items()
              if not (name == "vae" and vae_path is not None)}
    if minutes is not None:
        scale_to_wall_clock(stages, minutes, side_by_side)
    output_dir = Path(output_dir)
    vae_metrics: dict[str, Any] = {}
    if vae_path is None:
        vae_path = output_dir.with_name(f"{output_dir.name}-vae")
        vae_metrics = train_wan_vae(vae_path, seed=seed, **stages["vae"])
    if "decoder" not in stages:
        metrics = train_wan_transformer(output_dir, vae_path, seed=seed, **stages["transformer"])
    else:
        transformer_job = (train_wan_transformer, (output_dir, vae_path), {"seed": seed, **stages["transformer"]})
        decoder_dir = output_dir.with_name(f"{output_dir.name}-decoder")
        decoder_job = (train_wan_vae, (decoder_dir,), {"seed": seed, "init_from": vae_path, **stages["decoder"]})
        metrics, decoder_metrics = run_side_by_side([transformer_job, decoder_job], side_by_side=side_by_side)
        install_decoder(decoder_dir, output_dir)
        metrics = {**metrics, **{f"decoder_{k}": v for k, v in decoder_metrics.items()}}
    metrics = {**metrics, "recipe": recipe, **{f"vae_{k}": v for k, v in vae_metrics.items()}}
    return report_metrics("wan", output_dir, metrics, "train_metrics.json")


def scale_to_wall_clock(stages: dict[str, dict[str, Any]], minutes: float, side_by_side: bool) -> None:
    """Scale every stage's ``minutes`` by one factor so that the stages, run as :func:`train_wan_recipe` runs them
    (the VAE first, then the transformer and the ``decoder`` stage side by side or in turn), take ``minutes`` of
    wall clock: the recipe's proportions are kept."""
    after_vae = [stages[name]["minutes"] for name in ("transformer", "decoder") if name in stages]
    wall = stages["vae"]["minutes"] if "vae" in stages else 0.0
    wall += max(after_vae) if side_by_side else sum(after_vae)
    for stage in stages.values():
        stage["minutes"] = minutes * stage["minutes"] / wall


def _one_thread(fn, args, kwargs):
    """Run ``fn`` in a worker process with one CPU thread (``setup_torch`` reads ``DA_THREADS``)."""
    os.environ["DA_THREADS"] = "1"
    return fn(*args, **kwargs)


def run_side_by_side(jobs: list[tuple[Any, tuple, dict[str, Any]]], side_by_side: bool = True) -> list[Any]:
    """Results of ``fn(*args, **kwargs)`` for each job: in one fresh process each, one CPU thread apiece, when
    ``side_by_side`` (independent stages on a 2-core CPU: two single-thread runs do more work than one run on two
    threads, measured 1.1 s/step for the 4x VAE on 2 threads against 1.4 on one), else in turn in this process."""
    if not side_by_side or len(jobs) == 1:
        return [fn(*args, **kwargs) for fn, args, kwargs in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_one_thread, fn, args, kwargs) for fn, args, kwargs in jobs]
        return [f.result() for f in futures]


def install_decoder(vae_dir: str | Path, pipeline_dir: str | Path) -> None:
    """Put the VAE saved in ``vae_dir`` in the pipeline at ``pipeline_dir`` (its ``vae/``), after checking that its
    encoder side (``encoder``, ``quant_conv``) and config, latent statistics included, are the pipeline's
    (:func:`.students.check_same_encoder`): only then is every network trained in the pipeline's latent space still
    valid with it."""
    import shutil

    from .students import WEIGHTS_FILE, check_same_encoder

    new, old = Path(vae_dir), Path(pipeline_dir) / "vae"
    try:
        check_same_encoder(new, old, fix=f"Train it with `testbed train wan-decoder --init-from {old}`.")
    except ValueError as err:
        raise ValueError(f"{new} is not a decoder fine-tune of {old}: {err}") from None
    for name in (WEIGHTS_FILE, "config.json"):
        shutil.copyfile(new / name, old / name)
