"""Pieces shared by the testbed training loops: threads, accelerator, EMA, data tensors, a wall-clock budget."""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .shapes import ShapesSample, make_batch

logger = logging.getLogger("diffusion_accel.testbed")


def setup_torch(seed: int, threads: int | None = None) -> None:
    """Seed everything, cap CPU threads (``DA_THREADS`` env var, default 2: the machine is shared) and allow TF32
    matrix products on a GPU (the testbed models train in fp32)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(threads or int(os.environ.get("DA_THREADS", "2")))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def make_accelerator(mixed_precision: str = "no"):
    """An ``accelerate.Accelerator`` (the project standard: devices, mixed precision, multi-process)."""
    from accelerate import Accelerator

    return Accelerator(mixed_precision=mixed_precision)


def log(message: str) -> None:
    """Print with a timestamp (training runs in the background and is polled through its log)."""
    print(time.strftime("%H:%M:%S"), message, flush=True)
    logger.info(message)


def report_metrics(label: str, output_dir: str | Path, metrics: dict, filename: str = "metrics.json") -> dict:
    """The end of every testbed training run: log ``metrics`` and write them as JSON next to the saved model."""
    log(f"{label} metrics {metrics}")
    (Path(output_dir) / filename).write_text(json.dumps(metrics, indent=2, default=str))
    return metrics


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, 64, 64, 3]`` → float ``[N, 3, 64, 64]`` in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _make_chunk(args: tuple[str, int, int]) -> tuple[np.ndarray, list[ShapesSample]]:
    return make_batch(*args)


def dataset(split: str, count: int, start: int = 0, workers: int | None = None) -> tuple[np.ndarray,
                                                                                       list[ShapesSample]]:
    """``count`` generator samples of ``split`` (images uint8 and samples).

    Every sample is seeded by its index, so generating in ``workers`` processes (default: one per CPU core, at most
    16) gives exactly what one process gives."""
    workers = workers or min(16, os.cpu_count() or 1)
    if workers <= 1 or count < 4000:
        return make_batch(split, start, count)
    import multiprocessing

    step = -(-count // workers)
    chunks = [(split, s, min(step, start + count - s)) for s in range(start, start + count, step)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        parts = pool.map(_make_chunk, chunks)
    return np.concatenate([p[0] for p in parts]), [s for p in parts for s in p[1]]


class EMA:
    """Exponential moving average of a model's parameters (a frozen copy)."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        ema_params, params = list(self.model.parameters()), [p.detach() for p in model.parameters()]
        if len(ema_params) != len(params):
            raise ValueError("the EMA copy and the model have different parameter lists")
        torch._foreach_lerp_(ema_params, params, 1 - decay)  # one fused launch, not one per tensor
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)


class Budget:
    """Stop after ``max_steps`` or ``minutes`` of wall clock, whichever comes first."""

    def __init__(self, max_steps: int, minutes: float | None):
        self.max_steps = max_steps
        self.deadline = None if minutes is None else time.time() + 60.0 * minutes
        self.start = time.time()

    def steps(self) -> Iterator[int]:
        for step in range(self.max_steps):
            if self.deadline is not None and time.time() > self.deadline:
                log(f"time budget reached at step {step}")
                return
            yield step

    def elapsed_min(self) -> float:
        return (time.time() - self.start) / 60.0

    def progress(self, step: int) -> float:
        """Fraction done: the larger of the step fraction and the wall-clock fraction."""
        frac = step / max(1, self.max_steps)
        if self.deadline is not None:
            frac = max(frac, (time.time() - self.start) / max(1e-9, self.deadline - self.start))
        return min(1.0, frac)

    def lr_scheduler(self, opt: torch.optim.Optimizer, warmup: int, floor: float):
        """Warm-up then cosine decay to ``floor`` over this budget (steps or wall clock, whichever runs out first)."""
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: cosine_lr(s, self.max_steps, warmup=warmup, floor=floor, progress=self.progress(s)))


def optimizer_step(accelerator, model: torch.nn.Module, opt: torch.optim.Optimizer, sched, loss: torch.Tensor,
                   clip_norm: float | None = None) -> None:
    """One update: zero the gradients, backward through ``accelerator``, optionally clip, step, advance the LR."""
    opt.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    if clip_norm is not None:
        accelerator.clip_grad_norm_(model.parameters(), clip_norm)
    opt.step()
    sched.step()


def cosine_lr(step: int, total: int, warmup: int = 100, floor: float = 0.1, progress: float | None = None) -> float:
    """Warm-up then cosine decay to ``floor`` (a multiplier for LambdaLR); ``progress`` in [0, 1] overrides the
    step fraction (so a wall-clock budget still completes the decay)."""
    if step < warmup:
        return (step + 1) / warmup
    if progress is None:
        progress = (step - warmup) / max(1, total - warmup)
    progress = min(1.0, progress)
    return floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * progress))


def save_ema_pipeline(pipe, ema: EMA, output_dir: Path) -> None:
    """Put the EMA weights into ``pipe`` as its transformer and ``save_pretrained`` it to ``output_dir`` (replaced
    when it exists), on the CPU."""
    import shutil

    pipe.transformer = ema.model.eval()
    pipe.register_modules(transformer=pipe.transformer)
    pipe.to("cpu")
    if output_dir.exists():
        shutil.rmtree(output_dir)
    pipe.save_pretrained(str(output_dir))
