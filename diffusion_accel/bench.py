"""``diffusion-accel bench``: baseline and methods side by side in one process.

Per method it reports ``speedup_wall`` (median of interleaved timed calls, baseline / method), ``macs_ratio``
(denoiser MACs counted with ``torch.utils.flop_counter``, baseline / method; summed over every prompt on the
quality tier, over the timing call on the speed tier), ``nfe``, ``psnr_vs_baseline`` and
``ssim_vs_baseline`` (same seeds), and on the testbed ``adherence`` and ``fid_shapes`` (shapes-net). It writes a
JSON file, a Markdown table, a Pareto plot (speedup vs PSNR) and an image grid.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .loading import base_call_kwargs

METRIC_KEYS = ("speedup_wall", "macs_ratio", "nfe", "psnr_vs_baseline", "ssim_vs_baseline", "adherence", "fid_shapes")

BUILTIN_PROMPTS = (
    "a red circle", "a blue square", "a green triangle", "a yellow circle in the top left",
    "a small red square in the bottom right", "a big blue circle in the center", "a green square in the top right",
    "a yellow triangle in the bottom left", "a red triangle and a blue circle", "a small green circle",
    "a big yellow square", "a blue triangle in the top left", "a red circle in the bottom left",
    "a green triangle in the center", "a yellow square and a red circle", "a blue circle in the top right",
)


@dataclass
class MethodSpec:
    """One bench entry: a label and the method configs it applies (none for the baseline)."""

    label: str
    configs: list[Any] = field(default_factory=list)
    #: Call arguments this entry changes (``steps=12``: the baseline with fewer steps, the honest comparison).
    call_overrides: dict[str, Any] = field(default_factory=dict)


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets, so list values such as ``scales=[1,0.5,1]`` stay whole."""
    parts, depth, current = [], 0, []
    for char in text:
        depth += char in "[("
        depth -= char in "])"
        if char == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_method_specs(text: str) -> list[MethodSpec]:
    """``"baseline,delta_cache,fbcache:threshold=0.1,delta_cache:interval=3:num_cached_blocks=0.5"``.

    Each comma-separated item is a method name (or a ``.json``/``.yaml`` config path) followed by ``:key=value``
    overrides; ``+`` combines methods in one entry (``adaptive_guidance+delta_cache``); ``steps=N`` is the baseline
    run with N steps (same cost comparison). ``baseline`` is always run.
    """
    import yaml

    from .config import parse_config

    specs = [MethodSpec("baseline")]
    for item in (part.strip() for part in _split_top_level(text)):
        if not item or item == "baseline":
            continue
        if item.startswith("steps="):
            specs.append(MethodSpec(item, [], {"num_inference_steps": int(item.split("=", 1)[1])}))
            continue
        configs = []
        for piece in item.split("+"):
            name, *options = piece.split(":")
            overrides = {}
            for option in options:
                if "=" not in option:
                    raise ValueError(f"Bench method option {option!r} in {item!r} must be key=value.")
                key, value = option.split("=", 1)
                overrides[key] = yaml.safe_load(value)
            configs.append(parse_config(name, **overrides))
        specs.append(MethodSpec(item, configs))
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"Bench methods must be distinct, got {labels}.")
    return specs


# ---------------------------------------------------------------------------------------------- pipeline calls
def _call_kwargs(pipe: Any, family: str, prompts: list[str], base: dict[str, Any], steps: int | None,
                 guidance: float | None, size: int | None, seeds: list[int]) -> dict[str, Any]:
    from .pipelines.adapters import find_adapter

    adapter = find_adapter(pipe)
    kwargs: dict[str, Any] = dict(base)
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    kwargs.setdefault("num_inference_steps", 20)
    if adapter.family == "dit":
        labels = list(pipe.labels) if hasattr(pipe, "labels") else [0]
        kwargs["class_labels"] = [i % max(len(labels), 1) for i in range(len(prompts))]
    else:
        kwargs["prompt"] = list(prompts)
    if adapter.family in ("pixart_alpha", "pixart_sigma"):
        kwargs.setdefault("clean_caption", False)
        kwargs.setdefault("use_resolution_binning", False)
    if guidance is not None:
        kwargs[adapter.cfg_scale_arg] = guidance
    negative = kwargs.get("negative_prompt")
    if isinstance(negative, str):
        kwargs["negative_prompt"] = [negative] * len(prompts)
    if adapter.cfg_needs_negative_prompt and kwargs.get(adapter.cfg_scale_arg, 1.0) > 1.0:
        kwargs.setdefault("negative_prompt", [""] * len(prompts))
    if size:
        kwargs["height"] = kwargs["width"] = size
    kwargs["generator"] = [torch.Generator().manual_seed(s) for s in seeds]
    return kwargs


