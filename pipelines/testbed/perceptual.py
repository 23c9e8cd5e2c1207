"""A perceptual distance for the video testbed's decoders: LPIPS's construction on a frame classifier we train.

Why a decoder needs one: trained with L1 + L2 alone, the 8x Wan decoder draws a latent whose shape it is unsure of as
the pixel average of the candidates, a round blob (``testbed:wan``'s reconstructions keep the shape on 31 % of
held-out clips while a probe reads it from their latents on 98 %). Image and video VAEs (SD's, Wan's) add LPIPS for
exactly this: a distance in the features of a network trained to tell things apart, where a blob and a triangle are
far even when their pixels are close.

LPIPS ships VGG/AlexNet weights trained on ImageNet, which this machine cannot download and which have never seen our
frames, so we build its construction (Zhang et al., arXiv 1801.03924: distances between a frozen classifier's layer
activations, summed over layers; without its learned per-channel weights) on :class:`FramePerceptualNet`, a small CNN
trained here to name a single frame's colour and shape. It is not the judge: shapes-net (another architecture, trained
on the multi-object image testbed) reads the shapes in every evaluation, and this net sees only real video frames,
from clip indices no other network trains on.

    d(x, x̂) = Σ_l  mean_{h,w} ‖ φ_l(x)_{hw} − φ_l(x̂)_{hw} ‖² / mean_{h,w} ‖ φ_l(x)_{hw} ‖²

LPIPS (eq. 1) unit-normalises each location's features instead; :func:`perceptual_distance` says why we do not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from .shapes import SHAPES
from .video_data import NUM_FRAMES, SPLIT_TRAIN, VIDEO_COLOURS, make_clip

#: Clip indices the perceptual net trains on: far above the ones the VAEs and transformers draw (below 200 000), so
#: the net's frames are frames no other testbed network saw.
PERCEPTUAL_CLIP_START = 1_000_000


class FramePerceptualNet(ModelMixin, ConfigMixin):
    """64x64 RGB frames in [0, 1] → colour logits ``[B, 4]`` and shape logits ``[B, 3]``; the output of each of its
    ``len(widths)`` stride-2 stages is one feature layer φ_l of the perceptual distance."""

    @register_to_config
    def __init__(self, widths: tuple[int, ...] = (24, 48, 64, 96), num_colours: int = len(VIDEO_COLOURS),
                 num_shapes: int = len(SHAPES)):
        super().__init__()
        stages, cin = [], 3
        for w in widths:
            stages.append(nn.Sequential(nn.Conv2d(cin, w, 3, padding=1), nn.ReLU(),
                                        nn.Conv2d(w, w, 3, stride=2, padding=1), nn.ReLU()))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(cin, num_colours + num_shapes)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """φ_l for every stage."""
        out, x = [], images
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(self.features(images)[-1].amax(dim=(2, 3)))  # max: the object is a few % of a frame
        return logits[:, :self.config.num_colours], logits[:, self.config.num_colours:]


def frames_of(video: torch.Tensor) -> torch.Tensor:
    """``[N, 3, T, H, W]`` in [-1, 1] (the VAE's layout) → ``[N·T, 3, H, W]`` in [0, 1] (the net's)."""
    return video.transpose(1, 2).flatten(0, 1).add(1.0).mul(0.5)


def perceptual_distance(net: FramePerceptualNet, video: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Feature distance between two clips ``[N, 3, T, H, W]`` in [-1, 1], averaged over frames; gradients reach
    ``video`` only (``net`` is frozen by the caller, ``reference`` is data). Each layer's squared error is divided by
    the reference frame's mean squared feature norm in that layer, not by each location's norm as LPIPS does: on
    our plain backgrounds a ReLU layer's features are near zero, and unit-normalising them there made 77 % of the
    distance background noise (measured on ``testbed:wan``'s reconstructions, in the second stage's features)."""
    total = video.new_zeros(())
    with torch.no_grad():
        ref_features = net.features(frames_of(reference))
    for a, b in zip(net.features(frames_of(video)), ref_features, strict=True):
        scale = b.pow(2).sum(dim=1).mean(dim=(1, 2)).clamp(min=1e-8)  # per frame
        total = total + ((a - b).pow(2).sum(dim=1).mean(dim=(1, 2)) / scale).mean()
    return total


class _FrameBank:
    """Every frame of clips ``start .. start + count - 1`` with its colour and shape labels."""

    def __init__(self, start: int, count: int):
        clips = [make_clip(SPLIT_TRAIN, i) for i in range(start, start + count)]
        self.frames = np.concatenate([c.frames for c in clips])
        self.colour = torch.tensor([VIDEO_COLOURS.index(c.colour) for c in clips]).repeat_interleave(NUM_FRAMES)
        self.shape = torch.tensor([SHAPES.index(c.shape) for c in clips]).repeat_interleave(NUM_FRAMES)

    def batch(self, rng: np.random.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = rng.integers(0, len(self.frames), size)
        frames = self.frames[idx].astype(np.float32)
        frames += rng.normal(0.0, 4.0, frames.shape)  # a little noise: read shapes, not exact pixel values
        x = torch.from_numpy(np.clip(frames, 0, 255) / 255.0).permute(0, 3, 1, 2).float()
        return x, self.colour[idx], self.shape[idx]


def train_frame_perceptual_net(output_dir: str | Path, seed: int = 0, steps: int = 3000, batch_size: int = 64,
                               lr: float = 2e-3, num_clips: int = 4000) -> dict[str, Any]:
    """Train :class:`FramePerceptualNet` on single real frames of clips ``PERCEPTUAL_CLIP_START ...`` (cross-entropy
    on colour and shape, cosine LR without warm-up) and ``save_pretrained`` it to ``output_dir``, with its metrics:
    its accuracy on 512 frames of clips it did not train on."""
    from .train_common import Budget, log, make_accelerator, optimizer_step, report_metrics

    with torch.random.fork_rng():  # its own initialisation, leaving the caller's random stream as it was
        torch.manual_seed(seed)
        net = FramePerceptualNet()
    accelerator = make_accelerator()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    budget = Budget(steps, None)
    sched = budget.lr_scheduler(opt, warmup=0, floor=0.0)
    net, opt = accelerator.prepare(net, opt)
    rng = np.random.default_rng(seed)
    bank = _FrameBank(PERCEPTUAL_CLIP_START, num_clips)
    net.train()
    for step in budget.steps():
        x, colour, shape = (t.to(accelerator.device) for t in bank.batch(rng, batch_size))
        colour_logits, shape_logits = net(x)
        loss = F.cross_entropy(colour_logits, colour) + F.cross_entropy(shape_logits, shape)
        optimizer_step(accelerator, net, opt, sched, loss)
        if step % 100 == 0:
            log(f"frame perceptual net step {step} loss {loss.item():.4f}")
    net = accelerator.unwrap_model(net).eval()
    with torch.no_grad():
        x, colour, shape = _FrameBank(PERCEPTUAL_CLIP_START + num_clips, 64).batch(np.random.default_rng(seed), 512)
        colour_logits, shape_logits = net(x.to(accelerator.device))
    metrics = {"colour_accuracy": float((colour_logits.argmax(1).cpu() == colour).float().mean()),
               "shape_accuracy": float((shape_logits.argmax(1).cpu() == shape).float().mean()), "steps": steps,
               "seed": seed, "clips": [PERCEPTUAL_CLIP_START, PERCEPTUAL_CLIP_START + num_clips]}
    net.to("cpu").save_pretrained(str(output_dir))
    return report_metrics("frame perceptual net", output_dir, metrics)
