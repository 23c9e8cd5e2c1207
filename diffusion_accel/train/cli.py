"""``diffusion-accel train <recipe> [flags]`` and ``python -m diffusion_accel.train <recipe> [flags]``."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _usage() -> str:
    from . import recipes

    lines = ["usage: diffusion-accel train <recipe> [--flags] [--config file.yaml]", "", "recipes:"]
    lines += [f"  {name:10s} {cls.summary}" for name, cls in recipes().items()]
    lines += ["", "`diffusion-accel train <recipe> --help` lists a recipe's flags. Multi-process: "
              "`accelerate launch --multi_gpu --num_processes N -m diffusion_accel.train <recipe> ...` (also on CPU: "
              "gloo)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .options import parse_options
    from .trainer import run

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    from . import recipe_class

    try:
        cls = recipe_class(argv[0])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        options = parse_options(cls.options_class, argv[1:], prog=f"diffusion-accel train {cls.name}")
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    record = run(cls, options)
    if record:
        print(f"saved the {cls.name} {cls.artefact} to {options.output_dir}")
    return 0


def add_parser(sub: Any) -> None:
    """The ``train`` sub-command of ``diffusion-accel`` (arguments are parsed by the recipe)."""
    parser = sub.add_parser("train", help="train a distilled student, a cache router or a super-resolution model "
                                          "(recipes: lcd, rglcd, harmonica, l2c, resshift)", add_help=False)
    parser.add_argument("args", nargs=argparse.REMAINDER)
    parser.set_defaults(func=lambda ns: main(ns.args))
