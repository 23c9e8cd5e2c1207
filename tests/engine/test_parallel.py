"""Context parallelism: methods whose decisions can differ between ranks are refused; the rest apply.

Diffusers 0.42.1 cannot enable context parallelism on a CPU-only host (``_resolve_parallel_config`` divides by
``torch.accelerator.device_count()``: checked below with two gloo processes), so the model's recorded
``_parallel_config`` is set by hand here; the end-to-end run needs GPUs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

import diffusion_accel as da
from diffusion_accel.parallel import NOT_RANK_CONSISTENT
from diffusion_accel.testing import fingerprint, run_pipe


def _cp(pipe, ulysses=2):
    pipe.transformer._parallel_config = SimpleNamespace(
        context_parallel_config=SimpleNamespace(ulysses_degree=ulysses, ring_degree=1))


def test_rank_dependent_methods_refused_under_context_parallelism():
    pipe = da.load_pipeline("tiny:flux")
    _cp(pipe)
    before = fingerprint(pipe)
    for name in da.list_methods(pipe):
        if name in NOT_RANK_CONSISTENT:
            with pytest.raises(ValueError, match=rf"Context parallelism over 2 ranks .*{name}"):
                da.apply(pipe, name)
            assert fingerprint(pipe) == before
        else:
            handle = da.apply(pipe, name)
            handle.remove()


def test_enabled_after_apply_is_checked_at_the_call():
    pipe = da.load_pipeline("tiny:flux")
    with da.accelerated(pipe, "fbcache"):
        _cp(pipe)
        with pytest.raises(ValueError, match="fbcache"):
            run_pipe(pipe, "flux")
        pipe.transformer._parallel_config = None
        run_pipe(pipe, "flux")


@pytest.mark.skipif(sys.platform != "linux", reason="gloo check uses fork-free subprocesses on Linux")
def test_diffusers_context_parallel_needs_an_accelerator(tmp_path):
    """Two gloo ranks on CPU: Diffusers' enable_parallelism fails before any of our code runs (documented)."""
    import torch

    if torch.accelerator.device_count() > 0:
        pytest.skip("an accelerator is present: the GPU run covers context parallelism")
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent("""
        import os, sys, torch.distributed as dist
        dist.init_process_group("gloo")
        from diffusers import ContextParallelConfig, FluxTransformer2DModel
        model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                       pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
        try:
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
            print("ENABLED")
        except ZeroDivisionError as exc:
            print("ZeroDivisionError", exc)
        dist.destroy_process_group()
    """))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29561", "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all("ZeroDivisionError" in out for out in outs), outs
