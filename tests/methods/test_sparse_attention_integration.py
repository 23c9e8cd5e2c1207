"""Block-sparse attention inside Diffusers pipelines: exact at full density, self-attention only, reversible."""

from __future__ import annotations

import pytest
import torch

import diffusion_accel as da
from diffusion_accel.testing import fingerprint, run_pipe, tiny_pipeline

FULL = {"mask": "topk", "density": 1.0, "block_size": 16, "backend": "eager", "min_tokens": 0}


@pytest.mark.parametrize("family", ["pixart_alpha", "flux", "sd3", "wan", "ltx_video", "cogvideox"])
def test_full_density_equals_dense_and_remove_restores(family):
    pipe = tiny_pipeline(family)
    baseline = run_pipe(pipe, family)
    before = fingerprint(pipe)
    with da.accelerated(pipe, "sparse_attention", **FULL):
        out = run_pipe(pipe, family)
        stats = da.stats(pipe)
    assert torch.allclose(out, baseline, atol=1e-5), float((out - baseline).abs().max())
    densities = stats["sparse_attention"]["density"]
    assert densities and all(d["density"] == 1.0 for d in densities)
    assert fingerprint(pipe) == before
    assert torch.equal(run_pipe(pipe, family), baseline)


def test_only_self_attention_is_routed():
    pipe = tiny_pipeline("pixart_alpha")
    with da.accelerated(pipe, "sparse_attention", **FULL):
        hooked = [name for name, m in pipe.transformer.named_modules()
                  if hasattr(m, "_diffusers_hook") and "diffusion_accel.sparse_attention" in m._diffusers_hook.hooks]
        run_pipe(pipe, "pixart_alpha")
        densities = da.stats(pipe)["sparse_attention"]["density"]
    assert hooked and all(name.endswith("attn1") for name in hooked)  # attn2 (cross-attention) untouched
    assert len(densities) == len(hooked) * 4  # one routed call per self-attention layer and step


def test_sparse_masks_change_the_output_and_report_density():
    pipe = tiny_pipeline("flux")
    baseline = run_pipe(pipe, "flux")
    with da.accelerated(pipe, "sparse_attention", mask="asa", tau=0.3, block_size=16, backend="eager",
                        min_tokens=0):
        out = run_pipe(pipe, "flux")
        densities = da.stats(pipe)["sparse_attention"]["density"]
    mean = sum(d["density"] for d in densities) / len(densities)
    assert mean < 0.9 and not torch.allclose(out, baseline, atol=1e-4)
    assert {d["layer"] for d in densities} == set(range(4)) and {d["step"] for d in densities} == set(range(4))


def test_mask_refresh_reuses_masks():
    pipe = tiny_pipeline("pixart_alpha")
    with da.accelerated(pipe, "sparse_attention", mask="topk", density=0.5, block_size=16, backend="eager",
                        mask_refresh=2, min_tokens=0):
        run_pipe(pipe, "pixart_alpha")
        steps = {d["step"] for d in da.stats(pipe)["sparse_attention"]["density"]}
    assert steps == {0, 2}


def test_bad_sparse_configs():
    pipe = tiny_pipeline("wan")
    before = fingerprint(pipe)
    with pytest.raises(ValueError, match="mask must be one of"):
        da.apply(pipe, "sparse_attention", mask="random")
    with pytest.raises(ValueError, match="backend must be one of"):
        da.apply(pipe, "sparse_attention", backend="cuda-magic")
    assert fingerprint(pipe) == before
