"""Blockwise Flow Matching trainers (arXiv 2510.21167) on the shared stack: ``diffusion-accel train bfm`` (stage 1:
segment velocity blocks + feature alignment network) and ``diffusion-accel train bfm_frn`` (stage 2: the feature
residual network, everything else frozen).

Data: shapes images from ``dataloader_seed_offset`` on, encoded once by the VAE of ``--pretrained_teacher_model``
(``testbed:flow``: its VAE, text encoders, scheduler and sampler contract; its transformer is not used) and packed
into Flux's 2x2 tokens; captions encoded once by its text encoders, the 512-token T5 sequence collapsed exactly
(:func:`diffusion_accel.pipelines.testbed.text.collapse_t5_sequence`). 10 % of captions are dropped to the empty
one so that classifier-free guidance works.

Stage 1 loss (paper ``compute_loss``): the global batch is split into M contiguous groups and group m draws
``t ~ U(σ_{m+1}, σ_m]``, so every segment trains every step; ``x_t = (1 − t) x + t ε``, target ``v* = ε − x``;
``L = ‖v̂ − v*‖² + λ_proj · mean_tokens(−cos(z_proj, f))`` with f the frozen encoder's per-token features.
``--monolithic`` trains the teacher's own transformer architecture (``FluxTransformer2DModel``) from scratch on the
same data, timesteps and budget: the equal-budget baseline BFM is judged against.

Semantic feature guidance target: ``shapes-judge``'s 8x8 feature map (96 channels, one cell per 8x8-pixel token,
exactly the token grid of 64x64 images), the frozen encoder we have that knows colour, shape and position, as DINOv2
does for ImageNet. The judge rather than shapes-net, so that the network that scores adherence and FID-shapes is
one the model never trained against.

Stage 2 loss (paper ``train_frn.py``): same noise ε at t and at the segment start σ_m,
``L = ‖R(x_{σ_m}, σ_m) + coeff(t) · FRN(x_t, t) − R(x_t, t)‖²``, ``coeff = (σ_m − t) / (σ_m − σ_{m+1})``, R targets
without gradient.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .options import LR_SCHEDULERS, TrainOptions
from .recipe import Recipe

#: The frozen encoder of semantic feature guidance (see the module docstring).
ALIGNMENT_ENCODER = "shapes-judge"


@dataclass
class BFMOptions(TrainOptions):
    """Blockwise Flow Matching, stage 1 (or, with --monolithic, the equal-budget single-network baseline)."""

    pretrained_teacher_model: str = field(default="testbed:flow", metadata={
        "help": "the FluxPipeline whose VAE, text encoders, scheduler and sampler contract the model is trained "
                "and sampled with (its transformer is not used)"})
    learning_rate: float = 8e-4
    lr_scheduler: str = field(default="cosine", metadata={"choices": LR_SCHEDULERS})
    lr_warmup_steps: int = 200
    train_batch_size: int = 32
    adam_weight_decay: float = 0.01
    num_train_samples: int = 20000
    num_segments: int = field(default=4, metadata={"help": "M: time segments, each with its own velocity blocks"})
    segment_layers: int = field(default=1, metadata={"help": "Flux dual-stream blocks per segment"})
    segment_single_layers: int = field(default=0, metadata={"help": "Flux single-stream blocks per segment"})
    alignment_layers: int = field(default=1, metadata={"help": "dual-stream blocks of R (0 and 0: no semantic "
                                                                "feature guidance)"})
    alignment_single_layers: int = field(default=1, metadata={"help": "single-stream blocks of R"})
    proj_loss_weight: float = field(default=0.05, metadata={"help": "λ_proj of the alignment loss (paper 0.05)"})
    monolithic: bool = field(default=False, metadata={
        "help": "train the teacher's own transformer architecture instead (the equal-budget baseline)"})
    caption_dropout: float = 0.1
    ema_decay: float = field(default=0.999, metadata={"help": "EMA of the shipped weights, warm-up min(decay, "
                                                               "(1+s)/(10+s)) as the testbed trainer"})
    num_validation_prompts: int = 4

    def validate(self) -> None:
        super().validate()
        if self.num_segments < 1:
            raise ValueError(f"--num_segments must be >= 1, got {self.num_segments}.")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"--caption_dropout must be in [0, 1), got {self.caption_dropout}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema_decay must be in [0, 1), got {self.ema_decay}.")
        if self.proj_loss_weight < 0:
            raise ValueError(f"--proj_loss_weight must be >= 0, got {self.proj_loss_weight}.")

    @property
    def has_alignment(self) -> bool:
        return not self.monolithic and self.alignment_layers + self.alignment_single_layers > 0


def stratified_times(uniforms: np.ndarray, num_segments: int) -> np.ndarray:
    """Global-batch times: row r belongs to group ``m = r·M // G`` (contiguous groups of sizes ⌊G/M⌋ or ⌈G/M⌉, as
    the paper's ``split_sizes``) and gets ``t = σ_m − u·(σ_m − σ_{m+1})`` ∈ (σ_{m+1}, σ_m]."""
    rows = np.arange(len(uniforms))
    group = rows * num_segments // len(uniforms)
    width = 1.0 / num_segments
    upper = 1.0 - group * width
    return upper - uniforms * width


