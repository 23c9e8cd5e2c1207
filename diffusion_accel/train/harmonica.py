"""Cache-router trainers: HarmoniCa (SDT + IEPO; Huang et al., ICML 2025, arXiv 2410.01723) and Learning-to-Cache
(L2C; Ma et al., NeurIPS 2024, arXiv 2406.01733), the ablation HarmoniCa makes.

Both train only the router logits θ [T, U] (:mod:`diffusion_accel.cache_router`) of a frozen CFG pipeline, with
HarmoniCa's relaxation: unit output = r·fresh + (1 − r)·cached, r = σ(θ_{k,u}) (:mod:`diffusion_accel.routed_units`).

* ``harmonica``: **Step-wise Denoising Training**. One optimizer step is one sampling trajectory from noise (no
  images), run with the router on, so each step's cache holds what the router's own earlier decisions left there.
  At every step k ≥ 1 the full-compute output at the same input (cache untouched) is the target:

      L = Σ_k λ_k · ‖ε̂_full(x_k) − ε̂_router(x_k)‖² + β · Σ_{k≥1} Σ_u r_{k,u}

  where ε̂ is the guided prediction the sampler uses and x_{k+1} comes from the router's output (detached).
  **Image-Error-Proxy-guided objective** (IEPO): λ_k is the change of the final latent when caching is switched
  on at step k too (the authors' code variant: soft masks enabled cumulatively from the first step), refreshed
  every ``lambda_refresh_steps`` trajectories on a fixed probe batch and normalised to mean 1 over the steps (so
  that β means the same with IEPO off, ``--no_iepo``: λ ≡ 1, the paper's "SDT + L_LTC" row). The authors compare
  DiT's final latents; ``--iepo_space pixel`` compares the decoded images instead (the paper's x_0 is the image),
  so a step is weighted by what its reuse changes in the picture the VAE draws, not in latent units.
  The anchor steps AdamW after every denoising step; since x and the cache are detached between steps, step k's
  loss has a gradient in row θ_k only, so one update per trajectory gives each row the same gradient (what differs
  is Adam's momentum on rows without gradient) and makes every checkpoint fall on a trajectory boundary, so a
  resumed run replays exactly.
* ``l2c``: each step in isolation from a noised **training image**: the full step k (even) fills the cache, the
  routed step k + 1 is compared with full compute, L = ‖ε̂_full − ε̂_router‖² + β Σ_u r_{k+1,u}. Routers compute
  every unit on even steps (L2C's alternating reset), so only odd rows are trainable.

Paper symbol → flag: β → ``--cache_weight`` (``--cache_weight_by_macs`` scales it per unit by the unit's MAC share,
normalised to mean 1), C → ``--lambda_refresh_steps``, τ (training store threshold) → ``--train_threshold``; the
period K of the steps pinned to full compute (the alternation of L2C is K = 2) → ``--full_compute_period``. The
router is clamped to [−5, 5] after every update, as in the authors' code.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from .options import TrainOptions
from .recipe import Recipe
from .teachers import load_teacher_pipeline

LOGIT_CLAMP = 5.0


@dataclass
class RouterOptions(TrainOptions):
    """Train a cache router for a frozen pipeline (the router is the only trained tensor)."""

    learning_rate: float = 1e-2
    max_train_steps: int = field(default=150, metadata={"help": "optimizer steps (harmonica: trajectories)"})
    train_batch_size: int = field(default=8, metadata={"help": "prompts per process (each runs cond + uncond)"})
    max_grad_norm: float = 0.0
    checkpointing_steps: int = 50
    validation_steps: int = 0
    num_train_samples: int = field(default=1024, metadata={"help": "training captions (l2c: images too)"})
    cache_weight: float = field(default=3e-3, metadata={"help": "β: weight of Σ r (pushes scores down, i.e. "
                                                                "towards reuse)"})
    cache_weight_by_macs: bool = field(default=False, metadata={
        "help": "β_u = β · s_u / mean(s): weight unit u's score by its share s_u of the denoiser MACs (feeders "
                "included), so the reuse reward is what a reuse saves; default: every cell alike (the papers' Σ r)"})
    train_threshold: float = field(default=0.1, metadata={"help": "τ while training: the cache keeps a mixed "
                                                                  "output only where r > τ"})
    target_macs_ratio: float | None = field(default=None, metadata={
        "help": "store the τ that reaches this denoiser MACs ratio (default: keep --train_threshold)"})
    num_inference_steps: int | None = field(default=None, metadata={"help": "T; default: the pipeline's contract"})
    guidance_scale: float | None = field(default=None, metadata={"help": "default: the pipeline's contract"})
    resolution: int | None = field(default=None, metadata={"help": "default: the pipeline's contract height"})
    init_std: float = field(default=1.0, metadata={"help": "θ ~ N(0, init_std²) at the start (authors: 1)"})

    def validate(self) -> None:
        super().validate()
        if self.cache_weight < 0:
            raise ValueError(f"--cache_weight (β) must be >= 0, got {self.cache_weight}.")
        if not 0.0 <= self.train_threshold < 1.0:
            raise ValueError(f"--train_threshold must be in [0, 1), got {self.train_threshold}.")
        if self.num_inference_steps is not None and self.num_inference_steps < 2:
            raise ValueError("--num_inference_steps must be >= 2 (the first step always computes).")
        if self.target_macs_ratio is not None and self.target_macs_ratio < 1.0:
            raise ValueError(f"--target_macs_ratio must be >= 1, got {self.target_macs_ratio}.")


@dataclass
class HarmoniCaOptions(RouterOptions):
    lambda_refresh_steps: int = field(default=5, metadata={"help": "C: refresh the IEPO weights λ every C "
                                                                   "trajectories"})
    num_lambda_prompts: int = field(default=8, metadata={"help": "probe prompts the IEPO weights are measured on"})
    no_iepo: bool = field(default=False, metadata={"help": "λ ≡ 1 (SDT with L2C's per-step loss: the ablation)"})
    iepo_space: str = field(default="latent", metadata={
        "choices": ("latent", "pixel"),
        "help": "where IEPO measures the final error: latent (the authors' code: the sampler's final latents) or "
                "pixel (those latents decoded by the pipeline's VAE)"})
    full_compute_period: int = field(default=0, metadata={
        "help": "K: pin steps 0, K, 2K, ... to full compute (every unit), so a reused output is at most K − 1 steps "
                "old; SDT + IEPO route the steps between. K = 2 is L2C's alternation, FORA's / Δ-DiT's cache "
                "interval N plays the same role; 0 (default) is HarmoniCa's free schedule (no staleness bound)"})
    full_every_other_step: bool = field(default=False, metadata={
        "help": "the same as --full_compute_period 2 (kept for the recipes that name it)"})

    def validate(self) -> None:
        super().validate()
        if self.lambda_refresh_steps < 1:
            raise ValueError("--lambda_refresh_steps must be >= 1.")
        if self.full_compute_period < 0 or self.full_compute_period == 1:
            raise ValueError("--full_compute_period (K) must be 0 (free schedule) or >= 2 (K = 1 would pin every "
                             f"step: nothing to route), got {self.full_compute_period}.")
        if self.full_every_other_step and self.full_compute_period not in (0, 2):
            raise ValueError("--full_every_other_step means --full_compute_period 2; got --full_compute_period "
                             f"{self.full_compute_period} as well.")

    @property
    def pinned_period(self) -> int:
        """K of the options (``--full_every_other_step`` is K = 2); 0 for the free schedule."""
        return 2 if self.full_every_other_step else self.full_compute_period


class RouterLogits(torch.nn.Module):
    """θ [T, U]; ``forward()`` gives the scores r = σ(θ) with pinned cells at 1 (the module the loop optimises)."""

    def __init__(self, logits: torch.Tensor, trainable: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())
        self.register_buffer("trainable", trainable.clone())

    def forward(self) -> torch.Tensor:
        return torch.where(self.trainable, torch.sigmoid(self.logits), torch.ones_like(self.logits))


class StepWeights:
    """The IEPO weights λ_k (checkpointed: a resume between refreshes keeps the weights the run was using)."""

    def __init__(self, num_steps: int) -> None:
        self.values = torch.ones(num_steps)

    def state_dict(self) -> dict[str, Any]:
        return {"values": self.values.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = state["values"].clone()


class RouterRecipe(Recipe):
    """What both router trainers share: the frozen pipeline, its sampler, the unit hooks and the artefact."""

    options_class = RouterOptions
    artefact = "cache router"
    objective = ""
    #: A step where every unit is pinned to compute (step 0, and every K-th step with ``--full_compute_period K``)
    #: runs one plain forward: its routed forward would equal the full-compute target (r ≡ 1 mixes nothing in), so
    #: its loss and gradient are zero, and switching caching "on" there leaves the final latent of the IEPO
    #: refresh unchanged (λ_k = 0 without finishing a trajectory). Same router, bit for bit, at ~0.6x the denoiser
    #: steps per trajectory and ~0.5x per λ refresh under the alternation (K = 2); False runs every step in full
    #: (tests).
    skip_pinned_steps = True
    _unit_macs_shares: tuple[list[float], float] | None = None

    # -- pipeline --------------------------------------------------------------------------------------------
    def load_teacher(self) -> None:
        from ..pipelines.adapters import find_adapter

        self.pipe, self.family, self.contract = load_teacher_pipeline(self.options.pretrained_teacher_model,
                                                                      self.accelerator.device)
        self.adapter = find_adapter(self.pipe)

    def check(self) -> None:
        opts: RouterOptions = self.options  # type: ignore[assignment]
        self.steps = opts.num_inference_steps or self.contract.get("num_inference_steps")
        if self.steps is None:
            raise ValueError("the pipeline's sampler contract names no step count; pass --num_inference_steps.")
        guidance = opts.guidance_scale or self.family.teacher_guidance(self.contract)
        if guidance is None or guidance <= 1.0:
            raise ValueError("cache routers are trained at the guidance the pipeline samples with, and this one "
                             f"has none (scale {guidance}); pass --guidance_scale > 1.")
        self.guidance = float(guidance)
        self.resolution = opts.resolution or self.contract.get("height")
        if self.resolution is None:
            raise ValueError("the pipeline's sampler contract names no image size; pass --resolution.")
        if not self.adapter.block_lists:
            raise ValueError(f"{self.adapter.family} has no transformer blocks to route.")
        self.family.use_resolution(self.resolution, self.resolution)

    def run_record(self) -> dict[str, Any]:
        return {"pipeline": self.options.pretrained_teacher_model, "pipeline_class": type(self.pipe).__name__,
                "guidance_scale": self.guidance, "num_inference_steps": self.steps}

    def captured_scheduler(self) -> Any:
        """The pipeline's scheduler right after the pipeline timed it for T steps (one real call), so that shifted
        or dynamically shifted schedules (Flux's μ) are exactly the pipeline's."""
        scheduler = self.pipe.scheduler
        captured: dict[str, Any] = {}
        original = scheduler.set_timesteps

        @functools.wraps(original)  # pipelines inspect set_timesteps' signature (Flux: custom sigmas)
        def capture(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            captured.setdefault("scheduler", copy.deepcopy(scheduler))
            return result

        scheduler.set_timesteps = capture
        try:
            self.pipe(**self.call_kwargs(), output_type="latent")
        finally:
            del scheduler.set_timesteps
        return captured["scheduler"]

    def call_kwargs(self) -> dict[str, Any]:
        """One plain pipeline call at the router's steps, guidance and size (the bench's call for this family)."""
        from ..bench import call_kwargs
        from ..loading import base_call_kwargs

        return call_kwargs(self.pipe, self.adapter.family, ["a red circle"],
                           base_call_kwargs(self.options.pretrained_teacher_model), self.steps,
                           self.guidance, self.resolution, [0])

    def setup_common(self, captions: list[str]) -> None:
        from ..routed_units import RoutedUnits

        self.cond, self.caption_rows = self.family.encode_caption_table(captions, self.accelerator.device)
        self.scheduler = self.captured_scheduler()
        self.latent_shape = self.family.latent_shape(self.resolution, self.resolution)
        self.denoiser = self.family.denoiser.eval().requires_grad_(False)
        self.units = RoutedUnits.for_pipeline(self.adapter, self.pipe).install()
        self.units.store_threshold = self.options.train_threshold
        self.unit_weights = self.cache_weights().to(self.accelerator.device)

    def cache_weights(self) -> torch.Tensor:
        """Per-unit factor [U] of β in the cache term: 1 for every unit, or (``--cache_weight_by_macs``) each unit's
        MAC share normalised to mean 1, so β keeps its scale."""
        if not self.options.cache_weight_by_macs:
            return torch.ones(len(self.units))
        shares = torch.tensor(self.unit_macs_shares()[0], dtype=torch.float32)
        return shares / shares.mean().clamp_min(1e-20)

    def initial_router(self, trainable: torch.Tensor) -> RouterLogits:
        gen = torch.Generator().manual_seed(self.options.seed)
        logits = torch.randn(trainable.shape, generator=gen) * self.options.init_std
        return RouterLogits(logits, trainable).to(self.accelerator.device)

    # -- one denoiser step -------------------------------------------------------------------------------------
    def guided(self, x: torch.Tensor, t: torch.Tensor, cond: dict, uncond: dict, scheduler: Any) -> torch.Tensor:
        """The CFG prediction ε̂ = u + w (c − u) the sampler uses, from one batched [cond; uncond] forward."""
        both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
        xin = torch.cat([x, x])
        if hasattr(scheduler, "scale_model_input"):  # flow-matching schedulers have none (identity)
            xin = scheduler.scale_model_input(xin, t)
        out = self.family.predict(self.denoiser, xin, t.expand(len(xin)).to(x.dtype), both)
        c, u = out.chunk(2)
        return u + self.guidance * (c - u)

    def rows(self, batch: int) -> list[tuple[str, int]]:
        return [("train", i) for i in range(2 * batch)]

    def conditioning(self, caption_rows: torch.Tensor) -> tuple[dict, dict]:
        return self.cond.select(caption_rows), self.cond.select(torch.zeros_like(caption_rows))

    def noise(self, batch: int, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn((batch, *self.latent_shape), generator=gen).to(self.accelerator.device)

    @torch.no_grad()
    def samples_switching_on(self, x: torch.Tensor, cond: dict, uncond: dict,
                             scores: torch.Tensor) -> list[torch.Tensor]:
        """Final latents x0^{(≤k)} for k = 0..T−1: soft routing with ``scores`` at steps 1..k, full compute (storing)
        after. Trajectory k shares its first k + 1 steps with trajectory k + 1, so the shared prefix runs once and
        each trajectory only finishes from where it leaves it (T²/2 denoiser steps instead of T²)."""
        scheduler = copy.deepcopy(self.scheduler)
        self.units.reset()
        rows = self.rows(len(x))
        finals = []
        for k, t in enumerate(scheduler.timesteps):
            if k >= 2 and self.skip_pinned_steps and bool((scores[k - 1] == 1).all()):
                finals.append(finals[-1])  # step k−1 mixes nothing in (r ≡ 1): x0^{(≤k−1)} = x0^{(≤k−2)}
            elif k >= 1:  # x, scheduler and stores hold steps 0..k−1 with soft routing at 1..k−1: finish x0^{(≤k−1)}
                finals.append(self._finish_in_full(x, scheduler, cond, uncond, rows))
            if k == 0:
                self.units.set_step("fill", rows)
            else:
                self.units.set_step("soft", rows, scores=scores[k])
            x = scheduler.step(self.guided(x, t, cond, uncond, scheduler), t, x, return_dict=False)[0]
        finals.append(x)
        return finals

    def _finish_in_full(self, x: torch.Tensor, scheduler: Any, cond: dict, uncond: dict,
                        rows: list[tuple[str, int]]) -> torch.Tensor:
        """The rest of a trajectory in full compute, on copies of the scheduler and the stores."""
        scheduler = copy.deepcopy(scheduler)
        stores = self.units.stores
        self.units.stores = copy.deepcopy(stores)
        try:
            for t in scheduler.timesteps[scheduler.step_index:]:
                self.units.set_step("fill", rows)
                x = scheduler.step(self.guided(x, t, cond, uncond, scheduler), t, x, return_dict=False)[0]
        finally:
            self.units.stores = stores
        return x

    # -- artefact --------------------------------------------------------------------------------------------
    def router_facts(self) -> dict[str, Any]:
        """Recipe-specific training facts stored in the router's config."""
        return {}

    @torch.no_grad()
    def after_optimizer_step(self, model, step):
        router = self.accelerator.unwrap_model(model)
        router.logits.clamp_(-LOGIT_CLAMP, LOGIT_CLAMP)
        scores = router()
        trainable = router.trainable
        return {"mean_score": float(scores[trainable].mean()),
                "cells_below_tau": float((scores[trainable] <= self.options.train_threshold).float().mean())}

    def unit_macs_shares(self) -> tuple[list[float], float]:
        """Each unit's share of the denoiser's MACs in one plain pipeline call (the call's own text length and batch
        layout, which a training batch with trimmed captions would not have) and the share outside every unit.
        Measured once per run: the pipeline and its units are frozen, so ``--cache_weight_by_macs`` (at setup) and
        the saved router (at the end) read the same call."""
        if self._unit_macs_shares is None:
            from ..cache_router import measure_unit_macs_shares

            self.units.reset()
            self.units.set_step("frozen", [])
            self._unit_macs_shares = measure_unit_macs_shares(
                self.pipe, self.denoiser, self.units.names, {**self.call_kwargs(), "output_type": "latent"},
                self.units.feeder_names)
        return self._unit_macs_shares

    def save(self, model, output_dir: str) -> dict[str, Any]:
        from ..cache_router import CacheRouter

        opts: RouterOptions = self.options  # type: ignore[assignment]
        trained = self.accelerator.unwrap_model(model)
        shares, rest = self.unit_macs_shares()
        router = CacheRouter.for_pipeline(
            self.pipe, self.steps, self.guidance, objective=self.objective, logits=trained.logits.detach().cpu(),
            trainable=trained.trainable.cpu(), unit_macs_share=shares, rest_macs_share=rest,
            timesteps=[float(t) for t in self.scheduler.timesteps], cache_weight=opts.cache_weight,
            cache_weight_by_macs=opts.cache_weight_by_macs,
            train_threshold=opts.train_threshold, trained_steps=opts.max_train_steps,
            pipeline=opts.pretrained_teacher_model, **self.router_facts())
        threshold = opts.train_threshold
        if opts.target_macs_ratio is not None:
            threshold = router.threshold_for(macs_ratio=opts.target_macs_ratio)
        router.set_threshold(threshold)
        router.save(output_dir)
        self.units.uninstall()
        return {k: router.config[k] for k in ("objective", "threshold", "macs_ratio", "cache_rate",
                                              "num_inference_steps", "guidance_scale", "units")}


