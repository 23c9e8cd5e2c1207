"""The shipped ``testbed:resshift`` (assets/testbed-resshift): loads by name and by folder with the scheduler it was
trained with, ships a VAE with the testbed VAE's encoder (its latent space) and a decoder of its own, and
super-resolves held-out images better than bicubic upsampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def folder():
    from diffusion_accel.pipelines.testbed import registry

    try:
        return registry.testbed_path("resshift")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def test_loads_by_name_and_folder_with_its_training_scheduler(folder):
    from diffusers import DiffusionPipeline
    from diffusion_accel.pipelines.resshift import ResShiftPipeline
    from diffusion_accel.pipelines.testbed.registry import default_call_kwargs

    from diffusion_accel.loading import load_pipeline

    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink()) < 3_000_000
    trained = json.loads((folder / "resshift.json").read_text())["scheduler"]
    by_name = load_pipeline("testbed:resshift")
    by_folder = DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True)
    lr = np.random.default_rng(0).random((2, 16, 16, 3)).astype(np.float32)
    outs = []
    for pipe in (by_name, by_folder):
        assert isinstance(pipe, ResShiftPipeline)
        assert {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")} == \
            {k: v for k, v in trained.items() if not k.startswith("_")}
        assert pipe.scheduler.config.num_train_timesteps == 4
        pipe.set_progress_bar_config(disable=True)
        outs.append(pipe(image=lr, generator=torch.Generator().manual_seed(0), output_type="np").images)
    assert default_call_kwargs("resshift") == {"num_inference_steps": 4}
    assert outs[0].shape == (2, 64, 64, 3) and np.array_equal(outs[0], outs[1])


def test_vae_keeps_the_latent_space_it_was_trained_in(folder):
    """Encoder and quant_conv are the shared testbed VAE's (the latents every SR network was trained on), rounded to
    fp16 as stored; the config (scaling, shift) is the same; the decoder is its own."""
    from diffusion_accel.pipelines.testbed.registry import testbed_path
    from safetensors.torch import load_file

    name = "diffusion_pytorch_model.safetensors"
    ours, shared = load_file(str(folder / "vae" / name)), load_file(str(testbed_path("pixart") / "vae" / name))
    encoder = [k for k in shared if k.startswith(("encoder.", "quant_conv."))]
    assert encoder and all(torch.equal(ours[k], shared[k].half()) for k in encoder)
    assert any(not torch.equal(ours[k], shared[k].half()) for k in shared if k.startswith("decoder."))
    configs = [json.loads((f / "vae" / "config.json").read_text()) for f in (folder, testbed_path("pixart"))]
    for config in configs:
        config.pop("_name_or_path", None)
    assert configs[0] == configs[1]
    assert json.loads((folder / "resshift.json").read_text())["stored_weights"]["dtype"].startswith("float16")


def test_beats_bicubic_on_held_out_images(folder):
    from diffusion_accel.eval.restoration import psnr
    from diffusion_accel.pipelines.resshift.degrade import bicubic_down, bicubic_up
    from diffusion_accel.pipelines.testbed.shapes import make_batch

    from diffusion_accel.loading import load_pipeline

    images, _ = make_batch("test", 0, 8)
    hr = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    lr = bicubic_down(hr, 4)
    pipe = load_pipeline("testbed:resshift")
    pipe.set_progress_bar_config(disable=True)
    sr = pipe(image=lr, generator=torch.Generator().manual_seed(0), output_type="np").images
    ref = images.astype(np.float64) / 255.0
    bicubic = bicubic_up(lr, 4).permute(0, 2, 3, 1).numpy()
    assert psnr(sr, ref).mean() > psnr(bicubic, ref).mean() + 1.0
