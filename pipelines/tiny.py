"""Tiny random pipelines of every supported family, built offline from configs.

Each builder returns the family's *real* Diffusers pipeline class (``PixArtAlphaPipeline``, ``FluxPipeline``,
``WanPipeline``, ...) with tiny random components and tokenizers built in code, so tests exercise exactly the code
path a user's ``from_pretrained`` pipeline takes, with no network. Sizes follow Diffusers' own dummy components.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .tokenizers import (
    build_chat_llama_tokenizer,
    build_clip_tokenizer,
    build_gemma_tokenizer,
    build_llama_tokenizer,
    build_qwen2_tokenizer,
    build_t5_tokenizer,
)

_TEXT_DIM = 32


def _t5(seed: int):
    from transformers import T5Config, T5EncoderModel

    tokenizer = build_t5_tokenizer()
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=_TEXT_DIM, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval(), tokenizer


def _umt5(seed: int):
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_t5_tokenizer()
    torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=len(tokenizer), d_model=_TEXT_DIM, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config).eval(), tokenizer


def _clip(seed: int, with_projection: bool = False, hidden: int = _TEXT_DIM):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, projection_dim=hidden, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
        pad_token_id=1, hidden_act="gelu",
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval(), tokenizer


def _vae_2d(seed: int, latent_channels: int = 4, **kw: Any):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=32, **kw,
    ).eval()


def _dit(seed: int):
    from diffusers import DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        sample_size=8, num_layers=4, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, norm_num_groups=8, num_embeds_ada_norm=1000,
    )
    scheduler = DPMSolverMultistepScheduler()
    return DiTPipeline(transformer=transformer.eval(), vae=_vae_2d(seed), scheduler=scheduler,
                       id2label={0: "cat", 1: "dog", 2: "horse", 3: "astronaut"})


def _pixart(seed: int, sigma: bool):
    from diffusers import (
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=4, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=_TEXT_DIM, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    )
    text_encoder, tokenizer = _t5(seed)
    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    return cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=_vae_2d(seed), transformer=transformer.eval(),
               scheduler=DPMSolverMultistepScheduler())


def _sd3(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    )
    text_encoder, tokenizer = _clip(seed, with_projection=True)
    text_encoder_2, tokenizer_2 = _clip(seed + 1, with_projection=True)
    text_encoder_3, tokenizer_3 = _t5(seed)
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae_2d(seed, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )


def _flux(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=_TEXT_DIM, pooled_projection_dim=_TEXT_DIM,
        axes_dims_rope=(4, 6, 6),
    )
    text_encoder, tokenizer = _clip(seed)
    text_encoder_2, tokenizer_2 = _t5(seed)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae_2d(seed, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        transformer=transformer.eval(),
    )


def _bfm(seed: int):
    """The tiny Flux pipeline with a Blockwise Flow Matching transformer: 2 segments (2 of the 4 tiny steps each),
    a feature alignment network and its feature residual network (so FRA runs in every call)."""
    from ..pipelines.bfm import BlockwiseFlowTransformer

    pipe = _flux(seed)
    torch.manual_seed(seed)
    pipe.transformer = BlockwiseFlowTransformer(
        in_channels=16, num_segments=2, segment_layers=1, alignment_layers=1, alignment_single_layers=1,
        frn_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=_TEXT_DIM,
        pooled_projection_dim=_TEXT_DIM, axes_dims_rope=(4, 6, 6), feature_dim=8, projector_dim=16).eval()
    pipe.register_modules(transformer=pipe.transformer)
    return pipe


def _cogvideox(seed: int):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=_TEXT_DIM, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=16,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    text_encoder, tokenizer = _t5(seed)
    return CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae.eval(),
                             transformer=transformer.eval(), scheduler=CogVideoXDDIMScheduler())


def _wan_transformer(seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=_TEXT_DIM, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()


def _wan(seed: int, two_experts: bool = False):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    text_encoder, tokenizer = _umt5(seed)
    # Wan 2.2 A14B's boundary 0.875: with 4 steps (t = 1000, 934, 781, 47) the high-noise expert runs steps 0-1 and
    # the low-noise expert steps 2-3, so both experts run in every test call.
    extra = {"transformer_2": _wan_transformer(seed + 1), "boundary_ratio": 0.875} if two_experts else {}
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=_wan_transformer(seed),
                       vae=vae.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), **extra)


def _hunyuan_video(seed: int):
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4, up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, act_fn="silu", norm_num_groups=4,
        scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )
    tokenizer = build_llama_tokenizer()
    torch.manual_seed(seed)
    text_encoder = LlamaModel(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )).eval()
    text_encoder_2, tokenizer_2 = _clip(seed, hidden=8)
    return HunyuanVideoPipeline(
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer.eval(), vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
    )


def _ltx_video(seed: int):
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    torch.manual_seed(seed)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4, attention_head_dim=8,
        cross_attention_dim=32, num_layers=2, caption_channels=_TEXT_DIM,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False), upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1), timestep_conditioning=False, patch_size=1, patch_size_t=1,
        encoder_causal=True, decoder_causal=False,
    )
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    text_encoder, tokenizer = _t5(seed)
    return LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=text_encoder,
                       tokenizer=tokenizer, transformer=transformer.eval())


def _qwen25_vl(seed: int, hidden: int = 16):
    """A tiny Qwen2.5-VL (text and vision towers) and its tokenizer, as QwenImage and HunyuanVideo 1.5 load them."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = build_qwen2_tokenizer()
    torch.manual_seed(seed)
    special = {"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": hidden, "intermediate_size": 16, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": len(tokenizer),
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                     "rope_theta": 1000000.0, **special},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": hidden},
        hidden_size=hidden, vocab_size=len(tokenizer), vision_start_token_id=len(tokenizer) - 3,
        vision_end_token_id=len(tokenizer) - 2, vision_token_id=len(tokenizer) - 1, **special,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval(), tokenizer


