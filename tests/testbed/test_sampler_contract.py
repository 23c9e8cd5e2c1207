"""Sampler contracts: a shipped or saved pipeline called with only a prompt samples the way it was trained, through
``load_pipeline`` and through Diffusers' own ``from_pretrained``."""

from __future__ import annotations

import json

import diffusers
import numpy as np
import pytest
import torch
from diffusion_accel.pipelines import contract
from diffusion_accel.pipelines.testbed import registry

import diffusion_accel as da

BASES = {"pixart": "PixArtAlphaPipeline", "flow": "FluxPipeline"}


def _image(pipe, *args, **kwargs):
    out = pipe(*args, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images
    return out[0]


@pytest.mark.parametrize("name", registry.TESTBED_NAMES)
def test_a_call_with_only_a_prompt_renders_the_trained_size_and_equals_the_explicit_call(name):
    pipe = da.load_pipeline(f"testbed:{name}")
    assert contract.contract_of(pipe) == registry.default_call_kwargs(name)
    plain = _image(pipe, "a red circle")
    assert plain.shape == (64, 64, 3)
    stock_pipe = getattr(diffusers, BASES[name])(**pipe.components)  # the Diffusers class itself
    explicit = _image(stock_pipe, "a red circle", **registry.default_call_kwargs(name))
    np.testing.assert_array_equal(plain, explicit)
    # a passed argument wins over the contract, by keyword or by position
    assert _image(pipe, "a red circle", height=32, width=32).shape == (32, 32, 3)
    short = _image(pipe, "a red circle", num_inference_steps=2)
    assert not np.array_equal(short, plain)
    if name == "pixart":  # PixArtAlphaPipeline.__call__(prompt, negative_prompt, num_inference_steps, ...)
        np.testing.assert_array_equal(_image(pipe, "a red circle", "", 2), short)


def test_diffusers_from_pretrained_needs_trust_remote_code_and_then_applies_the_contract():
    path = registry.testbed_path("pixart")
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        diffusers.DiffusionPipeline.from_pretrained(str(path))
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(path), trust_remote_code=True)
    assert type(pipe).__name__ == "PixArtAlphaPipelineWithContract"
    assert isinstance(pipe, diffusers.PixArtAlphaPipeline)
    assert _image(pipe, "a red circle", num_inference_steps=2).shape == (64, 64, 3)


def test_the_engine_sees_the_contract_arguments():
    pipe = da.load_pipeline("testbed:flow")
    handle = da.apply(pipe)
    pipe("a red circle", num_inference_steps=2)
    assert handle.session.context.cfg_mode == "separate"  # true CFG 4.0 comes from the contract
    assert da.stats(pipe)["nfe"] == 4
    handle.remove()


def test_save_pretrained_round_trip_keeps_class_and_contract(tmp_path):
    pipe = da.load_pipeline("testbed:pixart")
    pipe.save_pretrained(tmp_path / "copy")
    index = json.loads((tmp_path / "copy" / "model_index.json").read_text())
    assert index["_class_name"] == [contract.LOADER_MODULE, "PixArtAlphaPipelineWithContract"]
    assert contract.is_own_contract_folder(tmp_path / "copy")
    again = da.load_pipeline(tmp_path / "copy")
    assert contract.contract_of(again) == contract.contract_of(pipe)
    # a loader file that is not ours verbatim is never trusted on the user's behalf
    loader = tmp_path / "copy" / f"{contract.LOADER_MODULE}.py"
    loader.write_text(loader.read_text() + "import os\n")
    assert not contract.is_own_contract_folder(tmp_path / "copy")
    with pytest.raises(ValueError, match="trust_remote_code"):
        da.load_pipeline(tmp_path / "copy")


def test_bad_contracts_are_refused_with_the_fix():
    cls = contract.with_sampler_contract(diffusers.PixArtAlphaPipeline)
    components = da.load_pipeline("testbed:pixart").components
    with pytest.raises(ValueError, match=r"does not take.*num_inference_steps"):
        cls(**components, sampler_contract={"num_steps": 4})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        cls(**components, sampler_contract={"guidance_scale": torch.tensor(4.5)})
    assert contract.with_sampler_contract(diffusers.PixArtAlphaPipeline) is cls
    assert contract.FluxPipelineWithContract is contract.with_sampler_contract(diffusers.FluxPipeline)
    with pytest.raises(AttributeError):
        contract.NotAPipelineWithContract  # noqa: B018


def test_a_retrained_testbed_checkpoint_carries_its_contract(tmp_path):
    from diffusion_accel.pipelines.testbed.train_diffusion import train_pipeline

    vae = registry.testbed_path("pixart") / "vae"
    train_pipeline("pixart", tmp_path / "run", steps=2, batch_size=4, num_train=32, eval_prompts=0, vae_path=vae)
    assert contract.is_own_contract_folder(tmp_path / "run")
    pipe = da.load_pipeline(tmp_path / "run")
    assert contract.contract_of(pipe) == registry.default_call_kwargs("pixart")
    assert _image(pipe, "a red circle", num_inference_steps=2).shape == (64, 64, 3)
