"""Every use of Diffusers' private API, in one place.

The hook engine stacks on Diffusers' ``HookRegistry`` and reads tables Diffusers keeps for its own caches; none of
that is public API and any Diffusers release may rename it. The rest of diffusion-accel reaches those names only
through the small functions and constants here, so a Diffusers upgrade that breaks one fails in this module (at
import, with the missing name spelled out) and in ``tests/engine/test_diffusers_internals.py``, not somewhere deep
in a pipeline call.

What is used, and why:

* the hook registry a module carries (``module._diffusers_hook``) and its hooks in registration order
  (``HookRegistry._fn_refs``): gating, relinking and hoisting compiled regions below our hooks;
* the cache context: ``_set_cache_context`` (set the context Diffusers' caches read on pipelines that never call
  ``cache_context``) and ``StateManager._context`` (which CFG pass is running);
* ``TransformerBlockRegistry`` / ``TransformerBlockMetadata`` (``hooks._helpers``): where a block class keeps its
  hidden states, the same table Diffusers' block caches read;
* ``hooks._common``: the block-list names Diffusers' block caches hook and its attention classes;
* the hook names each of Diffusers' caches registers, and ``CacheMixin._cache_config``;
* ``ModelMixin._parallel_config`` and ``_repeated_blocks``;
* the latent (un)packing static methods of packed-latent pipelines (``_pack_latents``, ``_unpack_latents``,
  ``_prepare_latent_image_ids``).
"""

from __future__ import annotations

import importlib
from typing import Any

import diffusers
import torch


def _private(module: str, name: str) -> Any:
    """``module.name`` (``name`` may be dotted), or an ImportError that names exactly what this Diffusers lacks."""
    try:
        obj: Any = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ImportError(
            f"diffusion-accel uses {module}.{name} from Diffusers' private API and Diffusers {diffusers.__version__} "
            "has no such name; adapt diffusion_accel/diffusers_internals.py to this Diffusers release"
        ) from exc
    return obj


#: Every private class-level Diffusers name used here, as (module, name). Those the hook engine needs are resolved
#: when this module is imported; the test resolves every one, so that it can name what is missing.
PRIVATE_NAMES: tuple[tuple[str, str], ...] = (
    ("diffusers.hooks.hooks", "HookRegistry"),
    ("diffusers.hooks.hooks", "BaseState"),
    ("diffusers.hooks.hooks", "CacheContext"),
    ("diffusers.hooks.hooks", "StateManager"),
    ("diffusers.hooks.hooks", "_set_cache_context"),
    ("diffusers.hooks._helpers", "TransformerBlockMetadata"),
    ("diffusers.hooks._helpers", "TransformerBlockMetadata._get_parameter_from_args_kwargs"),
    ("diffusers.hooks._helpers", "TransformerBlockRegistry"),
    ("diffusers.hooks._helpers", "TransformerBlockRegistry._register"),
    ("diffusers.hooks._helpers", "TransformerBlockRegistry._registry"),
    ("diffusers.hooks._common", "_ALL_TRANSFORMER_BLOCK_IDENTIFIERS"),
    ("diffusers.hooks._common", "_ATTENTION_CLASSES"),
    ("diffusers.hooks.first_block_cache", "_FBC_LEADER_BLOCK_HOOK"),
    ("diffusers.hooks.first_block_cache", "_FBC_BLOCK_HOOK"),
    ("diffusers.hooks.mag_cache", "_MAG_CACHE_LEADER_BLOCK_HOOK"),
    ("diffusers.hooks.mag_cache", "_MAG_CACHE_BLOCK_HOOK"),
    ("diffusers.hooks.pyramid_attention_broadcast", "_PYRAMID_ATTENTION_BROADCAST_HOOK"),
    ("diffusers.hooks.faster_cache", "_FASTER_CACHE_DENOISER_HOOK"),
    ("diffusers.hooks.faster_cache", "_FASTER_CACHE_BLOCK_HOOK"),
    ("diffusers.hooks.taylorseer_cache", "_TAYLORSEER_CACHE_HOOK"),
    ("diffusers.models.cache_utils", "CacheMixin._cache_config"),
    ("diffusers.models.modeling_utils", "ModelMixin._repeated_blocks"),
    ("diffusers.models.modeling_utils", "ModelMixin._parallel_config"),
    ("diffusers.utils.torch_utils", "unwrap_module"),
    ("diffusers", "FluxPipeline._pack_latents"),
    ("diffusers", "FluxPipeline._unpack_latents"),
    ("diffusers", "FluxPipeline._prepare_latent_image_ids"),
    ("diffusers", "LTXPipeline._pack_latents"),
    ("diffusers", "LTXPipeline._unpack_latents"),
)

