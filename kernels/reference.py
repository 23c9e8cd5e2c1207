"""Dense masked attention: the ground truth of every test and the autograd oracle on CPU.

Memory is O(B * H * Lq * Lk) (the block mask is expanded to tokens), so use it for references and small shapes.
"""

from __future__ import annotations

import math

import torch

from .block_mask import BlockSparseMask


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    token_mask: torch.Tensor | None,
    scale: float | None = None,
    bias: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q kᵀ * scale + bias, masked) v`` and its natural-log LSE ``[B, H, Lq]``, computed in fp32 (fp64 stays).

    ``token_mask`` broadcasts to ``[B, H, Lq, Lk]`` (True = kept). Rows with no kept key return output 0 and
    LSE ``-inf`` (``F.scaled_dot_product_attention`` would return NaN there). Autograd flows through everything.
    We compute the softmax by hand rather than with ``F.scaled_dot_product_attention`` because SDPA does not return
    the LSE, which the merge of partial attentions needs.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(work), k.to(work).transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    if token_mask is not None:
        s = s.masked_fill(~token_mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(s - safe_lse.unsqueeze(-1))
    out = torch.matmul(p, v.to(work))
    return out.to(q.dtype), lse


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockSparseMask,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention by expanding ``block_mask`` to tokens; returns ``(out [B,H,Lq,D], lse [B,H,Lq])``.

    Does not apply ``block_mask.permutation`` (the dispatcher does that around every backend).
    """
    return masked_attention(q, k, v, block_mask.to_token_mask().to(q.device), scale)


def merge_attention_outputs(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax merge of two attentions over disjoint key sets.

    ``o = (e^lse1 o1 + e^lse2 o2) / (e^lse1 + e^lse2)``, ``lse = log(e^lse1 + e^lse2)``.

    ``o1``/``o2`` ``[B, H, L, D]``, ``lse1``/``lse2`` ``[B, H, L]`` natural log. Returns ``(o, lse)``; rows empty
    in both parts give output 0 and LSE ``-inf``. Computed in fp32 (fp64 for fp64 inputs), cast back to ``o1.dtype``.
    """
    if o1.shape != o2.shape or lse1.shape != lse2.shape or tuple(o1.shape[:-1]) != tuple(lse1.shape):
        raise ValueError(
            f"merge needs o1/o2 of one shape [B,H,L,D] and lse1/lse2 [B,H,L]; got {tuple(o1.shape)}, "
            f"{tuple(o2.shape)}, {tuple(lse1.shape)}, {tuple(lse2.shape)}"
        )
    work = torch.float64 if torch.float64 in (o1.dtype, lse1.dtype) else torch.float32
    l1, l2 = lse1.to(work), lse2.to(work)
    m = torch.maximum(l1, l2)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    total = w1 + w2
    denom = torch.where(total > 0, total, torch.ones_like(total))
    out = (w1.unsqueeze(-1) * o1.to(work) + w2.unsqueeze(-1) * o2.to(work)) / denom.unsqueeze(-1)
    lse = torch.where(total > 0, m + torch.log(denom), torch.full_like(total, float("-inf")))
    return out.to(o1.dtype), lse
