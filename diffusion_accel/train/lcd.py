"""Latent consistency distillation (LCD; Luo et al., "Latent Consistency Models", arXiv 2310.04378).

A student f_θ is trained to map any point of the teacher's CFG probability-flow ODE to its origin, by matching its
own output one skipping step further along the ODE, where a frozen EMA copy f_θ⁻ (the *target network*) evaluates
it:

    x_{t_{n+k}} = noised real latent;   x̂_{t_n} = one solver step of the CFG teacher from t_{n+k} to t_n
    L = d( f_θ(x_{t_{n+k}}, t_{n+k}),  f_θ⁻(x̂_{t_n}, t_n) ),   d = pseudo-Huber (c = ``huber_c``) or L2
    θ⁻ ← μ θ⁻ + (1 − μ) θ  after every optimizer step,  μ = ``ema_decay`` (constant; not Diffusers' EMAModel,
    whose warm-up makes μ start near 0)

The solver step may cross the skip in m = ``solver_substeps`` sub-steps (a CFG teacher call each): the target then
follows the ODE of the m·N grid while the student still learns the N-point skip. On ``testbed:pixart`` the teacher's
DDIM ODE on 20 points is 5 points of adherence below the same ODE on 40 (``docs/results/distill_guidance``): that
gap is the grid's discretisation error, which m = 2 removes from the target at two more teacher forwards per step.

Guidance is distilled at a **fixed** scale w (``guidance_scale``, Diffusers' convention, i.e. LCM's w + 1): PixArt
and the testbed Flux have no guidance-embedding input, so the LCM paper's w-conditioning would add an untrained
module; the student then samples without CFG (one denoiser pass per step instead of two).

* ε-prediction (PixArt): skipping-step DDIM solver on the N = ``num_ddim_timesteps`` grid
  t_i = (i+1)·1000/N − 1, and the LCM boundary parameterisation f = c_skip(t) x + c_out(t) x̂0 with
  c_skip = σ_d²/((10t)² + σ_d²), c_out = 10t/√((10t)² + σ_d²), σ_d = 0.5: exactly what ``LCMScheduler`` applies
  at sampling time (``timestep_scaling`` 10, ``original_inference_steps`` N).
* Rectified flow (Flux): skipping-step Euler on σ_i = (i+1)/N and f = x − σ v, exactly what
  ``FlowMatchLCMScheduler`` applies (x0 = x − σ v, then re-noise to the next σ).
"""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import BatchStream
from .image_folder import ImageFolder, ImageFolderOptions, load_image_folder
from .options import TrainOptions
from .recipe import Recipe
from .run_folder import RUN_FILE
from .teachers import TeacherFamily, load_teacher_pipeline

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


@dataclass
class LCDOptions(ImageFolderOptions):
    """Latent consistency distillation of a CFG teacher into a few-step student without CFG."""

    learning_rate: float = 5e-5
    num_ddim_timesteps: int = field(default=50, metadata={"help": "N: the teacher solver's grid (skip = 1000/N)"})
    solver_substeps: int = field(default=1, metadata={
        "help": "m: the teacher crosses each skip in m solver steps (CFG at each), i.e. the target follows the ODE "
                "of the m·N grid while the student keeps the N-point skip; 1 = the LCM paper's single skipping step"})
    guidance_scale: float | None = field(default=None, metadata={
        "help": "the CFG scale distilled into the student (Diffusers' convention); default: the teacher's contract"})
    loss_type: str = field(default="huber", metadata={"choices": ("huber", "l2")})
    huber_c: float = field(default=0.001, metadata={"help": "pseudo-Huber c (per element)"})
    ema_decay: float = field(default=0.95, metadata={"help": "μ of the target network (constant rate)"})
    num_inference_steps: int = field(default=4, metadata={"help": "the student's default steps (its contract)"})
    resolution: int | None = field(default=None, metadata={"help": "training images' side; default: the "
                                                                  "teacher's contract height"})
    use_lora: bool = field(default=False, metadata={"help": "train a LoRA (peft) instead of full weights; families "
                                                            "with Diffusers LoRA support only (Flux)"})
    lora_rank: int = 16
    ship_weights: str = field(default="target", metadata={"choices": ("target", "online"), "help": "which network "
                                                          "the saved pipeline carries (full weights)"})
    num_validation_prompts: int = 4

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.num_ddim_timesteps <= 1000:
            raise ValueError(f"--num_ddim_timesteps must be in [1, 1000], got {self.num_ddim_timesteps}.")
        if self.solver_substeps < 1:
            raise ValueError(f"--solver_substeps must be >= 1, got {self.solver_substeps}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema_decay must be in [0, 1), got {self.ema_decay}.")
        if self.guidance_scale is not None and self.guidance_scale < 1.0:
            raise ValueError(f"--guidance_scale must be >= 1 (1 = no guidance), got {self.guidance_scale}.")
        if self.num_inference_steps < 1:
            raise ValueError("--num_inference_steps must be >= 1.")


