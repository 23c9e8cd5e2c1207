"""Declarative model adapters: what each pipeline family looks like to our hooks.

An adapter states, for one family, which pipeline and denoiser classes it covers, the denoiser's block lists in
execution order, the classifier-free-guidance (CFG) layout, the prediction type and how latents are laid out.
Block input/output signatures come from Diffusers' own ``TransformerBlockRegistry`` so that we agree with its
caches. Adding a model is one :class:`ModelAdapter` entry (see the README section "Adding a model").
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
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
        experts: further denoiser attributes the pipeline switches to within a call (Wan 2.2's low-noise
            ``transformer_2``). The adapter only matches pipelines where they are all set. Every expert gets its own
            instance of each method (a cache belongs to the expert that filled it) under the pipeline's one call.
        denoiser_classes: when set, the adapter matches only pipelines whose denoiser is of one of these classes,
            and wins over an adapter of the same pipeline class without them: a model family served by another
            family's pipeline class (BFM's ``BlockwiseFlowTransformer`` in a ``FluxPipeline``).
        block_lists: attribute names (dotted paths for nested modules) of the denoiser's ``ModuleList`` s of
            transformer blocks, in execution order. Flux's dual- and single-stream lists form one ordered range.
            Empty for UNets.
        cfg_layout: how the pipeline evaluates CFG: ``"batched"`` (one forward on a concatenated batch),
            ``"separate"`` (two forwards, wrapped in ``cache_context("cond"/"uncond")``) or ``"none"``.
        cfg_scale_arg: the ``__call__`` argument whose value > 1 turns CFG on.
        cfg_needs_negative_prompt: CFG only runs when a negative prompt is given (Flux/HunyuanVideo true CFG).
        uncond_first: batched layout only: the unconditional half comes first (DiT puts it second).
        guidance_distilled: the model embeds the guidance scale and by default runs no unconditional pass.
        prediction: what the denoiser predicts (``"epsilon"``, ``"v_prediction"``, ``"flow"`` velocity).
        learned_sigma: the denoiser output has twice the latent channels (DiT, PixArt); the first half is used.
        timestep_scale, timestep_offset: the scheduler timestep of a step is ``timestep_offset + timestep_scale ×``
            the denoiser's timestep argument (Flux passes ``timestep / 1000``: scale 1000; Z-Image passes
            ``(1000 - timestep) / 1000``: offset 1000, scale -1000). The session derives the step from it.
        timestep_argument: the name of the denoiser ``forward`` parameter holding the timestep (``"timestep"``;
            Z-Image's is ``t``). Passed by keyword or by position: the position is read off ``forward``.
        output_sign: the denoiser returns ``output_sign ×`` the ``prediction`` (``-1``: Z-Image returns the negated
            velocity, which its pipeline negates back). Methods see the prediction itself: the session multiplies
            the output by the sign before them and again after them.
        per_sample_lists: ``forward`` parameters that take a Python list with one tensor per batch row instead of
            a batched tensor (Z-Image: the latents ``x`` and the captions ``cap_feats``); the first is the latent,
            and the output is then a per-sample list too. Methods see the latent and the output stacked into one
            batched tensor and the other lists as :class:`diffusion_accel.batching.SampleList` (row slicing picks
            list items); the denoiser gets its lists back.
        cfg_scale_threshold: CFG runs when the ``cfg_scale_arg`` value exceeds this (1 for ``u + s·(c − u)``; 0 for
            Z-Image's ``c + s·(c − u)``).
        latent_layout: ``image`` ``[B,C,H,W]``, ``packed_image`` ``[B,L,C·p²]``, ``video`` ``[B,C,F,H,W]`` or
            ``packed_video`` ``[B,L,C]``.
        unsupported_methods: method name -> why that method cannot run on this family (an upstream bug, a layout the
            method cannot read). Methods are otherwise offered wherever their adapter predicate holds.
        repeated_blocks: class names of the denoiser's repeated blocks, for Diffusers' regional compile
            (``compile_repeated_blocks``) on models whose class leaves ``_repeated_blocks`` empty.
        extra: optional facts used by some methods: ``self_attention`` (attribute names of a block's
            self-attention modules), ``joint_text`` (``"prefix"``/``"suffix"``: where joint attention puts the text
            tokens), ``frames_first`` (video latents are ``[B,F,C,H,W]``), ``resolution_multiple``.
    """

    family: str
    pipeline_classes: tuple[str, ...]
    denoiser: str = "transformer"
    experts: tuple[str, ...] = ()
    denoiser_classes: tuple[str, ...] = ()
    block_lists: tuple[str, ...] = ("transformer_blocks",)
    cfg_layout: CfgLayout = "batched"
    cfg_scale_arg: str = "guidance_scale"
    cfg_needs_negative_prompt: bool = False
    uncond_first: bool = True
    guidance_distilled: bool = False
    prediction: Prediction = "epsilon"
    learned_sigma: bool = False
    timestep_scale: float = 1.0
    timestep_offset: float = 0.0
    timestep_argument: str = "timestep"
    output_sign: float = 1.0
    per_sample_lists: tuple[str, ...] = ()
    cfg_scale_threshold: float = 1.0
    latent_layout: LatentLayout = "image"
    unsupported_methods: Mapping[str, str] = field(default_factory=dict)
    repeated_blocks: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.output_sign not in (1.0, -1.0):
            # ±1 keeps the round trip exact: negating twice gives the pipeline back the denoiser's own bits
            raise ValueError(f"ModelAdapter {self.family!r}: output_sign must be 1 or -1, got {self.output_sign}.")

    # ------------------------------------------------------------------ derived facts
    @property
    def video(self) -> bool:
        return self.latent_layout in ("video", "packed_video")

    @property
    def tensor_format(self) -> str | None:
        """Diffusers' name of the denoiser's output layout (``"BCHW"``, ``"BCFHW"``, ``"BFCHW"``); ``None`` for
        packed token sequences, which have no spatial axes to filter."""
        if self.latent_layout == "image":
            return "BCHW"
        if self.latent_layout == "video":
            return "BFCHW" if self.extra.get("frames_first") else "BCFHW"
        return None

    # ------------------------------------------------------------------ queries on a live pipeline
    def get_denoiser(self, pipe: Any, attr: str | None = None) -> torch.nn.Module:
        """The denoiser (or, with ``attr``, one of the :attr:`experts`)."""
        denoiser = getattr(pipe, attr or self.denoiser)
        # `pipe.transformer = torch.compile(pipe.transformer)` wraps it; hooks belong on the module it wraps
        return getattr(denoiser, "_orig_mod", denoiser)

    def get_blocks(self, pipe: Any, attr: str | None = None) -> list[torch.nn.Module]:
        """All transformer blocks of the denoiser (or expert ``attr``), in execution order (one flat list across
        ``block_lists``)."""
        denoiser = self.get_denoiser(pipe, attr)
        blocks: list[torch.nn.Module] = []
        for name in self.block_lists:
            blocks.extend(_module_list(denoiser, name))
        return blocks

    def routing_units(self, pipe: Any, attr: str | None = None) -> list[tuple[str, torch.nn.Module]]:
        """The units a learned cache router (HarmoniCa, L2C) decides on, in execution order, as
        ``(name, module)``: each block's gated branches (:data:`GATED_BRANCHES`) where its class is known, the
        whole block elsewhere. Names are relative to the denoiser (``transformer_blocks.3.attn1``)."""
        denoiser = self.get_denoiser(pipe, attr)
        units: list[tuple[str, torch.nn.Module]] = []
        for list_name in self.block_lists:
            for index, block in enumerate(_module_list(denoiser, list_name)):
                prefix = f"{list_name}.{index}"
                branches = GATED_BRANCHES.get(type(getattr(block, "_orig_mod", block)).__name__)
                if branches is None:
                    units.append((prefix, block))
                    continue
                for branch in branches:
                    module = getattr(block, branch, None)
                    if module is not None:  # DiT's block has no cross-attention, SD3's last no context MLP
                        units.append((f"{prefix}.{branch}", module))
        return units

    def unit_feeders(self, pipe: Any, attr: str | None = None) -> dict[str, list[tuple[str, torch.nn.Module]]]:
        """Per routing unit that has them (:data:`BRANCH_FEEDERS`), its feeders as ``(name, module)`` with names
        relative to the denoiser (``single_transformer_blocks.3.attn``); units without feeders are absent."""
        denoiser = self.get_denoiser(pipe, attr)
        feeders: dict[str, list[tuple[str, torch.nn.Module]]] = {}
        for list_name in self.block_lists:
            for index, block in enumerate(_module_list(denoiser, list_name)):
                table = BRANCH_FEEDERS.get(type(getattr(block, "_orig_mod", block)).__name__, {})
                for branch, names in table.items():
                    found = [(f"{list_name}.{index}.{n}", getattr(block, n)) for n in names
                             if getattr(block, n, None) is not None]
                    if found:
                        feeders[f"{list_name}.{index}.{branch}"] = found
        return feeders

    def cfg_mode(self, call_args: Mapping[str, Any]) -> CfgLayout:
        """The CFG layout a pipeline call with these (bound, defaults-applied) arguments will use."""
        if self.cfg_layout == "none":
            return "none"
        scale = call_args.get(self.cfg_scale_arg)
        if scale is None or float(scale) <= self.cfg_scale_threshold:
            return "none"
        if self.cfg_needs_negative_prompt and call_args.get("negative_prompt") is None and (
            call_args.get("negative_prompt_embeds") is None
        ):
            return "none"
        return self.cfg_layout



