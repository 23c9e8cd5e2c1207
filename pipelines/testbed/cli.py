"""``diffusion-accel testbed train <name>`` and ``diffusion-accel testbed eval <name>``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .train import RECIPE_CHOICES, TRAIN_NAMES

#: The models whose training can continue from a saved one (``--init-from``).
INIT_FROM_NAMES = ("vae", "pixart", "flow", "wan-decoder", "wan-shape-decoder")


def _default_output(name: str) -> Path:
    from .shapes_net import assets_root

    if name == "resshift-vae":  # not an asset of its own: `students <run> resshift --vae <it>` ships it
        return Path("runs/sr/resshift-vae")
    if name in ("wan-decoder", "wan-shape-decoder"):  # candidates for assets/testbed-wan/vae, `testbed eval wan` first
        return Path("runs/wan") / name.replace("wan-", "vae-")
    if name == "wan-frame-net":  # a training aid (the decoders' perceptual term), not an asset
        return Path("runs/wan/frame-net")
    return assets_root() / (name if name in ("shapes-net", "shapes-judge") else f"testbed-{name}")


def cmd_train(args: argparse.Namespace) -> int:
    """Train one testbed model (into the shipped assets folder unless ``--output`` is given)."""
    from .train import train

    output = Path(args.output) if args.output else _default_output(args.name)
    extra: dict[str, Any] = {}
    if args.vae_path:
        extra["vae_path"] = args.vae_path
    if args.recipe:
        extra["recipe"] = args.recipe
    if args.init_from:
        if args.name not in INIT_FROM_NAMES:
            raise ValueError(f"--init-from applies to {', '.join(INIT_FROM_NAMES)} (a stage continued from a saved "
                             f"model); {args.name} trains from scratch or runs a fixed recipe, drop --init-from.")
        extra["init_from"] = args.init_from
    metrics = train(args.name, output, seed=args.seed, minutes=args.minutes, **extra)
    print(json.dumps({"name": args.name, "output": str(output), **metrics}, indent=2, default=str))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Adherence + FID-shapes of a testbed pipeline on the held-out prompts, as a table and JSON."""
    overrides: dict[str, Any] = {}
    if args.steps is not None:
        overrides["num_inference_steps"] = args.steps
    if args.name == "wan":
        return _eval_video(args, overrides)
    from .evaluate import evaluate_pipeline

    result = evaluate_pipeline(args.name, args.path, num_prompts=args.prompts, seed=args.seed, **overrides)
    print(f"{'testbed':<10}{'steps':>6}{'adherence':>11}{'FID-shapes':>12}{'real floor':>12}")
    print(f"{result['name']:<10}{result['call_kwargs']['num_inference_steps']:>6}{result['adherence']:>11.3f}"
          f"{result['fid_shapes']:>12.2f}{result['fid_shapes_real_floor']:>12.2f}")
    return _emit(result, args.json)


def _eval_video(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """The video testbed: adherence per attribute, FID-shapes over frames, VBench-style dims, real clips beside."""
    from .evaluate_video import evaluate_wan, format_table

    result = evaluate_wan(args.path, num_prompts=args.prompts, seed=args.seed, **overrides)
    print(format_table(result))
    return _emit(result, args.json)


def _emit(result: dict[str, Any], json_path: str | None) -> int:
    """The evaluation's JSON: to ``json_path``, or printed below the table."""
    text = json.dumps(result, indent=2, default=str)
    if json_path:
        Path(json_path).write_text(text)
    else:
        print(text)
    return 0


def add_testbed_parser(subparsers: Any) -> None:
    """Register ``testbed train`` / ``testbed eval`` on the main CLI's sub-parsers."""
    from .models import TESTBED_NAMES
    from .registry import VIDEO_TESTBED_NAMES

    p = subparsers.add_parser("testbed", help="train or evaluate the shipped tiny testbed models")
    sub = p.add_subparsers(dest="testbed_command", required=True)
    tr = sub.add_parser("train", help="train a testbed model (shapes-net, shapes-judge, vae, resshift-vae, pixart, "
                                              "flow, wan, wan-decoder, wan-shape-decoder, wan-frame-net)")
    tr.add_argument("name", choices=TRAIN_NAMES)
    tr.add_argument("--output", default=None, help="output folder (default: the shipped assets folder; "
                                                   "resshift-vae: runs/sr/resshift-vae; wan-decoder, "
                                                   "wan-shape-decoder: runs/wan/vae-decoder, "
                                                   "runs/wan/vae-shape-decoder; wan-frame-net: "
                                                   "runs/wan/frame-net)")
    tr.add_argument("--minutes", type=float, default=None,
                    help="wall-clock cap of the whole training command (a VAE trained on the way gets at most a "
                         "third; the final evaluation is not counted)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--vae-path", default=None, help="pipelines: a trained VAE folder (default: train one)")
    tr.add_argument("--init-from", "--init_from", dest="init_from", default=None,
                    help="wan-decoder, wan-shape-decoder: the VAE whose decoder is fine-tuned (default: the shipped "
                         "testbed-wan's); "
                         "vae, pixart, flow: the saved model one stage continues")
    tr.add_argument("--recipe", default=None, choices=RECIPE_CHOICES,
                    help="pixart/flow/wan: 'shipped' (the GPU stages; default on a GPU) or 'cpu' (sized for ~1 h, "
                         "wan ~45 min, on 2 cores; default without a GPU); wan also 'cpu-long' (~2.3 h: the 8x VAE "
                         "and the transformer sized to reach the VAE's ceiling) and 'shipped-4x' / 'cpu-4x' (the 4x "
                         "VAE, then its transformer and a decoder continuation side by side; cpu-4x: 2.25 h on 2 "
                         "cores)")
    tr.set_defaults(func=cmd_train)
    ev = sub.add_parser("eval", help="prompt adherence and FID-shapes on the 64 held-out prompts (wan: per "
                                     "attribute, with VBench-style dims and the real clips beside)")
    ev.add_argument("name", choices=(*TESTBED_NAMES, *VIDEO_TESTBED_NAMES))
    ev.add_argument("--path", default=None, help="pipeline folder (default: the shipped one)")
    ev.add_argument("--prompts", type=int, default=64)
    ev.add_argument("--steps", type=int, default=None, help="override the default number of steps")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", default=None, help="write the JSON result here instead of printing it")
    ev.set_defaults(func=cmd_eval)
