"""LinearAG: the least-squares fit, saving/loading by name, and the NFE schedule."""

from __future__ import annotations

import pytest
import torch

import diffusion_accel as da
from diffusion_accel.calibrate import calibrate_linear_ag, calibration_set
from diffusion_accel.methods.linear_ag import fit_coefficients, load_coefficients, save_coefficients
from diffusion_accel.testing import run_pipe


def test_fit_recovers_known_affine_model():
    gen = torch.Generator().manual_seed(0)
    trajectories = []
    for _ in range(3):
        cond = torch.randn(5, 2, 4, 4, generator=gen)
        uncond = torch.empty_like(cond)
        uncond[0] = torch.randn(2, 4, 4, generator=gen)
        for k in range(1, 5):
            uncond[k] = 0.5 * cond[k] + 0.3 * uncond[k - 1] + 0.1 * cond[k - 1]
        trajectories.append((cond, uncond))
    coefficients = fit_coefficients(trajectories, ridge=0.0)
    assert coefficients[0].tolist() == [1.0, 0.0, 0.0]
    assert torch.allclose(coefficients[1:], torch.tensor([0.5, 0.3, 0.1]).expand(4, 3), atol=1e-5)


def test_save_and_load_roundtrip(tmp_path):
    path = save_coefficients(tmp_path / "model-8", torch.arange(6.0).view(2, 3), {"family": "x", "steps": 2})
    coefficients, metadata = load_coefficients(str(path))
    assert coefficients.tolist() == [[0, 1, 2], [3, 4, 5]] and metadata["steps"] == 2
    with pytest.raises(ValueError, match="calibrate linear_ag"):
        load_coefficients("no-such-coefficients")


def test_calibrate_apply_and_schedule(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_ACCEL_LINEAR_AG", str(tmp_path))
    cal = calibration_set("tiny:pixart_alpha", num_prompts=2, steps=8)
    result = calibrate_linear_ag(cal, tmp_path / "tiny-pixart-8")
    pipe = cal.pipe
    assert "linear_ag" not in da.list_methods(pipe)  # no coefficients by default
    with pytest.raises(ValueError, match="needs fitted coefficients"):
        da.apply(pipe, "linear_ag")
    baseline = run_pipe(pipe, "pixart_alpha", num_inference_steps=8)
    with da.accelerated(pipe, "linear_ag", coefficients="tiny-pixart-8"):
        out = run_pipe(pipe, "pixart_alpha", num_inference_steps=8)
        stats = da.stats(pipe)
    # steps 0-3: true uncond at 0 and 2, estimated at 1 and 3; steps 4-7 conditional-only
    assert [s["uncond_skipped"] for s in stats["steps"]] == [0, 1, 0, 1, 1, 1, 1, 1]
    assert torch.isfinite(out).all() and not torch.equal(out, baseline)
    with da.accelerated(pipe, "adaptive_guidance", threshold=-0.5, min_step=3):
        ag = run_pipe(pipe, "pixart_alpha", num_inference_steps=8)
        assert da.stats(pipe)["uncond_skipped"] == 4
    assert result["config"]["method"] == "linear_ag"
    # split = 1: the linear estimate on every odd step, true CFG on the even ones, no cond-only tail
    with da.accelerated(pipe, {"method": "linear_ag", "coefficients": result["coefficients"], "split": 1.0}):
        run_pipe(pipe, "pixart_alpha", num_inference_steps=8)
        assert [s["uncond_skipped"] for s in da.stats(pipe)["steps"]] == [0, 1] * 4
    assert torch.isfinite(ag).all()
