"""Helpers for tests, ours and those of code that adds a family or a method.

``FAMILIES`` and ``tiny_pipeline(family, seed=0)`` build each family's real Diffusers pipeline class with tiny random
components and tokenizers made in code; :func:`run_pipe` calls one with a fixed seed and small sizes, and
:func:`fingerprint` records what ``remove`` (or a failed ``apply``) must leave unchanged.
:func:`assert_pickle_free` checks a training checkpoint folder byte by byte.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import diffusers_internals as internals
from .pipelines.tiny import FAMILIES, tiny_call_kwargs, tiny_pipeline

__all__ = ["FAMILIES", "assert_pickle_free", "compat_methods", "fingerprint", "kill_once_saved", "linear_ag_spec",
           "method_name", "one_and_two_process_runs", "pipe_outputs", "router_spec", "run_pipe", "tiny_call_kwargs",
           "tiny_pipeline", "train_process", "two_process_launch"]


def pipe_outputs(pipe: Any, family: str, seed: int = 0, **overrides: Any) -> dict[str, torch.Tensor]:
    """Call a tiny pipeline with fixed seed and small sizes; return every output it gives (``images`` or ``frames``,
    and LTX-2's ``audio``) as float tensors by field name."""
    kwargs = {**tiny_call_kwargs(family), **overrides}
    if "pixart" in family:
        kwargs.setdefault("clean_caption", False)
    out = pipe(**kwargs, generator=torch.Generator().manual_seed(seed), output_type="pt")
    return {name: torch.as_tensor(value).float() for name, value in out.items() if value is not None}


def run_pipe(pipe: Any, family: str, seed: int = 0, **overrides: Any) -> torch.Tensor:
    """Call a tiny pipeline with fixed seed and small sizes; return its image or video output as one float tensor."""
    outputs = pipe_outputs(pipe, family, seed, **overrides)
    return outputs["images"] if "images" in outputs else outputs["frames"]


def fingerprint(pipe: Any) -> dict[str, Any]:
    """What must be unchanged after a failed apply or a remove: class, attributes, forwards and hook registries."""
    from .pipelines.adapters import find_adapter

    denoiser = find_adapter(pipe).get_denoiser(pipe)
    modules = {}
    for name, m in denoiser.named_modules():
        registry = internals.hook_registry(m)
        own = {"forward": "forward" in m.__dict__, "hook_registry": registry is not None,
               "cache_config": internals.has_own_cache_config(m)}
        modules[name] = (sorted(k for k, present in own.items() if present),
                         sorted(registry.hooks) if registry is not None else None)
    return {
        "class": type(pipe),
        "attrs": sorted(pipe.__dict__),
        "modules": modules,
        "processors": {n: type(p) for n, p in getattr(denoiser, "attn_processors", {}).items()},
    }


_COMPAT_DIR: list = []


def linear_ag_spec(steps: int = 4) -> dict:
    """A ``linear_ag`` config with synthetic coefficients (``[1, 0, 0]`` then a fixed affine estimate per step): a
    valid coefficients file, written once per test process. The compatibility tests check how the method runs with
    compile / offload / precision, not how good the fit is (``test_linear_ag.py`` fits real ones)."""
    import tempfile
    from pathlib import Path

    from diffusion_accel.methods.linear_ag import save_coefficients

    if not _COMPAT_DIR:
        _COMPAT_DIR.append(Path(tempfile.mkdtemp(prefix="da-linear-ag-")))
    path = _COMPAT_DIR[0] / f"compat-{steps}.safetensors"
    if not path.is_file():
        coefficients = torch.tensor([[1.0, 0.0, 0.0]] + [[0.8, 0.15, 0.05]] * (steps - 1))
        save_coefficients(path, coefficients, {"family": "any", "steps": steps})
    return {"method": "linear_ag", "coefficients": str(path)}


def router_spec(pipe, family: str, steps: int = 4, threshold: float = 0.5, method: str = "harmonica") -> dict:
    """A ``harmonica`` config with a random router for ``pipe`` (seeded by the family name; no guidance check), so
    that a router method runs on every family without training one; ``threshold`` 0.5 reuses about half the cells."""
    import tempfile
    import zlib
    from pathlib import Path

    from diffusion_accel.cache_router import CacheRouter

    if not _COMPAT_DIR:
        _COMPAT_DIR.append(Path(tempfile.mkdtemp(prefix="da-linear-ag-")))
    folder = _COMPAT_DIR[0] / f"router-{family}-{steps}"
    if not (folder / "router_config.json").is_file():
        from .pipelines.adapters import find_adapter

        units = len(find_adapter(pipe).routing_units(pipe))
        gen = torch.Generator().manual_seed(zlib.crc32(family.encode()))
        CacheRouter.for_pipeline(pipe, steps, None, logits=torch.randn(steps, units, generator=gen)).save(folder)
    return {"method": method, "router": str(folder), "threshold": threshold}


def method_name(spec) -> str:
    return spec if isinstance(spec, str) else spec["method"]


def compat_methods(pipe) -> list:
    """Every method the compatibility tests run on ``pipe``: ``da.list_methods(pipe)`` (methods applicable with their
    default config) plus ``linear_ag`` with synthetic coefficients where guidance methods apply and ``harmonica``
    with a random router (:func:`router_spec`) where the family has blocks."""
    import diffusion_accel as da
    from diffusion_accel.config import parse_config

    specs: list = list(da.list_methods(pipe))
    adapter = da.find_adapter(pipe)
    extras = [linear_ag_spec()] + ([router_spec(pipe, adapter.family)] if adapter.block_lists else [])
    specs += [spec for spec in extras if parse_config(spec).not_applicable_reason(adapter, pipe) is None]
    return specs


def assert_pickle_free(folder: str | Path) -> None:
    """Every file of a checkpoint folder is JSON or safetensors, judged by its bytes, not its name: no zip
    (``torch.save``), no pickle (which starts with ``0x80``, its protocol opcode, and is not JSON either)."""
    for path in sorted(Path(folder).iterdir()):
        assert path.is_file(), f"{path}: not a file"
        data = path.read_bytes()
        assert not data.startswith(b"PK\x03\x04"), f"{path}: a zip archive (torch.save)"
        if path.suffix == ".json":
            assert not data.startswith(b"\x80"), f"{path}: a pickle"
            json.loads(data)
        else:
            assert path.suffix == ".safetensors", f"{path}: neither JSON nor safetensors"
            # safetensors: an 8-byte little-endian header size, a JSON header, then exactly the tensors' bytes
            size = int.from_bytes(data[:8], "little")
            header = json.loads(data[8:8 + size])
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            assert 8 + size + end == len(data), f"{path}: not a safetensors file"


def train_process(args: list[str], gpu: bool = False) -> subprocess.Popen:
    """``python -m diffusion_accel.train ARGS`` of this interpreter, one thread, output captured; the CPU unless
    ``gpu`` (CUDA hidden)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({} if gpu else {"CUDA_VISIBLE_DEVICES": ""})}
    return subprocess.Popen([sys.executable, "-m", "diffusion_accel.train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_once_saved(process: subprocess.Popen, state_file: Path, timeout: float = 300.0) -> None:
    """SIGKILL ``process`` as soon as ``state_file`` (the file a checkpoint writes last) exists: a run killed right
    after a checkpoint, as a pre-empted job is. Fails if the file never appears."""
    deadline = time.time() + timeout
    while not state_file.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert state_file.exists(), process.stdout.read() if process.stdout else state_file


def two_process_launch() -> list[str]:
    """``accelerate launch`` for two CPU processes (gloo), as *this* interpreter's module: an ``accelerate`` script on
    PATH may belong to another environment, whose ``diffusion_accel`` is another checkout."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def one_and_two_process_runs(recipe: str, args: list[str], folder: Path, global_batch: int = 4) -> tuple[Path, Path]:
    """Train ``recipe`` twice on the CPU: one process at ``--train_batch_size global_batch`` into ``folder/one``, and
    two gloo processes at half that each into ``folder/two`` (the same global batch); both must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    runs = ((folder / "one", [sys.executable], global_batch), (folder / "two", two_process_launch(), global_batch // 2))
    for out, launcher, batch in runs:
        done = subprocess.run([*launcher, "-m", "diffusion_accel.train", recipe, *args, "--train_batch_size",
                               str(batch), "--output_dir", str(out)], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    return folder / "one", folder / "two"
