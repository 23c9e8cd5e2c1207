"""The hook engine: step context, CFG rows, per-call reset, statistics, stacking with Diffusers' own hooks."""

from __future__ import annotations

import torch
from diffusers.hooks import ModelHook

import diffusion_accel as da
from diffusion_accel.testing import fingerprint, run_pipe, tiny_pipeline


class _Recorder(ModelHook):
    """Records the session's step context at every denoiser forward (registered inside the context hook)."""

    def __init__(self, session):
        super().__init__()
        self.session = session
        self.seen = []

    def pre_forward(self, module, *args, **kwargs):
        ctx = self.session.context
        self.seen.append((ctx.stage, ctx.step_index, ctx.num_steps, ctx.branch, list(ctx.rows)))
        return args, kwargs


def _record(pipe, family, **call):
    handle = da.apply(pipe)
    session = handle.session
    recorder = _Recorder(session)
    # Register inside the context hook: remove it, add the recorder, put the context hook back outermost.
    from diffusion_accel.session import _CONTEXT_HOOK, DenoiserContextHook

    registry = session.denoiser._diffusers_hook
    registry.remove_hook(_CONTEXT_HOOK, recurse=False)
    session.register_hook(session.denoiser, recorder, "test.recorder")
    session.register_hook(session.denoiser, DenoiserContextHook(session), _CONTEXT_HOOK)
    try:
        run_pipe(pipe, family, **call)
        stats = da.stats(pipe)
    finally:
        handle.remove()
    return recorder.seen, stats


def test_batched_cfg_rows_uncond_first():
    pipe = tiny_pipeline("pixart_alpha")
    seen, stats = _record(pipe, "pixart_alpha", num_images_per_prompt=2)
    assert [s[1] for s in seen] == [0, 1, 2, 3] and all(s[2] == 4 for s in seen)
    assert seen[0][3] == "batched"
    assert seen[0][4] == [("uncond", 0), ("uncond", 1), ("cond", 0), ("cond", 1)]
    assert stats["nfe"] == 4 and stats["steps"][0]["rows"] == 4


def test_dit_is_cond_first():
    seen, _ = _record(tiny_pipeline("dit"), "dit")
    assert seen[0][4] == [("cond", 0), ("uncond", 0)]


def test_no_cfg_rows_are_all_cond():
    seen, _ = _record(tiny_pipeline("pixart_alpha"), "pixart_alpha", guidance_scale=1.0)
    assert seen[0][3] == "cond" and seen[0][4] == [("cond", 0)]


def test_separate_passes_from_cache_context():
    seen, stats = _record(tiny_pipeline("wan"), "wan")
    assert [s[3] for s in seen[:2]] == ["cond", "uncond"]
    assert [s[1] for s in seen] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert stats["nfe"] == 8 and stats["num_steps"] == 4


def test_flux_true_cfg_separate_and_guidance_free():
    seen, _ = _record(tiny_pipeline("flux"), "flux")
    assert [s[3] for s in seen[:2]] == ["cond", "uncond"]
    seen, _ = _record(tiny_pipeline("flux"), "flux", negative_prompt=None)
    assert {s[3] for s in seen} == {"cond"} and len(seen) == 4


def test_heun_scheduler_two_forwards_per_step():
    """The step comes from the timestep, not a forward counter: Heun evaluates twice per step."""
    from diffusers import HeunDiscreteScheduler

    pipe = tiny_pipeline("pixart_alpha")
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    seen, stats = _record(pipe, "pixart_alpha")
    steps = [s[1] for s in seen]
    assert len(seen) == 7  # 2 * 4 - 1 denoiser calls
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 3
    assert all(s[2] == 4 for s in seen)
    assert stats["num_steps"] == 4


def test_stats_table_and_per_call_reset():
    pipe = tiny_pipeline("pixart_alpha")
    with da.accelerated(pipe, "delta_cache"):
        first = run_pipe(pipe, "pixart_alpha")
        stats_first = da.stats(pipe)
        second = run_pipe(pipe, "pixart_alpha")
        stats_second = da.stats(pipe)
    assert torch.equal(first, second), "state leaked from the first call into the second"
    assert stats_first["nfe"] == stats_second["nfe"] == 4
    table = str(stats_second)
    lines = table.splitlines()
    assert "delta_cache" in table and "blocks run" in table and len(lines) == 3 + 4 + 2  # + compile, cache memory
    assert lines[-2].startswith("compile: ") and lines[-1].startswith("cache memory: ")
    assert all(s["wall_time_s"] >= 0 for s in stats_second["steps"])


def test_stacks_with_diffusers_layerwise_casting():
    """Our hooks stack on top of Diffusers' own hooks and come off without disturbing them."""
    pipe = tiny_pipeline("pixart_alpha")
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    baseline = run_pipe(pipe, "pixart_alpha")
    before = fingerprint(pipe)
    with da.accelerated(pipe, "delta_cache", interval=1):
        same = run_pipe(pipe, "pixart_alpha")
    assert torch.equal(same, baseline)
    assert fingerprint(pipe) == before
    assert torch.equal(run_pipe(pipe, "pixart_alpha"), baseline)


def test_class_swap_is_transparent():
    pipe = tiny_pipeline("pixart_alpha")
    original = type(pipe)
    with da.accelerated(pipe):
        assert isinstance(pipe, original) and type(pipe).__name__ == original.__name__
    assert type(pipe) is original


def test_stacks_with_diffusers_group_offloading():
    pipe = tiny_pipeline("flux")
    pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                          offload_type="block_level", num_blocks_per_group=1)
    baseline = run_pipe(pipe, "flux")
    before = fingerprint(pipe)
    with da.accelerated(pipe, "delta_cache", interval=1):
        assert torch.equal(run_pipe(pipe, "flux"), baseline)
    with da.accelerated(pipe, "delta_cache"):
        cached = run_pipe(pipe, "flux")
        assert da.stats(pipe)["blocks_run"] < da.stats(pipe)["blocks_total"]
    assert torch.isfinite(cached).all()
    assert fingerprint(pipe) == before
    assert torch.equal(run_pipe(pipe, "flux"), baseline)


def test_statistics_module_is_importable_beside_the_stats_function():
    import importlib

    import diffusion_accel as da

    module = importlib.import_module("diffusion_accel.call_stats")
    assert hasattr(module, "CallStats") and callable(da.stats)


def test_method_extension_points_are_declared_on_the_base_classes():
    from diffusion_accel.config import MethodConfig
    from diffusion_accel.method import Method

    assert MethodConfig.exclusive_group is None
    assert Method.wrap_call(None, None, lambda pipe, x: (pipe, x), "pipe", 1) == ("pipe", 1)
