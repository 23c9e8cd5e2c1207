"""The xformers dense backend (``[xformers]`` extra): cleanly unavailable on CPU, equal to SDPA where it runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusion_accel.kernels.dense import dense_attention, xformers_unavailable_reason

import diffusion_accel as da
from diffusion_accel.testing import fingerprint


def _qkv(device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, 64, 16, generator=g).to(device, dtype) for _ in range(3)]


def test_sdpa_backend_is_sdpa():
    q, k, v = _qkv()
    assert torch.equal(dense_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_xformers_refused_on_cpu_with_the_reason():
    q, k, v = _qkv()
    reason = xformers_unavailable_reason("cpu")
    assert reason is not None and "xformers" in reason and "sdpa" in reason
    with pytest.raises(ValueError, match="xformers"):
        dense_attention(q, k, v, backend="xformers")
    with pytest.raises(ValueError, match="dense attention backend must be one of"):
        dense_attention(q, k, v, backend="flash9")


def test_sparse_attention_dense_backend_refused_at_apply_on_cpu():
    pipe = da.load_pipeline("tiny:flux")
    before = fingerprint(pipe)
    with pytest.raises(ValueError, match=r"sparse_attention: .*xformers"):
        da.apply(pipe, "sparse_attention", dense_backend="xformers")
    assert fingerprint(pipe) == before
    with pytest.raises(ValueError, match="dense_backend must be one of"):
        da.apply(pipe, "sparse_attention", dense_backend="nope")


@pytest.mark.skipif(xformers_unavailable_reason("cuda") is not None or not torch.cuda.is_available(),
                    reason="xformers on CUDA is not available here (CPU-only host or extra not installed)")
def test_xformers_matches_sdpa_on_cuda():
    q, k, v = _qkv("cuda", torch.float16)
    torch.testing.assert_close(dense_attention(q, k, v, backend="xformers"), F.scaled_dot_product_attention(q, k, v),
                               atol=2e-3, rtol=2e-3)
