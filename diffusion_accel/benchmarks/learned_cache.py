"""Learned cache routers (HarmoniCa, L2C) against the hand-set caches at the same MACs, in one bench run.

``python -m diffusion_accel.benchmarks.learned_cache --pipeline testbed:pixart``

1. The quality tier (64 held-out prompts, the pipeline's contract steps): the baseline, HarmoniCa and L2C with τ
   picked for ``--target`` (and one more HarmoniCa point per ``--extra-targets`` for the Pareto front), and the
   peers at settings around the same MACs (Δ-cache, FirstBlockCache, TaylorSeer, DBCache). For each peer the
   setting closest to HarmoniCa's measured MACs ratio is the one compared.
2. The speed tier (same classes, random weights, compute-sized): the wall speed-up of a router schedule against
   its counted MACs ratio, split by :mod:`.router_overhead` into the ceiling the schedule has on this machine if
   reuse cost nothing (work outside the units, unequal speed per MAC) and the router's own overhead. The trained
   router belongs to the quality model (6 blocks), so the speed tier runs it stretched to the deeper model: block
   i of D takes the decisions of block ⌊i·D_q/D⌋ (same branches, same steps, same τ). ``--speed-tier full-width``
   times the published model's block width instead (PixArt-α 1152 on 1024 tokens, FLUX.1 3072; truncated depth),
   where GEMMs outweigh the per-token elementwise work as they do in the real model.

Writes ``learned_cache.json`` / ``.md``, the bench's own files, and ``pareto_learned_cache.png`` (MACs ratio vs
PSNR and vs paired adherence difference).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

#: Peer settings around 1.6x (PixArt) and 2x (flow) MACs, from the earlier sweeps in docs/results.
PEERS: dict[str, list[str]] = {
    "testbed:pixart": [
        "delta_cache:preset=pixart-alpha-20", "delta_cache:interval=2:num_cached_blocks=5:boundary=12",
        "fbcache:threshold=0.1", "fbcache:threshold=0.12",
        "taylorseer:cache_interval=3:disable_cache_before_step=2",
        "taylorseer:cache_interval=4:disable_cache_before_step=2",
        "dbcache:residual_diff_threshold=0.15", "dbcache:residual_diff_threshold=0.2",
    ],
    "testbed:flow": [
        "delta_cache:interval=3:num_cached_blocks=5", "delta_cache:interval=3:num_cached_blocks=6",
        "fbcache:threshold=0.15", "fbcache:threshold=0.2",
        "taylorseer:cache_interval=3:disable_cache_before_step=2",
        "taylorseer:cache_interval=4:disable_cache_before_step=2",
        "dbcache:residual_diff_threshold=0.2", "dbcache:residual_diff_threshold=0.3",
    ],
}
TARGETS = {"testbed:pixart": 1.6, "testbed:flow": 2.0}
#: What the issue asks of HarmoniCa at the target: adherence within N points of the baseline.
ADHERENCE_POINTS = {"testbed:pixart": 5.0, "testbed:flow": 3.0}
PEER_NAMES = ("delta_cache", "fbcache", "taylorseer", "dbcache")


def _depths(units: list[str]) -> dict[str, int]:
    depths: dict[str, int] = {}
    for name in units:
        list_name, index = name.split(".")[:2]
        depths[list_name] = max(depths.get(list_name, 0), int(index) + 1)
    return depths


def stretched_router(quality_router: str | Path, pipe: Any, out: Path) -> Path:
    """The quality router's decisions laid over a deeper model of the same classes (for timing only): block i of a
    list of D blocks takes the row of block ⌊i·D_q/D⌋ of the router's list of D_q blocks, branch by branch."""
    from ..cache_router import CacheRouter
    from ..pipelines.adapters import find_adapter

    source = CacheRouter.load(quality_router)
    units = [name for name, _ in find_adapter(pipe).routing_units(pipe)]
    here, there = _depths(units), _depths(source.units)
    columns = []
    for name in units:
        list_name, index, *branch = name.split(".")
        mapped = int(index) * there[list_name] // here[list_name]
        columns.append(source.units.index(".".join([list_name, str(mapped), *branch])))
    router = CacheRouter.for_pipeline(pipe, source.num_steps, source.config.get("guidance_scale"),
                                      logits=source.logits[:, columns], trainable=source.trainable[:, columns],
                                      objective=source.config.get("objective", "harmonica"),
                                      stretched_from=str(quality_router))
    router.config["threshold"] = source.config.get("threshold", 0.1)
    return router.save(out)