class FlowTrainingData:
    """Packed latents, collapsed caption rows and position ids of the shapes set (see the module docstring)."""

    def __init__(self, pipe: Any, images: np.ndarray, captions: list[str], device: torch.device):
        from ..diffusers_internals import prepare_latent_image_ids
        from ..pipelines.testbed.train_diffusion import encode_flux_text
        from .teachers import caption_table, teacher_family

        family = teacher_family(pipe)
        latents = family.encode_images(images)  # packed, model space (shift and scale applied)
        self.x0 = latents.to(device)
        h, w = family._grid
        self.img_ids = prepare_latent_image_ids(type(pipe), 1, h // 2, w // 2, device, torch.float32)
        unique, self.caption_rows = caption_table(captions, device)
        rows, log_counts, pooled = encode_flux_text(pipe, unique)
        self.text, self.log_counts, self.pooled = rows.to(device), log_counts.to(device), pooled.to(device)
        self.txt_ids = torch.zeros(self.text.shape[1], 3, device=device)

    def __len__(self) -> int:
        return len(self.x0)

    def call_args(self, caption_rows: torch.Tensor) -> dict[str, Any]:
        """The Flux-interface conditioning of ``caption_rows`` (with each pad run's log-count as attention bias)."""
        batch, tokens = len(caption_rows), self.x0.shape[1]
        bias = torch.cat([self.log_counts[caption_rows], self.log_counts.new_zeros(batch, tokens)], dim=1)
        return {"encoder_hidden_states": self.text[caption_rows], "pooled_projections": self.pooled[caption_rows],
                "img_ids": self.img_ids, "txt_ids": self.txt_ids,
                "joint_attention_kwargs": {"attention_mask": bias.view(batch, 1, 1, -1)}}


@torch.no_grad()
def encoder_token_features(images: np.ndarray, device: torch.device, batch: int = 256) -> torch.Tensor:
    """``[N, 64, 96]``: the alignment encoder's 8x8 feature map of each 64x64 image, one row per Flux token (row-major,
    as ``pack_latents`` orders the 2x2 latent patches)."""
    from ..pipelines.testbed.shapes_net import load_judge, to_tensor

    # a copy on the training device (a GPU run encodes in seconds); the cached judge itself stays where it is
    judge = copy.deepcopy(load_judge(ALIGNMENT_ENCODER)).to(device)
    out = []
    for i in range(0, len(images), batch):
        x = to_tensor(list(images[i:i + batch])).to(device) * 2.0 - 1.0
        x = judge.stage2(judge.down(judge.stage1(judge.stem(x))))
        out.append(F.silu(judge.norm(x)).flatten(2).transpose(1, 2))
    return torch.cat(out)


class _FlowRecipeBase(Recipe):
    """What both stages share: the frozen pipeline, the encoded data, validation and the saved pipeline."""

    #: The option naming the pipeline whose VAE, text encoders, scheduler and contract the model uses.
    source_option = "pretrained_teacher_model"

    @property
    def source(self) -> str:
        return getattr(self.options, self.source_option)

    def load_teacher(self) -> None:
        from .teachers import load_teacher_pipeline

        self.pipe, self.family, self.contract = load_teacher_pipeline(self.source, self.accelerator.device)
        if type(self.family).__name__ != "FluxTeacher":
            raise ValueError(f"{self.name} trains models for a FluxPipeline (packed latents, T5 + CLIP text); "
                             f"{self.source} is a {type(self.pipe).__name__}. Use --{self.source_option} "
                             "testbed:flow or another FluxPipeline folder.")

    def load_data(self, with_features: bool) -> None:
        from .lcd import shapes_training_data

        images, captions = shapes_training_data(self.options, 64)
        device = self.accelerator.device
        self.data = FlowTrainingData(self.pipe, images, captions, device)
        self.features = encoder_token_features(images, device) if with_features else None
        self.num_samples = len(self.data)

    def draw_batch(self, stream, step: int, micro: int, num_segments: int):
        """This process's ``(rows, x0, noise, t, caption_rows)``; captions dropped at ``caption_dropout``."""
        draw = stream.draw(step, micro)
        local = stream.local()
        device = self.data.x0.device
        rows = torch.from_numpy(draw.indices[local]).to(device)
        x0 = self.data.x0[rows]
        noise = stream.global_noise(draw, tuple(x0.shape[1:]), device)[local]
        t = torch.from_numpy(stratified_times(draw.uniforms, num_segments)[local]).float().to(device)
        drop = torch.rand(stream.global_batch, generator=torch.Generator().manual_seed(draw.noise_seed + 1))[local]
        caption_rows = self.data.caption_rows[rows].clone()
        caption_rows[drop.to(device) < getattr(self.options, "caption_dropout", 0.0)] = 0
        return rows, x0, noise, t, caption_rows

    def pipeline_with(self, transformer: torch.nn.Module):
        from diffusers import FluxPipeline

        from ..pipelines.contract import with_sampler_contract

        components = {**self.pipe.components, "transformer": transformer}
        pipe = with_sampler_contract(FluxPipeline)(**components, sampler_contract=self.contract)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def validation_images(self, model):
        from ..pipelines.testbed.shapes import heldout_prompts

        prompts = list(heldout_prompts())[:self.options.num_validation_prompts]
        if not prompts:
            return []
        pipe = self.pipeline_with(self.shipped_transformer(model))
        gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        return pipe(prompt=prompts, negative_prompt=[""] * len(prompts), generator=gens).images

    def shipped_transformer(self, model: torch.nn.Module) -> torch.nn.Module:
        raise NotImplementedError

    def write(self, transformer: torch.nn.Module, output_dir: str, record: dict[str, Any]) -> dict[str, Any]:
        pipe = self.pipeline_with(transformer.eval().requires_grad_(False).to("cpu"))
        pipe.to("cpu")
        pipe.save_pretrained(output_dir)
        record = {**record, "pipeline_from": self.source,
                  "parameters": sum(p.numel() for p in transformer.parameters()),
                  "images_seen": self.options.max_train_steps * self.options.train_batch_size
                  * self.accelerator.num_processes * self.options.gradient_accumulation_steps}
        (Path(output_dir) / "bfm.json").write_text(json.dumps(record, indent=2, default=str))
        self.pipe.to(self.accelerator.device)
        return record


class BFM(_FlowRecipeBase):
    name = "bfm"
    summary = "Blockwise Flow Matching, stage 1: segment velocity blocks + feature alignment network (or --monolithic)"
    artefact = "FluxPipeline with a BlockwiseFlowTransformer"
    options_class = BFMOptions

    def check(self) -> None:
        o: BFMOptions = self.options  # type: ignore[assignment]
        steps = int(self.contract.get("num_inference_steps", 28))
        if not o.monolithic and steps % o.num_segments:
            raise ValueError(f"--num_segments {o.num_segments} does not divide the pipeline's {steps} sampling "
                             "steps: each segment must be entered at its boundary with the same number of steps. "
                             f"Pick a divisor of {steps}.")

    def run_record(self) -> dict[str, Any]:
        o: BFMOptions = self.options  # type: ignore[assignment]
        return {"pipeline_from": o.pretrained_teacher_model, "monolithic": o.monolithic,
                "alignment_encoder": ALIGNMENT_ENCODER if o.has_alignment else None}

    def build_model(self) -> torch.nn.Module:
        o: BFMOptions = self.options  # type: ignore[assignment]
        teacher = self.pipe.transformer.config
        torch.manual_seed(o.seed)
        if o.monolithic:
            return type(self.pipe.transformer).from_config(teacher)
        from ..pipelines.bfm import BlockwiseFlowTransformer

        return BlockwiseFlowTransformer(
            in_channels=teacher.in_channels, num_segments=o.num_segments, segment_layers=o.segment_layers,
            segment_single_layers=o.segment_single_layers, alignment_layers=0 if not o.has_alignment
            else o.alignment_layers, alignment_single_layers=0 if not o.has_alignment else o.alignment_single_layers,
            attention_head_dim=teacher.attention_head_dim, num_attention_heads=teacher.num_attention_heads,
            joint_attention_dim=teacher.joint_attention_dim, pooled_projection_dim=teacher.pooled_projection_dim,
            axes_dims_rope=tuple(teacher.axes_dims_rope), feature_dim=self.features.shape[-1]
            if self.features is not None else 96)

    def setup(self, stream_factory) -> torch.nn.Module:
        o: BFMOptions = self.options  # type: ignore[assignment]
        self.load_data(with_features=o.has_alignment)
        from ..pipelines.testbed.train_common import EMA

        model = self.build_model().to(self.accelerator.device)
        self.ema = EMA(model, decay=o.ema_decay)  # the testbed trainer's warm-up form, as the option says
        return model.train()

    def checkpoint_objects(self) -> list[Any]:
        return [self.ema.model]

    def loss(self, model, stream, step, micro):
        o: BFMOptions = self.options  # type: ignore[assignment]
        rows, x0, noise, t, caption_rows = self.draw_batch(stream, step, micro, o.num_segments)
        x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * noise
        args = {"hidden_states": x_t, "timestep": t, **self.data.call_args(caption_rows)}
        logs: dict[str, float] = {}
        if o.has_alignment:
            v, z = model(**args, return_features=True)
            proj = -F.cosine_similarity(z.float(), self.features[rows].float(), dim=-1).mean()
            logs["proj_loss"] = float(proj.detach())
        else:
            v, proj = model(**args, return_dict=False)[0], None
        fm = F.mse_loss(v.float(), (noise - x0).float())
        loss = fm if proj is None else fm + o.proj_loss_weight * proj
        return loss, {"loss": float(loss.detach()), "fm_loss": float(fm.detach()), **logs}

    def after_optimizer_step(self, model, step):
        self.ema.update(self.accelerator.unwrap_model(model), step)
        return {}

    def shipped_transformer(self, model):
        return self.ema.model

    def save(self, model, output_dir: str) -> dict[str, Any]:
        o: BFMOptions = self.options  # type: ignore[assignment]
        return self.write(self.ema.model, output_dir, {
            "stage": "monolithic" if o.monolithic else "bfm", "num_segments": 1 if o.monolithic else o.num_segments,
            "alignment_encoder": ALIGNMENT_ENCODER if o.has_alignment else None,
            "proj_loss_weight": o.proj_loss_weight if o.has_alignment else None, "ema_decay": o.ema_decay})


@dataclass
class FRNOptions(TrainOptions):
    """Blockwise Flow Matching, stage 2: the feature residual network on a frozen stage-1 model."""

    pretrained_model: str = field(default="", metadata={"help": "the stage-1 output folder (diffusion-accel train "
                                                                  "bfm), or testbed:bfm (required)"})
    pretrained_teacher_model: str = field(default="", metadata={
        "help": "unused: the VAE, text encoders and scheduler come from --pretrained_model"})
    frn_single_layers: int = field(default=1, metadata={"help": "FRN depth (single-stream blocks; paper 4)"})
    learning_rate: float = 5e-4
    lr_scheduler: str = field(default="cosine", metadata={"choices": LR_SCHEDULERS})
    lr_warmup_steps: int = 50
    train_batch_size: int = 32
    num_train_samples: int = 20000
    num_validation_prompts: int = 4

    def validate(self) -> None:
        super().validate()
        if not self.pretrained_model:
            raise ValueError("--pretrained_model is required: the stage-1 folder written by `diffusion-accel train "
                             "bfm` (or testbed:bfm).")
        if self.frn_single_layers < 1:
            raise ValueError(f"--frn_single_layers must be >= 1, got {self.frn_single_layers}.")


class BFMFeatureResidual(_FlowRecipeBase):
    name = "bfm_frn"
    summary = "Blockwise Flow Matching, stage 2: feature residual network (R once per segment at inference)"
    artefact = "FluxPipeline with a BlockwiseFlowTransformer and its FRN"
    options_class = FRNOptions
    source_option = "pretrained_model"

    def check(self) -> None:
        from ..pipelines.bfm import BlockwiseFlowTransformer

        stage1, source = self.pipe.transformer, self.options.pretrained_model
        if not isinstance(stage1, BlockwiseFlowTransformer):
            raise ValueError(f"--pretrained_model {source} holds a {type(stage1).__name__}, not a "
                             "BlockwiseFlowTransformer: train stage 1 with `diffusion-accel train bfm` first.")
        if stage1.alignment is None:
            raise ValueError(f"--pretrained_model {source} has no feature alignment network, and FRA approximates "
                             "it: train stage 1 with alignment_layers or alignment_single_layers >= 1.")

    def run_record(self) -> dict[str, Any]:
        return {"stage1_from": self.options.pretrained_model}

    def setup(self, stream_factory) -> torch.nn.Module:
        from ..pipelines.bfm import BlockwiseFlowTransformer

        self.load_data(with_features=False)
        stage1 = self.pipe.transformer
        torch.manual_seed(self.options.seed)
        model = BlockwiseFlowTransformer(**{**stage1.config, "frn_single_layers": self.options.frn_single_layers})
        kept = {k: v for k, v in stage1.state_dict().items() if not k.startswith("frn.")}
        missing, unexpected = model.load_state_dict(kept, strict=False)
        if unexpected or any(not k.startswith("frn.") for k in missing):
            raise ValueError(f"the stage-1 weights do not fit: missing {missing}, unexpected {unexpected}")
        model.requires_grad_(False)
        model.frn.requires_grad_(True)
        self.boundaries = [1.0 - m / model.config.num_segments for m in range(model.config.num_segments + 1)]
        return model.to(self.accelerator.device)

    def loss(self, model, stream, step, micro):
        m_count = model.config.num_segments
        rows, x0, noise, t, caption_rows = self.draw_batch(stream, step, micro, m_count)
        segment = model.segment_of(t)
        start = torch.tensor(self.boundaries, device=t.device)[segment]
        end = torch.tensor(self.boundaries, device=t.device)[segment + 1]
        coeff = ((start - t) / (start - end)).view(-1, 1, 1)
        call = self.data.call_args(caption_rows)
        kwargs = call["joint_attention_kwargs"]

        def embedded(time: torch.Tensor, x: torch.Tensor):
            return model.embed(x, call["encoder_hidden_states"], call["pooled_projections"], time, call["img_ids"],
                               call["txt_ids"])

        def noisy(time: torch.Tensor) -> torch.Tensor:
            return (1 - time.view(-1, 1, 1)) * x0 + time.view(-1, 1, 1) * noise

        x_t, x_start = noisy(t), noisy(start)
        temb_t, context, rotary = embedded(t, x_t)
        with torch.no_grad():
            target = model.alignment(x_t, context, temb_t, rotary, kwargs, t)
            temb_s, _, _ = embedded(start, x_start)
            anchor = model.alignment(x_start, context, temb_s, rotary, kwargs, start)
        residual = model.frn(model.alignment.x_embedder(x_t), context, temb_t, rotary, kwargs)
        loss = F.mse_loss((anchor + coeff * residual).float(), target.float())
        reuse = F.mse_loss(anchor.float(), target.float())  # coeff = 0: reusing the anchor unchanged
        return loss, {"loss": float(loss.detach()), "reuse_loss": float(reuse.detach())}

    def shipped_transformer(self, model):
        return model

    def save(self, model, output_dir: str) -> dict[str, Any]:
        from ..pipelines.bfm import BlockwiseFlowTransformer

        fresh = BlockwiseFlowTransformer.from_config(model.config)  # registers the FRA hook on a clean module
        fresh.load_state_dict(model.state_dict())
        return self.write(fresh, output_dir, {"stage": "bfm_frn", "stage1_from": self.options.pretrained_model,
                                              "frn_single_layers": self.options.frn_single_layers,
                                              "num_segments": model.config.num_segments})
