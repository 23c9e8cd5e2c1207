"""Diffusers' own caches through the same ``apply``: FirstBlockCache, TaylorSeer, MagCache, PAB, FasterCache.

These apply Diffusers' own caches rather than re-implementing the peers, so that benchmarks compare against exactly
what Diffusers ships. On pipelines that never call ``cache_context`` (PixArt, SD3, DiT, LTX, ...) the session sets
the ``CacheContext`` these hooks need.

Where the denoiser mixes in ``CacheMixin`` we go through its ``enable_cache`` / ``disable_cache``, so that
``is_cache_enabled`` reads True while ours is on, Diffusers' own guard refuses a second cache, and a user's
``disable_cache()`` removes ours. Diffusers keeps one cache per model (its hooks have fixed names), so two pipelines
sharing a denoiser cannot both hold one: the second is refused with the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..config import MethodConfig, register_method
from ..diffusers_internals import (
    ATTENTION_CLASSES,
    CACHE_HOOK_NAMES,
    TRANSFORMER_BLOCK_LIST_NAMES,
    HookRegistry,
    block_metadata,
    cache_config_of,
    drop_cleared_cache_config,
    has_own_cache_config,
    hook_registry,
    unwrap_module,
)
from ..method import Method
from ..pipelines.adapters import families_where

if TYPE_CHECKING:
    from ..pipelines.adapters import ModelAdapter
    from ..session import AccelSession


def _diffusers_cache_table() -> dict[type, tuple[Any, tuple[str, ...]]]:
    """Per Diffusers cache config class: the ``apply_*`` function ``enable_cache`` dispatches to, and the names of
    the hooks it registers.

    The ``apply_*`` functions are used on models without ``CacheMixin`` (``PixArtTransformer2DModel`` and
    ``DiTTransformer2DModel``), which have no ``enable_cache``.
    """
    from diffusers import hooks

    applies = {
        hooks.FirstBlockCacheConfig: hooks.apply_first_block_cache,
        hooks.MagCacheConfig: hooks.apply_mag_cache,
        hooks.PyramidAttentionBroadcastConfig: hooks.apply_pyramid_attention_broadcast,
        hooks.FasterCacheConfig: hooks.apply_faster_cache,
        hooks.TaylorSeerCacheConfig: hooks.apply_taylorseer_cache,
    }
    return {cls: (apply, CACHE_HOOK_NAMES[cls.__name__]) for cls, apply in applies.items()}


def _diffusers_cache_api(config: Any) -> tuple[Any, tuple[str, ...]]:
    return _diffusers_cache_table()[type(config)]


def diffusers_cache_hooks_on(denoiser: torch.nn.Module) -> list[str]:
    """Names of Diffusers cache hooks registered anywhere in ``denoiser`` (by ``enable_cache`` or ``apply_*``)."""
    known = {name for _, names in _diffusers_cache_table().values() for name in names}
    found: set[str] = set()
    for module in denoiser.modules():
        registry = hook_registry(module)
        if registry is not None:
            found.update(name for name in registry.hooks if name in known)
    return sorted(found)


def diffusers_block_lists(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks Diffusers' FirstBlockCache and MagCache hook: every ``ModuleList`` child with a block-list name."""
    return [block for name, child in denoiser.named_children()
            if name in TRANSFORMER_BLOCK_LIST_NAMES and isinstance(child, torch.nn.ModuleList)
            for block in child]


def unregistered_block_reason(name: str, blocks: list[torch.nn.Module]) -> str | None:
    """Why ``name`` cannot read these blocks' streams: a block class missing from ``TransformerBlockRegistry``."""
    for block in blocks:
        cls = unwrap_module(block).__class__
        try:
            block_metadata(cls)
        except ValueError:
            return (f"{name} needs to know where {cls.__name__} keeps its hidden states; register it with "
                    "Diffusers' TransformerBlockRegistry via "
                    "diffusion_accel.diffusers_internals.register_block_class(cls, hidden_index, encoder_index)")
    return None


