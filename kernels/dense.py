"""Dense attention backends beside PyTorch SDPA: the reference the kernel bench times against, and the attention the
sparse method's dense calls (cross-attention, masked, short sequences) run on.

* ``"sdpa"``: ``F.scaled_dot_product_attention`` (any device).
* ``"xformers"``: ``xformers.ops.memory_efficient_attention`` (the ``[xformers]`` extra; CUDA only).

Shapes follow SDPA: q, k, v ``[B, H, L, D]``.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

DENSE_BACKENDS = ("sdpa", "xformers")


def xformers_unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why the xformers backend cannot run (on ``device``, when given), or ``None`` when it can."""
    if importlib.util.find_spec("xformers") is None:
        return ("xformers is not installed; install the extra with `pip install 'diffusion-accel[xformers]'` "
                "(it needs a CUDA build of PyTorch), or use the dense backend 'sdpa'")
    if device is not None and torch.device(device).type != "cuda":
        return (f"xformers' memory-efficient attention runs on CUDA only, and this model is on "
                f"{torch.device(device).type}; use the dense backend 'sdpa' there")
    return None


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                    backend: str = "sdpa") -> torch.Tensor:
    """Full (dense) attention on ``backend``.

    Raises:
        ValueError: unknown backend, or xformers cannot run here (the message says why and what to use instead).
    """
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if backend != "xformers":
        raise ValueError(f"dense attention backend must be one of {DENSE_BACKENDS}, got {backend!r}")
    reason = xformers_unavailable_reason(q.device)
    if reason is not None:
        raise ValueError(reason)
    import xformers.ops as xops

    # xformers takes [B, L, H, D]
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)
