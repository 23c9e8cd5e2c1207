"""Shared pieces of the two diagnostics (``cache_error``, ``perturbation_control``): loading a pipeline with the
bench's prompts and call arguments, and reading a batched-CFG denoiser output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..batching import output_sample


@dataclass
class DiagnosisSetup:
    """A loaded pipeline with the bench's defaults: ``probe`` is the call arguments of its first prompt."""

    pipeline: str
    pipe: Any
    adapter: Any
    base_kwargs: dict[str, Any]
    prompts: list[str]
    probe: dict[str, Any]
    steps: int | None
    guidance_scale: float | None

    @property
    def scale(self) -> float:
        """The CFG scale s of the calls (1 when CFG is off)."""
        return float(self.probe.get(self.adapter.cfg_scale_arg) or 1.0)

    def call_kwargs(self, prompts: list[str], seeds: list[int]) -> dict[str, Any]:
        from ..bench import call_kwargs

        return call_kwargs(self.pipe, self.adapter.family, prompts, self.base_kwargs, self.steps,
                            self.guidance_scale, None, seeds)


def load_setup(pipeline: str, num_prompts: int, steps: int | None, guidance_scale: float | None,
               seed: int) -> DiagnosisSetup:
    """Load ``pipeline`` (testbed names on the quality tier) with the bench's prompts and call defaults."""
    import diffusion_accel as da

    from ..bench import call_kwargs
    from ..loading import base_call_kwargs
    from ..prompts import bench_prompts

    pipe = da.load_pipeline(pipeline, tier="quality") if pipeline.startswith("testbed:") else da.load_pipeline(
        pipeline)
    pipe.set_progress_bar_config(disable=True)
    adapter = da.find_adapter(pipe)
    base = base_call_kwargs(pipeline, "quality")
    prompts = bench_prompts(pipeline, num_prompts, None)
    probe = call_kwargs(pipe, adapter.family, prompts[:1], base, steps, guidance_scale, None, [seed])
    return DiagnosisSetup(pipeline, pipe, adapter, base, prompts, probe, steps, guidance_scale)


def prediction(output: Any, adapter: Any) -> torch.Tensor:
    """The denoiser's prediction tensor (the first half of the channels for learned-σ models)."""
    sample = output_sample(output)
    return sample.chunk(2, dim=1)[0] if adapter.learned_sigma else sample


def branches(pred: torch.Tensor, adapter: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(uncond, cond)`` halves of a batched-CFG prediction."""
    first, second = pred.chunk(2)
    return (first, second) if adapter.uncond_first else (second, first)
