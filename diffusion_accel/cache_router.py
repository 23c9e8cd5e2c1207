"""A learned cache router (HarmoniCa, arXiv 2410.01723; Learning-to-Cache, arXiv 2406.01733) as an artefact.

The router is the papers' input-independent table of logits θ ∈ R^{T×U}: one row per sampling step k (generation
order, k = 0 the noisiest; the papers index the other way round), one column per routing unit u (a block's gated
branch or a whole block, :meth:`~diffusion_accel.pipelines.adapters.ModelAdapter.routing_units`). At inference
unit u is computed at step k iff its score r_{k,u} = σ(θ_{k,u}) > τ, else its cached output is reused; the first
step always computes (the papers' fixed router). The schedule is static, so its cost is known before sampling.

On disk (never pickle): ``router.safetensors`` holds ``logits`` [T, U] float32 and ``trainable`` [T, U] (cells the
trainer may change; the others are pinned to compute); ``router_config.json`` holds the sampler contract the router
was trained under (pipeline and denoiser class, model depth, unit names, step count, scheduler class and config,
timesteps, guidance scale) and the threshold τ its trainer chose. A router is refused, with the mismatch named,
on a pipeline or call that differs in any of these.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .routed_units import is_whole_block

FORMAT = "diffusion-accel-cache-router"
WEIGHTS_NAME = "router.safetensors"
CONFIG_NAME = "router_config.json"
#: Logit of a pinned "always compute" cell (σ = 0.99995; above any threshold a router uses).
PINNED_LOGIT = 10.0


@dataclass
class CacheRouter:
    """Logits θ [T, U] and the contract they were trained under.

    Attributes:
        logits: θ, [T, U]; row k is sampling step k in generation order.
        trainable: cells the trainer optimises; the others (the first step, L2C's full steps) always compute.
        config: the contract (see the module docstring) plus ``threshold`` (τ) and training facts.
    """

    logits: torch.Tensor
    trainable: torch.Tensor
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_pipeline(cls, pipe: Any, num_inference_steps: int, guidance_scale: float | None, *,
                     objective: str = "harmonica", logits: torch.Tensor | None = None,
                     trainable: torch.Tensor | None = None, **facts: Any) -> CacheRouter:
        """A router for ``pipe`` sampled with ``num_inference_steps`` at ``guidance_scale``: zero logits unless
        given, every cell trainable but the first step's, and the pipeline's contract in its config."""
        from .pipelines.adapters import find_adapter
        from .pipelines.contract import pipeline_class

        adapter = find_adapter(pipe)
        units = [name for name, _ in adapter.routing_units(pipe)]
        feeders = {unit: [name for name, _ in found] for unit, found in adapter.unit_feeders(pipe).items()}
        shape = (num_inference_steps, len(units))
        if trainable is None:
            trainable = torch.ones(shape, dtype=torch.bool)
            trainable[0] = False
        config = {
            "objective": objective, "pipeline_class": pipeline_class(pipe).__name__,
            "denoiser_class": type(adapter.get_denoiser(pipe)).__name__, "family": adapter.family,
            "depth": len(adapter.get_blocks(pipe)), "units": units,
            "unit_kind": ["block" if is_whole_block(u) else "branch" for u in units], "unit_feeders": feeders,
            "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
            "scheduler_class": type(pipe.scheduler).__name__, "scheduler_config": dict(pipe.scheduler.config),
            "threshold": 0.1, **facts,
        }
        logits = torch.zeros(shape) if logits is None else logits.detach().float().cpu()
        return cls(torch.where(trainable, logits, torch.full(shape, PINNED_LOGIT)), trainable.bool(), config)

    # ------------------------------------------------------------------ shape and scores
    @property
    def num_steps(self) -> int:
        return int(self.logits.shape[0])

    @property
    def units(self) -> list[str]:
        return list(self.config.get("units", []))

    def scores(self) -> torch.Tensor:
        """r = σ(θ) with pinned cells at 1."""
        return torch.where(self.trainable, torch.sigmoid(self.logits.float()), torch.ones_like(self.logits.float()))

    def decisions(self, threshold: float) -> torch.Tensor:
        """Bool [T, U]: True where the unit is computed at that step (score > τ; the first step always)."""
        compute = self.scores() > threshold
        compute[0] = True
        return compute

    # ------------------------------------------------------------------ cost
    def unit_macs(self) -> tuple[torch.Tensor, float]:
        """Per-unit share of one full denoiser forward's MACs and the share outside every unit (the trainer
        measures them with ``torch.utils.flop_counter`` on one plain pipeline call)."""
        shares = self.config.get("unit_macs_share")
        if shares is None:
            raise ValueError("this router file records no unit MAC shares (unit_macs_share); pass threshold= or "
                             "cache_rate= instead of target_macs_ratio=.")
        return torch.tensor(shares, dtype=torch.float64), float(self.config.get("rest_macs_share", 0.0))

    @staticmethod
    def predicted_macs(decisions: torch.Tensor, unit_macs: torch.Tensor, rest_macs: float) -> float:
        """MACs of one call under ``decisions``: every forward pays ``rest_macs`` plus its computed units."""
        return float(decisions.shape[0] * rest_macs + (decisions.double() * unit_macs.double()).sum())

    def macs_ratio(self, threshold: float) -> float:
        shares, rest = self.unit_macs()
        full = torch.ones(self.logits.shape, dtype=torch.bool)
        return self.predicted_macs(full, shares, rest) / self.predicted_macs(self.decisions(threshold), shares, rest)

    def cache_rate(self, threshold: float) -> float:
        """Fraction of the (step, unit) cells reused (the papers' cache usage ratio, CUR)."""
        return float(1.0 - self.decisions(threshold).double().mean())

    def set_threshold(self, threshold: float) -> None:
        """Store τ in the config with the MACs ratio and cache rate it gives (what :meth:`save` writes)."""
        self.config.update(threshold=threshold, macs_ratio=self.macs_ratio(threshold),
                           cache_rate=self.cache_rate(threshold))

    def threshold_for(self, *, macs_ratio: float | None = None, cache_rate: float | None = None) -> float:
        """The τ that reuses the fewest lowest-scoring trainable cells reaching the target MACs ratio (or cache
        usage ratio); a ``ValueError`` naming the reachable maximum when even reusing every trainable cell falls
        short."""
        if (macs_ratio is None) == (cache_rate is None):
            raise ValueError("give exactly one of macs_ratio and cache_rate")
        scores = self.scores()
        candidates = torch.sort(scores[self.trainable & (torch.arange(self.num_steps)[:, None] > 0)]).values
        if candidates.numel() == 0:
            raise ValueError("this router has no trainable cells to reuse")

        def reached(tau: float) -> float:
            return self.macs_ratio(tau) if macs_ratio is not None else self.cache_rate(tau)

        target = macs_ratio if macs_ratio is not None else cache_rate
        lo, hi = 0, candidates.numel() - 1
        if reached(float(candidates[hi])) < target:
            best = reached(float(candidates[hi]))
            what = "MACs ratio" if macs_ratio is not None else "cache rate"
            raise ValueError(f"this router reaches at most a {what} of {best:.3f} (every trainable cell reused), "
                             f"below the target {target}; lower the target or train with a larger "
                             "--cache_weight (β).")
        while lo < hi:  # the fewest reused cells whose score ≤ τ reach the target
            mid = (lo + hi) // 2
            if reached(float(candidates[mid])) >= target:
                hi = mid
            else:
                lo = mid + 1
        return float(candidates[lo])

    # ------------------------------------------------------------------ contract
    def mismatch(self, pipe: Any, adapter: Any, units: list[str]) -> str | None:
        """Why this router cannot drive ``pipe`` (``None`` when it fits)."""
        from .pipelines.contract import pipeline_class

        cfg = self.config
        denoiser = adapter.get_denoiser(pipe)
        checks = [
            ("pipeline class", cfg.get("pipeline_class"), pipeline_class(pipe).__name__),
            ("denoiser class", cfg.get("denoiser_class"), type(denoiser).__name__),
            ("model depth (blocks)", cfg.get("depth"), len(adapter.get_blocks(pipe))),
            ("scheduler", cfg.get("scheduler_class"), type(pipe.scheduler).__name__),
        ]
        for what, trained, here in checks:
            if trained is not None and trained != here:
                return (f"the router was trained for {what} {trained!r}, this pipeline has {here!r}; train one for "
                        f"it: diffusion-accel train {cfg.get('objective', 'harmonica')} --pretrained_teacher_model "
                        "<this pipeline> --output_dir <folder>")
        if cfg.get("units") is not None and list(cfg["units"]) != units:
            trained = list(cfg["units"])
            first = next((i for i, (a, b) in enumerate(zip(trained, units, strict=False)) if a != b),
                         min(len(trained), len(units)))
            differ = (f"unit {first}: {trained[first] if first < len(trained) else None!r} in the router, "
                      f"{units[first] if first < len(units) else None!r} here")
            return (f"the router's {len(trained)} units are not this denoiser's {len(units)} (first difference at "
                    f"{differ}): it was trained on another model layout or an older unit definition; retrain it: "
                    f"diffusion-accel train {cfg.get('objective', 'harmonica')} --pretrained_teacher_model "
                    "<this pipeline> --output_dir <folder>")
        if tuple(self.logits.shape) != (int(cfg.get("num_inference_steps", self.num_steps)), len(units)):
            return f"the router's table is {tuple(self.logits.shape)}, not [steps, {len(units)} units]"
        return None

    # ------------------------------------------------------------------ files
    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"logits": self.logits.detach().float().cpu().contiguous(),
                   "trainable": self.trainable.to(torch.uint8).cpu().contiguous()}, str(folder / WEIGHTS_NAME))
        (folder / CONFIG_NAME).write_text(json.dumps({"format": FORMAT, "version": 1, **self.config}, indent=2,
                                                     default=str))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> CacheRouter:
        from safetensors.torch import load_file

        folder = Path(folder)
        if folder.is_file():
            folder = folder.parent
        weights, config = folder / WEIGHTS_NAME, folder / CONFIG_NAME
        if not weights.is_file() or not config.is_file():
            raise ValueError(f"{folder} is not a cache router folder (it needs {WEIGHTS_NAME} and {CONFIG_NAME}, as "
                             "`diffusion-accel train harmonica --output_dir <folder>` writes them).")
        cfg = json.loads(config.read_text())
        if cfg.get("format") != FORMAT:
            raise ValueError(f"{config} is not a diffusion-accel cache router config (format {cfg.get('format')!r}).")
        tensors = load_file(str(weights))
        return cls(tensors["logits"].float(), tensors["trainable"].bool(), cfg)


