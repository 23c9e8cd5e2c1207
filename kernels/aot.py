"""Ahead-of-time build check of the Triton kernels for H100 (sm_90) on a machine with no GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` runs the whole NVIDIA pipeline
(ttir -> ttgir -> llir -> ptx -> cubin with the bundled ``ptxas``) without a driver; ``cuobjdump
--dump-resource-usage`` on the cubin then gives registers and stack (stack > 0 = register spills). This catches
type/layout errors the interpreter tolerates and spills in the shipped tile configurations. It says nothing about
speed or GPU numerics.

    python -m diffusion_accel.kernels.aot            # table of kernel x config -> REG / STACK / wgmma
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass

from .triton_block_sparse import HAS_TRITON, TileConfig, default_config

_DTYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


@dataclass
class BuildResult:
    kernel: str
    dtype: str
    block_size: int
    head_dim: int
    config: dict
    registers: int
    stack: int
    has_wgmma: bool
    seconds: float


def _signature(name: str, ptr: str) -> dict[str, str]:
    from . import triton_block_sparse as tbs

    fn = tbs._KERNELS[name]
    sig: dict[str, str] = {}
    for p in inspect.signature(fn).parameters:
        if p in ("LSE", "DELTA"):
            sig[p] = "*fp32"
        elif p in ("COUNTS", "INDICES", "COUNTS_T", "INDICES_T"):
            sig[p] = "*i32"
        elif p.isupper() and len(p) <= 3 and p not in ("H", "LQ", "LK", "D"):  # tensor pointers: Q K V O DO DQ ...
            sig[p] = ptr
        elif p == "sm_scale":
            sig[p] = "fp32"
        elif p.startswith(("BLOCK", "UPCAST")):
            sig[p] = "constexpr"
        else:
            sig[p] = "i32"
    return sig


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found at {path}")
    return path


def build(name: str, dtype: str, block_size: int, head_dim: int, cfg: TileConfig, arch: int = 90) -> BuildResult:
    """Compile one kernel for ``sm_{arch}`` and read its resource usage."""
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from . import triton_block_sparse as tbs

    fn = JITFunction(tbs._KERNELS[name])  # not triton.jit: that returns an interpreter under TRITON_INTERPRET=1
    consts = {"BLOCK_SIZE": block_size, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
              "BLOCK_D": max(16, triton.next_power_of_2(head_dim)), "UPCAST": False}
    t0 = time.perf_counter()
    src = ASTSource(fn, _signature(name, _DTYPES[dtype]), constexprs=consts)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    seconds = time.perf_counter() - t0
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    reg = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    if reg is None or stack is None:
        raise RuntimeError(f"could not parse cuobjdump output:\n{usage}")
    return BuildResult(name, dtype, block_size, head_dim, asdict(cfg), int(reg.group(1)), int(stack.group(1)),
                       "wgmma" in kernel.asm.get("ptx", ""), round(seconds, 2))


def shipped_builds(dtypes=("bf16", "fp16"), head_dims=(64, 128), block_size: int = 128) -> list[BuildResult]:
    """Every kernel in the configuration :func:`default_config` ships for CUDA."""
    out = []
    for dtype in dtypes:
        for d in head_dims:
            for name in ("fwd", "dq", "dkdv"):
                cfg = default_config(block_size, d, "cuda", "dkdv" if name == "dkdv" else "fwd")
                out.append(build(name, dtype, block_size, d, cfg))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--quick", action="store_true", help="forward kernel, bf16, D=64 only")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 = its current default
    if not HAS_TRITON:
        print("triton is not installed")
        return 2
    res = [build("fwd", "bf16", 128, 64, default_config(128, 64, "cuda"))] if args.quick else shipped_builds()
    print(f"{'kernel':6} {'dtype':5} {'D':>4} {'BMxBN':>8} {'warps':>5} {'REG':>4} {'STACK':>5} {'wgmma':>5} {'s':>5}")
    for r in res:
        c = r.config
        print(f"{r.kernel:6} {r.dtype:5} {r.head_dim:4d} {c['block_m']:>4}x{c['block_n']:<3} {c['num_warps']:5d} "
              f"{r.registers:4d} {r.stack:5d} {str(r.has_wgmma):>5} {r.seconds:5.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in res], f, indent=2)
    return 0 if all(r.stack == 0 for r in res) else 1


if __name__ == "__main__":
    raise SystemExit(main())
