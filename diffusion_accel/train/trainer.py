"""The training loop shared by every recipe, on ``accelerate``.

Conventions (each chosen against a trap of the anchor trainers):

* **LR schedule length.** The schedule is built for ``max_train_steps`` optimizer steps and stepped once per
  optimizer step (``step_scheduler_with_optimizer=False``). With the default ``True``, accelerate steps it once per
  *process* per step unless batches are split, so Diffusers' examples, whose ``Accelerator(split_batches=True)``
  keyword accelerate 1.15 ignores, run an N-times-shorter warm-up and decay on N processes.
* **Batch.** ``--train_batch_size`` is per process; the data stream (:mod:`.data`) is a function of the step, so
  ``P`` processes with ``B/P`` each train on exactly what one process with ``B`` does.
* **Checkpoints** hold the trained module, optimizer, LR schedule, RNG, the data cursor and every object the recipe
  lists, as safetensors and JSON only (:mod:`.checkpoint`: accelerate's ``save_state`` pickles all but the
  models). They are written to ``checkpoint-<step>.partial`` and renamed once every process has written its part,
  so a run killed while saving never leaves a checkpoint that ``latest`` would pick.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, run_folder
from .data import BatchStream, DataCursor
from .options import TrainOptions
from .recipe import Recipe

logger = logging.getLogger("diffusion_accel.train")


def make_accelerator(options: TrainOptions):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    log_with = None if options.report_to == "none" else options.report_to
    if log_with == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError as exc:
            raise ImportError("--report_to tensorboard needs the tensorboard package: pip install tensorboard "
                              "(or use --report_to none).") from exc
    if log_with == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError as exc:
            raise ImportError("--report_to wandb needs the wandb package: pip install wandb (or use --report_to "
                              "none).") from exc
    project = ProjectConfiguration(project_dir=options.output_dir,
                                   logging_dir=str(Path(options.output_dir) / options.logging_dir))
    # cpu=True without CUDA: processes started by `accelerate launch --multi_gpu` / torchrun on a CPU machine then
    # form a gloo group (MULTI_CPU) instead of each believing it is alone and training on its own.
    return Accelerator(gradient_accumulation_steps=options.gradient_accumulation_steps,
                       mixed_precision=options.mixed_precision, log_with=log_with, project_config=project,
                       step_scheduler_with_optimizer=False, cpu=not torch.cuda.is_available())


def _save_checkpoint(accelerator, recipe: Recipe, options: TrainOptions, step: int, objects: list[Any]) -> None:
    final = run_folder.checkpoint_path(options.output_dir, step)
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process:
        run_folder.rotate(options.output_dir, options.checkpoints_total_limit)
    accelerator.wait_for_everyone()
    checkpoint.save(accelerator, partial, objects)
    accelerator.wait_for_everyone()  # every process's random states are in before the folder is renamed
    if accelerator.is_main_process:
        run_folder.write_state(partial, recipe.name, step, {"options": options.to_dict()})
        if final.exists():
            import shutil

            shutil.rmtree(final)
        os.replace(partial, final)
    accelerator.wait_for_everyone()


def _validate(accelerator, recipe: Recipe, model, options: TrainOptions, step: int) -> None:
    if not accelerator.is_main_process:
        return
    images = recipe.validation_images(accelerator.unwrap_model(model))
    if not images:
        return
    from diffusers.utils import make_image_grid

    cols = min(4, len(images))
    grid = make_image_grid(images, rows=-(-len(images) // cols), cols=cols)
    folder = Path(options.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    grid.save(folder / f"step-{step:06d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": wandb.Image(grid)}, step=step)


def run(recipe_cls: type[Recipe], options: TrainOptions) -> dict[str, Any]:
    """Train ``recipe_cls`` with ``options``; returns the recipe's record of the saved artefact plus run facts."""
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    options.validate()
    resume = run_folder.resolve_resume(options.output_dir, options.resume_from_checkpoint, recipe_cls.name)
    accelerator = make_accelerator(options)
    checkpoint.check_supported(accelerator)
    if accelerator.is_main_process:
        run_folder.claim(options.output_dir, recipe_cls.name, resuming=resume is not None,
                         overwrite=options.overwrite_output_dir)
    accelerator.wait_for_everyone()
    recipe = recipe_cls(options, accelerator)
    recipe.load_teacher()
    recipe.check()
    if accelerator.is_main_process:
        run_folder.write_run_record(options.output_dir, recipe.name,
                                    {**recipe.run_record(), "options": options.to_dict()})
    torch.manual_seed(options.seed)

    def stream_factory(num_samples: int) -> BatchStream:
        return BatchStream(num_samples, options.train_batch_size, accelerator.num_processes,
                           accelerator.process_index, options.seed)

    model = recipe.setup(stream_factory)
    stream = stream_factory(recipe.num_samples)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError(f"recipe {recipe.name!r} returned a module with no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=options.learning_rate, betas=(options.adam_beta1, options.adam_beta2),
                                  weight_decay=options.adam_weight_decay, eps=options.adam_epsilon)
    lr_schedule = get_scheduler(options.lr_scheduler, optimizer, num_warmup_steps=options.lr_warmup_steps,
                                num_training_steps=options.max_train_steps)
    model, optimizer, lr_schedule = accelerator.prepare(model, optimizer, lr_schedule)
    recipe.prepare_auxiliary()
    cursor = DataCursor(options.seed)
    objects = [cursor, *recipe.checkpoint_objects()]
    if resume is not None:
        checkpoint.load(accelerator, resume, objects)
        logger.info("resumed from %s at step %d", resume, cursor.step)
    if accelerator.is_main_process and options.report_to != "none":
        accelerator.init_trackers(f"diffusion-accel-{recipe.name}",
                                  config={k: v for k, v in options.to_dict().items() if v is not None})

    progress = tqdm(total=options.max_train_steps, initial=cursor.step, desc=f"train {recipe.name}",
                    disable=not accelerator.is_main_process, dynamic_ncols=True)
    started = time.time()
    first_step = cursor.step
    model.train()
    logs: dict[str, float] = {}
    while cursor.step < options.max_train_steps:
        step = cursor.step
        for micro in range(options.gradient_accumulation_steps):
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss, logs = recipe.loss(model, stream, step, micro)
                accelerator.backward(loss)
                if accelerator.sync_gradients and options.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, options.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        lr_schedule.step()
        logs = {**logs, **recipe.after_optimizer_step(model, step), "lr": lr_schedule.get_last_lr()[0]}
        cursor.step = step + 1
        progress.update(1)
        progress.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "lr", "reward")})
        accelerator.log(logs, step=cursor.step)
        if cursor.step == options.max_train_steps:
            break  # the last step's checkpoint and validation grid are written once, below
        if options.checkpointing_steps and cursor.step % options.checkpointing_steps == 0:
            _save_checkpoint(accelerator, recipe, options, cursor.step, objects)
        if options.validation_steps and cursor.step % options.validation_steps == 0:
            _validate(accelerator, recipe, model, options, cursor.step)
    progress.close()
    train_seconds = time.time() - started
    _save_checkpoint(accelerator, recipe, options, cursor.step, objects)
    accelerator.wait_for_everyone()
    record: dict[str, Any] = {}
    if accelerator.is_main_process:
        _validate(accelerator, recipe, model, options, cursor.step)
        record = recipe.save(accelerator.unwrap_model(model), options.output_dir)
        record.update({"recipe": recipe.name, "steps": cursor.step, "steps_this_session": cursor.step - first_step,
                       "train_seconds_this_session": train_seconds, "num_processes": accelerator.num_processes,
                       "global_batch": stream.global_batch * options.gradient_accumulation_steps,
                       "device": str(accelerator.device), "final_logs": logs})
        (Path(options.output_dir) / "train_metrics.json").write_text(json.dumps(record, indent=2, default=str))
    accelerator.end_training()
    return record
