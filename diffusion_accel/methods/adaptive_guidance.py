"""Adaptive Guidance (AG; Castillo et al., arXiv 2312.12487): stop the unconditional branch once it stops mattering.

Per sample i and step k, γ_i = cos(cond prediction, uncond prediction) is measured in a configurable space (data x0
by default, since noise-space cosines saturate near 1). Once γ_i ≥ γ̄ (``threshold``), sample i is conditional-only
from step k + 1 on (a one-way switch). Unlike the peers, which gate the whole batch, switching is **per sample**:
samples still guided keep their unconditional evaluation.

Transparent to the pipeline:

* batched CFG: the unconditional rows of switched samples are dropped from the denoiser batch, and the output is
  rebuilt with the conditional prediction in their place, so the pipeline's ``u + s·(c − u)`` yields ``c``;
* separate passes (Wan, Flux/HunyuanVideo true CFG): the ``"uncond"`` pass is skipped (or run on the rows still
  guided) and answered with the conditional prediction of the same step;
* guidance-distilled models without an unconditional pass: a clear "not applicable" error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers.hooks import ModelHook

from ..batching import denoiser_sample_input, output_sample, slice_batch, with_sample
from ..config import MethodConfig, register_method
from ..method import Method
from ..predictions import SPACES, convert_prediction, per_sample_cosine

if TYPE_CHECKING:
    from ..pipelines.adapters import ModelAdapter
    from ..session import AccelSession


def guidance_not_applicable_reason(adapter: ModelAdapter, pipe: Any) -> str | None:
    """Why a guidance method cannot run on this pipeline (``None`` if it can)."""
    if adapter.cfg_layout == "none":
        return f"{adapter.family} pipelines have no classifier-free guidance"
    denoiser = adapter.get_denoiser(pipe)
    if adapter.guidance_distilled and getattr(getattr(denoiser, "config", None), "guidance_embeds", False):
        return (f"not applicable: this {adapter.family} model is guidance-distilled (guidance_embeds=True) and runs no "
                "unconditional pass, so there is nothing to skip")
    return None


def prediction_not_convertible_reason(name: str, adapter: ModelAdapter, pipe: Any) -> str | None:
    """Why ``name`` cannot convert this denoiser's predictions between spaces (``None`` if it can)."""
    scheduler = getattr(pipe, "scheduler", None)
    config = getattr(scheduler, "config", None)
    declared = config.get("prediction_type") if hasattr(config, "get") else None
    if declared is not None and declared not in ("epsilon", "v_prediction"):
        return (f"{name} reads the denoiser output as {adapter.prediction} predictions, but the scheduler is set to "
                f"prediction_type={declared!r}; use a scheduler with prediction_type 'epsilon' or 'v_prediction'")
    if adapter.prediction != "flow" and getattr(scheduler, "alphas_cumprod", None) is None:
        return (f"{name} converts {adapter.prediction} predictions with the scheduler's alphas_cumprod, and "
                f"{type(scheduler).__name__} has none; use a DDPM-family scheduler (DDIM, DPM-Solver, Euler)")
    return None


@register_method
@dataclass
class AdaptiveGuidanceConfig(MethodConfig):
    """Adaptive Guidance.

    Attributes:
        threshold: γ̄; a sample switches to conditional-only once γ ≥ γ̄. ``1.0`` or more never switches;
            ``-1.0`` or less switches before the first step (the conditional-only pipeline).
        space: where γ is measured: ``"x0"`` (data, default), ``"eps"`` (noise) or ``"velocity"``.
        min_step: never switch before this step (0 = as soon as γ̄ is reached).
    """

    name: ClassVar[str] = "adaptive_guidance"
    summary: ClassVar[str] = "Adaptive Guidance: per-sample one-way switch to cond-only once cos(cond, uncond) >= γ̄"
    threshold: float = 0.99
    space: str = "x0"
    min_step: int = 0

    def validate(self) -> None:
        if not isinstance(self.threshold, (int, float)) or isinstance(self.threshold, bool):
            raise ValueError(f"adaptive_guidance threshold (γ̄) must be a number, got {self.threshold!r}.")
        if self.space not in SPACES:
            raise ValueError(f"adaptive_guidance space must be one of {SPACES}, got {self.space!r}.")
        if self.min_step < 0:
            raise ValueError(f"adaptive_guidance min_step must be >= 0, got {self.min_step}.")

    def not_applicable_reason(self, adapter: ModelAdapter, pipe: Any) -> str | None:
        return (self.unsupported_reason(adapter) or guidance_not_applicable_reason(adapter, pipe)
                or prediction_not_convertible_reason(self.name, adapter, pipe))

    def build(self) -> Method:
        return AdaptiveGuidanceMethod(self)


class _GuidanceHook(ModelHook):
    def __init__(self, method: GuidanceMethodBase) -> None:
        super().__init__()
        self.method = method

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.method.forward(self.fn_ref.original_forward, args, kwargs)