def _qwen_image(seed: int):
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    text_encoder, tokenizer = _qwen25_vl(seed)
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=text_encoder,
                             tokenizer=tokenizer, transformer=transformer.eval())


def _flux2(seed: int):
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
    )
    tokenizer = build_chat_llama_tokenizer()
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    # One text layer: the call's text_encoder_out_layers=(1,) stacks its output as the 16-wide prompt embedding.
    config = Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": len(tokenizer), "hidden_size": 16,
                     "intermediate_size": 37, "max_position_embeddings": 512, "num_attention_heads": 4,
                     "num_hidden_layers": 1, "num_key_value_heads": 2, "rms_norm_eps": 1e-05,
                     "rope_theta": 1000000000.0, "sliding_window": None, **ids},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 4,
                       "intermediate_size": 37, "image_size": 30, "patch_size": 6, "num_channels": 3},
        image_seq_length=4, vision_feature_layer=-1, image_token_index=len(tokenizer) - 1, **ids,
    )
    torch.manual_seed(seed)
    text_encoder = Mistral3ForConditionalGeneration(config).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), layers_per_block=1, latent_channels=1,
        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
    )
    return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=text_encoder,
                         tokenizer=tokenizer, transformer=transformer.eval())


def _gemma2(seed: int, hidden: int = 8):
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = build_gemma_tokenizer()
    torch.manual_seed(seed)
    config = Gemma2Config(
        head_dim=16, hidden_size=hidden, intermediate_size=64, max_position_embeddings=8192, num_attention_heads=2,
        num_hidden_layers=1, num_key_value_heads=2, vocab_size=len(tokenizer), attn_implementation="eager",
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return Gemma2Model(config).eval(), tokenizer


def _sana(seed: int):
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=32,
    )
    torch.manual_seed(seed)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=[1, 1], downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    text_encoder, tokenizer = _gemma2(seed)
    return SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae.eval(), transformer=transformer.eval(),
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))


def _cogview4(seed: int):
    from diffusers import AutoencoderKL, CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmForCausalLM

    torch.manual_seed(seed)
    transformer = CogView4Transformer2DModel(
        patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=4, out_channels=4,
        text_embed_dim=32, time_embed_dim=8, condition_dim=4,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32,
    )
    # The released scheduler config: dynamic linear time shift around 256 image tokens.
    scheduler = FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                                use_dynamic_shifting=True, time_shift_type="linear")
    tokenizer = build_llama_tokenizer(add_bos=True)
    torch.manual_seed(seed)
    text_encoder = GlmForCausalLM(GlmConfig(
        hidden_size=32, intermediate_size=8, num_hidden_layers=2, num_attention_heads=4, head_dim=8,
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )).eval()
    return CogView4Pipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae.eval(),
                            transformer=transformer.eval(), scheduler=scheduler)


