"""Gilbert curve, ASA / ASA_GT, sliding-window and mean-pool top-k mask builders."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from diffusion_accel.kernels import (
    BlockSparseMask,
    asa_importance,
    asa_mask,
    block_sparse_attention,
    gilbert_permutation,
    gilbert_points,
    global_token_attention,
    masked_attention,
    meanpool_topk_mask,
    pool_global_tokens,
    reorder_tokens,
    sliding_window_mask,
)

# ----------------------------------------------------------------------------------------------- Gilbert curve


def _steps(pts):
    return [sum(abs(a - b) for a, b in zip(p, n, strict=True)) for p, n in zip(pts, pts[1:], strict=False)]


def test_gilbert_is_a_permutation_for_many_grids():
    for f, h, w in itertools.product((1, 2, 3, 5), (1, 2, 4, 7), (1, 3, 6, 8)):
        pts = gilbert_points(f, h, w)
        assert len(pts) == len(set(pts)) == f * h * w
        assert all(0 <= a < f and 0 <= b < h and 0 <= c < w for a, b, c in pts)
        if len(pts) > 1:
            assert max(_steps(pts)) <= 2  # at most one diagonal step where a side parity forces it


@pytest.mark.parametrize("grid", [(4, 8, 8), (8, 16, 16), (2, 4, 8)])
def test_gilbert_unit_steps_on_even_power_of_two_grids(grid):
    assert set(_steps(gilbert_points(*grid))) == {1}


def test_gilbert_locality_on_video_like_grid():
    grid = (13, 30, 52)  # Wan-like latent (F, H/2, W/2)
    steps = _steps(gilbert_points(*grid))
    assert sum(s == 1 for s in steps) / len(steps) > 0.99
    perm, inv = gilbert_permutation(grid)
    n = math.prod(grid)
    assert torch.equal(perm[inv], torch.arange(n)) and torch.equal(inv[perm], torch.arange(n))
    # blocks of 128 consecutive curve tokens are compact tiles: much smaller spread than raster order
    f, h, w = grid
    coords = torch.stack((torch.arange(n) // (h * w), (torch.arange(n) // w) % h, torch.arange(n) % w), -1).float()

    def spread(order):
        blocks = coords[order][: (n // 128) * 128].reshape(-1, 128, 3)
        return (blocks.amax(1) - blocks.amin(1)).sum(-1).mean().item()

    assert spread(perm) < 0.6 * spread(torch.arange(n))


def test_reorder_tokens_round_trip():
    x = torch.randn(1, 2, 2 * 3 * 4, 5)
    perm, inv = gilbert_permutation((2, 3, 4))
    assert torch.equal(reorder_tokens(reorder_tokens(x, perm), inv), x)
    with pytest.raises(ValueError):
        gilbert_permutation((2, 3))


# ----------------------------------------------------------------------------------------------------- ASA


def _qk(b=1, h=2, n=256, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)


def test_asa_importance_matches_explicit_algorithm():
    """Steps 1-3 of Alg. 1 written out with loops over blocks, same sampled offsets (same generator seed)."""
    q, k = _qk(n=96, d=16)
    bs, ks = 32, 4
    imp = asa_importance(q, k, bs, ks, generator=torch.Generator().manual_seed(5))
    offs = torch.rand(1, 2, bs, generator=torch.Generator().manual_seed(5)).topk(ks, dim=-1).indices
    nb = 3
    for h in range(2):
        idx = (torch.arange(nb)[:, None] * bs + offs[0, h][None, :]).flatten()
        p = torch.softmax(q[0, h, idx] @ k[0, h, idx].T / 4.0, dim=-1)  # sqrt(16) = 4
        expect = torch.stack([torch.stack([p[i * ks:(i + 1) * ks, j * ks:(j + 1) * ks].max() for j in range(nb)])
                              for i in range(nb)])
        torch.testing.assert_close(imp[0, h], expect, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("tau", [0.3, 0.6, 0.9, 0.99])
def test_asa_keeps_minimal_set_reaching_tau(tau):
    q, k = _qk(h=3, n=512)
    gen = 7
    imp = asa_importance(q, k, 32, 8, generator=torch.Generator().manual_seed(gen))
    m = asa_mask(q, k, block_size=32, samples_per_block=8, tau=tau, generator=torch.Generator().manual_seed(gen))
    keep = m.to_dense()
    p = imp.double() / imp.double().sum(-1, keepdim=True)
    kept_mass = (p * keep).sum(-1)
    assert (kept_mass >= tau - 1e-9).all()
    # minimal: the kept set is the top-m, and dropping its smallest member falls below tau
    smallest_kept = torch.where(keep, p, torch.full_like(p, 2.0)).amin(-1)
    largest_dropped = torch.where(keep, torch.full_like(p, -1.0), p).amax(-1)
    assert (smallest_kept >= largest_dropped).all()
    assert (kept_mass - smallest_kept < tau).all()
    # content-adaptive: counts differ between rows/heads for a non-trivial tau
    if tau < 0.99:
        assert m.counts.unique().numel() > 1


def test_asa_min_max_keep_and_ratios():
    q, k = _qk(n=512)
    kb = 16
    low = asa_mask(q, k, block_size=32, samples_per_block=8, tau=0.05, min_keep=5)
    assert (low.counts >= 5).all() and (low.counts == 5).any()
    high = asa_mask(q, k, block_size=32, samples_per_block=8, tau=1.0, max_keep=3)
    assert (high.counts == 3).all()
    ratio = asa_mask(q, k, block_size=32, samples_per_block=8, tau=0.05, min_keep=0.25, max_keep=0.5)
    assert (ratio.counts >= math.ceil(0.25 * kb)).all() and (ratio.counts <= kb // 2).all()
    with pytest.raises(ValueError, match="exceeds max_keep"):
        asa_mask(q, k, block_size=32, min_keep=6, max_keep=2)
    with pytest.raises(ValueError, match="tau"):
        asa_mask(q, k, block_size=32, tau=0.0)


def test_asa_is_deterministic_per_generator_and_per_head():
    q, k = _qk(h=2, n=256)
    a = asa_mask(q, k, block_size=32, samples_per_block=8, tau=0.8, generator=torch.Generator().manual_seed(1))
    b = asa_mask(q, k, block_size=32, samples_per_block=8, tau=0.8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.to_dense(), b.to_dense())
    # head 1 of a batch built from head 0 twice equals head 0: heads are independent
    q2, k2 = q[:, :1].expand(1, 2, -1, -1).contiguous(), k[:, :1].expand(1, 2, -1, -1).contiguous()
    imp = asa_importance(q2, k2, 32, 32)  # all tokens sampled: no randomness
    torch.testing.assert_close(imp[:, 0], imp[:, 1])


def test_asa_finds_planted_structure():
    """Keys of block j equal (scaled) queries of block j: ASA at tau 0.9 must keep the diagonal block."""
    torch.manual_seed(0)
    n, bs, d = 512, 32, 32
    centers = torch.randn(n // bs, d) * 3
    q = (centers.repeat_interleave(bs, 0) + 0.1 * torch.randn(n, d))[None, None]
    k = q.clone()
    m = asa_mask(q, k, block_size=bs, samples_per_block=8, tau=0.9)
    assert m.to_dense()[0, 0].diagonal().all()
    assert m.density() < 0.5


def test_asa_with_grid_carries_permutation_and_attention_matches_reference():
    grid = (4, 8, 8)
    q, k = _qk(n=256)
    v = torch.randn_like(q)
    m = asa_mask(q, k, block_size=32, samples_per_block=8, tau=0.8, grid=grid,
                 generator=torch.Generator().manual_seed(0))
    perm, inv = gilbert_permutation(grid)
    assert torch.equal(m.permutation, perm)
    out = block_sparse_attention(q, k, v, m, backend="eager")
    qp, kp, vp = (reorder_tokens(t, perm) for t in (q, k, v))
    ref, _ = masked_attention(qp, kp, vp, m.to_token_mask())
    torch.testing.assert_close(out, reorder_tokens(ref, inv), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="F\\*H\\*W"):
        asa_mask(q, k, block_size=32, grid=(3, 8, 8))


# ------------------------------------------------------------------------------------------------- ASA_GT


def test_global_tokens_exact_when_pooled_keys_are_equal():
    """Constant keys/values per window of n: pooled token + ln n == the n original tokens."""
    torch.manual_seed(0)
    b, h, n_tok, d, n = 1, 2, 96, 16, 8
    q = torch.randn(b, h, n_tok, d, dtype=torch.float64)
    k = torch.randn(b, h, n_tok // n, d, dtype=torch.float64).repeat_interleave(n, 2)
    v = torch.randn(b, h, n_tok // n, d, dtype=torch.float64).repeat_interleave(n, 2)
    # empty sparse part: ASA_GT reduces to the global tokens alone, which must equal full dense attention
    empty = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    out = global_token_attention(q, k, v, empty, window=n, block_size=32)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-10, rtol=0)
    # with a sparse part: equals attention over [K; K] with [M tokens | all], i.e. the pooled region is n copies
    dense = torch.tensor([[[[True, False, False], [True, True, False], [False, False, True]]]])
    mask = BlockSparseMask.from_dense(dense, 32, n_tok, n_tok)
    out, lse = global_token_attention(q, k, v, mask, window=n, return_lse=True)
    kk, vv = torch.cat([k, k], 2), torch.cat([v, v], 2)
    tok = torch.cat([mask.to_token_mask(), torch.ones(1, 1, n_tok, n_tok, dtype=torch.bool)], -1)
    ref, ref_lse = masked_attention(q, kk, vv, tok)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=0)


def test_global_tokens_with_curve_mask_pool_along_the_curve():
    grid = (2, 4, 8)
    q, k = _qk(n=64, d=8)
    v = torch.randn_like(q)
    m = sliding_window_mask(q, k, block_size=16, window=3, grid=grid)
    out = global_token_attention(q, k, v, m, window=4)
    perm, inv = gilbert_permutation(grid)
    qp, kp, vp = (reorder_tokens(t, perm) for t in (q, k, v))
    plain = BlockSparseMask.from_dense(m.to_dense(), 16, 64, 64)  # same blocks, no permutation
    expect = global_token_attention(qp, kp, vp, plain, window=4)
    torch.testing.assert_close(out, reorder_tokens(expect, inv), atol=1e-6, rtol=1e-6)


def test_global_tokens_pooling_and_ragged_bias():
    k = torch.arange(10.0).reshape(1, 1, 10, 1)
    kg, vg, bias = pool_global_tokens(k, k, 4)
    assert kg.flatten().tolist() == [1.5, 5.5, 8.5]
    torch.testing.assert_close(bias, torch.log(torch.tensor([4.0, 4.0, 2.0])))
    # without the ln n bias the result would differ: the bias matters
    q = torch.randn(1, 1, 10, 1)
    with_bias, _ = masked_attention(q, kg, vg, None, bias=bias)
    without, _ = masked_attention(q, kg, vg, None)
    assert (with_bias - without).abs().max() > 1e-3
    with pytest.raises(ValueError):
        pool_global_tokens(k, k, 0)


# --------------------------------------------------------------------------------------------- static masks


def test_sliding_window_1d_band():
    q, k = _qk(n=200)
    m = sliding_window_mask(q, k, block_size=32, window=1)
    i, j = torch.meshgrid(torch.arange(7), torch.arange(7), indexing="ij")
    assert torch.equal(m.to_dense()[0, 0], (i - j).abs() <= 1)
    with pytest.raises(ValueError):
        sliding_window_mask(q, k, block_size=32, window=(1, 1, 1))


def test_sliding_window_3d_matches_explicit_tile_rule():
    grid = (2, 8, 8)  # raster order, blocks of 32 tokens = half-frames (4 rows x 8 cols)
    q, k = _qk(n=128)
    m = sliding_window_mask(q, k, block_size=32, window=(0, 4, 8), grid=grid, reorder=False)
    assert m.permutation is None
    # block centres: (f, h) = (0,1.5), (0,5.5), (1,1.5), (1,5.5); same frame and |dh| <= 4 -> kept
    expect = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(m.to_dense()[0, 0], expect)
    curve = sliding_window_mask(q, k, block_size=32, window=2, grid=grid)
    assert curve.permutation is not None and curve.to_dense()[0, 0].diagonal().all()


def test_meanpool_topk_exact_counts_and_diagonal():
    q, k = _qk(h=2, n=300)
    m = meanpool_topk_mask(q, k, block_size=32, density=0.3)
    assert (m.counts == math.ceil(0.3 * 10)).all()
    assert m.to_dense()[..., torch.arange(10), torch.arange(10)].all()
    t = meanpool_topk_mask(q, k, block_size=32, topk=2, keep_diagonal=False)
    assert (t.counts == 2).all()
    # top-k by pooled score: the kept blocks have the highest pooled scores
    qm = torch.stack([q[:, :, i * 32:(i + 1) * 32].mean(2) for i in range(10)], 2)
    km = torch.stack([k[:, :, i * 32:(i + 1) * 32].mean(2) for i in range(10)], 2)
    best = (qm @ km.transpose(-1, -2)).topk(2, -1).indices.sort(-1).values
    assert torch.equal(t.indices.long().sort(-1).values, best)
