"""Δ-cache (Δ-DiT, Chen et al. 2024, arXiv 2406.01125): cache the *deviation* of a block range.

On a full step the deviation Δ = h_out − h_in of two candidate ranges is stored: the front range (blocks
``[0, N_c)``) and the rear range (blocks ``[L − N_c, L)``). On a cached step the active range is skipped and its
output replaced by ``h_in(current step) + Δ``, so the current input is never thrown away (unlike caching outputs).
Stage-adaptive: the paper caches the **rear** blocks in the early (outline) stage ``k < b`` and the **front** blocks
in the late (detail) stage; both deltas are refreshed at every full step, so a stage switch never reads a stale one.

Paper symbol → parameter: N → ``interval``, N_c → ``num_cached_blocks``, b → ``boundary``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers.hooks import ModelHook

from ..blocks import BlockIO, Streams, add_deviation, deviation
from ..config import MethodConfig, register_method
from ..method import Method
from ..row_store import RowStore

if TYPE_CHECKING:
    from ..pipelines.adapters import ModelAdapter
    from ..session import AccelSession

_STAGE_ORDERS = ("rear_then_front", "front_then_rear")

#: Named settings. Block counts are fractions of the model depth L (21 of 28 = 0.75), boundaries of the steps T.
PRESETS: dict[str, dict[str, Any]] = {
    # PixArt-α, DPM-Solver 20 steps: 1.6x in the paper = N 2, N_c 21/28, b 12 (the ICLR thread's "Ours (b=12)").
    "pixart-alpha-20": {"interval": 2, "num_cached_blocks": 0.75, "boundary": 12},
    # DiT-XL/2, 20 steps: same recipe (1/N + (N-1)/N (1 - N_c/L) = 0.625 of the compute).
    "dit-xl-20": {"interval": 2, "num_cached_blocks": 0.75, "boundary": 12},
    # 4-step LCM-PixArt: front-heavy detail stage after b = 2, N_c = 4 of 28.
    "pixart-lcm-4": {"interval": 2, "num_cached_blocks": 4 / 28, "boundary": 2},
}


def _preset_under_explicit_fields(cls: type) -> type:
    """Make ``preset=`` fill the fields a caller did not pass (explicit fields override the preset).

    Wraps the dataclass ``__init__``, the one place that knows which fields were passed, so that the fields keep
    their real defaults and ``validate`` only validates.
    """
    generated = cls.__init__
    names = [f.name for f in dataclasses.fields(cls) if f.init]

    @functools.wraps(generated)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.update(zip(names, args, strict=False))
        preset = kwargs.get("preset")
        if isinstance(preset, str) and preset in PRESETS:
            kwargs = {**PRESETS[preset], **kwargs}
        generated(self, **kwargs)

    cls.__init__ = __init__
    return cls


@register_method
@_preset_under_explicit_fields
@dataclass
class DeltaCacheConfig(MethodConfig):
    """Δ-DiT's stage-adaptive Δ-cache.

    Attributes:
        interval: N, full computation every N steps (k % N == 0); 1 never caches.
        num_cached_blocks: N_c, blocks skipped on a cached step: an int count, or a float in (0, 1] as a fraction
            of the model depth L (default 0.75, the paper's 21 of 28).
        boundary: b, the outline/detail stage boundary: an int step count, or a float in [0, 1) as a fraction of
            the steps T (default 0.6, i.e. 12 of 20).
        stage_order: ``"rear_then_front"`` (the paper: rear blocks cached in the outline stage) or the reverse.
        warmup_steps: steps computed in full before caching starts; the interval counts from there. Not part of
            Δ-DiT (0, the default, is the paper's schedule); it protects the first steps, where the layout forms.
        preset: a named setting from :data:`PRESETS`; explicit fields override it.
    """

    name: ClassVar[str] = "delta_cache"
    summary: ClassVar[str] = "Δ-DiT Δ-cache: skip a block range, add its cached deviation (stage-adaptive)"
    interval: int = 2
    num_cached_blocks: int | float = 0.75
    boundary: int | float = 0.6
    stage_order: str = "rear_then_front"
    warmup_steps: int = 0
    preset: str | None = None

    def validate(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"Unknown delta_cache preset {self.preset!r}; choose one of {sorted(PRESETS)}.")
        if not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"delta_cache interval (N) must be an int >= 1, got {self.interval!r}.")
        n_c = self.num_cached_blocks
        if isinstance(n_c, bool) or not isinstance(n_c, (int, float)):
            raise ValueError(f"delta_cache num_cached_blocks (N_c) must be a number, got {n_c!r}.")
        if isinstance(n_c, int) and n_c < 1:
            raise ValueError(f"delta_cache num_cached_blocks (N_c) must be >= 1 block, got {n_c}.")
        if isinstance(n_c, float) and not 0 < n_c <= 1:
            raise ValueError(f"delta_cache num_cached_blocks as a fraction must be in (0, 1], got {n_c}.")
        b = self.boundary
        if isinstance(b, bool) or not isinstance(b, (int, float)) or b < 0 or (isinstance(b, float) and b >= 1):
            raise ValueError(f"delta_cache boundary (b) must be an int step >= 0 or a fraction in [0, 1), got {b!r}.")
        w = self.warmup_steps
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ValueError(f"delta_cache warmup_steps must be an int >= 0, got {w!r}.")
        if self.stage_order not in _STAGE_ORDERS:
            raise ValueError(f"delta_cache stage_order must be one of {_STAGE_ORDERS}, got {self.stage_order!r}.")

    def cached_blocks(self, depth: int) -> int:
        """N_c resolved against the model depth L."""
        n_c = self.num_cached_blocks
        return max(1, round(n_c * depth)) if isinstance(n_c, float) else int(n_c)

    def boundary_step(self, num_steps: int) -> int:
        """b resolved against the number of steps T."""
        return round(self.boundary * num_steps) if isinstance(self.boundary, float) else int(self.boundary)

    def not_applicable_reason(self, adapter: ModelAdapter, pipe: Any) -> str | None:
        reason = super().not_applicable_reason(adapter, pipe)
        if reason is not None:
            return reason
        from .diffusers_caches import unregistered_block_reason

        blocks = adapter.get_blocks(pipe)
        depth = len(blocks)
        if isinstance(self.num_cached_blocks, int) and self.num_cached_blocks > depth:
            return (f"num_cached_blocks={self.num_cached_blocks} is past the model depth ({depth} blocks); use at "
                    f"most {depth}, or a fraction such as 0.75")
        return unregistered_block_reason(self.name, blocks)

    def build(self) -> Method:
        return DeltaCacheMethod(self)


@dataclass
class _Plan:
    full: bool = True
    start: int = 0
    end: int = 0
    range_name: str = "rear"


class _PlanHook(ModelHook):
    """On the denoiser: decides full vs cached before the blocks run, stores the deltas after a full step."""

    def __init__(self, method: DeltaCacheMethod) -> None:
        super().__init__()
        self.method = method

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        self.method.plan_step()
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        self.method.commit_step()
        return output


class _BlockHook(ModelHook):
    """On every block: records range inputs/outputs on full steps, skips the active range on cached steps."""

    def __init__(self, method: DeltaCacheMethod, index: int) -> None:
        super().__init__()
        self.method = method
        self.index = index
        self.io: BlockIO | None = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.io = BlockIO.for_module(module)
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.method.block_forward(self, args, kwargs)


class DeltaCacheMethod(Method):
    """Runtime of :class:`DeltaCacheConfig`."""

    priority = 30

    def __init__(self, config: DeltaCacheConfig) -> None:
        super().__init__(config)
        self.config: DeltaCacheConfig = config
        self.stores = {"front": RowStore(), "rear": RowStore()}
        self.plan = _Plan()
        self._inputs: dict[str, Streams] = {}
        self._pending: dict[str, Streams] = {}
        self.session: AccelSession | None = None
        self.depth = 0
        self.n_c = 0

    def attach(self, session: AccelSession) -> None:
        self.session = session
        blocks = session.blocks
        self.depth = len(blocks)
        self.n_c = min(self.config.cached_blocks(self.depth), self.depth)
        for index, block in enumerate(blocks):
            session.register_hook(block, _BlockHook(self, index), "diffusion_accel.delta_cache.block")
        session.register_hook(session.denoiser, _PlanHook(self), "diffusion_accel.delta_cache.plan")

    def on_call_begin(self, session: AccelSession) -> None:
        for store in self.stores.values():
            store.clear()
        self.plan = _Plan()
        self._inputs.clear()
        self._pending.clear()

    # ------------------------------------------------------------------ schedule
    def ranges(self) -> dict[str, tuple[int, int]]:
        return {"front": (0, self.n_c), "rear": (self.depth - self.n_c, self.depth)}

    def active_range(self, step: int, num_steps: int) -> str:
        outline = step < self.config.boundary_step(num_steps)
        rear_first = self.config.stage_order == "rear_then_front"
        return "rear" if outline == rear_first else "front"

    def plan_step(self) -> None:
        ctx = self.session.context
        name = self.active_range(ctx.step_index, ctx.num_steps)
        start, end = self.ranges()[name]
        warmup = self.config.warmup_steps
        on_schedule = ctx.step_index >= warmup and (ctx.step_index - warmup) % self.config.interval != 0
        cached = on_schedule and self.stores[name].has(ctx.rows)
        self.plan = _Plan(full=not cached, start=start, end=end, range_name=name)
        self._inputs.clear()
        self._pending.clear()

    def commit_step(self) -> None:
        if not self.plan.full:
            return
        rows = self.session.context.rows
        for name, delta in self._pending.items():
            self.stores[name].put(rows, delta)
        self._pending.clear()
        self._inputs.clear()

    # ------------------------------------------------------------------ blocks
    def block_forward(self, hook: _BlockHook, args: tuple, kwargs: dict) -> Any:
        index, io, plan = hook.index, hook.io, self.plan
        if plan.full:
            for name, (start, _) in self.ranges().items():
                if index == start:
                    self._inputs[name] = io.inputs(args, kwargs)
            output = hook.fn_ref.original_forward(*args, **kwargs)
            for name, (_, end) in self.ranges().items():
                if index == end - 1 and name in self._inputs:
                    self._pending[name] = deviation(io.outputs(output), self._inputs[name])
            return output
        if not plan.start <= index < plan.end:
            return hook.fn_ref.original_forward(*args, **kwargs)
        streams = io.inputs(args, kwargs)
        if index == plan.start:  # h_in(current) + Δ; the rest of the range passes it through
            streams = add_deviation(streams, self.stores[plan.range_name].get(self.session.context.rows))
        return io.make_output(*streams)
