"""Bottleneck Sampling (Tian et al., arXiv 2503.18940): high → low → high resolution stages.

Each stage denoises to a clean estimate; at a transition the latent is unpacked, resized (antialiased filter),
repacked and re-noised with fresh noise ``x = (1 − σ_s)·x0 + σ_s·ε``, and the next stage runs its own schedule
``σ = linspace(σ_s, σ_s/N, N)`` with its own flow-matching shift ``σ' = sσ / (1 + (s − 1)σ)``.

The pipeline's own ``__call__`` runs every stage (``latents=``, ``output_type="latent"``, width/height per stage, so
positional ids / RoPE are rebuilt by the pipeline), so a new flow-matching pipeline needs only its pack/unpack in
the adapter. Prompt embeddings are computed once: the first stage's ``encode_prompt`` results are replayed in the
later stages. A stage that starts from pure noise (σ_s = 1) without an explicit shift uses the pipeline's native
schedule unchanged, so one stage at scale 1 reproduces the baseline exactly.

Paper symbol → parameter: stage resolutions → ``scales``, N_i → ``steps``, re-noise level → ``start_sigmas``,
per-stage shift → ``shifts``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from ..config import MethodConfig, register_method
from ..latents import RESIZE_FILTERS, pack, resize_spatial, spatial_factor, unpack
from ..method import Method
from ..pipelines.adapters import families_where

if TYPE_CHECKING:
    from ..pipelines.adapters import ModelAdapter
    from ..session import AccelSession

#: The "literal paper schedule": 4 + 13 + 8 of 25 steps, re-noise strengths 1.0 / 0.8 / 0.6.
DEFAULT_STEP_FRACTIONS = (4 / 25, 13 / 25, 8 / 25)


@register_method
@dataclass
class BottleneckConfig(MethodConfig):
    """Bottleneck Sampling.

    Attributes:
        scales: resolution scale of each stage (default 1 → 0.5 → 1); a stage's height and width are the call's
            times the scale and must stay on the model's patch grid.
        steps: steps of each stage. ``None`` splits the call's ``num_inference_steps`` by ``step_fractions``.
        step_fractions: used when ``steps`` is None (default the paper's 4 : 13 : 8).
        start_sigmas: noise level σ_s each stage starts from; the first must be 1.0 (pure noise).
        shifts: flow-matching shift s of each stage; ``None`` (or a ``None`` entry) uses the scheduler's own shift
            for that stage's resolution (static ``shift`` or dynamic ``mu``).
        resize_filter: ``bicubic`` (antialiased, default), ``bilinear``, ``area`` or ``nearest``.
    """

    name: ClassVar[str] = "bottleneck"
    # Re-noising to σ_s as (1-σ)·x0 + σ·noise is the flow-matching forward process.
    families: ClassVar[tuple[str, ...] | None] = families_where(lambda a: a.prediction == "flow")
    summary: ClassVar[str] = "Bottleneck Sampling: high -> low -> high resolution stages with re-noising"
    scales: tuple[float, ...] = (1.0, 0.5, 1.0)
    steps: tuple[int, ...] | None = None
    step_fractions: tuple[float, ...] = DEFAULT_STEP_FRACTIONS
    start_sigmas: tuple[float, ...] = (1.0, 0.8, 0.6)
    shifts: tuple[float | None, ...] | None = None
    resize_filter: str = "bicubic"

    def validate(self) -> None:
        n = len(self.scales)
        if n == 0:
            raise ValueError("bottleneck needs at least one stage in `scales`.")
        if any(not (0 < s <= 4) for s in self.scales):
            raise ValueError(f"bottleneck scales must be in (0, 4], got {self.scales}.")
        if len(self.start_sigmas) != n:
            raise ValueError(f"bottleneck start_sigmas needs one value per stage ({n}), got {self.start_sigmas}.")
        if self.start_sigmas[0] != 1.0:
            raise ValueError("bottleneck's first stage must start from pure noise: start_sigmas[0] = 1.0.")
        if any(not (0 < s <= 1) for s in self.start_sigmas):
            raise ValueError(f"bottleneck start_sigmas must be in (0, 1], got {self.start_sigmas}.")
        if self.steps is not None:
            if len(self.steps) != n:
                raise ValueError(f"bottleneck steps needs one count per stage ({n}), got {self.steps}.")
            if any(int(s) < 1 for s in self.steps):
                raise ValueError(f"bottleneck stages cannot be empty: each steps entry must be >= 1, got {self.steps}.")
        elif len(self.step_fractions) != n or any(f <= 0 for f in self.step_fractions):
            raise ValueError(f"bottleneck step_fractions needs one positive value per stage ({n}).")
        if self.shifts is not None and (len(self.shifts) != n or any(s is not None and s <= 0 for s in self.shifts)):
            raise ValueError(f"bottleneck shifts needs one positive value (or None) per stage ({n}).")
        if self.resize_filter not in RESIZE_FILTERS:
            raise ValueError(f"bottleneck resize_filter must be one of {RESIZE_FILTERS}.")

    def stage_steps(self, total: int) -> list[int]:
        """Steps per stage: explicit, or ``total`` split by the fractions (largest remainders, each >= 1)."""
        if self.steps is not None:
            return [int(s) for s in self.steps]
        weights = np.asarray(self.step_fractions, dtype=float)
        raw = weights / weights.sum() * total
        counts = np.maximum(np.floor(raw).astype(int), 1)
        while counts.sum() < total:
            counts[int(np.argmax(raw - counts))] += 1
        while counts.sum() > total and counts.max() > 1:
            counts[int(np.argmax(counts))] -= 1
        if counts.sum() != total:
            raise ValueError(f"bottleneck cannot split {total} steps over {len(counts)} non-empty stages; "
                             "use more steps or fewer stages.")
        return counts.tolist()

    def not_applicable_reason(self, adapter: ModelAdapter, pipe: Any) -> str | None:
        reason = super().not_applicable_reason(adapter, pipe)
        if reason is None and not hasattr(pipe.scheduler, "sigmas"):
            return (f"bottleneck needs a flow-matching scheduler with sigmas, not {type(pipe.scheduler).__name__}; "
                    "use FlowMatchEulerDiscreteScheduler")
        return reason

    def build(self) -> Method:
        return BottleneckMethod(self)


def stage_sigmas(start: float, steps: int, shift: float | None) -> np.ndarray:
    """``linspace(σ_s, σ_s/N, N)`` (σ = 0 is appended by the scheduler), optionally shifted."""
    sigmas = np.linspace(start, start / steps, steps)
    if shift is not None:
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas


class _PromptReplay:
    """Records the first stage's ``encode_prompt`` results and replays them, in order, in later stages."""

    def __init__(self, encode: Callable[..., Any]) -> None:
        self.encode = encode
        self.results: list[Any] = []
        self.replay_index: int | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.replay_index is None:
            result = self.encode(*args, **kwargs)
            self.results.append(result)
            return result
        if self.replay_index < len(self.results):
            result = self.results[self.replay_index]
            self.replay_index += 1
            return result
        return self.encode(*args, **kwargs)

    def start_replay(self) -> None:
        self.replay_index = 0


class BottleneckMethod(Method):
    """Runtime of :class:`BottleneckConfig`: runs one pipeline call as several stage calls."""

    priority = 5

    def __init__(self, config: BottleneckConfig) -> None:
        super().__init__(config)
        self.config: BottleneckConfig = config
        self.last_plan: list[dict[str, Any]] = []

    def attach(self, session: AccelSession) -> None:
        self.session = session

    def on_call_end(self, session: AccelSession) -> None:
        session.stats.extra["bottleneck"] = self.last_plan

    # ------------------------------------------------------------------ plan
    def plan(self, call_args: dict[str, Any]) -> list[dict[str, Any]]:
        pipe, adapter = self.session.pipe, self.session.adapter
        height, width = self._resolution(call_args)
        factor = spatial_factor(adapter, pipe)
        steps = self.config.stage_steps(int(call_args.get("num_inference_steps") or 28))
        shifts = self.config.shifts or (None,) * len(steps)
        stages = []
        for i, (scale, n, start, shift) in enumerate(zip(self.config.scales, steps, self.config.start_sigmas, shifts,
                                                          strict=True)):
            h, w = round(height * scale), round(width * scale)
            if h % factor or w % factor:
                raise ValueError(
                    f"bottleneck stage {i} at scale {scale} gives {h}x{w} pixels, which is not a multiple of "
                    f"{factor} (VAE factor x patch size) for {adapter.family}; pick scales that keep "
                    f"height and width on that grid (e.g. a {height}x{width} call with scale 0.5 needs "
                    f"{height}/{factor} and {width}/{factor} to be even)."
                )
            stages.append({"stage": i, "scale": scale, "height": h, "width": w, "steps": n, "start_sigma": start,
                           "shift": shift})
        return stages

    def _resolution(self, call_args: dict[str, Any]) -> tuple[int, int]:
        pipe = self.session.pipe
        height, width = call_args.get("height"), call_args.get("width")
        if height is None or width is None:
            default = getattr(pipe, "default_sample_size", 64) * getattr(pipe, "vae_scale_factor", 8)
            height, width = height or default, width or default
        return int(height), int(width)

    # ------------------------------------------------------------------ the call
    @contextlib.contextmanager
    def _stage_scheduler(self, stage: dict[str, Any]) -> Iterator[None]:
        """Give the pipeline this stage's schedule (native for a pure-noise stage without explicit shift)."""
        pipe = self.session.pipe
        if stage["start_sigma"] == 1.0 and stage["shift"] is None:
            yield
            return
        original = pipe.scheduler
        sigmas = stage_sigmas(stage["start_sigma"], stage["steps"], stage["shift"])
        if stage["shift"] is None:
            scheduler = original  # its own shift (static or dynamic mu) applies to our unshifted sigmas, once
        else:
            scheduler = type(original).from_config(original.config, shift=1.0, use_dynamic_shifting=False)
        native = scheduler.set_timesteps

        @functools.wraps(native)
        def set_timesteps(num_inference_steps: int | None = None, device: Any = None, **kwargs: Any) -> None:
            mu = kwargs.get("mu") if stage["shift"] is None else None
            if mu is None and stage["shift"] is None and scheduler.config.get("use_dynamic_shifting", False):
                mu = 0.0
            extra = {"mu": mu} if mu is not None else {}
            native(sigmas=sigmas.tolist(), device=device, **extra)

        scheduler.set_timesteps = set_timesteps
        if scheduler is not original:
            pipe.scheduler = scheduler
        try:
            yield
        finally:
            del scheduler.set_timesteps
            if scheduler is not original:
                pipe.scheduler = original

    def wrap_call(self, session: AccelSession, call: Callable[..., Any], pipe: Any, *args: Any,
                  **kwargs: Any) -> Any:
        call_args = {k: v for k, v in session.call_args.items() if k != "self"}
        stages = self.plan(call_args)
        self.last_plan = stages
        adapter = session.adapter
        num_frames = call_args.get("num_frames")
        replay = _PromptReplay(pipe.encode_prompt) if hasattr(pipe, "encode_prompt") else None
        if replay is not None:
            object.__setattr__(pipe, "encode_prompt", replay)
        try:
            latents = call_args.get("latents")
            generator = call_args.get("generator")
            output = None
            for i, stage in enumerate(stages):
                last = i == len(stages) - 1
                stage_args = dict(call_args)
                stage_args.update(height=stage["height"], width=stage["width"], num_inference_steps=stage["steps"],
                                  latents=latents)
                if not last:
                    stage_args["output_type"] = "latent"
                    stage_args["return_dict"] = True
                if i > 0 and replay is not None:
                    replay.start_replay()
                with self._stage_scheduler(stage):
                    output = call(pipe, **stage_args)
                if last:
                    break
                nxt = stages[i + 1]
                clean = output.frames if hasattr(output, "frames") else output.images
                spatial = unpack(adapter, pipe, clean, stage["height"], stage["width"], num_frames)
                factor = spatial.shape[-1] / stage["width"]
                size = (round(nxt["height"] * factor), round(nxt["width"] * factor))
                resized = resize_spatial(spatial, size, self.config.resize_filter)
                noise = _randn_like(resized, generator)
                sigma = nxt["start_sigma"]
                latents = pack(adapter, pipe, (1 - sigma) * resized + sigma * noise)
            return output
        finally:
            if replay is not None:
                object.__delattr__(pipe, "encode_prompt")


def _randn_like(x: torch.Tensor, generator: Any) -> torch.Tensor:
    """Fresh noise drawn from the call's generator(s), one per sample when a list is given."""
    from diffusers.utils.torch_utils import randn_tensor

    if isinstance(generator, list) and len(generator) != x.shape[0]:
        generator = generator[0]
    return randn_tensor(tuple(x.shape), generator=generator, device=x.device, dtype=x.dtype)