def _module_list(denoiser: torch.nn.Module, path: str) -> list[torch.nn.Module]:
    """The blocks at dotted ``path`` under ``denoiser`` (empty when a part is missing or ``None``)."""
    module: Any = denoiser
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return []
    return list(module)


#: The gated branches of a transformer block class: submodules whose output the block scales by an adaLN gate of
#: the current timestep (or adds ungated, as cross-attention) after they return. A branch output cached at one step
#: and returned at a later one is then re-gated with the later step's gate, which is HarmoniCa's caching unit
#: (arXiv 2410.01723, the attention and MLP branch of DiT blocks). Read off each class's ``forward`` in Diffusers
#: 0.42; blocks of other classes are routed whole.
GATED_BRANCHES: dict[str, tuple[str, ...]] = {
    "BasicTransformerBlock": ("attn1", "attn2", "ff"),  # DiT, PixArt-α/Σ: gate_msa·attn1, attn2 ungated, gate_mlp·ff
    "FluxTransformerBlock": ("attn", "ff", "ff_context"),  # attn returns both streams, each gated after
    # gate·proj_out(cat(attn, act(proj_mlp))): the gated branch is proj_out's output, fed by attn and proj_mlp
    "FluxSingleTransformerBlock": ("proj_out",),
    "JointTransformerBlock": ("attn", "attn2", "ff", "ff_context"),  # SD3 / SD3.5
    "WanTransformerBlock": ("attn1", "attn2", "ffn"),
}

