"""Compiled FlexAttention path: the CPU fast path (Inductor's C++ flex template skips masked blocks).

One ``torch.compile(flex_attention, dynamic=False)`` is cached per process; new masks of the same shape reuse the
compiled code. Forward only on CPU (FlexAttention has no CPU backward), so the dispatcher routes CPU autograd to
the eager path. ``compiled=False`` runs eager flex (dense cost; correct only because our BlockMask carries a
``mask_mod``), which is useful only as a cross-check.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from .block_mask import BlockSparseMask

# Distinct (shape, dtype, mask-shape) combinations each compile once; the default recompile limit (8) would
# silently fall back to eager flex (dense cost) in a long session with many resolutions.
_RECOMPILE_LIMIT = 64


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _recompile_limit():
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    return cfg.patch(**{name: max(getattr(cfg, name), _RECOMPILE_LIMIT)})


def flex_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockSparseMask,
    scale: float | None = None,
    compiled: bool = True,
    return_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(out [B,H,Lq,D], lse [B,H,Lq] fp32 natural log or None)`` via ``block_mask.to_flex_block_mask()``.

    Compiled flex on CPU (torch 2.13) cannot return the LSE ("only supports inference and `return_lse` is not
    supported yet"), so ``return_lse=True`` with ``compiled=True`` is for CUDA; the dispatcher knows this.
    """
    from torch.nn.attention.flex_attention import flex_attention

    bm = block_mask.to_flex_block_mask()
    if compiled:
        with _recompile_limit():
            res = _compiled_flex()(q, k, v, block_mask=bm, scale=scale, return_lse=return_lse)
    else:
        with warnings_silenced():
            res = flex_attention(q, k, v, block_mask=bm, scale=scale, return_lse=return_lse)
    if return_lse:
        out, lse = res
        return out, lse.float()
    return res, None


@contextlib.contextmanager
def warnings_silenced():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