#: Instance attributes (set in ``__init__``, so not resolvable on the class) that the test checks on real objects.
PRIVATE_INSTANCE_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("diffusers.hooks.hooks.HookRegistry", "_fn_refs"),
    ("diffusers.hooks.hooks.StateManager", "_context"),
    ("torch.nn.Module with a HookRegistry", "_diffusers_hook"),
)

HookRegistry = _private("diffusers.hooks.hooks", "HookRegistry")
BaseState = _private("diffusers.hooks.hooks", "BaseState")
CacheContext = _private("diffusers.hooks.hooks", "CacheContext")
StateManager = _private("diffusers.hooks.hooks", "StateManager")
TransformerBlockMetadata = _private("diffusers.hooks._helpers", "TransformerBlockMetadata")
TransformerBlockRegistry = _private("diffusers.hooks._helpers", "TransformerBlockRegistry")
unwrap_module = _private("diffusers.utils.torch_utils", "unwrap_module")
_set_cache_context = _private("diffusers.hooks.hooks", "_set_cache_context")

#: Names of the ``ModuleList`` children Diffusers' FirstBlockCache and MagCache hook (``transformer_blocks``, ...).
TRANSFORMER_BLOCK_LIST_NAMES: tuple[str, ...] = tuple(
    _private("diffusers.hooks._common", "_ALL_TRANSFORMER_BLOCK_IDENTIFIERS"))
#: The attention module classes Diffusers' attention caches (PAB, FasterCache) hook.
ATTENTION_CLASSES: tuple[type, ...] = tuple(_private("diffusers.hooks._common", "_ATTENTION_CLASSES"))

#: The names of the hooks each Diffusers cache registers, by the name of its config class.
CACHE_HOOK_NAMES: dict[str, tuple[str, ...]] = {
    "FirstBlockCacheConfig": (_private("diffusers.hooks.first_block_cache", "_FBC_LEADER_BLOCK_HOOK"),
                              _private("diffusers.hooks.first_block_cache", "_FBC_BLOCK_HOOK")),
    "MagCacheConfig": (_private("diffusers.hooks.mag_cache", "_MAG_CACHE_LEADER_BLOCK_HOOK"),
                       _private("diffusers.hooks.mag_cache", "_MAG_CACHE_BLOCK_HOOK")),
    "PyramidAttentionBroadcastConfig": (
        _private("diffusers.hooks.pyramid_attention_broadcast", "_PYRAMID_ATTENTION_BROADCAST_HOOK"),),
    "FasterCacheConfig": (_private("diffusers.hooks.faster_cache", "_FASTER_CACHE_DENOISER_HOOK"),
                          _private("diffusers.hooks.faster_cache", "_FASTER_CACHE_BLOCK_HOOK")),
    "TaylorSeerCacheConfig": (_private("diffusers.hooks.taylorseer_cache", "_TAYLORSEER_CACHE_HOOK"),),
}

_REGISTRY_ATTR = "_diffusers_hook"
_CACHE_CONFIG_ATTR = "_cache_config"
_REPEATED_BLOCKS_ATTR = "_repeated_blocks"
_PARALLEL_CONFIG_ATTR = "_parallel_config"


# ---------------------------------------------------------------------------------------------- hook registries
def hook_registry(module: torch.nn.Module) -> Any | None:
    """The ``HookRegistry`` ``module`` carries itself (not inherited, not created), or None."""
    return module.__dict__.get(_REGISTRY_ATTR)


def has_hook_registry(module: torch.nn.Module) -> bool:
    return _REGISTRY_ATTR in module.__dict__


def drop_hook_registry(module: torch.nn.Module) -> None:
    """Remove the (empty) ``HookRegistry`` from ``module``, as before any hook was registered on it."""
    module.__dict__.pop(_REGISTRY_ATTR, None)


def hook_fn_refs(registry: Any) -> list[Any]:
    """The registry's ``HookFunctionReference`` objects, in registration order (innermost first)."""
    return list(registry._fn_refs)


# ---------------------------------------------------------------------------------------------- cache context
def set_cache_context(module: torch.nn.Module, context: Any | None) -> None:
    """Set (or clear with None) the ``CacheContext`` every stateful hook under ``module`` reads."""
    _set_cache_context(module, context)


def current_cache_context(state_manager: Any) -> Any | None:
    """The ``CacheContext`` a hook's ``StateManager`` holds, or None outside ``cache_context`` (no error)."""
    return state_manager._context


def cache_config_of(denoiser: torch.nn.Module) -> Any | None:
    """The cache config ``CacheMixin.enable_cache`` set on ``denoiser`` (None when none is enabled)."""
    return getattr(denoiser, _CACHE_CONFIG_ATTR, None)


