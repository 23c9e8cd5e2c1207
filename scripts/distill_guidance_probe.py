"""Probe of the distilled guidance scale: the teacher's CFG ODE at several w, judged like the distill benchmark.

``python scripts/distill_guidance_probe.py --w 4.5 6 7.5 9 --out docs/results/distill_guidance``

Rows: the distill benchmark's reference (teacher 20 DPM-Solver++ steps at its contract w = 4.5), then the teacher on
the trajectory LCD distils (DDIM on the 20-point trailing grid, ``benchmarks.distill._ddim_scheduler``) at each w,
then DPM-Solver++ 20 at each w (context). Same 64 held-out prompts and seeds as the benchmark, both judges, the paired
difference to the reference, FID-shapes with its bootstrap interval and PSNR to the reference; the report is written
after every row so a partial run is readable.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _table(bench_table: str) -> str:
    """The benchmark's table without its MACs and wall columns (every probe row is 20 steps with CFG)."""
    lines = []
    for line in bench_table.splitlines():
        cells = line.split("|")
        lines.append("|".join(cells[:2] + cells[4:]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from diffusion_accel.eval.fidelity import psnr
    from diffusion_accel.eval.paired import fid_bootstrap, paired_summary
    from diffusion_accel.pipelines.testbed.shapes import heldout_prompts
    from diffusion_accel.pipelines.testbed.shapes_net import (
        adherence_per_image,
        load_real_statistics,
        verdicts_and_features,
    )

    from diffusion_accel.benchmarks import distill as bench
    from diffusion_accel.loading import load_pipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--w", type=float, nargs="+", default=[4.5, 6.0, 7.5, 9.0])
    parser.add_argument("--dpm", type=float, nargs="*", default=None, help="w of the DPM-Solver++ context rows "
                                                                          "(default: the --w values but 4.5)")
    parser.add_argument("--ddim-steps", type=int, default=20, help="the DDIM rows' grid (LCD's num_ddim_timesteps)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--teacher", default="testbed:pixart")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", default="docs/results/distill_guidance")
    args = parser.parse_args(argv)

    pipe = load_pipeline(args.teacher)
    pipe.set_progress_bar_config(disable=True)
    ref_w = 4.5
    dpm = args.dpm if args.dpm is not None else [w for w in args.w if w != ref_w]
    rows = [bench.Row("teacher 20 steps, CFG (reference)", "teacher",
                      {"num_inference_steps": 20, "guidance_scale": ref_w})]
    rows += [bench.Row(f"teacher DDIM {args.ddim_steps}, w = {w:g} (the ODE LCD distils at w)", "teacher",
                       {"num_inference_steps": args.ddim_steps, "guidance_scale": w}, scheduler="ddim")
             for w in args.w]
    rows += [bench.Row(f"teacher DPM-Solver++ 20, w = {w:g}", "teacher",
                       {"num_inference_steps": 20, "guidance_scale": w}) for w in dpm]
    prompts = list(heldout_prompts())[:args.prompts]
    seeds = list(range(len(prompts)))
    judge = bench._load_judge()
    mu, sigma = load_real_statistics()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    report = {"probe": "distill_guidance", "teacher": args.teacher, "num_prompts": len(prompts),
              "judge": "shapes-judge" if judge is not None else None, "rows": []}
    ref = None
    for row in rows:
        with bench._row_context(pipe, row, None):
            images = np.concatenate([bench._generate(pipe, row, prompts[i:i + args.batch], seeds[i:i + args.batch])
                                     for i in range(0, len(prompts), args.batch)])
        flags, feats = verdicts_and_features(list(images), prompts)
        jflags = adherence_per_image(list(images), prompts, net=judge) if judge is not None else None
        if ref is None:
            ref = {"images": images, "flags": flags, "feats": feats, "jflags": jflags}
        is_ref = row is rows[0]
        fid = fid_bootstrap(feats, mu, sigma, None if is_ref else ref["feats"])
        entry = {"label": row.label, "call": row.call, "scheduler": row.scheduler or "dpm-solver++ (contract)",
                 "adherence_shapes_net": float(np.mean(flags)),
                 "adherence_shapes_net_paired": paired_summary(ref["flags"], flags),
                 "fid_shapes": fid.pop("fid"), "fid_shapes_interval": fid,
                 "psnr_to_reference": None if is_ref else psnr(images, ref["images"])}
        if judge is not None:
            entry["adherence_judge"] = float(np.mean(jflags))
            entry["adherence_judge_paired"] = paired_summary(ref["jflags"], jflags)
        report["rows"].append(entry)
        table = _table(bench.markdown({"judge": report["judge"], "rows": [
            {**r, "macs_ratio": 1.0, "speedup_wall": 1.0} for r in report["rows"]]}))
        (out / "probe.json").write_text(json.dumps(report, indent=2, default=float))
        (out / "probe.md").write_text(table + "\n")
        print(f"done {row.label}", flush=True)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
