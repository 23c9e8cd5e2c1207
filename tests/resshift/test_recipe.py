"""The ``resshift`` recipe on the shared trainer stack: a few steps, resume, and the artefact it saves."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusion_accel.testing import assert_pickle_free
from diffusion_accel.train import recipe_class, train

TINY = dict(num_train_samples=16, train_batch_size=4, block_out_channels="16,32", validation_steps=0,
            lr_scheduler="constant", lr_warmup_steps=0, learning_rate=1e-3, seed=3)


def _weights(folder):
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_recipe_is_registered_with_its_flags():
    cls = recipe_class("resshift")
    from diffusion_accel.train.options import parse_options

    o = parse_options(cls.options_class, ["--output_dir", "o", "--config", "resshift-bicubic", "--objective", "ddpm",
                                          "--degradation", "realistic"], prog="t")
    assert (o.objective, o.degradation, o.num_train_timesteps, o.kappa) == ("ddpm", "realistic", 4, 2.0)
    from diffusion_accel.train.options import build_options

    with pytest.raises(ValueError, match="objective 'gan'"):
        build_options(cls.options_class, {"output_dir": "o", "objective": "gan"})
    with pytest.raises(ValueError, match="multiple of --scale_factor"):
        build_options(cls.options_class, {"output_dir": "o", "resolution": 66})


def test_resume_reproduces_the_uninterrupted_run_and_the_artefact_reloads_bit_identically(tmp_path):
    from diffusers import DiffusionPipeline

    full, split = tmp_path / "full", tmp_path / "split"
    train("resshift", output_dir=str(full), max_train_steps=4, checkpointing_steps=0, **TINY)
    train("resshift", output_dir=str(split), max_train_steps=2, checkpointing_steps=0, **TINY)
    assert_pickle_free(split / "checkpoint-2")
    record = train("resshift", output_dir=str(split), max_train_steps=4, checkpointing_steps=0,
                   resume_from_checkpoint="latest", **TINY)
    assert record["steps"] == 4 and record["steps_this_session"] == 2
    a, b = _weights(full), _weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    pipe = DiffusionPipeline.from_pretrained(str(full), trust_remote_code=True)
    assert type(pipe).__name__ == "ResShiftPipeline"
    assert json.loads((full / "scheduler" / "scheduler_config.json").read_text())["num_train_timesteps"] == 4
    loaded = pipe.unet.state_dict()
    assert all(torch.equal(loaded[k], a[k]) for k in a)  # the saved EMA weights, bit for bit
    pipe.set_progress_bar_config(disable=True)
    lr = np.random.default_rng(0).random((1, 16, 16, 3)).astype(np.float32)
    x = pipe(image=lr, generator=torch.Generator().manual_seed(0), output_type="np").images
    y = DiffusionPipeline.from_pretrained(str(full), trust_remote_code=True)(
        image=lr, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert x.shape == (1, 64, 64, 3) and np.array_equal(x, y)


@pytest.mark.parametrize("objective", ["regression", "ddpm"])
def test_baseline_objectives_train_and_save_the_same_network(tmp_path, objective):
    from diffusers import UNet2DModel

    train("resshift", output_dir=str(tmp_path), max_train_steps=1, checkpointing_steps=0, objective=objective,
          degradation="realistic", **TINY)
    unet = UNet2DModel.from_pretrained(str(tmp_path / "unet"))
    assert json.loads((tmp_path / "baseline.json").read_text())["objective"] == objective
    assert unet.config.in_channels == 7 and unet.config.out_channels == 4
    assert (tmp_path / "scheduler").is_dir() == (objective == "ddpm")
