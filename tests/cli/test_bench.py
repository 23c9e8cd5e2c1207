"""The side-by-side bench harness writes the JSON (exact keys), table and PNGs, and lists peers it cannot run."""

from __future__ import annotations

import json

from diffusion_accel.bench import METRIC_KEYS, markdown_table, parse_method_specs, run_bench


def test_bench_outputs_and_keys(tmp_path):
    report = run_bench("tiny:flux", "baseline,delta_cache,fbcache:threshold=0.2,fastercache,steps=2",
                       num_prompts=2, steps=4, repeats=1, out_dir=tmp_path, json_path=tmp_path / "out.json")
    data = json.loads((tmp_path / "out.json").read_text())
    assert set(data["methods"]) == {"baseline", "delta_cache", "fbcache:threshold=0.2", "steps=2"}
    for row in data["methods"].values():
        assert set(row) == set(METRIC_KEYS)
    assert "fastercache" in data["skipped"] and "supports the families" in data["skipped"]["fastercache"]
    assert data["methods"]["baseline"]["speedup_wall"] == 1.0 and data["methods"]["baseline"]["macs_ratio"] == 1.0
    assert data["methods"]["delta_cache"]["macs_ratio"] > 1.1
    assert data["methods"]["steps=2"]["macs_ratio"] > 1.9
    assert 0 < data["methods"]["delta_cache"]["psnr_vs_baseline"] < 100
    assert data["methods"]["steps=2"]["nfe"] == 4  # 2 steps x 2 passes (true CFG)
    for name in ("bench.md", "grid.png", "pareto.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "skipped:" in markdown_table(report)


def test_method_spec_parsing():
    specs = parse_method_specs("delta_cache:interval=3:num_cached_blocks=0.5,adaptive_guidance+delta_cache,steps=7,"
                               "bottleneck:start_sigmas=[1.0,0.7,0.5]")
    assert [s.label for s in specs][0] == "baseline"
    assert specs[1].configs[0].interval == 3 and specs[1].configs[0].num_cached_blocks == 0.5
    assert [c.name for c in specs[2].configs] == ["adaptive_guidance", "delta_cache"]
    assert specs[3].call_overrides == {"num_inference_steps": 7}
    assert specs[4].configs[0].start_sigmas == (1.0, 0.7, 0.5)


def test_quality_tier_counts_macs_over_every_prompt(tmp_path):
    """Quality tier: the denoiser MACs are the sum over all prompts' calls (the mean cost of per-prompt-adaptive
    methods), i.e. n prompts cost n times one prompt for a method whose work does not depend on the prompt."""
    import diffusion_accel as da
    from diffusion_accel.bench import MethodSpec, call_kwargs, count_denoiser_macs
    from diffusion_accel.loading import base_call_kwargs

    report = run_bench("tiny:flux", "baseline,steps=2", num_prompts=3, steps=4, repeats=1, batch_size=1,
                       tier="quality", out_dir=tmp_path, shape_metrics=False)
    settings = report["settings"]
    assert settings["macs_counted_over"] == "all prompts"
    pipe = da.load_pipeline("tiny:flux")
    pipe.set_progress_bar_config(disable=True)
    kwargs = call_kwargs(pipe, "flux", ["a red circle"], base_call_kwargs("tiny:flux"), 4, None, None, [0])
    one = count_denoiser_macs(pipe, kwargs, MethodSpec(label="baseline"))
    assert settings["denoiser_macs"]["baseline"] == 3 * one
    assert report["methods"]["steps=2"]["macs_ratio"] == 2.0
