"""Triton block-sparse FlashAttention-2: forward (returns the LSE) and backward, one ``torch.autograd.Function``.

Sparsity arrives in CSR form (``BlockSparseMask.counts``/``indices``): program ``(m, b*h)`` handles a query tile of
``BLOCK_M`` rows inside mask row ``m * BLOCK_M // block_size`` and loops only over that row's kept key blocks, each
in sub-tiles of ``BLOCK_N`` (``BLOCK_M``/``BLOCK_N`` divide ``block_size``, so a 128-token mask block can run as
128x64 tiles, the configuration that does not spill registers on sm_90). Online softmax in base 2; ragged lengths
are masked; rows with no kept block give output 0 and LSE ``-inf``.

Backward: ``dQ`` loops over the kept key blocks of each query tile (same CSR), ``dK``/``dV`` loop over the query
blocks that keep each key tile (the transposed, CSC mask), so there are no atomics.

Where it runs: CUDA tensors use the compiled ``triton.jit`` kernels; CPU tensors use Triton's interpreter
(``InterpretedFunction``), chosen per call, so tests need no ``TRITON_INTERPRET`` environment variable. The
interpreter multiplies bf16 as raw integers, so ``upcast`` (on by default for bf16 on CPU) loads operands as fp32.
No autotune: the interpreter cannot run it, and fixed configurations are what the sm_90 build check verifies.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
from dataclasses import dataclass

import torch

from .block_mask import BlockSparseMask

try:  # triton is optional: the dispatcher skips this backend when it is missing
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

_MISSING = object()
_LAUNCH_LOCK = threading.Lock()  # the interpreter patches module globals: one interpreted launch at a time


@dataclass(frozen=True)
class TileConfig:
    """Kernel tile sizes (must divide the mask block size) and launch parameters (GPU only)."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


def default_config(block_size: int, head_dim: int, device_type: str, kernel: str = "fwd") -> TileConfig:
    """Fixed tile configurations per kernel (``"fwd"`` also serves ``"dq"``; ``"dkdv"``).

    The CUDA ones (block_size 128, D 64/128, fp16/bf16) are those ``python -m diffusion_accel.kernels.aot`` compiles
    for sm_90 with zero stack (no register spills); e.g. fwd 128x64 with 4 warps spills 48 bytes at D=64, so 8 warps.
    """
    if device_type != "cuda":
        t = min(block_size, 64)
        return TileConfig(t, t, 1, 1)
    if kernel == "dkdv":
        return TileConfig(min(block_size, 64 if head_dim <= 64 else 32), min(block_size, 64), 8, 2)
    bm = min(block_size, 128)
    return TileConfig(bm, min(block_size, 64), 8 if bm >= 128 or head_dim > 64 else 4, 2)