def _mochi(seed: int):
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel

    torch.manual_seed(seed)
    transformer = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=12, out_channels=None, qk_norm="rms_norm", text_embed_dim=_TEXT_DIM, time_embed_dim=4,
        activation_fn="swiglu", max_sequence_length=16,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLMochi(latent_channels=12, out_channels=3, encoder_block_out_channels=(32, 32, 32, 32),
                             decoder_block_out_channels=(32, 32, 32, 32), layers_per_block=(1, 1, 1, 1, 1))
    text_encoder, tokenizer = _t5(seed)
    # The released scheduler config runs Mochi's linear-quadratic sigmas inverted.
    return MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True), vae=vae.eval(),
                         text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer.eval())


def _hunyuan_video15(seed: int):
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    torch.manual_seed(seed)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
        text_embed_2_dim=_TEXT_DIM, image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v",
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo15(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16), layers_per_block=1,
        spatial_compression_ratio=4, temporal_compression_ratio=2, downsample_match_channel=False,
        upsample_match_channel=False,
    )
    tokenizer = build_qwen2_tokenizer()
    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=len(tokenizer), rope_theta=1000000.0,
        rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )).eval()
    # The glyph encoder reads bytes: ByT5's tokenizer needs no vocabulary file.
    text_encoder_2, _ = _t5(seed + 1)
    tokenizer_2 = ByT5Tokenizer()
    pipe = HunyuanVideo15Pipeline(
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer.eval(), vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        guider=ClassifierFreeGuidance(guidance_scale=4.0),
    )
    # The pipeline pads prompts to 1000 + 256 tokens (attributes, not call arguments); at tiny sizes that padding
    # would be nearly all of the attention work.
    pipe.tokenizer_max_length = pipe.tokenizer_2_max_length = 16
    return pipe


def _ovis_image(seed: int):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, OvisImagePipeline, OvisImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = OvisImageTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8),
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1, latent_channels=1,
        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    tokenizer, text_encoder = _tiny_qwen3(seed)
    return OvisImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=text_encoder,
                             tokenizer=tokenizer, transformer=transformer.eval())


def _tiny_qwen3(seed: int):
    """A byte-level Qwen2 tokenizer and a 2-layer Qwen3 text encoder (Ovis-Image, Z-Image)."""
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_qwen2_tokenizer()
    torch.manual_seed(seed)
    text_encoder = Qwen3Model(Qwen3Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=len(tokenizer), max_position_embeddings=512, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )).eval()
    return tokenizer, text_encoder


