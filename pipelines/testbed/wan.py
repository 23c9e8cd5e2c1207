"""Architecture of the video testbed ``testbed:wan``: a tiny ``WanPipeline`` (trained tier) and its speed tier.

Everything is a real Diffusers / Transformers class, so a method that works on this pipeline runs the code paths
of Wan 2.1: ``AutoencoderKLWan`` (causal 3D VAE, 8x spatial and 4x temporal compression, per-channel
``latents_mean`` / ``latents_std`` in its config), ``WanTransformer3DModel`` (patch (1, 2, 2), 3D RoPE, cross
attention to the text), a frozen ``UMT5EncoderModel`` and the flow-matching Euler scheduler.

Sizes: 9 frames of 64x64 → 3 x 8 x 8 latents → 48 tokens per clip, small enough to learn on a CPU (the 4x VAE's
3 x 16 x 16 latents: 192 tokens). The speed tier
keeps the classes, widens the transformer and samples Wan's own 480x832 at 41 frames (11 x 60 x 104 latents → 17 160
tokens, :func:`speed_call_kwargs`), with random weights: the token count where block-sparse attention pays.
"""

from __future__ import annotations

from typing import Any

import torch

from ..contract import with_sampler_contract
from .text import window_relative_attention
from .video_data import NUM_FRAMES, vocabulary

Z_DIM = 8
UMT5_DIM = 32
UMT5_MAX_LENGTH = 32
#: The sampler contract: how ``testbed:wan`` is sampled when called with only a prompt; every reported number uses
#: it. ``max_sequence_length`` 32 covers every caption (WanPipeline pads the rest with zeros, which cross-attention
#: then sees as 32 identical keys instead of 512).
SAMPLER_CONTRACT: dict[str, Any] = {"num_inference_steps": 25, "guidance_scale": 4.0, "height": 64, "width": 64,
                                    "num_frames": NUM_FRAMES, "negative_prompt": "",
                                    "max_sequence_length": UMT5_MAX_LENGTH}


# ------------------------------------------------------------------------------------------------ text
def umt5_tokenizer():
    """Unigram ``T5Tokenizer`` over the video captions' words (UMT5 uses the same SentencePiece tokenizer class)."""
    from ..tokenizers import build_t5_tokenizer

    return build_t5_tokenizer(vocabulary(), model_max_length=UMT5_MAX_LENGTH)


def build_umt5(seed: int = 0, d_model: int = UMT5_DIM, num_layers: int = 2):
    """A frozen random ``UMT5EncoderModel``, made as the image testbed's T5 (:func:`.text.build_t5`): N(0, 1) token
    embeddings and relative-position buckets outside ``±T5_WINDOW`` blocked, here in *every* layer (UMT5 gives each
    layer its own bias). Each output row then mixes a word with its close neighbours, so "red circle moving left"
    and "red square moving left" differ where they should and colour, shape and direction stay separable."""
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = umt5_tokenizer()
    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=len(tokenizer), d_model=d_model, d_ff=2 * d_model, d_kv=d_model // 4,
                        num_layers=num_layers, num_heads=4, relative_attention_num_buckets=32,
                        relative_attention_max_distance=128, decoder_start_token_id=0, pad_token_id=0,
                        eos_token_id=1, feed_forward_proj="relu", dropout_rate=0.0)
    model = UMT5EncoderModel(config)
    with torch.no_grad():
        model.shared.weight.normal_(0.0, 1.0)
        for block in model.encoder.block:
            window_relative_attention(block.layer[0].SelfAttention.relative_attention_bias.weight,
                                      config.relative_attention_num_buckets)
    return model.eval().requires_grad_(False), tokenizer


# ------------------------------------------------------------------------------------------------ VAE
def vae_config(spatial_compression: int = 8, z_dim: int = Z_DIM) -> dict[str, Any]:
    """A 4-level ``AutoencoderKLWan``: 9x64x64x3 ↔ 3x8x8x8 (``Z_DIM`` channels), the real 8x / 4x compression, at
    base width 8 (0.18 M parameters, 0.7 MB: the shipped assets must stay small).
    ``latents_mean`` / ``latents_std`` start at 0 / 1 (``z_dim`` entries); training replaces them with the measured
    statistics. ``z_dim``: latent channels (``scripts/wan_vae_variants.py`` tries 16 at 8x and 4 at 4x).

    ``spatial_compression=4``: one spatial downsampling fewer (3 levels, 9x64x64x3 ↔ 3x16x16x8, 0.17 M parameters;
    ``scale_factor_spatial`` tells ``WanPipeline``; 192 transformer tokens, :func:`transformer_config`). At 8x a
    14-20 px shape covers 2x2 latents and every 8x VAE trained so far (GPU, CPU, decoder fine-tune, narrow
    posterior) draws it round; at 4x
    corners start to appear within the same CPU budget (README, "The video testbed")."""
    if spatial_compression not in (4, 8):
        raise ValueError(f"spatial_compression must be 4 or 8, got {spatial_compression}")
    levels = dict(dim_mult=[1, 1, 2, 2], temperal_downsample=[False, True, True]) if spatial_compression == 8 else \
        dict(dim_mult=[1, 2, 2], temperal_downsample=[True, True], scale_factor_spatial=4)
    return dict(base_dim=8, z_dim=z_dim, num_res_blocks=1, attn_scales=[], latents_mean=[0.0] * z_dim,
                latents_std=[1.0] * z_dim, **levels)


