"""What a distillation recipe needs from a teacher pipeline, per Diffusers pipeline class.

A :class:`TeacherFamily` encodes captions and images once (the training loop only sees tensors), calls the
denoiser on a batch, decodes latents for rewards and validation, and names the scheduler and sampler contract the
student is sampled with. Two prediction types are covered: ε-prediction on a DDPM schedule (``PixArtAlphaPipeline``)
and rectified flow (``FluxPipeline``; ``WanPipeline`` for video). Which methods a family supports is the adapter's
business (:mod:`diffusion_accel.pipelines.adapters`); these are the *training-side* facts: the denoiser's call
signature and the latent layout, which no inference hook needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import diffusers_internals as internals


@dataclass
class Conditioning:
    """Encoded captions, one row per unique caption; row 0 is the empty caption (the unconditional branch)."""

    tensors: dict[str, torch.Tensor]
    pooled: torch.Tensor  # [U, D]: one vector per caption, for a latent reward model

    def select(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[rows] for k, v in self.tensors.items()}

    def to(self, device: torch.device) -> Conditioning:
        return Conditioning({k: v.to(device) for k, v in self.tensors.items()}, self.pooled.to(device))


def caption_table(captions: list[str], device: torch.device) -> tuple[list[str], torch.Tensor]:
    """The distinct captions (row 0 the empty one, the unconditional branch, then sorted) and each caption's row."""
    unique = ["", *sorted(set(captions) - {""})]
    row_of = {c: i for i, c in enumerate(unique)}
    return unique, torch.tensor([row_of[c] for c in captions], device=device)


