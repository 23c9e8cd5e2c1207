"""Prompt adherence (with its Wilson 95 % interval) and FID-shapes of a testbed pipeline on the 64 held-out prompts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .registry import default_call_kwargs
from .shapes import heldout_prompts, make_batch


def load(name: str, path: str | Path | None = None):
    """The shipped (or a given) testbed pipeline, progress bar off."""
    from ...loading import load_pipeline

    pipe = load_pipeline(str(path) if path is not None else f"testbed:{name}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, name: str, prompts: list[str], seed: int = 0, batch_size: int = 16,
             **overrides: Any) -> np.ndarray:
    """uint8 images ``[N, 64, 64, 3]``, prompt ``i`` with generator seed ``seed + i``, default call arguments."""
    kwargs = {**default_call_kwargs(name), **overrides}
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        call = dict(kwargs)
        if call.get("negative_prompt") is not None:
            call["negative_prompt"] = [call["negative_prompt"]] * len(chunk)
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        images = pipe(prompt=chunk, generator=gens, output_type="np", **call).images
        out.append(np.clip(np.round(np.asarray(images) * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def evaluate_pipeline(name: str, path: str | Path | None = None, num_prompts: int = 64, seed: int = 0,
                      **overrides: Any) -> dict[str, Any]:
    """Adherence (held-out prompts, default settings) and FID-shapes vs the cached real statistics, with the
    real-vs-real floor for the same number of images."""
    from ...eval.paired import proportion_ci
    from .shapes_net import adherence, fid_shapes

    pipe = load(name, path)
    prompts = list(heldout_prompts())[:num_prompts]
    start = time.time()
    images = generate(pipe, name, prompts, seed=seed, **overrides)
    seconds = time.time() - start
    score, flags = adherence(list(images), prompts, return_per_image=True)
    real, _ = make_batch("test", 10_000, len(prompts))
    try:
        fid, floor = fid_shapes(list(images)), fid_shapes(list(real))
    except (ImportError, FileNotFoundError) as exc:  # no diffusion_accel.eval.frechet or no cached statistics
        fid = floor = None
        print(f"FID-shapes unavailable: {exc}")
    return {
        "name": name, "num_prompts": len(prompts), "call_kwargs": {**default_call_kwargs(name), **overrides},
        "adherence": score, "adherence_ci": proportion_ci(int(sum(flags)), len(flags)),
        "fid_shapes": fid, "fid_shapes_real_floor": floor, "generation_seconds": seconds,
        "failed_prompts": [p for p, ok in zip(prompts, flags, strict=True) if not ok],
    }
