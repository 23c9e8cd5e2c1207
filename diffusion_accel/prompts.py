"""The project's prompt lists, and where the bench, calibration and eval take their prompts from."""

from __future__ import annotations

import json
from pathlib import Path

#: Simple shape scenes (what the tiny and testbed models are trained to draw): the bench and calibration's prompts
#: for pipelines without held-out prompts of their own.
SHAPE_PROMPTS: tuple[str, ...] = (
    "a red circle", "a blue square", "a green triangle", "a yellow circle in the top left",
    "a small red square in the bottom right", "a big blue circle in the center", "a green square in the top right",
    "a yellow triangle in the bottom left", "a red triangle and a blue circle", "a small green circle",
    "a big yellow square", "a blue triangle in the top left", "a red circle in the bottom left",
    "a green triangle in the center", "a yellow square and a red circle", "a blue circle in the top right",
)

#: A small general-purpose list (object, scene, style variety) for smoke evaluations (``eval --prompts builtin``);
#: not a benchmark.
GENERAL_PROMPTS: tuple[str, ...] = (
    "a red circle on a white background",
    "a photo of a cat sitting on a wooden table",
    "a mountain lake at sunrise, photorealistic",
    "an astronaut riding a horse on the moon",
    "a bowl of fruit, oil painting",
    "a city street at night in the rain, neon lights",
    "a close-up of a sunflower with a bee",
    "a lighthouse on a rocky coast during a storm",
    "a blue square above a green triangle",
    "a watercolor painting of a fox in the snow",
    "a steaming cup of coffee next to an open book",
    "a vintage red car parked in front of a brick wall",
    "a forest path covered with autumn leaves",
    "a portrait of an old man with a white beard, studio lighting",
    "a sailboat on a calm sea at sunset",
    "a robot playing chess in a library",
)


def bench_prompts(pipeline: str, count: int, prompts_file: str | None = None) -> list[str]:
    """``count`` prompts for the bench and the diagnostics: the first ``count`` lines of ``prompts_file``; else the
    testbed's held-out prompts for ``testbed:`` pipelines (the video testbed's own, "a red circle moving left", for
    ``testbed:wan``, whose tokenizer knows no position words); else :data:`SHAPE_PROMPTS`, repeated as needed."""
    if prompts_file:
        lines = [ln.strip() for ln in Path(prompts_file).read_text().splitlines() if ln.strip()]
        return lines[:count]
    if pipeline == "testbed:wan":
        from .pipelines.testbed.video_data import heldout_video_prompts

        return list(heldout_video_prompts(count))
    if pipeline.startswith("testbed:"):
        try:
            from .pipelines.testbed.shapes import heldout_prompts

            return list(heldout_prompts(count))
        except ImportError:
            pass
    return [SHAPE_PROMPTS[i % len(SHAPE_PROMPTS)] for i in range(count)]


def load_prompts(source: str | Path) -> list[str]:
    """``"builtin"`` → :data:`GENERAL_PROMPTS`; ``"builtin:shapes"`` → the testbed's 64 held-out prompts;
    ``*.json`` → a list of strings, or of dicts with ``"prompt"`` / ``"prompt_en"`` (VBench ``full_info``);
    any other file → one prompt per non-empty line."""
    text = str(source)
    if text == "builtin":
        return list(GENERAL_PROMPTS)
    if text == "builtin:shapes":
        from .pipelines.testbed.shapes import heldout_prompts

        return list(heldout_prompts())
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path} (or use 'builtin' / 'builtin:shapes').")
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text())
        prompts = [item if isinstance(item, str) else item.get("prompt", item.get("prompt_en")) for item in data]
    else:
        prompts = [line.strip() for line in path.read_text().splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"no prompts in {path}.")
    return prompts
