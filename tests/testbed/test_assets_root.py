"""The shipped models are found when the package is laid out as setuptools installs it, not only from the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_assets_found_in_an_installed_layout(tmp_path):
    """pipelines/ and assets/ inside diffusion_accel/ (the package-dir mapping of pyproject.toml), assets/ without an
    __init__.py: importlib.resources.files() gives a MultiplexedPath there, whose str() is not a folder."""
    package = tmp_path / "site" / "diffusion_accel"
    package.mkdir(parents=True)
    for entry in (REPO / "diffusion_accel").iterdir():
        (package / entry.name).symlink_to(entry)
    for folder in ("pipelines", "kernels", "eval", "assets"):
        (package / folder).symlink_to(REPO / folder)
    code = ("from diffusion_accel.pipelines.testbed.registry import testbed_path; "
            "from diffusion_accel.pipelines.testbed.shapes_net import assets_root; "
            "print(assets_root()); print(testbed_path('flow'))")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    root, flow = out.stdout.split()
    assert Path(root) == package / "assets"
    assert (Path(flow) / "model_index.json").is_file()
