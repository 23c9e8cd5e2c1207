"""Where a cache's error goes: the one-step error of each CFG branch and of the guidance term, step by step.

``python -m diffusion_accel.benchmarks.cache_error --pipeline testbed:pixart --prompts 16 --method
"delta_cache:interval=2:num_cached_blocks=5:boundary=12"``

The accelerated pipeline runs as usual; at every denoiser call an untouched copy of the denoiser evaluates the very
same input (teacher forcing along the method's own trajectory), so each step's error is the method's *local* error,
not an error carried over from earlier steps. With batched classifier-free guidance, the prediction of each sample is
``g = u + s (c − u)``: an error the two branches share cancels in the guidance term ``c − u``, an error they do not
share is multiplied by the scale ``s``. Per step the table gives (means over samples of per-sample relative norms):

* ``err_uncond``, ``err_cond``, ``err_guided``: ``‖x_method − x_ref‖ / ‖x_ref‖`` of u, c and g;
* ``err_guidance``: the same for the guidance term ``d = c − u``;
* ``d_change``: how much the reference guidance term moved since the previous step, ``‖d_k − d_{k−1}‖ / ‖d_k‖``:
  what any reuse of the previous step's features has to bridge;
* ``d_share``: ``‖(s − 1) d‖ / ‖g‖``, how much of the guided prediction the guidance adds (what adaptive guidance
  drops once it switches a sample to the conditional branch).

``--method baseline`` gives only the last two: a model's cacheability profile. Guidance methods work too: adaptive
guidance returns the conditional prediction for a switched sample's unconditional one, so its ``err_guidance`` is
1 (the whole guidance term dropped) from the switch on. Works with batched CFG (PixArt, DiT,
SD3, ...) and separate CFG passes (Wan, Flux true CFG, ...) and schedulers with one model evaluation per step; a call
without CFG is refused with the fix. The untouched copy doubles the denoiser's memory.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch

from ..batching import denoiser_sample_input
from ..predictions import SPACES, convert_prediction
from .diagnosis import branches, load_setup, prediction

METRICS = ("err_uncond", "err_cond", "err_guided", "err_guidance", "d_change", "d_share")


def _norm(x: torch.Tensor) -> torch.Tensor:
    """Per-sample Euclidean norm over all but the first dimension."""
    return x.float().pow(2).sum(tuple(range(1, x.ndim))).sqrt()


def _relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample ``‖a − b‖ / ‖b‖``."""
    return _norm(a - b) / _norm(b).clamp_min(1e-12)


