"""Adaptive Guidance: exact at γ̄ = 1, the cond-only pipeline when switching at once, per-sample switching."""

from __future__ import annotations

import pytest
import torch

import diffusion_accel as da
from diffusion_accel.testing import run_pipe, tiny_pipeline

FAMILIES = ["pixart_alpha", "dit", "sd3", "flux", "wan", "cogvideox", "ltx_video", "sd"]


def _scale_arg(family):
    return "true_cfg_scale" if family == "flux" else "guidance_scale"


@pytest.mark.parametrize("family", FAMILIES)
def test_never_switch_is_bit_identical_and_at_once_is_cond_only(family):
    pipe = tiny_pipeline(family)
    baseline = run_pipe(pipe, family)
    with da.accelerated(pipe, "adaptive_guidance", threshold=1.0):
        assert torch.equal(run_pipe(pipe, family), baseline)
        assert da.stats(pipe)["uncond_skipped"] == 0
    cond_only = run_pipe(pipe, family, **{_scale_arg(family): 1.0})
    with da.accelerated(pipe, "adaptive_guidance", threshold=-1.0):
        out = run_pipe(pipe, family)
        stats = da.stats(pipe)
    assert torch.equal(out, cond_only)
    assert stats["uncond_skipped"] == 4
    assert sum(s["rows"] for s in stats["steps"]) == 4  # only conditional rows were computed


def _batch_call(pipe, prompts, **extra):
    latents = torch.randn(len(prompts), 4, 4, 4, generator=torch.Generator().manual_seed(0))
    return pipe(prompt=prompts, latents=latents, num_inference_steps=6, height=32, width=32, guidance_scale=4.5,
                max_sequence_length=16, use_resolution_binning=False, clean_caption=False, output_type="pt",
                **extra).images


def test_batch_of_two_prompts_switches_per_sample():
    pipe = tiny_pipeline("pixart_alpha")
    prompts = ["a red circle", "a big blue square in the top left"]
    full = _batch_call(pipe, prompts)
    with da.accelerated(pipe, "adaptive_guidance", threshold=0.999999999):
        _batch_call(pipe, prompts)
        gammas = da.stats(pipe)["adaptive_guidance"]["gamma"]
    g0, g1 = gammas[0][0][1], gammas[1][0][1]
    assert g0 != g1
    threshold = (g0 + g1) / 2
    low, high = (0, 1) if g0 < g1 else (1, 0)
    with da.accelerated(pipe, "adaptive_guidance", threshold=threshold):
        out = _batch_call(pipe, prompts)
        stats = da.stats(pipe)
    switch = stats["adaptive_guidance"]["switch_step"]
    assert switch.get(high) == 1, switch
    assert switch.get(low, 99) > 1
    # the sample that stayed guided longer is untouched until it switches; the switched one changed
    first_skip = stats["steps"][1]
    assert first_skip["uncond_skipped"] == 1 and first_skip["rows"] == 3
    assert not torch.allclose(out[high], full[high], atol=1e-6)
    if low not in switch:
        assert torch.allclose(out[low], full[low], atol=1e-5)


def test_negative_prompt_is_honoured_before_the_switch():
    pipe = tiny_pipeline("pixart_alpha")
    base_a = run_pipe(pipe, "pixart_alpha", negative_prompt="blue")
    with da.accelerated(pipe, "adaptive_guidance", threshold=-0.5, min_step=2):
        a = run_pipe(pipe, "pixart_alpha", negative_prompt="blue")
        b = run_pipe(pipe, "pixart_alpha", negative_prompt="green square")
        assert da.stats(pipe)["adaptive_guidance"]["switch_step"] == {0: 3}
    assert not torch.allclose(a, b, atol=1e-6)  # the negative prompt mattered during the guided steps
    with da.accelerated(pipe, "adaptive_guidance", threshold=1.0):
        assert torch.equal(run_pipe(pipe, "pixart_alpha", negative_prompt="blue"), base_a)


def test_guidance_distilled_model_is_not_applicable():
    pipe = tiny_pipeline("hunyuan_video")
    with pytest.raises(ValueError, match="guidance-distilled"):
        da.apply(pipe, "adaptive_guidance")
    assert "adaptive_guidance" not in da.list_methods(pipe)


def test_composes_with_delta_cache_through_the_batch_shrinking():
    pipe = tiny_pipeline("pixart_alpha")
    prompts = ["a red circle", "a big blue square in the top left"]
    with da.accelerated(pipe, {"method": "adaptive_guidance", "threshold": -0.5, "min_step": 1},
                        {"method": "delta_cache", "interval": 2, "num_cached_blocks": 2}):
        out = _batch_call(pipe, prompts)
        stats = da.stats(pipe)
    assert torch.isfinite(out).all()
    assert stats["uncond_skipped"] == 2 * 4  # both samples cond-only from step 2 of 6
    assert stats["blocks_run"] < stats["blocks_total"]


def test_static_cfg_cutoff_matches_its_nfe_budget():
    pipe = tiny_pipeline("pixart_alpha")
    with da.accelerated(pipe, "cfg_cutoff", cutoff_step_ratio=0.5):
        run_pipe(pipe, "pixart_alpha", num_inference_steps=8)
        steps = da.stats(pipe)["steps"]
    assert [s["uncond_skipped"] for s in steps] == [0] * 4 + [1] * 4
    baseline = run_pipe(pipe, "pixart_alpha")
    with da.accelerated(pipe, "cfg_cutoff", cutoff_step_ratio=1.0):
        assert torch.equal(run_pipe(pipe, "pixart_alpha"), baseline)