#: Per block class and gated branch: the submodules whose outputs only build that branch's input (read off the
#: class's ``forward`` in Diffusers 0.42). When a router reuses the branch they need not run: their hooks return a
#: placeholder (:mod:`diffusion_accel.routed_units`) and their MACs count as the branch's. Flux's single-stream
#: block concatenates attn's and act(proj_mlp)'s outputs into proj_out and uses them nowhere else, so routing
#: attn and proj_mlp as units of their own would leave proj_out (28 % of the flow denoiser's MACs) always running.
BRANCH_FEEDERS: dict[str, dict[str, tuple[str, ...]]] = {
    "FluxSingleTransformerBlock": {"proj_out": ("attn", "proj_mlp")},
}

# Reasons shared by several families (tests/engine/test_families.py runs every method the adapters allow).
_CACHE_DIT_LEAVES_MODULES = "cache-dit 1.5.3's patch functor adds modules that its disable_cache leaves behind"
_CACHE_DIT_OUTLIVES_DISABLE = ("cache-dit 1.5.3's patch functor rewrites block forwards in a way that outlives "
                               "disable_cache (Diffusers' FirstBlockCache then fails on the same model)")

_INVERTED_SIGMAS = ("the scheduler runs inverted sigmas (invert_sigmas=True), so its sigmas are 1 - σ of the flow "
                    "x_t = (1-σ)·x0 + σ·noise this method converts predictions and re-noises with")

