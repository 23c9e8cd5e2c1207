"""Paired adherence statistics (Newcombe's interval, exact McNemar, lost/gained counts), the FID-shapes bootstrap,
the bench's baseline cache and its invalidation, and the Pareto plot with many methods."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from diffusion_accel.eval.paired import (
    claim_within,
    fid_bootstrap,
    format_difference,
    half_width_needed,
    paired_counts,
    paired_difference_ci,
    paired_summary,
)


def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson's score interval written out (Newcombe 1998, single proportion, method 3)."""
    p = k / n
    centre, half = 2 * k + z * z, z * math.sqrt(z * z + 4 * k * (1 - p))
    return (centre - half) / (2 * (n + z * z)), (centre + half) / (2 * (n + z * z))


def test_newcombe_interval_on_the_altman_worked_example():
    """Altman et al., Statistics with Confidence (2000), Table 6.2: 41 pairs, 14 positive in both, 5 positive only
    in the first classification, none only in the second, 22 in neither. Difference 5/41 = 0.122. The interval is
    recomputed here from Newcombe's formula with hand-written Wilson limits (whose textbook values the next test
    checks) and pinned at 0.0115 to 0.2265."""
    low, high, p_value = paired_difference_ci(lost=0, gained=5, n=41, both=14)
    assert (5 / 41) == pytest.approx(paired_counts([1] * 14 + [0] * 27, [1] * 19 + [0] * 22).difference)
    l1, u1 = _wilson(19, 41)
    l2, u2 = _wilson(14, 41)
    p1, p2 = 19 / 41, 14 / 41
    phi = (14 * 22 - 0 * 5 - 41 / 2) / math.sqrt(19 * 22 * 14 * 27)
    expect_low = (p1 - p2) - math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    expect_high = (p1 - p2) + math.sqrt((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2)
    assert low == pytest.approx(expect_low, abs=1e-9) and high == pytest.approx(expect_high, abs=1e-9)
    assert low == pytest.approx(0.0115, abs=5e-4) and high == pytest.approx(0.2265, abs=5e-4)
    assert p_value == pytest.approx(2 * 0.5 ** 5)  # exact McNemar: all 5 discordant pairs one way


def test_wilson_limits_match_the_textbook_single_proportion():
    """Newcombe (1998, single proportion): 81/263 has Wilson limits 0.2553 to 0.3662."""
    low, high = _wilson(81, 263)
    assert low == pytest.approx(0.2553, abs=1e-4) and high == pytest.approx(0.3662, abs=1e-4)


def test_lost_and_gained_counts_on_a_hand_built_case():
    baseline = [True, True, True, False, False, True, False, True]
    method = [True, False, True, True, False, False, False, True]
    counts = paired_counts(baseline, method)
    assert (counts.n, counts.both, counts.lost, counts.gained, counts.neither) == (8, 3, 2, 1, 2)
    assert counts.difference == pytest.approx(-1 / 8)
    summary = paired_summary(baseline, method)
    assert summary["lost"] == 2 and summary["gained"] == 1
    assert summary["ci_low"] < summary["difference"] < summary["ci_high"]
    assert format_difference(summary).startswith("-12.5 [")
    with pytest.raises(ValueError):
        paired_counts([True], [True, False])


def test_interval_is_honest_without_discordant_pairs_and_when_all_go_one_way():
    low, high, p_value = paired_difference_ci(0, 0, 1024, both=900)
    assert low < 0 < high and high - low < 0.01 and p_value == 1.0
    low, high, _ = paired_difference_ci(13, 0, 64, both=41)
    assert low < -13 / 64 < high < 0  # not pinned to the point estimate
    assert claim_within(-0.029, 3) and not claim_within(-0.031, 3)
    assert half_width_needed(0.1) == 427


def test_half_width_shrinks_as_one_over_root_n():
    widths = [np.subtract(*paired_difference_ci(n // 20, n // 20, n, both=n * 8 // 10)[1::-1]) for n in (256, 1024)]
    assert widths[1] == pytest.approx(widths[0] / 2, rel=0.05)


def test_fid_bootstrap_brackets_the_estimate_and_pairs_cancel():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(2000, 8))
    mu, sigma = real.mean(0), np.cov(real, rowvar=False)
    feats = rng.normal(0.3, 1.0, size=(300, 8))
    out = fid_bootstrap(feats, mu, sigma, baseline_features=feats, resamples=50)
    assert out["ci_low"] < out["fid"] < out["ci_high"]
    assert out["difference"] == 0 and out["diff_ci_low"] == out["diff_ci_high"] == 0


# ------------------------------------------------------------------------------------------------ baseline cache
def test_baseline_cache_key_changes_with_pipeline_call_prompts_and_seeds(tmp_path):
    from diffusion_accel.bench import _folder_digest, baseline_cache_key

    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"abc")
    fingerprint = {"name": "x", "files": _folder_digest(weights)}
    call = {"num_inference_steps": 20, "guidance_scale": 4.5}
    key = baseline_cache_key(fingerprint, call, ["a red circle"], [0], 8, False)
    assert key == baseline_cache_key(fingerprint, dict(call), ["a red circle"], [0], 8, False)
    (weights / "model.safetensors").write_bytes(b"abd")  # same size, new content
    changed = {"name": "x", "files": _folder_digest(weights)}
    assert baseline_cache_key(changed, call, ["a red circle"], [0], 8, False) != key
    assert baseline_cache_key(fingerprint, {**call, "num_inference_steps": 12}, ["a red circle"], [0], 8,
                              False) != key
    assert baseline_cache_key(fingerprint, {**call, "guidance_scale": 3.0}, ["a red circle"], [0], 8, False) != key
    assert baseline_cache_key(fingerprint, call, ["a blue square"], [0], 8, False) != key
    assert baseline_cache_key(fingerprint, call, ["a red circle"], [1], 8, False) != key
    assert baseline_cache_key(fingerprint, call, ["a red circle"], [0], 4, False) != key


def test_bench_reuses_the_cached_baseline_and_regenerates_when_settings_change(tmp_path):
    from diffusion_accel.bench import run_bench

    def bench(name, **kwargs):
        options = {"num_prompts": 2, "steps": 2, "repeats": 1, "tier": "quality", "shape_metrics": False,
                   "cache_dir": tmp_path / "cache", **kwargs}
        return run_bench("tiny:flux", "baseline,steps=1", out_dir=tmp_path / name, **options)

    first = bench("a")
    second = bench("b")
    assert not first["settings"]["baseline_cache"]["hit"] and second["settings"]["baseline_cache"]["hit"]
    assert second["methods"]["steps=1"]["psnr_vs_baseline"] == first["methods"]["steps=1"]["psnr_vs_baseline"]
    assert second["settings"]["denoiser_macs"]["baseline"] == first["settings"]["denoiser_macs"]["baseline"]
    for changed in (bench("c", steps=3), bench("d", num_prompts=3), bench("e", seed=5),
                    bench("f", guidance_scale=2.0)):
        assert not changed["settings"]["baseline_cache"]["hit"]
    assert not bench("g", cache_dir=None)["settings"]["baseline_cache"]["hit"]
    files = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert files and set(files) <= {"baseline.safetensors", "record.json"}  # no pickle
    assert json.loads(next((tmp_path / "cache").rglob("record.json")).read_text())["key"]


def test_other_weights_invalidate_the_cache(tmp_path):
    import diffusion_accel as da
    from diffusion_accel.bench import pipeline_fingerprint

    one, two = da.load_pipeline("tiny:flux", seed=0), da.load_pipeline("tiny:flux", seed=1)
    assert pipeline_fingerprint("tiny:flux", one) == pipeline_fingerprint("tiny:flux", da.load_pipeline("tiny:flux"))
    assert pipeline_fingerprint("tiny:flux", one) != pipeline_fingerprint("tiny:flux", two)


# ------------------------------------------------------------------------------------------------ Pareto plot
def test_pareto_plot_with_ten_long_labels_and_macs_axis(tmp_path):
    from diffusion_accel.bench import markdown_table, pareto_plot, short_label

    methods = {"baseline": {"speedup_wall": 1.0, "macs_ratio": 1.0, "nfe": 20.0, "psnr_vs_baseline": math.inf,
                            "ssim_vs_baseline": 1.0, "adherence": 60 / 64, "fid_shapes": 120.0}}
    for i in range(10):
        summary = paired_summary([True] * 60 + [False] * 4, [True] * (60 - i) + [False] * (4 + i))
        methods[f"delta_cache:interval={i}:num_cached_blocks=5:boundary=12:warmup_steps=2"] = {
            "speedup_wall": 1 + i / 10, "macs_ratio": 1.2 + i / 10, "nfe": 20.0, "psnr_vs_baseline": 30.0,
            "ssim_vs_baseline": 0.9, "adherence": (60 - i) / 64, "fid_shapes": 120.0, "adherence_paired": summary,
            "fid_shapes_interval": {"ci_low": 110.0, "ci_high": 130.0}}
    report = {"settings": {"pipeline": "testbed:pixart", "family": "pixart_alpha", "tier": "quality", "steps": 20,
                           "num_prompts": 64, "repeats": 1, "distinct_prompts": 62}, "methods": methods}
    for axis in ("speedup_wall", "macs_ratio"):
        pareto_plot(report, tmp_path / f"{axis}.png", x=axis)
        assert (tmp_path / f"{axis}.png").stat().st_size > 0
    with pytest.raises(ValueError):
        pareto_plot(report, tmp_path / "bad.png", x="psnr")
    assert short_label("delta_cache:interval=2:num_cached_blocks=5") == "Δ i=2 ncb=5"
    table = markdown_table(report)
    assert "| lost | gained | adherence_diff_pts | fid_shapes_ci |" in table and "Newcombe" in table
