"""``load_pipeline``: ``from_pretrained`` plus the project names ``tiny:<family>`` and ``testbed:<name>``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .logs import configure_pipeline

#: The pipeline commands and benchmarks use when none is named: the shipped testbed PixArt ...
DEFAULT_PIPELINE = "testbed:pixart"
#: ... or, where its assets are not installed, the offline tiny PixArt.
FALLBACK_PIPELINE = "tiny:pixart_alpha"


def default_pipeline() -> str:
    """The shipped testbed pipeline when its assets are installed, else the offline tiny PixArt."""
    try:
        from .pipelines.testbed.registry import testbed_path

        testbed_path("pixart")
        return DEFAULT_PIPELINE
    except Exception:
        return FALLBACK_PIPELINE


def _testbed_path(name: str) -> Path:
    from .pipelines.testbed.registry import testbed_path

    try:
        return testbed_path(name)
    except FileNotFoundError as exc:
        raise ValueError(str(exc)) from exc


def load_pipeline(name_or_path: str | Path, **kwargs: Any) -> Any:
    """Load a pipeline by Hub-style path, local folder, or project name.

    * ``tiny:<family>``: a tiny random pipeline built offline (``diffusion_accel.testing.FAMILIES``);
      ``seed=`` picks its weights.
    * ``testbed:<name>``: a shipped tiny trained pipeline (``testbed:pixart``, ``testbed:flow``, the video
      ``testbed:wan``); ``tier="speed"`` gives the compute-realistic random-weight preset of the same
      architecture, ``tier="full-width"`` (image testbeds) the published model's block width at a truncated depth.
    * anything else goes to ``DiffusionPipeline.from_pretrained(name_or_path, **kwargs)``; a folder saved with a
      sampler contract (:mod:`diffusion_accel.pipelines.contract`) loads as its contract class, so a call with only
      a prompt samples the way the weights were trained.
    """
    return _supply_repeated_blocks(configure_pipeline(_load(name_or_path, **kwargs)))


def _supply_repeated_blocks(pipe: Any) -> Any:
    """Let ``compile_repeated_blocks`` work on families whose Diffusers class names no repeated blocks."""
    from .compile import ensure_repeated_blocks
    from .pipelines.adapters import find_adapter

    try:
        adapter = find_adapter(pipe)
    except ValueError:
        return pipe
    denoiser = adapter.get_denoiser(pipe)
    if isinstance(denoiser, torch.nn.Module):
        ensure_repeated_blocks(denoiser, adapter)
    return pipe


def _is_own_resshift_folder(path: Path) -> bool:
    from .pipelines.resshift.pipeline import is_own_resshift_folder

    return is_own_resshift_folder(path)


def _load(name_or_path: str | Path, **kwargs: Any) -> Any:
    text = str(name_or_path)
    if text.startswith("tiny:"):
        from .pipelines.tiny import FAMILIES, tiny_pipeline

        family = text.split(":", 1)[1]
        if family not in FAMILIES:
            raise ValueError(f"Unknown tiny family {family!r}. Choose one of: {', '.join(FAMILIES)}.")
        return tiny_pipeline(family, seed=int(kwargs.pop("seed", 0)))
    if text.startswith("testbed:"):
        name = text.split(":", 1)[1]
        tier = kwargs.pop("tier", "quality")
        from .pipelines.testbed.models import TIERS, build_speed_pipeline

        if tier not in TIERS:
            raise ValueError(f"Unknown testbed tier {tier!r}; use one of {', '.join(map(repr, TIERS))}.")
        if tier != "quality":
            return build_speed_pipeline(name, seed=int(kwargs.pop("seed", 0)), tier=tier)
        text = str(_testbed_path(name))
    from diffusers import DiffusionPipeline

    from .pipelines.contract import is_own_contract_folder

    path = Path(text)
    if not path.exists() and text.count("/") != 1:
        raise ValueError(
            f"{text!r} is neither a local folder nor a Hub id (org/name), nor a project name "
            "('tiny:<family>' or 'testbed:<name>')."
        )
    if path.is_dir() and (is_own_contract_folder(path) or _is_own_resshift_folder(path)):
        kwargs.setdefault("trust_remote_code", True)  # the folder's code is our own loader, checked verbatim
    return DiffusionPipeline.from_pretrained(text, **kwargs)


def base_call_kwargs(pipeline: str, tier: str = "quality") -> dict[str, Any]:
    """Default call arguments of a project pipeline name (testbed defaults, tiny sizes); ``{}`` otherwise."""
    if pipeline.startswith("tiny:"):
        from .pipelines.tiny import tiny_call_kwargs

        kwargs = tiny_call_kwargs(pipeline.split(":", 1)[1])
        kwargs.pop("prompt", None)
        return kwargs
    if pipeline.startswith("testbed:"):
        from .pipelines.testbed.models import speed_call_kwargs
        from .pipelines.testbed.registry import default_call_kwargs

        name = pipeline.split(":", 1)[1]
        kwargs = default_call_kwargs(name)
        if tier != "quality":
            kwargs.update(speed_call_kwargs(name, tier))
        return kwargs
    return {}
