"""``train_wan_vae``'s ``clip_schedule``: steps on the first frames of the clips, cycled with whole clips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file


@pytest.fixture()
def trained_batches(monkeypatch):
    """``(clips, frames)`` of every batch ``train_wan_vae`` trains on, in order."""
    from diffusion_accel.pipelines.testbed import train_wan

    seen = []
    to_tensor = train_wan.clips_to_tensor
    monkeypatch.setattr(train_wan, "clips_to_tensor", lambda frames: seen.append(frames.shape[:2]) or to_tensor(frames))
    return seen


def test_a_clip_prefix_is_encoded_as_the_start_of_the_whole_clip():
    """Why a step may train on the first 1 or 5 frames: the causal VAE encodes a prefix into exactly the first latent
    frames of the whole clip, so the decoder sees the latents the transformer generates, not other ones."""
    from diffusion_accel.pipelines.testbed.wan import build_vae

    vae = build_vae(seed=0).eval()
    torch.manual_seed(0)
    clip = torch.rand(2, 3, 9, 64, 64) * 2 - 1
    with torch.no_grad():
        whole = vae.encode(clip).latent_dist.mode()
        for frames, latent_frames in ((1, 1), (5, 2)):
            prefix = vae.encode(clip[:, :, :frames]).latent_dist.mode()
            assert prefix.shape[2] == latent_frames
            assert torch.allclose(prefix, whole[:, :, :latent_frames], atol=1e-5)


@pytest.mark.parametrize("schedule", [((4, 8),), ((13, 8),), ((5, 0),), ()])
def test_bad_clip_schedules_are_refused(schedule):
    from diffusion_accel.pipelines.testbed.train_wan import check_clip_schedule

    with pytest.raises(ValueError, match="clip_schedule"):
        check_clip_schedule(schedule)


def test_clip_schedule_and_batch_size_do_not_go_together(tmp_path):
    from diffusion_accel.pipelines.testbed.train_wan import train_wan_vae

    with pytest.raises(ValueError, match="drop batch_size or drop clip_schedule"):
        train_wan_vae(tmp_path, batch_size=4, clip_schedule=((1, 8),))
    assert not any(tmp_path.iterdir())


def test_steps_cycle_through_the_schedule_and_keep_the_encoder(tmp_path, monkeypatch, trained_batches):
    """Each step trains on the frames and batch its schedule entry names, in turn; a decoder-only stage keeps every
    encoder tensor bit for bit and records the schedule."""
    from diffusion_accel.pipelines.testbed import train_wan
    from diffusion_accel.pipelines.testbed.wan import build_vae

    monkeypatch.setattr(train_wan, "vae_reconstruction_metrics", lambda vae: {})
    start = tmp_path / "start"
    build_vae(seed=0).save_pretrained(start)
    out = tmp_path / "mixed"
    metrics = train_wan.train_wan_vae(out, steps=3, init_from=start, decoder_only=True,
                                      clip_schedule=((1, 3), (5, 2)))
    assert trained_batches == [(3, 1), (2, 5), (3, 1)]
    assert metrics["clip_schedule"] == [[1, 3], [5, 2]] and "batch_size" not in metrics
    before, after = (load_file(str(f / "diffusion_pytorch_model.safetensors")) for f in (start, out))
    encoder = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert encoder and all(torch.equal(after[k], before[k]) for k in encoder)
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("decoder."))
    assert np.isfinite([after[k].float().sum().item() for k in after]).all()


def test_the_shape_decoder_recipe_is_decoder_only_and_starts_on_first_frames():
    from diffusion_accel.pipelines.testbed.train_wan import WAN_SHAPE_DECODER_RECIPE, check_clip_schedule

    assert all(stage["decoder_only"] for stage in WAN_SHAPE_DECODER_RECIPE)
    assert [check_clip_schedule(stage["clip_schedule"]) for stage in WAN_SHAPE_DECODER_RECIPE]
    assert WAN_SHAPE_DECODER_RECIPE[0]["clip_schedule"] == ((1, 32),)
    assert all(any(f == 9 for f, _ in stage["clip_schedule"]) for stage in WAN_SHAPE_DECODER_RECIPE[1:])


def test_wan_shape_decoder_command_runs_its_recipe_from_the_given_vae(tmp_path, monkeypatch, trained_batches):
    """``testbed train wan-shape-decoder``: the recipe's stages chained from ``--init-from``, each on its own clip
    schedule, the encoder side kept; a setting the recipe fixes is refused."""
    from diffusion_accel.pipelines.testbed import train_wan
    from diffusion_accel.pipelines.testbed.train import train
    from diffusion_accel.pipelines.testbed.wan import build_vae

    from diffusion_accel.cli import main

    monkeypatch.setattr(train_wan, "vae_reconstruction_metrics", lambda vae: {})
    monkeypatch.setattr(train_wan, "WAN_SHAPE_DECODER_RECIPE", (
        {"steps": 1, "clip_schedule": ((1, 2),), "lr": 1e-3, "decoder_only": True},
        {"steps": 2, "clip_schedule": ((5, 1), (9, 1)), "lr": 1e-3, "decoder_only": True}))
    start = tmp_path / "start"
    build_vae(seed=0).save_pretrained(start)
    out = tmp_path / "shapes"
    assert main(["testbed", "train", "wan-shape-decoder", "--init-from", str(start), "--output", str(out)]) == 0
    assert trained_batches == [(2, 1), (1, 5), (1, 9)]
    before, after = (load_file(str(f / "diffusion_pytorch_model.safetensors")) for f in (start, out))
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith(("encoder.", "quant_conv.")))
    with pytest.raises(ValueError, match="wan-shape-decoder runs WAN_SHAPE_DECODER_RECIPE; lr cannot be set"):
        train("wan-shape-decoder", tmp_path / "other", lr=1e-3)
