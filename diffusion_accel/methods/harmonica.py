"""Learned caching: a trained router's static compute/reuse schedule (HarmoniCa, Huang et al., ICML 2025,
arXiv 2410.01723; Learning-to-Cache, Ma et al., NeurIPS 2024, arXiv 2406.01733).

At step k, unit u (a block's gated branch, or a whole block where the family's block class is not in
:data:`~diffusion_accel.pipelines.adapters.GATED_BRANCHES`) is computed iff its router score r_{k,u} > τ, else its
output from the last step that computed it is reused (a branch then gets the current step's gate from its block).
The first step computes every unit. Routers come from ``diffusion-accel train harmonica`` / ``train l2c``
(:mod:`diffusion_accel.train.harmonica`); :mod:`diffusion_accel.cache_router` is the file format.

Paper symbol → parameter: τ → ``threshold``; the papers pick τ and read off the cache usage ratio (CUR), here
``target_macs_ratio`` or ``cache_rate`` may pick τ instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers.hooks import ModelHook

from ..cache_router import CacheRouter, call_mismatch
from ..config import MethodConfig, register_method
from ..method import Method
from ..routed_units import RoutedUnits, is_whole_block

if TYPE_CHECKING:
    from ..pipelines.adapters import ModelAdapter
    from ..session import AccelSession

#: Where a pipeline folder keeps its routers: ``<pipeline folder>/routers/<objective>/``.
ROUTERS_FOLDER = "routers"


def shipped_router(pipe: Any, objective: str) -> Path | None:
    """``<folder the pipeline was loaded from>/routers/<objective>`` if it holds a router (the testbeds ship one)."""
    source = getattr(getattr(pipe, "config", None), "_name_or_path", None)
    if not source:
        return None
    folder = Path(source) / ROUTERS_FOLDER / objective
    return folder if (folder / "router_config.json").is_file() else None


@register_method
@dataclass
class HarmoniCaConfig(MethodConfig):
    """Apply a trained cache router.

    Attributes:
        router: a router folder (``router.safetensors`` + ``router_config.json``); ``None``: the router shipped in
            the pipeline's own folder (``routers/<objective>``), as the testbeds have.
        threshold: τ, compute a unit iff its score > τ; ``None``: the router's own (the one its trainer chose).
        target_macs_ratio: pick τ as the smallest reuse that reaches this denoiser MACs ratio (e.g. 1.6).
        cache_rate: pick τ to reuse this fraction of (step, unit) cells (the papers' cache usage ratio).
    """

    name: ClassVar[str] = "harmonica"
    summary: ClassVar[str] = "HarmoniCa: a trained router's per-step compute/reuse schedule over block branches"
    objective: ClassVar[str] = "harmonica"
    router: str | None = None
    threshold: float | None = None
    target_macs_ratio: float | None = None
    cache_rate: float | None = None

    def validate(self) -> None:
        chosen = [n for n in ("threshold", "target_macs_ratio", "cache_rate") if getattr(self, n) is not None]
        if len(chosen) > 1:
            raise ValueError(f"{self.name}: give at most one of threshold, target_macs_ratio and cache_rate "
                             f"(got {', '.join(chosen)}).")
        if self.threshold is not None and not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"{self.name} threshold τ is a score in [0, 1), got {self.threshold}.")
        if self.target_macs_ratio is not None and self.target_macs_ratio < 1.0:
            raise ValueError(f"{self.name} target_macs_ratio must be >= 1, got {self.target_macs_ratio}.")
        if self.cache_rate is not None and not 0.0 <= self.cache_rate < 1.0:
            raise ValueError(f"{self.name} cache_rate must be in [0, 1), got {self.cache_rate}.")

    def router_folder(self, pipe: Any) -> Path | None:
        return Path(self.router) if self.router is not None else shipped_router(pipe, self.objective)

    def load_router(self, pipe: Any) -> CacheRouter:
        folder = self.router_folder(pipe)
        if folder is None:
            raise ValueError(self._no_router_message())
        return CacheRouter.load(folder)

    def _no_router_message(self) -> str:
        return (f"{self.name} needs a trained router and this pipeline ships none: train one with `diffusion-accel "
                f"train {self.objective} --pretrained_teacher_model <your pipeline folder> --output_dir <folder>` "
                f"and pass router=<folder>.")

    def resolve_threshold(self, router: CacheRouter) -> float:
        if self.threshold is not None:
            return self.threshold
        if self.target_macs_ratio is not None:
            return router.threshold_for(macs_ratio=self.target_macs_ratio)
        if self.cache_rate is not None:
            return router.threshold_for(cache_rate=self.cache_rate)
        return float(router.config.get("threshold", 0.1))

    def not_applicable_reason(self, adapter: ModelAdapter, pipe: Any) -> str | None:
        reason = super().not_applicable_reason(adapter, pipe)
        if reason is not None:
            return reason
        try:  # no router, an unreadable one, or a target it cannot reach: the error names the fix
            router = self.load_router(pipe)
            self.resolve_threshold(router)
        except ValueError as exc:
            return str(exc)
        from .diffusers_caches import unregistered_block_reason

        units = adapter.routing_units(pipe)
        whole = [is_whole_block(name) for name, _ in units]
        if any(whole):
            why = unregistered_block_reason(self.name, [m for (_, m), w in zip(units, whole, strict=True) if w])
            if why:
                return why
        return router.mismatch(pipe, adapter, [name for name, _ in units])

    def build(self) -> Method:
        return HarmoniCaMethod(self)


@register_method
@dataclass
class L2CConfig(HarmoniCaConfig):
    """Apply a router trained with Learning-to-Cache's objective (``diffusion-accel train l2c``): the same runtime;
    L2C's routers compute every unit on alternate steps (the paper's reset), which the router table itself pins."""

    name: ClassVar[str] = "l2c"
    summary: ClassVar[str] = ("Learning-to-Cache: a router trained step by step from noised images (HarmoniCa's "
                               "ablation)")
    objective: ClassVar[str] = "l2c"


class _PlanHook(ModelHook):
    """On the denoiser: sets every unit's decision for this forward's step and rows."""

    def __init__(self, method: HarmoniCaMethod) -> None:
        super().__init__()
        self.method = method

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        self.method.plan_step()
        return args, kwargs


class HarmoniCaMethod(Method):
    """Runtime of :class:`HarmoniCaConfig` (and :class:`L2CConfig`)."""

    priority = 30

    def __init__(self, config: HarmoniCaConfig) -> None:
        super().__init__(config)
        self.config: HarmoniCaConfig = config
        # the router's steps and guidance; its table lives on as the decision lists (no tensors, so the method's
        # cache memory is its cached activations alone)
        self.router_steps = 0
        self.router_guidance: float | None = None
        self.compute: list[list[bool]] = []
        self.keep: list[list[bool]] = []
        self.threshold = 0.0
        self.units: RoutedUnits | None = None
        self.session: AccelSession | None = None

    def attach(self, session: AccelSession) -> None:
        self.session = session
        router = self.config.load_router(session.pipe)
        self.threshold = self.config.resolve_threshold(router)
        decisions = router.decisions(self.threshold)
        self.router_steps, self.router_guidance = router.num_steps, router.config.get("guidance_scale")
        self.compute = decisions.tolist()
        # an output is stored only where the next step reuses it (a reuse always follows a computing step)
        self.keep = [(~decisions[k + 1]).tolist() if k + 1 < len(decisions) else [False] * decisions.shape[1]
                     for k in range(len(decisions))]
        self.units = RoutedUnits.for_pipeline(session.adapter, session.pipe, session.expert)
        for module, hook in self.units.hooks():
            session.register_hook(module, hook, f"diffusion_accel.{self.name}.unit")
        session.register_hook(session.denoiser, _PlanHook(self), f"diffusion_accel.{self.name}.plan")

    def on_call_begin(self, session: AccelSession) -> None:
        adapter = session.adapter
        args = session.call_args
        steps = args.get("num_inference_steps")
        guidance = args.get(adapter.cfg_scale_arg) if adapter.cfg_mode(args) != "none" else None
        reason = call_mismatch(self.router_steps, self.router_guidance, int(steps) if isinstance(steps, int) else None,
                               guidance)
        if reason:
            raise ValueError(f"{self.name}: {reason}.")
        self.units.reset()
        # compiled blocks keep the shapes they were traced with (routed_units._placeholder)
        self.units.zero_width = not session.runs_compiled()

    def on_stage_begin(self, session: AccelSession) -> None:
        self.units.reset()

    def plan_step(self) -> None:
        ctx = self.session.context
        if ctx.num_steps and ctx.num_steps != self.router_steps:
            raise ValueError(f"{self.name}: " + call_mismatch(self.router_steps, None, ctx.num_steps, None) + ".")
        k = min(ctx.step_index, self.router_steps - 1)
        if k == 0:
            self.units.set_step("fill", ctx.rows, keep=self.keep[0])
        else:
            self.units.set_step("hard", ctx.rows, compute=self.compute[k], keep=self.keep[k])

    def on_call_end(self, session: AccelSession) -> None:
        total = self.units.computed + self.units.reused
        session.stats.extra[self.name] = {
            "threshold": self.threshold, "units": len(self.units), "units_computed": self.units.computed,
            "units_reused": self.units.reused, "cache_rate": self.units.reused / total if total else 0.0,
            "router": str(self.config.router_folder(session.pipe)),
        }
