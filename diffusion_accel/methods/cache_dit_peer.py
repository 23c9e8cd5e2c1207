"""cache-dit's DBCache as a peer, through the same ``apply`` (optional extra ``[peers]``).

cache-dit patches the pipeline *class*'s ``__call__`` in pipeline mode; we use its transformer-only mode instead
(so the pipeline class stays ours to manage) and refresh its context at every pipeline call with the call's step
count, which is what its pipeline mode does internally.

cache-dit replaces the transformer's ``forward`` rather than registering Diffusers hooks, so the session cannot gate
it; we gate it here: outside this pipeline's calls (another pipeline sharing the transformer) the forward cache-dit
wrapped runs instead.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..config import MethodConfig, register_method
from ..method import Method
from ..pipelines.adapters import families_where

if TYPE_CHECKING:
    from ..pipelines.adapters import ModelAdapter
    from ..session import AccelSession



@register_method
@dataclass
class DBCacheConfig(MethodConfig):
    """cache-dit DBCache ("F{Fn}B{Bn}"): the first Fn blocks always run; their residual change gates the middle.

    Attributes:
        Fn_compute_blocks: Fn, leading blocks always computed.
        Bn_compute_blocks: Bn, trailing blocks always computed.
        residual_diff_threshold: relative L1 change below which the middle blocks are skipped.
        max_warmup_steps: steps always computed at the start.
        taylorseer: add cache-dit's TaylorSeer calibrator (order 1).
    """

    name: ClassVar[str] = "dbcache"
    # Families where cache-dit's transformer-only mode fails or disable_cache does not restore the model exactly
    # say so in their adapter's ``unsupported_methods`` (tests/engine/test_families.py checks the rest round-trip).
    families: ClassVar[tuple[str, ...] | None] = families_where(lambda a: bool(a.block_lists))
    summary: ClassVar[str] = "cache-dit DBCache (peer; needs the [peers] extra)"
    exclusive_group: ClassVar[str] = "diffusers_cache"
    shares_denoiser: ClassVar[bool] = False
    Fn_compute_blocks: int = 1
    Bn_compute_blocks: int = 0
    residual_diff_threshold: float = 0.08
    max_warmup_steps: int = 4
    taylorseer: bool = False

    def validate(self) -> None:
        if self.Fn_compute_blocks < 1 or self.Bn_compute_blocks < 0:
            raise ValueError("dbcache needs Fn_compute_blocks >= 1 and Bn_compute_blocks >= 0.")
        if self.residual_diff_threshold <= 0:
            raise ValueError("dbcache residual_diff_threshold must be > 0.")

    def not_applicable_reason(self, adapter: ModelAdapter, pipe: Any) -> str | None:
        if importlib.util.find_spec("cache_dit") is None:
            return "cache-dit is not installed (pip install 'diffusion-accel[peers]')"
        from .diffusers_caches import diffusers_cache_clash_reason

        reason = super().not_applicable_reason(adapter, pipe) or diffusers_cache_clash_reason(adapter, pipe)
        if reason is None:
            depth = len(adapter.get_blocks(pipe))
            if self.Fn_compute_blocks + self.Bn_compute_blocks >= depth:
                return (f"Fn_compute_blocks + Bn_compute_blocks = {self.Fn_compute_blocks + self.Bn_compute_blocks} "
                        f"leaves no block to cache in a {depth}-block model")
        return reason

    def build(self) -> Method:
        return CacheDiTMethod(self)


class CacheDiTMethod(Method):
    priority = 40

    def __init__(self, config: DBCacheConfig) -> None:
        super().__init__(config)
        self.config: DBCacheConfig = config
        self._gated_forward: tuple[Any, Any] | None = None

    def _cache_config(self, steps: int, separate_cfg: bool) -> Any:
        import cache_dit

        return cache_dit.DBCacheConfig(
            Fn_compute_blocks=self.config.Fn_compute_blocks, Bn_compute_blocks=self.config.Bn_compute_blocks,
            residual_diff_threshold=self.config.residual_diff_threshold,
            max_warmup_steps=self.config.max_warmup_steps, num_inference_steps=steps,
            enable_separate_cfg=separate_cfg,
        )

    def attach(self, session: AccelSession) -> None:
        import cache_dit

        calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if self.config.taylorseer else None
        denoiser = session.denoiser
        cache_dit.enable_cache(denoiser, cache_config=self._cache_config(
            20, session.adapter.cfg_layout == "separate"), calibrator_config=calibrator)
        cached = denoiser.__dict__.get("forward")
        uncached = getattr(denoiser, "_original_forward", None)
        self._gated_forward = None
        if cached is not None and uncached is not None:
            @functools.wraps(cached)
            def forward(*args: Any, **kwargs: Any) -> Any:
                return (cached if session.is_active() else uncached)(*args, **kwargs)

            denoiser.forward = forward
            self._gated_forward = (forward, cached)

    def on_call_begin(self, session: AccelSession) -> None:
        import cache_dit

        steps = int(session.call_args.get("num_inference_steps") or 20)
        separate = session.context.cfg_mode == "separate"
        cache_dit.refresh_context(session.denoiser, cache_config=self._cache_config(steps, separate), verbose=False)

    def detach(self, session: AccelSession) -> None:
        import cache_dit

        denoiser = session.denoiser
        if self._gated_forward is not None:
            gated, cached = self._gated_forward
            if denoiser.__dict__.get("forward") is gated:
                denoiser.forward = cached
            self._gated_forward = None
        original = denoiser.__dict__.get("_original_forward")
        if isinstance(original, functools.partial):
            # the forward cache-dit replaced was a Diffusers hook registry's (group offloading installs one on the
            # transformer): a functools.partial, which cache-dit 1.5.3 restores with ``__get__`` (AttributeError).
            # Put it back as it was; disable_cache then releases the rest.
            denoiser.forward = original
            del denoiser._original_forward
        cache_dit.disable_cache(denoiser)
