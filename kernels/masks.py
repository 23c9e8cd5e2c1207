"""Block-mask builders. Inputs: q, k ``[B, H, L, D]``; optional latent ``grid = (F, H, W)`` with ``F*H*W == L``.

All return a :class:`BlockSparseMask` (``[B or 1, H or 1, Qb, Kb]`` block structure). When a builder reorders
tokens along the Gilbert curve (``grid`` given and ``reorder=True``), the mask carries that ``permutation`` and
:func:`block_sparse_attention` applies it, so callers pass q/k/v in their original order.

* :func:`asa_mask` - Video-BLADE Adaptive block-Sparse Attention (paper Algorithm 1), content-adaptive.
* :func:`sliding_window_mask` - static local window (3-D tile window with a grid, else 1-D band).
* :func:`meanpool_topk_mask` - mean-pooled q/k block scores, top-k (or top-density) key blocks per query block.

Why our own code: the reference implementations (Video-BLADE / PSA Triton probers, SpargeAttn) are CUDA/Triton
packages that do not install on CPU; these are short pure-torch versions of the same rules.
"""

from __future__ import annotations

import math

import torch

from .block_mask import BlockSparseMask, keep_count, num_blocks
from .gilbert import gilbert_permutation


def _check_qk(q: torch.Tensor, k: torch.Tensor, block_size: int) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, H, L, D]; got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share B, H and D; got {tuple(q.shape)} and {tuple(k.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")


def _grid_permutation(
    grid: tuple[int, int, int] | None, length: int, reorder: bool, q_len: int, kv_len: int
) -> torch.Tensor | None:
    if grid is None:
        return None
    if len(grid) != 3 or math.prod(grid) != length or q_len != kv_len:
        raise ValueError(
            f"grid={grid} must be (frames, height, width) with F*H*W == L == Lq == Lk; got Lq={q_len}, Lk={kv_len}"
        )
    return gilbert_permutation(grid)[0] if reorder else None


def _pool_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean over each block of ``block_size`` tokens (ragged last block: mean of its real tokens)."""
    b, h, n, d = x.shape
    nb = num_blocks(n, block_size)
    xp = torch.nn.functional.pad(x.float(), (0, 0, 0, nb * block_size - n))
    sums = xp.reshape(b, h, nb, block_size, d).sum(3)
    sizes = torch.full((nb,), float(block_size), device=x.device)
    sizes[-1] = n - (nb - 1) * block_size
    return sums / sizes[:, None]


def _keep_threshold(
    importance: torch.Tensor, tau: float, min_keep: int | float, max_keep: int | float | None
) -> torch.Tensor:
    """Per row keep the fewest top blocks whose normalised mass reaches ``tau``, clamped; returns bool mask."""
    kb = importance.shape[-1]
    lo = keep_count(min_keep, kb)
    hi = kb if max_keep is None else keep_count(max_keep, kb)
    if lo > hi:
        raise ValueError(f"min_keep ({lo} blocks) exceeds max_keep ({hi} blocks)")
    p = importance.double()
    p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    sorted_p, order = torch.sort(p, dim=-1, descending=True)
    csum = sorted_p.cumsum(-1)
    m = (csum < tau).sum(-1) + 1  # smallest m with cumsum[m-1] >= tau
    m = m.clamp(min=lo, max=hi)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(kb, device=order.device).expand_as(order))
    return rank < m.unsqueeze(-1)


@torch.no_grad()
def asa_importance(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int = 128,
    samples_per_block: int = 16,
    scale: float | None = None,
    generator: torch.Generator | None = None,
    head_chunk: int = 4,
) -> torch.Tensor:
    """Block importance ``P_imp [B, H, Qb, Kb]`` (paper Alg. 1 steps 1-3), fp32.

    ``samples_per_block`` = k: one random set of k in-block offsets per (batch, head), reused for every block (as
    in the authors' PSA prober); ``P~ = softmax(Q_s K_sᵀ · scale)`` over all sampled keys, then max over each
    k×k tile. Heads are processed ``head_chunk`` at a time to bound memory (``(Qb·k) × (Kb·k)`` per head).
    """
    _check_qk(q, k, block_size)
    b, h, lq, d = q.shape
    lk = k.shape[2]
    ks = max(1, min(samples_per_block, block_size))
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qb, kb = num_blocks(lq, block_size), num_blocks(lk, block_size)
    rand = torch.rand(b, h, block_size, generator=generator, device=generator.device if generator else "cpu")
    offsets = rand.topk(ks, dim=-1).indices.to(q.device)  # [B, H, ks]

    def sample(x: torch.Tensor, n_blocks: int, length: int) -> torch.Tensor:
        starts = torch.arange(n_blocks, device=x.device) * block_size
        lens = (length - starts).clamp(max=block_size)  # ragged last block: wrap offsets into its real tokens
        pos = starts[None, None, :, None] + offsets[:, :, None, :] % lens[None, None, :, None]
        idx = pos.reshape(b, h, n_blocks * ks, 1).expand(-1, -1, -1, d)
        return torch.gather(x, 2, idx)

    qs, kss = sample(q, qb, lq), sample(k, kb, lk)
    out = torch.empty(b, h, qb, kb, dtype=torch.float32, device=q.device)
    for h0 in range(0, h, head_chunk):
        sl = slice(h0, h0 + head_chunk)
        s = torch.matmul(qs[:, sl].float(), kss[:, sl].float().transpose(-1, -2)) * scale
        p = torch.softmax(s, dim=-1)
        hh = p.shape[1]
        out[:, sl] = p.reshape(b, hh, qb, ks, kb, ks).amax(dim=(3, 5))
    return out


@torch.no_grad()
def asa_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int = 128,
    samples_per_block: int = 16,
    tau: float = 0.9,
    min_keep: int | float = 1,
    max_keep: int | float | None = None,
    grid: tuple[int, int, int] | None = None,
    reorder: bool = True,
    scale: float | None = None,
    generator: torch.Generator | None = None,
) -> BlockSparseMask:
    """Video-BLADE ASA mask (paper Algorithm 1), per batch element, head and query block.

    Args:
        q, k: ``[B, H, L, D]`` (Q, K).
        block_size: ``b`` (paper 128).
        samples_per_block: ``k`` tokens sampled per block (paper 16).
        tau: ``τ`` cumulative-mass threshold: keep the fewest key blocks whose normalised importance sums to ≥ τ.
        min_keep, max_keep: clamp of the kept count; an ``int`` is blocks, a ``float`` a ratio ``r_min``/``r_max``
            of ``N_b`` (``ceil(r · N_b)``).
        grid: latent ``(F, H, W)``; with ``reorder`` tokens are ordered along the 3-D Gilbert curve first (step 0)
            and the mask carries the permutation.
        generator: RNG for the sampled offsets (determinism).
    """
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    _check_qk(q, k, block_size)
    perm = _grid_permutation(grid, q.shape[2], reorder, q.shape[2], k.shape[2])
    if perm is not None:
        q, k = q.index_select(2, perm.to(q.device)), k.index_select(2, perm.to(k.device))
    imp = asa_importance(q, k, block_size, samples_per_block, scale, generator)
    keep = _keep_threshold(imp, tau, min_keep, max_keep)
    return BlockSparseMask.from_dense(keep, block_size, q.shape[2], k.shape[2], permutation=perm)


def _block_coords(grid: tuple[int, int, int], perm: torch.Tensor | None, block_size: int) -> torch.Tensor:
    """Mean (f, h, w) coordinate of each block of tokens (in curve order when ``perm`` is given)."""
    f, h, w = grid
    raster = torch.arange(f * h * w) if perm is None else perm.cpu()
    coords = torch.stack((raster // (h * w), (raster // w) % h, raster % w), dim=-1).float()
    return _pool_blocks(coords[None, None], block_size)[0, 0]  # [Nb, 3]


def sliding_window_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int = 128,
    window: int | tuple[int, int, int] = 1,
    grid: tuple[int, int, int] | None = None,
    reorder: bool = True,
) -> BlockSparseMask:
    """Static local-window mask (Sliding Tile Attention style); same for every batch element and head.

    Without ``grid``: 1-D band, key block ``j`` kept for query block ``i`` iff ``|i - j| <= window`` (in blocks).
    With ``grid = (F, H, W)``: each block is a 3-D tile of tokens (compact when ``reorder`` puts tokens on the
    Gilbert curve); key block ``j`` is kept iff its tile centre is within ``window = (wf, wh, ww)`` tokens of the
    query tile centre along every axis (an ``int`` window applies to all three axes). The diagonal is always kept.
    """
    _check_qk(q, k, block_size)
    lq, lk = q.shape[2], k.shape[2]
    qb, kb = num_blocks(lq, block_size), num_blocks(lk, block_size)
    if grid is None:
        if not isinstance(window, int) or window < 0:
            raise ValueError(f"without a grid, window must be an int >= 0 (blocks), got {window!r}")
        i = torch.arange(qb)[:, None]
        j = torch.arange(kb)[None, :]
        dense = (i - j).abs() <= window
        return BlockSparseMask.from_dense(dense[None, None].to(q.device), block_size, lq, lk)
    perm = _grid_permutation(grid, lq, reorder, lq, lk)
    win = torch.tensor((window,) * 3 if isinstance(window, int) else tuple(window), dtype=torch.float32)
    if win.numel() != 3 or (win < 0).any():
        raise ValueError(f"window must be an int or (wf, wh, ww) of non-negative token distances, got {window!r}")
    c = _block_coords(grid, perm, block_size)
    dense = ((c[:, None, :] - c[None, :, :]).abs() <= win).all(-1)
    dense |= torch.eye(qb, dtype=torch.bool)
    return BlockSparseMask.from_dense(dense[None, None].to(q.device), block_size, lq, lk, permutation=perm)


@torch.no_grad()
def meanpool_topk_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int = 128,
    density: float | None = 0.25,
    topk: int | None = None,
    keep_diagonal: bool = True,
    grid: tuple[int, int, int] | None = None,
    reorder: bool = True,
    scale: float | None = None,
) -> BlockSparseMask:
    """Mean-pooled top-k mask: score ``softmax(mean(q_i) · mean(k_j)ᵀ · scale)`` per block pair, keep the top
    ``topk`` key blocks per query block (or ``ceil(density · Kb)`` when ``topk`` is None), per batch and head.

    Every row keeps exactly that many blocks (the diagonal counts when ``keep_diagonal`` and Lq == Lk), which
    makes it the mask the benchmark uses for exact sparsity levels.
    """
    _check_qk(q, k, block_size)
    lq, lk = q.shape[2], k.shape[2]
    kb = num_blocks(lk, block_size)
    n_keep = keep_count(float(density), kb) if topk is None else keep_count(int(topk), kb)
    perm = _grid_permutation(grid, lq, reorder, lq, lk)
    if perm is not None:
        q, k = q.index_select(2, perm.to(q.device)), k.index_select(2, perm.to(k.device))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    score = torch.softmax(torch.matmul(_pool_blocks(q, block_size), _pool_blocks(k, block_size).transpose(-1, -2))
                          * scale, dim=-1)
    if keep_diagonal and lq == lk:
        score = score + 2.0 * torch.eye(score.shape[-1], device=score.device)  # softmax <= 1: diagonal ranks first
    idx = score.topk(n_keep, dim=-1).indices
    dense = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, idx, True)
    return BlockSparseMask.from_dense(dense, block_size, lq, lk, permutation=perm)
