"""Diffusers' own caches through the same ``apply``: FirstBlockCache, TaylorSeer, MagCache, PAB, FasterCache.

These wrap ``ModelMixin.enable_cache`` rather than re-implementing the peers, so that benchmarks compare against
exactly what Diffusers ships. On pipelines that never call ``cache_context`` (PixArt, SD3, DiT, LTX, ...) the
session sets the ``CacheContext`` these hooks need.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..config import MethodConfig, register_method
from ..method import Method

if TYPE_CHECKING:
    from ..pipelines.adapters import ModelAdapter
    from ..session import AccelSession

_TRANSFORMER_FAMILIES = ("dit", "pixart_alpha", "pixart_sigma", "sd3", "flux", "cogvideox", "wan",
                         "hunyuan_video", "ltx_video")


def _diffusers_cache_api(config: Any) -> tuple[Any, tuple[str, ...]]:
    """The ``apply_*`` function Diffusers' ``enable_cache`` dispatches to, and the hook names it registers.

    We call the ``apply_*`` functions directly instead of ``enable_cache`` because not every Diffusers model mixes
    in ``CacheMixin`` (``PixArtTransformer2DModel`` and ``DiTTransformer2DModel`` do not).
    """
    from diffusers import hooks
    from diffusers.hooks import faster_cache, first_block_cache, mag_cache, pyramid_attention_broadcast
    from diffusers.hooks import taylorseer_cache as taylorseer

    table = {
        hooks.FirstBlockCacheConfig: (hooks.apply_first_block_cache,
                                      (first_block_cache._FBC_LEADER_BLOCK_HOOK, first_block_cache._FBC_BLOCK_HOOK)),
        hooks.MagCacheConfig: (hooks.apply_mag_cache,
                               (mag_cache._MAG_CACHE_LEADER_BLOCK_HOOK, mag_cache._MAG_CACHE_BLOCK_HOOK)),
        hooks.PyramidAttentionBroadcastConfig: (hooks.apply_pyramid_attention_broadcast,
                                                (pyramid_attention_broadcast._PYRAMID_ATTENTION_BROADCAST_HOOK,)),
        hooks.FasterCacheConfig: (hooks.apply_faster_cache,
                                  (faster_cache._FASTER_CACHE_DENOISER_HOOK, faster_cache._FASTER_CACHE_BLOCK_HOOK)),
        hooks.TaylorSeerCacheConfig: (hooks.apply_taylorseer_cache, (taylorseer._TAYLORSEER_CACHE_HOOK,)),
    }
    return table[type(config)]


class DiffusersCacheMethod(Method):
    """Applies one of Diffusers' cache configs to the denoiser and removes its hooks on detach."""

    uses_diffusers_cache_context = True
    priority = 40

    def attach(self, session: AccelSession) -> None:
        from diffusers.hooks import HookRegistry

        diffusers_config = self.config.to_diffusers(session)
        apply_fn, self._hook_names = _diffusers_cache_api(diffusers_config)
        apply_fn(session.denoiser, diffusers_config)
        HookRegistry.check_if_exists_or_initialize(session.denoiser).invalidate_child_registries_cache()

    def detach(self, session: AccelSession) -> None:
        from diffusers.hooks import HookRegistry

        registry = HookRegistry.check_if_exists_or_initialize(session.denoiser)
        for name in getattr(self, "_hook_names", ()):
            registry.remove_hook(name, recurse=True)
        registry.invalidate_child_registries_cache()


@dataclass
class _DiffusersCacheConfig(MethodConfig):
    families: ClassVar[tuple[str, ...] | None] = _TRANSFORMER_FAMILIES
    exclusive_group: ClassVar[str] = "diffusers_cache"

    def not_applicable_reason(self, adapter: ModelAdapter, pipe: Any) -> str | None:
        reason = super().not_applicable_reason(adapter, pipe)
        if reason is None and getattr(adapter.get_denoiser(pipe), "is_cache_enabled", False):
            return (f"the {adapter.denoiser} already has a Diffusers cache enabled; call "
                    f"pipe.{adapter.denoiser}.disable_cache() first")
        return reason

    def to_diffusers(self, session: AccelSession) -> Any:
        raise NotImplementedError

    def build(self) -> Method:
        return DiffusersCacheMethod(self)