def _to_uint8(output: Any) -> np.ndarray:
    """Pipeline output → uint8 array ``[N, H, W, 3]`` (videos: frames stacked as ``[N, T, H, W, 3]``)."""
    if hasattr(output, "frames"):
        frames = np.asarray(output.frames, dtype=np.float32)
        return (frames * 255).round().clip(0, 255).astype(np.uint8)
    return np.stack([np.asarray(image.convert("RGB")) for image in output.images])


def _generate(pipe: Any, kwargs: dict[str, Any]) -> Any:
    kwargs = dict(kwargs)
    kwargs["generator"] = [torch.Generator().manual_seed(g.initial_seed()) for g in kwargs["generator"]]
    return pipe(**kwargs)


def _with_method(pipe: Any, spec: MethodSpec):
    import diffusion_accel as da

    return da.accelerated(pipe, *spec.configs)


def count_denoiser_macs(pipe: Any, kwargs: dict[str, Any], spec: MethodSpec) -> float:
    """MACs of the denoiser for one call (FLOPs / 2, counted by ``torch.utils.flop_counter``)."""
    with _with_method(pipe, spec):
        return _generate_counting_macs(pipe, kwargs)[1]


def _generate_counting_macs(pipe: Any, kwargs: dict[str, Any]) -> tuple[Any, float]:
    """``(output, denoiser MACs)`` of one call of the (already patched) pipeline."""
    from torch.utils.flop_counter import FlopCounterMode

    from .pipelines.adapters import find_adapter

    denoiser_name = type(find_adapter(pipe).get_denoiser(pipe)).__name__
    counter = FlopCounterMode(display=False)
    with counter:
        output = _generate(pipe, kwargs)
    counts = counter.get_flop_counts().get(denoiser_name, {})
    return output, sum(counts.values()) / 2.0


def _peer_reason(pipe: Any, spec: MethodSpec) -> str | None:
    from .pipelines.adapters import find_adapter

    adapter = find_adapter(pipe)
    for config in spec.configs:
        reason = config.not_applicable_reason(adapter, pipe)
        if reason:
            return reason
    return None


