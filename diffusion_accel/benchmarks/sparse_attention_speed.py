"""End-to-end speed of ``apply(pipe, "sparse_attention")`` on a Wan pipeline at video lengths (speed tier).

``python -m diffusion_accel.benchmarks.sparse_attention_speed --json out.json``

A real ``WanPipeline`` whose transformer is a compute-realistic random-weight ``WanTransformer3DModel`` (default
2 blocks, 8 heads x 64; 33 frames at 688x688 = 9 x 43 x 43 = 16 641 latent tokens, so self-attention dominates
as in Wan 2.1 at 480p). Baseline (dense attention) and each mask run in one process with interleaved repeats;
``speedup_wall`` = median baseline time / median method time of the whole pipeline call (``output_type="latent"``,
no CFG, so every transformer call is one forward). Masks are matched to one density: top-k keeps exactly
``1 - sparsity`` of each row, ASA's τ is bisected onto the same measured density and the sliding tile takes the
window whose density is closest. PSNR of the latents against dense attention is reported too; with random weights
it says how well a mask approximates this model, not image quality (see ``benchmarks.sparse_attention``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path
from typing import Any

import torch

from ..eval.fidelity import latent_psnr
from .sparse_attention import bisect_density, calibrate_density, run_with_mask

MASKS = ("asa", "topk", "sliding_tile")


def speed_pipeline(layers: int, heads: int, head_dim: int, seed: int = 0) -> Any:
    """The tiny Wan pipeline with a speed-tier transformer (random weights)."""
    from diffusers import WanTransformer3DModel

    from ..testing import tiny_pipeline

    pipe = tiny_pipeline("wan", seed)
    torch.manual_seed(seed)
    pipe.transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16,
        out_channels=16, text_dim=32, freq_dim=256, ffn_dim=2 * heads * head_dim, num_layers=layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
    ).eval()
    return pipe


def match_configs(pipe: Any, call: dict[str, Any], common: dict[str, Any], target: float,
                  masks: tuple[str, ...], log=print) -> dict[str, dict[str, Any]]:
    """One config per mask, all at (about) the measured density ``target`` (1-step probe calls, the accuracy
    bench's calibration: top-k keeps exactly ``target``, ASA's τ is bisected, the sliding tile's window searched)."""
    configs: dict[str, dict[str, Any]] = {}
    if "topk" in masks:
        configs["topk"] = {**common, "mask": "topk", "density": target}
    if "asa" in masks:
        tau, density = bisect_density(pipe, call, {**common, "mask": "asa"}, "tau", 0.05, 0.999, target, iters=6)
        log(f"asa: tau={tau:.4f} -> density {density:.3f}")
        configs["asa"] = {**common, "mask": "asa", "tau": tau}
    if "sliding_tile" in masks:
        window, density = calibrate_density(pipe, call, {**common, "mask": "sliding_tile"}, "window",
                                            [1, 2, 3, 4, 6, 8, 12, 16, 24], target)
        log(f"sliding_tile: window={window} -> density {density:.3f}")
        configs["sliding_tile"] = {**common, "mask": "sliding_tile", "window": window}
    return configs


def run(frames: int = 33, size: int = 688, layers: int = 2, heads: int = 8, head_dim: int = 64, steps: int = 2,
        sparsity: float = 0.8, block_size: int = 128, repeats: int = 3, masks: tuple[str, ...] = MASKS,
        backend: str = "auto", log=print) -> dict[str, Any]:
    pipe = speed_pipeline(layers, heads, head_dim)
    call = {"prompt": "a red circle moving right", "height": size, "width": size, "num_frames": frames,
            "num_inference_steps": steps, "guidance_scale": 1.0, "max_sequence_length": 16,
            "output_type": "latent"}
    common = {"block_size": block_size, "backend": backend, "min_tokens": 0}
    with torch.inference_mode():
        configs = match_configs(pipe, call, common, 1.0 - sparsity, masks, log)
        dense, _, _ = run_with_mask(pipe, call, None)  # warm-up (and the reference latents)
        for config in configs.values():
            run_with_mask(pipe, {**call, "num_inference_steps": 1}, config)  # warm-up (kernel build / compile)
        times: dict[str, list[float]] = {"baseline": [], **{name: [] for name in configs}}
        results: dict[str, tuple[torch.Tensor, float]] = {}
        for r in range(repeats):
            times["baseline"].append(run_with_mask(pipe, call, None)[1])
            for name, config in configs.items():
                out, elapsed, density = run_with_mask(pipe, call, config)
                times[name].append(elapsed)
                results[name] = (out, density)
            log(f"round {r + 1}/{repeats}: " + ", ".join(f"{n} {t[-1]:.1f} s" for n, t in times.items()))
    base = statistics.median(times["baseline"])
    rows = {"baseline": {"wall_s": round(base, 6), "speedup_wall": 1.0, "density": 1.0, "psnr_latents": None}}
    for name, config in configs.items():
        out, density = results[name]
        med = statistics.median(times[name])
        rows[name] = {"config": config, "wall_s": round(med, 6), "speedup_wall": round(base / med, 3),
                      "density": round(density, 4), "psnr_latents": round(latent_psnr(out, dense), 2)}
    tokens = (1 + (frames - 1) // 4) * (size // 16) ** 2
    return {"settings": {"frames": frames, "size": size, "latent_tokens": tokens, "layers": layers, "heads": heads,
                         "head_dim": head_dim, "steps": steps, "sparsity_target": sparsity,
                         "block_size": block_size, "repeats": repeats, "backend": backend, "guidance_scale": 1.0,
                         "threads": torch.get_num_threads(), "torch": torch.__version__,
                         "machine": platform.machine()},
            "methods": rows}


def format_table(result: dict[str, Any]) -> str:
    lines = ["| method | density | wall (s) | speedup_wall | PSNR latents vs dense (dB) |", "|---|---|---|---|---|"]
    for name, row in result["methods"].items():
        psnr = "-" if row["psnr_latents"] is None else f"{row['psnr_latents']:.2f}"
        lines.append(f"| {name} | {row['density']:.3f} | {row['wall_s']:.2f} | {row['speedup_wall']:.2f} | {psnr} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=33)
    ap.add_argument("--size", type=int, default=688, help="height = width in pixels (multiple of 16)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--masks", default=",".join(MASKS), help=f"comma-separated subset of {','.join(MASKS)}")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--quick", action="store_true", help="smoke run: 9 frames at 128x128, 1 step, 1 repeat")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    masks = tuple(m for m in args.masks.split(",") if m)
    if not masks or any(m not in MASKS for m in masks):
        ap.error(f"--masks must be a comma-separated subset of {','.join(MASKS)}; got {args.masks!r}")
    if not 0 < args.sparsity < 1:
        ap.error(f"--sparsity must be in (0, 1), got {args.sparsity}")
    if args.size % 16:
        ap.error(f"--size must be a multiple of 16 (VAE factor 8 x patch 2), got {args.size}")
    if args.quick:
        args.frames, args.size, args.steps, args.repeats, args.block_size = 9, 128, 1, 1, 32
    result = run(args.frames, args.size, args.layers, args.heads, args.head_dim, args.steps, args.sparsity,
                 args.block_size, args.repeats, masks, args.backend)
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