class GuidanceMethodBase(Method):
    """Shared machinery: dropping unconditional rows and answering them with an estimate.

    Subclasses decide per step which samples need a true unconditional evaluation (:meth:`uncond_needed`) and
    what replaces the others (:meth:`estimate_uncond`); they observe true predictions in :meth:`observe`.
    """

    priority = 10  # outermost of the methods: caches inside see the shrunk batch and its row labels

    def __init__(self, config: MethodConfig) -> None:
        super().__init__(config)
        self.session: AccelSession | None = None
        self._first_pass: dict[str, Any] = {}

    def attach(self, session: AccelSession) -> None:
        self.session = session
        session.register_hook(session.denoiser, _GuidanceHook(self), f"diffusion_accel.{self.name}")

    def on_call_begin(self, session: AccelSession) -> None:
        self._first_pass = {}

    # -------------------------------------------------------------- to override
    def uncond_needed(self, sample: int, step: int) -> bool:
        raise NotImplementedError

    def estimate_uncond(self, sample: int, step: int, cond: torch.Tensor) -> torch.Tensor:
        """Replacement for sample's unconditional prediction (default: the conditional one, i.e. no guidance)."""
        return cond

    def observe(self, samples: list[int], step: int, cond: torch.Tensor, uncond: torch.Tensor,
                x_t: torch.Tensor | None) -> None:
        """Called with true cond/uncond denoiser outputs (full channels; rows aligned with ``samples``)."""

    # -------------------------------------------------------------- helpers
    def _channels(self, pred: torch.Tensor, x_t: torch.Tensor | None) -> torch.Tensor:
        if self.session.adapter.learned_sigma and x_t is not None and pred.ndim == x_t.ndim:
            return pred[:, : x_t.shape[1]]
        return pred

    def forward(self, original: Any, args: tuple, kwargs: dict) -> Any:
        ctx = self.session.context
        if ctx.cfg_mode == "batched":
            return self._batched(original, args, kwargs)
        if ctx.cfg_mode == "separate":
            return self._separate(original, args, kwargs)
        return original(*args, **kwargs)

    def _batched(self, original: Any, args: tuple, kwargs: dict) -> Any:
        ctx = self.session.context
        rows, step = list(ctx.rows), ctx.step_index
        keep = [r for r, (branch, i) in enumerate(rows) if branch == "cond" or self.uncond_needed(i, step)]
        x_t = denoiser_sample_input(args, kwargs)
        if len(keep) == len(rows):
            output = original(*args, **kwargs)
            pred = output_sample(output)
        else:
            index = torch.tensor(keep, dtype=torch.long)
            args, kwargs = slice_batch((args, kwargs), index, len(rows))
            x_t = None if x_t is None else x_t.index_select(0, index.to(x_t.device))
            ctx.rows = [rows[r] for r in keep]
            try:
                output = original(*args, **kwargs)
            finally:
                ctx.rows = rows
            self.session.stats.record_uncond_skipped(len(rows) - len(keep))
            pred = output_sample(output)
        position = {rows[r]: j for j, r in enumerate(keep)}
        kept_rows = [rows[r] for r in keep]
        guided = sorted({i for b, i in kept_rows if b == "uncond"})
        if guided:
            c = torch.stack([pred[position[("cond", i)]] for i in guided])
            u = torch.stack([pred[position[("uncond", i)]] for i in guided])
            xs = None if x_t is None else torch.stack([x_t[position[("cond", i)]] for i in guided])
            self.observe(guided, step, c, u, xs)
        if len(keep) == len(rows):
            return output
        pieces = []
        for branch, i in rows:
            if (branch, i) in position:
                pieces.append(pred[position[(branch, i)]])
            else:
                pieces.append(self.estimate_uncond(i, step, pred[position[("cond", i)]]))
        return with_sample(output, torch.stack(pieces))

    def _separate(self, original: Any, args: tuple, kwargs: dict) -> Any:
        ctx = self.session.context
        rows, step, branch = list(ctx.rows), ctx.step_index, ctx.branch
        x_t = denoiser_sample_input(args, kwargs)
        first = self._first_pass.get("entry")
        if branch == "cond" or first is None or first[0] != step:
            output = original(*args, **kwargs)
            self._first_pass["entry"] = (step, branch, output, x_t)
            return output
        _, first_branch, first_output, first_x = first
        if first_branch != "cond":  # an uncond-first pipeline: nothing can be skipped, only observed
            output = original(*args, **kwargs)
            self.observe([i for _, i in rows], step, output_sample(output), output_sample(first_output), x_t)
            return output
        cond_pred = output_sample(first_output)
        needed = [r for r, (_, i) in enumerate(rows) if self.uncond_needed(i, step)]
        if not needed:
            self.session.stats.record_uncond_skipped(len(rows))
            self.session.stats.discount_forward()
            replaced = torch.stack([self.estimate_uncond(i, step, cond_pred[r]) for r, (_, i) in enumerate(rows)])
            return with_sample(first_output, replaced.clone())
        if len(needed) == len(rows):
            output = original(*args, **kwargs)
            pred = output_sample(output)
        else:
            index = torch.tensor(needed, dtype=torch.long)
            sub_args, sub_kwargs = slice_batch((args, kwargs), index, len(rows))
            ctx.rows = [rows[r] for r in needed]
            try:
                sub_output = original(*sub_args, **sub_kwargs)
            finally:
                ctx.rows = rows
            self.session.stats.record_uncond_skipped(len(rows) - len(needed))
            sub_pred = output_sample(sub_output)
            pieces = []
            for r, (_, i) in enumerate(rows):
                pieces.append(sub_pred[needed.index(r)] if r in needed else self.estimate_uncond(i, step, cond_pred[r]))
            pred = torch.stack(pieces)
            output = with_sample(sub_output, pred)
        samples = [rows[r][1] for r in needed]
        index = torch.tensor(needed, dtype=torch.long)
        xs = None if x_t is None else x_t.index_select(0, index.to(x_t.device))
        self.observe(samples, step, cond_pred.index_select(0, index.to(cond_pred.device)),
                     pred.index_select(0, index.to(pred.device)), xs)
        return output