class HarmoniCa(RouterRecipe):
    name = "harmonica"
    summary = "HarmoniCa cache router: step-wise denoising training on its own trajectory + IEPO (no images)"
    options_class = HarmoniCaOptions
    objective = "harmonica"

    def setup(self, stream_factory) -> torch.nn.Module:
        from ..pipelines.testbed.shapes import make_sample

        opts: HarmoniCaOptions = self.options  # type: ignore[assignment]
        start = opts.dataloader_seed_offset  # captions only: SDT needs no images
        captions = [make_sample("train", i).caption for i in range(start, start + opts.num_train_samples)]
        self.setup_common(captions)
        self.num_samples = len(captions)
        self.weights = StepWeights(self.steps)
        probe = torch.arange(opts.num_lambda_prompts, device=self.caption_rows.device) % self.num_samples
        self.probe = (self.caption_rows[probe], self.noise(len(probe), opts.seed + 7919))
        trainable = torch.ones(self.steps, len(self.units), dtype=torch.bool)
        trainable[0] = False
        if opts.pinned_period:
            trainable[0::opts.pinned_period] = False
        return self.initial_router(trainable)

    def checkpoint_objects(self) -> list[Any]:
        return [self.weights]

    def router_facts(self) -> dict[str, Any]:
        opts: HarmoniCaOptions = self.options  # type: ignore[assignment]
        return {"iepo": "off" if opts.no_iepo else opts.iepo_space}

    @torch.no_grad()
    def refresh_weights(self, scores: torch.Tensor) -> None:
        """λ_k = mean‖x0^{(≤k)} − x0^{(≤k−1)}‖², where x0^{(≤k)} samples with soft routing at steps 1..k and full
        compute after (the authors' ``get_lambda``), on the fixed probe batch; with ``--iepo_space pixel`` the x0 are
        the decoded images."""
        rows, noise = self.probe
        finals = self.samples_switching_on(noise, *self.conditioning(rows), scores)
        if self.options.iepo_space == "pixel":
            finals = [self.family.decode(final) for final in finals]
        lam = torch.zeros(self.steps)
        for k in range(1, self.steps):
            lam[k] = (finals[k] - finals[k - 1]).float().pow(2).mean()
        lam[1:] = lam[1:] / lam[1:].mean().clamp_min(1e-20)
        self.weights.values = lam

    def loss(self, model, stream, step, micro):
        opts: HarmoniCaOptions = self.options  # type: ignore[assignment]
        scores = model()
        if not opts.no_iepo and step % opts.lambda_refresh_steps == 0 and micro == 0:
            self.refresh_weights(scores.detach())
        draw = stream.draw(step, micro)
        local = stream.local()
        idx = torch.from_numpy(draw.indices[local]).to(self.caption_rows.device)
        cond, uncond = self.conditioning(self.caption_rows[idx])
        x = stream.global_noise(draw, tuple(self.latent_shape), self.caption_rows.device)[local]
        scheduler = copy.deepcopy(self.scheduler)
        self.units.reset()
        rows = self.rows(len(x))
        lam = self.weights.values.to(x.device)
        trainable = self.accelerator.unwrap_model(model).trainable
        pinned = ~trainable.any(dim=1)  # steps every unit computes at (step 0; every K-th with --full_compute_period K)
        mse_total = x.new_zeros(())
        for k, t in enumerate(scheduler.timesteps):
            if k == 0 or (self.skip_pinned_steps and bool(pinned[k])):
                self.units.set_step("fill", rows)
                with torch.no_grad():
                    out = self.guided(x, t, cond, uncond, scheduler)
            else:
                self.units.set_step("frozen", rows)
                with torch.no_grad():
                    target = self.guided(x, t, cond, uncond, scheduler)
                self.units.set_step("soft", rows, scores=scores[k])
                out = self.guided(x, t, cond, uncond, scheduler)
                mse_total = mse_total + lam[k] * torch.nn.functional.mse_loss(out.float(), target.float())
            x = scheduler.step(out.detach(), t, x, return_dict=False)[0]
        cache_term = (scores * trainable * self.unit_weights).sum()
        loss = mse_total + opts.cache_weight * cache_term
        return loss, {"loss": float(loss.detach()), "mse": float(mse_total.detach()),
                      "sum_scores": float(cache_term.detach())}


