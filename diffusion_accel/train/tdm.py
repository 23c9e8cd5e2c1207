"""Trajectory Distribution Matching (TDM; Luo et al., arXiv 2503.06674), data-free: prompts only.

A K-step student G_θ (``num_inference_steps``), initialised from the teacher, is matched to the teacher's
distribution at *every* point of its own trajectory, not only at its output. Three networks: the frozen teacher
score f_φ (with CFG at the distilled scale w, ``guidance_scale``), the student G_θ, and a fake score f_ψ
(``fake_learning_rate``, its own optimizer and LR schedule), initialised from the teacher and trained alongside to
follow the score of the student's intermediate distributions. Per optimizer step, for each prompt:

    x_K = ε;  roll the student (no grad) down its grid to x_k, k ~ U{1..K}            (:mod:`.trajectory`)
    (x̂0, ε̂) = G_θ(x_k, t_k)                                                           (the only grad path to θ)
    x_mid = α_{k−1} x̂0 + σ_{k−1} ε̂;   t ~ U(t_{k−1}, t_k);   x_t ~ q(x_t | x_mid)      (the step's own interval)
    target = sg[ x̂0 + (x0_φ(x_t) − x0_ψ(x_t)) + (w − 1)(x0_φ(x_t) − x0_φ^∅(x_t)) ]
    L_θ = mean( d(x̂0, target) / λ ),   λ = mean|x̂0 − x0_φ^w(x_t)|  (per sample, detached; DMD's normaliser)
    L_ψ = mean( min(SNR_t, 5) · w_is · mean_flat(x0_ψ(x_t) − sg[x̂0])² )

d is the pseudo-Huber distance with c = ``huber_c`` (or L2); w_is is the anchor's importance weight of the mixed
noise ñ = ((α_t/α_mid) σ_mid ε̂ + β ξ)/σ_t against ξ. The gradient of L_θ w.r.t. x̂0 is the score difference
(s_ψ − s_φ^w) in x0 form: distribution matching on the intermediate distribution of each student step.

Both losses come from the same forwards: the fake score runs once per step with grad, its detached output serves
the student's target, and the summed loss sends each gradient only to its own network (the student's terms hold
no ψ-gradient, the fake's none of θ). The loop steps the student's optimizer; :meth:`TDM.after_optimizer_step`
steps the fake score's, so gradient accumulation and multi-process averaging treat both alike.

The student ships with its trajectory: a deterministic first-order scheduler whose ``set_timesteps(K)`` yields the
trained timesteps (:meth:`~diffusion_accel.train.teachers.TeacherFamily.few_step_scheduler`), ``K`` steps and
guidance off in the sampler contract, and, for ``--sparse_attention`` (recipe ``blade``), the sparse-attention
config the student was trained under, re-applied on every call of the loaded pipeline.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .lcd import shapes_training_data
from .options import TrainOptions
from .recipe import Recipe
from .teachers import load_teacher_pipeline
from .trajectory import Grid, noise_process

#: The anchor's cap on the fake-score loss weight min(SNR_t, 5): near-clean levels would otherwise dominate.
SNR_CAP = 5.0


@dataclass
class TDMOptions(TrainOptions):
    """Trajectory distribution matching of a CFG teacher into a K-step student without CFG (data-free)."""

    learning_rate: float = 2e-5
    fake_learning_rate: float | None = field(default=None, metadata={
        "help": "the fake score's learning rate; default 5 × --learning_rate (the anchor's ratio)"})
    adam_beta1: float = 0.0
    adam_beta2: float = 0.95
    num_inference_steps: int = field(default=4, metadata={"help": "K: the student's steps (trained and sampled)"})
    guidance_scale: float | None = field(default=None, metadata={
        "help": "w: the CFG scale distilled into the student; default: the teacher's contract"})
    loss_type: str = field(default="huber", metadata={"choices": ("huber", "l2")})
    huber_c: float = field(default=0.001, metadata={"help": "pseudo-Huber c (per element)"})
    ema_decay: float = field(default=0.99, metadata={"help": "constant-rate EMA of the student (0: none)"})
    ship_weights: str = field(default="ema", metadata={"choices": ("ema", "online"), "help": "which student the "
                                                       "saved pipeline carries"})
    flow_shift: float = field(default=1.0, metadata={"help": "flow teachers: shift of the student's σ grid "
                                                             "(1 = uniform k/K)"})
    resolution: int | None = field(default=None, metadata={"help": "sample side in pixels; default: the teacher's "
                                                                  "contract height"})
    num_frames: int | None = field(default=None, metadata={"help": "video teachers: frames; default: the "
                                                                  "teacher's contract"})
    train_prompts: str | None = field(default=None, metadata={
        "help": "a text file of prompts, one per line; default: --num_train_samples captions of the testbed's "
                "training set (shapes images, or the video clips' captions for a video teacher)"})
    sparse_attention: str | None = field(default=None, metadata={
        "help": "train the student under block-sparse self-attention, e.g. 'asa:block_size=64,tau=0.9' (the "
                "sparse_attention method's options); stored with the student and re-applied when it is loaded"})
    num_validation_prompts: int = 4

    def validate(self) -> None:
        super().validate()
        if self.num_inference_steps < 1:
            raise ValueError(f"--num_inference_steps (K) must be >= 1, got {self.num_inference_steps}.")
        if self.guidance_scale is not None and self.guidance_scale < 1.0:
            raise ValueError(f"--guidance_scale must be >= 1 (1 = no guidance), got {self.guidance_scale}.")
        if self.fake_learning_rate is not None and self.fake_learning_rate <= 0:
            raise ValueError(f"--fake_learning_rate must be > 0, got {self.fake_learning_rate}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema_decay must be in [0, 1), got {self.ema_decay}.")
        if self.ship_weights == "ema" and self.ema_decay == 0.0:
            raise ValueError("--ship_weights ema needs an EMA: set --ema_decay > 0 (e.g. 0.99) or ship 'online'.")
        if self.huber_c <= 0:
            raise ValueError(f"--huber_c must be > 0, got {self.huber_c}.")
        if self.flow_shift <= 0:
            raise ValueError(f"--flow_shift must be > 0, got {self.flow_shift}.")
        if self.train_prompts is not None and not Path(self.train_prompts).is_file():
            raise ValueError(f"--train_prompts {self.train_prompts}: no such file (one prompt per line).")
        if self.sparse_attention is not None:
            from .sparse_training import parse_sparse_spec

            parse_sparse_spec(self.sparse_attention)  # a bad spec fails here, naming the fix


def huber_elements(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Pseudo-Huber distance per element: √((a−b)² + c²) − c."""
    return torch.sqrt((a.float() - b.float()) ** 2 + c * c) - c


