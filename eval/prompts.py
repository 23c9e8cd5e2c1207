"""Prompt lists for the eval runner: a file (``.txt`` one per line, ``.json``) or a built-in list."""

from __future__ import annotations

import json
from pathlib import Path

#: A small general-purpose list (object, scene, style variety) for smoke evaluations; not a benchmark.
BUILTIN_PROMPTS: tuple[str, ...] = (
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


def load_prompts(source: str | Path) -> list[str]:
    """``"builtin"`` → :data:`BUILTIN_PROMPTS`; ``"builtin:shapes"`` → the testbed's 64 held-out prompts;
    ``*.json`` → a list of strings, or of dicts with ``"prompt"`` / ``"prompt_en"`` (VBench ``full_info``);
    any other file → one prompt per non-empty line."""
    text = str(source)
    if text == "builtin":
        return list(BUILTIN_PROMPTS)
    if text == "builtin:shapes":
        from ..pipelines.testbed.shapes import heldout_prompts

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
