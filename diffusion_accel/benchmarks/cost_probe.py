"""What candidate settings cost, before the one bench run that compares them at matched cost.

``python -m diffusion_accel.benchmarks.cost_probe --pipeline testbed:wan --methods "fbcache:threshold=0.1,..."``
``python -m diffusion_accel.benchmarks.cost_probe --match-density "sparse_attention:mask=asa:block_size=4" --knob tau``

For each setting (the bench's ``--methods`` syntax) it runs the quality tier's call on the first ``--prompts``
held-out prompts and prints the denoiser MACs ratio (baseline / method, counted with ``torch.utils.flop_counter``
as the bench counts it), the NFE and, for sparse attention, the measured attention density. Knobs such as a
cache's threshold, ASA's τ or a sliding tile's window set the cost only indirectly (and per prompt for adaptive
methods), so a "matched MACs" or "matched density" comparison picks its settings from these measured numbers; the
bench run then reports the cost it measured on every prompt, which is what the comparison states.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def probe(pipeline: str, methods: str, num_prompts: int = 8, seed: int = 0,
          baseline: bool = True) -> dict[str, dict[str, Any]]:
    """Per setting label: ``macs_ratio``, ``nfe`` and ``attention_density`` (``None`` without sparse attention) over
    one call on ``num_prompts`` prompts with the bench's seeds (``baseline=False``: no MACs ratio, half the time)."""
    import diffusion_accel as da

    from ..bench import _attention_density, call_kwargs, generate_counting_macs, parse_method_specs
    from ..loading import base_call_kwargs
    from ..prompts import bench_prompts

    pipe = da.load_pipeline(pipeline)
    pipe.set_progress_bar_config(disable=True)
    prompts = bench_prompts(pipeline, num_prompts)
    kwargs = call_kwargs(pipe, da.find_adapter(pipe).family, prompts, base_call_kwargs(pipeline), None, None, None,
                         [seed + i for i in range(len(prompts))])
    rows: dict[str, dict[str, Any]] = {}
    for spec in parse_method_specs(methods):
        if spec.label == "baseline" and not baseline:
            continue
        with da.accelerated(pipe, *spec.configs):
            _, macs = generate_counting_macs(pipe, {**kwargs, **spec.call_overrides})
            stats = da.stats(pipe)
        rows[spec.label] = {"macs": macs, "nfe": stats["nfe"], "attention_density": _attention_density(stats)}
    base = rows["baseline"]["macs"] if baseline else None
    for row in rows.values():
        row["macs_ratio"] = base / row["macs"] if base and row["macs"] else None
    return rows


def match_density(pipeline: str, setting: str, knob: str, target: float, low: float, high: float,
                  num_prompts: int = 4, iterations: int = 8) -> dict[str, Any]:
    """Bisect a continuous ``knob`` of a sparse-attention ``setting`` (density grows with it, e.g. ASA's ``tau``) so
    that the density measured over whole calls (every step, layer and prompt: what the bench will measure) is
    closest to ``target``. Returns the value, its measured density and every probe."""
    probes = []
    for _ in range(iterations):
        mid = round(0.5 * (low + high), 6)
        label = f"{setting}:{knob}={mid}"
        density = probe(pipeline, label, num_prompts, baseline=False)[label]["attention_density"]
        probes.append({"value": mid, "density": density})
        low, high = (low, mid) if density > target else (mid, high)
    best = min(probes, key=lambda p: abs(p["density"] - target))
    return {"setting": setting, "knob": knob, "target": target, "value": best["value"], "density": best["density"],
            "probes": probes, "prompts": num_prompts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="testbed:wan")
    parser.add_argument("--methods", default=None, help="settings to cost (the bench's --methods syntax)")
    parser.add_argument("--match-density", default=None, help="a sparse_attention setting whose --knob is bisected")
    parser.add_argument("--knob", default="tau")
    parser.add_argument("--range", default="0.05:0.999", help="LOW:HIGH of the knob")
    parser.add_argument("--target", type=float, default=0.25, help="attention density to match")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.match_density:
        low, high = (float(v) for v in args.range.split(":"))
        found = match_density(args.pipeline, args.match_density, args.knob, args.target, low, high, args.prompts)
        print(f"{args.match_density}: {args.knob}={found['value']} measures density {found['density']:.4f} "
              f"(target {args.target}, {args.prompts} prompts)")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(found, indent=2))
        return 0
    if not args.methods:
        parser.error("give --methods or --match-density")
    rows = probe(args.pipeline, args.methods, args.prompts)
    print(f"{args.pipeline}, {args.prompts} prompts")
    print("| setting | MACs ratio | NFE | attention density |\n|---|---|---|---|")
    for label, row in rows.items():
        density = "-" if row["attention_density"] is None else f"{row['attention_density']:.3f}"
        print(f"| {label} | {row['macs_ratio']:.3f} | {row['nfe']} | {density} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"pipeline": args.pipeline, "prompts": args.prompts, "rows": rows},
                                              indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
