"""ASA_GT (Video-BLADE §3.2): block-sparse attention plus dense attention to mean-pooled "global" tokens.

    S_sparse = Q Kᵀ · scale (masked by M),   S_glob = Q K_gᵀ · scale + ln n
    O = softmax([S_sparse, S_glob]) · [V ; V_g]

``K_g = MeanPool_n(K)``, ``V_g = MeanPool_n(V)`` over windows of ``n`` = ``window`` consecutive tokens (in the
mask's token order, i.e. along the Gilbert curve when the mask carries a permutation). The bias ``ln n`` makes one
pooled token weigh like the ``n`` tokens it summarises, exactly so when those keys/values are equal. A ragged last
window of ``n' < n`` tokens gets ``ln n'``. The two parts are computed separately and merged exactly by their LSEs.
"""

from __future__ import annotations

import math

import torch

from .block_mask import BlockSparseMask, as_block_mask, num_blocks
from .dispatch import block_sparse_attention
from .reference import masked_attention, merge_attention_outputs


def pool_global_tokens(
    k: torch.Tensor, v: torch.Tensor, window: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(K_g, V_g [B, H, ceil(L/n), D], bias [ceil(L/n)])`` with ``bias = ln(tokens in each window)``."""
    if window < 1:
        raise ValueError(f"global-token window n must be >= 1, got {window}")
    b, h, n_tok, d = k.shape
    ng = num_blocks(n_tok, window)
    pad = ng * window - n_tok
    work = torch.float64 if k.dtype == torch.float64 else torch.float32
    sizes = torch.full((ng,), float(window), dtype=work, device=k.device)
    sizes[-1] = n_tok - (ng - 1) * window

    def pool(x: torch.Tensor) -> torch.Tensor:
        xp = torch.nn.functional.pad(x, (0, 0, 0, pad)).reshape(b, h, ng, window, d)
        return (xp.sum(3) / sizes[:, None].to(x.dtype)).to(x.dtype)

    return pool(k), pool(v), torch.log(sizes)


def global_token_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockSparseMask | torch.Tensor,
    window: int,
    block_size: int | None = None,
    scale: float | None = None,
    *,
    backend: str = "auto",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """ASA_GT output ``[B, H, Lq, D]``: sparse part via :func:`block_sparse_attention`, pooled part dense.

    q, k, v ``[B, H, L, D]`` in the caller's token order; ``block_mask`` as for :func:`block_sparse_attention`;
    ``window`` = n (pooling window in tokens).
    """
    mask = as_block_mask(block_mask, q.shape[2], k.shape[2], q.shape[0], q.shape[1], block_size)
    o1, lse1 = block_sparse_attention(q, k, v, mask, scale=scale, backend=backend, return_lse=True)
    perm = mask.permutation
    if perm is not None:  # pool along the order the mask was built in
        perm = perm.to(k.device)
        k, v = k.index_select(2, perm), v.index_select(2, perm)
    kg, vg, bias = pool_global_tokens(k, v, window)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    # The pooled set is small (L/n keys): plain dense math, which also gives autograd on every device.
    o2, lse2 = masked_attention(q, kg, vg, None, scale, bias=bias.to(q.device))
    out, lse = merge_attention_outputs(o1, lse1, o2, lse2)
    return (out, lse) if return_lse else out
