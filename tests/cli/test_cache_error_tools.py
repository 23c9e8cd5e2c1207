"""The two diagnostics for the quality benchmarks: the per-step cache error and the random-perturbation control."""

from __future__ import annotations

import math

import pytest
import torch
from diffusion_accel.pipelines.adapters import adapters

from diffusion_accel.benchmarks import cache_error, perturbation_control


def test_baseline_has_no_error_and_profiles_the_guidance_term():
    report = cache_error.measure_cache_error("tiny:dit", "baseline", num_prompts=2, batch_size=2)  # uncond second
    assert report["approximated_steps"] == []
    assert [row["step"] for row in report["per_step"]] == [0, 1, 2, 3]
    for row in report["per_step"]:
        assert row["err_guided"] == row["err_guidance"] == row["err_cond"] == row["err_uncond"] == 0.0
        assert row["d_share"] > 0
    assert math.isnan(report["per_step"][0]["d_change"]) and report["per_step"][1]["d_change"] > 0


def test_delta_cache_error_appears_on_cached_steps_only():
    report = cache_error.measure_cache_error("tiny:pixart_alpha", "delta_cache:interval=2:num_cached_blocks=1",
                                             num_prompts=2, space="eps")
    assert report["approximated_steps"] == [1, 3]  # full every 2 steps (k % N == 0)
    rows = report["per_step"]
    assert rows[0]["err_guided"] == rows[2]["err_guided"] == 0.0
    assert rows[1]["err_cond"] > 0 and rows[1]["err_uncond"] > 0
    assert "delta_cache" in cache_error.markdown_table(report)


def test_separate_cfg_passes_are_paired_per_step():
    baseline = cache_error.measure_cache_error("tiny:wan", "baseline", num_prompts=1)
    assert [row["step"] for row in baseline["per_step"]] == [0, 1, 2, 3]  # two calls per step, one row
    assert all(row["err_guided"] == 0.0 and row["d_share"] > 0 for row in baseline["per_step"])
    cached = cache_error.measure_cache_error("tiny:wan", "delta_cache:interval=2:num_cached_blocks=1",
                                             num_prompts=1, space="native")
    assert cached["approximated_steps"] == [1, 3]


def test_calls_without_cfg_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="guidance-scale > 1"):
        cache_error.measure_cache_error("tiny:pixart_alpha", "baseline", num_prompts=1, guidance_scale=1.0)


def test_adaptive_guidance_drops_the_whole_guidance_term_after_the_switch():
    # γ̄ below any cosine: every sample switches after step 0, then u := c, so d = 0 and err_guidance = 1
    report = cache_error.measure_cache_error("tiny:pixart_alpha", "adaptive_guidance:threshold=-0.5", num_prompts=2,
                                             space="eps")
    rows = report["per_step"]
    assert rows[0]["err_guidance"] == 0.0
    assert [round(row["err_guidance"], 6) for row in rows[1:]] == [1.0, 1.0, 1.0]
    assert all(row["err_cond"] < 1e-5 for row in rows)  # the cond rows run alone: equal up to float rounding


def test_unknown_space_is_refused():
    with pytest.raises(ValueError, match="Unknown space"):
        cache_error.measure_cache_error("tiny:pixart_alpha", "baseline", num_prompts=1, space="latent")
    with pytest.raises(ValueError, match="Unknown space"):
        cache_error.StepErrorRecorder(torch.nn.Identity(), adapters()["pixart_alpha"], 4.0, None, space="latent")


def _noise_hook(kind: str, size: float, steps: set[int]) -> perturbation_control.PredictionNoise:
    return perturbation_control.PredictionNoise(adapters()["pixart_alpha"], kind, size, steps, guidance_scale=4.0,
                                                cfg=True)


def test_noise_reaches_the_guided_prediction_once_at_the_requested_size():
    torch.manual_seed(0)
    output = (torch.randn(4, 8, 6, 6),)  # batched CFG of 2 samples, learned σ (8 = 2 × 4 channels)
    hook = _noise_hook("white", 0.1, {0})
    perturbed = hook(torch.nn.Identity(), (), {}, (output[0].clone(),))[0]
    delta = perturbed - output[0]
    assert torch.equal(delta[:, 4:], torch.zeros_like(delta[:, 4:]))  # the σ channels are untouched
    u, c = delta[:2, :4], delta[2:, :4]
    assert torch.allclose(u, c)  # same noise in both branches: u + s (c − u) gets it exactly once
    guided = output[0][:2, :4] + 4.0 * (output[0][2:, :4] - output[0][:2, :4])
    ratio = u.pow(2).mean((1, 2, 3)).sqrt() / guided.pow(2).mean((1, 2, 3)).sqrt()
    assert torch.allclose(ratio, torch.full_like(ratio, 0.1), rtol=1e-4)
    # the next call is step 1, not in the set: unchanged
    again = hook(torch.nn.Identity(), (), {}, (output[0].clone(),))[0]
    assert torch.equal(again, output[0])


def test_channel_noise_is_one_offset_per_channel_and_size_zero_is_identity():
    output = torch.randn(2, 8, 5, 5)
    delta = _noise_hook("channel", 0.3, {0})(torch.nn.Identity(), (), {}, (output.clone(),))[0] - output
    assert torch.allclose(delta[:, :4], delta[:, :4, :1, :1].expand_as(delta[:, :4]))
    assert delta[:, :4].abs().sum() > 0
    same = _noise_hook("white", 0.0, {0})(torch.nn.Identity(), (), {}, (output.clone(),))[0]
    assert torch.equal(same, output)
    with pytest.raises(ValueError, match="noise kind"):
        _noise_hook("pink", 0.1, {0})
    with pytest.raises(ValueError, match="step set"):
        perturbation_control.step_set("middle", 20)
    assert perturbation_control.step_set("odd", 6) == {1, 3, 5}
    assert perturbation_control.step_set("late", 6) == {3, 4, 5}


def test_control_run_reports_psnr_against_the_untouched_run(tmp_path):
    report = perturbation_control.run_control("tiny:pixart_alpha", ["white"], ["all"], [0.0, 0.5], num_prompts=2)
    rows = report["rows"]
    assert [(r["kind"], r["size"]) for r in rows] == [("none", 0.0), ("white", 0.0), ("white", 0.5)]
    assert math.isinf(rows[1]["psnr_vs_baseline"])  # r = 0 reproduces the untouched run bit for bit
    assert math.isfinite(rows[2]["psnr_vs_baseline"])
    assert rows[2]["adherence"] is None  # shape metrics exist only for the testbed
    assert "| white | all | 0.5 |" in perturbation_control.markdown_table(report)


def test_control_refuses_bad_options_before_generating(monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the options were checked")

    monkeypatch.setattr(perturbation_control, "load_setup", no_loading)
    with pytest.raises(ValueError, match="noise kind"):
        perturbation_control.run_control("tiny:pixart_alpha", ["pink"], ["odd"], [0.1])
    with pytest.raises(ValueError, match="must be >= 0"):
        perturbation_control.run_control("tiny:pixart_alpha", ["white"], ["odd"], [-0.1])
    with pytest.raises(ValueError, match="step set"):
        perturbation_control.run_control("tiny:pixart_alpha", ["white"], ["middle"], [0.1])