@register_method
@dataclass
class FirstBlockCache(_DiffusersCacheConfig):
    """Diffusers' FirstBlockCache: skip all blocks after the first when its residual barely changed."""

    name: ClassVar[str] = "fbcache"
    # Diffusers 0.42.1's FirstBlockCache subtracts SD3's `None` encoder states from its context_pre_only last
    # block (TypeError), so SD3 is left out until that is fixed upstream.
    families: ClassVar[tuple[str, ...] | None] = tuple(f for f in _TRANSFORMER_FAMILIES if f != "sd3")
    summary: ClassVar[str] = "Diffusers FirstBlockCache (peer): reuse the tail residual when block 0 barely changes"
    threshold: float = 0.05

    def validate(self) -> None:
        if not self.threshold > 0:
            raise ValueError(f"fbcache threshold must be > 0 (got {self.threshold}); try 0.05-0.2.")

    def to_diffusers(self, session: AccelSession) -> Any:
        from diffusers.hooks import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=self.threshold)


@register_method
@dataclass
class TaylorSeerCache(_DiffusersCacheConfig):
    """Diffusers' TaylorSeer: predict attention outputs by a Taylor expansion between full steps."""

    name: ClassVar[str] = "taylorseer"
    summary: ClassVar[str] = "Diffusers TaylorSeer (peer): Taylor-extrapolate cached features between full steps"
    cache_interval: int = 5
    disable_cache_before_step: int = 3
    disable_cache_after_step: int | None = None
    max_order: int = 1
    taylor_factors_dtype: str = "float32"
    use_lite_mode: bool = False
    #: Regexes (``re.fullmatch`` on module names) of the modules whose outputs are cached. ``None``: every attention
    #: module inside the adapter's block lists (``<blocks>.<i>.attn``, ``attn1``, ``attn2``, ...). We do not use
    #: Diffusers' default (``^transformer_blocks.*attn`` under ``fullmatch``): it matches Flux's ``attn`` but no
    #: ``attn1``/``attn2``, so on PixArt, DiT, Wan, CogVideoX ... TaylorSeer would silently cache nothing.
    cache_identifiers: tuple[str, ...] | None = None

    def validate(self) -> None:
        if self.cache_interval < 1:
            raise ValueError(f"taylorseer cache_interval must be >= 1 (got {self.cache_interval}).")
        if self.max_order < 0:
            raise ValueError(f"taylorseer max_order must be >= 0 (got {self.max_order}).")
        if not isinstance(getattr(torch, self.taylor_factors_dtype, None), torch.dtype):
            raise ValueError(f"taylorseer taylor_factors_dtype {self.taylor_factors_dtype!r} is not a torch dtype; "
                             "use 'float32' or 'bfloat16'.")

    def to_diffusers(self, session: AccelSession) -> Any:
        from diffusers.hooks import TaylorSeerCacheConfig

        return TaylorSeerCacheConfig(
            cache_interval=self.cache_interval, disable_cache_before_step=self.disable_cache_before_step,
            disable_cache_after_step=self.disable_cache_after_step, max_order=self.max_order,
            taylor_factors_dtype=getattr(torch, self.taylor_factors_dtype), use_lite_mode=self.use_lite_mode,
            cache_identifiers=list(self.cache_identifiers or self.default_identifiers(session)),
        )

    @staticmethod
    def default_identifiers(session: AccelSession) -> list[str]:
        """Every attention module of every block list the adapter names."""
        return [rf"^{re.escape(name)}\.\d+\.attn\d*$" for name in session.adapter.block_lists]


