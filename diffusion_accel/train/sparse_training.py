"""A training student under block-sparse self-attention (Video-BLADE's sparsity-aware distillation).

The student must learn with the attention it will be sampled with, so training runs the inference method's own code:
:class:`~diffusion_accel.methods.sparse_attention.SparseAttentionMethod` (its per-layer SDPA routing, ASA / top-k /
sliding-tile masks and kernel dispatch) is attached to the student through a small stand-in for the session it
normally gets from ``diffusion_accel.apply``. The stand-in differs from a pipeline session in two ways a training
loop needs: its hooks act on every forward (there is no pipeline call to gate them to), and every forward gets fresh
masks, seeded deterministically by (optimizer step, micro-step, forward), so that a resumed run draws the masks an
uninterrupted one would. Autograd flows through the kernels that have a backward: the eager gather path on CPU
(what ``backend="auto"`` picks when gradients are needed there) and Triton on CUDA.
"""

from __future__ import annotations

import math
import re
from types import SimpleNamespace
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..context import StepContext

#: Forwards per (step, micro-step) the mask seeds leave room for (K rollout steps + the trained step, per call).
_SEED_STRIDE = 1000


def _split_items(text: str) -> list[str]:
    """``"a=1,b=[1,2,2]"`` → ``["a=1", "b=[1,2,2]"]`` (commas inside brackets belong to the value)."""
    return [item for item in re.split(r",(?![^\[\(]*[\]\)])", text) if item.strip()]


def parse_sparse_spec(spec: str):
    """``"asa:block_size=64,tau=0.9"`` → a validated ``SparseAttentionConfig`` (mask before the colon, the
    ``sparse_attention`` method's options after it); a ``ValueError`` naming the fix otherwise."""
    from ..config import parse_key_value
    from ..methods.sparse_attention import MASKS, SparseAttentionConfig

    mask, _, rest = spec.partition(":")
    mask = mask.strip()
    if mask not in MASKS:
        raise ValueError(f"--sparse_attention {spec!r}: start with the mask, one of {', '.join(MASKS)} (e.g. "
                         "'asa:block_size=64,tau=0.9').")
    options = dict(parse_key_value(item, "--sparse_attention") for item in _split_items(rest))
    if "mask" in options:
        raise ValueError("--sparse_attention names the mask before the colon; drop mask= from the options.")
    try:
        return SparseAttentionConfig.from_dict({"method": "sparse_attention", "mask": mask, **options})
    except TypeError as exc:
        raise ValueError(f"--sparse_attention {spec!r}: {exc}") from exc


def check_sparse_student(spec: str, pipe: Any, sample_shape: tuple[int, ...]):
    """The config of ``spec``, refused (``ValueError``) where the method cannot run on ``pipe``'s family or would
    leave every attention call of a ``sample_shape`` latent dense."""
    from ..pipelines.adapters import find_adapter

    config = parse_sparse_spec(spec)
    adapter = find_adapter(pipe)
    reason = config.not_applicable_reason(adapter, pipe)
    if reason:
        raise ValueError(f"--sparse_attention cannot train this teacher's student: {reason}.")
    tokens = image_tokens(sample_shape, adapter.get_denoiser(pipe).config, adapter.latent_layout)
    if tokens < config.min_tokens or tokens <= config.block_size:
        raise ValueError(f"--sparse_attention: the student's self-attention sees {tokens} tokens, so with "
                         f"block_size={config.block_size} and min_tokens={config.min_tokens} every call would "
                         "stay dense; lower block_size (and min_tokens) or train at a larger size.")
    return config


def image_tokens(sample_shape: tuple[int, ...], denoiser_config: Any, layout: str) -> int:
    """Self-attention tokens of one sample of latent shape ``sample_shape`` (without the batch dimension)."""
    patch = denoiser_config.get("patch_size", 1) or 1
    patch_hw = patch[-1] if isinstance(patch, (tuple, list)) else patch
    patch_t = (patch[0] if isinstance(patch, (tuple, list)) else denoiser_config.get("patch_size_t", 1)) or 1
    if layout in ("packed_image", "packed_video"):
        return int(sample_shape[0])
    if layout == "video":
        _, frames, height, width = sample_shape
        return (frames // patch_t) * (height // patch_hw) * (width // patch_hw)
    return math.prod(s // patch_hw for s in sample_shape[-2:])


class _FreshMasks(ModelHook):
    """On the student: before every forward, a new step index (the masks' seed) and an empty mask cache."""

    def __init__(self, owner: SparseStudent) -> None:
        super().__init__()
        self.owner = owner

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        self.owner.next_forward()
        return args, kwargs


class _TrainingSession:
    """What :class:`SparseAttentionMethod` reads from its session, for a module trained outside any pipeline call."""

    def __init__(self, pipe: Any, adapter: Any, student: torch.nn.Module, call_args: dict[str, Any]) -> None:
        self.pipe = pipe  # the teacher's pipeline: same classes and config, for the latent-grid facts
        self.adapter = adapter
        self.denoiser = student
        self.blocks = [block for name in adapter.block_lists for block in _module_list(student, name)]
        self.call_args = call_args
        self.context = StepContext()
        self.stats = SimpleNamespace(extra={})
        self.hooks: list[tuple[torch.nn.Module, str]] = []

    def register_hook(self, module: torch.nn.Module, hook: ModelHook, name: str) -> str:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
        self.hooks.append((module, name))
        return name


def _module_list(module: torch.nn.Module, dotted: str) -> list[torch.nn.Module]:
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return []
    return list(module)


class SparseStudent:
    """``config`` (a ``SparseAttentionConfig``) attached to the training module ``student``."""

    def __init__(self, config: Any, pipe: Any, student: torch.nn.Module, sample_shape: tuple[int, ...],
                 height: int, num_frames: int | None = None) -> None:
        from ..pipelines.adapters import find_adapter

        adapter = find_adapter(pipe)
        call_args = {"height": height, "width": height, "num_frames": num_frames}
        self.config = config
        self.method = config.build()
        self.session = _TrainingSession(pipe, adapter, student, call_args)
        self.method.attach(self.session)
        self.session.register_hook(student, _FreshMasks(self), "diffusion_accel.sparse_training")
        self.tokens = image_tokens(sample_shape, student.config, adapter.latent_layout)
        self._base = 0
        self._count = 0

    def begin(self, step: int, micro: int) -> None:
        """Seed the masks of the forwards that follow from (step, micro): the same in a resumed run."""
        self._base = (step * 64 + micro) * _SEED_STRIDE
        self._count = 0

    def next_forward(self) -> None:
        self.session.context.step_index = self._base + self._count
        self._count += 1
        self.method.on_call_begin(self.session)

    def density(self) -> float | None:
        """Mean kept-block fraction over the layers of the last forward (``None`` before any sparse call)."""
        records = self.session.stats.extra.get("sparse_attention", {}).get("density", [])
        return sum(r["density"] for r in records) / len(records) if records else None

    def remove(self) -> None:
        for module, name in reversed(self.session.hooks):
            registry = HookRegistry.check_if_exists_or_initialize(module)
            registry.remove_hook(name, recurse=False)
        self.session.hooks.clear()
