"""GPU kernel benchmark: the Triton block-sparse kernel vs dense SDPA (FlashAttention / cuDNN) at video lengths.

    python -m diffusion_accel.kernels.bench_cuda --json out.json             # L = 32760, 49152, 75600 (minutes)
    python -m diffusion_accel.kernels.bench_cuda --quick --json out.json     # small smoke run

Needs a CUDA device and ``triton`` (``pip install 'diffusion-accel[kernels]'``). Two parts:

1. **Correctness on the real compiler** (the CPU tests only reach Triton's interpreter): forward output and LSE, and
   dQ/dK/dV, against the fp32 dense masked reference, for fp16 and bf16, D 64 and 128, a ragged length.
2. **Timing** with ``triton.testing.do_bench`` (median of repeats, one process): dense SDPA restricted to each
   available backend, then the Triton kernel at every sparsity; speedup = best dense backend / Triton. The default
   lengths are Wan 2.1's latent token counts (480p 81 frames: 21x30x52 = 32760; 720p: 21x45x80 = 75600).
   Masks are mean-pooled top-k with exactly ``ceil((1 - sparsity) * Kb)`` key blocks per query block.
"""

from __future__ import annotations

import argparse
import json
import math
import platform

import torch
import torch.nn.functional as F

from .bench import parse_sparsities
from .masks import meanpool_topk_mask
from .reference import masked_attention

DEFAULT_LENGTHS = (32760, 49152, 75600)
DEFAULT_SPARSITIES = (0, 50, 75, 80, 90, 95)


def _sdpa_backends() -> dict[str, object]:
    from torch.nn.attention import SDPBackend

    names = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
    return {k: getattr(SDPBackend, v) for k, v in names.items() if hasattr(SDPBackend, v)}


