"""Control for the quality benchmarks: how much a *random* error of a given size costs on a pipeline's metrics.

``python -m diffusion_accel.benchmarks.perturbation_control --pipeline testbed:pixart --prompts 64``

An accelerated pipeline loses PSNR and (on the testbed) prompt adherence. Is a loss the method's error, or would any
error of that size cost as much (a fragile metric)? This adds random noise of relative size ``r`` to the guided
prediction at chosen steps and reports PSNR, adherence and FID-shapes against the untouched run, so a method's row
in the bench can be read against a random error with the same PSNR.

Noise kinds: ``white`` (i.i.d. Gaussian) and ``channel`` (one offset per latent channel, constant over space: a
colour cast). Per sample it is scaled to ``r`` times the RMS of that sample's guided prediction; with batched CFG the
same noise goes to both branches, so ``u + s (c − u)`` receives it exactly once. Step sets: ``odd`` (every other
step, as a cache with interval 2 approximates), ``early`` (first half), ``late`` (second half), ``all``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..batching import output_sample, with_sample
from .diagnosis import branches, load_setup, prediction

KINDS = ("white", "channel")
STEP_SETS = ("odd", "early", "late", "all")


def step_set(name: str, num_steps: int) -> set[int]:
    """The step indices (0 = noisiest) of a named set."""
    sets = {"odd": set(range(1, num_steps, 2)), "early": set(range(num_steps // 2)),
            "late": set(range(num_steps // 2, num_steps)), "all": set(range(num_steps))}
    if name not in sets:
        raise ValueError(f"Unknown step set {name!r}; choose one of {STEP_SETS}.")
    return sets[name]


@dataclass
class PredictionNoise:
    """A denoiser forward hook adding scaled noise to the prediction at ``steps`` (one call per step).

    ``kind`` and ``size`` (r) as in the module docstring; ``seed`` makes the noise of step k reproducible.
    """

    adapter: Any
    kind: str
    size: float
    steps: set[int]
    guidance_scale: float
    cfg: bool
    seed: int = 1000
    calls: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Unknown noise kind {self.kind!r}; choose one of {KINDS}.")
        if self.size < 0:
            raise ValueError(f"The noise size r must be >= 0, got {self.size}.")

    def reset(self) -> None:
        self.calls = 0

    @torch.no_grad()
    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        step, self.calls = self.calls, self.calls + 1
        if step not in self.steps or self.size == 0:
            return output
        pred = prediction(output, self.adapter)
        if self.cfg:
            u, c = branches(pred, self.adapter)
            guided = u + self.guidance_scale * (c - u)
        else:
            guided = pred
        generator = torch.Generator().manual_seed(self.seed + step)
        shape = guided.shape if self.kind == "white" else (*guided.shape[:2], *([1] * (guided.ndim - 2)))
        noise = torch.randn(shape, generator=generator).to(guided).expand_as(guided)
        dims = tuple(range(1, guided.ndim))
        rms = guided.float().pow(2).mean(dims, keepdim=True).sqrt()
        noise = noise * (self.size * rms / noise.float().pow(2).mean(dims, keepdim=True).sqrt().clamp_min(1e-12))
        if self.cfg:
            noise = torch.cat([noise, noise])
        perturbed = output_sample(output).clone()
        perturbed[:, :pred.shape[1]] += noise.to(perturbed.dtype)
        return with_sample(output, perturbed)


def run_control(pipeline: str, kinds: list[str], step_sets: list[str], sizes: list[float], num_prompts: int = 64,
                steps: int | None = None, guidance_scale: float | None = None, seed: int = 0,
                batch_size: int = 8) -> dict[str, Any]:
    """The untouched run, then one run per (kind, step set, size); metrics against the untouched run."""
    from ..bench import fidelity, generate, to_uint8

    for kind in kinds:  # bad options fail before minutes of generation, not after the untouched run
        for size in sizes:
            PredictionNoise(None, kind, size, set(), 1.0, cfg=False)
    for name in step_sets:
        step_set(name, 1)
    setup = load_setup(pipeline, num_prompts, steps, guidance_scale, seed)
    pipe, adapter, prompts, probe = setup.pipe, setup.adapter, setup.prompts, setup.probe
    cfg_mode = adapter.cfg_mode(probe)
    if cfg_mode == "separate":
        raise NotImplementedError("perturbation_control adds noise to a batched-CFG or unguided prediction; "
                                  f"{adapter.family} runs separate CFG passes. Use guidance 1 or a batched pipeline.")
    num_steps = int(probe["num_inference_steps"])
    denoiser = adapter.get_denoiser(pipe)

    def run(noise: PredictionNoise | None) -> np.ndarray:
        handle = denoiser.register_forward_hook(noise, with_kwargs=True) if noise is not None else None
        try:
            chunks = []
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start:start + batch_size]
                if noise is not None:
                    noise.reset()
                chunks.append(to_uint8(generate(pipe, setup.call_kwargs(
                    batch, [seed + start + i for i in range(len(batch))]))))
            return np.concatenate(chunks)
        finally:
            if handle is not None:
                handle.remove()

    from ..eval.paired import paired_summary

    reference = run(None)
    testbed = pipeline.startswith("testbed:")
    ref_adherence, ref_flags, ref_fid = _testbed_metrics(reference, prompts) if testbed else (None, None, None)
    rows = [{"kind": "none", "steps": "-", "size": 0.0, "psnr_vs_baseline": float("inf"), "adherence": ref_adherence,
             "fid_shapes": ref_fid, **(paired_summary(ref_flags, ref_flags) if testbed else {})}]
    scale = setup.scale
    for kind in kinds:
        for name in step_sets:
            for size in sizes:
                images = run(PredictionNoise(adapter, kind, size, step_set(name, num_steps), scale,
                                     cfg=cfg_mode == "batched"))
                row: dict[str, Any] = {"kind": kind, "steps": name, "size": size,
                                       "psnr_vs_baseline": fidelity(images, reference)[0], "adherence": None,
                                       "fid_shapes": None, "lost": None, "gained": None}
                if testbed:
                    adherence, flags, fid = _testbed_metrics(images, prompts)
                    # lost / gained and the paired difference's interval: the same statistics as the bench
                    row.update(adherence=adherence, fid_shapes=fid, **paired_summary(ref_flags, flags))
                rows.append(row)
                print(row, flush=True)
    return {"settings": {"pipeline": pipeline, "num_prompts": len(prompts), "steps": num_steps,
                         "guidance_scale": scale, "seed": seed},
            "rows": rows}


def _testbed_metrics(images: np.ndarray, prompts: list[str]) -> tuple[float, list[bool], float]:
    """Adherence, its per-image verdicts (one classifier pass) and FID-shapes of testbed images."""
    from ..pipelines.testbed.shapes_net import adherence, fid_shapes

    score, flags = adherence(list(images), prompts, return_per_image=True)
    return score, flags, fid_shapes(list(images))


def _cell(row: dict[str, Any], key: str, spec: str) -> str:
    value = row.get(key)
    return "" if value is None else format(value, spec)


def markdown_table(report: dict[str, Any]) -> str:
    from ..eval.paired import format_difference

    s = report["settings"]
    lines = [f"Random prediction noise on `{s['pipeline']}`, {s['num_prompts']} prompts, {s['steps']} steps, "
             f"CFG {s['guidance_scale']:g}", "",
             "| noise | steps | r | psnr_vs_baseline | adherence | lost | gained | adherence_diff_pts | fid_shapes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        diff = format_difference(row) if row.get("ci_low") is not None else ""
        cells = [_cell(row, "psnr_vs_baseline", ".2f"), _cell(row, "adherence", ".3f"), _cell(row, "lost", "d"),
                 _cell(row, "gained", "d"), diff, _cell(row, "fid_shapes", ".1f")]
        lines.append(f"| {row['kind']} | {row['steps']} | {row['size']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ..loading import default_pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=None)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--kinds", default="white,channel")
    parser.add_argument("--step-sets", default="odd,early,late")
    parser.add_argument("--sizes", default="0.02,0.05,0.1,0.2", help="relative noise sizes r")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_out/perturbation_control")
    args = parser.parse_args(argv)
    report = run_control(args.pipeline or default_pipeline(), args.kinds.split(","), args.step_sets.split(","),
                         [float(x) for x in args.sizes.split(",")], args.prompts, args.steps, args.guidance_scale,
                         args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "perturbation_control.json").write_text(json.dumps(report, indent=2))
    table = markdown_table(report)
    (out / "perturbation_control.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
