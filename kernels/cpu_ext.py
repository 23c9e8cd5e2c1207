"""CPU block-sparse attention kernel (C++, ``csrc/block_sparse_cpu.cpp``), compiled on first use.

Why our own C++ here rather than only compiled FlexAttention: Inductor's CPU flex template multiplies tiles with
its own micro-GEMM, which on AVX2-only CPUs costs about 2x dense SDPA per computed tile (kernel bench: 80 %
sparsity at L=16384 gave 2.1-2.5x instead of the ~5x the skipped work allows). This kernel is ATen's CPU flash
attention loop (the BLAS GEMM SDPA itself uses, plus an online softmax with ATen's vectorised ``exp_u20``) that
visits only the kept key blocks; it also returns the LSE, which compiled flex on CPU cannot.

The extension is built with ``torch.utils.cpp_extension.load`` (needs a C++ compiler and ninja, the same
toolchain compiled flex needs) into ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), once per
machine and ATen CPU capability (``torch.backends.cpu.get_cpu_capability()``, which ``ATEN_CPU_CAPABILITY`` can
lower); the first build takes about 15 s. Each capability is compiled with the ISA flags PyTorch compiles its own
kernels of that capability with, so ``at::vec::Vectorized`` has the width ATen uses at run time. The source is
written for and tested on x86-64 (``DEFAULT``, ``AVX2``, ``AVX512``); elsewhere it is not built. If it cannot be
built, :func:`cpu_kernel` returns ``None``, the first ``auto`` call warns once with the reason and the fix, and the
dispatcher falls back to compiled flex (:func:`status` says which and why).
"""

from __future__ import annotations

import functools
import math
import os
import platform
import subprocess
import warnings
from pathlib import Path

import torch

from .block_mask import BlockSparseMask

SOURCE = Path(__file__).parent / "csrc" / "block_sparse_cpu.cpp"
_VERSION = 6  # bump when the C++ source or flags change so cached builds are not reused
#: ISA flags per ATen CPU capability, as PyTorch's own build uses them (cmake/Codegen.cmake); DEFAULT is the
#: generic ``Vectorized`` that any x86-64 compiler accepts.
CAPABILITY_FLAGS: dict[str, list[str]] = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"],
}
#: ``ATEN_CPU_CAPABILITY`` values, lowest first: an x86 host can run every capability up to its own.
CAPABILITY_ORDER = ("DEFAULT", "AVX2", "AVX512")
_X86_MACHINES = ("x86_64", "amd64", "x64")
_BUILD_ERROR: list[str] = []
_WARNED: list[bool] = []

FIX_HINT = (
    "install a C++ compiler and ninja (Debian/Ubuntu: apt-get install g++; pip install ninja) and restart Python; "
    "set DIFFUSION_ACCEL_NO_CPU_KERNEL=1 to use compiled FlexAttention without this warning"
)
_DISABLED = "disabled by DIFFUSION_ACCEL_NO_CPU_KERNEL"


def capability() -> str:
    """The ATen CPU capability this process dispatches to, mapped to a key of :data:`CAPABILITY_FLAGS`
    (an unknown x86 capability builds the generic ``DEFAULT`` code)."""
    cap = torch.backends.cpu.get_cpu_capability()
    return cap if cap in CAPABILITY_FLAGS else "DEFAULT"


def unsupported_reason() -> str | None:
    """Why the kernel is not even tried here (``None`` on x86-64 with the kernel enabled)."""
    if os.environ.get("DIFFUSION_ACCEL_NO_CPU_KERNEL"):
        return _DISABLED
    machine = platform.machine().lower()
    if machine not in _X86_MACHINES:
        return (
            f"the C++ kernel is written and tested for x86-64 only (its ISA flags and the BLAS entry point it "
            f"calls); this machine is {platform.machine()}"
        )
    return None


