"""BlockSparseMask: dense round trips, density, FlexAttention conversion (ragged), validation errors."""

from __future__ import annotations

import pytest
import torch
from diffusion_accel.kernels import BlockSparseMask, full_mask, reference_attention
from diffusion_accel.kernels.block_mask import as_block_mask, keep_count


def _dense(b, h, qb, kb, p=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, qb, kb, generator=g) < p


@pytest.mark.parametrize("shape", [(1, 1, 3, 5), (2, 3, 4, 4), (1, 2, 7, 2)])
def test_dense_round_trip_and_csr_layout(shape):
    d = _dense(*shape)
    d[..., 0, :] = False  # an empty row
    m = BlockSparseMask.from_dense(d, block_size=16)
    assert m.counts.dtype == torch.int32 and m.indices.dtype == torch.int32
    assert tuple(m.counts.shape) == shape[:3] and m.indices.shape[:3] == shape[:3]
    assert torch.equal(m.counts, d.sum(-1).int())
    assert torch.equal(m.to_dense(), d)
    # kept ids come first, ascending, and are exactly the True columns
    for idx in [(0, 0, 1), (shape[0] - 1, shape[1] - 1, shape[2] - 1)]:
        n = int(m.counts[idx])
        got = m.indices[idx][:n].tolist()
        assert got == sorted(got) == torch.nonzero(d[idx]).flatten().tolist()
    assert m.density() == pytest.approx(d.float().mean().item())
    assert m.shape == shape


def test_transpose_and_expand():
    d = _dense(1, 2, 3, 5, seed=1)
    m = BlockSparseMask.from_dense(d, 8, q_len=20, kv_len=36)
    t = m.transpose()
    assert (t.q_len, t.kv_len) == (36, 20)
    assert torch.equal(t.to_dense(), d.transpose(-1, -2))
    e = BlockSparseMask.from_dense(d[:1, :1], 8, 20, 36).expand(3, 2)
    assert tuple(e.counts.shape) == (3, 2, 3)
    with pytest.raises(ValueError, match="broadcast"):
        m.expand(3, 3)


def test_token_mask_ragged():
    d = torch.tensor([[[[True, False], [False, True]]]])
    m = BlockSparseMask.from_dense(d, 4, q_len=6, kv_len=7)
    tok = m.to_token_mask()
    assert tuple(tok.shape) == (1, 1, 6, 7)
    assert tok[0, 0, :4, :4].all() and not tok[0, 0, :4, 4:].any()
    assert tok[0, 0, 4:, 4:].all() and not tok[0, 0, 4:, :4].any()


@pytest.mark.parametrize("lq,lk", [(96, 96), (70, 45)])
def test_flex_block_mask_eager_matches_reference(lq, lk):
    """Eager flex only honours mask_mod: equality with the reference proves the mask_mod (and ragged tail) is right."""
    from diffusion_accel.kernels import flex_block_sparse_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, lq, 16), torch.randn(2, 2, lk, 16), torch.randn(2, 2, lk, 16)
    d = _dense(1, 2, -(-lq // 32), -(-lk // 32), seed=3)
    d[..., -1, -1] = True
    m = BlockSparseMask.from_dense(d, 32, lq, lk)
    fm = m.to_flex_block_mask()
    assert fm.mask_mod is not None and fm.seq_lengths == (lq, lk)
    ref, ref_lse = reference_attention(q, k, v, m)
    out, lse = flex_block_sparse_attention(q, k, v, m, compiled=False, return_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=1e-5, rtol=1e-5)


def test_full_mask_and_keep_count():
    m = full_mask(300, 200, 128)
    assert m.shape == (1, 1, 3, 2) and m.density() == 1.0
    assert keep_count(0.2, 128) == 26 and keep_count(5, 3) == 3 and keep_count(1.0, 7) == 7
    with pytest.raises(ValueError):
        keep_count(1.5, 10)


def test_bad_masks_raise_clear_errors():
    with pytest.raises(ValueError, match="bool"):
        BlockSparseMask.from_dense(torch.ones(1, 1, 2, 2), 16)
    with pytest.raises(ValueError, match="does not fit"):
        BlockSparseMask.from_dense(torch.ones(1, 1, 2, 2, dtype=torch.bool), 16, q_len=100)
    with pytest.raises(ValueError, match=r"ceil\(Lq/bs\)"):
        as_block_mask(torch.ones(1, 1, 3, 3, dtype=torch.bool), 256, 256, 1, 1, 128)
    with pytest.raises(ValueError, match="must be torch.bool"):
        as_block_mask(torch.ones(1, 1, 2, 2), 256, 256, 1, 1, 128)
    with pytest.raises(ValueError, match=r"\[B or 1, H or 1"):
        as_block_mask(torch.ones(2, 1, 2, 2, dtype=torch.bool), 256, 256, 3, 1, 128)
    with pytest.raises(ValueError, match="batch/heads"):
        as_block_mask(BlockSparseMask.from_dense(torch.ones(2, 1, 2, 2, dtype=torch.bool), 128), 256, 256, 3, 1)
    m = full_mask(256, 256, 64)
    with pytest.raises(ValueError, match="block_size=64"):
        as_block_mask(m, 256, 256, 1, 1, 128)
    with pytest.raises(ValueError, match="rebuild the mask"):
        as_block_mask(m, 128, 256, 1, 1)
