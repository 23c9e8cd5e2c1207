"""The BFM trainers on the shared stack: a stage-1 run and its resume, the stage-2 FRN run on it, the monolithic
baseline, and the refusals, each writing a pipeline that a plain load samples the way it was trained."""

from __future__ import annotations

import json

import pytest
import torch
from diffusion_accel.pipelines.bfm import BlockwiseFlowTransformer, feature_residual_hook
from safetensors.torch import load_file

from diffusion_accel.loading import load_pipeline
from diffusion_accel.testing import assert_pickle_free
from diffusion_accel.train import train

SMALL = {"num_train_samples": 24, "train_batch_size": 4, "validation_steps": 0, "num_validation_prompts": 0}


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    out = tmp_path_factory.mktemp("bfm") / "stage1"
    record = train("bfm", output_dir=str(out), max_train_steps=4, checkpointing_steps=2, **SMALL)
    return out, record


def test_stage1_writes_a_flux_pipeline_with_its_contract(stage1):
    out, record = stage1
    assert record["stage"] == "bfm" and record["images_seen"] == 16
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"] == ["diffusion_accel.pipelines.bfm.transformer", "BlockwiseFlowTransformer"]
    assert index["sampler_contract"]["num_inference_steps"] == 28
    pipe = load_pipeline(str(out))
    assert isinstance(pipe.transformer, BlockwiseFlowTransformer) and pipe.transformer.config.num_segments == 4
    assert feature_residual_hook(pipe.transformer) is None  # stage 1 has no FRN
    assert_pickle_free(out / "checkpoint-4")
    # the shipped weights are the EMA: they moved from the initialisation but are not the online weights
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in _weights(out).items() if k.startswith("fuse."))


def test_stage1_resume_matches_an_uninterrupted_run(stage1, tmp_path):
    straight, _ = stage1
    part = tmp_path / "part"
    train("bfm", output_dir=str(part), max_train_steps=4, checkpointing_steps=2, **SMALL)
    # a second run continues from checkpoint-2 of a copy that stopped there
    resumed = tmp_path / "resumed"
    import shutil

    shutil.copytree(part, resumed, ignore=shutil.ignore_patterns("checkpoint-4"))
    train("bfm", output_dir=str(resumed), max_train_steps=4, checkpointing_steps=2,
          resume_from_checkpoint=str(resumed / "checkpoint-2"), **SMALL)
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stage2_trains_only_the_frn_and_samples_with_fra(stage1, tmp_path):
    out, _ = stage1
    frn_out = tmp_path / "frn"
    record = train("bfm_frn", pretrained_model=str(out), output_dir=str(frn_out), max_train_steps=3,
                   learning_rate=1e-2, **SMALL)
    assert record["stage"] == "bfm_frn"
    before, after = _weights(out), _weights(frn_out)
    assert all(torch.equal(before[k], after[k]) for k in before)  # stage-1 weights untouched
    assert any(k.startswith("frn.proj") and v.abs().sum() > 0 for k, v in after.items())  # the FRN trained
    pipe = load_pipeline(str(frn_out))
    hook = feature_residual_hook(pipe.transformer)
    pipe("a red circle", num_inference_steps=8, generator=torch.Generator().manual_seed(0))
    # 8 steps over 4 segments, true CFG: R once per segment and branch, the FRN at the other steps
    assert (hook.full_runs, hook.residual_runs) == (8, 8)


def test_monolithic_baseline_trains_the_teachers_architecture(tmp_path):
    record = train("bfm", output_dir=str(tmp_path / "mono"), monolithic=True, max_train_steps=1, **SMALL)
    pipe = load_pipeline(str(tmp_path / "mono"))
    assert type(pipe.transformer).__name__ == "FluxTransformer2DModel" and record["num_segments"] == 1


def test_bad_inputs_are_refused_before_training(stage1, tmp_path):
    with pytest.raises(ValueError, match="Pick a divisor of 28"):
        train("bfm", output_dir=str(tmp_path / "a"), num_segments=5, max_train_steps=1, **SMALL)
    with pytest.raises(ValueError, match="FluxPipeline"):
        train("bfm", output_dir=str(tmp_path / "b"), pretrained_teacher_model="tiny:pixart_alpha",
              max_train_steps=1, **SMALL)
    with pytest.raises(ValueError, match="pretrained_model is required"):
        train("bfm_frn", output_dir=str(tmp_path / "c"), max_train_steps=1, **SMALL)
    mono = tmp_path / "mono"
    train("bfm", output_dir=str(mono), monolithic=True, max_train_steps=1, **SMALL)
    with pytest.raises(ValueError, match="not a BlockwiseFlowTransformer"):
        train("bfm_frn", pretrained_model=str(mono), output_dir=str(tmp_path / "d"), max_train_steps=1, **SMALL)