@torch.no_grad()
def measure_unit_macs_shares(pipe: Any, denoiser: torch.nn.Module, unit_names: list[str], call: dict[str, Any],
                             feeders: dict[str, list[str]] | None = None) -> tuple[list[float], float]:
    """Each unit's share of ``denoiser``'s MACs in one call ``pipe(**call)`` (``torch.utils.flop_counter``, the
    call's own text length and batch layout) and the share outside every unit: what ``unit_macs_share`` /
    ``rest_macs_share`` of a router file record. A unit's share includes its ``feeders`` (unit name → feeder names,
    ``ModelAdapter.unit_feeders``), which do not run where it is reused."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        pipe(**call)
    counts = counter.get_flop_counts()
    root = type(denoiser).__name__
    total = float(sum(counts.get(root, {}).values()))
    feeders = feeders or {}

    def macs(name: str) -> float:
        return float(sum(counts.get(f"{root}.{name}", {}).values()))

    shares = [(macs(name) + sum(macs(f) for f in feeders.get(name, []))) / total for name in unit_names]
    return shares, 1.0 - sum(shares)


def call_mismatch(trained_steps: int, trained_guidance: float | None, num_steps: int | None,
                  guidance: float | None) -> str | None:
    """Why a router trained for ``trained_steps`` steps at ``trained_guidance`` cannot drive a call with
    ``num_steps`` steps at ``guidance`` (``None`` when it can, or when the call does not say)."""
    if num_steps is not None and num_steps != trained_steps:
        return (f"the router was trained for {trained_steps} sampling steps, the call runs {num_steps}; call with "
                f"num_inference_steps={trained_steps}, or train a router for {num_steps} steps")
    if guidance is not None and trained_guidance is not None and abs(float(guidance) - float(trained_guidance)) > 1e-6:
        return (f"the router was trained at guidance scale {trained_guidance}, the call uses {guidance}; call with "
                f"that scale, or train a router at {guidance}")
    return None
