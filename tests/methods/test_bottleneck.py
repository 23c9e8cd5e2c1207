"""Bottleneck Sampling: exact single stage, per-stage shapes, ids and schedules, prompt encoded once, errors."""

from __future__ import annotations

import pytest
import torch

import diffusion_accel as da
from diffusion_accel.methods.bottleneck import BottleneckConfig, stage_sigmas
from diffusion_accel.testing import fingerprint, run_pipe, tiny_pipeline

SIZES = {"flux": 64, "sd3": 64, "wan": 32, "hunyuan_video": 32, "ltx_video": 64}


@pytest.mark.parametrize("family", sorted(SIZES))
def test_one_stage_at_scale_one_is_the_baseline(family):
    pipe = tiny_pipeline(family)
    size = {"height": SIZES[family], "width": SIZES[family], "num_inference_steps": 5}
    baseline = run_pipe(pipe, family, **size)
    with da.accelerated(pipe, "bottleneck", scales=(1.0,), start_sigmas=(1.0,), step_fractions=(1.0,)):
        assert torch.equal(run_pipe(pipe, family, **size), baseline)
    with da.accelerated(pipe, "bottleneck"):
        out = run_pipe(pipe, family, **size)
        stats = da.stats(pipe)
    assert out.shape == baseline.shape and torch.isfinite(out).all()
    assert [s["stage"] for s in stats["steps"]] == [0, 1, 1, 1, 2]  # 5 steps split 4 : 13 : 8


def test_flux_stage_shapes_ids_and_schedules():
    pipe = tiny_pipeline("flux")
    seen = []

    def record(module, args, kwargs):
        seen.append((kwargs["hidden_states"].shape[1], kwargs["img_ids"].shape[0],
                     int(kwargs["img_ids"][:, 1].max()) + 1, float(kwargs["timestep"][0])))

    hook = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    text_calls = []
    text_hook = pipe.text_encoder_2.register_forward_hook(lambda *a: text_calls.append(1))
    try:
        with da.accelerated(pipe, "bottleneck", steps=(2, 3, 2), start_sigmas=(1.0, 0.8, 0.6),
                            shifts=(None, 1.0, 1.0)):
            run_pipe(pipe, "flux", height=64, width=64, num_inference_steps=7, negative_prompt=None)
    finally:
        hook.remove()
        text_hook.remove()
    tokens = [s[0] for s in seen]
    assert tokens == [256, 256, 64, 64, 64, 256, 256]  # (64/4)^2 at full, (32/4)^2 at half (tiny VAE: 2x, packing 2x)
    assert all(s[1] == s[0] for s in seen)  # position ids rebuilt for every stage
    assert [s[2] for s in seen] == [16, 16, 8, 8, 8, 16, 16]  # grid height in the ids
    stage1 = [s[3] for s in seen[2:5]]
    assert stage1 == pytest.approx((stage_sigmas(0.8, 3, 1.0)).tolist(), abs=1e-6)
    assert seen[5][3] == pytest.approx(0.6, abs=1e-6)
    assert len(text_calls) == 1  # T5 prompt embedding computed once, replayed in stages 1 and 2


def test_composes_with_delta_cache_and_resets_per_stage():
    pipe = tiny_pipeline("sd3")
    with da.accelerated(pipe, {"method": "bottleneck", "steps": [2, 4, 2]},
                        {"method": "delta_cache", "interval": 2, "num_cached_blocks": 2},
                        {"method": "adaptive_guidance", "threshold": 1.0}):
        out = run_pipe(pipe, "sd3", height=64, width=64, num_inference_steps=8)
        steps = da.stats(pipe)["steps"]
    assert torch.isfinite(out).all()
    first_of_stage = [s for s in steps if s["step"] == 0]
    assert len(first_of_stage) == 3 and all(not s["blocks_skipped"] for s in first_of_stage)
    assert any(s["blocks_skipped"] for s in steps)


def test_invalid_schedules_are_clear_errors():
    pipe = tiny_pipeline("flux")
    before = fingerprint(pipe)
    with pytest.raises(ValueError, match="stages cannot be empty"):
        da.apply(pipe, "bottleneck", steps=(2, 0, 2))
    with pytest.raises(ValueError, match="must start from pure noise"):
        da.apply(pipe, "bottleneck", start_sigmas=(0.9, 0.8, 0.6))
    with pytest.raises(ValueError, match="one value per stage"):
        da.apply(pipe, "bottleneck", start_sigmas=(1.0, 0.8))
    assert fingerprint(pipe) == before
    with da.accelerated(pipe, "bottleneck", scales=(1.0, 0.3, 1.0)):
        with pytest.raises(ValueError, match="not a multiple of 4"):
            run_pipe(pipe, "flux", height=64, width=64, num_inference_steps=6)
    with pytest.raises(ValueError, match="supports the families"):
        da.apply(tiny_pipeline("pixart_alpha"), "bottleneck")


def test_step_split_follows_the_paper_fractions():
    config = BottleneckConfig()
    assert config.stage_steps(25) == [4, 13, 8]
    assert sum(config.stage_steps(20)) == 20 and min(config.stage_steps(3)) == 1
