"""Bottleneck Sampling's wall-clock speedup at FLUX.1-dev's real size (random weights; a GPU measurement).

``python -m diffusion_accel.benchmarks.bottleneck_real_size --json out.json [--preset flux-dev]``

A real ``FluxPipeline`` whose transformer is ``FluxTransformer2DModel`` at FLUX.1-dev's configuration (19 dual +
38 single-stream blocks, 24 heads x 128, guidance embedding; ~12B parameters, bf16 on a GPU) with random weights,
fed random T5/CLIP embeddings of FLUX's shapes (512 x 4096 and 768), at the latent token count of a 1024x1024 FLUX
image (4096 image tokens; the tiny test VAE downsamples less, so the pixel size differs, which only the skipped VAE
decode would see). No CFG (guidance-distilled, as FLUX.1-dev). Baseline (28 steps), Bottleneck Sampling schedules
with the same 28 steps, and the fewer-steps baselines run in one process with interleaved repeats; ``speedup_wall``
= median baseline / median method time of the whole pipeline call (``output_type="latent"``). The latent PSNR against
the baseline is printed too, but with random weights it says nothing about image quality: quality is measured on
``testbed:flow`` (``python -m diffusion_accel.benchmarks.suite bottleneck``). ``--preset small`` is the same code
at a size a CPU runs in seconds (the smoke test).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ..bench import MethodSpec, parse_method_specs
from ..eval.fidelity import latent_psnr

#: FluxTransformer2DModel configurations: FLUX.1-dev's, and a CPU-sized one with the same head size.
PRESETS: dict[str, dict[str, Any]] = {
    "flux-dev": {"num_layers": 19, "num_single_layers": 38, "num_attention_heads": 24, "attention_head_dim": 128,
                 "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
                 "in_channels": 64, "axes_dims_rope": (16, 56, 56), "tokens": 4096, "text_tokens": 512},
    "small": {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2, "attention_head_dim": 128,
              "joint_attention_dim": 64, "pooled_projection_dim": 32, "guidance_embeds": True,
              "in_channels": 64, "axes_dims_rope": (16, 56, 56), "tokens": 256, "text_tokens": 32},
}

#: The methods compared, in ``diffusion-accel bench --methods`` syntax (parsed by the bench's own parser): the paper's
#: split, our fastest split, and the fewer-steps baselines. The baseline runs ``BASE_STEPS``.
METHODS = ("baseline,bottleneck,bottleneck:step_fractions=[0.05,0.8,0.15]:start_sigmas=[1.0,0.8,0.75],"
           "steps=13,steps=11")
BASE_STEPS = 28


def real_size_pipeline(preset: str, device: str, dtype: torch.dtype, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """A ``FluxPipeline`` (tiny VAE and text encoders, never run) with a random transformer of ``preset``, plus the
    call arguments (random prompt embeddings, size for the preset's token count)."""
    from diffusers import FluxTransformer2DModel

    from ..testing import tiny_pipeline

    cfg = dict(PRESETS[preset])
    tokens, text_tokens = cfg.pop("tokens"), cfg.pop("text_tokens")
    pipe = tiny_pipeline("flux", seed)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise 12B parameters directly in bf16 on the device: no fp32 copy
    try:
        with torch.device(device):
            pipe.transformer = FluxTransformer2DModel(**cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    pipe.to(device)
    side = int(round(tokens ** 0.5)) * 2 * pipe.vae_scale_factor  # packed 2x2 latents: tokens = (side / (2 vsf))^2
    gen = torch.Generator(device).manual_seed(seed)
    call = {
        "prompt_embeds": torch.randn(1, text_tokens, cfg["joint_attention_dim"], generator=gen, device=device,
                                     dtype=dtype),
        "pooled_prompt_embeds": torch.randn(1, cfg["pooled_projection_dim"], generator=gen, device=device,
                                            dtype=dtype),
        "height": side, "width": side, "guidance_scale": 3.5, "output_type": "latent",
    }
    return pipe, call


def run_method(pipe: Any, call: dict[str, Any], spec: MethodSpec, seed: int = 0) -> tuple[float, torch.Tensor]:
    """Wall time (device-synchronised) and latents of one pipeline call with ``spec`` applied for its duration."""
    import diffusion_accel as da

    device = call["prompt_embeds"].device
    kwargs = {**call, "num_inference_steps": BASE_STEPS, **spec.call_overrides,
              "generator": torch.Generator(device).manual_seed(seed)}
    with da.accelerated(pipe, *spec.configs) if spec.configs else contextlib.nullcontext():
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = pipe(**kwargs).images
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, out


def benchmark(preset: str = "flux-dev", repeats: int = 2, device: str | None = None) -> dict[str, Any]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    specs = parse_method_specs(METHODS)
    pipe, call = real_size_pipeline(preset, device, dtype)
    walls: dict[str, list[float]] = {spec.label: [] for spec in specs}
    latents: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for spec in specs:  # warm-up (kernels, allocator), latents for PSNR
            _, latents[spec.label] = run_method(pipe, call, spec)
        for _ in range(repeats):  # interleaved
            for spec in specs:
                walls[spec.label].append(run_method(pipe, call, spec)[0])
    base = statistics.median(walls["baseline"])
    rows = {spec.label: {"median_wall_s": statistics.median(walls[spec.label]),
                         "speedup_wall": base / statistics.median(walls[spec.label]),
                         "steps": spec.call_overrides.get("num_inference_steps", BASE_STEPS),
                         "latent_psnr_vs_baseline_random_weights": latent_psnr(latents[spec.label],
                                                                               latents["baseline"])}
            for spec in specs}
    params = sum(p.numel() for p in pipe.transformer.parameters())
    return {"settings": {"preset": preset, "transformer_params": params, "image_tokens": PRESETS[preset]["tokens"],
                         "text_tokens": PRESETS[preset]["text_tokens"], "height": call["height"],
                         "dtype": str(dtype), "device": torch.cuda.get_device_name() if device == "cuda" else
                         platform.processor() or platform.machine(), "repeats": repeats, "torch": torch.__version__},
            "methods": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="flux-dev")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    report = benchmark(args.preset, args.repeats, args.device)
    s = report["settings"]
    print(f"FluxPipeline, {s['preset']} transformer ({s['transformer_params'] / 1e9:.2f}B params, random weights), "
          f"{s['image_tokens']} image + {s['text_tokens']} text tokens, {s['dtype']}, {s['device']}, "
          f"{s['repeats']} interleaved repeats\n")
    print("| method | steps | median wall (s) | speedup_wall |\n|---|---|---|---|")
    for name, row in report["methods"].items():
        print(f"| {name} | {row['steps']} | {row['median_wall_s']:.3f} | {row['speedup_wall']:.2f}x |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
