"""Plain-PyTorch block-sparse attention: gather the kept key blocks of each query-block row (any device, autograd).

Why not FlexAttention here: eager ``flex_attention`` materialises the full score matrix and skips nothing
(measured about 10x slower than dense SDPA on CPU); this loop does skip masked blocks.
Per query-block row ``i`` it gathers ``max_b,h counts[b,h,i]`` key blocks (padding masked), so the cost follows the
number of kept tiles. Softmax is written out (not SDPA) to return the LSE.
"""

from __future__ import annotations

import math

import torch

from .block_mask import BlockSparseMask


def eager_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockSparseMask,
    scale: float | None = None,
    return_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(out [B,H,Lq,D], lse [B,H,Lq] or None)``; rows with no kept block give 0 / ``-inf``. q,k,v ``[B,H,L,D]``.

    With ``return_lse=False`` each row uses ``F.scaled_dot_product_attention`` (fused CPU kernel, no LSE output).
    """
    bsz, heads, q_len, dim = q.shape
    kv_len = k.shape[2]
    bs = block_mask.block_size
    mask = block_mask.expand(bsz, heads)
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    kb = block_mask.num_kv_blocks
    pad = kb * bs - kv_len
    # [B, H, Kb, bs, D] views of K and V (zero-padded ragged tail, masked below)
    kp = torch.nn.functional.pad(k, (0, 0, 0, pad)).reshape(bsz, heads, kb, bs, dim)
    vp = torch.nn.functional.pad(v, (0, 0, 0, pad)).reshape(bsz, heads, kb, bs, dim)
    tok_valid = (torch.arange(kb * bs, device=q.device) < kv_len).reshape(kb, bs)
    counts = mask.counts.long()
    row_max = counts.amax(dim=(0, 1)).tolist()
    outs, lses = [], []
    for i in range(block_mask.num_q_blocks):
        q_i = q[:, :, i * bs : (i + 1) * bs].to(work)
        n = row_max[i]
        if n == 0:
            outs.append(torch.zeros_like(q_i))
            if return_lse:
                lses.append(torch.full(q_i.shape[:-1], float("-inf"), dtype=work, device=q.device))
            continue
        idx = mask.indices[:, :, i, :n].long()  # [B, H, n]
        gather = idx[..., None, None].expand(bsz, heads, n, bs, dim)
        k_i = torch.gather(kp, 2, gather).reshape(bsz, heads, n * bs, dim).to(work)
        v_i = torch.gather(vp, 2, gather).reshape(bsz, heads, n * bs, dim).to(work)
        slot_ok = torch.arange(n, device=q.device) < counts[:, :, i, None]  # [B, H, n]
        valid = (slot_ok[..., None] & tok_valid[idx]).reshape(bsz, heads, 1, n * bs)
        if not return_lse:
            all_valid = bool(valid.all())
            o = torch.nn.functional.scaled_dot_product_attention(
                q_i, k_i, v_i, attn_mask=None if all_valid else valid, scale=scale
            )
            if not all_valid:  # (b, h) pairs with no kept block: SDPA gives NaN there, we define 0
                o = torch.where(valid.any(-1, keepdim=True), o, torch.zeros_like(o))
            outs.append(o)
            continue
        s = torch.matmul(q_i, k_i.transpose(-1, -2)) * scale
        s = s.masked_fill(~valid, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        outs.append(torch.matmul(torch.exp(s - safe.unsqueeze(-1)), v_i))
        lses.append(lse)
    return torch.cat(outs, dim=2).to(q.dtype), torch.cat(lses, dim=2) if return_lse else None
