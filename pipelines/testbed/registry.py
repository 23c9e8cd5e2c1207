"""Where the shipped testbed pipelines live and how to call them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .models import SAMPLER_CONTRACTS, TESTBED_NAMES
from .shapes_net import assets_root

__all__ = ["REBUILT_NAMES", "RESTORATION_NAMES", "STUDENT_NAMES", "STUDENT_TEACHERS", "TESTBED_NAMES",
           "VIDEO_STUDENT_NAMES", "VIDEO_TESTBED_NAMES", "asset_dir_name", "default_call_kwargs", "testbed_path"]

#: Video testbeds (:mod:`.wan`): trained like the image ones, judged by :mod:`.video_judge`.
VIDEO_TESTBED_NAMES: tuple[str, ...] = ("wan",)

#: Students distilled from a testbed pipeline (``diffusion-accel train``): name → the recipe that made them. Each
#: folder carries its own sampler contract (scheduler, steps, guidance off).
STUDENT_NAMES: dict[str, str] = {"pixart-lcm": "lcd", "pixart-rglcd": "rglcd", "wan-tdm": "tdm", "wan-blade": "blade"}

#: The students of the video testbed ``testbed:wan`` (``WanPipeline``s; ``wan-blade`` samples under the block-sparse
#: attention it was trained with, stored in its ``model_index.json``). Their transformers are stored in fp16 and load
#: back as fp32 (Diffusers' default dtype), which keeps ``assets/`` under its budget.
VIDEO_STUDENT_NAMES: tuple[str, ...] = ("wan-tdm", "wan-blade")

#: The testbed each student was distilled from: its VAE, text encoder and tokenizer are that folder's (links).
STUDENT_TEACHERS: dict[str, str] = {"pixart-lcm": "pixart", "pixart-rglcd": "pixart", "wan-tdm": "wan",
                                    "wan-blade": "wan"}

#: Image-restoration pipelines trained on the testbed's images and VAE: name → the preset that trains them
#: (``diffusion-accel train resshift --config <preset>``). They take a low-resolution image, not a prompt; the
#: number of steps is the stored scheduler's T.
RESTORATION_NAMES: dict[str, str] = {"resshift": "resshift-bicubic"}

#: Testbed pipelines too large for the 50 MB ``assets/`` budget: name → the command that trains them into
#: ``assets/testbed-<name>`` (git-ignored). Each folder carries its own sampler contract.
REBUILT_NAMES: dict[str, str] = {
    "bfm": "diffusion-accel train bfm --config flow-bfm --output_dir assets/testbed-bfm",
    "pixart-tdm": "diffusion-accel train tdm --config pixart-tdm --output_dir assets/testbed-pixart-tdm",
}


def asset_dir_name(name: str) -> str:
    """``"pixart"`` → ``"testbed-pixart"``."""
    _check(name)
    return f"testbed-{name}"


def _check(name: str) -> None:
    known = (*TESTBED_NAMES, *VIDEO_TESTBED_NAMES, *STUDENT_NAMES, *RESTORATION_NAMES, *REBUILT_NAMES)
    if name not in known:
        raise ValueError(f"Unknown testbed {name!r}; choose one of {', '.join(known)}.")


def testbed_path(name: str) -> Path:
    """Folder of the shipped pipeline ``name`` (``assets/testbed-<name>``); a clear error when it is missing."""
    _check(name)
    path = assets_root() / asset_dir_name(name)
    if not (path / "model_index.json").exists() and name in RESTORATION_NAMES:
        raise FileNotFoundError(
            f"The restoration pipeline {name!r} is not in {path}. Train it with `diffusion-accel train resshift "
            f"--config {RESTORATION_NAMES[name]} --output_dir runs/sr/{name}` and ship it with `python -m "
            f"diffusion_accel.pipelines.testbed.students runs/sr/{name} {name}`.")
    if not (path / "model_index.json").exists() and name in REBUILT_NAMES:
        raise FileNotFoundError(
            f"testbed:{name} is not shipped (it would not fit the assets' 50 MB budget); build it into {path} with "
            f"`{REBUILT_NAMES[name]}` (its CPU recipe; see the README).")
    if not (path / "model_index.json").exists() and name in STUDENT_NAMES:
        raise FileNotFoundError(
            f"The distilled student {name!r} is not in {path}. Train it with `diffusion-accel train "
            f"{STUDENT_NAMES[name]} --config {name} --output_dir runs/{name}` and ship it with `python -m "
            f"diffusion_accel.pipelines.testbed.students runs/{name} {name}` (see the README's trainers section).")
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(
            f"The testbed pipeline {name!r} is not in {path}. Train it with "
            f"`diffusion-accel testbed train {name}` (or "
            f"`diffusion_accel.pipelines.testbed.train.train({name!r}, {str(path)!r})`)."
        )
    return path


def default_call_kwargs(name: str) -> dict[str, Any]:
    """A copy of the default call arguments of testbed ``name`` (64x64, default steps and guidance): its sampler
    contract, which the shipped checkpoint also carries in ``model_index.json``."""
    _check(name)
    if name in RESTORATION_NAMES:
        import json

        config = json.loads((testbed_path(name) / "scheduler" / "scheduler_config.json").read_text())
        return {"num_inference_steps": int(config["num_train_timesteps"])}
    if name in STUDENT_NAMES or name in REBUILT_NAMES:
        import json

        from ..contract import CONTRACT_KEY

        index = json.loads((testbed_path(name) / "model_index.json").read_text())
        return dict(index.get(CONTRACT_KEY) or {})
    if name in VIDEO_TESTBED_NAMES:
        from .wan import SAMPLER_CONTRACT

        return dict(SAMPLER_CONTRACT)
    return dict(SAMPLER_CONTRACTS[name])
