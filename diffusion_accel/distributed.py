"""Sharding work between the processes of ``accelerate launch`` / ``torchrun``, and gathering the results.

Used by the eval runner (``diffusion_accel.eval.runner``) and by ``diffusion-accel bench``: each process takes a
contiguous share of the work items (:func:`shard`, accelerate's ``split_between_processes``: earlier processes get
one more when the count does not divide), and :func:`gather` returns every process's results on every process, in
process order, so concatenating them gives the items in their original order. A single process (no launcher) gets
everything and :func:`gather` is the identity.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any


def partial_state() -> Any:
    """accelerate's ``PartialState``, with ``cpu=True`` when there is no CUDA (or ``ACCELERATE_USE_CPU`` is set):
    without it, processes started by ``accelerate launch --multi_gpu``/``torchrun`` on a CPU machine would each
    believe they are alone and all generate every item."""
    import torch
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return PartialState(cpu=cpu)


def end_process_group() -> None:
    """Destroy the default process group if this process started one (the end of a CLI command under ``accelerate
    launch`` / ``torchrun``). Left to interpreter shutdown, gloo's worker threads can be torn down while still
    joinable: the process then aborts with "terminate called without an active exception" after its work is done,
    and the launcher kills the other ranks (seen on a non-main bench process, which exits while the main one is
    still timing). A process that never imported torch cannot have one, and is not made to import it here."""
    import sys

    if "torch" not in sys.modules:
        return
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def shard_bounds(count: int, num_processes: int, process_index: int) -> tuple[int, int]:
    """``[start, end)`` of process ``process_index``'s contiguous share of ``count`` items (the split of
    accelerate's ``split_between_processes``: the first ``count % num_processes`` processes get one more)."""
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} is not one of {num_processes} processes.")
    per, extra = divmod(count, num_processes)
    start = process_index * per + min(process_index, extra)
    return start, start + per + (process_index < extra)


def shard(items: Sequence[Any], state: Any = None) -> list[Any]:
    """This process's contiguous share of ``items`` (all of them in a single process)."""
    state = state if state is not None else partial_state()
    start, end = shard_bounds(len(items), state.num_processes, state.process_index)
    return list(items[start:end])


def gather(local: list[Any], state: Any = None) -> list[Any]:
    """Every process's ``local`` list concatenated in process order, on every process (picklable objects; the
    identity in a single process)."""
    state = state if state is not None else partial_state()
    if state.num_processes == 1:
        return list(local)
    from accelerate.utils import gather_object

    return list(gather_object(list(local)))
