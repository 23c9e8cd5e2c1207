"""Adaptive Guidance vs a static CFG cutoff at the same unconditional budget, and LinearAG, in one run.

``python -m diffusion_accel.benchmarks.guidance --pipeline testbed:pixart --threshold 0.99 --prompts 16``

1. Runs AG with γ̄ on the prompts and reads how many unconditional rows it skipped.
2. Sets the static cutoff step so that the cutoff skips the same number of rows (the same NFE budget).
3. Fits LinearAG coefficients on separate calibration prompts (unless ``--linear-ag`` names fitted ones).
4. Runs the side-by-side bench (baseline, AG, cutoff, LinearAG) and writes its JSON/Markdown/plots.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def matched_cutoff(pipeline: str, threshold: float, num_prompts: int, steps: int | None,
                   guidance_scale: float | None, space: str = "x0") -> tuple[int, float]:
    """The static cutoff step skipping as many uncond rows as AG(γ̄) does, and AG's mean skipped rows/sample."""
    from ..calibrate import calibration_set
    from ..methods.adaptive_guidance import AdaptiveGuidanceConfig

    cal = calibration_set(pipeline, num_prompts, steps, guidance_scale)
    _, stats = cal.run(AdaptiveGuidanceConfig(threshold=threshold, space=space))
    per_sample = stats["uncond_skipped"] / len(cal.prompts)
    total = cal.num_steps
    return int(np.clip(round(total - per_sample), 0, total)), per_sample


def main(argv: list[str] | None = None) -> int:
    from ..bench import markdown_table, run_bench
    from ..calibrate import calibrate_linear_ag, calibration_set
    from ..loading import default_pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=None)
    parser.add_argument("--threshold", type=float, default=0.99, help="AG γ̄")
    parser.add_argument("--space", default="x0")
    parser.add_argument("--prompts", type=int, default=None,
                        help="prompts of the bench (default: the bench's quality count on a testbed, else 16)")
    parser.add_argument("--calibration-prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--linear-ag", default=None, help="fitted LinearAG coefficients (name or path)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timing-batch", type=int, default=8,
                        help="prompts per timed call (AG switches per sample: one prompt's time is not the mean)")
    parser.add_argument("--tier", default="quality")
    parser.add_argument("--out", default="bench_out/guidance")
    args = parser.parse_args(argv)
    pipeline = args.pipeline or default_pipeline()
    if args.prompts is None:
        from ..bench import QUALITY_PROMPTS

        args.prompts = QUALITY_PROMPTS if pipeline.startswith("testbed:") and args.tier == "quality" else 16
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # the matched cutoff needs AG's mean skip count, not every prompt: 64 prompts settle it
    cutoff, ag_rows = matched_cutoff(pipeline, args.threshold, min(args.prompts, 64), args.steps,
                                     args.guidance_scale, args.space)
    coefficients = args.linear_ag
    if coefficients is None:
        cal = calibration_set(pipeline, args.calibration_prompts, args.steps, args.guidance_scale, seed=10_000)
        coefficients = calibrate_linear_ag(cal, out / "linear_ag")["coefficients"]
    methods = (f"baseline,adaptive_guidance:threshold={args.threshold}:space={args.space},"
               f"cfg_cutoff:cutoff_step_index={cutoff},linear_ag:coefficients={coefficients}")
    report = run_bench(pipeline, methods, num_prompts=args.prompts, steps=args.steps, tier=args.tier,
                       repeats=args.repeats, guidance_scale=args.guidance_scale, out_dir=out,
                       timing_batch=args.timing_batch, batch_size=32 if pipeline.startswith("testbed:") else 8,
                       json_path=out / "guidance.json")
    report["settings"]["ag_uncond_skipped_per_sample"] = ag_rows
    report["settings"]["matched_cutoff_step"] = cutoff
    (out / "guidance.json").write_text(json.dumps(report, indent=2, default=str))
    print(markdown_table(report))
    steps = report["settings"]["steps"]
    print(f"\nAG skipped {ag_rows:.2f} uncond evaluations per sample; static cutoff at step {cutoff} of {steps}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