@register_method
@dataclass
class MagCache(_DiffusersCacheConfig):
    """Diffusers' MagCache. Without ``mag_ratios`` it runs in calibrate mode (full compute, logs the ratios)."""

    name: ClassVar[str] = "magcache"
    summary: ClassVar[str] = "Diffusers MagCache (peer): skip by accumulated residual-magnitude ratio"
    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    num_inference_steps: int = 20
    mag_ratios: tuple[float, ...] | None = None

    def validate(self) -> None:
        if not 0 <= self.retention_ratio < 1:
            raise ValueError(f"magcache retention_ratio must be in [0, 1) (got {self.retention_ratio}).")
        if self.max_skip_steps < 1:
            raise ValueError(f"magcache max_skip_steps must be >= 1 (got {self.max_skip_steps}).")

    def to_diffusers(self, session: AccelSession) -> Any:
        from diffusers.hooks import MagCacheConfig

        ratios = None if self.mag_ratios is None else torch.tensor(self.mag_ratios)
        return MagCacheConfig(
            threshold=self.threshold, max_skip_steps=self.max_skip_steps, retention_ratio=self.retention_ratio,
            num_inference_steps=self.num_inference_steps, mag_ratios=ratios, calibrate=ratios is None,
        )


@register_method
@dataclass
class PyramidAttentionBroadcast(_DiffusersCacheConfig):
    """Diffusers' Pyramid Attention Broadcast: reuse spatial attention outputs for N calls."""

    name: ClassVar[str] = "pab"
    summary: ClassVar[str] = "Diffusers Pyramid Attention Broadcast (peer): reuse attention outputs"
    spatial_attention_block_skip_range: int = 2
    spatial_attention_timestep_skip_range: tuple[int, int] = (100, 800)

    def validate(self) -> None:
        if self.spatial_attention_block_skip_range < 1:
            raise ValueError("pab spatial_attention_block_skip_range must be >= 1.")
        lo, hi = self.spatial_attention_timestep_skip_range
        if lo >= hi:
            raise ValueError(f"pab spatial_attention_timestep_skip_range must be (low, high) with low < high, "
                             f"got {self.spatial_attention_timestep_skip_range}.")

    def to_diffusers(self, session: AccelSession) -> Any:
        from diffusers.hooks import PyramidAttentionBroadcastConfig

        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=self.spatial_attention_block_skip_range,
            spatial_attention_timestep_skip_range=tuple(self.spatial_attention_timestep_skip_range),
            current_timestep_callback=lambda: session.context.timestep,
        )


# FasterCache splits the batch as [uncond, cond]: DiT (cond first) and separate-pass pipelines are left out, and
# on SD3 Diffusers 0.42.1's FasterCache returns a batch of the wrong size (2 images for 1; tests/test_families.py).
_TENSOR_FORMAT = {"cogvideox": "BFCHW", "pixart_alpha": "BCHW", "pixart_sigma": "BCHW"}


@register_method
@dataclass
class FasterCache(_DiffusersCacheConfig):
    """Diffusers' FasterCache: reuse attention outputs and the unconditional batch half (batched CFG only)."""

    name: ClassVar[str] = "fastercache"
    families: ClassVar[tuple[str, ...] | None] = tuple(_TENSOR_FORMAT)
    summary: ClassVar[str] = "Diffusers FasterCache (peer): attention reuse + frequency-corrected CFG cache"
    spatial_attention_block_skip_range: int = 2
    unconditional_batch_skip_range: int = 5

    def validate(self) -> None:
        if self.spatial_attention_block_skip_range < 1 or self.unconditional_batch_skip_range < 1:
            raise ValueError("fastercache skip ranges must be >= 1.")

    def to_diffusers(self, session: AccelSession) -> Any:
        from diffusers.hooks import FasterCacheConfig

        return FasterCacheConfig(
            spatial_attention_block_skip_range=self.spatial_attention_block_skip_range,
            unconditional_batch_skip_range=self.unconditional_batch_skip_range,
            tensor_format=_TENSOR_FORMAT[session.adapter.family],
            is_guidance_distilled=False,
            current_timestep_callback=lambda: session.context.timestep,
            attention_weight_callback=lambda _module: 0.5,
        )
