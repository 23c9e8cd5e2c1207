"""The benchmark suites behind the README's numbers: ``python -m diffusion_accel.benchmarks.suite NAME``.

Each suite is one or more ``diffusion-accel bench`` runs (baseline and methods side by side in one process,
interleaved timing, medians), printed as tables and written as JSON under ``--out``:

* ``delta_cache``: Δ-cache vs Diffusers' FirstBlockCache / TaylorSeer / MagCache and cache-dit DBCache on
  ``testbed:pixart`` (quality tier: MACs, PSNR, adherence, FID-shapes; speed tier: wall-clock speedup, and the
  never-skip overhead).
* ``bottleneck``: Bottleneck Sampling vs the full-resolution baseline and the fewer-steps baseline of the same cost
  on ``testbed:flow`` (speed tier for time, quality tier for adherence/FID).
* ``peers``: the smoke run: ``testbed:pixart``, baseline + two Diffusers peers.

Quality runs use the bench's :data:`~diffusion_accel.bench.QUALITY_PROMPTS` held-out prompt+seed pairs (enough for a
±3-point paired interval), batched 32 at a time; the baseline is cached between runs of the same settings.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..bench import QUALITY_PROMPTS

#: The paper's 4:13:8 split, our two faster splits (the last stage re-noised from 0.75), fewer-steps baselines.
BOTTLENECK_METHODS = ("baseline,bottleneck,"
                      "bottleneck:step_fractions=[0.1,0.7,0.2]:start_sigmas=[1.0,0.8,0.75],"
                      "bottleneck:step_fractions=[0.05,0.8,0.15]:start_sigmas=[1.0,0.8,0.75],steps=13,steps=11")

SUITES: dict[str, list[dict[str, Any]]] = {
    "peers": [
        {"pipeline": "testbed:pixart", "tier": "quality", "num_prompts": QUALITY_PROMPTS, "repeats": 2,
         "methods": "baseline,fbcache:threshold=0.1,taylorseer:cache_interval=3:disable_cache_before_step=2"},
    ],
    "delta_cache": [
        {"pipeline": "testbed:pixart", "tier": "quality", "num_prompts": QUALITY_PROMPTS, "repeats": 2,
         "methods": "baseline,delta_cache:preset=pixart-alpha-20,"
                    "delta_cache:interval=2:num_cached_blocks=5:boundary=12,"
                    "delta_cache:interval=3:num_cached_blocks=4:boundary=12,"
                    "fbcache:threshold=0.1,fbcache:threshold=0.2,fbcache:threshold=0.3,"
                    "taylorseer:cache_interval=2:disable_cache_before_step=2,"
                    "taylorseer:cache_interval=3:disable_cache_before_step=2,"
                    "dbcache:residual_diff_threshold=0.1,dbcache:residual_diff_threshold=0.2,"
                    "dbcache:residual_diff_threshold=0.4"},
        {"pipeline": "testbed:pixart", "tier": "speed", "num_prompts": 2, "repeats": 5,
         "methods": "baseline,delta_cache:preset=pixart-alpha-20,delta_cache:interval=1,"
                    "fbcache:threshold=0.2,taylorseer:cache_interval=3:disable_cache_before_step=2"},
    ],
    "bottleneck": [
        # Same total steps as the baseline (28); "steps=N" are the honest fewer-steps baselines of matched cost. The
        # speed tier at its default size (256 image tokens) and at 4x the tokens (--size 256: 1024 image tokens).
        {"pipeline": "testbed:flow", "tier": "speed", "num_prompts": 1, "repeats": 2, "methods": BOTTLENECK_METHODS},
        {"pipeline": "testbed:flow", "tier": "speed", "num_prompts": 1, "repeats": 2, "size": 256,
         "methods": BOTTLENECK_METHODS},
        {"pipeline": "testbed:flow", "tier": "quality", "num_prompts": QUALITY_PROMPTS, "repeats": 1,
         "methods": BOTTLENECK_METHODS},
    ],
}


def run_suite(name: str, out_dir: str | Path, overrides: dict[str, Any] | None = None,
              tier: str | None = None) -> list[dict[str, Any]]:
    """Run suite ``name`` (only its runs of ``tier`` when given) and write one folder per run under ``out_dir``."""
    from ..bench import markdown_table, run_bench

    if name not in SUITES:
        raise ValueError(f"Unknown suite {name!r}; choose one of {', '.join(SUITES)}.")
    reports = []
    for index, run in enumerate(SUITES[name]):
        if tier is not None and run["tier"] != tier:
            continue
        run = {**run, **(overrides or {})}
        size = f"_{run['size']}px" if "size" in run else ""
        target = Path(out_dir) / f"{name}_{index}_{run['tier']}{size}"
        start = time.perf_counter()
        report = run_bench(run["pipeline"], run["methods"], num_prompts=run["num_prompts"], tier=run["tier"],
                           repeats=run["repeats"], size=run.get("size"), out_dir=target,
                           batch_size=32 if run["tier"] == "quality" else 8,
                           json_path=target / "bench.json")
        report["settings"]["suite_seconds"] = time.perf_counter() - start
        (target / "bench.json").write_text(json.dumps(report, indent=2, default=str))
        print(markdown_table(report))
        print(f"({report['settings']['suite_seconds']:.0f} s; {target / 'bench.json'})\n")
        reports.append(report)
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a named benchmark suite.")
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--num-prompts", type=int, default=None, help="override every run's prompt count")
    parser.add_argument("--tier", choices=("quality", "speed"), default=None, help="only the runs of this tier")
    args = parser.parse_args(argv)
    overrides = {"num_prompts": args.num_prompts} if args.num_prompts else None
    run_suite(args.suite, args.out, overrides, tier=args.tier)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