class TeacherFamily:
    """Base class; see :func:`teacher_family` for the registered ones."""

    #: ``"epsilon"`` (x_t = √ᾱ x0 + √(1-ᾱ) ε, model predicts ε) or ``"flow"`` (x_σ = (1-σ) x0 + σ ε, model
    #: predicts v = ε - x0).
    prediction: str = ""
    #: Contract key of the teacher's guidance scale and the value that switches guidance off in the student.
    guidance_key: str = "guidance_scale"
    supports_lora: bool = False
    #: True for video pipelines (latents ``[C, F, H, W]``, a ``num_frames`` call argument).
    video: bool = False
    #: True when the family cannot encode training images (recipes that learn from data refuse it; data-free
    #: distillers such as TDM need only prompts).
    data_free_only: bool = False

    def __init__(self, pipe: Any):
        self.pipe = pipe

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    # -- checks -----------------------------------------------------------------------------------------------
    def check_distillable(self) -> None:
        """Raise ``ValueError`` when this teacher cannot be distilled with CFG (overridden per family)."""

    # -- data -------------------------------------------------------------------------------------------------
    def encode_captions(self, captions: list[str]) -> Conditioning:
        raise NotImplementedError

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        raise NotImplementedError

    def encode_caption_table(self, captions: list[str], device: torch.device) -> tuple[Conditioning, torch.Tensor]:
        """Each distinct caption encoded once (row 0 the empty one, the unconditional branch) and, per caption,
        its row in that table."""
        unique, rows = caption_table(captions, device)
        return self.encode_captions(unique).to(device), rows

    @torch.no_grad()
    def encode_images(self, images: np.ndarray, batch: int = 256) -> torch.Tensor:
        """uint8 ``[N, H, W, 3]`` → model-space latents (posterior mean, shifted and scaled as the pipeline does)."""
        vae = self.pipe.vae
        out = []
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
            latents = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mode()
            out.append(self.to_model_space(latents.float()))
        return torch.cat(out)

    def use_resolution(self, height: int, width: int) -> None:
        """Sample at ``height`` × ``width`` pixels without encoding images first (recipes that start from noise)."""

    def to_model_space(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.pipe.vae.config
        return (latents - float(getattr(cfg, "shift_factor", None) or 0.0)) * float(cfg.scaling_factor)

    def from_model_space(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.pipe.vae.config
        return latents / float(cfg.scaling_factor) + float(getattr(cfg, "shift_factor", None) or 0.0)

    def grid_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents on the image grid ``[B, C, H, W]`` (families that pack latents into tokens unpack)."""
        return latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents → images in [-1, 1], differentiable (a reward's gradient flows through the VAE)."""
        return self.pipe.vae.decode(self.from_model_space(self.grid_latents(latents))).sample

    # -- model ------------------------------------------------------------------------------------------------
    def predict(self, model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The denoiser's prediction (ε or v) at model-space ``x`` and training timesteps ``t`` (0..1000)."""
        raise NotImplementedError

    # -- the student's sampler ------------------------------------------------------------------------------------
    def student_scheduler(self, num_ddim_timesteps: int) -> Any:
        raise NotImplementedError

    def student_contract(self, teacher_contract: dict[str, Any], steps: int) -> dict[str, Any]:
        """The teacher's call defaults with the student's steps and guidance switched off (CFG is distilled in)."""
        contract = {k: v for k, v in teacher_contract.items() if k not in ("negative_prompt", "timesteps", "sigmas")}
        contract.update({"num_inference_steps": steps, self.guidance_key: 1.0})
        return contract

    def teacher_guidance(self, teacher_contract: dict[str, Any]) -> float | None:
        return teacher_contract.get(self.guidance_key)

    # -- a few-step student's deterministic sampler (TDM) -------------------------------------------------------
    def few_step_scheduler(self, flow_shift: float = 1.0) -> Any:
        """A Diffusers scheduler whose step is the deterministic first-order (DDIM / Euler) update
        x' = α' x̂0 + σ' ε̂ and whose last step lands on x̂0: what a trajectory-distilled student is trained to take."""
        raise NotImplementedError

    def few_step_grid(self, scheduler: Any, steps: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(timesteps, sigmas)`` that the pipeline's own call sets on ``scheduler`` for ``steps`` steps (the
        timesteps the denoiser receives, in the 0..1000 convention of :meth:`predict`; ``sigmas`` for flow
        schedulers, ``None`` for DDPM ones)."""
        scheduler.set_timesteps(steps)
        sigmas = getattr(scheduler, "sigmas", None) if self.prediction == "flow" else None
        return scheduler.timesteps.clone(), None if sigmas is None else sigmas[:steps].clone().float()


class PixArtTeacher(TeacherFamily):
    """``PixArtAlphaPipeline``: ε-prediction (the learned-σ channels are dropped), masked T5 text."""

    prediction = "epsilon"
    guidance_key = "guidance_scale"

    def check_distillable(self) -> None:
        prediction = self.pipe.scheduler.config.get("prediction_type", "epsilon")
        if prediction != "epsilon":
            raise ValueError(f"this PixArt teacher's scheduler predicts {prediction!r}; the LCD recipe distils "
                             "ε-prediction PixArt models (set the scheduler's prediction_type or use another "
                             "teacher).")

    @torch.no_grad()
    def encode_captions(self, captions: list[str]) -> Conditioning:
        embeds, masks = [], []
        for i in range(0, len(captions), 256):
            e, m, _, _ = self.pipe.encode_prompt(captions[i:i + 256], do_classifier_free_guidance=False,
                                                 device=self.pipe.device, clean_caption=False,
                                                 max_sequence_length=120)
            embeds.append(e)
            masks.append(m)
        embeds, masks = torch.cat(embeds), torch.cat(masks)
        # Padding past the longest caption is masked out of every attention, so trimming it is exact and saves
        # the cross-attention work on ~100 padding tokens per sample.
        keep = max(1, int(masks.sum(1).max()))
        embeds, masks = embeds[:, :keep].float(), masks[:, :keep].float()
        pooled = (embeds * masks[..., None]).sum(1) / masks.sum(1, keepdim=True).clamp_min(1)
        return Conditioning({"encoder_hidden_states": embeds, "encoder_attention_mask": masks}, pooled)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        factor = self.pipe.vae_scale_factor
        return (self.denoiser.config.in_channels, height // factor, width // factor)

    def student_contract(self, teacher_contract: dict[str, Any], steps: int) -> dict[str, Any]:
        # the student is trained at one size; PixArt's default binning would reject or move it
        return {"use_resolution_binning": False, **super().student_contract(teacher_contract, steps)}

    def predict(self, model, x, t, cond):
        added = {"resolution": None, "aspect_ratio": None}
        if self.denoiser.config.get("use_additional_conditions"):
            factor = self.pipe.vae_scale_factor
            size = torch.tensor([x.shape[-2] * factor, x.shape[-1] * factor], device=x.device, dtype=x.dtype)
            added = {"resolution": size.repeat(len(x), 1), "aspect_ratio": (size[0] / size[1]).repeat(len(x), 1)}
        out = model(x, encoder_hidden_states=cond["encoder_hidden_states"],
                    encoder_attention_mask=cond["encoder_attention_mask"], timestep=t, added_cond_kwargs=added,
                    return_dict=False)[0]
        return out[:, : x.shape[1]]

    def student_scheduler(self, num_ddim_timesteps: int):
        from diffusers import LCMScheduler

        cfg = self.pipe.scheduler.config
        return LCMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start,
                            beta_end=cfg.beta_end, beta_schedule=cfg.beta_schedule, prediction_type="epsilon",
                            original_inference_steps=num_ddim_timesteps, timestep_scaling=10.0,
                            set_alpha_to_one=True)

    def few_step_scheduler(self, flow_shift: float = 1.0):
        # DDIM on the "trailing" grid t_k = k·T/K − 1 (999, 749, 499, 249 for K = 4): it starts at the last
        # training timestep (pure noise, as the student's rollout does), and set_alpha_to_one makes its last step
        # return x̂0. η = 0 is PixArtAlphaPipeline's default.
        from diffusers import DDIMScheduler

        cfg = self.pipe.scheduler.config
        return DDIMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start,
                             beta_end=cfg.beta_end, beta_schedule=cfg.beta_schedule,
                             trained_betas=cfg.get("trained_betas"), prediction_type="epsilon",
                             clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")

    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t of the teacher's training schedule (from its scheduler config, like Diffusers' DDPM schedulers)."""
        from diffusers import DDPMScheduler

        cfg = self.pipe.scheduler.config
        ddpm = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start,
                             beta_end=cfg.beta_end, beta_schedule=cfg.beta_schedule,
                             trained_betas=cfg.get("trained_betas"))
        return ddpm.alphas_cumprod.float()


class FluxTeacher(TeacherFamily):
    """``FluxPipeline`` with true CFG (``true_cfg_scale`` and a negative prompt): rectified flow on packed latents."""

    prediction = "flow"
    guidance_key = "true_cfg_scale"
    supports_lora = True

    def check_distillable(self) -> None:
        if self.denoiser.config.get("guidance_embeds"):
            raise ValueError("this Flux teacher is guidance-distilled (guidance_embeds=True): it has no "
                             "classifier-free guidance to distil. Use a teacher sampled with true CFG "
                             "(guidance_embeds=False, true_cfg_scale > 1).")

    def _max_sequence_length(self) -> int:
        from ..pipelines.contract import contract_of

        return int(contract_of(self.pipe).get("max_sequence_length", 512))

    @torch.no_grad()
    def encode_captions(self, captions: list[str]) -> Conditioning:
        embeds, pooled = [], []
        for i in range(0, len(captions), 64):
            chunk = captions[i:i + 64]
            e, p, _ = self.pipe.encode_prompt(prompt=chunk, prompt_2=chunk, device=self.pipe.device,
                                              max_sequence_length=self._max_sequence_length())
            embeds.append(e.float())
            pooled.append(p.float())
        pooled_t = torch.cat(pooled)
        return Conditioning({"encoder_hidden_states": torch.cat(embeds), "pooled_projections": pooled_t}, pooled_t)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        factor = self.pipe.vae_scale_factor
        h, w = height // factor, width // factor
        return ((h // 2) * (w // 2), self.pipe.vae.config.latent_channels * 4)

    def use_resolution(self, height: int, width: int) -> None:
        factor = self.pipe.vae_scale_factor
        self._grid = (height // factor, width // factor)

    def encode_images(self, images: np.ndarray, batch: int = 256) -> torch.Tensor:
        latents = super().encode_images(images, batch)
        b, c, h, w = latents.shape
        self._grid = (h, w)  # the packed tokens do not say which grid they came from
        return internals.pack_latents(type(self.pipe), latents, b, c, h, w)

    def grid_latents(self, latents: torch.Tensor) -> torch.Tensor:
        factor = self.pipe.vae_scale_factor
        h, w = self._grid
        return internals.unpack_latents(type(self.pipe), latents, h * factor, w * factor, factor)

    def predict(self, model, x, t, cond):
        h, w = self._grid
        img_ids = internals.prepare_latent_image_ids(type(self.pipe), len(x), h // 2, w // 2, x.device, x.dtype)
        txt = cond["encoder_hidden_states"]
        txt_ids = torch.zeros(txt.shape[1], 3, device=x.device, dtype=x.dtype)
        return model(hidden_states=x, encoder_hidden_states=txt, pooled_projections=cond["pooled_projections"],
                     timestep=t / 1000.0, img_ids=img_ids, txt_ids=txt_ids, guidance=None, return_dict=False)[0]

    def student_scheduler(self, num_ddim_timesteps: int):
        from diffusers import FlowMatchLCMScheduler

        return FlowMatchLCMScheduler.from_config(self.pipe.scheduler.config)

    def few_step_scheduler(self, flow_shift: float = 1.0):
        # Euler is DDIM on the straight path; FluxPipeline hands it σ = linspace(1, 1/K, K) (then 0), shifted by
        # `shift`. Dynamic shifting is off: the grid must not depend on the image size the student is called at.
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config, shift=flow_shift,
                                                           use_dynamic_shifting=False)

    def few_step_grid(self, scheduler, steps):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps))  # what FluxPipeline.__call__ passes
        return scheduler.timesteps.clone(), scheduler.sigmas[:steps].clone().float()


class WanTeacher(TeacherFamily):
    """``WanPipeline`` (Wan 2.1 layout, one transformer): rectified flow on video latents ``[C, F, H, W]``
    normalised by the VAE's ``latents_mean`` / ``latents_std``, UMT5 text zero-padded to ``max_sequence_length``
    (the transformer sees the padding, so it is kept), separate-pass CFG with ``guidance_scale``."""

    prediction = "flow"
    guidance_key = "guidance_scale"
    video = True
    data_free_only = True  # no video-clip encoder here: TDM-style (prompt-only) distillation only

    def check_distillable(self) -> None:
        if getattr(self.pipe, "transformer_2", None) is not None:
            raise ValueError("this WanPipeline has two experts (Wan 2.2 transformer_2); distillation here trains "
                             "one denoiser: use a Wan 2.1-style teacher with a single transformer.")

    def _max_sequence_length(self) -> int:
        from ..pipelines.contract import contract_of

        return int(contract_of(self.pipe).get("max_sequence_length", 512))

    @torch.no_grad()
    def encode_captions(self, captions: list[str]) -> Conditioning:
        embeds = []
        for i in range(0, len(captions), 256):
            e, _ = self.pipe.encode_prompt(prompt=captions[i:i + 256], do_classifier_free_guidance=False,
                                           max_sequence_length=self._max_sequence_length(), device=self.pipe.device)
            embeds.append(e.float())
        embeds_t = torch.cat(embeds)
        return Conditioning({"encoder_hidden_states": embeds_t}, embeds_t.mean(1))

    def encode_images(self, images: np.ndarray, batch: int = 256) -> torch.Tensor:
        raise ValueError("the Wan teacher family encodes no training images; use a data-free recipe (tdm, blade).")

    def video_latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        pipe = self.pipe
        frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        return (pipe.vae.config.z_dim, frames, height // pipe.vae_scale_factor_spatial,
                width // pipe.vae_scale_factor_spatial)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        raise ValueError("a video latent needs a frame count: use video_latent_shape(height, width, num_frames).")

    def predict(self, model, x, t, cond):
        return model(hidden_states=x, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                     return_dict=False)[0]

    def few_step_scheduler(self, flow_shift: float = 1.0):
        # WanPipeline calls scheduler.set_timesteps(K) with no grid of its own, and FlowMatchEulerDiscreteScheduler
        # would then end its grid at σ = 1/1000 (a wasted last step). First-order DPM-Solver++ in flow mode is DDIM /
        # Euler exactly, and its flow sigmas give σ_k ≈ k/K (shifted by flow_shift), then 0.
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler(
            num_train_timesteps=self.pipe.scheduler.config.num_train_timesteps, prediction_type="flow_prediction",
            use_flow_sigmas=True, flow_shift=flow_shift, solver_order=1, algorithm_type="dpmsolver++",
            final_sigmas_type="zero", lower_order_final=True)


#: Teacher families by Diffusers pipeline class name (matched along the pipeline class's MRO, so the sampler
#: contract subclasses match their base).
TEACHER_FAMILIES: dict[str, type[TeacherFamily]] = {
    "PixArtAlphaPipeline": PixArtTeacher,
    "FluxPipeline": FluxTeacher,
    "WanPipeline": WanTeacher,
}


def teacher_family(pipe: Any) -> TeacherFamily:
    """The :class:`TeacherFamily` for ``pipe``; a ``ValueError`` naming the supported classes otherwise."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in TEACHER_FAMILIES:
            return TEACHER_FAMILIES[cls.__name__](pipe)
    raise ValueError(f"{type(pipe).__name__} cannot be distilled by this recipe yet; supported teachers: "
                     f"{', '.join(TEACHER_FAMILIES)}.")


def load_teacher_pipeline(name: str, device: Any) -> tuple[Any, TeacherFamily, dict[str, Any]]:
    """A recipe's frozen pipeline: ``(pipe on device without progress bars, its teacher family, its sampler
    contract)``."""
    from ..loading import load_pipeline
    from ..pipelines.contract import contract_of

    pipe = load_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return pipe, teacher_family(pipe), contract_of(pipe)
