"""Distilled students against their teacher on the testbed: ``python -m diffusion_accel.benchmarks.distill``.

Rows: the teacher at its contract (20 DPM-Solver++ steps with CFG: the reference), the teacher at 8/4/2 steps (the
honest baseline: fewer steps of the same model), the teacher at 4 steps with the students' ``LCMScheduler`` (to
separate the scheduler from the distillation), the teacher on the DDIM trajectory the students distil (what a
perfect consistency student would reproduce), the LCD student at 4/2/1 steps, the LCD student at 4 steps with
Δ-cache's ``pixart-lcm-4`` preset, the RG-LCD student at 4/2 steps, and, where it has been trained
(``testbed:pixart-tdm``, built by the ``pixart-tdm`` preset), the TDM student at 4 steps and at 2 (the same 4-step
student on the trailing 2-step grid) beside the teacher at 4 steps on the TDM student's DDIM scheduler, and a TDM
student trained for 2 steps (``--tdm2``) when one is given. All rows sample the same held-out prompts with the same
seeds.

Columns: denoiser MACs per image relative to the reference (counted by ``torch.utils.flop_counter``), wall-clock
speed-up (median of interleaved repeats in this process), prompt adherence by the reward classifier (shapes-net)
*and* by the independent judge (another architecture, seed and training data), the paired difference to the
reference (Newcombe interval), FID-shapes with its bootstrap interval, and PSNR to the reference image.

``--family wan``: the video students of ``testbed:wan`` (:mod:`.distill_wan`).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class Row:
    label: str
    pipeline: str  # key into the loaded pipelines
    call: dict[str, Any]
    method: dict[str, Any] | None = None  # diffusion_accel.accelerated(pipe, **method)
    scheduler: str | None = None  # "lcm" / "ddim" / "tdm": swap in that scheduler (see _row_context)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def default_rows(have_rglcd: bool, have_tdm: bool = False, have_tdm2: bool = False) -> list[Row]:
    rows = [Row("teacher 20 steps, CFG (reference)", "teacher", {"num_inference_steps": 20})]
    rows += [Row(f"teacher {n} steps, CFG", "teacher", {"num_inference_steps": n}) for n in (8, 4, 2)]
    rows.append(Row("teacher 4 steps, CFG, LCMScheduler", "teacher", {"num_inference_steps": 4}, scheduler="lcm",
                    note="scheduler-only control: the LCD student's scheduler on the teacher"))
    rows.append(Row("teacher 20 steps, CFG, DDIM (the ODE LCD distils)", "teacher", {"num_inference_steps": 20},
                    scheduler="ddim", note="the students' target trajectory: DDIM on the 20-point grid"))
    rows += [Row(f"LCD {n} steps", "lcd", {"num_inference_steps": n}) for n in (4, 2, 1)]
    rows.append(Row("LCD 4 steps + Δ-cache pixart-lcm-4", "lcd", {"num_inference_steps": 4},
                    method={"method": "delta_cache", "preset": "pixart-lcm-4"}))
    if have_rglcd:
        rows += [Row(f"RG-LCD {n} steps", "rglcd", {"num_inference_steps": n}) for n in (4, 2)]
    if have_tdm:
        rows.append(Row("teacher 4 steps, CFG, TDM's DDIM (trailing)", "teacher", {"num_inference_steps": 4},
                        scheduler="tdm", note="scheduler-only control: the TDM student's scheduler on the teacher"))
        rows += [Row(f"TDM {n} steps", "tdm", {"num_inference_steps": n},
                     note="" if n == 4 else "the 4-step student on the trailing 2-step grid (999, 499)")
                 for n in (4, 2)]
    if have_tdm2:
        rows.append(Row("TDM 2 steps (2-step student)", "tdm2", {"num_inference_steps": 2},
                        note="a TDM student trained for K = 2"))
    return rows


def _ddim_scheduler(pipe: Any) -> Any:
    """DDIM on the ``trailing`` grid t_i = 50 (i + 1) − 1 at 20 steps: the skipping-step solver of the shipped
    students' recipe (``num_ddim_timesteps`` 20), without clipping (latents are not in [-1, 1])."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, timestep_spacing="trailing",
                                     set_alpha_to_one=False)


