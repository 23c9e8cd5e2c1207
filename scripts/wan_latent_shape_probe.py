"""Is the shape in the latents? A diagnostic for the video testbed's shape adherence (issue 20).

Trains a small CNN to read the shape from the posterior means of a Wan VAE's encoder on training clips, then reads
(1) the held-out real clips' latents and (2) the latents a pipeline generates for the held-out prompts (the sampler
contract, seed i for prompt i, as ``testbed eval wan`` draws them). If the probe reads the shape where the decoder
draws every shape round, the decoder, not the encoder or the transformer, is what loses it.

    python scripts/wan_latent_shape_probe.py --pipelines testbed:wan runs/wan-cpu-long --json probe.json

Measured (``docs/results/testbed_training/wan_latent_shape_probe.json``; 12 000 training clips, ~8 min on 2 cores):
98.4 % on the held-out clips' latents under the shipped VAE's encoder, 78.1 % on the latents the CPU transformer
(``cpu-long``) generates, 45.3 % on the shipped GPU transformer's (chance 33 %), where the decoder draws every shape
round.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn as nn
import torch.nn.functional as F


def encoded_shapes(vae, split: str, count: int, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised posterior means ``[count, Z, 3, h, w]`` (as the transformer sees them) and shape labels."""
    from diffusion_accel.pipelines.testbed.shapes import SHAPES
    from diffusion_accel.pipelines.testbed.train_wan import encode_clips, normalise_latents
    from diffusion_accel.pipelines.testbed.video_data import make_clips

    latents, labels = [], []
    for start in range(0, count, batch):
        frames, clips = make_clips(split, start, min(batch, count - start))
        latents.append(encode_clips(vae, frames))
        labels += [SHAPES.index(c.shape) for c in clips]
    return normalise_latents(vae, torch.cat(latents)), torch.tensor(labels)


def train_probe(latents: torch.Tensor, labels: torch.Tensor, epochs: int = 25, width: int = 96,
                seed: int = 0) -> nn.Module:
    """Three 3x3 convolutions over the latent frames stacked as channels, global max pool, linear: 3 shapes."""
    torch.manual_seed(seed)
    channels = latents.shape[1] * latents.shape[2]
    probe = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(),
                          nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                          nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                          nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(width, 3))
    opt = torch.optim.AdamW(probe.parameters(), 2e-3, weight_decay=1e-2)
    flat = latents.flatten(1, 2)
    for _ in range(epochs):
        order = torch.randperm(len(labels))
        for i in range(0, len(order), 128):
            idx = order[i:i + 128]
            noisy = flat[idx] + 0.05 * torch.randn_like(flat[idx])  # a little noise: generated latents are not exact
            loss = F.cross_entropy(probe(noisy), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return probe.eval()


@torch.no_grad()
def probe_accuracy(probe: nn.Module, latents: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probe(latents.flatten(1, 2)).argmax(1) == labels).float().mean())


@torch.no_grad()
def generated_latents(pipe, prompts: list[str], batch: int = 16) -> torch.Tensor:
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(i + j) for j in range(len(prompts[i:i + batch]))]
        out.append(pipe(prompt=prompts[i:i + batch], generator=gens, output_type="latent").frames)
    return torch.cat(out).float()


def main() -> None:
    from diffusion_accel.pipelines.testbed.shapes import SHAPES
    from diffusion_accel.pipelines.testbed.video_data import SPLIT_HELDOUT, SPLIT_TRAIN, heldout_video_prompts

    from diffusion_accel.loading import load_pipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipelines", nargs="+", default=["testbed:wan"],
                        help="pipelines whose generated latents are read (the first one's VAE trains the probe)")
    parser.add_argument("--train-clips", type=int, default=12000)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    pipes = [load_pipeline(p) for p in args.pipelines]
    vae = pipes[0].vae
    for name, pipe in zip(args.pipelines[1:], pipes[1:], strict=True):
        if pipe.vae.config.latents_mean != vae.config.latents_mean:
            raise SystemExit(f"{name} has another latent space than {args.pipelines[0]}: probe them one at a time")
    latents, labels = encoded_shapes(vae, SPLIT_TRAIN, args.train_clips)
    probe = train_probe(latents, labels)
    real, real_labels = encoded_shapes(vae, SPLIT_HELDOUT, args.prompts)
    prompts = list(heldout_video_prompts(args.prompts))
    prompt_labels = torch.tensor([SHAPES.index(p.split()[2]) for p in prompts])
    result = {"train_clips": args.train_clips, "prompts": args.prompts,
              "real_heldout_latents": probe_accuracy(probe, real, real_labels),
              "generated": {name: probe_accuracy(probe, generated_latents(pipe, prompts), prompt_labels)
                            for name, pipe in zip(args.pipelines, pipes, strict=True)},
              "chance": 1 / len(SHAPES)}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
