"""Diffusers' cache state agrees with ours: our Diffusers-cache methods go through the model's own
``enable_cache``/``disable_cache``, so ``is_cache_enabled`` and Diffusers' guards see them, in both orders."""

from __future__ import annotations

import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

import diffusion_accel as da
from diffusion_accel.testing import fingerprint, run_pipe, tiny_pipeline

#: Each Diffusers cache we wrap, on a family whose transformer mixes in CacheMixin, and that call's NFE.
WRAPPED = {"fbcache": "flux", "taylorseer": "flux", "magcache": "flux", "pab": "flux", "fastercache": "cogvideox"}
NFE = {"flux": 8, "cogvideox": 4}


def _user_configs():
    return [FirstBlockCacheConfig(threshold=0.1), TaylorSeerCacheConfig(cache_interval=2)]


@pytest.mark.parametrize("name", sorted(WRAPPED))
def test_ours_first_then_the_models_enable_and_disable_cache(name):
    family = WRAPPED[name]
    pipe = tiny_pipeline(family)
    transformer = pipe.transformer
    baseline = run_pipe(pipe, family)
    before = fingerprint(pipe)
    handle = da.apply(pipe, name)
    try:
        assert transformer.is_cache_enabled
        applied = fingerprint(pipe)
        for config in _user_configs():  # Diffusers' own guard refuses a second cache; nothing stacks
            with pytest.raises(ValueError, match="already been enabled"):
                transformer.enable_cache(config)
            assert fingerprint(pipe) == applied
        transformer.disable_cache()  # removes ours, as it would any cache enabled on the model
        assert not transformer.is_cache_enabled
        assert torch.equal(run_pipe(pipe, family), baseline)
        assert da.stats(pipe)["nfe"] == NFE[family]  # the session's own hooks above the cache still run
    finally:
        handle.remove()
    assert fingerprint(pipe) == before
    assert torch.equal(run_pipe(pipe, family), baseline)


@pytest.mark.parametrize("name", sorted(WRAPPED))
def test_the_models_cache_first_then_ours_is_refused(name):
    family = WRAPPED[name]
    pipe = tiny_pipeline(family)
    for config in _user_configs():
        pipe.transformer.enable_cache(config)
        with_user_cache = fingerprint(pipe)
        with pytest.raises(ValueError, match=r"already has a Diffusers cache enabled; call "
                                             r"pipe.transformer.disable_cache\(\) first"):
            da.apply(pipe, name)
        assert fingerprint(pipe) == with_user_cache
        pipe.transformer.disable_cache()


def test_user_cache_enabled_after_disabling_ours_survives_remove():
    pipe = tiny_pipeline("flux")
    transformer = pipe.transformer
    user_config = TaylorSeerCacheConfig(cache_interval=2)
    handle = da.apply(pipe, "fbcache")
    transformer.disable_cache()
    transformer.enable_cache(user_config)
    handle.remove()
    assert transformer._cache_config is user_config
    transformer.disable_cache()
    assert not transformer.is_cache_enabled


def test_disable_cache_under_our_block_hooks_keeps_them_working():
    """FirstBlockCache's block hooks sit under Δ-cache's; disable_cache() must not unlink Δ-cache's from the chain."""
    family = "flux"
    pipe = tiny_pipeline(family)
    baseline = run_pipe(pipe, family)
    with da.accelerated(pipe, "delta_cache", interval=2):
        delta_only = run_pipe(pipe, family)
    with da.accelerated(pipe, "fbcache", {"method": "delta_cache", "interval": 2}):
        pipe.transformer.disable_cache()
        assert torch.equal(run_pipe(pipe, family), delta_only)
        assert da.stats(pipe)["blocks_run"] < da.stats(pipe)["blocks_total"]
    assert torch.equal(run_pipe(pipe, family), baseline)


def test_models_without_cache_mixin_refuse_diffusers_cache_hooks_applied_directly():
    from diffusers.hooks import apply_first_block_cache

    pipe = tiny_pipeline("pixart_alpha")  # PixArtTransformer2DModel has no enable_cache
    apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=0.1))
    with_user_cache = fingerprint(pipe)
    with pytest.raises(ValueError, match="already has a Diffusers cache enabled; remove those hooks first"):
        da.apply(pipe, "taylorseer")
    assert fingerprint(pipe) == with_user_cache
