"""Shared test helpers. Everything runs offline on tiny pipelines built from configs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def run_pipe(pipe, family: str, seed: int = 0, **overrides) -> torch.Tensor:
    """Call a tiny pipeline with fixed seed and small sizes; return its output as one float tensor."""
    from diffusion_accel.testing import tiny_call_kwargs

    kwargs = {**tiny_call_kwargs(family), **overrides}
    if "pixart" in family:
        kwargs.setdefault("clean_caption", False)
    out = pipe(**kwargs, generator=torch.Generator().manual_seed(seed), output_type="pt")
    result = out.images if hasattr(out, "images") else out.frames
    return torch.as_tensor(result).float()


def fingerprint(pipe) -> dict:
    """What must be unchanged after a failed apply or a remove: class, attributes, forwards and hook registries."""
    from diffusion_accel.pipelines.adapters import find_adapter

    denoiser = find_adapter(pipe).get_denoiser(pipe)
    modules = {
        name: (sorted(k for k in m.__dict__ if k in ("forward", "_diffusers_hook", "_cache_config")),
               sorted(m._diffusers_hook.hooks) if hasattr(m, "_diffusers_hook") else None)
        for name, m in denoiser.named_modules()
    }
    return {
        "class": type(pipe),
        "attrs": sorted(pipe.__dict__),
        "modules": modules,
        "processors": {n: type(p) for n, p in getattr(denoiser, "attn_processors", {}).items()},
    }


@pytest.fixture(scope="module")
def pixart():
    from diffusion_accel.testing import tiny_pipeline

    return tiny_pipeline("pixart_alpha")


@pytest.fixture(autouse=True)
def _bench_cache_in_tmp(tmp_path_factory, monkeypatch):
    """The bench's baseline cache goes to a per-session temporary folder, never to the user's ~/.cache."""
    monkeypatch.setenv("DIFFUSION_ACCEL_CACHE", str(tmp_path_factory.getbasetemp() / "diffusion_accel_cache"))