_GUIDER_PASSES = ("the pipeline's guider names its CFG passes 'pred_cond'/'pred_uncond' and takes its scale from the "
                  "guider component, while guidance methods read CFG from call arguments and skip the 'uncond' pass, "
                  "so this method would find no unconditional pass to drop (per-row caches key the guider's passes "
                  "by their names and do apply)")

_LTX2_TWO_OUTPUTS = ("the transformer returns a video and an audio prediction and the pipeline guides both from the "
                     "batched pass, while guidance methods drop and re-fill rows of the first output only (and "
                     "slicing the batch breaks LTX-2's rotary embeddings: RuntimeError in apply_split_rotary_emb)")
_LTX2_PAB = ("Diffusers 0.42.1's Pyramid Attention Broadcast keeps one state per attention module, not per cache "
             "context, so the batch-B guidance passes that follow the 2B CFG pass reuse its attention outputs "
             "(RuntimeError in LTX2VideoTransformerBlock.get_mod_params)")


#: Why Diffusers' own block caches cannot run on a model whose blocks sit in nested stacks (BFM).
_DIFFUSERS_CACHES_TOP_LEVEL = ("Diffusers 0.42.1's FirstBlockCache and MagCache hook only block lists that are direct "
                               "children of the transformer; BFM's blocks sit in its alignment network and per-segment "
                               "stacks (use delta_cache, taylorseer or a router)")


