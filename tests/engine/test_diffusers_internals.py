"""Every private Diffusers name diffusion-accel uses still exists: a Diffusers upgrade fails here, by name."""

from __future__ import annotations

import importlib

import pytest
import torch

from diffusion_accel import diffusers_internals as internals


@pytest.mark.parametrize(("module", "name"), internals.PRIVATE_NAMES, ids=lambda v: v)
def test_private_name_resolves(module: str, name: str) -> None:
    try:
        internals._private(module, name)
    except ImportError as exc:
        pytest.fail(f"Diffusers no longer has {module}.{name}: {exc}")


def test_private_instance_attributes_exist() -> None:
    hooks = importlib.import_module("diffusers.hooks.hooks")
    module = torch.nn.Linear(2, 2)
    registry = internals.HookRegistry.check_if_exists_or_initialize(module)
    missing = []
    if internals.hook_registry(module) is not registry:
        missing.append("torch.nn.Module._diffusers_hook (where HookRegistry keeps itself)")
    if not hasattr(registry, "_fn_refs"):
        missing.append("diffusers.hooks.hooks.HookRegistry._fn_refs")
    if not hasattr(hooks.StateManager(hooks.BaseState), "_context"):
        missing.append("diffusers.hooks.hooks.StateManager._context")
    assert not missing, f"Diffusers {internals.diffusers.__version__} lacks private attributes we use: {missing}"
    assert len(internals.PRIVATE_INSTANCE_ATTRIBUTES) == 3  # each one is checked above


def test_every_cache_config_has_its_hook_names() -> None:
    from diffusers import hooks

    for config in ("FirstBlockCacheConfig", "MagCacheConfig", "PyramidAttentionBroadcastConfig",
                   "FasterCacheConfig", "TaylorSeerCacheConfig"):
        assert hasattr(hooks, config), f"diffusers.hooks.{config} is gone"
        assert internals.CACHE_HOOK_NAMES[config], config
