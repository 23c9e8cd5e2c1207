"""Every family: the tiny pipeline runs offline, and every applicable method applies, runs and removes cleanly."""

from __future__ import annotations

import pytest
import torch
from diffusion_accel.pipelines.adapters import find_adapter

import diffusion_accel as da
from diffusion_accel.config import parse_config
from diffusion_accel.testing import FAMILIES, fingerprint, router_spec, run_pipe, tiny_pipeline


def test_families_cover_the_issue_list():
    expected = {"dit", "pixart_alpha", "pixart_sigma", "sd3", "flux", "cogvideox", "wan", "hunyuan_video",
                "ltx_video", "sd", "wan22", "qwen_image", "flux2", "sana", "cogview4", "mochi", "hunyuan_video15",
                "ovis_image", "ltx2"}
    assert expected <= set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_applicable_method_is_reversible(family):
    pipe = tiny_pipeline(family)
    baseline = run_pipe(pipe, family)
    before = fingerprint(pipe)  # after one call: pipelines set their own attributes (_guidance_scale, ...)
    assert torch.isfinite(baseline).all()
    methods = da.list_methods(pipe)
    if family != "sd":  # less only what the family's adapter refuses, with its reason
        unsupported = set(find_adapter(pipe).unsupported_methods)
        assert {"delta_cache", "magcache", "taylorseer"} - unsupported <= set(methods)
    adapter = find_adapter(pipe)
    if adapter.block_lists:  # a learned cache router needs a trained file: a random one for this family
        router = router_spec(pipe, family)
        if parse_config(router).not_applicable_reason(adapter, pipe) is None:
            methods.append(router)
        else:
            assert "harmonica" in adapter.unsupported_methods, parse_config(router).not_applicable_reason(adapter, pipe)
    for name in [None, *methods]:
        handle = da.apply(pipe) if name is None else da.apply(pipe, name)
        out = run_pipe(pipe, family)
        assert out.shape == baseline.shape and torch.isfinite(out).all(), name
        stats = da.stats(pipe)
        assert stats["nfe"] >= 1 and stats["num_steps"] == 4, (name, stats["num_steps"])
        handle.remove()
        assert fingerprint(pipe) == before, name
        again = run_pipe(pipe, family)
        assert torch.equal(again, baseline), f"{family}/{name}: output changed after remove()"


@pytest.mark.parametrize("family", ["pixart_alpha", "flux", "wan"])
def test_methods_actually_change_work(family):
    """Δ-cache with its defaults skips blocks on this tiny schedule (the counters see it)."""
    pipe = tiny_pipeline(family)
    with da.accelerated(pipe, "delta_cache"):
        run_pipe(pipe, family)
        stats = da.stats(pipe)
    assert stats["blocks_run"] < stats["blocks_total"]
    skipped_steps = [s for s in stats["steps"] if s["blocks_skipped"]]
    assert skipped_steps and all(s["step"] % 2 == 1 for s in skipped_steps)


def test_state_follows_the_expert_switch():
    """Wan 2.2: both experts are hooked under one call (steps and blocks of both counted), and each has its own
    Δ-cache: at the switch the low-noise expert computes in full, since the high-noise expert's cached deviations
    are not its own, although a single-expert Wan skips blocks on that (odd) step."""
    pipe = tiny_pipeline("wan22")
    pipe.register_to_config(boundary_ratio=0.99)  # timesteps 1000, 934, 781, 47: the switch comes at step 1
    baseline = run_pipe(pipe, "wan22")
    seen = {"transformer": [], "transformer_2": []}
    with da.accelerated(pipe, "delta_cache"):
        hooks = [getattr(pipe, name).register_forward_pre_hook(
            lambda module, args, kwargs, name=name: seen[name].append(float(kwargs["timestep"][0])), with_kwargs=True)
            for name in seen]
        run_pipe(pipe, "wan22")
        stats = da.stats(pipe)
        for hook in hooks:
            hook.remove()
    assert len(seen["transformer"]) == 2 and len(seen["transformer_2"]) == 6  # CFG: two passes per step
    assert stats["num_steps"] == 4 and [s["step"] for s in stats["steps"]] == [0, 1, 2, 3]
    skipped = {s["step"]: s["blocks_skipped"] for s in stats["steps"]}
    assert skipped[1] == [] and skipped[3], skipped  # step 1: first step of the second expert; 3: its own cache
    single = tiny_pipeline("wan")
    with da.accelerated(single, "delta_cache"):
        run_pipe(single, "wan")
        assert {s["step"]: s["blocks_skipped"] for s in da.stats(single)["steps"]}[1]
    assert torch.equal(run_pipe(pipe, "wan22"), baseline)
