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
    ARCHITECTURES,
    NUM_CELLS,
    class_index,
    detections_from,
    load_shapes_net,
    matches_prompt,
    save_real_statistics,
    save_shapes_net,
)
from .train_common import Budget, dataset, log, make_accelerator, optimizer_step, report_metrics, setup_torch


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


def evaluate(net: torch.nn.Module, count: int = 2000, split: str = "test") -> dict[str, float]:
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


#: Seed offsets of the judge: ``train('shapes-judge', out, seed=s)`` initialises with ``JUDGE_INIT_SEED + s`` and
#: augments with ``JUDGE_AUG_SEED + s``, so the default seed 0 shares nothing with shapes-net's seed 0.
JUDGE_INIT_SEED = 1009
JUDGE_AUG_SEED = 2017


def train_classifier(output_dir: str | Path, architecture: str = "shapes-net", seed: int = 0,
                     aug_seed: int | None = None, data_split: str = "train", data_start: int = 0,
                     minutes: float | None = None, num_train: int = 30000, steps: int = 800, batch_size: int = 96,
                     lr: float = 2e-3, label: str | None = None, real_stats: bool = True,
                     model_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train a cell classifier of ``architecture`` (a key of ``shapes_net.ARCHITECTURES``) on ``num_train``
    generator samples of ``data_split`` starting at ``data_start``; init seed ``seed``, augmentation stream
    ``aug_seed`` (default ``seed``). Writes weights, config (with the architecture and the data provenance),
    metrics and, with ``real_stats``, the cached real-image feature statistics."""
    label = label or architecture
    setup_torch(seed)
    accelerator = make_accelerator()
    log(f"generating {num_train} training images ({data_split} {data_start}..{data_start + num_train - 1})")
    images, samples = dataset(data_split, num_train, start=data_start)
    t_cls, t_size = targets(samples)
    net = ARCHITECTURES[architecture](**(model_kwargs or {}))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    budget = Budget(steps, minutes)
    sched = budget.lr_scheduler(opt, warmup=100, floor=0.02)
    net, opt = accelerator.prepare(net, opt)
    rng = np.random.default_rng(seed if aug_seed is None else aug_seed)
    net.train()
    done = 0
    for step in budget.steps():
        done = step + 1
        idx = rng.integers(0, num_train, size=batch_size)
        x = torch.from_numpy(augment(images[idx], rng)).permute(0, 3, 1, 2).float().to(accelerator.device)
        out = net(x)
        loss = F.cross_entropy(out["cls"].reshape(-1, out["cls"].shape[-1]), t_cls[idx].reshape(-1).to(x.device))
        loss = loss + 0.3 * F.cross_entropy(out["size"].reshape(-1, len(SIZE_NAMES)),
                                            t_size[idx].reshape(-1).to(x.device), ignore_index=-100)
        optimizer_step(accelerator, net, opt, sched, loss)
        if step % 100 == 0:
            log(f"{label} step {step} loss {loss.item():.4f}")
    net = accelerator.unwrap_model(net).eval()
    metrics = evaluate(net)
    metrics["train_minutes"] = budget.elapsed_min()
    metrics["steps"] = done
    provenance = {"seed": seed, "aug_seed": seed if aug_seed is None else aug_seed, "data_split": data_split,
                  "data_start": data_start, "num_train": num_train}
    save_shapes_net(net, output_dir, extra={"metrics": metrics, **provenance})
    if real_stats:
        try:
            save_real_statistics(output_dir)
        except ImportError as exc:  # diffusion_accel.eval.frechet not there yet
            log(f"real statistics not written ({exc}); run shapes_net.save_real_statistics() later")
    return report_metrics(label, output_dir, metrics)


def train_shapes_net(output_dir: str | Path, seed: int = 0, minutes: float | None = None, num_train: int = 30000,
                     steps: int = 800, batch_size: int = 96) -> dict[str, Any]:
    """Train shapes-net on ``num_train`` generator samples; writes weights, config, real stats and metrics."""
    return train_classifier(output_dir, "shapes-net", seed=seed, minutes=minutes, num_train=num_train, steps=steps,
                            batch_size=batch_size)


def train_shapes_judge(output_dir: str | Path, seed: int = 0, minutes: float | None = None, num_train: int = 30000,
                       steps: int = 2000, batch_size: int = 96, agreement: bool = True) -> dict[str, Any]:
    """Train the independent judge: :class:`~.shapes_net.ShapesJudge` on split ``"judge"`` (images shapes-net never
    saw), init seed ``JUDGE_INIT_SEED + seed``, augmentation seed ``JUDGE_AUG_SEED + seed``. With ``agreement``
    the metrics also hold its agreement with shapes-net on the shipped PixArt testbed's held-out images
    (:func:`judge_agreement`)."""
    metrics = train_classifier(output_dir, "shapes-judge", seed=JUDGE_INIT_SEED + seed,
                               aug_seed=JUDGE_AUG_SEED + seed, data_split="judge", minutes=minutes,
                               num_train=num_train, steps=steps, batch_size=batch_size, real_stats=False)
    metrics["shapes_net_test_metrics"] = {k: v for k, v in evaluate(load_shapes_net()).items()}
    if agreement:
        metrics["agreement"] = judge_agreement(load_shapes_net(output_dir))
    return report_metrics("shapes-judge", output_dir, metrics)


def judge_agreement(judge: torch.nn.Module, names: tuple[str, ...] = ("pixart",), num_prompts: int = 64,
                    seed: int = 0) -> dict[str, Any]:
    """Adherence by shapes-net and by ``judge`` on each shipped testbed pipeline's images of the held-out prompts
    (``evaluate.generate``, default call arguments), and the fraction of prompts where the two verdicts agree.
    Also how :func:`~.reward.prompt_reward` ranks the images: ``reward_auc_*`` is the probability that an image the
    net passes gets a higher reward (from the same net) than one it fails."""
    from .evaluate import generate, load
    from .reward import prompt_reward
    from .shapes import heldout_prompts
    from .shapes_net import adherence

    def reward_auc(rewards: np.ndarray, flags: list[bool]) -> float | None:
        good, bad = rewards[np.asarray(flags)], rewards[~np.asarray(flags)]
        if not len(good) or not len(bad):
            return None
        return float(np.mean((good[:, None] > bad[None, :]) + 0.5 * (good[:, None] == bad[None, :])))

    prompts = list(heldout_prompts())[:num_prompts]
    result: dict[str, Any] = {}
    for name in names:
        images = list(generate(load(name), name, prompts, seed=seed))
        net_score, net_flags = adherence(images, prompts, net="shapes-net", return_per_image=True)
        judge_score, judge_flags = adherence(images, prompts, net=judge, return_per_image=True)
        agree = [a == b for a, b in zip(net_flags, judge_flags, strict=True)]
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        with torch.no_grad():
            r_net = prompt_reward("shapes-net", x, prompts).numpy()
            r_judge = prompt_reward(judge, x, prompts).numpy()
        result[name] = {"num_prompts": len(prompts), "seed": seed, "adherence_shapes_net": net_score,
                        "adherence_shapes_judge": judge_score, "verdict_agreement": float(np.mean(agree)),
                        "both_pass": int(sum(a and b for a, b in zip(net_flags, judge_flags, strict=True))),
                        "only_shapes_net": int(sum(a and not b for a, b in zip(net_flags, judge_flags, strict=True))),
                        "only_shapes_judge": int(sum(b and not a
                                                     for a, b in zip(net_flags, judge_flags, strict=True))),
                        "reward_auc_shapes_net": reward_auc(r_net, net_flags),
                        "reward_auc_shapes_judge": reward_auc(r_judge, judge_flags),
                        "mean_reward_shapes_net": float(r_net.mean()),
                        "mean_reward_shapes_judge": float(r_judge.mean())}
        log(f"judge agreement {name}: {result[name]}")
    return result
