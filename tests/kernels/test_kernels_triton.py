"""Triton block-sparse FlashAttention through Triton's CPU interpreter, and the sm_90 build check (no GPU)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's FP-fusion warning
triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'diffusion-accel[kernels]')")

from diffusion_accel.kernels import BlockSparseMask, block_sparse_attention, masked_attention  # noqa: E402
from diffusion_accel.kernels.triton_block_sparse import (  # noqa: E402
    TileConfig,
    default_config,
    triton_block_sparse_attention,
)

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _case(b, h, lq, lk, d, bs, dtype, mh=None, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype) for n in (lq, lk, lk))
    dense = torch.rand(1, h if mh is None else mh, -(-lq // bs), -(-lk // bs), generator=g) < 0.5
    dense[..., 0, :] = False  # empty query-block row
    dense[..., -1, -1] = True  # ragged corner kept
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v, BlockSparseMask.from_dense(dense, bs, lq, lk)


@pytest.mark.parametrize(
    "b,h,lq,lk,d,bs,dtype,mh",
    [
        (1, 2, 256, 256, 64, 64, torch.float32, None),
        (2, 2, 200, 168, 32, 32, torch.float32, 1),  # ragged, Lq != Lk, head-broadcast mask
        (1, 1, 100, 100, 40, 32, torch.float32, None),  # D not a power of two
        (1, 2, 256, 256, 64, 64, torch.float16, None),
        (1, 2, 192, 192, 64, 64, torch.bfloat16, None),  # upcast under the interpreter
    ],
)
def test_triton_forward_matches_reference(b, h, lq, lk, d, bs, dtype, mh):
    q, k, v, m = _case(b, h, lq, lk, d, bs, dtype, mh)
    out, lse = triton_block_sparse_attention(q, k, v, m)
    ref, ref_lse = masked_attention(q.float(), k.float(), v.float(), m.to_token_mask())
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin], atol=1e-4, rtol=1e-5)
    assert (out[:, :, :bs] == 0).all()


def test_triton_full_density_equals_sdpa():
    q, k, v, _ = _case(1, 2, 160, 160, 32, 32, torch.float32)
    full = BlockSparseMask.from_dense(torch.ones(1, 1, 5, 5, dtype=torch.bool), 32, 160, 160)
    out = block_sparse_attention(q, k, v, full, backend="triton")
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "lq,lk,bs,dtype,cfg,cfg_kv",
    [
        (256, 256, 64, torch.float32, None, None),
        (200, 168, 64, torch.float32, TileConfig(32, 16), TileConfig(16, 32)),  # sub-tiles of a mask block
        (128, 128, 64, torch.float16, None, None),
    ],
)
def test_triton_backward_matches_reference_autograd(lq, lk, bs, dtype, cfg, cfg_kv):
    q, k, v, m = _case(1, 2, lq, lk, 32, bs, dtype, grad=True)
    out, _ = triton_block_sparse_attention(q, k, v, m, config=cfg, config_dkdv=cfg_kv)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((out.float() * g).sum(), (q, k, v))
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref, _ = masked_attention(qf, kf, vf, m.to_token_mask())
    ref_grads = torch.autograd.grad((ref * g).sum(), (qf, kf, vf))
    tol = 1e-4 if dtype == torch.float32 else 5e-3
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a.float(), b, atol=tol, rtol=tol)


def test_triton_rejects_bad_tiles_and_dtypes():
    q, k, v, m = _case(1, 1, 64, 64, 16, 64, torch.float32)
    with pytest.raises(ValueError, match="dividing block_size"):
        triton_block_sparse_attention(q, k, v, m, config=TileConfig(48, 16))
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        triton_block_sparse_attention(q.double(), k.double(), v.double(), m)


def test_default_configs_divide_block_size():
    for bs in (32, 64, 128):
        for d in (64, 128):
            for kern in ("fwd", "dkdv"):
                c = default_config(bs, d, "cuda", kern)
                assert bs % c.block_m == 0 and bs % c.block_n == 0


def _have_ptxas() -> bool:
    base = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return all(os.path.exists(os.path.join(base, t)) for t in ("ptxas", "cuobjdump")) or bool(shutil.which("ptxas"))


@pytest.mark.skipif(not _have_ptxas(), reason="triton wheel without bundled ptxas/cuobjdump")
def test_forward_kernel_builds_for_sm90_without_spills():
    from diffusion_accel.kernels.aot import build

    r = build("fwd", "bf16", 128, 64, default_config(128, 64, "cuda"))
    assert r.stack == 0, f"register spills: {r}"
    assert r.has_wgmma and 0 < r.registers <= 255


@pytest.mark.slow
@pytest.mark.skipif(not _have_ptxas(), reason="triton wheel without bundled ptxas/cuobjdump")
def test_all_shipped_kernels_build_for_sm90_without_spills():
    from diffusion_accel.kernels.aot import shipped_builds

    res = shipped_builds()
    assert len(res) == 12
    assert all(r.stack == 0 for r in res), [r for r in res if r.stack]


def test_cuda_bench_correctness_check_runs_under_the_interpreter():
    """The GPU bench's correctness part (fwd, LSE, dQ/dK/dV vs the fp32 reference) at a small ragged length."""
    from diffusion_accel.kernels.bench_cuda import check_correctness

    rows = check_correctness("cpu", length=160, heads=1, log=lambda *_: None)
    assert len(rows) == 4 and all(r["ok"] for r in rows)
    assert all(r["dq_max_abs_err"] < 2e-2 for r in rows)
