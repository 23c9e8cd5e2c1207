"""The training data stream: pre-encoded samples and a batch sequence that is a pure function of (seed, step).

Every random draw of an optimizer step (which samples, their noise, their timesteps) comes from generators seeded
by ``(seed, step, micro_step)`` for the *global* batch; each process then takes its contiguous slice. Hence

* resuming at step N reproduces exactly the batches an uninterrupted run would see (the stream has no hidden state:
  :class:`DataCursor`, saved with every checkpoint, only records the position and checks the seed), and
* ``P`` processes with per-process batch ``B / P`` see the samples and noise of one process with batch ``B``.

A ``DataLoader`` with a sampler would keep its own RNG and epoch state, which ``accelerate`` restores only through
``skip_first_batches``; the pre-encoded tensors here are small enough to index directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class GlobalDraw:
    """What one micro-step draws for the whole global batch, before the per-process slice."""

    indices: np.ndarray  # [G] sample indices
    uniforms: np.ndarray  # [G] U[0, 1) draws (recipes map them to timestep indices)
    noise_seed: int  # seeds a torch.Generator for the global noise tensors


class DataCursor:
    """Position of the data stream (the next optimizer step), saved and restored with every checkpoint."""

    def __init__(self, seed: int):
        self.seed = seed
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"the checkpoint was trained with --seed {int(state['seed'])}, not {self.seed}; resume "
                             "with the same seed (or start a new run).")
        self.step = int(state["step"])


class BatchStream:
    """Draws for optimizer step ``step`` / micro-step ``micro`` over ``num_samples`` samples."""

    def __init__(self, num_samples: int, per_process_batch: int, num_processes: int, process_index: int,
                 seed: int):
        self.num_samples = num_samples
        self.per_process = per_process_batch
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed

    @property
    def global_batch(self) -> int:
        return self.per_process * self.num_processes

    def draw(self, step: int, micro: int) -> GlobalDraw:
        rng = np.random.default_rng((self.seed, step, micro))
        indices = rng.integers(0, self.num_samples, size=self.global_batch)
        uniforms = rng.random(self.global_batch)
        noise_seed = int(rng.integers(0, 2**62))
        return GlobalDraw(indices, uniforms, noise_seed)

    def local(self) -> slice:
        """This process's rows of a global-batch tensor."""
        start = self.process_index * self.per_process
        return slice(start, start + self.per_process)

    def global_noise(self, draw: GlobalDraw, shape: tuple[int, ...], device: torch.device,
                     stream: int = 0) -> torch.Tensor:
        """Standard normal noise ``[G, *shape]`` for the whole global batch (``stream`` separates independent
        tensors of the same step); slice it with :meth:`local`."""
        gen = torch.Generator().manual_seed(draw.noise_seed + stream)
        return torch.randn((self.global_batch, *shape), generator=gen).to(device)

    def global_uniforms(self, draw: GlobalDraw, stream: int) -> torch.Tensor:
        """U[0, 1) draws ``[G]`` for the whole global batch, beyond :attr:`GlobalDraw.uniforms` (``stream`` >= 1
        separates them from the noise tensors' seeds); slice them with :meth:`local`."""
        gen = torch.Generator().manual_seed(draw.noise_seed + 1_000_003 * stream)
        return torch.rand(self.global_batch, generator=gen, dtype=torch.float64)
