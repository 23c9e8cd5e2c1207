"""Every family: the tiny pipeline runs offline, and every applicable method applies, runs and removes cleanly."""

from __future__ import annotations

import re

import pytest
import torch
from diffusion_accel.pipelines.adapters import find_adapter

import diffusion_accel as da
from diffusion_accel.config import parse_config
from diffusion_accel.testing import FAMILIES, fingerprint, pipe_outputs, router_spec, run_pipe, tiny_pipeline


def test_families_cover_the_issue_list():
    expected = {"dit", "pixart_alpha", "pixart_sigma", "sd3", "flux", "cogvideox", "wan", "hunyuan_video",
                "ltx_video", "sd", "wan22", "qwen_image", "flux2", "sana", "cogview4", "mochi", "hunyuan_video15",
                "ovis_image", "ltx2", "z_image"}
    assert expected <= set(FAMILIES)


def _taylorseer_on_self_attention(adapter) -> dict:
    """TaylorSeer told the adapter's self-attention modules, for denoisers whose attention is not named like
    TaylorSeer's default identifiers (``attn``, ``attn1``, ...): Z-Image's ``layers.<i>.attention``."""
    names = "|".join(re.escape(n) for n in adapter.extra.get("self_attention", ()))
    return {"method": "taylorseer",
            "cache_identifiers": [rf"^{re.escape(blocks)}\.\d+\.(?:{names})$" for blocks in adapter.block_lists]}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_applicable_method_is_reversible(family):
    pipe = tiny_pipeline(family)
    baseline = pipe_outputs(pipe, family)  # every output: LTX-2's audio as well as its video
    before = fingerprint(pipe)  # after one call: pipelines set their own attributes (_guidance_scale, ...)
    assert all(torch.isfinite(value).all() for value in baseline.values())
    methods: list = da.list_methods(pipe)
    if family != "sd":  # less only what the family's adapter refuses, with its reason
        adapter = find_adapter(pipe)
        unsupported = set(adapter.unsupported_methods)
        assert {"delta_cache", "magcache"} - unsupported <= set(methods)
        if "taylorseer" not in methods and "taylorseer" not in unsupported:
            # not offered with its defaults: it must run when told the self-attention modules (its error says so)
            with pytest.raises(ValueError, match="cache_identifiers"):
                da.apply(pipe, "taylorseer")
            methods.append(_taylorseer_on_self_attention(adapter))
    adapter = find_adapter(pipe)
    if adapter.block_lists:  # a learned cache router needs a trained file: a random one for this family
        router = router_spec(pipe, family)
        reason = parse_config(router).not_applicable_reason(adapter, pipe)
        assert reason is None or "harmonica" in adapter.unsupported_methods, reason
        if reason is None:
            methods.append(router)
    for spec in [None, *methods]:
        name = spec if spec is None or isinstance(spec, str) else spec["method"]
        handle = da.apply(pipe) if spec is None else da.apply(pipe, spec)
        out = pipe_outputs(pipe, family)
        assert out.keys() == baseline.keys(), name
        for field, value in out.items():
            assert value.shape == baseline[field].shape and torch.isfinite(value).all(), (name, field)
        stats = da.stats(pipe)
        assert stats["nfe"] >= 1 and stats["num_steps"] == 4, (name, stats["num_steps"])
        handle.remove()
        assert fingerprint(pipe) == before, name
        again = pipe_outputs(pipe, family)
        for field, value in baseline.items():
            assert torch.equal(again[field], value), f"{family}/{name}: {field} changed after remove()"


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


def test_guidance_passes_of_their_own_are_keyed_apart():
    """LTX-2 runs, per step, the batched CFG pass and two cond-only guidance passes in cache contexts of their own
    ("uncond_stg", "uncond_modality"): their rows carry those names, so Δ-cache keeps a cache per pass and skips
    blocks in each (reusing the CFG pass's cond deviations for them would mix different computations)."""
    pipe = tiny_pipeline("ltx2")
    baseline = pipe_outputs(pipe, "ltx2")
    handle = da.apply(pipe, "delta_cache")
    rows = []
    hook = pipe.transformer.register_forward_hook(lambda *_: rows.append(list(handle.session.context.rows)))
    try:
        pipe_outputs(pipe, "ltx2")
        stats = da.stats(pipe)
    finally:
        hook.remove()
        handle.remove()
    assert rows[:3] == [[("uncond", 0), ("cond", 0)], [("uncond_stg", 0)], [("uncond_modality", 0)]]
    assert len(rows) == 12 and rows[3:] == rows[:3] * 3
    skipped = [s for s in stats["steps"] if s["blocks_skipped"]]
    # each of the three passes of a skipping step reuses its own cached deviations: no block runs in any of them
    assert skipped and all(s["nfe"] == 3 and s["blocks_run"] == 0 for s in skipped)
    again = pipe_outputs(pipe, "ltx2")
    assert all(torch.equal(again[field], value) for field, value in baseline.items())
