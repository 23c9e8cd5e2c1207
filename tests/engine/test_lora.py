"""LoRA (``load_lora_weights`` / ``set_adapters`` / ``fuse_lora``) on the flow testbed, before and after ``apply``.

PEFT swaps the blocks' inner ``Linear`` layers for LoRA layers; our hooks sit on the blocks and the transformer, so
they must keep working whichever comes first, and ``remove`` must give back the LoRA pipeline bit for bit.
"""

from __future__ import annotations

import pytest
import torch

import diffusion_accel as da
from diffusion_accel.testing import fingerprint

pytest.importorskip("peft")


def _call(pipe, seed=0):
    out = pipe("a red circle", num_inference_steps=6, generator=torch.Generator().manual_seed(seed), output_type="pt")
    return out.images.float()


def _lora_state_dict(pipe, rank=4, seed=0, scale=0.05):
    """A random LoRA on every attention projection of the dual-stream blocks (Diffusers' key format)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in pipe.transformer.named_modules():
        if name.startswith("transformer_blocks.") and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v"):
            state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator)
            state[f"transformer.{name}.lora_B.weight"] = scale * torch.randn(module.out_features, rank,
                                                                              generator=generator)
    assert state
    return state


def _pipe():
    return da.load_pipeline("testbed:flow")


def test_lora_before_and_after_apply():
    pipe = _pipe()
    pipe.load_lora_weights(_lora_state_dict(pipe, seed=0), adapter_name="a")
    plain = _call(pipe)
    assert not torch.equal(plain, _call(_pipe())), "the LoRA must change the output for this test to mean anything"
    before = fingerprint(pipe)
    with da.accelerated(pipe, "delta_cache"):
        lora_then_apply = _call(pipe)
        assert da.stats(pipe)["blocks_run"] < da.stats(pipe)["blocks_total"]
    assert fingerprint(pipe) == before
    assert torch.equal(_call(pipe), plain), "remove() after LoRA is not bit-identical"

    other = _pipe()
    with da.accelerated(other, "delta_cache"):
        other.load_lora_weights(_lora_state_dict(other, seed=0), adapter_name="a")  # LoRA injected under our hooks
        assert torch.equal(_call(other), lora_then_apply)
        assert da.stats(other)["blocks_run"] < da.stats(other)["blocks_total"]
    assert torch.equal(_call(other), plain)


def test_set_adapters_and_fuse_under_a_method():
    pipe = _pipe()
    pipe.load_lora_weights(_lora_state_dict(pipe, seed=0), adapter_name="a")
    pipe.load_lora_weights(_lora_state_dict(pipe, seed=1), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[1.0, 0.5])
    plain = _call(pipe)
    with da.accelerated(pipe, "fbcache"):
        mixed = _call(pipe)
        pipe.set_adapters(["a"])  # switching adapters while attached
        only_a = _call(pipe)
        pipe.set_adapters(["a", "b"], adapter_weights=[1.0, 0.5])
        assert torch.equal(_call(pipe), mixed)
        pipe.fuse_lora(adapter_names=["a", "b"])  # fusing while attached: weights change under our hooks
        fused = _call(pipe)
        assert da.stats(pipe)["nfe"] >= 1
        pipe.unfuse_lora()
    assert not torch.equal(mixed, only_a)
    assert torch.allclose(fused, mixed, atol=1e-4), (fused - mixed).abs().max()
    # unfusing subtracts the LoRA again, exact only up to float rounding (PEFT, not us)
    assert torch.allclose(_call(pipe), plain, atol=1e-5)

    pipe.fuse_lora(adapter_names=["a", "b"])
    fused_plain = _call(pipe)
    with da.accelerated(pipe, "fbcache"):
        assert torch.allclose(_call(pipe), fused, atol=1e-5)
    assert torch.equal(_call(pipe), fused_plain), "remove() on a fused LoRA pipeline is not bit-identical"