class DiffusersCacheMethod(Method):
    """Applies one of Diffusers' cache configs to the denoiser and removes it on detach."""

    uses_diffusers_cache_context = True
    priority = 40

    def attach(self, session: AccelSession) -> None:
        from diffusers.models.cache_utils import CacheMixin

        denoiser = session.denoiser
        self._diffusers_config = self.config.to_diffusers(session)
        apply_fn, self._hook_names = _diffusers_cache_api(self._diffusers_config)
        self._had_cache_attr = has_own_cache_config(denoiser)
        self._through_mixin = False
        if isinstance(denoiser, CacheMixin):
            denoiser.enable_cache(self._diffusers_config)
            self._through_mixin = True
            self._install_safe_disable(denoiser)
        else:
            apply_fn(denoiser, self._diffusers_config)
        HookRegistry.check_if_exists_or_initialize(denoiser).invalidate_child_registries_cache()

    def _install_safe_disable(self, denoiser: torch.nn.Module) -> None:
        """Let a user's ``disable_cache()`` remove our cache hooks even where other hooks were stacked on them.

        Diffusers unlinks hooks correctly only from the top of a chain; ours (the session's context hook above
        FasterCache's denoiser hook, a Δ-cache block hook above FirstBlockCache's) are stacked on top.
        """
        from ..session import relinked_hook_chains

        disable = type(denoiser).disable_cache

        def disable_cache() -> None:
            with relinked_hook_chains(list(denoiser.modules())):
                disable(denoiser)

        self._safe_disable = disable_cache
        denoiser.disable_cache = disable_cache

    def detach(self, session: AccelSession) -> None:
        denoiser = session.denoiser
        config = getattr(self, "_diffusers_config", None)
        if config is None:
            return
        safe_disable = getattr(self, "_safe_disable", None)
        if safe_disable is not None and denoiser.__dict__.get("disable_cache") is safe_disable:
            del denoiser.disable_cache
        self._safe_disable = None
        if self._through_mixin:
            if cache_config_of(denoiser) is config:
                denoiser.disable_cache()
            # else: the user's disable_cache() already removed it (and maybe enabled another one: leave that)
            if not self._had_cache_attr:
                drop_cleared_cache_config(denoiser)
        else:  # no CacheMixin, or enable_cache failed half-way: remove whatever hooks it registered
            registry = HookRegistry.check_if_exists_or_initialize(denoiser)
            for name in self._hook_names:
                registry.remove_hook(name, recurse=True)
            registry.invalidate_child_registries_cache()
        self._diffusers_config = None


def diffusers_cache_clash_reason(adapter: ModelAdapter, pipe: Any) -> str | None:
    """Why no further cache can go on this pipeline's denoiser: it already holds one (ours or the user's)."""
    from ..session import sessions_on

    denoiser = adapter.get_denoiser(pipe)
    for session in sessions_on(denoiser):
        held = [c.name for c in session.configs if c.exclusive_group == "diffusers_cache"]
        if held and session.pipe is not pipe:
            return (f"the {adapter.denoiser} is shared with another pipeline ({type(session.pipe).__name__}) that "
                    f"has diffusion_accel's {held[0]} on it, and a model holds one such cache at a time; call "
                    "diffusion_accel.remove(<that pipeline>) first, or give this pipeline its own "
                    f"{adapter.denoiser}")
    if getattr(denoiser, "is_cache_enabled", False) or diffusers_cache_hooks_on(denoiser):
        fix = (f"call pipe.{adapter.denoiser}.disable_cache() first" if hasattr(denoiser, "disable_cache")
               else "remove those hooks first")
        return f"the {adapter.denoiser} already has a Diffusers cache enabled; {fix}"
    return None