def _adapter_list() -> list[ModelAdapter]:
    return [
        ModelAdapter(
            family="dit", pipeline_classes=("DiTPipeline",), uncond_first=False, learned_sigma=True,
            unsupported_methods={"dbcache": _CACHE_DIT_LEAVES_MODULES},
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
            unsupported_methods={
                "fbcache": "Diffusers 0.42.1's FirstBlockCache subtracts the None encoder states of SD3's "
                           "context_pre_only last block (TypeError)",
                "fastercache": "Diffusers 0.42.1's FasterCache returns a batch of the wrong size on SD3 "
                               "(2 images for 1)",
                "dbcache": "cache-dit 1.5.3's transformer-only mode does not support SD3",
            },
            extra={"self_attention": ("attn", "attn2"), "joint_text": "suffix"},
        ),
        ModelAdapter(
            family="flux",
            pipeline_classes=("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline",
                              "FluxKontextPipeline"),
            block_lists=("transformer_blocks", "single_transformer_blocks"),
            cfg_layout="separate", cfg_scale_arg="true_cfg_scale", cfg_needs_negative_prompt=True,
            guidance_distilled=True, prediction="flow", timestep_scale=1000.0, latent_layout="packed_image",
            unsupported_methods={"dbcache": _CACHE_DIT_OUTLIVES_DISABLE},
            extra={"self_attention": ("attn",), "joint_text": "prefix"},
        ),
        ModelAdapter(
            # Blockwise Flow Matching (pipelines/bfm): a FluxPipeline whose transformer runs the shared feature
            # alignment network R and then the velocity blocks of the step's time segment. Only R's blocks are the
            # same modules at every step, so the block methods work on them; the velocity blocks change with the
            # segment, and a cache keyed on block position would mix segments.
            family="bfm", pipeline_classes=("FluxPipeline",), denoiser_classes=("BlockwiseFlowTransformer",),
            block_lists=("alignment.transformer_blocks", "alignment.single_transformer_blocks"),
            cfg_layout="separate", cfg_scale_arg="true_cfg_scale", cfg_needs_negative_prompt=True,
            prediction="flow", timestep_scale=1000.0, latent_layout="packed_image",
            unsupported_methods={**{name: _DIFFUSERS_CACHES_TOP_LEVEL for name in ("fbcache", "magcache")},
                                 "dbcache": "cache-dit 1.5.3 finds a transformer's blocks by its class "
                                            "(BlockAdapterRegister), and BlockwiseFlowTransformer is not one of them"},
            extra={"self_attention": ("attn",), "joint_text": "prefix"},
        ),
        ModelAdapter(
            family="cogvideox", pipeline_classes=("CogVideoXPipeline",), prediction="v_prediction",
            latent_layout="video", repeated_blocks=("CogVideoXBlock",),
            extra={"frames_first": True, "self_attention": ("attn1",), "joint_text": "prefix"},
        ),
        ModelAdapter(
            family="wan", pipeline_classes=("WanPipeline",), block_lists=("blocks",), cfg_layout="separate",
            prediction="flow", latent_layout="video", extra={"self_attention": ("attn1",)},
        ),
        ModelAdapter(
            # Wan 2.2 A14B: WanPipeline with a high-noise `transformer` for t >= boundary_ratio·T and a low-noise
            # `transformer_2` below it (WanPipeline.__call__); same blocks, separate CFG and flow as Wan 2.1.
            family="wan22", pipeline_classes=("WanPipeline",), experts=("transformer_2",), block_lists=("blocks",),
            cfg_layout="separate", cfg_scale_arg="guidance_scale", prediction="flow", latent_layout="video",
            extra={"self_attention": ("attn1",)},
        ),
        ModelAdapter(
            family="hunyuan_video", pipeline_classes=("HunyuanVideoPipeline",),
            block_lists=("transformer_blocks", "single_transformer_blocks"), cfg_layout="separate",
            cfg_scale_arg="true_cfg_scale", cfg_needs_negative_prompt=True, guidance_distilled=True,
            prediction="flow", latent_layout="video",
            unsupported_methods={
                "dbcache": _CACHE_DIT_OUTLIVES_DISABLE,
                "sparse_attention": "its attention processor always passes a text-padding mask, which sends "
                                    "every call to dense attention, so the method would do nothing",
            },
            extra={"self_attention": ("attn",), "joint_text": "suffix"},
        ),
        ModelAdapter(
            family="ltx_video", pipeline_classes=("LTXPipeline",), prediction="flow",
            latent_layout="packed_video",
            extra={"resolution_multiple": 32, "self_attention": ("attn1",)},  # 32: LTXPipeline.check_inputs
        ),
        ModelAdapter(
            # QwenImagePipeline.__call__: true CFG as two passes in cache_context("cond"/"uncond") when
            # true_cfg_scale > 1 and a negative prompt is given; flow velocity; timestep / 1000; 2x2-packed latents.
            family="qwen_image", pipeline_classes=("QwenImagePipeline", "QwenImageImg2ImgPipeline"),
            cfg_layout="separate", cfg_scale_arg="true_cfg_scale", cfg_needs_negative_prompt=True,
            prediction="flow", timestep_scale=1000.0, latent_layout="packed_image",
            unsupported_methods={"bottleneck": "QwenImage unpacks latents to [B, C, 1, H, W] (a frame axis), which "
                                               "diffusion_accel.latents.pack does not take back"},
            extra={"self_attention": ("attn",), "joint_text": "prefix"},
        ),
        ModelAdapter(
            # Flux2Pipeline.__call__: one forward per step with the guidance scale embedded (guidance-distilled, no
            # unconditional pass); flow velocity; timestep / 1000; latents packed to [B, H·W, C] tokens. Its
            # single-stream blocks take text and image concatenated while the dual-stream blocks keep them apart,
            # so no cached range may span both: methods work on the single-stream blocks (48 of 56 in Flux 2 dev).
            family="flux2", pipeline_classes=("Flux2Pipeline",), block_lists=("single_transformer_blocks",),
            cfg_layout="none",
            guidance_distilled=True, prediction="flow", timestep_scale=1000.0, latent_layout="packed_image",
            unsupported_methods={
                "bottleneck": "Flux 2 packs latents with position ids (_unpack_latents_with_ids), not Flux's 2x2 "
                              "patches that diffusion_accel.latents unpacks",
                "fbcache": "Diffusers 0.42.1's FirstBlockCache subtracts its dual-stream head block's output pair "
                           "from the single-stream tail's one tensor (TypeError)",
                "dbcache": _CACHE_DIT_OUTLIVES_DISABLE,
            },
            extra={"self_attention": ("attn",), "joint_text": "prefix"},
        ),
        ModelAdapter(
            # SanaPipeline.__call__: batched CFG on torch.cat([latents] * 2), uncond first; flow velocity
            # (FlowMatchEuler or DPM-Solver with flow_prediction); timestep * transformer.config.timestep_scale
            # (1.0 in the released models). Self-attention is ReLU linear attention, so no self_attention entry:
            # block-sparse softmax attention does not apply.
            family="sana", pipeline_classes=("SanaPipeline",), prediction="flow",
            extra={"resolution_multiple": 32},  # 32: SanaPipeline.check_inputs
        ),
        ModelAdapter(
            # CogView4Pipeline.__call__: CFG as two passes in cache_context("cond"/"uncond") when guidance_scale > 1
            # (an empty negative prompt by default); flow velocity; the raw timestep; [B, C, H, W] latents
            # patchified inside the transformer; text tokens are a separate stream of each block.
            family="cogview4", pipeline_classes=("CogView4Pipeline",), cfg_layout="separate", prediction="flow",
            extra={"self_attention": ("attn1",), "joint_text": "prefix"},  # CogView4AttnProcessor: cat([text, image])
        ),
        ModelAdapter(
            # MochiPipeline.__call__: batched CFG on torch.cat([latents] * 2) in cache_context("cond_uncond"), uncond
            # first; flow velocity on a scheduler with invert_sigmas=True; the raw timestep; [B, C, F, H, W].
            family="mochi", pipeline_classes=("MochiPipeline",), prediction="flow", latent_layout="video",
            unsupported_methods={
                "adaptive_guidance": _INVERTED_SIGMAS, "linear_ag": _INVERTED_SIGMAS, "bottleneck": _INVERTED_SIGMAS,
            },
            extra={"self_attention": ("attn1",), "joint_text": "suffix"},
        ),
        ModelAdapter(
            # HunyuanVideo15Pipeline.__call__: CFG is the pipeline's `guider` component (ClassifierFreeGuidance),
            # not a call argument; it runs one forward per guider batch in cache_context("pred_cond"/"pred_uncond").
            # Flow velocity; the raw timestep; [B, C, F, H, W] latents (plus condition channels) and joint attention
            # with the text after the video tokens.
            family="hunyuan_video15", pipeline_classes=("HunyuanVideo15Pipeline",), cfg_layout="separate",
            prediction="flow", latent_layout="video",
            unsupported_methods={
                "adaptive_guidance": _GUIDER_PASSES, "linear_ag": _GUIDER_PASSES,
                "cfg_cutoff": _GUIDER_PASSES,
                "sparse_attention": "its attention processor always passes a text-padding mask, which sends every "
                                    "call to dense attention, so the method would do nothing",
            },
            extra={"self_attention": ("attn",), "joint_text": "suffix"},
        ),
        ModelAdapter(
            # OvisImagePipeline.__call__: CFG as two passes in cache_context("cond"/"uncond") when guidance_scale > 1
            # (an empty negative prompt by default); flow velocity; timestep / 1000; Flux's 2x2-packed latents and
            # Flux-style dual- then single-stream blocks that both take text and image as separate streams.
            family="ovis_image", pipeline_classes=("OvisImagePipeline",),
            block_lists=("transformer_blocks", "single_transformer_blocks"), cfg_layout="separate",
            prediction="flow", timestep_scale=1000.0, latent_layout="packed_image",
            unsupported_methods={"dbcache": _CACHE_DIT_OUTLIVES_DISABLE},
            extra={"self_attention": ("attn",), "joint_text": "prefix"},
        ),
        ModelAdapter(
            # LTX2Pipeline.__call__: batched CFG on torch.cat([latents] * 2) with the negative prompt first, in
            # cache_context("cond_uncond"), when guidance_scale > 1 or audio_guidance_scale > 1; then, per step, a
            # cond-only spatio-temporal-guidance pass ("uncond_stg", stg_scale > 0) and a modality-isolation pass
            # ("uncond_modality", modality_scale > 1). Flow velocity (the pipeline guides in x0 and converts back);
            # the raw timestep; video latents packed to [B, F·H·W, C]. Every block updates video and audio tokens
            # (both returned); methods hook those blocks, with the audio as the second stream.
            family="ltx2", pipeline_classes=("LTX2Pipeline",), prediction="flow", latent_layout="packed_video",
            unsupported_methods={
                "pab": _LTX2_PAB,
                "adaptive_guidance": _LTX2_TWO_OUTPUTS, "linear_ag": _LTX2_TWO_OUTPUTS, "cfg_cutoff": _LTX2_TWO_OUTPUTS,
                "fbcache": "Diffusers 0.42.1's FirstBlockCache reads a block's second stream from its "
                           "encoder_hidden_states argument by name, so on a skipped step it hands the text embeddings "
                           "on as LTX-2's audio tokens (RuntimeError in audio_norm_out)",
                "magcache": "Diffusers 0.42.1's MagCache reads a block's second stream from its encoder_hidden_states "
                            "argument by name, so on a skipped step it hands the text embeddings on as LTX-2's audio "
                            "tokens (RuntimeError in audio_norm_out)",
                "bottleneck": "LTX2Pipeline steps the audio latents with a copy of the scheduler made inside the call, "
                              "which the per-stage schedules do not reach (IndexError in the audio scheduler's step), "
                              "and the audio latents are not carried from stage to stage",
                "dbcache": "cache-dit 1.5.3's patched transformer forward does not take the sigma argument "
                           "LTX2Pipeline passes (TypeError)",
            },
            extra={"resolution_multiple": 32, "self_attention": ("attn1",)},  # 32: LTX2Pipeline.check_inputs
        ),
        ModelAdapter(
            # ZImagePipeline.__call__: batched CFG on latents.repeat(2) with the prompt first, whenever
            # guidance_scale > 0 (its guidance is c + s·(c − u)), and cond-only steps past cfg_truncation. The
            # transformer takes per-sample lists (latents [C, 1, H, W], captions of their own lengths) and the
            # timestep as `t` = (1000 − timestep) / 1000, and returns a per-sample list of the negated flow velocity
            # (the pipeline negates it). Its main blocks (`layers`) run on [image, text] tokens; the refiners before
            # them see the image or the text alone.
            # ZImageImg2ImgPipeline runs the same loop; the inpainting pipeline is left out: bottleneck's low-resolution
            # stages do not resize its full-resolution mask (RuntimeError), and an adapter cannot refuse per class.
            # TaylorSeer is not refused: its default identifiers (`attn*`) miss the `attention` modules, its error says
            # so, and with cache_identifiers=[r"^layers\.\d+\.attention$"] it runs (tests/engine/test_families.py).
            family="z_image", pipeline_classes=("ZImagePipeline", "ZImageImg2ImgPipeline"), block_lists=("layers",),
            cfg_scale_threshold=0.0, uncond_first=False, prediction="flow", timestep_argument="t",
            timestep_scale=-1000.0, timestep_offset=1000.0, output_sign=-1.0, per_sample_lists=("x", "cap_feats"),
            repeated_blocks=("ZImageTransformerBlock",),
            unsupported_methods={
                "fbcache": "Diffusers 0.42.1's FirstBlockCache reads every block's input by the literal name "
                           "hidden_states, not the registry's argument name, and Z-Image's blocks take it as x "
                           "(KeyError in _get_parameter_from_args_kwargs); magcache reads the registry and applies",
                "sparse_attention": "the method finds the image-token grid from a [B, C, H, W] latent and the "
                                    "transformer's config.patch_size, while Z-Image's latents come as [C, 1, H, W] per "
                                    "sample and its patch size is config.all_patch_size, so no grid is found and "
                                    "every attention call would stay dense: the method would do nothing",
            },
            extra={"self_attention": ("attention",), "joint_text": "suffix",
                   "resolution_multiple": 16},  # 16: ZImagePipeline checks height % (vae_scale_factor · 2)
        ),
        ModelAdapter(
            family="sd", denoiser="unet", block_lists=(),
            pipeline_classes=("StableDiffusionPipeline", "StableDiffusionXLPipeline",
                              "StableDiffusionImg2ImgPipeline", "StableDiffusionXLImg2ImgPipeline"),
        ),
    ]