def shapes_training_data(options: TrainOptions, resolution: int) -> tuple[np.ndarray, list[str]]:
    """Images (uint8, ``resolution`` px) and captions: the procedural shapes set, from index
    ``dataloader_seed_offset`` on (the testbed teachers saw the indices below it)."""
    from ..pipelines.testbed.train_common import dataset

    images, samples = dataset("train", options.num_train_samples, start=options.dataloader_seed_offset)
    if images.shape[1] != resolution:
        import torch.nn.functional as F

        x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(resolution, resolution), mode="area")
        images = x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return images, [s.caption for s in samples]


def huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Pseudo-Huber distance, mean over elements: √((a−b)² + c²) − c."""
    return (torch.sqrt((a.float() - b.float()) ** 2 + c * c) - c).mean()


def boundary_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out)`` of the LCM parameterisation at training timesteps ``t`` (as ``LCMScheduler``)."""
    scaled = t.float() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()
    return c_skip, c_out


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.ndim - 1))).to(like.dtype)


class EpsilonODE:
    """DDPM ε-prediction: noising, the CFG DDIM skipping step and the consistency function."""

    def __init__(self, family: TeacherFamily, num_ddim_timesteps: int, device: torch.device):
        self.ab = family.alphas_cumprod().to(device)
        self.skip = self.skip_for(family, num_ddim_timesteps)
        self.grid = (torch.arange(1, num_ddim_timesteps + 1, device=device) * self.skip - 1).long()

    def times(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.grid[index]
        return start, (start - self.skip).clamp_min(0)

    @staticmethod
    def skip_for(family: TeacherFamily, num_ddim_timesteps: int) -> int:
        """The skipping step k: the teacher's training timesteps / N."""
        return len(family.alphas_cumprod()) // num_ddim_timesteps

    def substep_times(self, t_start: torch.Tensor, t_end: torch.Tensor, m: int) -> list[torch.Tensor]:
        """t_start, the m − 1 integer timesteps dividing the skip evenly, t_end (the first skip ends at 0)."""
        step = self.skip // m
        return [t_start] + [(t_start - j * step).clamp_min(0) for j in range(1, m)] + [t_end]

    def noise(self, x0, eps, t):
        ab = _view(self.ab[t], x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def x0_from(self, x, out, t):
        ab = _view(self.ab[t], x)
        return (x - (1 - ab).sqrt() * out) / ab.sqrt()

    def consistency(self, x, out, t):
        c_skip, c_out = boundary_scalings(t)
        return _view(c_skip, x) * x + _view(c_out, x) * self.x0_from(x, out, t)

    def solver_step(self, x, out_c, out_u, t_from, t_to, w_lcm: float):
        x0_c, x0_u = self.x0_from(x, out_c, t_from), self.x0_from(x, out_u, t_from)
        x0 = x0_c + w_lcm * (x0_c - x0_u)
        eps = out_c + w_lcm * (out_c - out_u)
        ab = _view(self.ab[t_to], x)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    @staticmethod
    def model_time(t):
        return t


class FlowODE:
    """Rectified flow: x_σ = (1−σ) x0 + σ ε, v = ε − x0; Euler skipping step; f = x − σ v."""

    def __init__(self, family: TeacherFamily, num_ddim_timesteps: int, device: torch.device):
        self.n = num_ddim_timesteps
        self.grid = torch.arange(1, num_ddim_timesteps + 1, device=device).float() / num_ddim_timesteps

    def times(self, index):
        start = self.grid[index]
        return start, (start - 1.0 / self.n).clamp_min(0.0)

    def substep_times(self, s_start: torch.Tensor, s_end: torch.Tensor, m: int) -> list[torch.Tensor]:
        return [s_start + (s_end - s_start) * (j / m) for j in range(m)] + [s_end]

    def noise(self, x0, eps, sigma):
        s = _view(sigma, x0)
        return (1 - s) * x0 + s * eps

    def x0_from(self, x, out, sigma):
        return x - _view(sigma, x) * out

    def consistency(self, x, out, sigma):
        return self.x0_from(x, out, sigma)

    def solver_step(self, x, out_c, out_u, s_from, s_to, w_lcm: float):
        v = out_c + w_lcm * (out_c - out_u)
        return x + _view(s_to - s_from, x) * v

    @staticmethod
    def model_time(sigma):
        return sigma * 1000.0


class LCD(Recipe):
    name = "lcd"
    summary = "latent consistency distillation: a few-step student without CFG from a CFG teacher"
    options_class = LCDOptions

    # -- teacher and checks ----------------------------------------------------------------------------------
    def load_teacher(self) -> None:
        self.pipe, self.family, self.teacher_contract = load_teacher_pipeline(self.options.pretrained_teacher_model,
                                                                              self.accelerator.device)

    def check(self) -> None:
        opts: LCDOptions = self.options  # type: ignore[assignment]
        self.family.check_distillable()
        if self.family.data_free_only:
            raise ValueError(f"LCD learns from encoded training data, which the {type(self.pipe).__name__} teacher "
                             "family cannot encode; distil it with the data-free recipe `tdm` instead.")
        guidance = opts.guidance_scale or self.family.teacher_guidance(self.teacher_contract)
        if guidance is None:
            raise ValueError(f"the teacher {opts.pretrained_teacher_model!r} carries no guidance scale in its "
                             "sampler contract; pass --guidance_scale (the CFG scale to distil, e.g. 4.5).")
        if guidance <= 1.0:
            raise ValueError(f"the teacher samples without classifier-free guidance (scale {guidance}); LCD "
                             "distils a CFG teacher: pass --guidance_scale > 1.")
        self.guidance = float(guidance)
        if self.family.prediction == "epsilon":
            skip = EpsilonODE.skip_for(self.family, opts.num_ddim_timesteps)
            if skip % opts.solver_substeps:
                raise ValueError(f"--solver_substeps {opts.solver_substeps} does not divide the skip {skip} (the "
                                 "teacher's training timesteps / --num_ddim_timesteps), so its sub-steps would fall "
                                 "between integer timesteps; pick a divisor of it.")
        if opts.use_lora and not self.family.supports_lora:
            raise ValueError(f"{type(self.pipe).__name__} has no LoRA support in Diffusers (no PeftAdapterMixin on "
                             "its transformer); drop --use_lora to train full weights.")
        self.resolution = opts.resolution or self.teacher_contract.get("height")
        if self.resolution is None:
            raise ValueError("the teacher's sampler contract names no image size; pass --resolution.")
        # scanned again (validate() did it) because the folder is read here for the run record and setup
        self.image_folder: ImageFolder | None = opts.image_folder() if opts.train_data_dir else None
        if opts.resume_from_checkpoint is not None:
            self._check_same_data()

    def _check_same_data(self) -> None:
        """A resumed run must see the data its checkpoint was trained on: the stream indexes the pre-encoded
        samples by number, so other images (or another crop, flip or subset) would silently change what every
        index means."""
        opts: LCDOptions = self.options  # type: ignore[assignment]
        run_file = Path(opts.output_dir) / RUN_FILE
        previous = json.loads(run_file.read_text()).get("data") if run_file.is_file() else None
        if previous is None:
            return  # a run recorded before the data record existed
        current = opts.data_record(self.image_folder)
        moved = ("train_data_dir",)  # the same files in a moved folder are the same data
        changed = sorted(k for k in set(previous) | set(current)
                         if k not in moved and previous.get(k) != current.get(k))
        if changed:
            raise ValueError(f"--resume_from_checkpoint: this run was trained on other data ({', '.join(changed)} "
                             f"differ from {run_file}); resume with the same data and data flags, or start a new "
                             "run in another --output_dir.")

    def run_record(self) -> dict[str, Any]:
        opts: LCDOptions = self.options  # type: ignore[assignment]
        return {"teacher": opts.pretrained_teacher_model, "teacher_class": type(self.pipe).__name__,
                "guidance_scale": self.guidance, "data": opts.data_record(self.image_folder)}

    # -- data and models ---------------------------------------------------------------------------------------
    def training_data(self) -> tuple[np.ndarray, list[str]]:
        """Images at ``self.resolution`` and captions: ``--train_data_dir`` when given, else the shapes set."""
        opts: LCDOptions = self.options  # type: ignore[assignment]
        if self.image_folder is None:
            return shapes_training_data(opts, self.resolution)
        return load_image_folder(self.image_folder, self.resolution, center_crop=opts.center_crop,
                                 random_flip=opts.random_flip, max_train_samples=opts.max_train_samples,
                                 seed=opts.seed)

    def setup(self, stream_factory) -> torch.nn.Module:
        opts: LCDOptions = self.options  # type: ignore[assignment]
        device = self.accelerator.device
        images, captions = self.training_data()
        self.captions = captions
        self.cond, self.caption_rows = self.family.encode_caption_table(captions, device)
        self.latents = self.family.encode_images(images).to(device)
        self.num_samples = len(self.latents)
        self.ode = (EpsilonODE if self.family.prediction == "epsilon" else FlowODE)(
            self.family, opts.num_ddim_timesteps, device)
        self.w_lcm = self.guidance - 1.0

        teacher = self.family.denoiser.eval().requires_grad_(False)
        if opts.use_lora:
            from peft import LoraConfig

            student = teacher
            student.add_adapter(LoraConfig(r=opts.lora_rank, lora_alpha=opts.lora_rank, init_lora_weights="gaussian",
                                           target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
            student.train()
            self.teacher = None  # the base weights with the adapter disabled
            self.target = None  # LoRA LCD (as Diffusers' LCM-LoRA trainer): target = online under no_grad
        else:
            student = copy.deepcopy(teacher).train().requires_grad_(True)
            self.teacher = teacher
            self.target = copy.deepcopy(student).eval().requires_grad_(False)
        return student

    def checkpoint_objects(self) -> list[Any]:
        return [self.target] if self.target is not None else []

    # -- loss --------------------------------------------------------------------------------------------------
    def _teacher_outputs(self, model, x, t, cond, uncond):
        both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
        mt = self.ode.model_time(t)
        if self.teacher is not None:
            out = self.family.predict(self.teacher, torch.cat([x, x]), torch.cat([mt, mt]), both)
        else:
            base = self.accelerator.unwrap_model(model)
            base.disable_adapters()
            try:
                out = self.family.predict(base, torch.cat([x, x]), torch.cat([mt, mt]), both)
            finally:
                base.enable_adapters()
        return out.chunk(2)

    def consistency_pair(self, model, stream: BatchStream, step: int, micro: int) -> dict[str, Any]:
        """Student output f_θ at t_{n+k} and target f_θ⁻ at t_n for this process's rows."""
        opts: LCDOptions = self.options  # type: ignore[assignment]
        draw = stream.draw(step, micro)
        local = stream.local()
        device = self.latents.device
        idx = torch.from_numpy(draw.indices[local]).to(device)
        grid_index = torch.from_numpy(
            np.minimum((draw.uniforms[local] * opts.num_ddim_timesteps).astype(np.int64),
                       opts.num_ddim_timesteps - 1)).to(device)
        x0 = self.latents[idx]
        eps = stream.global_noise(draw, tuple(x0.shape[1:]), device)[local]
        rows = self.caption_rows[idx]
        cond = self.cond.select(rows)
        uncond = self.cond.select(torch.zeros_like(rows))
        t_start, t_end = self.ode.times(grid_index)
        x_start = self.ode.noise(x0, eps, t_start)

        out = self.family.predict(model, x_start, self.ode.model_time(t_start), cond)
        f_online = self.ode.consistency(x_start, out, t_start)
        with torch.no_grad():
            x_end = x_start
            times = self.ode.substep_times(t_start, t_end, opts.solver_substeps)
            for t_from, t_to in itertools.pairwise(times):
                out_c, out_u = self._teacher_outputs(model, x_end, t_from, cond, uncond)
                x_end = self.ode.solver_step(x_end, out_c, out_u, t_from, t_to, self.w_lcm)
            target = self.target if self.target is not None else model
            out_t = self.family.predict(target, x_end, self.ode.model_time(t_end), cond)
            f_target = self.ode.consistency(x_end, out_t, t_end)
        return {"f_online": f_online, "f_target": f_target, "x0": x0, "rows": rows, "idx": idx}

    def distillation_loss(self, pair: dict[str, Any]) -> torch.Tensor:
        opts: LCDOptions = self.options  # type: ignore[assignment]
        if opts.loss_type == "huber":
            return huber(pair["f_online"], pair["f_target"], opts.huber_c)
        return torch.nn.functional.mse_loss(pair["f_online"].float(), pair["f_target"].float())

    def loss(self, model, stream, step, micro):
        pair = self.consistency_pair(model, stream, step, micro)
        loss = self.distillation_loss(pair)
        return loss, {"loss": float(loss.detach())}

    @torch.no_grad()
    def after_optimizer_step(self, model, step):
        if self.target is not None:
            online = [p.detach() for p in self.accelerator.unwrap_model(model).parameters()]
            torch._foreach_lerp_(list(self.target.parameters()), online, 1.0 - self.options.ema_decay)
        return {}

    # -- validation and the artefact ----------------------------------------------------------------------------
    def student_pipeline(self, transformer: torch.nn.Module):
        """A pipeline of the teacher's class (with a sampler contract) around ``transformer`` and the student's
        scheduler, sampling without CFG at ``num_inference_steps``."""
        from ..pipelines.contract import pipeline_class, with_sampler_contract

        opts: LCDOptions = self.options  # type: ignore[assignment]
        base = pipeline_class(self.pipe)
        components = {k: v for k, v in self.pipe.components.items() if k != "sampler_contract"}
        components.update(transformer=transformer, scheduler=self.family.student_scheduler(opts.num_ddim_timesteps))
        contract = self.family.student_contract(self.teacher_contract, opts.num_inference_steps)
        if "height" not in contract:
            contract.update(height=self.resolution, width=self.resolution)
        pipe = with_sampler_contract(base)(**components, sampler_contract=contract)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def validation_prompts(self) -> list[str]:
        """Held-out shapes prompts; with ``--train_data_dir``, the folder's first distinct captions (the only
        prompts known to describe that data; they are training captions, so the grid shows fit, not
        generalisation)."""
        count = self.options.num_validation_prompts
        if self.image_folder is not None:
            return list(dict.fromkeys(self.captions))[:count]
        from ..pipelines.testbed.shapes import heldout_prompts

        return list(heldout_prompts())[:count]

    @torch.no_grad()
    def validation_images(self, model):
        network = self.target if (self.target is not None and self.options.ship_weights == "target") else model
        was_training = network.training
        network.eval()
        try:
            pipe = self.student_pipeline(network)
            prompts = self.validation_prompts()
            gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
            return pipe(prompt=prompts, generator=gens).images
        finally:
            network.train(was_training)

    def save(self, model, output_dir: str) -> dict[str, Any]:
        opts: LCDOptions = self.options  # type: ignore[assignment]
        out = Path(output_dir)
        if opts.use_lora:
            network = self._fused_copy(model, out)
        else:
            network = self.target if opts.ship_weights == "target" else model
        network = copy.deepcopy(network).eval().requires_grad_(False).to("cpu")
        pipe = self.student_pipeline(network)
        pipe.to("cpu")
        pipe.save_pretrained(str(out))
        record = {"teacher": opts.pretrained_teacher_model, "guidance_scale_distilled": self.guidance,
                  "num_ddim_timesteps": opts.num_ddim_timesteps, "solver_substeps": opts.solver_substeps,
                  "loss_type": opts.loss_type,
                  "huber_c": opts.huber_c, "ema_decay": opts.ema_decay, "weights": "lora-fused" if opts.use_lora
                  else opts.ship_weights, "sampler_contract": dict(pipe.config.sampler_contract),
                  "scheduler": type(pipe.scheduler).__name__}
        (out / "distillation.json").write_text(json.dumps(record, indent=2))
        return record

    def _fused_copy(self, model, out: Path) -> torch.nn.Module:
        """Save the LoRA for ``load_lora_weights`` and return a copy of the base with it fused in."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        from ..pipelines.contract import pipeline_class

        trained = self.accelerator.unwrap_model(model)
        lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(trained))
        pipeline_class(self.pipe).save_lora_weights(str(out), transformer_lora_layers=lora)
        fused = copy.deepcopy(trained)
        fused.fuse_lora()  # merge the adapter into the base weights, then drop the LoRA layers (Diffusers API)
        fused.unload_lora()
        return fused
