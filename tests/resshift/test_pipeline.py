"""ResShiftPipeline: inputs and outputs like Diffusers' image-to-image pipelines, errors that name the fix, and the
folder round trip (tiny random components: the behaviour, not the quality)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline


def _lr(n=2, size=8):
    return np.random.default_rng(0).random((n, size, size, 3)).astype(np.float32)


def test_pil_numpy_and_tensor_inputs_give_the_same_images(tiny_pipe):
    lr = (_lr() * 255).round().astype(np.uint8)
    pils = [PIL.Image.fromarray(a) for a in lr]
    outs = [tiny_pipe(image=x, generator=torch.Generator().manual_seed(3), output_type="np").images
            for x in (pils, lr, torch.from_numpy(lr).permute(0, 3, 1, 2).float() / 255.0)]
    assert outs[0].shape == (2, 32, 32, 3) and outs[0].dtype == np.float32
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])
    assert 0.0 <= outs[0].min() and outs[0].max() <= 1.0


def test_generator_output_types_and_progress(tiny_pipe):
    a = tiny_pipe(image=_lr(), generator=torch.Generator().manual_seed(0), output_type="pt").images
    b = tiny_pipe(image=_lr(), generator=torch.Generator().manual_seed(0), output_type="pt").images
    c = tiny_pipe(image=_lr(), generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    pil = tiny_pipe(image=PIL.Image.fromarray((_lr(1)[0] * 255).astype(np.uint8))).images
    assert isinstance(pil, list) and pil[0].size == (32, 32)
    latents = tiny_pipe(image=_lr(), output_type="latent").images
    assert latents.shape == (2, 4, 8, 8)
    calls = []
    handle = tiny_pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape))
    try:
        tiny_pipe(image=_lr(3), num_inference_steps=4, output_type="np")
    finally:
        handle.remove()
    assert len(calls) == 4 and calls[0] == (3, 7, 8, 8)  # one pass per step, x_t ⊕ LR channels


@pytest.mark.parametrize("image, message", [
    (np.zeros((2, 9, 9, 3), np.float32), "multiples of 2"),
    (np.zeros((2, 8, 8, 4), np.float32), r"\[N, H, W, 3\]"),
    (torch.zeros(2, 1, 8, 8), r"\[N, 3, H, W\]"),
    ([], "empty"),
    (torch.zeros(0, 3, 8, 8), "empty"),
    (None, "pass image="),
])
def test_bad_images_are_refused_with_the_fix(tiny_pipe, image, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipe(image=image)


def test_bad_steps_and_output_type_are_refused(tiny_pipe):
    with pytest.raises(ValueError, match="num_inference_steps=4"):
        tiny_pipe(image=_lr(), num_inference_steps=15)
    with pytest.raises(ValueError, match="output_type"):
        tiny_pipe(image=_lr(), output_type="tensor")


def test_folder_round_trip_is_bit_identical(tiny_pipe, tmp_path):
    from diffusion_accel.pipelines.resshift import ResShiftPipeline, ResShiftScheduler

    from diffusion_accel.loading import load_pipeline

    tiny_pipe.save_pretrained(tmp_path)
    for loaded in (DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True), load_pipeline(tmp_path)):
        assert isinstance(loaded, ResShiftPipeline) and isinstance(loaded.scheduler, ResShiftScheduler)
        assert loaded.config.scale_factor == 4
        loaded.set_progress_bar_config(disable=True)
        for k, v in tiny_pipe.unet.state_dict().items():
            assert torch.equal(loaded.unet.state_dict()[k], v), k
        a = tiny_pipe(image=_lr(), generator=torch.Generator().manual_seed(0), output_type="np").images
        b = loaded(image=_lr(), generator=torch.Generator().manual_seed(0), output_type="np").images
        assert np.array_equal(a, b)
