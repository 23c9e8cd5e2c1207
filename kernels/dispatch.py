"""``block_sparse_attention``: the one function users call; picks Triton (CUDA), compiled flex, or eager.

Backends (``backend=``):

* ``"auto"`` (default): Triton on CUDA when triton imports; on CPU our C++ kernel (``"cpp"``) for forward passes
  when it builds here, else compiled FlexAttention; other devices compiled FlexAttention; the eager gather path when
  none of those can serve the call (CPU autograd: neither the C++ kernel nor compiled flex has a CPU backward;
  float64; or the build / ``torch.compile`` failed once in this process).
* ``"triton"``: Triton kernel (CPU tensors run in Triton's interpreter: slow, for tests).
* ``"cpp"``: the CPU C++ kernel (:mod:`.cpu_ext`, compiled on first use; forward only, returns the LSE).
* ``"flex"``: compiled FlexAttention; ``"flex_eager"``: uncompiled flex (dense cost, cross-check only).
* ``"eager"``: plain-PyTorch gather of kept key blocks (any device, autograd).
* ``"reference"``: dense SDPA-style math with the expanded token mask (O(L^2) memory; tests).
"""

from __future__ import annotations

import logging

import torch

from .block_mask import BlockSparseMask, as_block_mask
from .eager import eager_block_sparse_attention
from .reference import reference_attention

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "cpp", "flex", "flex_eager", "eager", "reference")
# (device type, dtype) -> first compiled-flex failure; auto stops trying flex for that pair afterwards
_FLEX_BROKEN: dict[tuple[str, torch.dtype], str] = {}


def triton_available() -> bool:
    """True when ``import triton`` works (the Triton backend is skipped cleanly otherwise)."""
    from . import triton_block_sparse

    return triton_block_sparse.HAS_TRITON


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"{name} must be a 4-D tensor [B, H, L, D]; got {shape}. Diffusers processors hold [B, L, H, D]: "
                "pass x.transpose(1, 2)"
            )
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype} (cast k/v to q.dtype)")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    (b, h, _, d), (bk, hk, lk, dk), (bv, hv, lv, _) = q.shape, k.shape, v.shape
    if (bk, hk) != (b, h) or (bv, hv) != (b, h):
        raise ValueError(
            f"q, k, v must share B and H (no GQA here: repeat k/v heads first); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if dk != d:
        raise ValueError(f"q and k must share the head dim D; got {d} and {dk}")
    if lv != lk:
        raise ValueError(f"k and v must share the length Lk; got {lk} and {lv}")
    if min(q.shape[2], lk) < 1:
        raise ValueError("sequence lengths must be >= 1")


def _needs_grad(*ts: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _choose(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, return_lse: bool) -> str:
    if q.device.type == "cuda" and triton_available() and q.dtype != torch.float64:
        return "triton"
    if q.dtype == torch.float64:
        return "eager"
    if q.device.type == "cpu":
        if _needs_grad(q, k, v):
            return "eager"
        from .cpu_ext import cpu_kernel, warn_unavailable_once

        if cpu_kernel() is not None:
            return "cpp"
        warn_unavailable_once()
        if return_lse:
            return "eager"
    if (q.device.type, q.dtype) in _FLEX_BROKEN:
        return "eager"
    return "flex"


def _run(name: str, q, k, v, mask: BlockSparseMask, scale, return_lse: bool):
    if name == "triton":
        if not triton_available():
            raise ValueError(
                "backend='triton' needs triton: pip install 'diffusion-accel[kernels]', or use backend='auto'"
            )
        from .triton_block_sparse import triton_block_sparse_attention

        return triton_block_sparse_attention(q, k, v, mask, scale)
    if name == "cpp":
        from .cpu_ext import cpu_block_sparse_attention

        if _needs_grad(q, k, v):
            raise ValueError("backend='cpp' is forward-only; use backend='eager' (or 'auto') for autograd on CPU")
        out, lse = cpu_block_sparse_attention(q, k, v, mask, scale)
        return out, lse if return_lse else None
    if name in ("flex", "flex_eager"):
        from .flex import flex_block_sparse_attention

        if name == "flex" and q.device.type == "cpu" and (return_lse or _needs_grad(q, k, v)):
            raise ValueError(
                "compiled FlexAttention on CPU is inference-only and cannot return the LSE; use backend='eager' "
                "(or 'auto') for autograd / return_lse on CPU"
            )
        return flex_block_sparse_attention(q, k, v, mask, scale, compiled=name == "flex", return_lse=return_lse)
    if name == "eager":
        return eager_block_sparse_attention(q, k, v, mask, scale, return_lse=return_lse)
    if name == "reference":
        return reference_attention(q, k, v, mask, scale)
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockSparseMask | torch.Tensor,
    block_size: int | None = None,
    scale: float | None = None,
    *,
    backend: str = "auto",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention ``softmax(q kᵀ · scale, block-masked) v``.

    Args:
        q: ``[B, H, Lq, D]``; k, v: ``[B, H, Lk, D]`` (same dtype/device; fp16, bf16, fp32; fp64 eager/reference).
        block_mask: a :class:`BlockSparseMask` or a dense bool ``[B or 1, H or 1, ceil(Lq/bs), ceil(Lk/bs)]``
            (True = tile computed). Ragged lengths are fine (the last block is partial). A mask's ``permutation``
            (e.g. from ``asa_mask(..., grid=...)``) is applied to q/k/v and undone on the output.
        block_size: tokens per block ``bs``; defaults to the mask's, or 128 for a dense tensor.
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: see the module docstring.
        return_lse: also return the natural-log LSE ``[B, H, Lq]`` (fp32) for exact merges
            (:func:`merge_attention_outputs`).

    Returns:
        ``out [B, H, Lq, D]`` in q's dtype (or ``(out, lse)``). Query rows whose blocks keep no key give 0
        (LSE ``-inf``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    _validate(q, k, v)
    bsz, heads, q_len, _ = q.shape
    mask = as_block_mask(block_mask, q_len, k.shape[2], bsz, heads, block_size)
    if mask.device != q.device:
        mask = mask.to(q.device)
    perm = mask.permutation
    if perm is not None:
        perm = perm.to(q.device)
        q, k, v = (t.index_select(2, perm) for t in (q, k, v))
    name = _choose(q, k, v, return_lse) if backend == "auto" else backend
    try:
        out, lse = _run(name, q, k, v, mask, scale, return_lse)
    except Exception as exc:  # compile failures (no C++ compiler, unsupported dtype): eager is always correct
        if backend != "auto" or name != "flex":
            raise
        _FLEX_BROKEN[(q.device.type, q.dtype)] = f"{type(exc).__name__}: {exc}"
        logger.warning("compiled FlexAttention failed (%s); using the eager block-sparse path from now on", exc)
        out, lse = eager_block_sparse_attention(q, k, v, mask, scale, return_lse=return_lse)
    if perm is not None:
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        out = out.index_select(2, inverse)
        lse = None if lse is None else lse.index_select(2, inverse)
    if return_lse:
        if lse is None:  # pragma: no cover - every backend returns it when asked
            raise RuntimeError(f"backend {name!r} did not return the LSE")
        return out, lse
    return out
