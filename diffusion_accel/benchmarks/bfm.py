"""Blockwise Flow Matching at equal training budget, and the method hooks on top of it, in one bench run.

``python -m diffusion_accel.benchmarks.bfm --runs runs/bfm``

1. Equal budget: the models in ``--runs`` were trained by ``diffusion-accel train bfm`` with the same data, batch,
   steps (so the same images seen), optimizer and timestep sampling (see :data:`ROWS` for the flags): the
   monolithic flow model (the testbed's own ``FluxTransformer2DModel`` architecture), BFM with M ∈ {1, 2, 4}
   segments with semantic feature guidance (SG), M = 4 without it, and M = 4 with the feature residual network
   (FRA, ``diffusion-accel train bfm_frn``). The shipped ``testbed:flow`` (far more training, on a GPU) is the
   quality ceiling, and the monolithic model at half its steps (:data:`FEWER_STEPS`) is the equal-MACs baseline:
   as many denoiser MACs per image as BFM M = 4 + SG, bought with fewer steps instead of blockwise segments. Each
   model samples 64 held-out prompts with its own sampler contract (28 Euler steps, true CFG 4.0, seed = prompt
   index). Columns: denoiser MACs per image (``torch.utils.flop_counter`` over whole calls), wall seconds per image
   (one-prompt calls, every model once per round, ``--repeats`` rounds, median), adherence (shapes-net, Wilson 95 %
   interval; shapes-judge beside it, which the SG variants were aligned to), FID-shapes.
2. Stacking: Δ-cache and adaptive guidance applied to ``testbed:bfm`` (the M = 4 model) with and without FRA, by
   the side-by-side bench (same seeds, quality vs its own un-accelerated output).

Writes ``bfm.json`` / ``bfm.md`` and ``pareto_bfm.png`` (MACs per image vs FID-shapes) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: (label, run folder under --runs or a pipeline name, the training flags that differ from the flow-bfm preset).
ROWS: tuple[tuple[str, str, str], ...] = (
    ("testbed:flow (shipped, GPU-trained: ceiling)", "testbed:flow", "-"),
    ("monolithic, equal budget", "monolithic", "--monolithic"),
    ("BFM M=1 + SG", "k1", "--num_segments 1"),
    ("BFM M=2 + SG", "k2", "--num_segments 2"),
    ("BFM M=4 + SG", "k4", "(the preset)"),
    ("BFM M=4, no SG", "k4-nosg", "--alignment_layers 0 --alignment_single_layers 0"),
    ("BFM M=4 + SG + FRA", "k4-frn", "then bfm_frn --config flow-bfm-frn"),
)
#: Rows that sample a run of :data:`ROWS` with fewer steps than its contract: (label, run, steps). 14 of the
#: monolithic model's 28 steps cost what BFM M = 4 + SG's 28 do (half the velocity blocks run per step).
FEWER_STEPS: tuple[tuple[str, str, int], ...] = (
    ("monolithic, equal budget, 14 steps (equal MACs)", "monolithic", 14),
)
#: The equal-budget row BFM is judged against, and the claim: BFM at >= this many times fewer MACs per image with
#: adherence and FID-shapes at least as good.
REFERENCE = "monolithic, equal budget"
MACS_FACTOR = 2.0
STACKED = ("delta_cache", "adaptive_guidance")


def _pipeline_name(runs: Path, entry: str) -> str:
    return entry if entry.startswith("testbed:") else str(runs / entry)


def _load(name: str):
    from ..loading import load_pipeline

    pipe = load_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe: Any, prompts: list[str], seeds: list[int], steps: int | None = None) -> dict[str, Any]:
    """The pipeline's sampler contract for ``prompts`` (``steps`` overrides its step count)."""
    from ..pipelines.contract import contract_of

    contract = contract_of(pipe)
    negative = [contract.get("negative_prompt", "")] * len(prompts)
    call = {**contract, "prompt": list(prompts), "negative_prompt": negative,
            "generator": [torch.Generator().manual_seed(s) for s in seeds]}
    if steps is not None:
        call["num_inference_steps"] = steps
    return call


def quality_row(pipe: Any, prompts: list[str], batch: int = 16, steps: int | None = None) -> dict[str, Any]:
    """Images of every prompt (seed = index), their adherence by both judges, FID-shapes, MACs per image."""
    from ..bench import generate_counting_macs, to_uint8
    from ..eval.paired import proportion_ci
    from ..pipelines.testbed.shapes_net import adherence, fid_shapes

    chunks, macs = [], 0.0
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        out, m = generate_counting_macs(pipe, _call(pipe, chunk, list(range(i, i + len(chunk))), steps))
        chunks.append(to_uint8(out))
        macs += m
    images = np.concatenate(chunks)
    row: dict[str, Any] = {"macs_per_image": macs / len(prompts), "fid_shapes": fid_shapes(list(images))}
    for judge in ("shapes-net", "shapes-judge"):
        score, flags = adherence(list(images), prompts, net=judge, return_per_image=True)
        row[f"adherence_{judge}"] = score
        row[f"adherence_{judge}_ci"] = proportion_ci(int(sum(flags)), len(flags))
    row["_images"] = images
    return row


