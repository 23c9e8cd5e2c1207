"""Pipelines sharing one denoiser (``from_pipe``, ``Cls(**pipe.components)``): methods act only on the pipeline
they were applied to; each patched pipeline has its own methods, state and statistics; removal in any order."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import diffusion_accel as da
from diffusion_accel.testing import fingerprint, run_pipe, tiny_pipeline


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _flux_img2img_call(pipe) -> torch.Tensor:
    out = pipe(prompt="a red circle", image=torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
               strength=0.8, height=32, width=32, num_inference_steps=4, max_sequence_length=16, true_cfg_scale=4.0,
               negative_prompt="blurry", generator=torch.Generator().manual_seed(0), output_type="pt")
    return out.images.float()


def _second(pipe, family, how):
    """A second pipeline on the same components, and a function that calls it."""
    if how == "components":
        other = _quiet(type(pipe)(**pipe.components))
    elif family == "flux":
        from diffusers import AutoPipelineForImage2Image

        other = _quiet(AutoPipelineForImage2Image.from_pipe(pipe))
        assert type(other).__name__ == "FluxImg2ImgPipeline"
        return other, lambda: _flux_img2img_call(other)
    else:
        other = _quiet(type(pipe).from_pipe(pipe))
    assert other.transformer is pipe.transformer
    return other, lambda: run_pipe(other, family)


@pytest.mark.parametrize(("family", "how"), [("pixart_alpha", "from_pipe"), ("flux", "from_pipe"),
                                             ("wan", "from_pipe"), ("pixart_alpha", "components")])
def test_unpatched_second_pipeline_is_untouched(family, how):
    pipe = tiny_pipeline(family)
    other, call_other = _second(pipe, family, how)
    baseline, other_baseline = run_pipe(pipe, family), call_other()
    handle = da.apply(pipe, "delta_cache", interval=2)
    try:
        cached = run_pipe(pipe, family)
        stats = da.stats(pipe)
        assert not torch.equal(cached, baseline), "the method should act on the patched pipeline"
        assert torch.equal(call_other(), other_baseline), "the second pipeline ran the first one's method"
        assert da.stats(pipe) == stats, "the second pipeline's calls were counted in the first one's stats"
        with pytest.raises(ValueError, match="needs a pipeline patched"):
            da.stats(other)
        assert torch.equal(run_pipe(pipe, family), cached)  # its own per-call reset still runs
    finally:
        handle.remove()
    assert torch.equal(run_pipe(pipe, family), baseline)
    assert torch.equal(call_other(), other_baseline)


def _shared_pair(family):
    """A pipeline, a second one sharing its components, the untouched output and the model's fingerprint."""
    pipe = tiny_pipeline(family)
    other = _quiet(type(pipe).from_pipe(pipe))
    return pipe, other, run_pipe(pipe, family), fingerprint(pipe)


def _alone(family, *configs, **options) -> tuple[torch.Tensor, int]:
    """Output and blocks run of a method on a pipeline of its own."""
    pipe = tiny_pipeline(family)
    with da.accelerated(pipe, *configs, **options):
        return run_pipe(pipe, family), da.stats(pipe)["blocks_run"]


@pytest.mark.parametrize("first_removed", ["first", "second"])
def test_both_pipelines_patched_each_with_its_own_methods(first_removed):
    family = "pixart_alpha"
    pipe, other, baseline, before = _shared_pair(family)
    delta, delta_blocks = _alone(family, "delta_cache", interval=2)
    fbcache, fb_blocks = _alone(family, "fbcache", threshold=0.5)
    assert not torch.equal(delta, fbcache)

    first = da.apply(pipe, "delta_cache", interval=2)
    second = da.apply(other, "fbcache", threshold=0.5)
    for _ in range(2):  # interleaved calls: each pipeline's state resets per call and never leaks into the other
        assert torch.equal(run_pipe(pipe, family), delta)
        assert torch.equal(run_pipe(other, family), fbcache)
    assert da.stats(pipe)["blocks_run"] == delta_blocks and da.stats(other)["blocks_run"] == fb_blocks
    assert da.stats(pipe)["methods"] != da.stats(other)["methods"]

    removed, kept, kept_pipe, kept_out = ((first, second, other, fbcache) if first_removed == "first"
                                          else (second, first, pipe, delta))
    removed.remove()
    assert torch.equal(run_pipe(kept_pipe, family), kept_out), "removing one pipeline's methods broke the other's"
    assert torch.equal(run_pipe(pipe if kept_pipe is other else other, family), baseline)
    kept.remove()
    assert fingerprint(pipe) == before
    assert torch.equal(run_pipe(pipe, family), baseline) and torch.equal(run_pipe(other, family), baseline)


def test_same_method_on_two_pipelines_sharing_the_denoiser():
    family = "wan"
    pipe, other, baseline, before = _shared_pair(family)
    two, _ = _alone(family, "delta_cache", interval=2)
    three, _ = _alone(family, "delta_cache", interval=3)
    with da.accelerated(pipe, "delta_cache", interval=2), da.accelerated(other, "delta_cache", interval=3):
        assert torch.equal(run_pipe(other, family), three)
        assert torch.equal(run_pipe(pipe, family), two)
        assert da.stats(pipe)["nfe"] == da.stats(other)["nfe"] == 8
    assert fingerprint(pipe) == before
    assert torch.equal(run_pipe(pipe, family), baseline)


def test_one_diffusers_cache_per_shared_denoiser():
    """Diffusers registers its cache hooks under fixed names and keeps one cache per model: a second is refused."""
    pipe = tiny_pipeline("flux")
    other = _quiet(type(pipe).from_pipe(pipe))
    with da.accelerated(pipe, "fbcache"):
        applied = fingerprint(other)
        for name in ("fbcache", "taylorseer"):
            with pytest.raises(ValueError, match=r"shared with another pipeline.*diffusion_accel.remove"):
                da.apply(other, name)
            assert fingerprint(other) == applied
        da.apply(other, "delta_cache").remove()  # a method of our own can still go on the other pipeline


@pytest.mark.skipif(importlib.util.find_spec("cache_dit") is None, reason="cache-dit not installed")
def test_cache_dit_acts_only_on_its_pipeline_and_does_not_share():
    family = "pixart_alpha"
    pipe = tiny_pipeline(family)
    other = _quiet(type(pipe)(**pipe.components))
    baseline = run_pipe(other, family)
    before = fingerprint(pipe)
    with da.accelerated(pipe, "dbcache", max_warmup_steps=1, residual_diff_threshold=0.5):
        assert not torch.equal(run_pipe(pipe, family), baseline)
        assert torch.equal(run_pipe(other, family), baseline)
        with pytest.raises(ValueError, match=r"dbcache replaces the transformer's forward.*remove"):
            da.apply(other, "delta_cache")
    with da.accelerated(pipe, "delta_cache"):
        with pytest.raises(ValueError, match=r"dbcache replaces the transformer's forward.*remove"):
            da.apply(other, "dbcache")
    assert fingerprint(pipe) == before
    assert torch.equal(run_pipe(pipe, family), baseline)
