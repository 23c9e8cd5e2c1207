"""The output folder of a training run: who owns it, its checkpoints, and which one to resume.

Layout (Diffusers' example trainers' names)::

    output_dir/
      training_run.json         recipe, teacher, options: marks the folder as this run's
      checkpoint-<step>/        the resumable state as .safetensors + .json only (see .checkpoint), train_state.json
      validation/step-<step>.png
      model_index.json, ...     the trained pipeline, written at the end

Every check here runs before any model is loaded, so a wrong folder costs nothing and is left as it was.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

RUN_FILE = "training_run.json"
STATE_FILE = "train_state.json"
CHECKPOINT_PREFIX = "checkpoint-"
#: What a checkpoint folder may hold; anything else (a pickle) is refused, never loaded.
CHECKPOINT_SUFFIXES = (".safetensors", ".json")
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def checkpoints(output_dir: str | Path) -> list[Path]:
    """``checkpoint-<step>`` folders of ``output_dir`` that hold a train state, oldest first (by step)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text())


def write_state(checkpoint: Path, recipe: str, step: int, extra: dict[str, Any] | None = None) -> None:
    (checkpoint / STATE_FILE).write_text(json.dumps({"recipe": recipe, "step": step, **(extra or {})}, indent=2))


def resolve_resume(output_dir: str | Path, resume: str | None, recipe: str) -> Path | None:
    """The checkpoint folder to resume from (``None`` for a fresh run); raises when it belongs to another recipe."""
    if resume is None:
        return None
    if resume == "latest":
        found = checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: {output_dir} has no checkpoint-<step>/ folder; "
                                    "drop the flag to start a new run.")
        path = found[-1]
    else:
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"--resume_from_checkpoint {resume}: not a checkpoint of this trainer (no "
                                    f"{STATE_FILE}); pass a checkpoint-<step>/ folder or 'latest'.")
    owner = read_state(path).get("recipe")
    if owner != recipe:
        raise ValueError(f"--resume_from_checkpoint {path} is a checkpoint of recipe {owner!r}, not {recipe!r}; "
                         f"resume it with `diffusion-accel train {owner} ...`, or start {recipe!r} without the flag.")
    other = sorted(p.name for p in path.iterdir() if p.suffix not in CHECKPOINT_SUFFIXES)
    if other:
        raise ValueError(f"--resume_from_checkpoint {path} holds {', '.join(other)}: neither safetensors nor JSON, "
                         "as in the pickle checkpoints of earlier diffusion-accel versions (accelerate's "
                         "optimizer.bin, random_states_0.pkl, ...). They are not loaded: unpickling a file can run "
                         "code. Start the run again (--overwrite_output_dir, without --resume_from_checkpoint), or "
                         "finish it with the version that wrote it.")
    return path


def claim(output_dir: str | Path, recipe: str, resuming: bool, overwrite: bool) -> None:
    """Make ``output_dir`` this run's, or raise before touching it.

    A folder that holds another run (a different recipe, or the same recipe without ``--resume_from_checkpoint``)
    is refused unless ``overwrite``; a non-empty folder that is not a run is always refused."""
    folder = Path(output_dir)
    run_file = folder / RUN_FILE
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output_dir {folder} is a file; pass a folder.")
    if run_file.is_file():
        previous = json.loads(run_file.read_text())
        if previous.get("recipe") != recipe:
            if resuming:
                raise ValueError(f"--output_dir {folder} holds a run of recipe {previous.get('recipe')!r}; it cannot "
                                 f"be resumed as {recipe!r}. Choose another --output_dir.")
            if not overwrite:
                raise ValueError(f"--output_dir {folder} holds a run of recipe {previous.get('recipe')!r}. Choose "
                                 "another --output_dir, or pass --overwrite_output_dir to replace that run.")
        elif not resuming and not overwrite:
            raise ValueError(f"--output_dir {folder} already holds a {recipe!r} run. Pass --resume_from_checkpoint "
                             "latest to continue it, --overwrite_output_dir to start it again, or choose another "
                             "--output_dir.")
        if overwrite and not resuming:
            shutil.rmtree(folder)
    elif folder.is_dir() and any(folder.iterdir()):
        raise ValueError(f"--output_dir {folder} is not empty and is not a training run of this package; choose an "
                         "empty or new folder (nothing in it was changed).")
    elif resuming:
        raise ValueError(f"--output_dir {folder} holds no run to resume; drop --resume_from_checkpoint.")


def write_run_record(output_dir: str | Path, recipe: str, record: dict[str, Any]) -> None:
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_FILE).write_text(json.dumps({"recipe": recipe, **record}, indent=2, default=str))


def rotate(output_dir: str | Path, total_limit: int | None) -> None:
    """Delete the oldest checkpoints so that, with the one about to be saved, at most ``total_limit`` remain."""
    if total_limit is None:
        return
    found = checkpoints(output_dir)
    for path in found[: max(0, len(found) - total_limit + 1)]:
        shutil.rmtree(path)


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