def wall_per_image(pipes: dict[str, Any], prompt: str, repeats: int,
                   steps: dict[str, int] | None = None) -> dict[str, float]:
    """Median seconds of a one-prompt call per model (``steps``: per label, an override of its step count), the
    models interleaved in every round."""
    from ..bench import generate

    steps = steps or {}
    times: dict[str, list[float]] = {label: [] for label in pipes}
    for label, pipe in pipes.items():  # warm-up
        generate(pipe, _call(pipe, [prompt], [0], steps.get(label)))
    for _ in range(repeats):
        for label, pipe in pipes.items():
            start = time.perf_counter()
            generate(pipe, _call(pipe, [prompt], [0], steps.get(label)))
            times[label].append(time.perf_counter() - start)
    return {label: float(np.median(t)) for label, t in times.items()}


def verdict(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each BFM row against the equal-budget monolithic model: MACs factor, adherence and FID-shapes."""
    ref = rows.get(REFERENCE)
    if ref is None:
        return {}
    out = {}
    for label, row in rows.items():
        if not label.startswith("BFM"):
            continue
        factor = ref["macs_per_image"] / row["macs_per_image"]
        out[label] = {"macs_factor": factor,
                      "adherence_diff_points": 100 * (row["adherence_shapes-net"] - ref["adherence_shapes-net"]),
                      "fid_ratio": row["fid_shapes"] / ref["fid_shapes"],
                      "meets_claim": bool(factor >= MACS_FACTOR
                                          and row["adherence_shapes-net"] >= ref["adherence_shapes-net"]
                                          and row["fid_shapes"] <= ref["fid_shapes"])}
        for equal_macs, _, _ in FEWER_STEPS:  # the same model at about this row's cost, by fewer steps
            if equal_macs in rows:
                other = rows[equal_macs]
                out[label][f"vs {equal_macs}"] = {
                    "macs_over_it": row["macs_per_image"] / other["macs_per_image"],
                    "adherence_diff_points": 100 * (row["adherence_shapes-net"] - other["adherence_shapes-net"]),
                    "fid_ratio": row["fid_shapes"] / other["fid_shapes"]}
    return out


def pareto(rows: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, (label, row) in enumerate(rows.items()):
        ax.scatter(row["macs_per_image"] / 1e9, row["fid_shapes"], s=60,
                   marker="*" if label.startswith("testbed") else ("s" if label.startswith("mono") else "o"))
        ax.annotate(f"{index}: {label}", (row["macs_per_image"] / 1e9, row["fid_shapes"]), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("denoiser GMACs per image (28 steps, true CFG)")
    ax.set_ylabel("FID-shapes (lower is better)")
    ax.set_title("Blockwise Flow Matching at equal training budget")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(rows: dict[str, dict[str, Any]], flags: dict[str, str]) -> str:
    lines = ["| # | model | training flags | GMACs / image | wall s / image | adherence (shapes-net) | "
             "adherence (shapes-judge) | FID-shapes |", "|---|---|---|---|---|---|---|---|"]
    for index, (label, row) in enumerate(rows.items()):
        lo, hi = row["adherence_shapes-net_ci"]
        lines.append(f"| {index} | {label} | `{flags[label]}` | {row['macs_per_image'] / 1e9:.3f} | "
                     f"{row['wall_seconds']:.3f} | {100 * row['adherence_shapes-net']:.1f} % [{100 * lo:.1f}, "
                     f"{100 * hi:.1f}] | {100 * row['adherence_shapes-judge']:.1f} % | {row['fid_shapes']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ..bench import markdown_table, run_bench
    from ..pipelines.testbed.shapes import heldout_prompts

    parser = argparse.ArgumentParser(prog="python -m diffusion_accel.benchmarks.bfm",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/bfm", help="folder holding the equal-budget runs (see ROWS)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-stacking", action="store_true", help="skip Δ-cache / AG on testbed:bfm")
    parser.add_argument("--out", default="docs/results/bfm")
    args = parser.parse_args(argv)
    runs, out = Path(args.runs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = list(heldout_prompts())[:args.prompts]

    present, missing = [], []
    for label, entry, flag in ROWS:
        name = _pipeline_name(runs, entry)
        if entry.startswith("testbed:") or (Path(name) / "model_index.json").exists():
            present.append((label, name, flag))
        else:
            missing.append(label)
    loaded = {name: _load(name) for _, name, _ in present}  # one model per run, however many rows sample it
    steps: dict[str, int] = {}
    for label, entry, count in FEWER_STEPS:  # the same loaded model, sampled with fewer steps, after its row
        name = _pipeline_name(runs, entry)
        at = next((i for i, (_, row_name, _) in enumerate(present) if row_name == name), None)
        if at is not None:
            steps[label] = count
            present.insert(at + 1, (label, name, f"{present[at][2]}, sampled with {count} steps"))
    pipes = {label: loaded[name] for label, name, _ in present}
    rows: dict[str, dict[str, Any]] = {}
    for label in pipes:
        rows[label] = quality_row(pipes[label], prompts, steps=steps.get(label))
        print(f"{label}: adherence {100 * rows[label]['adherence_shapes-net']:.1f} %, FID-shapes "
              f"{rows[label]['fid_shapes']:.1f}, {rows[label]['macs_per_image'] / 1e9:.3f} GMACs", flush=True)
    for label, seconds in wall_per_image(pipes, prompts[0], args.repeats, steps).items():
        rows[label]["wall_seconds"] = seconds
    from PIL import Image

    for index, row in enumerate(rows.values()):  # the first 16 prompts of each row, named by its table number
        images = row.pop("_images")
        if len(images) < 16:
            continue
        grid = images[:16].reshape(2, 8, *images.shape[1:]).transpose(0, 2, 1, 3, 4).reshape(
            2 * images.shape[1], 8 * images.shape[2], 3)
        Image.fromarray(grid).save(out / f"grid_{index}.png")
    flags = {label: flag for label, _, flag in present}
    report: dict[str, Any] = {"prompts": len(prompts), "runs": str(runs), "rows": rows, "missing_rows": missing,
                              "training": {label: _training_record(name) for label, name, _ in present},
                              "verdict": verdict(rows)}
    table = markdown(rows, flags)
    pareto(rows, out / "pareto_bfm.png")

    (out / "bfm.json").write_text(json.dumps(report, indent=2, default=_json_default))  # before the long part

    stacked: dict[str, Any] = {}
    if not args.no_stacking:
        specs = ",".join(["baseline", *STACKED])
        prompts_file = out / "prompts.txt"  # the held-out prompts for a folder too (not only testbed: names)
        prompts_file.write_text("\n".join(prompts) + "\n")
        for tag, name in (("testbed:bfm", "testbed:bfm"), ("testbed:bfm + FRA", str(runs / "k4-frn"))):
            if name != "testbed:bfm" and not (Path(name) / "model_index.json").exists():
                continue
            bench = run_bench(name, specs, num_prompts=len(prompts), prompts_file=str(prompts_file), repeats=3,
                              size=64, steps=28, guidance_scale=4.0,
                              out_dir=out / tag.replace(" ", "").replace("+", "_").replace(":", "_"),
                              shape_metrics=True, cache_dir=None, batch_size=16)
            stacked[tag] = bench
            table += f"\n\n**{tag}: Δ-cache and AG on top**\n\n" + markdown_table(bench)
    report["stacking"] = stacked
    (out / "bfm.json").write_text(json.dumps(report, indent=2, default=_json_default))
    verdict_lines = [f"- {label}: {v['macs_factor']:.2f}x fewer MACs than the equal-budget monolithic model, "
                     f"adherence {v['adherence_diff_points']:+.1f} points, FID-shapes x{v['fid_ratio']:.2f}: "
                     f"claim {'met' if v['meets_claim'] else 'NOT met'}" + "".join(
                         f"; vs the {other} (at {c['macs_over_it']:.2f}x its MACs): adherence "
                         f"{c['adherence_diff_points']:+.1f} points, FID-shapes x{c['fid_ratio']:.2f}"
                         for other, _, _ in FEWER_STEPS if (c := v.get(f"vs {other}")))
                     for label, v in report["verdict"].items()]
    text = table + "\n\n" + "\n".join(verdict_lines) + ("\n\nmissing runs: " + ", ".join(missing) if missing else "")
    (out / "bfm.md").write_text(text + "\n")
    print(text)
    return 0


def _training_record(name: str) -> dict[str, Any] | None:
    path = Path(name) / "train_metrics.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return {k: record.get(k) for k in ("stage", "steps", "global_batch", "images_seen", "parameters",
                                       "train_seconds_this_session")}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


if __name__ == "__main__":
    raise SystemExit(main())
