"""Architectures of the testbed: the trained ("quality") tier and the random-weight "speed" and "full-width" tiers.

Every tier uses the real Diffusers classes (``PixArtAlphaPipeline`` / ``PixArtTransformer2DModel`` and
``FluxPipeline`` / ``FluxTransformer2DModel``). The quality tier is small enough to train on a CPU; the speed tier
keeps the architecture and widens / deepens it (random weights) so that one transformer forward costs what a
benchmark of caching or sparsity needs to see (>= 100 ms on a 2-core CPU). The full-width tier has the published
model's block width (PixArt-α: 1152 = 16 heads x 72; FLUX.1: 3072 = 24 x 128) at a depth a CPU can time: where
the ratio of GEMM work to per-token elementwise work (norms, modulation, gates) is the real model's, which a
wall-vs-MACs comparison depends on.
"""

from __future__ import annotations

from typing import Any

import torch

from ..contract import with_sampler_contract
from .text import CLIP_DIM, T5_DIM, build_clip, build_t5

LATENT_CHANNELS = 4
LATENT_SIZE = 16  # 64x64 images → 16x16x4 latents
VAE_DOWNSAMPLE = 4  # image side / latent side
TESTBED_NAMES: tuple[str, ...] = ("pixart", "flow")
#: How each testbed is sampled: its sampler contract, saved with the pipeline (``model_index.json``) so that a call
#: with only a prompt samples this way; every number reported for the testbed is measured with these settings.
SAMPLER_CONTRACTS: dict[str, dict[str, Any]] = {
    "pixart": {"num_inference_steps": 20, "guidance_scale": 4.5, "height": 64, "width": 64,
               "use_resolution_binning": False, "clean_caption": False},
    "flow": {"num_inference_steps": 28, "true_cfg_scale": 4.0, "negative_prompt": "", "height": 64, "width": 64},
}


# ------------------------------------------------------------------------------------------------ VAE
def vae_config() -> dict[str, Any]:
    """A 3-level ``AutoencoderKL`` (downsampling x4): 64x64x3 ↔ 16x16x4."""
    return dict(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(16, 32, 64),
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                layers_per_block=1, norm_num_groups=8, sample_size=64, act_fn="silu")


def build_vae(seed: int = 0, **overrides: Any):
    """A fresh ``AutoencoderKL`` with :func:`vae_config` (``overrides`` e.g. ``scaling_factor``)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**{**vae_config(), **overrides})


# ------------------------------------------------------------------------------------------------ PixArt
#: Tiers :func:`build_transformer` knows; ``load_pipeline("testbed:<name>", tier=...)`` takes the same names.
TIERS: tuple[str, ...] = ("quality", "speed", "full-width")


def latent_side(name: str, tier: str) -> int:
    """Latent height = width a tier is sampled at (PixArt, patch 2: 64 / 256 / 1024 tokens). FLUX.1's full-width
    block keeps the speed tier's 256 image tokens: on 1024 one 3072-wide step takes ~4.4 s on 2 cores."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")
    scale = {"quality": 1, "speed": 2, "full-width": 2 if name == "flow" else 4}[tier]
    return scale * LATENT_SIZE