class _Swapped:
    """Context: ``pipe.scheduler`` replaced for the row (restored on exit)."""

    def __init__(self, pipe: Any, scheduler: Any):
        self.pipe, self.scheduler, self.saved = pipe, scheduler, None

    def __enter__(self):
        self.saved = self.pipe.scheduler
        self.pipe.scheduler = self.scheduler
        return self.pipe

    def __exit__(self, *exc):
        self.pipe.scheduler = self.saved


def _row_context(pipe: Any, row: Row, student_scheduler: Any, tdm_scheduler: Any = None):
    import contextlib

    import diffusion_accel as da

    stack = contextlib.ExitStack()
    if row.scheduler == "lcm":  # the LCD student's own scheduler, with its config
        stack.enter_context(_Swapped(pipe, type(student_scheduler).from_config(student_scheduler.config)))
    elif row.scheduler == "tdm":  # the TDM student's DDIM (trailing grid, last step to x̂0)
        stack.enter_context(_Swapped(pipe, type(tdm_scheduler).from_config(tdm_scheduler.config)))
    elif row.scheduler == "ddim":
        stack.enter_context(_Swapped(pipe, _ddim_scheduler(pipe)))
    if row.method is not None:
        method = dict(row.method)
        stack.enter_context(da.accelerated(pipe, method.pop("method"), **method))
    return stack


def _call(row: Row, prompts: list[str], seeds: list[int]) -> dict[str, Any]:
    return {"prompt": prompts, "generator": [torch.Generator().manual_seed(s) for s in seeds], "output_type": "np",
            **row.call}


def _generate(pipe: Any, row: Row, prompts: list[str], seeds: list[int]) -> np.ndarray:
    images = pipe(**_call(row, prompts, seeds)).images
    return np.clip(np.round(np.asarray(images) * 255), 0, 255).astype(np.uint8)


def load_optional(pipes: dict[str, Any], students: dict[str, str | None]) -> dict[str, str | None]:
    """Load each named optional student into ``pipes``; returns, per key, why it did not load (``None``: it did, or
    it was not asked for). Its rows are left out, not the benchmark."""
    from ..loading import load_pipeline

    unavailable: dict[str, str | None] = {}
    for key, name in students.items():
        unavailable[key] = None
        if name:
            try:
                pipes[key] = load_pipeline(name)
            except (ValueError, FileNotFoundError, OSError) as exc:
                unavailable[key] = str(exc)
    return unavailable