class StepErrorRecorder:
    """A forward hook for the accelerated denoiser that re-runs an untouched copy on each call's input.

    ``layout`` is the pipeline's CFG layout: ``"batched"`` (one call per step on ``[uncond; cond]`` or the reverse)
    or ``"separate"`` (two calls per step, conditional first, as every Diffusers separate-pass pipeline does; the
    two are paired by their equal timestep). ``reset()`` before every pipeline call and ``finish()`` after it;
    ``rows[k]`` then holds the per-sample metrics of step ``k``.
    """

    def __init__(self, reference: torch.nn.Module, adapter: Any, guidance_scale: float, scheduler: Any,
                 space: str = "x0", layout: str = "batched") -> None:
        if space not in ("native", *SPACES):
            raise ValueError(f"Unknown space {space!r}; choose 'native' or one of {SPACES}.")
        if layout not in ("batched", "separate"):
            raise ValueError(f"Unknown CFG layout {layout!r}; cache_error needs 'batched' or 'separate'.")
        self.reference = reference
        self.adapter = adapter
        self.scale = guidance_scale
        self.scheduler = scheduler
        self.space = space
        self.layout = layout
        self.rows: dict[int, dict[str, list[float]]] = {}
        self.steps = 0
        self._previous_d: torch.Tensor | None = None
        self._pending: tuple[float, torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def _timestep(args: tuple, kwargs: dict) -> float:
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        return float(torch.as_tensor(timestep).flatten()[0])

    def _in_space(self, pred: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """``pred`` in the comparison space: the guided combination is linear and ``x_t`` is shared by both
        branches, so guidance and conversion commute."""
        if self.space == "native":
            return pred
        x_t = denoiser_sample_input(args, kwargs)
        t = self.adapter.timestep_offset + self._timestep(args, kwargs) * self.adapter.timestep_scale
        return convert_prediction(pred, x_t, self.adapter.prediction, self.space, scheduler=self.scheduler,
                                  timestep=t, sigma=None)

    def reset(self) -> None:
        self.steps = 0
        self._previous_d = None
        self._pending = None

    def finish(self) -> None:
        if self._pending is not None:
            raise ValueError(_SKIPPED_PASS)

    @torch.no_grad()
    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        ref_pred = self._in_space(prediction(self.reference(*args, **kwargs), self.adapter), args, kwargs)
        pred = self._in_space(prediction(output, self.adapter), args, kwargs)
        if pred.shape != ref_pred.shape:
            raise ValueError(_SKIPPED_PASS)
        if self.layout == "batched":
            self._record(*branches(pred, self.adapter), *branches(ref_pred, self.adapter))
            return
        timestep = self._timestep(args, kwargs)
        if self._pending is None:
            self._pending = (timestep, pred, ref_pred)
            return
        first_timestep, cond, cond_ref = self._pending
        if timestep != first_timestep:
            raise ValueError(_SKIPPED_PASS)
        self._pending = None
        self._record(pred, cond, ref_pred, cond_ref)

    def _record(self, u: torch.Tensor, c: torch.Tensor, u_ref: torch.Tensor, c_ref: torch.Tensor) -> None:
        s = self.scale
        g, g_ref = u + s * (c - u), u_ref + s * (c_ref - u_ref)
        d, d_ref = c - u, c_ref - u_ref
        values = {
            "err_uncond": _relative(u, u_ref), "err_cond": _relative(c, c_ref), "err_guided": _relative(g, g_ref),
            "err_guidance": _relative(d, d_ref),
            "d_change": (_relative(self._previous_d, d_ref) if self._previous_d is not None
                         else torch.full((len(d_ref),), float("nan"))),
            "d_share": _norm((s - 1) * d_ref) / _norm(g_ref).clamp_min(1e-12),
        }
        row = self.rows.setdefault(self.steps, {k: [] for k in METRICS})
        for key, value in values.items():
            row[key].extend(value.tolist())
        self._previous_d = d_ref
        self.steps += 1


_SKIPPED_PASS = ("The method changed the denoiser's batch or skipped a CFG pass without returning a prediction in "
                 "its place; cache_error needs every call to return the full batch, as this project's methods do.")


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v == v]
    return sum(finite) / len(finite) if finite else float("nan")


def measure_cache_error(pipeline: str, method: str, num_prompts: int = 16, steps: int | None = None,
                        guidance_scale: float | None = None, seed: int = 0, batch_size: int = 8,
                        space: str = "x0") -> dict[str, Any]:
    """Run ``method`` (a bench method spec, or ``"baseline"``) on ``pipeline`` and return per-step error metrics,
    with predictions compared in ``space`` (``"x0"`` as adaptive guidance does, ``"eps"``, ``"velocity"`` or the
    model's ``"native"`` output)."""
    import diffusion_accel as da

    from ..bench import generate, parse_method_specs

    if space not in ("native", *SPACES):
        raise ValueError(f"Unknown space {space!r}; choose 'native' or one of {SPACES}.")
    specs = parse_method_specs(method)
    if len(specs) > 2:
        raise ValueError(f"cache_error measures one method at a time, got {[s.label for s in specs[1:]]}.")
    spec = specs[-1]
    setup = load_setup(pipeline, num_prompts, steps, guidance_scale, seed)
    pipe, adapter, prompts, scale = setup.pipe, setup.adapter, setup.prompts, setup.scale
    layout = adapter.cfg_mode(setup.probe)
    if layout == "none":
        raise ValueError(f"cache_error compares CFG branches, but this {adapter.family} call runs no CFG; pass "
                         f"--guidance-scale > 1 (and a negative prompt where the pipeline needs one).")

    denoiser = adapter.get_denoiser(pipe)
    recorder = StepErrorRecorder(copy.deepcopy(denoiser).eval(), adapter, scale, pipe.scheduler, space, layout)
    handle = denoiser.register_forward_hook(recorder, with_kwargs=True)
    try:
        with da.accelerated(pipe, *spec.configs):
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start:start + batch_size]
                kwargs = setup.call_kwargs(batch, [seed + start + i for i in range(len(batch))])
                kwargs.update(spec.call_overrides)
                recorder.reset()
                generate(pipe, kwargs)
                recorder.finish()
                expected = int(kwargs["num_inference_steps"])
                if recorder.steps != expected:
                    raise NotImplementedError(
                        f"The scheduler evaluated the model {recorder.steps} times for {expected} steps; cache_error "
                        "needs one evaluation per step (DPM-Solver, DDIM, Euler), not Heun-style schedulers.")
    finally:
        handle.remove()

    per_step = [{"step": k, **{key: _mean(vals) for key, vals in recorder.rows[k].items()}}
                for k in sorted(recorder.rows)]
    approximated = [row for row in per_step if row["err_guided"] > 1e-6]

    def summary(rows: list[dict[str, Any]]) -> dict[str, float]:
        return {key: _mean([row[key] for row in rows]) for key in METRICS}

    return {
        "settings": {"pipeline": pipeline, "method": spec.label, "num_prompts": len(prompts),
                     "steps": len(per_step), "guidance_scale": scale, "seed": seed, "space": space},
        "per_step": per_step,
        "approximated_steps": [row["step"] for row in approximated],
        "mean_over_approximated_steps": summary(approximated) if approximated else None,
        "mean_over_all_steps": summary(per_step),
    }


def markdown_table(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [f"`{s['method']}` on `{s['pipeline']}`, {s['num_prompts']} prompts, {s['steps']} steps, "
             f"CFG {s['guidance_scale']:g}: one-step relative errors (teacher-forced) and the guidance term, in "
             f"{s['space']} space", "",
             "| step | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for row in report["per_step"]:
        lines.append(f"| {row['step']} | " + " | ".join(f"{row[k]:.3f}" for k in METRICS) + " |")
    for name in ("mean_over_approximated_steps", "mean_over_all_steps"):
        if report[name]:
            lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(f"{report[name][k]:.3f}" for k in METRICS)
                         + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ..loading import default_pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=None)
    parser.add_argument("--method", default="baseline", help="one bench method spec, e.g. delta_cache:interval=2")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--space", default="x0", help="x0 (default), eps, velocity or native")
    parser.add_argument("--out", default="bench_out/cache_error")
    args = parser.parse_args(argv)
    report = measure_cache_error(args.pipeline or default_pipeline(), args.method, args.prompts, args.steps,
                                 args.guidance_scale, args.seed, space=args.space)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = report["settings"]["method"].replace(":", "_").replace("=", "") + f"_{args.space}"
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    table = markdown_table(report)
    (out / f"{name}.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