def flat_mean(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(len(x), -1).mean(1)


class TDM(Recipe):
    name = "tdm"
    summary = "trajectory distribution matching: a data-free K-step student without CFG, with a fake score"
    options_class = TDMOptions

    # -- teacher and checks ----------------------------------------------------------------------------------
    def load_teacher(self) -> None:
        self.pipe, self.family, self.teacher_contract = load_teacher_pipeline(self.options.pretrained_teacher_model,
                                                                              self.accelerator.device)

    def check(self) -> None:
        opts: TDMOptions = self.options  # type: ignore[assignment]
        self.family.check_distillable()
        guidance = opts.guidance_scale or self.family.teacher_guidance(self.teacher_contract)
        if guidance is None:
            raise ValueError(f"the teacher {opts.pretrained_teacher_model!r} carries no guidance scale in its "
                             "sampler contract; pass --guidance_scale (the CFG scale to distil, e.g. 4.5).")
        self.guidance = float(guidance)
        self.resolution = opts.resolution or self.teacher_contract.get("height")
        if self.resolution is None:
            raise ValueError("the teacher's sampler contract names no image size; pass --resolution.")
        self.num_frames = None
        if self.family.video:
            self.num_frames = opts.num_frames or self.teacher_contract.get("num_frames")
            if self.num_frames is None:
                raise ValueError("the video teacher's sampler contract names no frame count; pass --num_frames.")
        elif opts.num_frames is not None:
            raise ValueError(f"--num_frames is for video teachers; {type(self.pipe).__name__} makes images.")
        if opts.flow_shift != 1.0 and self.family.prediction != "flow":
            raise ValueError("--flow_shift shapes a flow teacher's σ grid; this teacher predicts ε (drop it).")
        self.scheduler = self.family.few_step_scheduler(opts.flow_shift)
        timesteps, sigmas = self.family.few_step_grid(self.scheduler, opts.num_inference_steps)
        alphas = self.family.alphas_cumprod() if self.family.prediction == "epsilon" else None
        self.process = noise_process(self.family.prediction, alphas)
        self.grid: Grid = self.process.grid(timesteps.cpu(), None if sigmas is None else sigmas.cpu())
        from .trajectory import TIME_FLOOR, TIME_MARGIN

        widths = self.grid.model_time[1:] - self.grid.model_time[:-1].clamp_min(TIME_FLOOR) - TIME_MARGIN
        if bool((widths <= 0).any()):
            raise ValueError(f"--num_inference_steps {opts.num_inference_steps} leaves student steps whose "
                             "intervals are too short to sample a noise level in; use fewer steps.")
        self.shape = self.sample_shape()
        self.sparse = None
        if opts.sparse_attention is not None:
            from .sparse_training import check_sparse_student

            self.sparse_config = check_sparse_student(opts.sparse_attention, self.pipe, self.shape)

    def run_record(self) -> dict[str, Any]:
        opts: TDMOptions = self.options  # type: ignore[assignment]
        return {"teacher": opts.pretrained_teacher_model, "teacher_class": type(self.pipe).__name__,
                "guidance_scale": self.guidance, "student_timesteps": self.grid.timesteps(),
                "prompts": opts.train_prompts or "testbed captions"}

    # -- data and models ---------------------------------------------------------------------------------------
    def training_prompts(self) -> list[str]:
        """``--train_prompts`` lines, or the testbed's training captions (shapes, or the video clips')."""
        opts: TDMOptions = self.options  # type: ignore[assignment]
        if opts.train_prompts is not None:
            prompts = [line.strip() for line in Path(opts.train_prompts).read_text().splitlines() if line.strip()]
            if not prompts:
                raise ValueError(f"--train_prompts {opts.train_prompts} holds no prompt.")
            return prompts
        if self.family.video:
            from ..pipelines.testbed.video_data import SPLIT_TRAIN, make_clip

            return [make_clip(SPLIT_TRAIN, opts.dataloader_seed_offset + i).caption
                    for i in range(opts.num_train_samples)]
        return shapes_training_data(opts, self.resolution)[1]

    def sample_shape(self) -> tuple[int, ...]:
        if self.family.video:
            return self.family.video_latent_shape(self.resolution, self.resolution, self.num_frames)
        self.family.use_resolution(self.resolution, self.resolution)
        return self.family.latent_shape(self.resolution, self.resolution)

    def setup(self, stream_factory) -> torch.nn.Module:
        opts: TDMOptions = self.options  # type: ignore[assignment]
        device = self.accelerator.device
        self.captions = self.training_prompts()
        self.cond, self.caption_rows = self.family.encode_caption_table(self.captions, device)
        self.num_samples = len(self.captions)
        self.grid = Grid(*(t.to(device) for t in (self.grid.model_time, self.grid.alpha, self.grid.sigma)))

        teacher = self.family.denoiser.eval().requires_grad_(False)
        self.teacher = teacher
        student = copy.deepcopy(teacher).train().requires_grad_(True)
        self.fake = copy.deepcopy(teacher).train().requires_grad_(True)
        # copied before any training hook is attached: the EMA is a plain module
        self.ema = copy.deepcopy(student).eval().requires_grad_(False) if opts.ema_decay > 0 else None
        if opts.sparse_attention is not None:
            from .sparse_training import SparseStudent

            self.sparse = SparseStudent(self.sparse_config, self.pipe, student, self.shape, self.resolution,
                                        self.num_frames)
        from diffusers.optimization import get_scheduler

        self.fake_optimizer = torch.optim.AdamW(self.fake.parameters(), lr=self.fake_lr,
                                                betas=(opts.adam_beta1, opts.adam_beta2),
                                                weight_decay=opts.adam_weight_decay, eps=opts.adam_epsilon)
        self.fake_schedule = get_scheduler(opts.lr_scheduler, self.fake_optimizer,
                                           num_warmup_steps=opts.lr_warmup_steps,
                                           num_training_steps=opts.max_train_steps)
        return student

    @property
    def fake_lr(self) -> float:
        opts: TDMOptions = self.options  # type: ignore[assignment]
        return opts.fake_learning_rate if opts.fake_learning_rate is not None else 5.0 * opts.learning_rate

    def prepare_auxiliary(self) -> None:
        # prepared: synced across processes and saved / restored with every checkpoint (model_1, optimizer_1,
        # scheduler_1), which no anchor trainer does for its fake score
        self.fake, self.fake_optimizer, self.fake_schedule = self.accelerator.prepare(
            self.fake, self.fake_optimizer, self.fake_schedule)

    def checkpoint_objects(self) -> list[Any]:
        return [self.ema] if self.ema is not None else []

    # -- loss --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, student, noise: torch.Tensor, k: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each sample's student input x_{t_k}: the student's own deterministic steps from x_K = ε down to grid
        point k (samples drop out of the batch once they reach theirs)."""
        grid, x = self.grid, noise.clone()
        for j in range(grid.steps, int(k.min()), -1):  # the step from grid point j to j − 1
            active = (k < j).nonzero().squeeze(1)
            t = grid.model_time[j].expand(len(active))
            rows = {name: v[active] for name, v in cond.items()}
            x0, eps = self.process.split(x[active], self.family.predict(student, x[active], t, rows).float(),
                                         grid.alpha[j].expand(len(active)), grid.sigma[j].expand(len(active)))
            x[active] = grid.alpha[j - 1] * x0 + grid.sigma[j - 1] * eps
        return x

    def _teacher_x0(self, x, t, cond, uncond):
        both = {name: torch.cat([cond[name], uncond[name]]) for name in cond}
        out = self.family.predict(self.teacher, torch.cat([x, x]), torch.cat([t, t]), both).float()
        alpha, sigma = self.process.at(t)
        x0_c, x0_u = (self.process.split(x, o, alpha, sigma)[0] for o in out.chunk(2))
        return x0_c, x0_u

    def loss(self, model, stream, step, micro):
        opts: TDMOptions = self.options  # type: ignore[assignment]
        device = self.accelerator.device
        draw = stream.draw(step, micro)
        local = stream.local()
        grid = self.grid
        idx = torch.from_numpy(draw.indices[local]).to(device)
        k = torch.from_numpy(np.minimum((draw.uniforms[local] * grid.steps).astype(np.int64), grid.steps - 1) + 1)
        k = k.to(device)
        u_time = stream.global_uniforms(draw, 1)[local].to(device)
        noise = stream.global_noise(draw, self.shape, device, stream=0)[local]
        xi = stream.global_noise(draw, self.shape, device, stream=1)[local]
        rows = self.caption_rows[idx]
        cond = self.cond.select(rows)
        uncond = self.cond.select(torch.zeros_like(rows))
        if self.sparse is not None:
            self.sparse.begin(step, micro)  # deterministic mask randomness: a resumed run draws the same masks
        student = self.accelerator.unwrap_model(model)
        x_k = self.rollout(student, noise, k, cond)

        # the student's step, with grad
        t_k = grid.model_time[k]
        out = self.family.predict(model, x_k, t_k, cond).float()
        x0, eps = self.process.split(x_k, out, grid.alpha[k], grid.sigma[k])

        with torch.no_grad():
            a_mid, s_mid = grid.alpha[k - 1], grid.sigma[k - 1]
            x_mid = _col(a_mid, x0) * x0 + _col(s_mid, eps) * eps
            t = self.process.interval_time(grid, k, u_time)
            a_t, s_t = self.process.at(t)
            x_t, beta = self.process.transition(x_mid, a_mid, s_mid, a_t, s_t, xi)
            x0_real, x0_uncond = self._teacher_x0(x_t, t, cond, uncond)
            x0_real_w = x0_real + (self.guidance - 1.0) * (x0_real - x0_uncond)

        # the fake score's prediction at x_t: with grad for its own loss, detached for the student's target
        out_fake = self.family.predict(self.fake, x_t, t, cond).float()
        x0_fake = self.process.split(x_t, out_fake, a_t, s_t)[0]
        with torch.no_grad():
            target = x0 + (x0_real - x0_fake) + (self.guidance - 1.0) * (x0_real - x0_uncond)
            norm = flat_mean((x0 - x0_real_w).abs()).clamp_min(1e-8)
            mixed = (_col(a_t / a_mid * s_mid, eps) * eps + _col(beta, xi) * xi) / _col(s_t, xi)
            w_is = torch.exp(-0.5 * flat_mean(mixed**2)) / torch.exp(-0.5 * flat_mean(xi**2))
        if opts.loss_type == "huber":
            distance = flat_mean(huber_elements(x0, target, opts.huber_c))
        else:
            distance = flat_mean((x0 - target) ** 2)
        student_loss = (distance / norm).mean()
        weight = torch.clamp(self.process.snr(a_t, s_t), max=SNR_CAP) * w_is
        fake_loss = (weight * flat_mean((x0_fake - x0.detach()) ** 2)).mean()
        logs = {"loss": float(student_loss.detach()), "fake_loss": float(fake_loss.detach()),
                "score_gap": float(flat_mean((x0_real - x0_fake.detach()).abs()).mean())}
        if self.sparse is not None and self.sparse.density() is not None:
            logs["sparse_density"] = self.sparse.density()  # kept-block fraction of the student's step above
        return student_loss + fake_loss, logs

    def after_optimizer_step(self, model, step):
        opts: TDMOptions = self.options  # type: ignore[assignment]
        if opts.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.fake.parameters(), opts.max_grad_norm)
        self.fake_optimizer.step()
        self.fake_schedule.step()
        self.fake_optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                online = [p.detach() for p in self.accelerator.unwrap_model(model).parameters()]
                torch._foreach_lerp_(list(self.ema.parameters()), online, 1.0 - opts.ema_decay)
        return {"fake_lr": self.fake_schedule.get_last_lr()[0]}

    # -- validation and the artefact ----------------------------------------------------------------------------
    def shipped_network(self, model) -> torch.nn.Module:
        """A plain copy (no training hooks) of the network the artefact carries, on the CPU, in eval mode."""
        opts: TDMOptions = self.options  # type: ignore[assignment]
        network = self.ema if opts.ship_weights == "ema" else self.accelerator.unwrap_model(model)
        fresh = type(network).from_config(network.config)
        fresh.load_state_dict({k: v.detach().cpu() for k, v in network.state_dict().items()})
        return fresh.eval().requires_grad_(False)

    def student_pipeline(self, transformer: torch.nn.Module):
        """A pipeline of the teacher's class around ``transformer`` with the few-step scheduler and a sampler contract
        (K steps, guidance off, the trained size; the sparse-attention config the student was trained under)."""
        from ..pipelines.contract import pipeline_class, with_sampler_contract

        opts: TDMOptions = self.options  # type: ignore[assignment]
        base = pipeline_class(self.pipe)
        components = {k: v for k, v in self.pipe.components.items() if k not in ("sampler_contract",
                                                                                   "accel_methods")}
        scheduler = self.family.few_step_scheduler(opts.flow_shift)
        components.update(transformer=transformer, scheduler=scheduler)
        contract = self.family.student_contract(self.teacher_contract, opts.num_inference_steps)
        contract.update(height=self.resolution, width=self.resolution)
        if self.num_frames is not None:
            contract["num_frames"] = self.num_frames
        methods = [self.sparse_config.to_dict()] if opts.sparse_attention is not None else None
        pipe = with_sampler_contract(base)(**components, sampler_contract=contract, accel_methods=methods)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def validation_prompts(self) -> list[str]:
        from ..pipelines.testbed.shapes import heldout_prompts

        return list(heldout_prompts())[: self.options.num_validation_prompts]

    @torch.no_grad()
    def validation_images(self, model):
        if self.family.video:
            return []  # the grid is for images; video students are judged by the video evaluation
        pipe = self.student_pipeline(self.shipped_network(model).to(self.accelerator.device))
        prompts = self.validation_prompts()
        return pipe(prompt=prompts, generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))]).images

    def save(self, model, output_dir: str) -> dict[str, Any]:
        opts: TDMOptions = self.options  # type: ignore[assignment]
        out = Path(output_dir)
        pipe = self.student_pipeline(self.shipped_network(model))
        pipe.to("cpu")
        pipe.save_pretrained(str(out))
        record = {"teacher": opts.pretrained_teacher_model, "guidance_scale_distilled": self.guidance,
                  "num_inference_steps": opts.num_inference_steps, "student_timesteps": self.grid.timesteps(),
                  "student_sigmas": [float(s) for s in self.grid.sigma.flip(0)],
                  "loss_type": opts.loss_type, "huber_c": opts.huber_c, "ema_decay": opts.ema_decay,
                  "weights": opts.ship_weights, "fake_learning_rate": self.fake_lr,
                  "sparse_attention": self.sparse_config.to_dict() if opts.sparse_attention is not None else None,
                  "sampler_contract": dict(pipe.config.sampler_contract), "scheduler": type(pipe.scheduler).__name__}
        (out / "distillation.json").write_text(json.dumps(record, indent=2))
        return record


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


@dataclass
class BladeOptions(TDMOptions):
    """TDM with the student trained under block-sparse self-attention (Video-BLADE): --sparse_attention is required."""

    sparse_attention: str | None = field(default="asa", metadata={
        "help": "the sparse_attention method the student trains and samples with, e.g. 'asa:block_size=64,tau=0.9' "
                "(mask before the colon, the method's options after it)"})

    def validate(self) -> None:
        if not self.sparse_attention:
            raise ValueError("blade trains a sparse student: pass --sparse_attention (e.g. 'asa:tau=0.9'), or use "
                             "the dense recipe `tdm`.")
        super().validate()


class Blade(TDM):
    name = "blade"
    summary = "Video-BLADE: TDM with the student trained under block-sparse (ASA) self-attention"
    options_class = BladeOptions
