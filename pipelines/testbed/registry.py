"""Where the shipped testbed pipelines live and how to call them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .models import TESTBED_NAMES
from .shapes_net import assets_root

__all__ = ["TESTBED_NAMES", "asset_dir_name", "default_call_kwargs", "testbed_path"]

#: Default sampling settings of each testbed (the numbers reported for it are measured with these).
DEFAULT_CALL_KWARGS: dict[str, dict[str, Any]] = {
    "pixart": {"num_inference_steps": 20, "guidance_scale": 4.5, "height": 64, "width": 64,
               "use_resolution_binning": False, "clean_caption": False},
    "flow": {"num_inference_steps": 28, "true_cfg_scale": 4.0, "negative_prompt": "", "height": 64, "width": 64},
}


def asset_dir_name(name: str) -> str:
    """``"pixart"`` → ``"testbed-pixart"``."""
    _check(name)
    return f"testbed-{name}"


def _check(name: str) -> None:
    if name not in TESTBED_NAMES:
        raise ValueError(f"Unknown testbed {name!r}; choose one of {', '.join(TESTBED_NAMES)}.")


def testbed_path(name: str) -> Path:
    """Folder of the shipped pipeline ``name`` (``assets/testbed-<name>``); a clear error when it is missing."""
    _check(name)
    path = assets_root() / asset_dir_name(name)
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(
            f"The testbed pipeline {name!r} is not in {path}. Train it with "
            f"`diffusion-accel testbed train {name}` (or "
            f"`diffusion_accel.pipelines.testbed.train.train({name!r}, {str(path)!r})`)."
        )
    return path


def default_call_kwargs(name: str) -> dict[str, Any]:
    """A copy of the default call arguments of testbed ``name`` (64x64, default steps and guidance)."""
    _check(name)
    return dict(DEFAULT_CALL_KWARGS[name])
