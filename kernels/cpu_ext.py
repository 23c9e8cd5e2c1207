"""CPU block-sparse attention kernel (C++, ``csrc/block_sparse_cpu.cpp``), compiled on first use.

Why our own C++ here rather than only compiled FlexAttention: Inductor's CPU flex template multiplies tiles with
its own micro-GEMM, which on AVX2-only CPUs costs about 2x dense SDPA per computed tile (kernel bench: 80 %
sparsity at L=16384 gave 2.1-2.5x instead of the ~5x the skipped work allows). This kernel is ATen's CPU flash
attention loop (the BLAS GEMM SDPA itself uses, plus an online softmax with ATen's vectorised ``exp_u20``) that
visits only the kept key blocks; it also returns the LSE, which compiled flex on CPU cannot.

The extension is built with ``torch.utils.cpp_extension.load`` (needs a C++ compiler and ninja, the same
toolchain compiled flex needs) into ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), once per
machine and CPU capability; the first build takes about 15 s. If it cannot be built, :func:`cpu_kernel`
returns ``None`` and the dispatcher falls back to compiled flex.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path

import torch

from .block_mask import BlockSparseMask

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "block_sparse_cpu.cpp"
_VERSION = 5  # bump when the C++ source changes so cached builds are not reused
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"],
}
_BUILD_ERROR: list[str] = []


def _capability() -> str:
    cap = torch.backends.cpu.get_cpu_capability()
    return cap if cap in _ISA_FLAGS else "DEFAULT"


@functools.lru_cache(maxsize=1)
def cpu_kernel():
    """The compiled op ``torch.ops.diffusion_accel.block_sparse_cpu_forward``, or ``None`` when it cannot be built
    here (reason in :func:`build_error`)."""
    if os.environ.get("DIFFUSION_ACCEL_NO_CPU_KERNEL"):
        _BUILD_ERROR.append("disabled by DIFFUSION_ACCEL_NO_CPU_KERNEL")
        return None
    from torch.utils.cpp_extension import load

    cap = _capability()
    # -fopenmp: at::parallel_for is a header template whose `#pragma omp parallel` is compiled here; without the
    # flag it silently runs on one thread
    flags = ["-O3", "-std=c++17", "-fopenmp", f"-DCPU_CAPABILITY={cap}", *_ISA_FLAGS.get(cap, [])]
    try:
        load(
            name=f"diffusion_accel_block_sparse_cpu_v{_VERSION}_{cap.lower()}",
            sources=[str(_SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,  # a TORCH_LIBRARY op library: no pybind11 (faster to build)
            verbose=False,
        )
        return torch.ops.diffusion_accel.block_sparse_cpu_forward
    except Exception as exc:  # no compiler / ninja / headers: the dispatcher uses compiled flex instead
        _BUILD_ERROR.append(f"{type(exc).__name__}: {exc}")
        logger.warning("could not build the CPU block-sparse kernel (%s); using compiled FlexAttention", exc)
        return None


def build_error() -> str | None:
    """Why :func:`cpu_kernel` returned ``None`` (``None`` if it built or was not tried)."""
    return _BUILD_ERROR[-1] if _BUILD_ERROR else None


def cpu_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockSparseMask,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B,H,Lq,D] in q's dtype, lse [B,H,Lq] fp32)``; fp16/bf16 are computed in fp32. Forward only."""
    op = cpu_kernel()
    if op is None:
        raise RuntimeError(f"the CPU block-sparse kernel is unavailable here: {build_error()}")
    if q.device.type != "cpu":
        raise ValueError(f"backend='cpp' runs on CPU tensors; got {q.device} (use backend='auto')")
    if q.dtype == torch.float64:
        raise ValueError("backend='cpp' computes in float32; use backend='eager' for float64")
    bsz, heads, _, dim = q.shape
    block_mask.check_indices()  # the kernel reads K/V blocks by these ids
    mask = block_mask.expand(bsz, heads)
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    q32, k32, v32 = (t.to(torch.float32).contiguous() for t in (q, k, v))
    out, lse = op(
        q32, k32, v32, mask.counts.contiguous(), mask.indices.contiguous(),  # int32 (BlockSparseMask enforces it)
        block_mask.block_size, scale,
    )
    return out.to(q.dtype), lse
