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


_COMPAT_DIR: list = []


def linear_ag_spec(steps: int = 4) -> dict:
    """A ``linear_ag`` config with synthetic coefficients (``[1, 0, 0]`` then a fixed affine estimate per step): a
    valid coefficients file, written once per test process. The compatibility tests check how the method runs with
    compile / offload / precision, not how good the fit is (``test_linear_ag.py`` fits real ones)."""
    import tempfile
    from pathlib import Path

    from diffusion_accel.methods.linear_ag import save_coefficients

    if not _COMPAT_DIR:
        _COMPAT_DIR.append(Path(tempfile.mkdtemp(prefix="da-linear-ag-")))
    path = _COMPAT_DIR[0] / f"compat-{steps}.safetensors"
    if not path.is_file():
        coefficients = torch.tensor([[1.0, 0.0, 0.0]] + [[0.8, 0.15, 0.05]] * (steps - 1))
        save_coefficients(path, coefficients, {"family": "any", "steps": steps})
    return {"method": "linear_ag", "coefficients": str(path)}


def method_name(spec) -> str:
    return spec if isinstance(spec, str) else spec["method"]


def compat_methods(pipe) -> list:
    """Every method the compatibility tests run on ``pipe``: ``da.list_methods(pipe)`` (methods applicable with their
    default config) plus ``linear_ag`` with synthetic coefficients where guidance methods apply."""
    import diffusion_accel as da
    from diffusion_accel.config import parse_config

    specs: list = list(da.list_methods(pipe))
    linear_ag = linear_ag_spec()
    if parse_config(linear_ag).not_applicable_reason(da.find_adapter(pipe), pipe) is None:
        specs.append(linear_ag)
    return specs