def _ltx2(seed: int):
    """LTX-2: video and audio denoised by one transformer, then the video VAE, the audio VAE and a vocoder.

    Sizes follow Diffusers' LTX-2 dummy components; the Gemma 3 text encoder (text and SigLIP vision towers) is built
    from a config instead of the Hub's tiny-gemma3."""
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2Pipeline,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    tokenizer = build_gemma_tokenizer()
    torch.manual_seed(seed)
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}
    text_encoder = Gemma3ForConditionalGeneration(Gemma3Config(
        text_config={"model_type": "gemma3_text", "vocab_size": len(tokenizer), "hidden_size": 32,
                     "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "head_dim": 8, "max_position_embeddings": 512,
                     "sliding_window": 64, **ids},
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 16, "intermediate_size": 32,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
        mm_tokens_per_image=4, boi_token_index=tokenizer.bos_token_id, eoi_token_index=tokenizer.eos_token_id,
        image_token_index=len(tokenizer) - 1, **ids,
    )).eval()
    hidden = text_encoder.config.text_config.hidden_size  # = the connectors' 4 heads x 8
    torch.manual_seed(seed)
    transformer = LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2, qk_norm="rms_norm_across_heads",
        caption_channels=hidden, rope_double_precision=False, rope_type="split",
    )
    torch.manual_seed(seed)
    # The pipeline stacks the embeddings and every layer's hidden state: num_hidden_layers + 1 of them.
    connectors = LTX2TextConnectors(
        caption_channels=hidden, text_proj_in_factor=text_encoder.config.text_config.num_hidden_layers + 1,
        video_connector_num_attention_heads=4, video_connector_attention_head_dim=8, video_connector_num_layers=1,
        video_connector_num_learnable_registers=None, audio_connector_num_attention_heads=4,
        audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None, connector_rope_base_seq_len=32, rope_theta=10000.0,
        rope_double_precision=False, causal_temporal_positioning=False, rope_type="split",
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), decoder_block_out_channels=(8,),
        layers_per_block=(1,), decoder_layers_per_block=(1, 1), spatio_temporal_scaling=(True,),
        decoder_spatio_temporal_scaling=(True,), decoder_inject_noise=(False, False), downsample_type=("spatial",),
        upsample_residual=(False,), upsample_factor=(1,), timestep_conditioning=False, patch_size=1, patch_size_t=1,
        encoder_causal=True, decoder_causal=False,
    )
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    torch.manual_seed(seed)
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None, in_channels=2,
        resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=8,
    )
    torch.manual_seed(seed)
    vocoder = LTX2Vocoder(
        in_channels=audio_vae.config.output_channels * audio_vae.config.mel_bins, hidden_channels=32, out_channels=2,
        upsample_kernel_sizes=[4, 4], upsample_factors=[2, 2], resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]],
        leaky_relu_negative_slope=0.1, output_sampling_rate=16000,
    )
    return LTX2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), audio_vae=audio_vae.eval(),
                        text_encoder=text_encoder, tokenizer=tokenizer, connectors=connectors.eval(),
                        transformer=transformer.eval(), vocoder=vocoder.eval())