def _register_block_classes() -> None:
    """Tell Diffusers' ``TransformerBlockRegistry`` (read by its block caches and ours) where the blocks of our
    families that Diffusers 0.42 leaves out return their hidden states."""
    import importlib

    from ..diffusers_internals import register_block_class

    for module, name, hidden_index, encoder_index, *arguments in _UNREGISTERED_BLOCKS:
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):  # an older Diffusers without this family
            continue
        register_block_class(cls, hidden_index, encoder_index, *arguments)


#: (module, class, index of hidden_states in its return, index of encoder_hidden_states or None when it returns
#: hidden_states alone[, the forward argument of that second stream when it is not encoder_hidden_states[, the
#: forward argument of the hidden states when it is not hidden_states]]) of block classes Diffusers 0.42.1's
#: TransformerBlockRegistry lacks or registers with argument names their forward does not have, read off each forward.
_UNREGISTERED_BLOCKS: tuple[tuple[Any, ...], ...] = (
    ("diffusers.models.transformers.sana_transformer", "SanaTransformerBlock", 0, None),
    ("diffusers.models.transformers.transformer_hunyuan_video15", "HunyuanVideo15TransformerBlock", 0, 1),
    ("diffusers.models.transformers.transformer_ovis_image", "OvisImageTransformerBlock", 1, 0),
    ("diffusers.models.transformers.transformer_ovis_image", "OvisImageSingleTransformerBlock", 1, 0),
    # LTX-2: each block updates the video and the audio tokens and returns both; the text is a cross-attention input.
    ("diffusers.models.transformers.transformer_ltx2", "LTX2VideoTransformerBlock", 0, 1, "audio_hidden_states"),
    # Z-Image: Diffusers registers it with `hidden_states`, but its forward takes the token sequence as `x`.
    ("diffusers.models.transformers.transformer_z_image", "ZImageTransformerBlock", 0, None, "encoder_hidden_states",
     "x"),
)

