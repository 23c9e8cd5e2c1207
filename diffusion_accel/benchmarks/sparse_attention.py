"""Accuracy of block-sparse attention without retraining: ASA vs sliding tile vs mean-pooled top-k.

``python -m diffusion_accel.benchmarks.sparse_attention --family wan --sparsity 0.75``

Runs a video pipeline (the tiny Wan / CogVideoX components with a wider transformer, so that the latent grid has
hundreds to thousands of tokens) densely and with each mask at one matched measured density (the sliding tile's
closest to the target; ASA's τ and top-k's fraction bisected onto it), and reports the PSNR of each
output against the dense one, the measured density and the wall time. Weights are random unless ``--pipeline``
names a trained one, so the PSNRs measure how well each mask approximates this model's attention, not image quality.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def video_pipeline(family: str, seed: int = 0) -> Any:
    """The tiny pipeline of ``family`` with a transformer wide enough for meaningful attention blocks."""
    from ..testing import tiny_pipeline

    pipe = tiny_pipeline(family, seed)
    torch.manual_seed(seed)
    if family == "wan":
        from diffusers import WanTransformer3DModel

        pipe.transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=256, num_layers=4, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
        ).eval()
    elif family == "cogvideox":
        from diffusers import CogVideoXTransformer3DModel

        pipe.transformer = CogVideoXTransformer3DModel(
            num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=4, time_embed_dim=32,
            text_embed_dim=32, num_layers=4, sample_width=32, sample_height=32, sample_frames=33, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=16,
        ).eval()
    else:
        raise ValueError(f"family must be 'wan' or 'cogvideox', got {family!r}")
    return pipe


MASK_SETTINGS: dict[str, dict[str, Any]] = {
    "asa": {"mask": "asa"},
    "sliding_tile": {"mask": "sliding_tile"},
    "topk": {"mask": "topk"},
}


def _frames(frames: Any) -> np.ndarray:
    """uint8 video frames from a pipeline's ``output_type="np"`` frames in [0, 1]."""
    return (np.asarray(frames, dtype=np.float32) * 255).round().clip(0, 255).astype(np.uint8)


def run_with_mask(pipe: Any, call: dict[str, Any], config: dict[str, Any] | None) -> tuple[Any, float, float]:
    """``(output frames as the pipeline returns them, seconds, mean measured density)`` of one seeded pipeline call
    with ``sparse_attention(**config)`` applied for its duration (dense attention when ``config`` is None)."""
    import diffusion_accel as da

    kwargs = dict(call)
    kwargs["generator"] = torch.Generator().manual_seed(0)
    if config is None:
        start = time.perf_counter()
        out = pipe(**kwargs)
        return out.frames, time.perf_counter() - start, 1.0
    with da.accelerated(pipe, {"method": "sparse_attention", **config}):
        start = time.perf_counter()
        out = pipe(**kwargs)
        elapsed = time.perf_counter() - start
        densities = [d["density"] for d in da.stats(pipe)["sparse_attention"]["density"]]
    return out.frames, elapsed, float(np.mean(densities)) if densities else 1.0


def calibrate_density(pipe: Any, call: dict[str, Any], base: dict[str, Any], knob: str, values: list[Any],
                      target: float) -> tuple[Any, float]:
    """The knob value whose measured density is closest to ``target`` (one 1-step call per value)."""
    best, best_gap, best_density = values[0], float("inf"), 1.0
    probe = {**call, "num_inference_steps": 1}
    for value in values:
        _, _, density = run_with_mask(pipe, probe, {**base, knob: value})
        if abs(density - target) < best_gap:
            best, best_gap, best_density = value, abs(density - target), density
    return best, best_density


def bisect_density(pipe: Any, call: dict[str, Any], base: dict[str, Any], knob: str, lo: float, hi: float,
                   target: float, iters: int = 7) -> tuple[float, float]:
    """A value of the continuous ``knob`` (density grows with it) whose measured density is closest to ``target``,
    by bisection on 1-step probe calls; returns ``(value, measured density)``."""
    probe = {**call, "num_inference_steps": 1}
    best, best_density = hi, 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        _, _, density = run_with_mask(pipe, probe, {**base, knob: mid})
        if abs(density - target) < abs(best_density - target):
            best, best_density = mid, density
        if density > target:
            hi = mid
        else:
            lo = mid
    return best, best_density


def main(argv: list[str] | None = None) -> int:
    from ..eval.fidelity import psnr

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="wan", choices=("wan", "cogvideox"))
    parser.add_argument("--sparsity", type=float, default=0.75)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--out", default="bench_out/sparse_attention")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    pipe = video_pipeline(args.family)
    call = {"prompt": "a red circle moving right", "height": args.size, "width": args.size,
            "num_frames": args.frames, "num_inference_steps": args.steps, "guidance_scale": 4.0,
            "max_sequence_length": 16, "output_type": "np"}
    common = {"block_size": args.block_size, "backend": args.backend, "min_tokens": 0}
    # Matched densities: the sliding tile's window is discrete, so its measured density closest to the target sets
    # the common density; ASA's τ and top-k's kept fraction are continuous and are bisected onto it.
    window, matched = calibrate_density(pipe, call, {**common, "mask": "sliding_tile"}, "window",
                                        [0, 1, 2, 3, 4, 6, 8, 12], 1.0 - args.sparsity)
    tau, _ = bisect_density(pipe, call, {**common, "mask": "asa", "min_keep": 1}, "tau", 0.05, 0.999, matched)
    keep, _ = bisect_density(pipe, call, {**common, "mask": "topk"}, "density", 0.01, 1.0, matched)
    configs = {"asa": {**common, "mask": "asa", "min_keep": 1, "tau": tau},
               "sliding_tile": {**common, "mask": "sliding_tile", "window": window},
               "topk": {**common, "mask": "topk", "density": keep}}
    dense, dense_time, _ = run_with_mask(pipe, call, None)
    dense = _frames(dense)
    rows = {}
    for name, config in configs.items():
        times, frames, density = [], None, 1.0
        for _ in range(2):
            frames, elapsed, density = run_with_mask(pipe, call, config)
            frames = _frames(frames)
            times.append(elapsed)
        scores = [psnr(a, b) for a, b in zip(frames.reshape(-1, *frames.shape[-3:]),
                                             dense.reshape(-1, *dense.shape[-3:]), strict=True)]
        rows[name] = {"config": config, "density": density, "psnr_vs_dense": float(np.mean(scores)),
                      "wall_s": statistics.median(times)}
    report = {"family": args.family, "sparsity_target": args.sparsity, "matched_density": matched,
              "frames": args.frames, "size": args.size,
              "steps": args.steps, "block_size": args.block_size, "dense_wall_s": dense_time, "masks": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"sparse_attention_{args.family}.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"{args.family}: {args.frames}x{args.size}x{args.size}, {args.steps} steps, block {args.block_size}, "
          f"target sparsity {args.sparsity:.0%} (random weights)")
    print("| mask | density | PSNR vs dense (dB) | wall (s) |\n|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['density']:.3f} | {row['psnr_vs_dense']:.2f} | {row['wall_s']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