def build_vae(seed: int = 0, spatial_compression: int = 8, z_dim: int = Z_DIM, **overrides: Any):
    """A fresh ``AutoencoderKLWan`` with :func:`vae_config`, ``overrides`` replacing its keys (e.g.
    ``decoder_base_dim``)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(**{**vae_config(spatial_compression, z_dim), **overrides})


# ------------------------------------------------------------------------------------------------ transformer
def transformer_config(tier: str = "quality", latent_channels: int = Z_DIM) -> dict[str, Any]:
    """``WanTransformer3DModel`` config. Quality: hidden 64 (4 heads x 16), 4 blocks (0.29 M parameters, 1.1 MB:
    small enough to ship and to train on a CPU). Speed: hidden 384 (6 x 64), 8 blocks: the compute of a real
    attention-bound video step at 16k+ tokens.

    The patch is Wan 2.1's (1, 2, 2) on either VAE: 48 tokens on the 8x VAE's latents, 192 on the 4x VAE's. A
    (1, 4, 4) patch would keep 48 tokens on the 4x latents, but its embedding maps each token's 4 x 4 x 8 = 128
    inputs to the 64 hidden channels, so half of every noisy token is invisible to the model and its noise cannot be
    predicted: measured on a CPU run, the flow loss stalled at 0.65 after 7 000 steps of batch 64 (the (1, 2, 2)
    runs on 8x latents: 0.15 by 5 000) and the caption gain at 0.01 (0.13).

    ``latent_channels``: the VAE's ``z_dim`` (a candidate VAE with more channels, ``scripts/wan_vae_variants.py``)."""
    base = dict(patch_size=(1, 2, 2), in_channels=latent_channels, out_channels=latent_channels, text_dim=UMT5_DIM,
                freq_dim=64, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
    if tier == "quality":
        return {**base, "num_attention_heads": 4, "attention_head_dim": 16, "ffn_dim": 192, "num_layers": 4,
                "rope_max_seq_len": 64}
    if tier == "speed":
        return {**base, "num_attention_heads": 6, "attention_head_dim": 64, "ffn_dim": 1024, "num_layers": 8,
                "rope_max_seq_len": 1024}
    raise ValueError(f"unknown tier {tier!r}")


def build_transformer(tier: str = "quality", seed: int = 0, latent_channels: int = Z_DIM):
    """A randomly initialised ``WanTransformer3DModel`` of ``tier`` for latents of ``latent_channels``."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**transformer_config(tier, latent_channels))


def scheduler():
    """Flow-matching Euler with a fixed shift (Wan's own default sampler family; shift 3 for small clips, as Wan
    recommends for 480p, spends more steps at high noise where the layout and motion are decided)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def assemble(transformer, vae, seed: int = 0, sampler_contract: dict[str, Any] | None = None):
    """A ``WanPipeline`` (with the testbed's sampler contract, or ``sampler_contract``) around ``transformer`` and
    ``vae`` with the testbed UMT5."""
    from diffusers import WanPipeline

    text_encoder, tokenizer = build_umt5(seed)
    return with_sampler_contract(WanPipeline)(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler(),
        sampler_contract=sampler_contract or SAMPLER_CONTRACT)


# ------------------------------------------------------------------------------------------------ speed tier
def speed_call_kwargs() -> dict[str, Any]:
    """Wan 2.1's 480p frame (480x832) at 41 frames: 11 x 60 x 104 latents → 17 160 tokens (:func:`latent_tokens`)."""
    return {"height": 480, "width": 832, "num_frames": 41, "max_sequence_length": UMT5_MAX_LENGTH}


def latent_tokens(height: int, width: int, num_frames: int, patch: tuple[int, int, int] = (1, 2, 2)) -> int:
    """Transformer tokens of one clip: ``(1 + (T - 1) / 4) * (H / 8) * (W / 8)`` latents, divided by the patch."""
    if (num_frames - 1) % 4:
        raise ValueError(f"num_frames must be 4k + 1 for Wan, got {num_frames}")
    frames = 1 + (num_frames - 1) // 4
    return (frames // patch[0]) * (height // 8 // patch[1]) * (width // 8 // patch[2])


def build_speed_pipeline(seed: int = 0):
    """The compute-realistic preset: the same classes at speed-tier size, random weights (VAE and text encoder are
    the quality tier's architecture, untrained; only the transformer's cost matters for a speed benchmark)."""
    contract = {**SAMPLER_CONTRACT, **speed_call_kwargs()}
    return assemble(build_transformer("speed", seed).eval(), build_vae(seed).eval(), seed, sampler_contract=contract)
