"""Declarative model adapters: what each pipeline family looks like to our hooks.

An adapter states, for one family, which pipeline and denoiser classes it covers, the denoiser's block lists in
execution order, the classifier-free-guidance (CFG) layout, the prediction type and how latents are laid out.
Block input/output signatures come from Diffusers' own ``TransformerBlockRegistry`` so that we agree with its
caches. Adding a model is one :class:`ModelAdapter` entry (see the README section "Adding a model").
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

CfgLayout = Literal["batched", "separate", "none"]
Prediction = Literal["epsilon", "v_prediction", "flow"]
LatentLayout = Literal["image", "packed_image", "video", "packed_video"]

README_ADDING_A_MODEL = "README.md, section 'Adding a model'"


@dataclass(frozen=True)
class ModelAdapter:
    """How one pipeline family is laid out.

    Attributes:
        family: short family name (``"pixart_alpha"``, ``"flux"``, ...).
        pipeline_classes: Diffusers pipeline class names this adapter covers.
        denoiser: attribute of the pipeline holding the denoiser (``"transformer"`` or ``"unet"``).
        block_lists: attribute names of the denoiser's ``ModuleList`` s of transformer blocks, in execution order.
            Flux's dual- and single-stream lists form one ordered range. Empty for UNets.
        cfg_layout: how the pipeline evaluates CFG: ``"batched"`` (one forward on a concatenated batch),
            ``"separate"`` (two forwards, wrapped in ``cache_context("cond"/"uncond")``) or ``"none"``.
        cfg_scale_arg: the ``__call__`` argument whose value > 1 turns CFG on.
        cfg_needs_negative_prompt: CFG only runs when a negative prompt is given (Flux/HunyuanVideo true CFG).
        uncond_first: batched layout only: the unconditional half comes first (DiT puts it second).
        guidance_distilled: the model embeds the guidance scale and by default runs no unconditional pass.
        prediction: what the denoiser predicts (``"epsilon"``, ``"v_prediction"``, ``"flow"`` velocity).
        learned_sigma: the denoiser output has twice the latent channels (DiT, PixArt); the first half is used.
        timestep_scale: the pipeline passes ``timestep / timestep_scale`` to the denoiser (Flux: 1000).
        latent_layout: ``image`` ``[B,C,H,W]``, ``packed_image`` ``[B,L,C·p²]``, ``video`` ``[B,C,F,H,W]`` or
            ``packed_video`` ``[B,L,C]``.
        repeated_blocks: class names of the denoiser's repeated blocks, for Diffusers' regional compile
            (``compile_repeated_blocks``) on models whose class leaves ``_repeated_blocks`` empty.
        extra: optional facts used by some methods: ``self_attention`` (attribute names of a block's
            self-attention modules), ``joint_text`` (``"prefix"``/``"suffix"``: where joint attention puts the text
            tokens), ``frames_first`` (video latents are ``[B,F,C,H,W]``), ``resolution_multiple``.
    """

    family: str
    pipeline_classes: tuple[str, ...]
    denoiser: str = "transformer"
    block_lists: tuple[str, ...] = ("transformer_blocks",)
    cfg_layout: CfgLayout = "batched"
    cfg_scale_arg: str = "guidance_scale"
    cfg_needs_negative_prompt: bool = False
    uncond_first: bool = True
    guidance_distilled: bool = False
    prediction: Prediction = "epsilon"
    learned_sigma: bool = False
    timestep_scale: float = 1.0
    latent_layout: LatentLayout = "image"
    video: bool = False
    repeated_blocks: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ queries on a live pipeline
    def get_denoiser(self, pipe: Any) -> torch.nn.Module:
        denoiser = getattr(pipe, self.denoiser)
        # `pipe.transformer = torch.compile(pipe.transformer)` wraps it; hooks belong on the module it wraps
        return getattr(denoiser, "_orig_mod", denoiser)

    def get_blocks(self, pipe: Any) -> list[torch.nn.Module]:
        """All transformer blocks of the denoiser, in execution order (one flat list across ``block_lists``)."""
        denoiser = self.get_denoiser(pipe)
        blocks: list[torch.nn.Module] = []
        for name in self.block_lists:
            blocks.extend(getattr(denoiser, name, None) or [])
        return blocks

    def cfg_mode(self, call_args: Mapping[str, Any]) -> CfgLayout:
        """The CFG layout a pipeline call with these (bound, defaults-applied) arguments will use."""
        if self.cfg_layout == "none":
            return "none"
        scale = call_args.get(self.cfg_scale_arg)
        if scale is None or float(scale) <= 1.0:
            return "none"
        if self.cfg_needs_negative_prompt and call_args.get("negative_prompt") is None and (
            call_args.get("negative_prompt_embeds") is None
        ):
            return "none"
        return self.cfg_layout


def _adapter_list() -> list[ModelAdapter]:
    return [
        ModelAdapter(
            family="dit", pipeline_classes=("DiTPipeline",), uncond_first=False, learned_sigma=True,
            repeated_blocks=("BasicTransformerBlock",), extra={"self_attention": ("attn1",)},
        ),
        ModelAdapter(
            family="pixart_alpha", pipeline_classes=("PixArtAlphaPipeline",), learned_sigma=True,
            repeated_blocks=("BasicTransformerBlock",), extra={"self_attention": ("attn1",)},
        ),
        ModelAdapter(
            family="pixart_sigma", pipeline_classes=("PixArtSigmaPipeline", "PixArtSigmaPAGPipeline"),
            learned_sigma=True, repeated_blocks=("BasicTransformerBlock",), extra={"self_attention": ("attn1",)},
        ),
        ModelAdapter(
            family="sd3",
            pipeline_classes=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                              "StableDiffusion3InpaintPipeline"),
            prediction="flow", repeated_blocks=("JointTransformerBlock",),
            extra={"self_attention": ("attn", "attn2"), "joint_text": "suffix"},
        ),
        ModelAdapter(
            family="flux",
            pipeline_classes=("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline",
                              "FluxKontextPipeline"),
            block_lists=("transformer_blocks", "single_transformer_blocks"),
            cfg_layout="separate", cfg_scale_arg="true_cfg_scale", cfg_needs_negative_prompt=True,
            guidance_distilled=True, prediction="flow", timestep_scale=1000.0, latent_layout="packed_image",
            extra={"self_attention": ("attn",), "joint_text": "prefix"},
        ),
        ModelAdapter(
            family="cogvideox", pipeline_classes=("CogVideoXPipeline",), prediction="v_prediction",
            latent_layout="video", video=True, repeated_blocks=("CogVideoXBlock",),
            extra={"frames_first": True, "self_attention": ("attn1",), "joint_text": "prefix"},
        ),
        ModelAdapter(
            family="wan", pipeline_classes=("WanPipeline",), block_lists=("blocks",), cfg_layout="separate",
            prediction="flow", latent_layout="video", video=True, extra={"self_attention": ("attn1",)},
        ),
        ModelAdapter(
            family="hunyuan_video", pipeline_classes=("HunyuanVideoPipeline",),
            block_lists=("transformer_blocks", "single_transformer_blocks"), cfg_layout="separate",
            cfg_scale_arg="true_cfg_scale", cfg_needs_negative_prompt=True, guidance_distilled=True,
            prediction="flow", latent_layout="video", video=True,
            extra={"self_attention": ("attn",), "joint_text": "suffix"},
        ),
        ModelAdapter(
            family="ltx_video", pipeline_classes=("LTXPipeline",), prediction="flow",
            latent_layout="packed_video", video=True,
            extra={"resolution_multiple": 32, "self_attention": ("attn1",)},  # 32: LTXPipeline.check_inputs
        ),
        ModelAdapter(
            family="sd", denoiser="unet", block_lists=(),
            pipeline_classes=("StableDiffusionPipeline", "StableDiffusionXLPipeline",
                              "StableDiffusionImg2ImgPipeline", "StableDiffusionXLImg2ImgPipeline"),
        ),
    ]


_ADAPTERS: dict[str, ModelAdapter] = {a.family: a for a in _adapter_list()}


def register_adapter(adapter: ModelAdapter, *, overwrite: bool = False) -> ModelAdapter:
    """Register a new family (or, with ``overwrite=True``, replace one)."""
    if adapter.family in _ADAPTERS and not overwrite:
        raise ValueError(f"An adapter for family {adapter.family!r} exists; pass overwrite=True to replace it.")
    _ADAPTERS[adapter.family] = adapter
    return adapter


def adapters() -> dict[str, ModelAdapter]:
    """All registered adapters by family name."""
    return dict(_ADAPTERS)


def find_adapter(pipe: Any) -> ModelAdapter:
    """The adapter for a loaded pipeline, matched on its class (or a parent class) name.

    Raises:
        ValueError: the pipeline's family is not supported; the message lists the supported families and
            points to the README section on adding one.
    """
    names = [cls.__name__ for cls in inspect.getmro(type(pipe))]
    for name in names:
        for adapter in _ADAPTERS.values():
            if name in adapter.pipeline_classes:
                return adapter
    supported = ", ".join(f"{a.family} ({'/'.join(a.pipeline_classes[:2])})" for a in _ADAPTERS.values())
    raise ValueError(
        f"No diffusion-accel adapter for {type(pipe).__name__}. Supported families: {supported}. "
        f"To add one, register a ModelAdapter (about 30 lines): see {README_ADDING_A_MODEL}."
    )
