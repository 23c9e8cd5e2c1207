"""Every method checks depth, block types, CFG and prediction type before touching the model.

A method that cannot run raises our ``ValueError`` naming the fix and leaves the pipeline as it was; one that can
runs and comes off cleanly. Nothing may fail from inside Diffusers.
"""

from __future__ import annotations

import pytest
import torch
from diffusion_accel.pipelines.adapters import find_adapter

import diffusion_accel as da
from diffusion_accel.config import registered_methods
from diffusion_accel.testing import fingerprint, run_pipe, tiny_pipeline


def _with_blocks(family: str, count: int):
    """The tiny pipeline of ``family`` cut down to ``count`` transformer blocks in all (first lists first)."""
    pipe = tiny_pipeline(family)
    adapter = find_adapter(pipe)
    denoiser = adapter.get_denoiser(pipe)
    left = count
    for name in adapter.block_lists:
        blocks = list(getattr(denoiser, name))
        setattr(denoiser, name, torch.nn.ModuleList(blocks[:left]))
        left -= min(left, len(blocks))
    assert len(adapter.get_blocks(pipe)) == count
    return pipe


def _family_for(config_cls) -> str:
    families = config_cls.families
    return "pixart_alpha" if families is None or "pixart_alpha" in families else families[0]


@pytest.mark.parametrize("name", sorted(registered_methods()))
def test_every_method_on_a_one_block_model(name):
    config_cls = registered_methods()[name]
    family = _family_for(config_cls)
    pipe = _with_blocks(family, 1)
    baseline = run_pipe(pipe, family)
    before = fingerprint(pipe)
    try:
        handle = da.apply(pipe, config_cls())
    except ValueError as exc:
        assert str(exc).startswith("Cannot apply to this pipeline"), exc
        assert fingerprint(pipe) == before
        return
    try:
        out = run_pipe(pipe, family)
        assert out.shape == baseline.shape and torch.isfinite(out).all()
    finally:
        handle.remove()
    assert fingerprint(pipe) == before
    assert torch.equal(run_pipe(pipe, family), baseline)


@pytest.mark.parametrize("family", ["pixart_alpha", "flux", "cogvideox", "ltx_video"])
def test_fbcache_names_the_minimum_depth(family):
    pipe = _with_blocks(family, 1)
    before = fingerprint(pipe)
    with pytest.raises(ValueError, match=r"fbcache needs at least 2 transformer blocks.*has 1"):
        da.apply(pipe, "fbcache")
    assert fingerprint(pipe) == before


def test_block_methods_refuse_an_empty_block_list():
    pipe = _with_blocks("pixart_alpha", 0)
    before = fingerprint(pipe)
    for name in ("delta_cache", "fbcache", "magcache", "taylorseer", "sparse_attention"):
        with pytest.raises(ValueError, match="needs transformer blocks and this transformer's transformer_blocks"):
            da.apply(pipe, name)
        assert fingerprint(pipe) == before, name


def test_unregistered_block_class_is_refused_before_attaching():
    pipe = tiny_pipeline("pixart_alpha")
    for block in pipe.transformer.transformer_blocks:
        block.__class__ = type("CustomBlock", (type(block),), {})
    before = fingerprint(pipe)
    for name in ("delta_cache", "fbcache", "magcache"):
        with pytest.raises(ValueError, match=rf"{name} needs to know where CustomBlock.*TransformerBlockRegistry"):
            da.apply(pipe, name)
        assert fingerprint(pipe) == before, name


def test_taylorseer_identifiers_that_match_nothing():
    pipe = tiny_pipeline("pixart_alpha")
    with pytest.raises(ValueError, match="would cache nothing"):
        da.apply(pipe, "taylorseer", cache_identifiers=(r"^no_such_module$",))


def test_adaptive_guidance_needs_a_prediction_type_it_can_convert():
    from diffusers import DPMSolverMultistepScheduler

    pipe = tiny_pipeline("pixart_alpha")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, prediction_type="sample")
    before = fingerprint(pipe)
    with pytest.raises(ValueError, match=r"prediction_type='sample'"):
        da.apply(pipe, "adaptive_guidance")
    assert fingerprint(pipe) == before
    assert "adaptive_guidance" not in da.list_methods(pipe)


def test_guidance_methods_need_cfg():
    pipe = tiny_pipeline("hunyuan_video")  # guidance-distilled: no unconditional pass to skip
    for name in ("adaptive_guidance", "cfg_cutoff"):
        with pytest.raises(ValueError, match="guidance-distilled"):
            da.apply(pipe, name)