# ---------------------------------------------------------------------------------------------- metrics
def _fidelity(images: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    from .eval.fidelity import psnr, ssim

    flat = images.reshape(-1, *images.shape[-3:])
    ref = reference.reshape(-1, *reference.shape[-3:])
    return float(np.mean([psnr(a, b) for a, b in zip(flat, ref, strict=True)])), float(
        np.mean([ssim(a, b) for a, b in zip(flat, ref, strict=True)])
    )


def _shape_metrics(images: np.ndarray, prompts: list[str]) -> tuple[float | None, float | None]:
    """Prompt adherence and FID-shapes from the testbed's shapes-net (images only)."""
    if images.ndim != 4:
        return None, None
    try:
        from .pipelines.testbed.shapes_net import adherence, fid_shapes
    except ImportError:
        return None, None
    return float(adherence(list(images), prompts)), float(fid_shapes(list(images)))


# ---------------------------------------------------------------------------------------------- the run
def run_bench(
    pipeline: str,
    methods: str | list[MethodSpec],
    *,
    num_prompts: int = 16,
    prompts_file: str | None = None,
    steps: int | None = None,
    tier: str = "quality",
    repeats: int = 3,
    guidance_scale: float | None = None,
    size: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    timing_batch: int = 1,
    out_dir: str | Path = "bench_out",
    json_path: str | Path | None = None,
    shape_metrics: bool | None = None,
) -> dict[str, Any]:
    """Run the side-by-side benchmark and write its JSON, Markdown, Pareto plot and image grid."""
    import diffusion_accel as da

    specs = parse_method_specs(methods) if isinstance(methods, str) else methods
    pipe = da.load_pipeline(pipeline, tier=tier) if pipeline.startswith("testbed:") else da.load_pipeline(pipeline)
    pipe.set_progress_bar_config(disable=True)
    family = da.find_adapter(pipe).family
    base_kwargs = base_call_kwargs(pipeline, tier)
    prompts = _load_prompts(pipeline, num_prompts, prompts_file)
    if shape_metrics is None:
        shape_metrics = pipeline.startswith("testbed:") and tier == "quality"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    runnable, skipped = [], {}
    for spec in specs:
        reason = _peer_reason(pipe, spec)
        if reason:
            skipped[spec.label] = reason
        else:
            runnable.append(spec)

    # 1. quality: every prompt with a fixed seed per prompt, in batches. On the quality tier the denoiser MACs are
    #    counted over all of these calls, so methods whose work varies per prompt (adaptive guidance, threshold
    #    caches) get their mean cost, not the cost of one prompt.
    macs_over_all = tier == "quality"
    images: dict[str, np.ndarray] = {}
    nfe: dict[str, float] = {}
    macs: dict[str, float] = {}
    for spec in runnable:
        chunks, nfes, total_macs = [], [], 0.0
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            kwargs = _call_kwargs(pipe, family, batch, base_kwargs, steps, guidance_scale, size,
                                  [seed + start + i for i in range(len(batch))])
            kwargs.update(spec.call_overrides)
            with _with_method(pipe, spec):
                if macs_over_all:
                    output, batch_macs = _generate_counting_macs(pipe, kwargs)
                    total_macs += batch_macs
                else:
                    output = _generate(pipe, kwargs)
                chunks.append(_to_uint8(output))
                nfes.append(da.stats(pipe)["nfe"])
        images[spec.label] = np.concatenate(chunks)
        nfe[spec.label] = float(np.mean(nfes))
        if macs_over_all:
            macs[spec.label] = total_macs

    # 2. MACs on the speed tier: one timing call per method
    macs_kwargs = _call_kwargs(pipe, family, prompts[:timing_batch], base_kwargs, steps, guidance_scale, size,
                               [seed + i for i in range(timing_batch)])
    if not macs_over_all:
        macs = {spec.label: count_denoiser_macs(pipe, {**macs_kwargs, **spec.call_overrides}, spec)
                for spec in runnable}

    # 3. wall time: interleaved repeats (the order rotates every round), median per method
    times: dict[str, list[float]] = {spec.label: [] for spec in runnable}
    for spec in runnable:  # warm-up
        with _with_method(pipe, spec):
            _generate(pipe, {**macs_kwargs, **spec.call_overrides})
    for round_index in range(repeats):
        order = runnable[round_index % len(runnable):] + runnable[: round_index % len(runnable)]
        for spec in order:
            call = {**macs_kwargs, **spec.call_overrides}
            with _with_method(pipe, spec):
                start = time.perf_counter()
                _generate(pipe, call)
                times[spec.label].append(time.perf_counter() - start)

    base = "baseline"
    results: dict[str, dict[str, Any]] = {}
    for spec in runnable:
        psnr, ssim = (math.inf, 1.0) if spec.label == base else _fidelity(images[spec.label], images[base])
        adherence, fid = _shape_metrics(images[spec.label], prompts) if shape_metrics else (None, None)
        results[spec.label] = {
            "speedup_wall": statistics.median(times[base]) / statistics.median(times[spec.label]),
            "macs_ratio": macs[base] / macs[spec.label] if macs[spec.label] else None,
            "nfe": nfe[spec.label],
            "psnr_vs_baseline": psnr,
            "ssim_vs_baseline": ssim,
            "adherence": adherence,
            "fid_shapes": fid,
        }
    report = {
        "settings": {
            "pipeline": pipeline, "family": family, "tier": tier, "steps": macs_kwargs["num_inference_steps"],
            "num_prompts": len(prompts), "call": {k: v for k, v in macs_kwargs.items()
                                                  if k not in ("prompt", "generator", "negative_prompt")},
            "repeats": repeats, "guidance_scale": guidance_scale, "size": size, "seed": seed,
            "batch_size": batch_size, "timing_batch": timing_batch,
            "methods": {s.label: {"configs": [c.to_dict() for c in s.configs], "call_overrides": s.call_overrides}
                        for s in runnable},
            "median_wall_s": {k: statistics.median(v) for k, v in times.items()},
            "denoiser_macs": macs,
            "macs_counted_over": "all prompts" if macs_over_all else f"the {timing_batch} timing prompt(s)",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
        },
        "methods": results,
        "skipped": skipped,
    }
    _write_outputs(report, images, prompts, out_dir, json_path)
    return report


def _load_prompts(pipeline: str, count: int, prompts_file: str | None) -> list[str]:
    if prompts_file:
        lines = [ln.strip() for ln in Path(prompts_file).read_text().splitlines() if ln.strip()]
        return lines[:count]
    if pipeline.startswith("testbed:"):
        try:
            from .pipelines.testbed.shapes import heldout_prompts

            return list(heldout_prompts())[:count]
        except ImportError:
            pass
    return [BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)] for i in range(count)]