@dataclass
class _DiffusersCacheConfig(MethodConfig):
    families: ClassVar[tuple[str, ...] | None] = families_where(lambda a: bool(a.block_lists))
    exclusive_group: ClassVar[str] = "diffusers_cache"

    def not_applicable_reason(self, adapter: ModelAdapter, pipe: Any) -> str | None:
        reason = super().not_applicable_reason(adapter, pipe)
        return reason if reason is not None else diffusers_cache_clash_reason(adapter, pipe)

    def to_diffusers(self, session: AccelSession) -> Any:
        raise NotImplementedError

    def build(self) -> Method:
        return DiffusersCacheMethod(self)


@register_method
@dataclass
class FirstBlockCache(_DiffusersCacheConfig):
    """Diffusers' FirstBlockCache: skip all blocks after the first when its residual barely changed."""

    name: ClassVar[str] = "fbcache"
    summary: ClassVar[str] = "Diffusers FirstBlockCache (peer): reuse the tail residual when block 0 barely changes"
    threshold: float = 0.05

    def validate(self) -> None:
        if not self.threshold > 0:
            raise ValueError(f"fbcache threshold must be > 0 (got {self.threshold}); try 0.05-0.2.")

    def not_applicable_reason(self, adapter: ModelAdapter, pipe: Any) -> str | None:
        reason = super().not_applicable_reason(adapter, pipe)
        if reason is not None:
            return reason
        blocks = diffusers_block_lists(adapter.get_denoiser(pipe))
        if len(blocks) < 2:
            return (f"fbcache needs at least 2 transformer blocks (a first block that always runs and a tail to "
                    f"skip), and this {adapter.denoiser} has {len(blocks)}; use delta_cache or taylorseer instead")
        return unregistered_block_reason(self.name, blocks)

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
    #: ``"auto"``: the denoiser's compute dtype, so a bf16/fp16 pipeline's factors are not silently kept in float32.
    taylor_factors_dtype: str = "auto"
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
        if self.taylor_factors_dtype != "auto" and not isinstance(getattr(torch, self.taylor_factors_dtype, None),
                                                                  torch.dtype):
            raise ValueError(f"taylorseer taylor_factors_dtype {self.taylor_factors_dtype!r} is not a torch dtype; "
                             "use 'auto' (the model's dtype), 'float32' or 'bfloat16'.")

    def factors_dtype(self, denoiser: torch.nn.Module) -> torch.dtype:
        if self.taylor_factors_dtype != "auto":
            return getattr(torch, self.taylor_factors_dtype)
        # the compute dtype: fp8 storage (layerwise casting) computes in a wider dtype, float32 unless told
        dtypes = [p.dtype for p in denoiser.parameters() if p.is_floating_point() and p.element_size() >= 2]
        return max(set(dtypes), key=dtypes.count) if dtypes else torch.float32

    def to_diffusers(self, session: AccelSession) -> Any:
        from diffusers.hooks import TaylorSeerCacheConfig

        return TaylorSeerCacheConfig(
            cache_interval=self.cache_interval, disable_cache_before_step=self.disable_cache_before_step,
            disable_cache_after_step=self.disable_cache_after_step, max_order=self.max_order,
            taylor_factors_dtype=self.factors_dtype(session.denoiser), use_lite_mode=self.use_lite_mode,
            cache_identifiers=list(self.cache_identifiers or self.default_identifiers(session.adapter)),
        )

    def not_applicable_reason(self, adapter: ModelAdapter, pipe: Any) -> str | None:
        reason = super().not_applicable_reason(adapter, pipe)
        if reason is not None or self.use_lite_mode:
            return reason
        patterns = list(self.cache_identifiers or self.default_identifiers(adapter))
        names = [name for name, _ in adapter.get_denoiser(pipe).named_modules()]
        if not any(re.fullmatch(pattern, name) for pattern in patterns for name in names):
            return (f"no module of this {adapter.denoiser} matches cache_identifiers {patterns}, so taylorseer "
                    "would cache nothing; pass cache_identifiers that fullmatch module names "
                    "(e.g. r'^blocks\\.\\d+\\.attn1$')")
        return None

    @staticmethod
    def default_identifiers(adapter: ModelAdapter) -> list[str]:
        """Every attention module of every block list the adapter names."""
        return [rf"^{re.escape(name)}\.\d+\.attn\d*$" for name in adapter.block_lists]


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

    def not_applicable_reason(self, adapter: ModelAdapter, pipe: Any) -> str | None:
        reason = super().not_applicable_reason(adapter, pipe)
        if reason is not None:
            return reason
        blocks = diffusers_block_lists(adapter.get_denoiser(pipe))
        if not blocks:
            return (f"magcache hooks the blocks in the {adapter.denoiser}'s block lists and found none; its block "
                    "lists must be ModuleLists named like Diffusers' (transformer_blocks, blocks, ...)")
        return unregistered_block_reason(self.name, blocks)

    def to_diffusers(self, session: AccelSession) -> Any:
        from diffusers.hooks import MagCacheConfig

        ratios = None if self.mag_ratios is None else torch.tensor(self.mag_ratios)
        return MagCacheConfig(
            threshold=self.threshold, max_skip_steps=self.max_skip_steps, retention_ratio=self.retention_ratio,
            num_inference_steps=self.num_inference_steps, mag_ratios=ratios, calibrate=ratios is None,
        )