if HAS_TRITON:

    def _fwd_kernel(
        Q, K, V, O, LSE, COUNTS, INDICES,
        sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
        scb, sch, scq, sib, sih, siq,
        H, LQ, LK, D, sm_scale,
        BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < LQ
        d_ok = offs_d < D
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        qk_scale = sm_scale * 1.4426950408889634
        row = (pid_m * BLOCK_M) // BLOCK_SIZE
        count = tl.load(COUNTS + b * scb + h * sch + row * scq)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        idx_base = INDICES + b * sib + h * sih + row * siq
        for j in range(0, count):
            kblk = tl.load(idx_base + j)
            for sub in range(0, BLOCK_SIZE // BLOCK_N):
                offs_n = kblk * BLOCK_SIZE + sub * BLOCK_N + tl.arange(0, BLOCK_N)
                n_ok = offs_n < LK
                k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skl + offs_d[None, :],
                            mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svl + offs_d[None, :],
                            mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                if UPCAST:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                s = tl.dot(q, tl.trans(k)) * qk_scale
                s = tl.where(n_ok[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                # a sub-tile past LK (ragged last block) is all -inf; keep exp2 away from (-inf) - (-inf)
                m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.math.exp2(m_i - m_new)
                p = tl.math.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m_i = m_new
        has = l_i > 0
        l_safe = tl.where(has, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(has, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(O + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=m_ok[:, None] & d_ok[None, :])
        tl.store(LSE + pid_bh * LQ + offs_m, lse, mask=m_ok)

    def _bwd_dq_kernel(
        Q, K, V, DO, DQ, LSE, DELTA, COUNTS, INDICES,
        sqb, sqh, sql, skb, skh, skl, svb, svh, svl,
        scb, sch, scq, sib, sih, siq,
        H, LQ, LK, D, sm_scale,
        BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        # DO/DQ share Q's strides (made contiguous by the launcher).
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < LQ
        d_ok = offs_d < D
        q_ptrs = b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :]
        md = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + q_ptrs, mask=md, other=0.0)
        do = tl.load(DO + q_ptrs, mask=md, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + pid_bh * LQ + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        lse = tl.where(lse == float("-inf"), 0.0, lse)
        delta = tl.load(DELTA + pid_bh * LQ + offs_m, mask=m_ok, other=0.0)
        qk_scale = sm_scale * 1.4426950408889634
        row = (pid_m * BLOCK_M) // BLOCK_SIZE
        count = tl.load(COUNTS + b * scb + h * sch + row * scq)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        idx_base = INDICES + b * sib + h * sih + row * siq
        for j in range(0, count):
            kblk = tl.load(idx_base + j)
            for sub in range(0, BLOCK_SIZE // BLOCK_N):
                offs_n = kblk * BLOCK_SIZE + sub * BLOCK_N + tl.arange(0, BLOCK_N)
                n_ok = offs_n < LK
                nd = n_ok[:, None] & d_ok[None, :]
                k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skl + offs_d[None, :], mask=nd, other=0.0)
                v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svl + offs_d[None, :], mask=nd, other=0.0)
                if UPCAST:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                s = tl.dot(q, tl.trans(k)) * qk_scale
                p = tl.math.exp2(s - lse[:, None])
                p = tl.where(m_ok[:, None] & n_ok[None, :], p, 0.0)
                dp = tl.dot(do, tl.trans(v))
                ds = p * (dp - delta[:, None])
                dq += tl.dot(ds.to(k.dtype), k)
        tl.store(DQ + q_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=md)

    def _bwd_dkdv_kernel(
        Q, K, V, DO, DK, DV, LSE, DELTA, COUNTS_T, INDICES_T,
        sqb, sqh, sql, skb, skh, skl, svb, svh, svl,
        scb, sch, scq, sib, sih, siq,
        H, LQ, LK, D, sm_scale,
        BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        # DO shares Q's strides, DK K's, DV V's (made contiguous by the launcher).
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        n_ok = offs_n < LK
        d_ok = offs_d < D
        nd = n_ok[:, None] & d_ok[None, :]
        k_ptrs = b * skb + h * skh + offs_n[:, None] * skl + offs_d[None, :]
        v_ptrs = b * svb + h * svh + offs_n[:, None] * svl + offs_d[None, :]
        k = tl.load(K + k_ptrs, mask=nd, other=0.0)
        v = tl.load(V + v_ptrs, mask=nd, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk_scale = sm_scale * 1.4426950408889634
        col = (pid_n * BLOCK_N) // BLOCK_SIZE
        count = tl.load(COUNTS_T + b * scb + h * sch + col * scq)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        idx_base = INDICES_T + b * sib + h * sih + col * siq
        for j in range(0, count):
            qblk = tl.load(idx_base + j)
            for sub in range(0, BLOCK_SIZE // BLOCK_M):
                offs_m = qblk * BLOCK_SIZE + sub * BLOCK_M + tl.arange(0, BLOCK_M)
                m_ok = offs_m < LQ
                md = m_ok[:, None] & d_ok[None, :]
                q_ptrs = b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :]
                q = tl.load(Q + q_ptrs, mask=md, other=0.0)
                do = tl.load(DO + q_ptrs, mask=md, other=0.0)
                if UPCAST:
                    q = q.to(tl.float32)
                    do = do.to(tl.float32)
                lse = tl.load(LSE + pid_bh * LQ + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
                delta = tl.load(DELTA + pid_bh * LQ + offs_m, mask=m_ok, other=0.0)
                s = tl.dot(q, tl.trans(k)) * qk_scale
                p = tl.math.exp2(s - lse[:, None])
                p = tl.where(m_ok[:, None] & n_ok[None, :], p, 0.0)
                dv += tl.dot(tl.trans(p).to(do.dtype), do)
                dp = tl.dot(do, tl.trans(v))
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds).to(q.dtype), q)
        tl.store(DK + k_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=nd)
        tl.store(DV + v_ptrs, dv.to(DV.dtype.element_ty), mask=nd)

    _KERNELS = {"fwd": _fwd_kernel, "dq": _bwd_dq_kernel, "dkdv": _bwd_dkdv_kernel}
    _COMPILED: dict[tuple[str, bool], object] = {}

    def _kernel(name: str, interpret: bool):
        """``triton.jit`` for CUDA, the interpreter for CPU tensors; built once each."""
        key = (name, interpret)
        if key not in _COMPILED:
            if interpret:
                from triton.runtime.interpreter import InterpretedFunction

                _COMPILED[key] = InterpretedFunction(_KERNELS[name])
            else:
                _COMPILED[key] = triton.jit(_KERNELS[name])
        return _COMPILED[key]

    @contextlib.contextmanager
    def _interpreted_language():
        """Make ``triton.language``'s own ``@jit`` helpers (``tl.sum``, ``tl.max``...) interpretable for this launch.

        Triton picks interpreter vs compiler when ``@triton.jit`` *decorates*, i.e. when ``triton.language`` is
        imported. Torch and Diffusers import triton early, so ``TRITON_INTERPRET=1`` set later has no effect on its
        standard library. When it was not set at import, wrap those helpers in ``InterpretedFunction`` while our
        kernel runs, then restore them.
        """
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        with contextlib.suppress(Exception):  # imported lazily by the launcher; it must see the unpatched library
            import triton.experimental.gluon  # noqa: F401
        # Triton's interpreter patches tl / tl.core / tl.math / tl.tensor for every device-function call and (triton
        # 3.9) never restores them, which breaks any later real compile in this process: snapshot and restore.
        lang_objects = [tl, tl.core, tl.math, tl.core.tensor]
        if hasattr(tl.core, "tensor_descriptor_base"):
            lang_objects.append(tl.core.tensor_descriptor_base)
        saved = [(obj, dict(vars(obj))) for obj in lang_objects]
        patched = []
        for mod_name, mod in list(sys.modules.items()):
            if mod is None or not mod_name.startswith("triton.language"):
                continue
            for attr, obj in list(vars(mod).items()):
                if isinstance(obj, JITFunction):
                    patched.append((mod, attr, obj))
                    setattr(mod, attr, InterpretedFunction(obj.fn))
        try:
            yield
        finally:
            for mod, attr, obj in reversed(patched):
                setattr(mod, attr, obj)
            _restore_attributes(saved)

    def _restore_attributes(saved: list[tuple[object, dict]]) -> None:
        """Put back every attribute of each object as it was in its ``vars()`` snapshot (drop added ones)."""
        for obj, before in saved:
            now = vars(obj)
            for name in [n for n in now if n not in before]:
                delattr(obj, name)
            for name, value in before.items():
                if now.get(name, _MISSING) is not value:
                    setattr(obj, name, value)

    def _launch(name: str, grid, interpret: bool, *args, **kwargs) -> None:
        if interpret:
            with _LAUNCH_LOCK, _interpreted_language():
                _kernel(name, True)[grid](*args, **kwargs)
        else:
            _kernel(name, False)[grid](*args, **kwargs)


def _check(q: torch.Tensor, mask: BlockSparseMask, cfg: TileConfig) -> None:
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: pip install 'diffusion-accel[kernels]' (or use backend='flex')")
    bs = mask.block_size
    for t in (cfg.block_m, cfg.block_n):
        if bs % t or t < 16 or t & (t - 1):
            raise ValueError(f"Triton tiles must be powers of two >= 16 dividing block_size={bs}; got {cfg}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton backend supports float16/bfloat16/float32, got {q.dtype}")


def _mask_args(mask: BlockSparseMask) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    c, i = mask.counts, mask.indices  # broadcast dims have stride 0 after expand()
    return c, i, (c.stride(0), c.stride(1), c.stride(2), i.stride(0), i.stride(1), i.stride(2))


def _flash_forward(q, k, v, mask: BlockSparseMask, scale: float, cfg: TileConfig, upcast: bool):
    bsz, heads, q_len, dim = q.shape
    kv_len = k.shape[2]
    interpret = q.device.type != "cuda"
    out = torch.empty_like(q)
    lse = torch.empty(bsz, heads, q_len, dtype=torch.float32, device=q.device)
    counts, indices, mstrides = _mask_args(mask.expand(bsz, heads))
    grid = (triton.cdiv(q_len, cfg.block_m), bsz * heads)
    launch = {} if interpret else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    _launch(
        "fwd", grid, interpret, q, k, v, out, lse, counts, indices,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        *mstrides, heads, q_len, kv_len, dim, scale,
        BLOCK_SIZE=mask.block_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_D=max(16, triton.next_power_of_2(dim)), UPCAST=upcast, **launch,
    )
    return out, lse


def _flash_backward(q, k, v, out, lse, dout, mask: BlockSparseMask, scale: float, cfg: TileConfig, upcast: bool,
                    cfg_kv: TileConfig):
    bsz, heads, q_len, dim = q.shape
    kv_len = k.shape[2]
    interpret = q.device.type != "cuda"
    dout = dout.contiguous()
    delta = (dout.float() * out.float()).sum(-1).contiguous()  # D_i = rowsum(dO * O)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    block_d = max(16, triton.next_power_of_2(dim))
    launch = {} if interpret else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    common = dict(BLOCK_SIZE=mask.block_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
                  UPCAST=upcast, **launch)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2))
    counts, indices, mstrides = _mask_args(mask.expand(bsz, heads))
    _launch(
        "dq", (triton.cdiv(q_len, cfg.block_m), bsz * heads), interpret, q, k, v, dout, dq, lse, delta,
        counts, indices, *strides, *mstrides, heads, q_len, kv_len, dim, scale, **common,
    )
    mask_t = mask.transpose().expand(bsz, heads)
    counts_t, indices_t, mstrides_t = _mask_args(mask_t)
    launch_kv = {} if interpret else {"num_warps": cfg_kv.num_warps, "num_stages": cfg_kv.num_stages}
    _launch(
        "dkdv", (triton.cdiv(kv_len, cfg_kv.block_n), bsz * heads), interpret, q, k, v, dout, dk, dv, lse, delta,
        counts_t, indices_t, *strides, *mstrides_t, heads, q_len, kv_len, dim, scale,
        BLOCK_SIZE=mask.block_size, BLOCK_M=cfg_kv.block_m, BLOCK_N=cfg_kv.block_n, BLOCK_D=block_d,
        UPCAST=upcast, **launch_kv,
    )
    return dq, dk, dv


class _TritonBlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale, cfg, cfg_kv, upcast):
        out, lse = _flash_forward(q, k, v, mask, scale, cfg, upcast)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale, ctx.cfg, ctx.cfg_kv, ctx.upcast = mask, scale, cfg, cfg_kv, upcast
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _flash_backward(
            q, k, v, out, lse, dout, ctx.mask, ctx.scale, ctx.cfg, ctx.upcast, ctx.cfg_kv
        )
        return dq, dk, dv, None, None, None, None, None


def triton_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockSparseMask,
    scale: float | None = None,
    config: TileConfig | None = None,
    upcast: bool | None = None,
    config_dkdv: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B,H,Lq,D], lse [B,H,Lq] fp32)``; differentiable in q, k, v (the LSE is not).

    ``config`` tiles the forward and dQ kernels, ``config_dkdv`` the dK/dV kernel (defaults: :func:`default_config`).
    ``upcast`` (default: bf16 on CPU, i.e. under the interpreter) loads operands as fp32 inside the kernel.
    """
    bs, dim, dev = block_mask.block_size, q.shape[-1], q.device.type
    cfg = config or default_config(bs, dim, dev)
    cfg_kv = config_dkdv or default_config(bs, dim, dev, "dkdv")
    _check(q, block_mask, cfg)
    _check(q, block_mask, cfg_kv)
    if upcast is None:
        upcast = q.dtype == torch.bfloat16 and q.device.type != "cuda"
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k, v = (t.contiguous() for t in (q, k, v))
    return _TritonBlockSparse.apply(q, k, v, block_mask, scale, cfg, cfg_kv, bool(upcast))
