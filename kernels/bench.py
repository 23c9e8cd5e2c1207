"""CPU kernel benchmark: dense SDPA vs block-sparse attention (our C++ kernel, compiled flex, eager) across sparsity.

    python -m diffusion_accel.kernels.bench --json out.json          # L=16384, H=8, D=64, block 128 (minutes)
    python -m diffusion_accel.kernels.bench --quick --json out.json  # small smoke run

One process, interleaved repeats (each round times dense once, then every sparsity on every backend), median per
cell; speedup = dense median / sparse median. Masks: mean-pooled top-k on random q/k with exactly
``ceil((1 - sparsity) * Kb)`` key blocks per query block (the diagonal included).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from .dispatch import block_sparse_attention
from .masks import meanpool_topk_mask

FULL_SPARSITIES = (0, 25, 50, 75, 80, 90, 95)
CPU_BACKENDS = ("cpp", "flex", "eager")  # our C++ kernel, compiled FlexAttention, eager gather


def _timed(fn) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run(
    seq_len: int = 16384,
    heads: int = 8,
    head_dim: int = 64,
    block_size: int = 128,
    sparsities=FULL_SPARSITIES,
    repeats: int = 3,
    backends=CPU_BACKENDS,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    log=print,
) -> dict:
    """Run the benchmark and return a JSON-able dict (times in milliseconds)."""
    backends = tuple(backends)
    skipped = {}
    if "cpp" in backends:
        from .cpu_ext import build_error, cpu_kernel

        t0 = time.perf_counter()
        if cpu_kernel() is None:
            skipped["cpp"] = build_error()
            backends = tuple(b for b in backends if b != "cpp")
            log(f"cpp backend skipped: {skipped['cpp']}")
        else:
            log(f"cpp kernel ready (build or load): {time.perf_counter() - t0:.1f} s")
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, seq_len, head_dim, generator=g, dtype=dtype) for _ in range(3))
    masks = {}
    for s in sparsities:
        masks[s] = meanpool_topk_mask(q, k, block_size=block_size, density=max(1e-9, 1.0 - s / 100.0))
    times: dict[str, dict[int, list[float]]] = {b: {s: [] for s in sparsities} for b in backends}
    dense_times: list[float] = []
    max_diff: dict[int, float] = {}

    def dense():
        return F.scaled_dot_product_attention(q, k, v)

    with torch.inference_mode():
        t_compile = 0.0
        if "flex" in backends:
            t_compile, _ = _timed(lambda: block_sparse_attention(q, k, v, masks[sparsities[0]], backend="flex"))
            log(f"warm-up (flex compile + first call): {t_compile:.1f} s")
        dense()
        for r in range(repeats):
            dense_times.append(_timed(dense)[0])
            for s in sparsities:
                outs = {}
                for b in backends:
                    t, outs[b] = _timed(lambda b=b, s=s: block_sparse_attention(q, k, v, masks[s], backend=b))
                    times[b][s].append(t)
                if len(outs) > 1:  # every backend against the first one
                    first, *rest = outs.values()
                    diff = max(float((first - o).abs().max()) for o in rest)
                    max_diff[s] = max(max_diff.get(s, 0.0), diff)
            log(f"round {r + 1}/{repeats} done")
    dense_ms = statistics.median(dense_times) * 1e3
    rows = []
    for s in sparsities:
        row = {"sparsity_pct": s, "actual_sparsity": round(1.0 - masks[s].density(), 4), "dense_ms": round(dense_ms, 2)}
        for b in backends:
            ms = statistics.median(times[b][s]) * 1e3
            row[f"{b}_ms"] = round(ms, 2)
            row[f"{b}_speedup"] = round(dense_ms / ms, 3)
        if s in max_diff:
            row["max_abs_diff_between_backends"] = max_diff[s]
        rows.append(row)
    return {
        "config": {"seq_len": seq_len, "heads": heads, "head_dim": head_dim, "block_size": block_size,
                   "dtype": str(dtype).replace("torch.", ""), "repeats": repeats, "backends": list(backends),
                   "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
                   "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "warmup_s": round(t_compile, 2),
        "skipped_backends": skipped,
        "rows": rows,
    }


def format_table(result: dict) -> str:
    backends = result["config"]["backends"]
    head = f"{'sparsity':>8} {'actual':>7} {'dense ms':>9}" + "".join(f" {b + ' ms':>10} {'x':>6}" for b in backends)
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        line = f"{r['sparsity_pct']:>7}% {r['actual_sparsity']:7.3f} {r['dense_ms']:9.1f}"
        line += "".join(f" {r[f'{b}_ms']:10.1f} {r[f'{b}_speedup']:6.2f}" for b in backends)
        lines.append(line)
    return "\n".join(lines)


def parse_sparsities(ap: argparse.ArgumentParser, text: str) -> tuple[int, ...]:
    """Comma-separated integer percentages in [0, 100); a bad value is an argparse error naming the range."""
    try:
        sparsities = tuple(int(s) for s in text.split(","))
    except ValueError:
        ap.error(f"sparsities must be comma-separated integer percentages, got {text!r}")
    if any(not 0 <= s < 100 for s in sparsities):
        ap.error("sparsities must be percentages in [0, 100)")
    return sparsities


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Block-sparse attention CPU benchmark (dense SDPA vs flex/eager).")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quick", action="store_true", help="small smoke run (L=1024, H=2, 1 repeat, 3 sparsities)")
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sparsities", type=str, default=",".join(map(str, FULL_SPARSITIES)),
                    help="comma-separated percentages")
    ap.add_argument("--backends", default=",".join(CPU_BACKENDS),
                    help="comma-separated subset of cpp (our C++ kernel), flex (compiled FlexAttention), eager")
    args = ap.parse_args(argv)
    if args.quick:
        args.seq_len, args.heads, args.repeats, args.sparsities = 1024, 2, 1, "0,50,90"
    sparsities = parse_sparsities(ap, args.sparsities)
    backends = tuple(b for b in args.backends.split(",") if b)
    if not backends or any(b not in CPU_BACKENDS for b in backends):
        ap.error(f"--backends must be a comma-separated subset of {','.join(CPU_BACKENDS)}; got {args.backends!r}")
    result = run(args.seq_len, args.heads, args.head_dim, args.block_size, sparsities, args.repeats, backends)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
