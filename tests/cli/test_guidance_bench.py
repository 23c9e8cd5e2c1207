"""Smoke test of the guidance benchmark (AG vs the matched static cutoff vs LinearAG) on a tiny pipeline."""

from __future__ import annotations

import json

from diffusion_accel.benchmarks import guidance


def test_guidance_bench_matches_the_cutoff_budget_and_times_a_batch(tmp_path, capsys):
    out = tmp_path / "g"
    code = guidance.main(["--pipeline", "tiny:pixart_alpha", "--prompts", "2", "--calibration-prompts", "2",
                          "--repeats", "1", "--timing-batch", "2", "--threshold", "0.5", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "guidance.json").read_text())
    settings = report["settings"]
    assert settings["timing_batch"] == 2
    steps = settings["steps"]
    cutoff = settings["matched_cutoff_step"]
    assert cutoff == round(steps - settings["ag_uncond_skipped_per_sample"])
    labels = set(report["methods"])
    assert f"cfg_cutoff:cutoff_step_index={cutoff}" in labels
    assert any(label.startswith("linear_ag:coefficients=") for label in labels)
    assert "static cutoff at step" in capsys.readouterr().out
