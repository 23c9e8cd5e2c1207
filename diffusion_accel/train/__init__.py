"""Trainers: ``diffusion-accel train <recipe> ...`` or ``accelerate launch -m diffusion_accel.train <recipe> ...``.

Python: ``diffusion_accel.train.train("lcd", output_dir="out", max_train_steps=500)`` runs one recipe in this
process with the same options as the command line.
"""

from __future__ import annotations

from typing import Any

from .options import TrainOptions
from .recipe import Recipe


def recipes() -> dict[str, type[Recipe]]:
    """Registered recipes by command-line name."""
    from .bfm import BFM, BFMFeatureResidual
    from .harmonica import L2C, HarmoniCa
    from .lcd import LCD
    from .resshift import ResShift
    from .rglcd import RGLCD
    from .tdm import TDM, Blade

    return {r.name: r for r in (LCD, RGLCD, TDM, Blade, HarmoniCa, L2C, ResShift, BFM, BFMFeatureResidual)}


def recipe_class(name: str) -> type[Recipe]:
    known = recipes()
    if name not in known:
        raise ValueError(f"unknown training recipe {name!r}; choose one of: {', '.join(known)}.")
    return known[name]


def train(recipe: str, **options: Any) -> dict[str, Any]:
    """Run ``recipe`` with keyword ``options`` (the command-line flags' names); returns the run's record."""
    from .options import build_options
    from .trainer import run

    cls = recipe_class(recipe)
    return run(cls, build_options(cls.options_class, options))


__all__ = ["Recipe", "TrainOptions", "recipe_class", "recipes", "train"]