def pixart_transformer_config(tier: str = "quality") -> dict[str, Any]:
    """``PixArtTransformer2DModel`` config; patch 2 on 16x16 latents = 64 tokens (speed: 32x32 → 256 tokens;
    full-width: PixArt-α's block (hidden 1152 = 16 heads x 72, cross-attention width 1152), 4 of its 28 blocks,
    on 64x64 latents → 1024 tokens, PixArt-α's token count at 512x512). The caption width stays the testbed T5's
    (PixArt-α's T5-XXL gives 4096): the caption projection runs once per forward, outside every block."""
    base = dict(in_channels=LATENT_CHANNELS, out_channels=2 * LATENT_CHANNELS, patch_size=2,
                caption_channels=T5_DIM, attention_bias=True, activation_fn="gelu-approximate",
                num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False,
                norm_eps=1e-6, norm_num_groups=32, use_additional_conditions=False)
    if tier == "quality":
        return {**base, "sample_size": latent_side("pixart", tier), "num_layers": 6, "num_attention_heads": 4,
                "attention_head_dim": 32, "cross_attention_dim": 128}
    if tier == "speed":
        return {**base, "sample_size": latent_side("pixart", tier), "num_layers": 14, "num_attention_heads": 6,
                "attention_head_dim": 64, "cross_attention_dim": 384}
    if tier == "full-width":
        return {**base, "sample_size": latent_side("pixart", tier), "num_layers": 4, "num_attention_heads": 16,
                "attention_head_dim": 72, "cross_attention_dim": 1152}
    raise ValueError(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")


def pixart_scheduler():
    """PixArt-α's sampler: DPM-Solver++(2M) on the linear-β DDPM schedule, ε-prediction."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                       beta_schedule="linear", prediction_type="epsilon", solver_order=2,
                                       algorithm_type="dpmsolver++")


def assemble_pixart(transformer, vae, seed: int = 0, sampler_contract: dict[str, Any] | None = None):
    """A ``PixArtAlphaPipeline`` (with the testbed's sampler contract, or ``sampler_contract``) around
    ``transformer`` and ``vae`` with the testbed T5."""
    from diffusers import PixArtAlphaPipeline

    text_encoder, tokenizer = build_t5(seed)
    return with_sampler_contract(PixArtAlphaPipeline)(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
        scheduler=pixart_scheduler(), sampler_contract=sampler_contract or SAMPLER_CONTRACTS["pixart"])


# ------------------------------------------------------------------------------------------------ Flux
def flux_transformer_config(tier: str = "quality") -> dict[str, Any]:
    """``FluxTransformer2DModel`` config (2x2-packed 16-channel tokens; dual- and single-stream blocks). Full-width:
    FLUX.1's block (hidden 3072 = 24 heads x 128, RoPE axes 16/56/56), 1 of its 19 dual- and 2 of its 38
    single-stream blocks, on the speed tier's 256 image + 32 text tokens (one CFG step ≈ 1.6 s on 2 cores)."""
    base = dict(patch_size=1, in_channels=4 * LATENT_CHANNELS, out_channels=None, joint_attention_dim=T5_DIM,
                pooled_projection_dim=CLIP_DIM, guidance_embeds=False)
    if tier == "quality":
        return {**base, "num_layers": 2, "num_single_layers": 4, "attention_head_dim": 32,
                "num_attention_heads": 4, "axes_dims_rope": (8, 12, 12)}
    if tier == "speed":
        return {**base, "num_layers": 4, "num_single_layers": 10, "attention_head_dim": 64,
                "num_attention_heads": 6, "axes_dims_rope": (16, 24, 24)}
    if tier == "full-width":
        return {**base, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 128,
                "num_attention_heads": 24, "axes_dims_rope": (16, 56, 56)}
    raise ValueError(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")


def flow_scheduler():
    """Flow-matching Euler; the shift is fixed (no resolution-dependent shifting at 64x64)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def assemble_flux(transformer, vae, seed: int = 0, sampler_contract: dict[str, Any] | None = None):
    """A ``FluxPipeline`` (with the testbed's sampler contract, or ``sampler_contract``) around ``transformer`` and
    ``vae`` with the testbed CLIP and T5."""
    from diffusers import FluxPipeline

    text_encoder, tokenizer = build_clip(seed)
    text_encoder_2, tokenizer_2 = build_t5(seed + 1)
    return with_sampler_contract(FluxPipeline)(
        scheduler=flow_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
        sampler_contract=sampler_contract or SAMPLER_CONTRACTS["flow"])


# ------------------------------------------------------------------------------------------------ tiers
def build_transformer(name: str, tier: str = "quality", seed: int = 0):
    """A randomly initialised transformer of testbed ``name`` and ``tier``."""
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel

    torch.manual_seed(seed)
    if name == "pixart":
        return PixArtTransformer2DModel(**pixart_transformer_config(tier))
    if name == "flow":
        return FluxTransformer2DModel(**flux_transformer_config(tier))
    raise ValueError(f"unknown testbed {name!r}; choose one of {', '.join(TESTBED_NAMES)}")


def build_speed_pipeline(name: str, seed: int = 0, tier: str = "speed"):
    """The compute-realistic presets: the testbed's architecture at ``tier`` size, random weights.

    ``speed``: PixArt 14 blocks, hidden 384, 256 image tokens at 128x128 (its default size); Flux 4 dual + 10
    single blocks, hidden 384, 256 image tokens at 128x128 plus 32 text tokens (:func:`speed_call_kwargs`); Wan: see
    :func:`.wan.build_speed_pipeline` (17 160 video tokens). ``full-width``: the published block width at a
    truncated depth (:func:`pixart_transformer_config`, :func:`flux_transformer_config`; PixArt at 256x256 → 1024
    tokens); image testbeds only.
    """
    if tier not in TIERS[1:]:
        raise ValueError(f"unknown random-weight tier {tier!r}; choose one of {', '.join(TIERS[1:])}")
    if name == "wan":
        if tier != "speed":
            raise ValueError(f"testbed:wan has no {tier!r} tier (its speed tier is already Wan 2.1's 480p token "
                             "count); use tier='speed'")
        from .wan import build_speed_pipeline as build_wan_speed_pipeline

        return build_wan_speed_pipeline(seed)
    transformer = build_transformer(name, tier, seed).eval()
    vae = build_vae(seed, shift_factor=0.0).eval()  # FluxPipeline needs a shift factor; PixArt ignores it
    contract = {**SAMPLER_CONTRACTS[name], **speed_call_kwargs(name, tier)}
    assemble = assemble_pixart if name == "pixart" else assemble_flux
    return assemble(transformer, vae, seed, sampler_contract=contract)


def speed_call_kwargs(name: str, tier: str = "speed") -> dict[str, Any]:
    """Call arguments that give a random-weight tier its intended token count."""
    if name == "wan":
        from .wan import speed_call_kwargs as wan_speed_call_kwargs

        return wan_speed_call_kwargs()
    side = VAE_DOWNSAMPLE * latent_side(name, tier)
    if name == "pixart":
        return {"height": side, "width": side, "use_resolution_binning": False, "clean_caption": False}
    # 256 image tokens + 32 text tokens: FLUX.1's 8:1 image:text token ratio at 1024x1024 (4096 + 512). With the
    # default 512 text tokens the text would dominate and hide what resolution-changing methods save.
    return {"height": side, "width": side, "max_sequence_length": 32}


@torch.no_grad()
def measure_forward_seconds(name: str, tier: str = "speed", batch: int = 2, repeats: int = 3, seed: int = 0) -> float:
    """Median wall time of one transformer forward (``batch`` 2 = one CFG step) at the tier's default size."""
    import time

    from diffusers import FluxPipeline

    from ...diffusers_internals import prepare_latent_image_ids

    transformer = build_transformer(name, tier, seed).eval()
    side = latent_side(name, tier)
    gen = torch.Generator().manual_seed(seed)
    if name == "pixart":
        cfg = transformer.config
        args = dict(hidden_states=torch.randn(batch, LATENT_CHANNELS, side, side, generator=gen),
                    encoder_hidden_states=torch.randn(batch, 120, cfg.caption_channels, generator=gen),
                    encoder_attention_mask=torch.ones(batch, 120), timestep=torch.full((batch,), 500),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    else:
        cfg = transformer.config
        tokens = (side // 2) ** 2
        args = dict(hidden_states=torch.randn(batch, tokens, cfg.in_channels, generator=gen),
                    encoder_hidden_states=torch.randn(batch, 32, cfg.joint_attention_dim, generator=gen),
                    pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=gen),
                    timestep=torch.full((batch,), 0.5), txt_ids=torch.zeros(32, 3),
                    img_ids=prepare_latent_image_ids(FluxPipeline, batch, side // 2, side // 2, "cpu",
                                                            torch.float32))
    transformer(**args)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        transformer(**args)
        times.append(time.perf_counter() - start)
    return float(sorted(times)[len(times) // 2])