def closest_peers(methods: dict[str, dict[str, Any]], macs: float) -> dict[str, str]:
    """Per peer method, the label of its row whose MACs ratio is closest to ``macs``."""
    chosen = {}
    for peer in PEER_NAMES:
        rows = [(abs(r["macs_ratio"] - macs), label) for label, r in methods.items()
                if label.split(":")[0] == peer and r.get("macs_ratio")]
        if rows:
            chosen[peer] = min(rows)[1]
    return chosen


def pareto_two_panels(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..bench import short_label

    rows = [(label, row) for label, row in report["methods"].items() if label != "baseline" and row.get("macs_ratio")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    cmap = plt.get_cmap("tab20")
    for index, (label, row) in enumerate(rows, start=1):
        colour = cmap((index - 1) % 20)
        marker = "*" if label.split(":")[0] in ("harmonica", "l2c") else "o"
        axes[0].scatter(row["macs_ratio"], row["psnr_vs_baseline"], color=colour, marker=marker, s=70,
                        label=f"{index}: {short_label(label)}")
        axes[0].annotate(str(index), (row["macs_ratio"], row["psnr_vs_baseline"]), textcoords="offset points",
                         xytext=(4, 4), fontsize=8)
        paired = row.get("adherence_paired")
        if paired:
            y = 100 * paired["difference"]
            axes[1].errorbar(row["macs_ratio"], y, yerr=[[y - 100 * paired["ci_low"]], [100 * paired["ci_high"] - y]],
                             fmt=marker, color=colour, capsize=3, markersize=8)
            axes[1].annotate(str(index), (row["macs_ratio"], y), textcoords="offset points", xytext=(4, 4),
                             fontsize=8)
    axes[0].set_ylabel("PSNR vs baseline (dB)")
    axes[1].set_ylabel("adherence − baseline (points, 95 % CI)")
    axes[1].axhline(0.0, color="grey", lw=0.8)
    for ax in axes:
        ax.set_xlabel("denoiser MACs ratio (baseline / method, x)")
        ax.grid(alpha=0.3)
    s = report["settings"]
    fig.suptitle(f"{s['pipeline']}, {s['steps']} steps, {s['num_prompts']} prompts: learned routers (stars) vs "
                 "hand-set caches")
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(2.25, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def verdict(report: dict[str, Any], pipeline: str, harmonica: str) -> dict[str, Any]:
    methods = report["methods"]
    row = methods[harmonica]
    base = methods["baseline"]
    peers = closest_peers(methods, row["macs_ratio"])
    paired = row.get("adherence_paired") or {}
    diff = 100 * paired.get("difference", float("nan"))
    fid_change = (row["fid_shapes"] / base["fid_shapes"] - 1) if row.get("fid_shapes") and base.get("fid_shapes") \
        else None
    return {
        "harmonica": harmonica, "macs_ratio": row["macs_ratio"], "target": TARGETS.get(pipeline),
        "adherence_diff_points": diff, "adherence_ci_points": [100 * paired.get("ci_low", float("nan")),
                                                               100 * paired.get("ci_high", float("nan"))],
        "adherence_within": ADHERENCE_POINTS.get(pipeline),
        "adherence_ok": diff >= -ADHERENCE_POINTS.get(pipeline, 5.0),
        "fid_shapes_change": fid_change, "fid_ok": fid_change is not None and fid_change <= 0.10,
        "macs_ok": row["macs_ratio"] >= TARGETS.get(pipeline, 1.6) - 1e-9,
        "closest_peers": {peer: {"label": label, "macs_ratio": methods[label]["macs_ratio"],
                                 "psnr": methods[label]["psnr_vs_baseline"],
                                 "harmonica_psnr_higher": row["psnr_vs_baseline"] > methods[label]["psnr_vs_baseline"]}
                          for peer, label in peers.items()},
    }


def speed_tier(pipeline: str, quality_router: str, out: Path, repeats: int, tier: str = "speed") -> dict[str, Any]:
    """The quality router stretched over the random-weight ``tier`` (``speed``, or ``full-width``: the published
    block width), accounted by :func:`.router_overhead.account`; written to ``out/speed/router_overhead.json``
    (``router_overhead_full_width.json`` for that tier; the caller prints it)."""
    from ..bench import call_kwargs
    from ..cache_router import CacheRouter
    from ..loading import base_call_kwargs, load_pipeline
    from ..prompts import bench_prompts
    from .router_overhead import account

    pipe = load_pipeline(pipeline, tier=tier)
    pipe.set_progress_bar_config(disable=True)
    suffix = "" if tier == "speed" else "_" + tier.replace("-", "_")
    stretched = stretched_router(quality_router, pipe, out / f"speed_router{suffix}")
    router = CacheRouter.load(stretched)
    call = call_kwargs(pipe, "", bench_prompts(pipeline, 1), base_call_kwargs(pipeline, tier=tier),
                       router.num_steps, router.config.get("guidance_scale"), None, [0])
    speed = account(pipe, stretched, call, repeats=repeats)
    speed.update(tier=tier, speedup_wall=speed["end_to_end_wall_ratio"], wall_over_macs=speed["end_to_end_over_macs"],
                 within_5_percent=speed["end_to_end_wall_ratio"] >= 0.95 * speed["macs_ratio"])
    (out / "speed").mkdir(parents=True, exist_ok=True)
    (out / "speed" / f"router_overhead{suffix}.json").write_text(json.dumps(speed, indent=2))
    return speed


def main(argv: list[str] | None = None) -> int:
    from ..bench import markdown_table, run_bench
    from ..loading import load_pipeline

    parser = argparse.ArgumentParser(prog="python -m diffusion_accel.benchmarks.learned_cache",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="testbed:pixart", choices=sorted(PEERS))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompts-file", default=None, help="prompts, one per line, instead of the held-out ones "
                        "(the first --prompts lines; e.g. a development set to choose variants on, so that the "
                        "held-out prompts stay the judge)")
    parser.add_argument("--target", type=float, default=None, help="MACs ratio HarmoniCa and L2C are set to")
    parser.add_argument("--extra-targets", default="1.4,2.0", help="more HarmoniCa points for the Pareto front")
    parser.add_argument("--l2c-target", type=float, default=None,
                        help="MACs ratio L2C is set to (default: --target); L2C computes every even step, so on "
                             "testbed:flow it reaches at most ~1.98x")
    parser.add_argument("--harmonica-router", default=None, help="default: the pipeline's shipped one")
    parser.add_argument("--l2c-router", default=None, help="default: the pipeline's shipped one")
    parser.add_argument("--peers", default=None, help="comma list of peer specs (default: PEERS[pipeline])")
    parser.add_argument("--also", default=None, help="more method specs for the same run (comma list)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-speed", action="store_true", help="skip the speed-tier overhead run")
    parser.add_argument("--speed-only", action="store_true",
                        help="only the speed-tier overhead run (out/speed/router_overhead.json)")
    parser.add_argument("--speed-tier", default="speed", choices=("speed", "full-width"),
                        help="the random-weight model the overhead run times: the testbed's speed tier, or "
                             "full-width (the published model's block width at a truncated depth)")
    parser.add_argument("--out", default=None, help="default: docs/results/learned_cache_<testbed>")
    args = parser.parse_args(argv)
    if args.prompts_file and not Path(args.prompts_file).is_file():
        parser.error(f"--prompts-file {args.prompts_file}: no such file (one prompt per line)")
    name = args.pipeline.split(":", 1)[1]
    out = Path(args.out or f"docs/results/learned_cache_{name}")
    out.mkdir(parents=True, exist_ok=True)
    target = args.target or TARGETS[args.pipeline]
    pipe = load_pipeline(args.pipeline)
    from ..methods.harmonica import shipped_router

    h_router = args.harmonica_router or str(shipped_router(pipe, "harmonica"))
    l_router = args.l2c_router or str(shipped_router(pipe, "l2c"))
    del pipe
    if args.speed_only:
        from .router_overhead import markdown as overhead_markdown

        print(overhead_markdown(speed_tier(args.pipeline, h_router, out, max(args.repeats, 5),
                                                    args.speed_tier)))
        return 0
    specs = ["baseline", f"harmonica:router={h_router}:target_macs_ratio={target}"]
    specs += [f"harmonica:router={h_router}:target_macs_ratio={t}" for t in args.extra_targets.split(",") if t]
    specs.append(f"l2c:router={l_router}:target_macs_ratio={args.l2c_target or target}")
    specs += args.also.split(",") if args.also else []
    specs += args.peers.split(",") if args.peers else PEERS[args.pipeline]
    report = run_bench(args.pipeline, ",".join(specs), num_prompts=args.prompts, prompts_file=args.prompts_file,
                       repeats=args.repeats, out_dir=out, json_path=out / "bench.json", batch_size=32,
                       pareto_x="macs_ratio")
    harmonica_label = specs[1]
    result: dict[str, Any] = {"quality": report, "verdict": verdict(report, args.pipeline, harmonica_label)}
    pareto_two_panels(report, out / "pareto_learned_cache.png")
    print(markdown_table(report))

    if not args.no_speed:
        result["speed"] = speed_tier(args.pipeline, h_router, out, max(args.repeats, 5), args.speed_tier)
    (out / "learned_cache.json").write_text(json.dumps(result, indent=2, default=str))
    v = result["verdict"]
    lines = [f"# Learned cache routers on {args.pipeline}", "", markdown_table(report), "",
             f"HarmoniCa at target {target}: MACs {v['macs_ratio']:.3f}x, adherence {v['adherence_diff_points']:+.1f} "
             f"[{v['adherence_ci_points'][0]:+.1f}, {v['adherence_ci_points'][1]:+.1f}] points (target: within "
             f"{v['adherence_within']}), FID-shapes {100 * (v['fid_shapes_change'] or 0):+.1f} % (target ≤ +10 %)."]
    for p in v["closest_peers"].values():
        lines.append(f"- vs {p['label']} ({p['macs_ratio']:.3f}x): PSNR {p['psnr']:.2f} dB; HarmoniCa "
                     f"{report['methods'][harmonica_label]['psnr_vs_baseline']:.2f} dB "
                     f"({'higher' if p['harmonica_psnr_higher'] else 'lower'})")
    if "speed" in result:
        from .router_overhead import markdown as overhead_markdown

        s = result["speed"]
        lines.append(f"\nSpeed tier (router stretched to the deeper model): MACs {s['macs_ratio']:.3f}x, wall "
                     f"{s['speedup_wall']:.3f}x, wall / MACs = {s['wall_over_macs']:.3f}; if reuse cost nothing: "
                     f"{s['free_reuse_ratio']:.3f}x ({s['free_reuse_over_macs']:.3f} of MACs), router overhead "
                     f"{100 * s['router_overhead']:+.1f} %\n\n" + overhead_markdown(s))
    (out / "learned_cache.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