_register_block_classes()

_ADAPTERS: dict[str, ModelAdapter] = {a.family: a for a in _adapter_list()}


class families_where:  # noqa: N801  (used like a value: ``families = families_where(...)``)
    """A method's ``families``, derived from the adapters instead of listed by name.

    Read on the config class, it is the tuple of registered families whose adapter satisfies ``predicate`` and does
    not name the method in ``unsupported_methods``, so a newly registered family gets every method its facts allow.
    """

    def __init__(self, predicate: Callable[[ModelAdapter], bool], description: str = "") -> None:
        self.predicate = predicate
        self.description = description

    def __get__(self, instance: Any, owner: type | None = None) -> tuple[str, ...]:
        method = getattr(owner if owner is not None else type(instance), "name", "")
        return tuple(a.family for a in _ADAPTERS.values()
                     if self.predicate(a) and method not in a.unsupported_methods)


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
        # One pipeline class can hold several layouts (WanPipeline with or without a second expert): the adapter
        # whose experts are all present and most numerous wins.
        matches = [a for a in _ADAPTERS.values() if name in a.pipeline_classes
                   and all(getattr(pipe, e, None) is not None for e in a.experts)
                   and (not a.denoiser_classes or _denoiser_class(pipe, a) in a.denoiser_classes)]
        if matches:
            return max(matches, key=lambda a: (bool(a.denoiser_classes), len(a.experts)))
    supported = ", ".join(f"{a.family} ({'/'.join(a.pipeline_classes[:2])})" for a in _ADAPTERS.values())
    raise ValueError(
        f"No diffusion-accel adapter for {type(pipe).__name__}. Supported families: {supported}. "
        f"To add one, register a ModelAdapter (about 30 lines): see {README_ADDING_A_MODEL}."
    )


def _denoiser_class(pipe: Any, adapter: ModelAdapter) -> str | None:
    if getattr(pipe, adapter.denoiser, None) is None:
        return None
    return type(adapter.get_denoiser(pipe)).__name__
