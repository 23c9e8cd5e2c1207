"""Training and evaluation of shapes-net on generator samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .shapes import SIZE_NAMES, PromptObject, ShapesSample, make_batch
from .shapes_net import (
    NUM_CELLS,
    ShapesNet,
    class_index,
    detections_from,
    matches_prompt,
    save_real_statistics,
    save_shapes_net,
)
from .train_common import Budget, log, make_accelerator, optimizer_step, report_metrics, setup_torch


def targets(samples: list[ShapesSample]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell class targets ``[N, 9]`` and size targets ``[N, 9]`` (-100 where the cell is empty)."""
    cls = torch.zeros(len(samples), NUM_CELLS, dtype=torch.long)
    size = torch.full((len(samples), NUM_CELLS), -100, dtype=torch.long)
    for i, s in enumerate(samples):
        for o in s.objects:
            cls[i, o.position] = class_index(o.colour, o.shape)
            size[i, o.position] = SIZE_NAMES.index(o.size)
    return cls, size


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur, noise and a little colour/brightness jitter, so generated (imperfect) images are read robustly."""
    out = images.astype(np.float32)
    for i in range(len(out)):
        if rng.random() < 0.5:
            sigma = rng.uniform(0.3, 1.2)
            out[i] = cv2.GaussianBlur(out[i], (0, 0), sigma)
    out *= rng.uniform(0.92, 1.08, size=(len(out), 1, 1, 3))
    out += rng.uniform(-10, 10, size=(len(out), 1, 1, 1))
    noise_level = rng.uniform(0, 8, size=(len(out), 1, 1, 1))
    out += rng.normal(0, 1, size=out.shape) * noise_level
    return np.clip(out, 0, 255) / 255.0


def evaluate(net: ShapesNet, count: int = 2000, split: str = "test") -> dict[str, float]:
    """Accuracy on ``count`` fresh generator samples: exact colour+shape sets, + cells, + sizes, per-cell."""
    images, samples = make_batch(split, 0, count)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    net.eval()
    with torch.no_grad():
        outs = [net(x[i:i + 500]) for i in range(0, count, 500)]
    cls = torch.cat([o["cls"] for o in outs])
    size = torch.cat([o["size"] for o in outs])
    dets = detections_from(cls, size)
    set_ok = pos_ok = size_ok = 0
    for d, s in zip(dets, samples, strict=True):
        full = [PromptObject(o.shape, o.colour, o.position, o.size) for o in s.objects]
        no_pos = [PromptObject(o.shape, o.colour) for o in s.objects]
        set_ok += matches_prompt(d, no_pos)
        pos_ok += matches_prompt(d, full)
        size_ok += matches_prompt(d, full, check_size=True)
    t_cls, _ = targets(samples)
    return {"colour_shape_acc": set_ok / count, "colour_shape_position_acc": pos_ok / count,
            "with_size_acc": size_ok / count, "cell_acc": float((cls.argmax(-1) == t_cls).float().mean()),
            "count": count}


def train_shapes_net(output_dir: str | Path, seed: int = 0, minutes: float | None = None, num_train: int = 30000,
                     steps: int = 800, batch_size: int = 96) -> dict[str, Any]:
    """Train shapes-net on ``num_train`` generator samples; writes weights, config, real stats and metrics."""
    setup_torch(seed)
    accelerator = make_accelerator()
    log(f"generating {num_train} training images")
    images, samples = make_batch("train", 0, num_train)
    t_cls, t_size = targets(samples)
    net = ShapesNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    budget = Budget(steps, minutes)
    sched = budget.lr_scheduler(opt, warmup=100, floor=0.02)
    net, opt = accelerator.prepare(net, opt)
    rng = np.random.default_rng(seed)
    net.train()
    for step in budget.steps():
        idx = rng.integers(0, num_train, size=batch_size)
        x = torch.from_numpy(augment(images[idx], rng)).permute(0, 3, 1, 2).float().to(accelerator.device)
        out = net(x)
        loss = F.cross_entropy(out["cls"].reshape(-1, out["cls"].shape[-1]), t_cls[idx].reshape(-1).to(x.device))
        loss = loss + 0.3 * F.cross_entropy(out["size"].reshape(-1, len(SIZE_NAMES)),
                                            t_size[idx].reshape(-1).to(x.device), ignore_index=-100)
        optimizer_step(accelerator, net, opt, sched, loss)
        if step % 100 == 0:
            log(f"shapes-net step {step} loss {loss.item():.4f}")
    net = accelerator.unwrap_model(net).eval()
    metrics = evaluate(net)
    metrics["train_minutes"] = budget.elapsed_min()
    save_shapes_net(net, output_dir, extra={"metrics": metrics, "seed": seed})
    try:
        save_real_statistics(output_dir)
    except ImportError as exc:  # diffusion_accel.eval.frechet not there yet
        log(f"real statistics not written ({exc}); run shapes_net.save_real_statistics() later")
    return report_metrics("shapes-net", output_dir, metrics)