class L2C(RouterRecipe):
    name = "l2c"
    summary = "Learning-to-Cache router: each routed step from a noised training image after a full step"
    objective = "l2c"

    def setup(self, stream_factory) -> torch.nn.Module:
        from .lcd import shapes_training_data

        images, captions = shapes_training_data(self.options, self.resolution)
        self.setup_common(captions)
        self.latents = self.family.encode_images(images).to(self.accelerator.device)
        self.num_samples = len(captions)
        trainable = torch.zeros(self.steps, len(self.units), dtype=torch.bool)
        trainable[1::2] = True  # full compute on even steps (0, 2, ...), routed on odd ones
        return self.initial_router(trainable)

    def loss(self, model, stream, step, micro):
        opts: RouterOptions = self.options  # type: ignore[assignment]
        scores = model()
        draw = stream.draw(step, micro)
        local = stream.local()
        device = self.latents.device
        idx = torch.from_numpy(draw.indices[local]).to(device)
        pairs = self.steps // 2
        full = 2 * min(int(draw.uniforms[0] * pairs), pairs - 1)  # one step pair for the whole global batch
        routed = full + 1
        cond, uncond = self.conditioning(self.caption_rows[idx])
        noise = stream.global_noise(draw, tuple(self.latent_shape), device)[local]
        scheduler = copy.deepcopy(self.scheduler)
        t_full = scheduler.timesteps[full]
        x0 = self.latents[idx]
        if hasattr(scheduler, "scale_noise"):  # flow matching: x = (1 − σ) x0 + σ ε
            x = scheduler.scale_noise(x0, t_full.reshape(1), noise)
        else:
            x = scheduler.add_noise(x0, noise, t_full.reshape(1))
        scheduler.set_begin_index(full)
        rows = self.rows(len(x))
        self.units.reset()
        self.units.set_step("fill", rows)
        with torch.no_grad():
            out = self.guided(x, t_full, cond, uncond, scheduler)
        x = scheduler.step(out, t_full, x, return_dict=False)[0]
        t = scheduler.timesteps[routed]
        self.units.set_step("frozen", rows)
        with torch.no_grad():
            target = self.guided(x, t, cond, uncond, scheduler)
        self.units.set_step("soft", rows, scores=scores[routed])
        pred = self.guided(x, t, cond, uncond, scheduler)
        mse = torch.nn.functional.mse_loss(pred.float(), target.float())
        cache_term = (scores[routed] * self.unit_weights).sum()
        loss = mse + opts.cache_weight * cache_term
        return loss, {"loss": float(loss.detach()), "mse": float(mse.detach()), "sum_scores": float(cache_term)}


__all__ = ["L2C", "HarmoniCa", "RouterLogits"]
