"""``blade``: the student trains under block-sparse attention (gradients flow through it), and the saved student
samples with it after a plain load."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import diffusion_accel as da
from diffusion_accel.train import train

SPARSE = "asa:block_size=8,min_tokens=0,tau=0.5"
TINY_PIXART = dict(pretrained_teacher_model="tiny:pixart_alpha", guidance_scale=4.0, resolution=32,
                   num_train_samples=16, train_batch_size=2, validation_steps=0, checkpointing_steps=0,
                   sparse_attention=SPARSE)


def _student_and_inputs(spec: str):
    from diffusion_accel.loading import load_pipeline
    from diffusion_accel.train.sparse_training import SparseStudent, check_sparse_student
    from diffusion_accel.train.teachers import teacher_family

    pipe = load_pipeline("tiny:pixart_alpha")
    family = teacher_family(pipe)
    family.use_resolution(32, 32)
    shape = family.latent_shape(32, 32)
    config = check_sparse_student(spec, pipe, shape)
    dense = copy.deepcopy(pipe.transformer).requires_grad_(True)
    sparse = copy.deepcopy(pipe.transformer).requires_grad_(True)
    student = SparseStudent(config, pipe, sparse, shape, 32)
    cond = family.encode_captions(["a red circle", "a blue square"]).tensors
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([700.0, 300.0])
    return family, dense, sparse, student, x, t, cond


def _grads(family, model, x, t, cond):
    model.zero_grad(set_to_none=True)
    out = family.predict(model, x, t, cond)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if "attn1.to_" in n}


def test_gradients_flow_through_the_sparse_attention():
    family, dense, sparse, student, x, t, cond = _student_and_inputs(SPARSE)
    out_d, grad_d = _grads(family, dense, x, t, cond)
    out_s, grad_s = _grads(family, sparse, x, t, cond)
    assert 0 < student.density() < 1  # blocks were skipped in this forward
    assert (out_s - out_d).abs().max() > 1e-4
    for name in grad_d:
        assert torch.isfinite(grad_s[name]).all() and grad_s[name].abs().max() > 0, name
    # the query/key projections get another gradient: the skipped blocks are missing from the softmax
    assert any((grad_s[n] - grad_d[n]).abs().max() > 1e-6 for n in grad_d if "to_q" in n)
    # keeping every block reproduces dense attention, forward and backward: the sparse path is exact attention
    family, dense, full, student, x, t, cond = _student_and_inputs("topk:block_size=8,min_tokens=0,density=1.0")
    out_d, grad_d = _grads(family, dense, x, t, cond)
    out_f, grad_f = _grads(family, full, x, t, cond)
    assert student.density() == 1.0
    torch.testing.assert_close(out_f, out_d, atol=1e-5, rtol=1e-4)
    for name in grad_d:
        torch.testing.assert_close(grad_f[name], grad_d[name], atol=1e-5, rtol=1e-3, msg=name)


def test_saved_student_samples_sparse_after_a_plain_load(tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "blade"
    record = train("blade", output_dir=str(out), max_train_steps=2, learning_rate=1e-3, **TINY_PIXART)
    assert record["sparse_attention"]["mask"] == "asa" and record["sparse_attention"]["block_size"] == 8
    assert 0 < record["final_logs"]["sparse_density"] < 1
    pipe = DiffusionPipeline.from_pretrained(str(out), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)

    def sample():
        return pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="np").images

    sparse = sample()
    densities = [d["density"] for d in da.stats(pipe)["sparse_attention"]["density"]]
    assert densities and max(densities) < 1
    assert np.array_equal(sample(), sparse)  # the next call keeps the method (and its masks' seeds)
    with da.accelerated(pipe, "delta_cache") as handle:  # other methods come with the stored one, not instead
        assert {c.name for c in handle.configs} == {"delta_cache", "sparse_attention"}
    da.remove(pipe)  # an explicit opt-out: dense from now on
    dense = sample()
    assert np.abs(dense - sparse).max() > 1e-4
    assert np.array_equal(sample(), dense)


def test_resumed_blade_run_draws_the_same_masks(tmp_path):
    options = dict(TINY_PIXART, max_train_steps=4, checkpointing_steps=2, learning_rate=1e-3, ema_decay=0.5)
    first = tmp_path / "first"
    train("blade", output_dir=str(first), **options)
    second = tmp_path / "second"
    second.mkdir()
    shutil.copytree(first / "checkpoint-2", second / "checkpoint-2")
    shutil.copy(first / "training_run.json", second / "training_run.json")
    train("blade", output_dir=str(second), resume_from_checkpoint="latest", **options)
    for name in ("model", "model_1", "custom_checkpoint_1"):
        a = load_file(str(first / "checkpoint-4" / f"{name}.safetensors"))
        b = load_file(str(second / "checkpoint-4" / f"{name}.safetensors"))
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=f"{name}: {key}")


def test_stored_method_configs_are_validated_when_the_pipeline_is_built():
    from diffusers import PixArtAlphaPipeline
    from diffusion_accel.pipelines.contract import with_sampler_contract

    from diffusion_accel.loading import load_pipeline

    components = load_pipeline("tiny:pixart_alpha").components
    cls = with_sampler_contract(PixArtAlphaPipeline)
    with pytest.raises(ValueError, match="Unknown option"):
        cls(**components, accel_methods=[{"method": "sparse_attention", "blocksize": 8}])
    with pytest.raises(ValueError, match="list of method config dicts"):
        cls(**components, accel_methods={"method": "sparse_attention"})
    plain = cls(**components)  # no stored methods: model_index.json stays as before
    assert "accel_methods" not in plain.config
