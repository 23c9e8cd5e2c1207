"""Do Δ-cache and ``torch.compile`` multiply? Wall time of eager, Δ-cache, regional compile and both (speed tier).

``python -m diffusion_accel.benchmarks.compile_speed --out docs/results/compile_speed``

Four pipelines built from the same seed (``testbed:flow`` speed tier by default: 4 dual + 10 single Flux blocks,
hidden 384, 256 image + 32 text tokens): eager, eager + Δ-cache, ``compile_repeated_blocks(fullgraph=True)``
(Inductor) and the same compile + Δ-cache. Each is warmed (its compile time is reported separately), then the four
are timed in interleaved rounds so that load from other processes on a shared machine hits them alike; the table
shows the median of the rounds, of wall time and of this process's CPU time (less sensitive to other processes).
The call ends at the latents (``output_type="latent"``): the VAE is untouched by both compile and the method.
``max_abs_diff_vs_eager`` compares each variant's latents with its eager counterpart
(compile numerics only; Δ-cache's own error is measured by ``benchmarks.cache_error``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import diffusion_accel as da

VARIANTS = ("eager", "delta_cache", "compile", "compile+delta_cache")


def _call(pipe: Any, steps: int) -> tuple[torch.Tensor, float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    out = pipe("a red circle on a blue square", num_inference_steps=steps, output_type="latent",
               generator=torch.Generator().manual_seed(0))
    return out.images.float(), time.perf_counter() - start, time.process_time() - cpu


def run(pipeline: str = "testbed:flow", steps: int = 20, repeats: int = 5, delta: dict | None = None,
        log=print) -> dict[str, Any]:
    delta = delta or {}
    pipes: dict[str, Any] = {}
    warm: dict[str, float] = {}
    outputs: dict[str, torch.Tensor] = {}
    for name in VARIANTS:
        pipe = da.load_pipeline(pipeline, tier="speed")
        pipe.set_progress_bar_config(disable=True)
        if name.startswith("compile"):
            pipe.transformer.compile_repeated_blocks(fullgraph=True)
        if name.endswith("delta_cache"):
            da.apply(pipe, "delta_cache", **delta)
        outputs[name], warm[name], _ = _call(pipe, steps)  # compiles on the first call
        log(f"{name}: first call {warm[name]:.1f} s")
        pipes[name] = pipe
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(repeats):
        for name in VARIANTS:
            _, wall, used = _call(pipes[name], steps)
            times[name].append(wall)
            cpu[name].append(used)
        log(f"round {r + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in VARIANTS))
    median = {name: statistics.median(values) for name, values in times.items()}
    median_cpu = {name: statistics.median(values) for name, values in cpu.items()}
    stats = da.stats(pipes["compile+delta_cache"])
    return {
        "settings": {"pipeline": pipeline, "tier": "speed", "steps": steps, "repeats": repeats,
                     "delta_cache": delta or "defaults (interval 2, num_cached_blocks 0.75, boundary 0.6)",
                     "compile": "transformer.compile_repeated_blocks(fullgraph=True), Inductor",
                     "output_type": "latent", "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "cpu": platform.processor() or platform.machine()},
        "first_call_s": warm,
        "times_s": times,
        "median_s": median,
        "cpu_times_s": cpu,
        "median_cpu_s": median_cpu,
        "cpu_speedup_compile+delta_cache_vs_compile": median_cpu["compile"] / median_cpu["compile+delta_cache"],
        "speedup": {
            "delta_cache_vs_eager": median["eager"] / median["delta_cache"],
            "compile_vs_eager": median["eager"] / median["compile"],
            "compile+delta_cache_vs_compile": median["compile"] / median["compile+delta_cache"],
            "compile+delta_cache_vs_eager": median["eager"] / median["compile+delta_cache"],
            "product_of_separate_gains": (median["eager"] / median["delta_cache"])
            * (median["eager"] / median["compile"]),
        },
        "max_abs_diff_vs_eager": {
            "compile": float((outputs["compile"] - outputs["eager"]).abs().max()),
            "compile+delta_cache": float((outputs["compile+delta_cache"] - outputs["delta_cache"]).abs().max()),
        },
        "compile_stats_last_call": stats["compile"],
        "blocks_run": [stats["blocks_run"], stats["blocks_total"]],
    }


def table(result: dict[str, Any]) -> str:
    median, first = result["median_s"], result["first_call_s"]
    cpu = result["median_cpu_s"]
    lines = ["| variant | median wall (s) | speedup vs eager | median CPU (s) | CPU speedup | first call (s) |",
             "|---|---|---|---|---|---|"]
    for name in VARIANTS:
        lines.append(f"| {name} | {median[name]:.3f} | {median['eager'] / median[name]:.2f}x | {cpu[name]:.2f} | "
                     f"{cpu['eager'] / cpu[name]:.2f}x | {first[name]:.1f} |")
    s = result["speedup"]
    lines += ["", f"compile + Δ-cache vs compile alone: **{s['compile+delta_cache_vs_compile']:.2f}x**; "
              f"vs eager: {s['compile+delta_cache_vs_eager']:.2f}x (product of the separate gains: "
              f"{s['product_of_separate_gains']:.2f}x); CPU time: "
              f"{result['cpu_speedup_compile+delta_cache_vs_compile']:.2f}x"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="testbed:flow")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=None, help="folder for bench.json and bench.md")
    args = parser.parse_args(argv)
    result = run(args.pipeline, args.steps, args.repeats)
    text = table(result)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.json").write_text(json.dumps(result, indent=2))
        (args.out / "bench.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
