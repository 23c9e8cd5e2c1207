"""Shared fixtures and settings for every test folder. Everything runs offline on tiny pipelines built from configs.

Helpers that tests import (``run_pipe``, ``fingerprint``, ``tiny_pipeline``) live in :mod:`diffusion_accel.testing`.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def pixart():
    from diffusion_accel.testing import tiny_pipeline

    return tiny_pipeline("pixart_alpha")


@pytest.fixture(autouse=True)
def _bench_cache_in_tmp(tmp_path_factory, monkeypatch):
    """The bench's baseline cache goes to a per-session temporary folder, never to the user's ~/.cache."""
    monkeypatch.setenv("DIFFUSION_ACCEL_CACHE", str(tmp_path_factory.getbasetemp() / "diffusion_accel_cache"))