def _no_attention_reason(name: str, adapter: ModelAdapter, pipe: Any) -> str | None:
    denoiser = adapter.get_denoiser(pipe)
    if not any(isinstance(m, ATTENTION_CLASSES) for m in denoiser.modules()):
        return (f"{name} caches the outputs of Diffusers attention modules and this {adapter.denoiser} has none; "
                "use a block cache (delta_cache, fbcache) instead")
    return None


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

    def not_applicable_reason(self, adapter: ModelAdapter, pipe: Any) -> str | None:
        return super().not_applicable_reason(adapter, pipe) or _no_attention_reason(self.name, adapter, pipe)

    def to_diffusers(self, session: AccelSession) -> Any:
        from diffusers.hooks import PyramidAttentionBroadcastConfig

        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=self.spatial_attention_block_skip_range,
            spatial_attention_timestep_skip_range=tuple(self.spatial_attention_timestep_skip_range),
            current_timestep_callback=lambda: session.context.timestep,
        )


def _fastercache_fits(adapter: ModelAdapter) -> bool:
    """FasterCache splits one batched CFG forward as [uncond, cond] and filters the output's spatial frequencies:
    it needs that batch order and latents with spatial axes (not packed tokens)."""
    return (bool(adapter.block_lists) and adapter.cfg_layout == "batched" and adapter.uncond_first
            and adapter.tensor_format is not None)


@register_method
@dataclass
class FasterCache(_DiffusersCacheConfig):
    """Diffusers' FasterCache: reuse attention outputs and the unconditional batch half (batched CFG only)."""

    name: ClassVar[str] = "fastercache"
    families: ClassVar[tuple[str, ...] | None] = families_where(_fastercache_fits)
    summary: ClassVar[str] = "Diffusers FasterCache (peer): attention reuse + frequency-corrected CFG cache"
    spatial_attention_block_skip_range: int = 2
    unconditional_batch_skip_range: int = 5

    def validate(self) -> None:
        if self.spatial_attention_block_skip_range < 1 or self.unconditional_batch_skip_range < 1:
            raise ValueError("fastercache skip ranges must be >= 1.")

    def not_applicable_reason(self, adapter: ModelAdapter, pipe: Any) -> str | None:
        return super().not_applicable_reason(adapter, pipe) or _no_attention_reason(self.name, adapter, pipe)

    def to_diffusers(self, session: AccelSession) -> Any:
        from diffusers.hooks import FasterCacheConfig

        return FasterCacheConfig(
            spatial_attention_block_skip_range=self.spatial_attention_block_skip_range,
            unconditional_batch_skip_range=self.unconditional_batch_skip_range,
            tensor_format=session.adapter.tensor_format,
            is_guidance_distilled=False,
            current_timestep_callback=lambda: session.context.timestep,
            attention_weight_callback=lambda _module: 0.5,
        )
