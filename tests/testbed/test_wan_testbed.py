"""``testbed:wan``: the shipped WanPipeline loads offline and generates clips, its speed tier has the token count
sparse attention needs, and ``diffusion-accel testbed eval wan`` prints the video table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusion_accel.pipelines.testbed import registry, wan


def test_loads_by_name_and_with_from_pretrained():
    import diffusers
    from transformers import UMT5EncoderModel

    from diffusion_accel.loading import load_pipeline

    pipe = load_pipeline("testbed:wan")
    assert isinstance(pipe, diffusers.WanPipeline) and type(pipe).__name__ == "WanPipelineWithContract"
    assert isinstance(pipe.vae, diffusers.AutoencoderKLWan)
    assert isinstance(pipe.transformer, diffusers.WanTransformer3DModel)
    assert isinstance(pipe.text_encoder, UMT5EncoderModel)
    assert pipe.vae.config.latents_std != [1.0] * wan.Z_DIM  # trained statistics, not the defaults
    again = diffusers.DiffusionPipeline.from_pretrained(str(registry.testbed_path("wan")), trust_remote_code=True)
    assert type(again).__name__ == "WanPipelineWithContract"
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(["a red circle moving left", "a blue square moving up"], num_inference_steps=3, output_type="np",
                  generator=torch.Generator().manual_seed(0)).frames
    assert np.asarray(frames).shape == (2, 9, 64, 64, 3)  # the contract's size and frame count
    assert np.asarray(frames).std() > 0.02


def test_every_caption_word_is_one_token():
    from diffusion_accel.pipelines.testbed.video_data import vocabulary

    tokenizer = wan.umt5_tokenizer()
    for word in vocabulary():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word


def test_text_encoder_separates_the_attributes():
    encoder, tokenizer = wan.build_umt5(0)
    prompts = ["a red circle moving left", "a red circle moving right", "a green circle moving left"]
    ids = tokenizer(prompts, return_tensors="pt").input_ids
    out = encoder(ids).last_hidden_state
    assert not torch.allclose(out[0], out[1], atol=1e-3) and not torch.allclose(out[0], out[2], atol=1e-3)


def test_speed_tier_has_16k_tokens():
    from diffusion_accel.loading import base_call_kwargs, load_pipeline

    pipe = load_pipeline("testbed:wan", tier="speed")
    kwargs = base_call_kwargs("testbed:wan", tier="speed")
    patch = pipe.transformer.config.patch_size
    frames = 1 + (kwargs["num_frames"] - 1) // pipe.vae_scale_factor_temporal
    tokens = (frames // patch[0] * kwargs["height"] // pipe.vae_scale_factor_spatial // patch[1]
              * kwargs["width"] // pipe.vae_scale_factor_spatial // patch[2])
    assert tokens >= 16384 and tokens == wan.latent_tokens(kwargs["height"], kwargs["width"], kwargs["num_frames"])
    assert type(pipe.transformer) is type(load_pipeline("testbed:wan").transformer)
    assert pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim == 384
    with pytest.raises(ValueError, match="4k"):
        wan.latent_tokens(64, 64, 8)


def test_eval_cli_prints_the_video_table(tmp_path, capsys, monkeypatch):
    from diffusion_accel.pipelines.testbed import evaluate_video

    from diffusion_accel.cli import main

    monkeypatch.setattr(evaluate_video, "NUM_REFERENCE_CLIPS", 32)  # FID reference: 288 frames are enough here

    out = tmp_path / "wan.json"
    assert main(["testbed", "eval", "wan", "--prompts", "2", "--steps", "2", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    for row in ("adherence direction", "adherence all", "FID-shapes over frames", "motion smoothness",
                "dynamic degree", "subject consistency", "VAE recon"):
        assert row in table
    result = json.loads(out.read_text())
    assert result["num_prompts"] == 2 and result["call_kwargs"]["num_inference_steps"] == 2
    assert result["real"]["adherence"] == {"colour": 1.0, "shape": 1.0, "direction": 1.0, "all": 1.0}
    assert result["real"]["vbench"]["dynamic_degree"] == 1.0
    assert set(result["generated"]["vbench"]) == set(result["real"]["vbench"])
    assert set(result["vae_reconstruction"]) == set(result["real"])


def test_vae_loss_weights_the_object_pixels():
    from diffusion_accel.pipelines.testbed.train_wan import FOREGROUND_WEIGHT, clips_to_tensor, foreground_weights
    from diffusion_accel.pipelines.testbed.video_data import make_clips

    frames, clips = make_clips("wan-train", 0, 2)
    weights = foreground_weights(clips_to_tensor(frames))
    assert weights.shape == (2, 1, 9, 64, 64) and set(weights.unique().tolist()) == {1.0, FOREGROUND_WEIGHT}
    for i, clip in enumerate(clips):  # heavy exactly around the object's centre, light in the corners
        x, y = np.round(clip.track[4]).astype(int)
        assert weights[i, 0, 4, y, x] == FOREGROUND_WEIGHT and weights[i, 0, 4, 0, 0] == 1.0
        assert 0.01 < (weights[i] > 1).float().mean() < 0.2


def test_narrow_posterior_start_keeps_the_means_and_shrinks_the_noise():
    """``logvar_init`` sets σ of a fresh VAE's posterior to exp(logvar_init / 2) on every latent, leaving its means
    (the encoder and the mean half of ``quant_conv``) as they were; the default start has σ near 1."""
    from diffusion_accel.pipelines.testbed.train_wan import clips_to_tensor, start_posterior_narrow
    from diffusion_accel.pipelines.testbed.video_data import make_clips

    x = clips_to_tensor(make_clips("wan-train", 0, 2)[0])
    vae = wan.build_vae(seed=0)
    with torch.no_grad():
        default = vae.encode(x).latent_dist
        start_posterior_narrow(vae, -10.0)
        narrow = vae.encode(x).latent_dist
    assert default.std.mean() > 0.5
    assert torch.allclose(narrow.std, torch.full_like(narrow.std, float(np.exp(-5.0))))
    assert torch.equal(narrow.mean, default.mean)


@pytest.mark.parametrize("compression", [4, 8])
def test_vae_at_4x_or_8x_drives_a_wan_pipeline(compression):
    """The 4x variant is a plain ``AutoencoderKLWan`` config: ``WanPipeline`` reads its ``scale_factor_spatial``,
    so a 64x64 call samples 3x16x16 latents (192 tokens through the (1, 2, 2) patch; 48 at 8x) and decodes them
    back to 9 frames of 64x64."""
    with pytest.raises(ValueError, match="spatial_compression must be 4 or 8"):
        wan.vae_config(2)
    vae = wan.build_vae(seed=0, spatial_compression=compression).eval()
    assert vae.config.scale_factor_spatial == compression
    transformer = wan.build_transformer("quality").eval()
    tokens = []
    transformer.blocks[0].register_forward_pre_hook(lambda module, args: tokens.append(args[0].shape[1]))
    pipe = wan.assemble(transformer, vae)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    latents = pipe("a red circle moving left", num_inference_steps=2, output_type="latent", generator=generator).frames
    side = 64 // compression
    assert latents.shape == (1, wan.Z_DIM, 3, side, side)
    assert set(tokens) == {3 * (side // 2) ** 2}
    frames = pipe("a red circle moving left", num_inference_steps=2, output_type="np", generator=generator).frames
    assert np.asarray(frames).shape == (1, 9, 64, 64, 3)


def test_fresh_vae_settings_are_refused_with_init_from(tmp_path):
    """``logvar_init``, ``spatial_compression`` and ``vae_overrides`` shape a fresh VAE; with ``init_from`` they
    would be ignored, so they are refused before any work (nothing written). ``build_vae`` takes config overrides."""
    from diffusion_accel.pipelines.testbed.train_wan import train_wan_vae

    assert wan.build_vae(seed=0, decoder_base_dim=16).config.decoder_base_dim == 16
    out = tmp_path / "out"
    for fresh in ({"logvar_init": -10.0}, {"spatial_compression": 4}, {"vae_overrides": {"decoder_base_dim": 16}}):
        with pytest.raises(ValueError, match=f"{next(iter(fresh))} shape a fresh VAE.*drop them or drop init_from"):
            train_wan_vae(out, init_from=tmp_path, **fresh)
    assert not out.exists()


def test_the_16_channel_candidate_vae_drives_a_wan_pipeline_with_a_transformer_for_its_latents():
    """``scripts/wan_vae_variants.py --variant 8x-z16``: 16 latent channels at 8x; ``build_transformer`` sized by
    ``latent_channels`` (what ``train_wan_transformer`` passes from the VAE's ``z_dim``) samples 16-channel latents
    and the VAE decodes them; the default transformer (8 channels) cannot take them."""
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "scripts" / "wan_vae_variants.py"
    spec = importlib.util.spec_from_file_location("wan_vae_variants", script)
    variants = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(variants)
    compression, overrides = variants.VARIANTS["8x-z16"]
    vae = wan.build_vae(seed=0, spatial_compression=compression, **overrides).eval()
    assert vae.config.z_dim == 16
    transformer = wan.build_transformer("quality", latent_channels=vae.config.z_dim).eval()
    assert (transformer.config.in_channels, transformer.config.out_channels) == (16, 16)
    pipe = wan.assemble(transformer, vae)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    latents = pipe("a red circle moving left", num_inference_steps=2, output_type="latent", generator=generator).frames
    assert latents.shape == (1, 16, 3, 8, 8)
    with torch.no_grad():
        assert pipe.vae.decode(latents).sample.shape == (1, 3, 9, 64, 64)
    with pytest.raises(RuntimeError):  # 8-channel latents reach a 16-channel decoder
        wan.assemble(wan.build_transformer("quality").eval(), vae)("a red circle moving left", num_inference_steps=1,
                                                                    output_type="np")
