"""The ``diffusion-accel`` command line: generate, list-methods, info, bench, calibrate, testbed, eval."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .config import parse_key_values
from .loading import DEFAULT_PIPELINE, FALLBACK_PIPELINE, default_pipeline


def method_configs(methods: list[str] | None, config_files: list[str] | None, options: dict[str, Any]) -> list:
    from .config import parse_config

    specs: list[Any] = [m for m in (methods or []) if m and m != "baseline"] + list(config_files or [])
    if options and len(specs) != 1:
        raise SystemExit("--set needs exactly one --method or --config")
    return [parse_config(spec, **options) for spec in specs]


def save_output(output: Any, out_dir: Path, stem: str, video_format: str = "gif", fps: int = 8) -> list[Path]:
    """Save a pipeline output: images as PNG, videos as GIF (Pillow) or MP4 (OpenCV)."""
    import numpy as np
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    if hasattr(output, "frames"):
        for i, video in enumerate(output.frames):
            frames = [np.asarray(f) if not isinstance(f, np.ndarray) else f for f in video]
            frames = [(f * 255).round().clip(0, 255).astype("uint8") if f.dtype != np.uint8 else f for f in frames]
            path = out_dir / f"{stem}_{i}.{video_format}"
            if video_format == "gif":
                images = [Image.fromarray(f) for f in frames]
                images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
            else:
                import cv2

                h, w = frames[0].shape[:2]
                writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
                for f in frames:
                    writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
                writer.release()
            paths.append(path)
    else:
        for i, image in enumerate(output.images):
            path = out_dir / f"{stem}_{i}.png"
            image.save(path)
            paths.append(path)
    return paths


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    import diffusion_accel as da

    from .loading import base_call_kwargs

    name = args.pipeline or default_pipeline()
    pipe = da.load_pipeline(name)
    configs = method_configs(args.method, args.config, parse_key_values(args.set, "--set"))
    adapter = da.find_adapter(pipe)
    # tiny sizes / the testbed's 64x64 defaults (PixArt's resolution binning would reject 64); user flags override
    call: dict[str, Any] = base_call_kwargs(name)
    if args.steps is not None:
        call["num_inference_steps"] = args.steps
    if adapter.family == "dit":
        call["class_labels"] = pipe.get_label_ids(args.prompt) if args.prompt else [0]
    else:
        call["prompt"] = args.prompt or ["a red circle"]
    for key in ("height", "width", "num_frames"):
        if getattr(args, key, None):
            call[key] = getattr(args, key)
    if args.guidance_scale is not None:
        call[adapter.cfg_scale_arg] = args.guidance_scale
    call = {k: v for k, v in call.items() if v is not None}
    call["generator"] = torch.Generator().manual_seed(args.seed)
    handle = da.apply(pipe, *configs) if configs else None
    output = pipe(**call)
    paths = save_output(output, Path(args.out), f"seed{args.seed}", args.video_format)
    if handle is not None:
        print(da.stats(pipe))
        handle.remove()
    for path in paths:
        print(f"saved {path}")
    return 0


def cmd_list_methods(args: argparse.Namespace) -> int:
    import diffusion_accel as da

    if args.pipeline:
        pipe = da.load_pipeline(args.pipeline)
        names = da.list_methods(pipe)
    else:
        names = da.list_methods()
    classes = da.registered_methods()
    for name in names:
        print(f"{name:<20} {classes[name].summary}")
    return 0


def attention_backends() -> dict[str, str]:
    """Which block-sparse attention backend ``backend="auto"`` runs here, per device, and why."""
    import torch

    from .kernels import cpu_ext
    from .kernels.dispatch import triton_available

    cpu = cpu_ext.status()
    out = {"attention (cpu)": f"{cpu['backend']}: {cpu['why']} [CPU capability {cpu['cpu_capability']}]"}
    if torch.cuda.is_available():
        out["attention (cuda)"] = ("triton: our Triton kernel" if triton_available()
                                   else "flex: compiled FlexAttention (pip install 'diffusion-accel[kernels]' for "
                                        "the faster Triton kernel)")
    return out


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    import diffusion_accel as da

    from .pipelines.contract import contract_of

    info: dict[str, str] = {"torch": torch.__version__}
    if args.pipeline:
        pipe = da.load_pipeline(args.pipeline)
        adapter = da.find_adapter(pipe)
        blocks = adapter.get_blocks(pipe)
        info.update({
            "pipeline": type(pipe).__name__,
            "family": adapter.family,
            "denoiser": f"{adapter.denoiser} ({type(adapter.get_denoiser(pipe)).__name__})",
            "blocks": f"{len(blocks)} in {', '.join(adapter.block_lists) or '-'}",
            "cfg_layout": adapter.cfg_layout,
            "prediction": adapter.prediction,
            "scheduler": type(pipe.scheduler).__name__,
            "methods": ", ".join(da.list_methods(pipe)),
        })
        contract = contract_of(pipe)
        if contract:
            info["sampler contract"] = ", ".join(f"{k}={v!r}" for k, v in contract.items())
    info.update(attention_backends())
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(key) for key in info) + 1
        for key, value in info.items():
            print(f"{key:<{width}} {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusion-accel", description=__doc__)
    parser.add_argument("--verbose", action="store_true",
                        help="also show Diffusers/Transformers/cache-dit logs, progress bars and warnings "
                             "(accepted anywhere on the line)")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images/videos with an (accelerated) pipeline")
    gen.add_argument("--pipeline", help=f"path, Hub id, tiny:<family> or testbed:<name> (default: {DEFAULT_PIPELINE}"
                                        f" if installed, else {FALLBACK_PIPELINE})")
    gen.add_argument("--method", action="append", help="registered method name (repeatable)")
    gen.add_argument("--config", action="append", help="method config file (.json/.yaml; repeatable)")
    gen.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field of the one method")
    gen.add_argument("--prompt", action="append", help="prompt (repeatable); DiT: class label names")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=None)
    gen.add_argument("--guidance-scale", type=float, default=None)
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--num-frames", type=int)
    gen.add_argument("--video-format", choices=("gif", "mp4"), default="gif")
    gen.add_argument("--out", default="out")
    gen.set_defaults(func=cmd_generate)

    lm = sub.add_parser("list-methods", help="registered methods, or those that apply to --pipeline")
    lm.add_argument("--pipeline")
    lm.set_defaults(func=cmd_list_methods)

    info = sub.add_parser("info", help="this machine's attention backend and, given a pipeline, its adapter, "
                                       "sampler contract and the methods that apply")
    info.add_argument("pipeline", nargs="?")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)

    _add_subcommand_parsers(sub)
    return parser


def _add_subcommand_parsers(sub: Any) -> None:
    """Sub-commands that live in other modules of the project (bench, calibrate, testbed, eval, train).

    Imported explicitly: a sub-command whose module fails to import breaks the CLI with that error instead of
    silently disappearing from it.
    """
    from .bench import add_bench_parser
    from .calibrate import add_calibrate_parser
    from .eval.cli import add_eval_parser
    from .pipelines.testbed.cli import add_testbed_parser
    from .train.cli import add_parser as add_train_parser

    for add in (add_bench_parser, add_calibrate_parser, add_testbed_parser, add_eval_parser, add_train_parser):
        add(sub)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    if not verbose:  # before the sub-commands import Diffusers and Transformers
        from .logs import quiet_third_party

        quiet_third_party()
    parser = build_parser()
    args = parser.parse_args([a for a in argv if a != "--verbose"])
    args.verbose = verbose
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:  # see end_process_group: a sharded run's ranks must not leave gloo to interpreter shutdown
        from .distributed import end_process_group

        end_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