def _z_image(seed: int):
    """Z-Image: a single-stream transformer over [image, text] tokens that takes and returns per-sample lists, with a
    Qwen3 text encoder (its second-to-last hidden state) and Flux's 16-channel-style VAE (here 4 latent channels)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(seed)
    # head dim 32 / 2 heads = 16 = sum(axes_dims), as the transformer asserts
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=32, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
        norm_num_groups=8, shift_factor=0.1159, scaling_factor=0.3611,
    )
    tokenizer, text_encoder = _tiny_qwen3(seed)
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=text_encoder,
                          tokenizer=tokenizer, transformer=transformer.eval())


def _sd(seed: int):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=_TEXT_DIM, norm_num_groups=4, attention_head_dim=4,
    )
    text_encoder, tokenizer = _clip(seed)
    return StableDiffusionPipeline(
        vae=_vae_2d(seed), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.eval(),
        scheduler=DPMSolverMultistepScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


_BUILDERS: dict[str, Callable[[int], Any]] = {
    "dit": _dit,
    "pixart_alpha": lambda seed: _pixart(seed, sigma=False),
    "pixart_sigma": lambda seed: _pixart(seed, sigma=True),
    "sd3": _sd3,
    "flux": _flux,
    "bfm": _bfm,
    "cogvideox": _cogvideox,
    "wan": _wan,
    "wan22": lambda seed: _wan(seed, two_experts=True),
    "hunyuan_video": _hunyuan_video,
    "ltx_video": _ltx_video,
    "sd": _sd,
    "qwen_image": _qwen_image,
    "flux2": _flux2,
    "sana": _sana,
    "cogview4": _cogview4,
    "mochi": _mochi,
    "hunyuan_video15": _hunyuan_video15,
    "ovis_image": _ovis_image,
    "ltx2": _ltx2,
    "z_image": _z_image,
}

#: Every family a tiny pipeline can be built for.
FAMILIES: tuple[str, ...] = tuple(_BUILDERS)

#: Small call arguments that make each tiny pipeline run in well under a second.
TINY_CALL_KWARGS: dict[str, dict[str, Any]] = {
    "dit": {"class_labels": [1], "num_inference_steps": 4, "guidance_scale": 4.0},
    "pixart_alpha": {"height": 32, "width": 32, "num_inference_steps": 4, "guidance_scale": 4.0,
                     "max_sequence_length": 16, "use_resolution_binning": False},
    "pixart_sigma": {"height": 32, "width": 32, "num_inference_steps": 4, "guidance_scale": 4.0,
                     "max_sequence_length": 16, "use_resolution_binning": False},
    "sd3": {"height": 32, "width": 32, "num_inference_steps": 4, "guidance_scale": 4.0, "max_sequence_length": 16},
    "flux": {"height": 32, "width": 32, "num_inference_steps": 4, "true_cfg_scale": 4.0,
             "negative_prompt": "blurry", "max_sequence_length": 16},
    "bfm": {"height": 32, "width": 32, "num_inference_steps": 4, "true_cfg_scale": 4.0,
            "negative_prompt": "blurry", "max_sequence_length": 16},
    "cogvideox": {"height": 16, "width": 16, "num_frames": 9, "num_inference_steps": 4, "guidance_scale": 4.0,
                  "max_sequence_length": 16},
    "wan": {"height": 32, "width": 32, "num_frames": 9, "num_inference_steps": 4, "guidance_scale": 4.0,
            "max_sequence_length": 16},
    "wan22": {"height": 32, "width": 32, "num_frames": 9, "num_inference_steps": 4, "guidance_scale": 4.0,
              "max_sequence_length": 16},
    "hunyuan_video": {"height": 32, "width": 32, "num_frames": 9, "num_inference_steps": 4, "guidance_scale": 4.0,
                      "max_sequence_length": 16},
    "ltx_video": {"height": 64, "width": 64, "num_frames": 9, "num_inference_steps": 4, "guidance_scale": 4.0,
                  "max_sequence_length": 16},
    "sd": {"height": 32, "width": 32, "num_inference_steps": 4, "guidance_scale": 4.0},
    "flux2": {"height": 32, "width": 32, "num_inference_steps": 4, "guidance_scale": 4.0, "max_sequence_length": 16,
              "text_encoder_out_layers": (1,)},
    # complex_human_instruction=None: the default instruction only lengthens the prompt the tiny Gemma reads.
    "sana": {"height": 64, "width": 64, "num_inference_steps": 4, "guidance_scale": 4.0, "max_sequence_length": 16,
             "complex_human_instruction": None, "use_resolution_binning": False},
    "cogview4": {"height": 32, "width": 32, "num_inference_steps": 4, "guidance_scale": 4.0,
                 "max_sequence_length": 16},
    "mochi": {"height": 16, "width": 16, "num_frames": 7, "num_inference_steps": 4, "guidance_scale": 4.0,
              "max_sequence_length": 16},
    # No guidance_scale: CFG (scale 4) is set on the pipeline's guider component.
    "hunyuan_video15": {"height": 16, "width": 16, "num_frames": 9, "num_inference_steps": 4,
                        "negative_prompt": "blurry"},
    "ovis_image": {"height": 32, "width": 32, "num_inference_steps": 4, "guidance_scale": 4.0,
                   "max_sequence_length": 16},
    # LTX2Pipeline's defaults: batched CFG (video and audio), a spatio-temporal-guidance pass and a
    # modality-isolation pass per step; frame_rate 25 keeps the audio latents a whole number of frames.
    "ltx2": {"height": 32, "width": 32, "num_frames": 9, "frame_rate": 25.0, "num_inference_steps": 4,
             "guidance_scale": 4.0, "spatio_temporal_guidance_blocks": [1], "max_sequence_length": 16},
    "qwen_image": {"height": 32, "width": 32, "num_inference_steps": 4, "true_cfg_scale": 4.0,
                   "negative_prompt": "blurry", "max_sequence_length": 16},
    # ZImagePipeline runs CFG whenever guidance_scale > 0 (its formula is pos + w·(pos − neg)).
    "z_image": {"height": 32, "width": 32, "num_inference_steps": 4, "guidance_scale": 4.0,
                "max_sequence_length": 16},
}


def tiny_pipeline(family: str, seed: int = 0):
    """Build the tiny random pipeline of ``family`` (one of :data:`FAMILIES`) with no network access."""
    if family not in _BUILDERS:
        raise ValueError(f"Unknown tiny family {family!r}. Choose one of: {', '.join(FAMILIES)}.")
    pipe = _BUILDERS[family](seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_call_kwargs(family: str, prompt: str = "a red circle") -> dict[str, Any]:
    """Arguments for a fast call of ``tiny_pipeline(family)``: a prompt (DiT: a class label) and small sizes."""
    kwargs = dict(TINY_CALL_KWARGS[family])
    if family != "dit":
        kwargs["prompt"] = prompt
    return kwargs
