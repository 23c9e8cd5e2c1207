"""Reference, eager, C++ (CPU), compiled-flex paths and the dispatcher against the dense reference and SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusion_accel.kernels import (
    BlockSparseMask,
    block_sparse_attention,
    full_mask,
    masked_attention,
    merge_attention_outputs,
    reference_attention,
)
from diffusion_accel.kernels import dispatch as dispatch_mod

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def _inputs(b, h, lq, lk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda n: torch.randn(b, h, n, d, generator=g).to(dtype)  # noqa: E731
    return mk(lq), mk(lk), mk(lk)


def _random_mask(mb, mh, lq, lk, bs, seed=0, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(mb, mh, -(-lq // bs), -(-lk // bs), generator=g) < 0.5
    if empty_row:
        d[..., 0, :] = False
    d[..., -1, -1] = True
    return BlockSparseMask.from_dense(d, bs, lq, lk)


def _close(a, b, dtype):
    torch.testing.assert_close(a.float(), b.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_reference_full_density_equals_sdpa():
    q, k, v = _inputs(2, 3, 200, 150, 32)
    out, lse = reference_attention(q, k, v, full_mask(200, 150, 64))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) / 32**0.5, -1), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("backend", ["eager", "reference"])
def test_dispatch_full_density_equals_sdpa(backend):
    q, k, v = _inputs(1, 2, 300, 300, 64)
    dense = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    out = block_sparse_attention(q, k, v, dense, backend=backend)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("lq,lk,bs", [(128, 128, 32), (200, 168, 64), (77, 130, 32)])
def test_eager_matches_reference(dtype, lq, lk, bs):
    q, k, v = _inputs(2, 2, lq, lk, 32, dtype)
    m = _random_mask(1, 2, lq, lk, bs)
    out, lse = block_sparse_attention(q, k, v, m, backend="eager", return_lse=True)
    ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), m)
    assert out.dtype == dtype and out.shape == q.shape
    _close(out, ref, dtype)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert (out[:, :, :bs] == 0).all()  # the empty first query-block row
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin].double(), ref_lse[fin], atol=1e-4, rtol=1e-4)
    # without the LSE the rows go through fused SDPA (padding mask, empty rows -> 0): same result
    fast = block_sparse_attention(q, k, v, m, backend="eager")
    _close(fast, ref, dtype)
    assert (fast[:, :, :bs] == 0).all()


@pytest.mark.parametrize("lq,lk", [(256, 256), (200, 168)])
def test_eager_backward_matches_reference_autograd(lq, lk):
    q, k, v = (t.double().requires_grad_() for t in _inputs(1, 2, lq, lk, 16))
    m = _random_mask(1, 2, lq, lk, 32, seed=1)
    out = block_sparse_attention(q, k, v, m)  # auto on CPU with grad -> eager
    grad = torch.randn_like(out)
    gq, gk, gv = torch.autograd.grad((out * grad).sum(), (q, k, v))
    ref, _ = masked_attention(q, k, v, m.to_token_mask())
    rq, rk, rv = torch.autograd.grad((ref * grad).sum(), (q, k, v))
    for a, b in ((gq, rq), (gk, rk), (gv, rv)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_compiled_flex_matches_reference_ragged():
    """One compile (fp32, ragged Lq != Lk); a second mask of the same shape reuses it."""
    q, k, v = _inputs(1, 2, 300, 260, 64)
    for seed in (0, 1):
        m = _random_mask(1, 2, 300, 260, 128, seed=seed, empty_row=seed == 0)
        with torch.inference_mode():
            out = block_sparse_attention(q, k, v, m, backend="flex")
        ref, _ = reference_attention(q, k, v, m)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    with torch.inference_mode():
        full_dense = torch.ones(1, 2, 3, 3, dtype=torch.bool)  # same mask shape as above: no recompile
        full = block_sparse_attention(q, k, v, BlockSparseMask.from_dense(full_dense, 128, 300, 260), backend="flex")
    torch.testing.assert_close(full, F.scaled_dot_product_attention(q, k, v), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mb,mh,lq,lk,bs", [(1, 2, 300, 260, 128), (2, 1, 200, 168, 64), (2, 2, 77, 130, 32)])
def test_cpp_kernel_matches_reference(dtype, mb, mh, lq, lk, bs):
    """Ragged Lq != Lk, masks broadcast over B or H, an empty query-block row (0 output, -inf LSE)."""
    q, k, v = _inputs(2, 2, lq, lk, 64, dtype)
    m = _random_mask(mb, mh, lq, lk, bs, seed=lq)
    with torch.inference_mode():
        out, lse = block_sparse_attention(q, k, v, m, backend="cpp", return_lse=True)
    ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), m)
    assert out.dtype == dtype and out.shape == q.shape and lse.dtype == torch.float32
    _close(out, ref, dtype)
    assert (out[:, :, :bs] == 0).all() and torch.isinf(lse[:, :, :bs]).all()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin].double(), ref_lse[fin], atol=1e-4, rtol=1e-4)


def test_cpp_kernel_rejects_out_of_range_block_ids():
    from diffusion_accel.kernels.block_mask import BlockSparseMask as Mask

    q, k, v = _inputs(1, 1, 128, 128, 16)
    good = _random_mask(1, 1, 128, 128, 32, empty_row=False)
    bad_index = Mask(good.counts, good.indices.clone().fill_(4), 32, 128, 128)  # Kb = 4: ids 0..3
    bad_count = Mask(good.counts.clone().fill_(good.indices.shape[-1] + 1), good.indices, 32, 128, 128)
    with torch.inference_mode():
        for bad, msg in ((bad_index, "indices must be key-block ids in \\[0, 4\\)"), (bad_count, "counts must be")):
            with pytest.raises(ValueError, match=msg):
                block_sparse_attention(q, k, v, bad, backend="cpp")


def test_cpp_kernel_full_density_equals_sdpa_and_refuses_what_it_cannot_do():
    q, k, v = _inputs(2, 3, 384, 320, 64, seed=3)
    full = full_mask(384, 320, 128)
    with torch.inference_mode():
        out = block_sparse_attention(q, k, v, full, backend="cpp")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="forward-only"):
        block_sparse_attention(q.clone().requires_grad_(), k, v, full, backend="cpp")
    with pytest.raises(ValueError, match="float64"):
        block_sparse_attention(q.double(), k.double(), v.double(), full, backend="cpp")


@pytest.fixture
def backend_calls(monkeypatch) -> list[str]:
    """The backend names the dispatcher runs, in order."""
    calls: list[str] = []
    real = dispatch_mod._run

    def spy(name, *a, **kw):
        calls.append(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(dispatch_mod, "_run", spy)
    return calls


def test_auto_uses_flex_then_eager_when_the_cpp_kernel_cannot_build(monkeypatch, backend_calls):
    from diffusion_accel.kernels import cpu_ext

    monkeypatch.setattr(cpu_ext, "cpu_kernel", lambda: None)
    monkeypatch.setattr(cpu_ext, "_BUILD_ERROR", ["CalledProcessError: no compiler"])
    monkeypatch.setattr(cpu_ext, "_WARNED", [])
    monkeypatch.delenv("DIFFUSION_ACCEL_NO_CPU_KERNEL", raising=False)
    q, k, v = _inputs(1, 2, 96, 96, 16)
    m = _random_mask(1, 2, 96, 96, 32)
    with torch.inference_mode():
        with pytest.warns(RuntimeWarning, match="unavailable \\(CalledProcessError: no compiler\\)"):
            out = block_sparse_attention(q, k, v, m)
        _, lse = block_sparse_attention(q, k, v, m, return_lse=True)  # compiled flex on CPU has no LSE
    torch.testing.assert_close(out, reference_attention(q, k, v, m)[0], atol=1e-5, rtol=1e-5)
    assert backend_calls == ["flex", "eager"] and lse.shape == (1, 2, 96)
    with pytest.raises(RuntimeError, match="unavailable here: CalledProcessError: no compiler"):
        block_sparse_attention(q, k, v, m, backend="cpp")


def test_auto_routes_cpu_grad_and_fp64_to_eager_and_lse_to_cpp(backend_calls):
    q, k, v = _inputs(1, 1, 64, 64, 16)
    m = full_mask(64, 64, 32)
    block_sparse_attention(q.requires_grad_(), k, v, m)
    block_sparse_attention(q.detach(), k, v, m, return_lse=True)  # the C++ kernel returns the LSE
    block_sparse_attention(q.double().detach(), k.double(), v.double(), m)
    assert backend_calls == ["eager", "cpp", "eager"]
    with pytest.raises(ValueError, match="inference-only"):
        block_sparse_attention(q, k, v, m, backend="flex", return_lse=True)


def test_auto_falls_back_to_eager_when_compile_fails(monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(dispatch_mod, "_FLEX_BROKEN", {})
    from diffusion_accel.kernels import cpu_ext, flex

    monkeypatch.setattr(cpu_ext, "cpu_kernel", lambda: None)  # no C++ kernel either
    monkeypatch.setattr(cpu_ext, "_WARNED", [True])  # its warning is tested above
    monkeypatch.setattr(flex, "flex_block_sparse_attention", broken)
    q, k, v = _inputs(1, 2, 96, 96, 16)
    m = _random_mask(1, 2, 96, 96, 32)
    with torch.inference_mode():
        out = block_sparse_attention(q, k, v, m)
    torch.testing.assert_close(out, reference_attention(q, k, v, m)[0], atol=1e-5, rtol=1e-5)
    assert (q.device.type, q.dtype) in dispatch_mod._FLEX_BROKEN
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        block_sparse_attention(q, k, v, m, backend="flex")


def test_dense_bool_mask_and_default_block_size():
    q, k, v = _inputs(2, 2, 260, 260, 16)
    d = torch.rand(2, 1, 3, 3, generator=torch.Generator().manual_seed(0)) < 0.6
    d[..., 0, 0] = True
    out = block_sparse_attention(q, k, v, d, backend="eager")  # block_size defaults to 128
    ref, _ = reference_attention(q, k, v, BlockSparseMask.from_dense(d, 128, 260, 260))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_merge_attention_outputs_is_exact():
    q, k, v = _inputs(1, 2, 50, 80, 16, torch.float64)
    o1, l1 = masked_attention(q, k[:, :, :30], v[:, :, :30], None)
    o2, l2 = masked_attention(q, k[:, :, 30:], v[:, :, 30:], None)
    o, lse = merge_attention_outputs(o1, l1, o2, l2)
    ref, ref_lse = masked_attention(q, k, v, None)
    torch.testing.assert_close(o, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=0)
    # an empty part (LSE -inf) leaves the other unchanged; both empty -> 0 / -inf
    inf = torch.full_like(l1, float("-inf"))
    o, lse = merge_attention_outputs(o1, l1, torch.zeros_like(o1), inf)
    torch.testing.assert_close(o, o1) and torch.testing.assert_close(lse, l1)
    o, lse = merge_attention_outputs(torch.zeros_like(o1), inf, torch.zeros_like(o1), inf)
    assert (o == 0).all() and torch.isneginf(lse).all()
    with pytest.raises(ValueError, match="merge needs"):
        merge_attention_outputs(o1, l1, o2[..., :3], l2)


@pytest.mark.parametrize(
    "args,match",
    [
        (dict(q=torch.randn(2, 64, 16)), "4-D tensor"),
        (dict(k=torch.randn(1, 2, 64, 8)), "head dim"),
        (dict(k=torch.randn(1, 3, 64, 16)), "share B and H"),
        (dict(v=torch.randn(1, 2, 32, 16)), "share the length"),
        (dict(k=torch.randn(1, 2, 64, 16, dtype=torch.float64)), "one dtype"),
        (dict(q=torch.randint(0, 3, (1, 2, 64, 16))), "float16, bfloat16"),
        (dict(mask=torch.ones(1, 1, 2, 3, dtype=torch.bool)), r"ceil\(Lq/bs\)"),
        (dict(mask=torch.ones(1, 1, 1, 1)), "torch.bool"),
        (dict(mask=[[True]]), "BlockSparseMask or a bool tensor"),
        (dict(backend="cuda_magic"), "unknown backend"),
    ],
)
def test_bad_inputs_raise_clear_value_errors(args, match):
    base = dict(q=torch.randn(1, 2, 64, 16), k=torch.randn(1, 2, 64, 16), v=torch.randn(1, 2, 64, 16),
                mask=torch.ones(1, 1, 1, 1, dtype=torch.bool), backend="eager")
    base.update(args)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(base["q"], base["k"], base["v"], base["mask"], backend=base["backend"])


def test_triton_backend_missing_is_a_clear_error(monkeypatch):
    from diffusion_accel.kernels import triton_block_sparse

    monkeypatch.setattr(triton_block_sparse, "HAS_TRITON", False)
    assert not dispatch_mod.triton_available()
    q, k, v = _inputs(1, 1, 64, 64, 16)
    with pytest.raises(ValueError, match="needs triton"):
        block_sparse_attention(q, k, v, full_mask(64, 64, 64), backend="triton")
    # auto never needs it on CPU
    out = block_sparse_attention(q, k, v, full_mask(64, 64, 64), backend="eager")
    assert out.shape == q.shape