class AdaptiveGuidanceMethod(GuidanceMethodBase):
    """Runtime of :class:`AdaptiveGuidanceConfig`."""

    def __init__(self, config: AdaptiveGuidanceConfig) -> None:
        super().__init__(config)
        self.config: AdaptiveGuidanceConfig = config
        self.switch_step: dict[int, int] = {}
        self.gammas: dict[int, list[tuple[int, float]]] = {}

    def on_call_begin(self, session: AccelSession) -> None:
        super().on_call_begin(session)
        self.switch_step = {}
        self.gammas = {}

    def on_call_end(self, session: AccelSession) -> None:
        session.stats.extra["adaptive_guidance"] = {
            "switch_step": dict(sorted(self.switch_step.items())),
            "gamma": {i: v for i, v in sorted(self.gammas.items())},
        }

    def uncond_needed(self, sample: int, step: int) -> bool:
        if self.config.threshold <= -1.0:
            return False
        switched_at = self.switch_step.get(sample)
        return switched_at is None or step < switched_at

    def observe(self, samples: list[int], step: int, cond: torch.Tensor, uncond: torch.Tensor,
                x_t: torch.Tensor | None) -> None:
        if self.config.threshold >= 1.0 or x_t is None:
            return
        ctx = self.session.context
        cond, uncond = self._channels(cond, x_t), self._channels(uncond, x_t)
        space_c = convert_prediction(cond, x_t, self.session.adapter.prediction, self.config.space,
                                     scheduler=self.session.pipe.scheduler, timestep=ctx.timestep, sigma=ctx.sigma)
        space_u = convert_prediction(uncond, x_t, self.session.adapter.prediction, self.config.space,
                                     scheduler=self.session.pipe.scheduler, timestep=ctx.timestep, sigma=ctx.sigma)
        gamma = per_sample_cosine(space_c, space_u)
        for sample, value in zip(samples, gamma.tolist(), strict=True):
            self.gammas.setdefault(sample, []).append((step, value))
            if value >= self.config.threshold and step >= self.config.min_step and sample not in self.switch_step:
                self.switch_step[sample] = step + 1


@register_method
@dataclass
class CFGCutoffConfig(MethodConfig):
    """Static CFG truncation: conditional-only from a fixed step on, for every sample.

    The baseline adaptive guidance is judged against: Diffusers' ``SDCFGCutoffCallback`` and the guiders'
    ``stop`` do the same with a fixed ``cutoff_step_ratio``.

    Attributes:
        cutoff_step_ratio: fraction of the steps after which the unconditional branch is dropped.
        cutoff_step_index: an explicit step index instead of the ratio.
    """

    name: ClassVar[str] = "cfg_cutoff"
    summary: ClassVar[str] = "Static CFG cutoff (Diffusers SDCFGCutoffCallback style): cond-only after a fixed step"
    cutoff_step_ratio: float = 0.5
    cutoff_step_index: int | None = None

    def validate(self) -> None:
        if not 0.0 <= self.cutoff_step_ratio <= 1.0:
            raise ValueError(f"cfg_cutoff cutoff_step_ratio must be in [0, 1], got {self.cutoff_step_ratio}.")
        if self.cutoff_step_index is not None and self.cutoff_step_index < 0:
            raise ValueError(f"cfg_cutoff cutoff_step_index must be >= 0, got {self.cutoff_step_index}.")

    def not_applicable_reason(self, adapter: ModelAdapter, pipe: Any) -> str | None:
        return self.unsupported_reason(adapter) or guidance_not_applicable_reason(adapter, pipe)

    def build(self) -> Method:
        return CFGCutoffMethod(self)


class CFGCutoffMethod(GuidanceMethodBase):
    """Runtime of :class:`CFGCutoffConfig`."""

    def __init__(self, config: CFGCutoffConfig) -> None:
        super().__init__(config)
        self.config: CFGCutoffConfig = config

    def uncond_needed(self, sample: int, step: int) -> bool:
        cutoff = self.config.cutoff_step_index
        if cutoff is None:
            cutoff = round(self.config.cutoff_step_ratio * self.session.context.num_steps)
        return step < cutoff
