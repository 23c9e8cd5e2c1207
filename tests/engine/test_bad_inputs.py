"""Bad input gets a clear ValueError naming the fix, and leaves the pipeline exactly as it was."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import diffusion_accel as da
from diffusion_accel.config import _REGISTRY, MethodConfig
from diffusion_accel.method import Method
from diffusion_accel.testing import fingerprint, run_pipe, tiny_pipeline


@pytest.fixture(scope="module")
def pipe_and_baseline():
    pipe = tiny_pipeline("pixart_alpha")
    baseline = run_pipe(pipe, "pixart_alpha")
    return pipe, baseline, fingerprint(pipe)


BAD_APPLY_CALLS = {
    "unknown method": (("no_such_method",), {}, "Registered methods"),
    "field out of range": (("delta_cache",), {"interval": 0}, "interval (N) must be an int >= 1"),
    "unknown option": (("delta_cache",), {"intervall": 2}, "Valid options"),
    "block range past depth": (("delta_cache",), {"num_cached_blocks": 40}, "past the model depth"),
    "fraction out of range": (("delta_cache",), {"num_cached_blocks": 1.5}, "fraction must be in (0, 1]"),
    "unknown preset": (("delta_cache",), {"preset": "sdxl-9000"}, "Unknown delta_cache preset"),
    "bad stage order": (("delta_cache",), {"stage_order": "sideways"}, "stage_order must be one of"),
    "two Diffusers caches": (("fbcache", "taylorseer"), {}, "cannot be combined"),
    "same method twice": (("delta_cache", {"method": "delta_cache", "interval": 3}), {}, "given twice"),
    "options with two methods": (("delta_cache", "fbcache"), {"interval": 2}, "need exactly one method"),
    "config of wrong type": ((42,), {}, "Cannot use int as a method config"),
    "missing config file": (("does/not/exist.yaml",), {}, "does not exist"),
    "negative threshold": (("fbcache",), {"threshold": -1.0}, "threshold must be > 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_APPLY_CALLS))
def test_bad_apply_leaves_pipeline_untouched(pipe_and_baseline, case):
    pipe, baseline, before = pipe_and_baseline
    configs, options, message = BAD_APPLY_CALLS[case]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        da.apply(pipe, *configs, **options)
    assert fingerprint(pipe) == before
    assert torch.equal(run_pipe(pipe, "pixart_alpha"), baseline)


def test_not_a_pipeline():
    with pytest.raises(ValueError, match="expects a loaded diffusers DiffusionPipeline"):
        da.apply(torch.nn.Linear(2, 2), "delta_cache")


def test_unsupported_family_lists_supported_and_readme():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4)
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(ValueError, match=r"No diffusion-accel adapter for DDPMPipeline.*pixart_alpha.*Adding a model"):
        da.apply(pipe, "delta_cache")
    assert "_diffusion_accel_session" not in pipe.__dict__


def test_method_not_for_this_family():
    pipe = tiny_pipeline("flux")
    before = fingerprint(pipe)
    with pytest.raises(ValueError, match="fastercache supports the families"):
        da.apply(pipe, "fastercache")
    assert fingerprint(pipe) == before


def test_unet_family_rejects_block_methods():
    pipe = tiny_pipeline("sd")
    with pytest.raises(ValueError, match="needs a transformer block list"):
        da.apply(pipe, "delta_cache")


def test_apply_twice_names_the_fix(pipe_and_baseline):
    pipe, baseline, before = pipe_and_baseline
    with da.accelerated(pipe, "delta_cache"):
        with pytest.raises(ValueError, match=r"Call diffusion_accel.remove\(pipe\) first"):
            da.apply(pipe, "fbcache")
    assert fingerprint(pipe) == before


def test_diffusers_cache_already_enabled():
    pipe = tiny_pipeline("flux")
    from diffusers.hooks import FirstBlockCacheConfig

    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    before = fingerprint(pipe)
    with pytest.raises(ValueError, match=r"disable_cache\(\) first"):
        da.apply(pipe, "magcache")
    assert fingerprint(pipe) == before


def test_remove_and_stats_without_apply(pipe_and_baseline):
    pipe, _, _ = pipe_and_baseline
    with pytest.raises(ValueError, match="nothing to remove"):
        da.remove(pipe)
    with pytest.raises(ValueError, match="needs a pipeline patched"):
        da.stats(pipe)
    handle = da.apply(pipe, "delta_cache")
    try:
        with pytest.raises(ValueError, match="call the pipeline first"):
            da.stats(pipe)
    finally:
        handle.remove()


def test_bad_config_files(tmp_path):
    wrong_ext = tmp_path / "cfg.txt"
    wrong_ext.write_text("{}")
    with pytest.raises(ValueError, match=r"must end in .json, .yaml or .yml"):
        MethodConfig.from_file(wrong_ext)
    not_mapping = tmp_path / "cfg.json"
    not_mapping.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="must hold a mapping"):
        MethodConfig.from_file(not_mapping)


def test_unknown_tiny_family_and_bad_path():
    with pytest.raises(ValueError, match="Unknown tiny family"):
        da.load_pipeline("tiny:nope")
    with pytest.raises(ValueError, match="neither a local folder nor a Hub id"):
        da.load_pipeline("no_such_folder_anywhere")


@dataclass
class _ExplodingConfig(MethodConfig):
    name: ClassVar[str] = "_test_exploding"
    families: ClassVar[tuple[str, ...] | None] = None

    def build(self) -> Method:
        return _ExplodingMethod(self)


class _ExplodingMethod(Method):
    def attach(self, session):
        from diffusers.hooks import ModelHook

        for block in session.blocks[:2]:
            session.register_hook(block, ModelHook(), "test.exploding")
        raise ValueError("exploded half-way through attach")


def test_failure_during_attach_rolls_back(pipe_and_baseline):
    pipe, baseline, before = pipe_and_baseline
    _REGISTRY[_ExplodingConfig.name] = _ExplodingConfig
    try:
        with pytest.raises(ValueError, match="exploded half-way"):
            da.apply(pipe, "delta_cache", _ExplodingConfig())
    finally:
        del _REGISTRY[_ExplodingConfig.name]
    assert fingerprint(pipe) == before
    assert torch.equal(run_pipe(pipe, "pixart_alpha"), baseline)
