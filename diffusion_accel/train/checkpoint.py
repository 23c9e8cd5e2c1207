"""Write and restore the whole state of a run in a checkpoint folder of safetensors and JSON files only.

Why not ``accelerator.save_state``: accelerate 1.15 writes the models as safetensors but the optimizers
(``optimizer.bin``), LR schedules (``scheduler.bin``), gradient scaler, RNG states (``random_states_<rank>.pkl``)
and registered objects (``custom_checkpoint_<i>.pkl``) with ``torch.save``, and ``load_state`` unpickles them. Its
save/load pre-hooks are handed the models only, so they cannot change how the rest is written. Checkpoints get
shared and resumed by other people, so this module writes the same objects itself through :mod:`.state_tree`,
under accelerate's names::

    model[_i].safetensors + .json          every module passed through ``accelerator.prepare`` (unwrapped)
    optimizer[_i].safetensors + .json      every prepared optimizer (moments as tensors, param groups as JSON)
    scheduler[_i].json                     every prepared LR schedule (Diffusers' ``LambdaLR`` state is numbers)
    accelerator.json                       accelerate's micro-step counter and the fp16 gradient scaler
    custom_checkpoint_<i>[.safetensors] + .json   the data cursor, then the recipe's ``checkpoint_objects()``
    random_states_<rank>[.safetensors] + .json    each process's python, numpy, torch and CUDA generators

The lists walked are the ones ``save_state`` walks (``_models``, ``_optimizers``, ``_schedulers``), so whatever a
recipe prepares is checkpointed, as before. Accelerate still owns devices, processes and mixed precision. The main
process writes the shared files (their state is replicated across processes); every process writes its generators.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import state_tree
from .run_folder import STATE_FILE

logger = logging.getLogger("diffusion_accel.train")

_RNG_PREFIX = "random_states_"


class _AcceleratorCounters:
    """Accelerate's own state: the micro-step counter (gradient accumulation) and the fp16 gradient scaler."""

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator

    def state_dict(self) -> dict[str, Any]:
        scaler = self.accelerator.scaler
        return {"step": self.accelerator.step, "scaler": None if scaler is None else scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accelerator.step = state["step"]
        if self.accelerator.scaler is not None and state["scaler"] is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])


class _Generators:
    """This process's global random generators: python, numpy, torch (CPU) and, when present, CUDA."""

    @staticmethod
    def state_dict() -> dict[str, Any]:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    @staticmethod
    def load_state_dict(state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def check_supported(accelerator: Any) -> None:
    """Refuse sharded training before any work: DeepSpeed and FSDP split the optimizer state across processes,
    and these checkpoints hold the replicated state of one process."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM):
        raise ValueError(f"the trainer does not support {accelerator.distributed_type.value} (its checkpoints hold "
                         "each process's full, replicated state); launch with plain data parallelism, e.g. "
                         "`accelerate launch --multi_gpu`.")


def _numbered(prefix: str, index: int) -> str:
    return prefix if index == 0 else f"{prefix}_{index}"


def _shared(accelerator: Any, objects: list[Any]) -> list[tuple[str, Any]]:
    """(file name, object with ``state_dict``/``load_state_dict``) for the state every process holds alike."""
    return [*((_numbered("model", i), accelerator.unwrap_model(m)) for i, m in enumerate(accelerator._models)),
            *((_numbered("optimizer", i), o) for i, o in enumerate(accelerator._optimizers)),
            *((_numbered("scheduler", i), s) for i, s in enumerate(accelerator._schedulers)),
            ("accelerator", _AcceleratorCounters(accelerator)),
            *((f"custom_checkpoint_{i}", obj) for i, obj in enumerate(objects))]


def save(accelerator: Any, folder: Path, objects: list[Any]) -> None:
    """Write the run's state into ``folder``; every process calls it. ``objects``: the stateful objects besides
    what went through ``accelerator.prepare``, in a fixed order."""
    folder.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        for name, obj in _shared(accelerator, objects):
            state_tree.save(folder, name, obj.state_dict())
    state_tree.save(folder, f"{_RNG_PREFIX}{accelerator.process_index}", _Generators.state_dict())


def load(accelerator: Any, folder: Path, objects: list[Any]) -> None:
    """Restore what :func:`save` wrote into the same (prepared) objects; every process calls it."""
    shared = _shared(accelerator, objects)
    written = {p.stem for p in folder.glob("*.json")
               if not p.stem.startswith(_RNG_PREFIX) and p.name != STATE_FILE}
    expected = {name for name, _ in shared}
    if written != expected:
        raise ValueError(f"--resume_from_checkpoint {folder} does not hold this run's objects (extra: "
                         f"{sorted(written - expected)}, missing: {sorted(expected - written)}); it was written "
                         "with other flags (e.g. --use_lora, --latent_reward): resume with the flags that wrote it.")
    for name, obj in shared:
        obj.load_state_dict(state_tree.load(folder, name))
    rng = f"{_RNG_PREFIX}{accelerator.process_index}"
    if (folder / f"{rng}.json").is_file():
        _Generators.load_state_dict(state_tree.load(folder, rng))
    else:  # resumed on more processes than it was written by: the data stream does not depend on these
        logger.warning("%s has no random states of process %d; it keeps its seeded generators", folder,
                       accelerator.process_index)
