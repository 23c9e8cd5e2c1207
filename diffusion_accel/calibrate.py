"""``diffusion-accel calibrate``: fit a method's free parameters on a few calibration prompts.

* ``calibrate ag``: the largest-saving γ̄ whose output keeps a target PSNR against full CFG.
* ``calibrate linear_ag``: ridge least-squares LinearAG coefficients from full-CFG trajectories.
* ``calibrate delta_cache``: N, N_c and b for a target block-compute speedup, best PSNR against the baseline.

Each writes a config (JSON) that ``apply`` / ``--config`` load.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bench import base_call_kwargs, call_kwargs, generate, to_uint8
from .prompts import SHAPE_PROMPTS, bench_prompts


@dataclass
class CalibrationSet:
    """A pipeline, prompts and call settings shared by every candidate."""

    pipe: Any
    family: str
    prompts: list[str]
    steps: int | None
    guidance_scale: float | None
    size: int | None
    base: dict[str, Any]
    seed: int = 0

    def kwargs(self) -> dict[str, Any]:
        return call_kwargs(self.pipe, self.family, self.prompts, self.base, self.steps, self.guidance_scale,
                            self.size, [self.seed + i for i in range(len(self.prompts))])

    @property
    def num_steps(self) -> int:
        return int(self.kwargs()["num_inference_steps"])

    def run(self, *configs: Any) -> tuple[np.ndarray, dict[str, Any]]:
        import diffusion_accel as da

        with da.accelerated(self.pipe, *configs):
            images = to_uint8(generate(self.pipe, self.kwargs()))
            return images, dict(da.stats(self.pipe))


def _psnr(images: np.ndarray, reference: np.ndarray) -> float:
    from .eval.fidelity import psnr

    flat = images.reshape(-1, *images.shape[-3:])
    ref = reference.reshape(-1, *reference.shape[-3:])
    return float(np.mean([psnr(a, b) for a, b in zip(flat, ref, strict=True)]))


def calibration_set(pipeline: str, num_prompts: int = 4, steps: int | None = None,
                    guidance_scale: float | None = None, size: int | None = None, seed: int = 0) -> CalibrationSet:
    import diffusion_accel as da

    pipe = da.load_pipeline(pipeline)
    pipe.set_progress_bar_config(disable=True)
    prompts = bench_prompts(pipeline, num_prompts, None) if num_prompts else list(SHAPE_PROMPTS[:4])
    return CalibrationSet(pipe, da.find_adapter(pipe).family, prompts, steps, guidance_scale, size,
                          base_call_kwargs(pipeline), seed)


def calibrate_ag(cal: CalibrationSet, target_psnr: float, space: str = "x0",
                 candidates: tuple[float, ...] = (0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995,
                                                  0.9999)) -> dict[str, Any]:
    """Bisect the sorted γ̄ candidates for the smallest (most saving) one with PSNR ≥ ``target_psnr``."""
    from .methods.adaptive_guidance import AdaptiveGuidanceConfig

    baseline, _ = cal.run()
    results: dict[float, tuple[float, int]] = {}

    def evaluate(threshold: float) -> float:
        images, stats = cal.run(AdaptiveGuidanceConfig(threshold=threshold, space=space))
        results[threshold] = (_psnr(images, baseline), stats["uncond_skipped"])
        return results[threshold][0]

    lo, hi = 0, len(candidates) - 1
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        if evaluate(candidates[mid]) >= target_psnr:
            best, hi = candidates[mid], mid - 1
        else:
            lo = mid + 1
    chosen = best if best is not None else candidates[-1]
    return {
        "config": AdaptiveGuidanceConfig(threshold=chosen, space=space).to_dict(),
        "target_psnr": target_psnr,
        "met": best is not None,
        "evaluated": {str(t): {"psnr": p, "uncond_rows_skipped": s} for t, (p, s) in sorted(results.items())},
    }


def calibrate_linear_ag(cal: CalibrationSet, out: str | Path, ridge: float = 1e-4) -> dict[str, Any]:
    """Record full-CFG trajectories, fit per-step coefficients, save them as safetensors."""
    import diffusion_accel as da

    from .methods.linear_ag import _RecorderConfig, fit_coefficients, save_coefficients

    handle = da.apply(cal.pipe, _RecorderConfig())
    try:
        recorder = handle.session.methods[0]
        generate(cal.pipe, cal.kwargs())
        trajectories = recorder.trajectories()
    finally:
        handle.remove()
    if not trajectories:
        raise ValueError("No CFG trajectories were recorded: calibrate with a guidance scale > 1.")
    coefficients = fit_coefficients(trajectories, ridge=ridge)
    out_path = Path(out)
    if out_path.parent == Path("."):
        from .methods.linear_ag import coefficient_dirs

        out_path = coefficient_dirs()[-2] / out_path.name
    path = save_coefficients(out_path, coefficients, {
        "family": cal.family, "steps": cal.num_steps, "guidance_scale": cal.guidance_scale,
        "prompts": len(cal.prompts), "ridge": ridge,
    })
    return {"coefficients": str(path), "config": {"method": "linear_ag", "coefficients": str(path)},
            "per_step": coefficients.tolist()}


def calibrate_delta_cache(cal: CalibrationSet, target_speedup: float, intervals: tuple[int, ...] = (2, 3, 4),
                          boundaries: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)) -> dict[str, Any]:
    """For each N, the smallest N_c whose block-compute speedup reaches the target; then the b with best PSNR."""
    from .methods.delta_cache import DeltaCacheConfig

    depth = len(__import__("diffusion_accel").find_adapter(cal.pipe).get_blocks(cal.pipe))
    baseline, _ = cal.run()
    evaluated = []
    for interval in intervals:
        for n_c in range(1, depth + 1):
            # fraction of block compute on T steps: full steps run L blocks, cached steps L - N_c
            steps = cal.num_steps
            full = len([k for k in range(steps) if k % interval == 0])
            ratio = steps * depth / (full * depth + (steps - full) * (depth - n_c))
            if ratio < target_speedup:
                continue
            for b in boundaries:
                config = DeltaCacheConfig(interval=interval, num_cached_blocks=n_c, boundary=b)
                images, stats = cal.run(config)
                evaluated.append({"config": config.to_dict(), "block_speedup": stats["blocks_total"] /
                                  max(stats["blocks_run"], 1), "psnr": _psnr(images, baseline)})
            break
    if not evaluated:
        raise ValueError(f"No Δ-cache setting reaches a {target_speedup}x block speedup on {depth} blocks and "
                         f"{cal.num_steps} steps; lower --target-speedup or raise the intervals.")
    best = max(evaluated, key=lambda e: e["psnr"])
    return {"config": best["config"], "target_speedup": target_speedup, "evaluated": evaluated}


# ---------------------------------------------------------------------------------------------- CLI
def add_calibrate_parser(sub: Any) -> None:
    p = sub.add_parser("calibrate", help="fit a method's parameters on calibration prompts; writes a config")
    p.add_argument("method", choices=("ag", "adaptive_guidance", "linear_ag", "delta_cache"))
    p.add_argument("--pipeline", default=None)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--target-psnr", type=float, default=30.0, help="ag: PSNR (dB) to keep against full CFG")
    p.add_argument("--space", default="x0", help="ag: x0, eps or velocity")
    p.add_argument("--target-speedup", type=float, default=1.6, help="delta_cache: block-compute speedup")
    p.add_argument("--ridge", type=float, default=1e-4, help="linear_ag: ridge strength")
    p.add_argument("--out", default=None, help="config JSON (ag, delta_cache) or coefficient name/path (linear_ag)")
    p.set_defaults(func=_cmd_calibrate)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .loading import default_pipeline

    cal = calibration_set(args.pipeline or default_pipeline(), args.prompts, args.steps, args.guidance_scale,
                          args.size)
    if args.method in ("ag", "adaptive_guidance"):
        result = calibrate_ag(cal, args.target_psnr, args.space)
    elif args.method == "linear_ag":
        result = calibrate_linear_ag(cal, args.out or f"{cal.family}-{cal.num_steps}", args.ridge)
    else:
        result = calibrate_delta_cache(cal, args.target_speedup)
    if args.out and args.method != "linear_ag":
        Path(args.out).write_text(json.dumps(result["config"], indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "per_step"}, indent=2))
    return 0
