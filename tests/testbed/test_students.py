"""The shipped distilled students load by name and by folder, and sample by their contract with a plain call."""

from __future__ import annotations

import pytest
import torch
from diffusion_accel.pipelines.testbed import registry
from diffusion_accel.pipelines.testbed.registry import STUDENT_NAMES, VIDEO_STUDENT_NAMES, default_call_kwargs


@pytest.mark.parametrize("name", sorted(set(STUDENT_NAMES) - set(VIDEO_STUDENT_NAMES)))  # video: test_wan_students
def test_shipped_student_loads_and_samples_by_its_contract(name):
    from diffusers import DiffusionPipeline, LCMScheduler, PixArtAlphaPipeline

    from diffusion_accel.loading import load_pipeline

    try:
        folder = registry.testbed_path(name)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    contract = default_call_kwargs(name)
    assert contract["guidance_scale"] == 1.0 and contract["num_inference_steps"] == 4
    by_name = load_pipeline(f"testbed:{name}")
    by_folder = DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True)
    for pipe in (by_name, by_folder):
        assert isinstance(pipe, PixArtAlphaPipeline) and isinstance(pipe.scheduler, LCMScheduler)
        pipe.set_progress_bar_config(disable=True)
    passes = []
    by_name.transformer.register_forward_pre_hook(lambda m, a: passes.append(a[0].shape[0]))
    a = by_name("a red circle", generator=torch.Generator().manual_seed(0), output_type="np").images
    b = by_folder("a red circle", generator=torch.Generator().manual_seed(0), output_type="np").images
    assert a.shape == (1, 64, 64, 3) and passes == [1] * 4  # 4 steps, no CFG batch
    assert (a == b).all()