def run(prompts_count: int = 64, teacher: str = "testbed:pixart", lcd: str = "testbed:pixart-lcm",
        rglcd: str | None = "testbed:pixart-rglcd", repeats: int = 3, timing_batch: int = 8, batch: int = 16,
        fid_resamples: int = 200, tdm: str | None = "testbed:pixart-tdm", tdm2: str | None = None) -> dict[str, Any]:
    from ..eval.fidelity import psnr
    from ..eval.paired import claim_within, fid_bootstrap, paired_summary
    from ..loading import load_pipeline
    from ..pipelines.testbed.shapes import heldout_prompts
    from ..pipelines.testbed.shapes_net import adherence_per_image, load_real_statistics, verdicts_and_features

    pipes = {"teacher": load_pipeline(teacher), "lcd": load_pipeline(lcd)}
    unavailable = load_optional(pipes, {"rglcd": rglcd, "tdm": tdm})
    if tdm2:
        pipes["tdm2"] = load_pipeline(tdm2)
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    from ..bench import generate_counting_macs

    rows = default_rows("rglcd" in pipes, "tdm" in pipes, "tdm2" in pipes)
    student_scheduler = pipes["lcd"].scheduler
    tdm_scheduler = pipes["tdm"].scheduler if "tdm" in pipes else None
    prompts = list(heldout_prompts())[:prompts_count]
    seeds = list(range(len(prompts)))
    judge = _load_judge()

    images: dict[str, np.ndarray] = {}
    macs: dict[str, float] = {}  # denoiser MACs per image
    for row in rows:
        pipe = pipes[row.pipeline]
        chunks = []
        with _row_context(pipe, row, student_scheduler, tdm_scheduler):
            for i in range(0, len(prompts), batch):
                chunks.append(_generate(pipe, row, prompts[i:i + batch], seeds[i:i + batch]))
            macs[row.label] = generate_counting_macs(pipe, _call(row, prompts[:2], seeds[:2]))[1] / 2
        images[row.label] = np.concatenate(chunks)
        print(f"generated {row.label}", flush=True)

    times: dict[str, list[float]] = {row.label: [] for row in rows}
    for _ in range(repeats):  # interleaved: every row once per round, so drift hits all rows alike
        for row in rows:
            pipe = pipes[row.pipeline]
            with _row_context(pipe, row, student_scheduler, tdm_scheduler):
                start = time.perf_counter()
                _generate(pipe, row, prompts[:timing_batch], seeds[:timing_batch])
                times[row.label].append(time.perf_counter() - start)

    ref = rows[0].label
    mu, sigma = load_real_statistics()
    ref_flags, ref_feats = verdicts_and_features(list(images[ref]), prompts)
    ref_judge = adherence_per_image(list(images[ref]), prompts, net=judge) if judge is not None else None
    ref_wall = float(np.median(times[ref]))
    report_rows = []
    for row in rows:
        flags, feats = verdicts_and_features(list(images[row.label]), prompts)
        fid = fid_bootstrap(feats, mu, sigma, None if row.label == ref else ref_feats, resamples=fid_resamples)
        entry: dict[str, Any] = {
            "label": row.label, "call": row.call, "note": row.note,
            "macs_per_image": macs[row.label], "macs_ratio": macs[ref] / macs[row.label],
            "wall_median_s": float(np.median(times[row.label])),
            "speedup_wall": ref_wall / float(np.median(times[row.label])),
            "adherence_shapes_net": float(np.mean(flags)), "adherence_shapes_net_paired": paired_summary(ref_flags,
                                                                                                          flags),
            "fid_shapes": fid.pop("fid"), "fid_shapes_interval": fid,
            "psnr_to_reference": None if row.label == ref else psnr(images[row.label], images[ref]),
        }
        if judge is not None:
            jflags = adherence_per_image(list(images[row.label]), prompts, net=judge)
            entry["adherence_judge"] = float(np.mean(jflags))
            entry["adherence_judge_paired"] = paired_summary(ref_judge, jflags)
            entry["judges_agree"] = float(np.mean(np.asarray(jflags) == np.asarray(flags)))
        report_rows.append(entry)

    by = {r["label"]: r for r in report_rows}
    judge_key = "adherence_judge" if judge is not None else "adherence_shapes_net"
    lcd4, t2 = by["LCD 4 steps"], by["teacher 2 steps, CFG"]
    claims = {
        "lcd4_adherence_within_3_points_of_reference":
            claim_within(lcd4["adherence_shapes_net_paired"]["ci_low"], 0.03),
        "lcd4_adherence_point_difference": lcd4["adherence_shapes_net_paired"]["difference"],
        "lcd4_fid_within_25_percent": lcd4["fid_shapes"] <= 1.25 * by[ref]["fid_shapes"],
        "lcd4_macs_ratio_at_least_9": lcd4["macs_ratio"] >= 9.0,
        "lcd4_beats_teacher_at_same_passes (teacher 2 steps CFG = 4 passes)": {
            "adherence": lcd4[judge_key] - t2[judge_key], "fid": t2["fid_shapes"] - lcd4["fid_shapes"]},
    }
    if "RG-LCD 2 steps" in by and judge is not None:
        claims["rglcd2_judge_adherence_at_least_lcd4"] = by["RG-LCD 2 steps"]["adherence_judge"] >= \
            lcd4["adherence_judge"]
    if "TDM 4 steps" in by:
        pairs = [("tdm4_minus_lcd4", "TDM 4 steps", "LCD 4 steps"), ("tdm2_minus_lcd2", "TDM 2 steps", "LCD 2 steps")]
        if "TDM 2 steps (2-step student)" in by:
            pairs.append(("tdm2_student_minus_lcd2", "TDM 2 steps (2-step student)", "LCD 2 steps"))
        for key, tdm_row, lcd_row in pairs:  # which distiller wins at equal steps (positive: TDM better)
            t, c = by[tdm_row], by[lcd_row]
            claims[key] = {"adherence_shapes_net": t["adherence_shapes_net"] - c["adherence_shapes_net"],
                           judge_key: t[judge_key] - c[judge_key],
                           "fid_lower_is_better": c["fid_shapes"] - t["fid_shapes"]}
    return {"benchmark": "distill", "teacher": teacher,
            "students": {"lcd": lcd, "rglcd": rglcd, "tdm": tdm, "tdm2": tdm2},
            "rglcd_unavailable": unavailable["rglcd"], "tdm_unavailable": unavailable["tdm"],
            "judge": "shapes-judge" if judge is not None else None,
            "num_prompts": len(prompts), "repeats": repeats, "timing_batch": timing_batch,
            "threads": torch.get_num_threads(), "rows": report_rows, "claims": claims}