def has_own_cache_config(denoiser: torch.nn.Module) -> bool:
    """Whether ``denoiser`` holds ``_cache_config`` as an instance attribute (not only the class default)."""
    return _CACHE_CONFIG_ATTR in denoiser.__dict__


def drop_cleared_cache_config(denoiser: torch.nn.Module) -> None:
    """Remove the instance ``_cache_config`` that ``disable_cache`` left set to None (the class default remains)."""
    if denoiser.__dict__.get(_CACHE_CONFIG_ATTR, ...) is None:
        del denoiser.__dict__[_CACHE_CONFIG_ATTR]


# ---------------------------------------------------------------------------------------------- transformer blocks
def block_metadata(block_class: type) -> Any:
    """The ``TransformerBlockMetadata`` Diffusers registered for ``block_class``; ValueError if it has none."""
    return TransformerBlockRegistry.get(block_class)


def block_argument(metadata: Any, name: str, args: tuple, kwargs: dict) -> Any:
    """The block call's argument ``name``, positional or keyword, as Diffusers' block caches read it."""
    return metadata._get_parameter_from_args_kwargs(name, args, kwargs)


def register_block_class(block_class: type, hidden_index: int, encoder_index: int | None,
                         encoder_argument: str = "encoder_hidden_states",
                         hidden_argument: str = "hidden_states") -> None:
    """Tell ``TransformerBlockRegistry`` where ``block_class`` returns its streams, unless Diffusers already does.

    ``encoder_argument``: the ``forward`` argument holding the second stream's input, when it is not
    ``encoder_hidden_states`` (LTX-2's blocks carry the audio tokens as ``audio_hidden_states``).
    ``hidden_argument``: the ``forward`` argument holding the hidden states, when it is not ``hidden_states``
    (Z-Image's blocks take ``x``). Diffusers' own entry is replaced only when it names an argument the block's
    ``forward`` does not have (Diffusers 0.42.1 registers Z-Image's block with ``hidden_states``, so every block
    cache fails on it); a correct entry of a later release is left alone."""
    import inspect

    TransformerBlockRegistry._register()  # Diffusers fills its own entries lazily: before we look
    current = TransformerBlockRegistry._registry.get(block_class)
    if current is not None:
        parameters = inspect.signature(block_class.forward).parameters
        names = [current.hidden_states_argument_name]
        if current.return_encoder_hidden_states_index is not None:
            names.append(current.encoder_hidden_states_argument_name)
        if all(name in parameters for name in names):
            return
    TransformerBlockRegistry.register(block_class, TransformerBlockMetadata(
        return_hidden_states_index=hidden_index, return_encoder_hidden_states_index=encoder_index,
        hidden_states_argument_name=hidden_argument, encoder_hidden_states_argument_name=encoder_argument))


# ---------------------------------------------------------------------------------------------- model attributes
def repeated_blocks(denoiser: torch.nn.Module) -> Any:
    """``ModelMixin._repeated_blocks``: the block class names ``compile_repeated_blocks`` compiles."""
    return getattr(denoiser, _REPEATED_BLOCKS_ATTR, None)


def set_repeated_blocks(denoiser: torch.nn.Module, names: list[str]) -> None:
    """Set ``_repeated_blocks`` on this instance only (the class, and other models of it, are left alone)."""
    setattr(denoiser, _REPEATED_BLOCKS_ATTR, names)


def drop_repeated_blocks(denoiser: torch.nn.Module) -> None:
    """Undo :func:`set_repeated_blocks`."""
    denoiser.__dict__.pop(_REPEATED_BLOCKS_ATTR, None)


def parallel_config(denoiser: Any) -> Any | None:
    """``ModelMixin._parallel_config``: set by ``enable_parallelism`` (None without context parallelism)."""
    return getattr(denoiser, _PARALLEL_CONFIG_ATTR, None)


# ---------------------------------------------------------------------------------------------- packed latents
def pack_latents(pipeline_class: type, *args: Any) -> torch.Tensor:
    """``pipeline_class._pack_latents(*args)``: spatial latents to the pipeline's token sequence."""
    return pipeline_class._pack_latents(*args)


def unpack_latents(pipeline_class: type, *args: Any) -> torch.Tensor:
    """``pipeline_class._unpack_latents(*args)``: the inverse of :func:`pack_latents`."""
    return pipeline_class._unpack_latents(*args)


def prepare_latent_image_ids(pipeline_class: type, *args: Any) -> torch.Tensor:
    """``pipeline_class._prepare_latent_image_ids(*args)``: Flux's positional ids of the packed latent tokens."""
    return pipeline_class._prepare_latent_image_ids(*args)