# ---------------------------------------------------------------------------------------------- outputs
def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.3f}"
    return str(value)


def markdown_table(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"Pipeline `{s['pipeline']}` ({s['family']}, {s['tier']} tier), {s['steps']} steps, "
        f"{s['num_prompts']} prompts, {s['repeats']} interleaved timing repeats",
        "",
        "| method | " + " | ".join(METRIC_KEYS) + " |",
        "|---|" + "---|" * len(METRIC_KEYS),
    ]
    for label, row in report["methods"].items():
        lines.append(f"| {label} | " + " | ".join(_fmt(row[k]) for k in METRIC_KEYS) + " |")
    for label, reason in report.get("skipped", {}).items():
        lines.append(f"| {label} | skipped: {reason} |" + " |" * (len(METRIC_KEYS) - 1))
    return "\n".join(lines)


def _write_outputs(report: dict[str, Any], images: dict[str, np.ndarray], prompts: list[str], out_dir: Path,
                   json_path: str | Path | None) -> None:
    json_file = Path(json_path) if json_path else out_dir / "bench.json"
    json_file.parent.mkdir(parents=True, exist_ok=True)
    json_file.write_text(json.dumps(report, indent=2, default=_json_default))
    table = markdown_table(report)
    (out_dir / "bench.md").write_text(table + "\n")
    _image_grid(images, out_dir / "grid.png")
    _pareto_plot(report, out_dir / "pareto.png")


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def _image_grid(images: dict[str, np.ndarray], path: Path, columns: int = 8) -> None:
    from PIL import Image, ImageDraw

    rows = []
    for label, batch in images.items():
        picks = batch[:columns]
        if picks.ndim == 5:  # videos: first frame
            picks = picks[:, 0]
        row = np.concatenate(list(picks), axis=1)
        header = Image.new("RGB", (120, row.shape[0]), "white")
        ImageDraw.Draw(header).text((4, 4), label[:18], fill="black")
        rows.append(np.concatenate([np.asarray(header), row], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def _pareto_plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, row in report["methods"].items():
        if label == "baseline":
            continue
        ax.scatter(row["speedup_wall"], row["psnr_vs_baseline"])
        ax.annotate(label, (row["speedup_wall"], row["psnr_vs_baseline"]), fontsize=7)
    ax.set_xlabel("speedup (wall, x)")
    ax.set_ylabel("PSNR vs baseline (dB)")
    ax.set_title(f"{report['settings']['pipeline']} ({report['settings']['tier']} tier)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- CLI
def add_bench_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="baseline vs methods side by side: speedup, MACs, NFE, PSNR/SSIM, adherence")
    p.add_argument("--pipeline", default=None, help="pipeline name or path (default: testbed:pixart if shipped)")
    p.add_argument("--methods", default="baseline,delta_cache,fbcache,taylorseer",
                   help="comma list; name[:key=value...]; '+' combines methods in one entry")
    p.add_argument("--prompts", default="16", help="number of built-in/held-out prompts, or a text file")
    p.add_argument("--steps", type=int, default=None, help="default: the pipeline's testbed default, else 20")
    p.add_argument("--tier", choices=("quality", "speed"), default="quality")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--size", type=int, default=None, help="height = width in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--timing-batch", type=int, default=1)
    p.add_argument("--out", default="bench_out")
    p.add_argument("--json", default=None)
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .cli import default_pipeline

    prompts_file = args.prompts if not args.prompts.isdigit() else None
    report = run_bench(
        args.pipeline or default_pipeline(), args.methods,
        num_prompts=int(args.prompts) if args.prompts.isdigit() else 10_000, prompts_file=prompts_file,
        steps=args.steps, tier=args.tier, repeats=args.repeats, guidance_scale=args.guidance_scale,
        size=args.size, seed=args.seed, batch_size=args.batch_size, timing_batch=args.timing_batch,
        out_dir=args.out, json_path=args.json,
    )
    print(markdown_table(report))
    print(f"\nwrote {args.json or Path(args.out) / 'bench.json'}, {Path(args.out) / 'bench.md'}, "
          f"{Path(args.out) / 'pareto.png'}, {Path(args.out) / 'grid.png'}")
    return 0
