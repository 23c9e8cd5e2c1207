"""Probe of the LCD student's sampler: LCM's multistep sampling against TCD's γ-controlled one, same student.

``python scripts/lcd_sampler_probe.py --student testbed:pixart-lcm``
(writes ``docs/results/distill_substeps/sampler_probe.json``)

LCM's sampler re-noises each x̂0 estimate with fresh noise; Diffusers' ``TCDScheduler`` (Zheng et al., arXiv
2402.19159) mixes the estimate's own noise back in, with γ (the pipeline's ``eta``) the fraction of fresh noise:
γ = 0 is deterministic. Rows: the student at 4 steps with its own ``LCMScheduler`` and with ``TCDScheduler`` at
several γ, and at 2 steps; then LCM's sampler on other timesteps of the student's grid (``--timesteps``; its
contract spaces them evenly: 999, 749, 499, 249 at 4 steps). Same 64 held-out prompts and seeds as the distill
benchmark (or ``--prompts-file``: a development set to choose on), both judges, the paired difference to the
teacher's reference (20 DPM-Solver++ steps with CFG).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    from diffusers import TCDScheduler
    from diffusion_accel.eval.paired import paired_summary
    from diffusion_accel.pipelines.testbed.shapes import heldout_prompts
    from diffusion_accel.pipelines.testbed.shapes_net import adherence_per_image, verdicts_and_features

    from diffusion_accel.benchmarks import distill as bench
    from diffusion_accel.loading import load_pipeline
    from diffusion_accel.prompts import bench_prompts

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="testbed:pixart-lcm")
    parser.add_argument("--teacher", default="testbed:pixart")
    parser.add_argument("--gammas", type=float, nargs="*", default=[0.0, 0.3, 0.6])
    parser.add_argument("--timesteps", nargs="*", default=[], help="LCM rows on these timesteps, each a comma list "
                                                                   "(e.g. 999,699,399,149)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompts-file", default=None, help="prompts, one per line, instead of the held-out ones")
    parser.add_argument("--out", default="docs/results/distill_substeps/sampler_probe.json")
    args = parser.parse_args(argv)

    teacher, student = load_pipeline(args.teacher), load_pipeline(args.student)
    for pipe in (teacher, student):
        pipe.set_progress_bar_config(disable=True)
    prompts = (bench_prompts("testbed:pixart", args.prompts, args.prompts_file) if args.prompts_file
               else list(heldout_prompts())[:args.prompts])
    seeds = list(range(len(prompts)))
    judge = bench._load_judge()

    def generate(pipe, call):
        row = bench.Row("probe", "probe", call)
        return np.concatenate([bench._generate(pipe, row, prompts[i:i + 16], seeds[i:i + 16])
                               for i in range(0, len(prompts), 16)])

    def verdicts(images):
        return verdicts_and_features(list(images), prompts)[0], adherence_per_image(list(images), prompts, net=judge)

    ref_flags, ref_judge = verdicts(generate(teacher, {"num_inference_steps": 20}))
    lcm = student.scheduler
    rows = [("LCMScheduler, 4 steps", lcm, {"num_inference_steps": 4})]
    rows += [(f"TCDScheduler γ = {g:g}, 4 steps", None, {"num_inference_steps": 4, "eta": g}) for g in args.gammas]
    rows += [(f"TCDScheduler γ = {g:g}, 2 steps", None, {"num_inference_steps": 2, "eta": g}) for g in args.gammas[:2]]
    for spec in args.timesteps:
        steps = [int(t) for t in spec.split(",")]
        rows.append((f"LCMScheduler, timesteps {spec}", lcm, {"timesteps": steps}))
    report = {"probe": "lcd_sampler", "student": args.student, "num_prompts": len(prompts),
              "prompts_file": args.prompts_file, "rows": []}
    try:
        for label, scheduler, call in rows:
            student.scheduler = scheduler or TCDScheduler.from_config(lcm.config)
            flags, jflags = verdicts(generate(student, call))
            report["rows"].append({"label": label, "call": call, "adherence_shapes_net": float(np.mean(flags)),
                                   "adherence_shapes_net_paired": paired_summary(ref_flags, flags),
                                   "adherence_judge": float(np.mean(jflags)),
                                   "adherence_judge_paired": paired_summary(ref_judge, jflags)})
            print(f"{label}: shapes-net {np.mean(flags):.3f}, judge {np.mean(jflags):.3f}", flush=True)
    finally:
        student.scheduler = lcm
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