def _load_judge():
    """The independent judge (``assets/shapes-judge``), or ``None`` when it is not installed."""
    from ..pipelines.testbed.shapes_net import load_judge

    try:
        return load_judge("shapes-judge")
    except FileNotFoundError:
        return None


def markdown(report: dict[str, Any]) -> str:
    judge = report["judge"] is not None
    head = ["row", "MACs ratio", "wall ratio", "adherence (shapes-net)", "Δ vs ref [95% CI]"]
    if judge:
        head += ["adherence (judge)", "Δ vs ref [95% CI]"]
    head += ["FID-shapes", "PSNR to ref"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def diff(p: dict[str, Any]) -> str:
        return f"{100 * p['difference']:+.1f} [{100 * p['ci_low']:+.1f}, {100 * p['ci_high']:+.1f}]"

    for i, r in enumerate(report["rows"]):
        ref = i == 0  # the reference row: no difference to itself
        cells = [r["label"], f"{r['macs_ratio']:.2f}x", f"{r['speedup_wall']:.2f}x",
                 f"{100 * r['adherence_shapes_net']:.1f}%", "—" if ref else diff(r["adherence_shapes_net_paired"])]
        if judge:
            cells += [f"{100 * r['adherence_judge']:.1f}%", "—" if ref else diff(r["adherence_judge_paired"])]
        cells += [f"{r['fid_shapes']:.1f}", "—" if r["psnr_to_reference"] is None else f"{r['psnr_to_reference']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusion_accel.benchmarks.distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("pixart", "wan"), default="pixart",
                        help="pixart: the image students (default); wan: the video students of testbed:wan")
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts (one seed each)")
    parser.add_argument("--teacher", default=None, help="default: testbed:pixart (--family wan: testbed:wan)")
    parser.add_argument("--lcd", default="testbed:pixart-lcm")
    parser.add_argument("--rglcd", default="testbed:pixart-rglcd", help="'' to leave the RG-LCD rows out")
    parser.add_argument("--tdm", default=None, help="'' to leave the TDM rows out (they are left out anyway where the "
                                                    "student is not built); default testbed:pixart-tdm (--family "
                                                    "wan: testbed:wan-tdm)")
    parser.add_argument("--blade", default="testbed:wan-blade", help="--family wan: the BLADE student ('' to leave "
                                                                     "it out)")
    parser.add_argument("--tdm2", default=None, help="a TDM student trained for 2 steps (one more row)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timing-batch", type=int, default=8)
    parser.add_argument("--out", default=None, help="default: docs/results/distill (--family wan: "
                                                    "docs/results/distill_wan)")
    args = parser.parse_args(argv)
    wan = args.family == "wan"
    tdm = args.tdm if args.tdm is not None else ("testbed:wan-tdm" if wan else "testbed:pixart-tdm")
    if wan:
        from .distill_wan import markdown_wan, run_wan

        report = run_wan(args.prompts, args.teacher or "testbed:wan", tdm or None, args.blade or None, args.repeats,
                         args.timing_batch)
        table = markdown_wan(report)
    else:
        report = run(args.prompts, args.teacher or "testbed:pixart", args.lcd, args.rglcd or None, args.repeats,
                     args.timing_batch, tdm=tdm or None, tdm2=args.tdm2 or None)
        table = markdown(report)
    out = Path(args.out or ("docs/results/distill_wan" if wan else "docs/results/distill"))
    out.mkdir(parents=True, exist_ok=True)
    name = "distill_wan" if wan else "distill"
    (out / f"{name}.json").write_text(json.dumps(report, indent=2, default=float))
    (out / f"{name}.md").write_text(table + "\n")
    print(table)
    print(json.dumps(report["claims"], indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
