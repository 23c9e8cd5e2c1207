"""The interface between the shared training loop (:mod:`.trainer`) and one training method.

A recipe owns its models and its loss; the loop owns everything every trainer needs in the same way: the
``Accelerator``, the optimizer and LR schedule of the trained module, gradient accumulation and clipping, the data
cursor, checkpoints and resume, validation grids, trackers, the progress bar and the final save call.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .data import BatchStream
from .options import TrainOptions


class Recipe:
    """Subclass, set the class attributes and implement the methods marked *required*."""

    #: Name on the command line (``diffusion-accel train <name>``).
    name: ClassVar[str] = ""
    #: One line for ``diffusion-accel train --help``.
    summary: ClassVar[str] = ""
    #: What the recipe writes to ``--output_dir`` (for messages): a student pipeline, a cache router, ...
    artefact: ClassVar[str] = "student pipeline"
    #: The options dataclass (a :class:`TrainOptions` subclass holding the recipe's own flags).
    options_class: ClassVar[type[TrainOptions]] = TrainOptions

    #: Training samples; :meth:`setup` sets it (the loop's data stream draws indices below it).
    num_samples: int = 0

    def __init__(self, options: TrainOptions, accelerator: Any):
        self.options = options
        self.accelerator = accelerator

    # -- required -------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Cheap checks of the options and the teacher's *config* (before data is encoded); raise ``ValueError``
        naming the fix. Called after :meth:`load_teacher`."""

    def load_teacher(self) -> None:
        """Load the teacher pipeline (required)."""
        raise NotImplementedError

    def setup(self, stream_factory) -> torch.nn.Module:
        """Build the data and the models; return the module the loop optimises (required).
        ``stream_factory(num_samples)`` gives this process's :class:`BatchStream`."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, stream: BatchStream, step: int, micro: int) -> tuple[torch.Tensor,
                                                                                                  dict[str, float]]:
        """The loss of one micro-step (mean over this process's rows) and scalars to log (required)."""
        raise NotImplementedError

    def save(self, model: torch.nn.Module, output_dir: str) -> dict[str, Any]:
        """Write the trained artefact into ``output_dir``; return what to record about it (required)."""
        raise NotImplementedError

    # -- optional -------------------------------------------------------------------------------------------
    def checkpoint_objects(self) -> list[Any]:
        """Stateful objects besides the trained module, its optimizer and LR schedule (which the loop checkpoints):
        target networks, EMA copies, auxiliary models. Each needs ``state_dict``/``load_state_dict``, its state made
        of tensors, numpy arrays, numbers, strings, lists, tuples and dicts (checkpoints hold no pickle)."""
        return []

    def prepare_auxiliary(self) -> None:
        """Pass auxiliary trainable models and their optimizers through ``self.accelerator.prepare`` (called
        before the state is restored)."""

    def after_optimizer_step(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """Called once per optimizer step (after the update): EMA targets, auxiliary model updates."""
        return {}

    def validation_images(self, model: torch.nn.Module) -> list[Any]:
        """PIL images for the validation grid (empty: no grid)."""
        return []

    def run_record(self) -> dict[str, Any]:
        """Facts written to ``training_run.json`` besides the options (teacher name, ...)."""
        return {}
