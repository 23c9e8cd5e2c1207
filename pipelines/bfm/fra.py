"""Feature Residual Approximation (BFM §3.3, the second stage): run the alignment network R once per segment.

At the first step a trajectory takes inside segment m (time ``t_a``), R runs in full and its output is kept as the
segment's *anchor*. At every later step of that segment (time t), R is replaced by the cheap FRN:

    ĥ_rep(t) = R(x_{t_a}, t_a) + coeff(t) · FRN(x_t, t),    coeff(t) = (t_a − t) / (t_a − σ_{m+1})

so a step costs FRN + velocity blocks instead of R + velocity blocks. The anchor is state that lives across
denoiser calls, so this is a Diffusers ``ModelHook`` on the model's ``alignment`` module with a ``StateManager``:
one anchor per cache context (``FluxPipeline`` wraps the conditional and unconditional passes of true CFG in
``cache_context("cond")`` / ``("uncond")``), and none outside a pipeline's denoising loop, where R always runs.

A new anchor is taken when the call is in another segment than the anchor's, goes back up in t (a new
trajectory), or has another batch or token count (a new call or resolution).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

HOOK_NAME = "bfm_feature_residual"


@dataclass
class AnchorState(BaseState):
    """R's output at the segment's first step, the segment, its time, and the last time seen."""

    anchor: torch.Tensor | None = None
    segment: int = -1
    anchor_t: float = 0.0
    last_t: float = 0.0

    def reset(self, *args: Any, **kwargs: Any) -> None:
        self.anchor, self.segment, self.anchor_t, self.last_t = None, -1, 0.0, 0.0


class FeatureResidualHook(ModelHook):
    """Wraps ``BlockwiseFlowTransformer.alignment``: the anchor or anchor + coeff · FRN (see module docstring)."""

    _is_stateful = True

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        # a plain attribute would register the whole model as a child of the hook's module (a cycle)
        self._model = [model]
        self.enabled = True
        self.state_manager = StateManager(AnchorState)
        self.full_runs = 0  # calls where R ran (anchors), for tests and cost reports
        self.residual_runs = 0  # calls served by the FRN

    @property
    def model(self) -> torch.nn.Module:
        return self._model[0]

    def new_forward(self, module: torch.nn.Module, tokens: torch.Tensor, context: torch.Tensor, temb: torch.Tensor,
                    rotary: Any, attention_kwargs: dict[str, Any] | None, t: torch.Tensor) -> torch.Tensor:
        original = self.fn_ref.original_forward
        if not self.enabled or self.state_manager._context is None or torch.is_grad_enabled():
            return original(tokens, context, temb, rotary, attention_kwargs, t)
        times = t.reshape(-1)
        now = float(times[0])
        state: AnchorState = self.state_manager.get_state()
        segment = int(self.model.segment_of(times[:1])[0])
        stale = (state.anchor is None or segment != state.segment or now > state.last_t
                 or state.anchor.shape[:2] != tokens.shape[:2] or not bool((times == times[0]).all()))
        state.last_t = now
        if stale:
            state.anchor = original(tokens, context, temb, rotary, attention_kwargs, t)
            state.segment, state.anchor_t = segment, now
            self.full_runs += 1
            return state.anchor
        coeff = (state.anchor_t - now) / (state.anchor_t - self.model.segment_end(segment))
        residual = self.model.frn(module.x_embedder(tokens), context, temb, rotary, attention_kwargs)
        self.residual_runs += 1
        return state.anchor + coeff * residual

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        return module


def attach_feature_residual(model: torch.nn.Module) -> FeatureResidualHook:
    """Register the FRA hook on ``model.alignment`` (the model does this itself when it has an FRN)."""
    hook = FeatureResidualHook(model)
    HookRegistry.check_if_exists_or_initialize(model.alignment).register_hook(hook, HOOK_NAME)
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
    return hook


def feature_residual_hook(model: torch.nn.Module) -> FeatureResidualHook | None:
    """The model's FRA hook (``None`` for a model without an FRN)."""
    alignment = getattr(model, "alignment", None)
    registry = getattr(alignment, "_diffusers_hook", None)
    return registry.get_hook(HOOK_NAME) if registry is not None else None


def use_feature_residual(model: torch.nn.Module, enabled: bool) -> None:
    """Switch FRA on (R once per segment) or off (R at every step) on a model that has an FRN."""
    hook = feature_residual_hook(model)
    if hook is None:
        raise ValueError("this model has no feature residual network (frn_single_layers=0); train one with "
                         "`diffusion-accel train bfm_frn --pretrained_model <stage-1 folder> ...`.")
    hook.enabled = enabled
    hook.reset_state(model.alignment)