def check_correctness(device: str = "cuda", length: int = 4000, heads: int = 4, log=print) -> list[dict]:
    """Forward/backward errors of the compiled kernel vs the fp32 reference (random 50 % block masks)."""
    from .block_mask import BlockSparseMask
    from .triton_block_sparse import triton_block_sparse_attention

    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for dim in (64, 128):
            g = torch.Generator(device=device).manual_seed(dim)
            b, h, bs = 1, heads, 128  # the default length 4000 = 31 * 128 + 32 is ragged
            q, k, v = (torch.randn(b, h, length, dim, device=device, generator=g, dtype=dtype) for _ in range(3))
            nb = -(-length // bs)
            dense = torch.rand(1, h, nb, nb, device=device, generator=g) < 0.5
            dense |= torch.eye(nb, dtype=torch.bool, device=device)
            mask = BlockSparseMask.from_dense(dense, bs, length, length)
            qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
            out, lse = triton_block_sparse_attention(qg, kg, vg, mask)
            dout = torch.randn_like(out)
            out.backward(dout)
            qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
            ref, ref_lse = masked_attention(qr, kr, vr, mask.to_token_mask())
            ref.backward(dout.float())
            row = {"dtype": str(dtype).replace("torch.", ""), "head_dim": dim, "seq_len": length,
                   "out_max_abs_err": float((out.float() - ref).abs().max()),
                   "lse_max_abs_err": float((lse - ref_lse).abs().max()),
                   "dq_max_abs_err": float((qg.grad.float() - qr.grad).abs().max()),
                   "dk_max_abs_err": float((kg.grad.float() - kr.grad).abs().max()),
                   "dv_max_abs_err": float((vg.grad.float() - vr.grad).abs().max()),
                   "grad_scale": float(qr.grad.abs().max())}
            tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
            row["ok"] = row["out_max_abs_err"] < tol and row["lse_max_abs_err"] < 1e-2
            log(f"correctness {row}")
            rows.append(row)
    return rows


def time_lengths(lengths=DEFAULT_LENGTHS, sparsities=DEFAULT_SPARSITIES, heads: int = 12, head_dim: int = 128,
                 block_size: int = 128, dtype: torch.dtype = torch.bfloat16, backward_at: int | None = None,
                 device: str = "cuda", log=print) -> list[dict]:
    """Forward times (ms) per length: every SDPA backend, then Triton per sparsity; optionally fwd+bwd at one L."""
    rows = []
    for length in lengths:
        g = torch.Generator(device=device).manual_seed(length)
        qkv = [torch.randn(1, heads, length, head_dim, device=device, generator=g, dtype=dtype) for _ in range(3)]
        row = _time_one_length(*qkv, sparsities, block_size, log)
        if backward_at is not None and length == backward_at:
            row["fwd_bwd"] = _time_backward(*qkv, block_size, log)
        rows.append(row)
        del qkv
        torch.cuda.empty_cache()
    return rows


def _time_one_length(q, k, v, sparsities, block_size: int, log) -> dict:
    from torch.nn.attention import sdpa_kernel
    from triton.testing import do_bench

    from .triton_block_sparse import triton_block_sparse_attention

    _, heads, length, head_dim = q.shape
    dense_ms = {}
    for name, backend in _sdpa_backends().items():
        try:
            with sdpa_kernel(backend):
                dense_ms[name] = do_bench(lambda: F.scaled_dot_product_attention(q, k, v), return_mode="median")
        except RuntimeError as exc:  # backend not available for this shape / dtype / build
            log(f"L={length}: SDPA {name} unavailable ({str(exc).splitlines()[0][:80]})")
    from .dense import dense_attention, xformers_unavailable_reason

    reason = xformers_unavailable_reason(q.device)
    if reason is None:
        dense_ms["xformers"] = do_bench(lambda: dense_attention(q, k, v, backend="xformers"), return_mode="median")
    else:
        log(f"L={length}: xformers dense backend skipped ({reason.split(';')[0]})")
    best = min(dense_ms.values())
    flops = 4.0 * length * length * head_dim * heads
    row = {"seq_len": length, "heads": heads, "head_dim": head_dim, "dtype": str(q.dtype).replace("torch.", ""),
           "sdpa_ms": {n: round(t, 3) for n, t in dense_ms.items()}, "best_sdpa_ms": round(best, 3),
           "best_sdpa_tflops": round(flops / best / 1e9, 1), "triton": []}
    for s in sparsities:
        mask = meanpool_topk_mask(q, k, block_size=block_size, density=max(1e-9, 1.0 - s / 100.0))
        ms = do_bench(lambda m=mask: triton_block_sparse_attention(q, k, v, m), return_mode="median")
        density = mask.density()
        row["triton"].append({"sparsity_pct": s, "actual_sparsity": round(1 - density, 4), "ms": round(ms, 3),
                              "speedup_vs_best_sdpa": round(best / ms, 3),
                              "effective_tflops": round(flops * density / ms / 1e9, 1)})
        log(f"L={length} sparsity {s}%: triton {ms:.2f} ms, best SDPA {best:.2f} ms -> {best / ms:.2f}x")
    return row


def _time_backward(q, k, v, block_size: int, log) -> dict:
    from torch.nn.attention import sdpa_kernel
    from triton.testing import do_bench

    from .triton_block_sparse import triton_block_sparse_attention

    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    dout = torch.randn_like(q)

    def step_dense():
        F.scaled_dot_product_attention(qg, kg, vg).backward(dout)

    result = {}
    best = math.inf
    for name, backend in _sdpa_backends().items():
        try:
            with sdpa_kernel(backend):
                t = do_bench(step_dense, grad_to_none=[qg, kg, vg], return_mode="median")
            result[f"sdpa_{name}_ms"] = round(t, 3)
            best = min(best, t)
        except RuntimeError:
            continue
    for s in (80, 90):
        mask = meanpool_topk_mask(q, k, block_size=block_size, density=1.0 - s / 100.0)

        def step_sparse(m=mask):
            triton_block_sparse_attention(qg, kg, vg, m)[0].backward(dout)

        t = do_bench(step_sparse, grad_to_none=[qg, kg, vg], return_mode="median")
        result[f"triton_{s}_ms"] = round(t, 3)
        result[f"triton_{s}_speedup_vs_best_sdpa"] = round(best / t, 3)
    log(f"fwd+bwd L={q.shape[2]}: {result}")
    return result


def format_table(result: dict) -> str:
    lines = []
    for row in result["timing"]:
        sdpa = ", ".join(f"{k} {v:.2f}" for k, v in row["sdpa_ms"].items())
        lines.append(f"L={row['seq_len']} H={row['heads']} D={row['head_dim']} {row['dtype']}: SDPA ms ({sdpa}); "
                     f"best {row['best_sdpa_ms']:.2f} ms = {row['best_sdpa_tflops']} TFLOP/s")
        lines.append(f"  {'sparsity':>8} {'actual':>7} {'triton ms':>10} {'x best SDPA':>12} {'eff. TFLOP/s':>13}")
        for t in row["triton"]:
            lines.append(f"  {t['sparsity_pct']:>7}% {t['actual_sparsity']:7.3f} {t['ms']:10.2f} "
                         f"{t['speedup_vs_best_sdpa']:12.2f} {t['effective_tflops']:13.1f}")
        if "fwd_bwd" in row:
            lines.append(f"  fwd+bwd: {row['fwd_bwd']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Triton block-sparse attention vs dense SDPA on a CUDA GPU.")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quick", action="store_true", help="L=8192 only, three sparsities")
    ap.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)))
    ap.add_argument("--sparsities", default=",".join(map(str, DEFAULT_SPARSITIES)))
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--skip-correctness", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths, args.sparsities = "8192", "0,80,90"
    lengths = tuple(int(x) for x in args.lengths.split(","))
    if any(n < 1 for n in lengths):
        ap.error(f"lengths must be positive token counts, got {args.lengths!r}")
    sparsities = parse_sparsities(ap, args.sparsities)
    if not torch.cuda.is_available():
        ap.error("no CUDA device: this benchmark times the Triton kernel on a GPU (CPU: diffusion_accel.kernels.bench)")
    torch.backends.cuda.matmul.allow_tf32 = True
    result = {"config": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                         "triton": __import__("triton").__version__, "machine": platform.machine()}}
    if not args.skip_correctness:
        result["correctness"] = check_correctness()
    result["timing"] = time_lengths(lengths, sparsities, args.heads, args.head_dim, backward_at=lengths[0])
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