def compiler_flags(cap: str) -> list[str]:
    """Flags (besides PyTorch's own extension flags) that build the kernel for ATen capability ``cap``."""
    if cap not in CAPABILITY_FLAGS:
        raise ValueError(f"unknown CPU capability {cap!r}; choose one of {sorted(CAPABILITY_FLAGS)}")
    # -fopenmp: at::parallel_for is a header template whose `#pragma omp parallel` is compiled here; without the
    # flag it silently runs on one thread
    return ["-O3", "-fopenmp", f"-DCPU_CAPABILITY={cap}", *CAPABILITY_FLAGS[cap]]


def compile_only(cap: str, compiler: str = "c++") -> subprocess.CompletedProcess:
    """Compile the source for capability ``cap`` without linking or running it (``-fsyntax-only``), with the
    include paths, ABI and language standard PyTorch builds extensions with. Works for every capability on any
    x86-64 host, so a machine without AVX-512 still finds an AVX-512 compile error."""
    from torch.utils.cpp_extension import include_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [
        compiler, "-fsyntax-only", "-std=c++20", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "-DTORCH_API_INCLUDE_EXTENSION_H", *[f"-isystem{p}" for p in include_paths()],
        *compiler_flags(cap), str(SOURCE),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


@functools.lru_cache(maxsize=1)
def cpu_kernel():
    """The compiled op ``torch.ops.diffusion_accel.block_sparse_cpu_forward``, or ``None`` when it cannot be built
    here (reason in :func:`build_error`)."""
    reason = unsupported_reason()
    if reason is not None:
        _BUILD_ERROR.append(reason)
        return None
    from torch.utils.cpp_extension import load

    cap = capability()
    try:
        load(
            name=f"diffusion_accel_block_sparse_cpu_v{_VERSION}_{cap.lower()}",
            sources=[str(SOURCE)],
            extra_cflags=compiler_flags(cap),
            extra_ldflags=["-fopenmp"],
            is_python_module=False,  # a TORCH_LIBRARY op library: no pybind11 (faster to build)
            verbose=False,
        )
        return torch.ops.diffusion_accel.block_sparse_cpu_forward
    except Exception as exc:  # no compiler / ninja / headers: the dispatcher uses compiled flex instead
        _BUILD_ERROR.append(f"{type(exc).__name__}: {_first_lines(str(exc))}")
        return None


def _first_lines(text: str, count: int = 3) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[:count]) + (" ..." if len(lines) > count else "")


def build_error() -> str | None:
    """Why :func:`cpu_kernel` returned ``None`` (``None`` if it built or was not tried)."""
    return _BUILD_ERROR[-1] if _BUILD_ERROR else None


def fix_hint() -> str:
    """What would make the kernel available here, for the reason :func:`build_error` gives."""
    reason = unsupported_reason()
    if reason == _DISABLED:
        return "unset DIFFUSION_ACCEL_NO_CPU_KERNEL"
    if reason is not None:
        return "none on this architecture: compiled FlexAttention is its CPU backend"
    return FIX_HINT


def warn_unavailable_once() -> None:
    """Warn (once per process) that ``auto`` cannot use the kernel because its build failed, with the reason and
    the fix. A kernel disabled on purpose, or not made for this architecture, is not warned about: there is
    nothing to fix (:func:`status` still says why)."""
    if _WARNED or unsupported_reason() is not None:
        return
    _WARNED.append(True)
    warnings.warn(
        f"diffusion_accel: the CPU block-sparse kernel is unavailable ({build_error()}); backend='auto' uses "
        f"compiled FlexAttention, about 2x slower at 80 % sparsity. Fix: {fix_hint()}.",
        RuntimeWarning,
        stacklevel=3,
    )


def status() -> dict[str, str]:
    """What ``backend="auto"`` runs for CPU forward passes here, and why (builds the kernel if needed)."""
    cap = torch.backends.cpu.get_cpu_capability()
    if cpu_kernel() is not None:
        return {"backend": "cpp", "cpu_capability": cap,
                "why": f"our C++ kernel built for {capability()} (fastest CPU backend)"}
    return {"backend": "flex", "cpu_capability": cap,
            "why": f"C++ kernel unavailable: {build_error()}; fix: {fix_hint()}"}


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
