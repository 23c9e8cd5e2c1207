"""The shipped testbed pipelines load offline and generate; registry and CLI wiring; speed tier."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from diffusion_accel.pipelines.testbed import registry


@pytest.mark.parametrize("name", registry.TESTBED_NAMES)
def test_shipped_pipeline_loads_offline_and_generates(name):
    import diffusers
    from diffusion_accel.pipelines.testbed.evaluate import generate, load

    pipe = load(name)
    base = {"pixart": "PixArtAlphaPipeline", "flow": "FluxPipeline"}[name]
    assert isinstance(pipe, getattr(diffusers, base)) and type(pipe).__name__ == f"{base}WithContract"
    images = generate(pipe, name, ["a red circle", "a blue square in the top left"], num_inference_steps=3)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
    assert images.std() > 5  # not a flat image


def test_registry_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="pixart"):
        registry.testbed_path("nope")
    monkeypatch.setattr(registry, "assets_root", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="testbed train flow"):
        registry.testbed_path("flow")
    kwargs = registry.default_call_kwargs("pixart")
    kwargs["num_inference_steps"] = 1
    assert registry.default_call_kwargs("pixart")["num_inference_steps"] == 20


def test_cli_parser_has_train_and_eval():
    from diffusion_accel.pipelines.testbed.cli import add_testbed_parser

    parser = argparse.ArgumentParser()
    add_testbed_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["testbed", "train", "pixart", "--minutes", "5", "--output", "x"])
    assert (args.name, args.minutes, args.output) == ("pixart", 5.0, "x") and callable(args.func)
    args = parser.parse_args(["testbed", "eval", "flow", "--prompts", "8"])
    assert (args.name, args.prompts) == ("flow", 8)
    with pytest.raises(SystemExit):
        parser.parse_args(["testbed", "train", "unknown"])


@pytest.mark.parametrize("name", registry.TESTBED_NAMES)
def test_speed_tier_is_the_same_architecture_and_runs(name):
    from diffusion_accel.pipelines.testbed.models import build_speed_pipeline, speed_call_kwargs

    pipe = build_speed_pipeline(name)
    shipped = registry.testbed_path(name)
    assert type(pipe.transformer).__name__ in (shipped / "transformer" / "config.json").read_text()
    # 2 steps: PixArtAlphaPipeline reads pred_original_sample at 1 step, which DPM-Solver does not return
    out = pipe("a red circle", num_inference_steps=2, output_type="np", **speed_call_kwargs(name)).images
    assert out.shape == (1, 128, 128, 3)


def test_full_width_tier_has_the_published_block_width_and_token_count():
    """PixArt-α's block (1152 = 16 x 72) on 1024 tokens, FLUX.1's (3072 = 24 x 128, RoPE axes summing to the head
    dim): what the router-overhead run times to read wall against MACs at the real GEMM-to-elementwise ratio."""
    from diffusion_accel.pipelines.testbed.models import flux_transformer_config

    from diffusion_accel.loading import base_call_kwargs, load_pipeline

    flux = flux_transformer_config("full-width")  # config only: 3 FLUX.1 blocks are 2.4 GB to build
    assert flux["num_attention_heads"] * flux["attention_head_dim"] == 3072
    assert sum(flux["axes_dims_rope"]) == flux["attention_head_dim"]
    pipe = load_pipeline("testbed:pixart", tier="full-width")
    block = pipe.transformer.transformer_blocks[0]
    seen = []
    block.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(tuple((args or (kwargs["hidden_states"],))[0]
                                                                               .shape)), with_kwargs=True)
    kwargs = {**base_call_kwargs("testbed:pixart", tier="full-width"), "num_inference_steps": 2}
    out = pipe("a red circle", output_type="np", **kwargs).images
    assert seen[0] == (2, 1024, 1152) and out.shape == (1, 256, 256, 3)  # CFG batch, tokens, width


def test_unknown_or_missing_tier_is_refused_with_the_choices():
    from diffusion_accel.pipelines.testbed.models import build_speed_pipeline

    from diffusion_accel.loading import load_pipeline

    with pytest.raises(ValueError, match="'quality', 'speed', 'full-width'"):
        load_pipeline("testbed:pixart", tier="huge")
    with pytest.raises(ValueError, match="tier='speed'"):
        build_speed_pipeline("wan", tier="full-width")


@pytest.mark.slow
@pytest.mark.parametrize("name", registry.TESTBED_NAMES)
def test_shipped_pipeline_meets_the_adherence_bar(name):
    from diffusion_accel.pipelines.testbed.evaluate import evaluate_pipeline

    result = evaluate_pipeline(name)
    assert result["adherence"] >= 0.8
    assert result["fid_shapes"] < 20 * max(result["fid_shapes_real_floor"], 1e-3)


def test_parallel_dataset_equals_one_process():
    from diffusion_accel.pipelines.testbed.shapes import make_batch
    from diffusion_accel.pipelines.testbed.train_common import dataset

    images, samples = dataset("train", 4000, start=7, workers=2)
    ref_images, ref_samples = make_batch("train", 7, 4000)
    assert np.array_equal(images, ref_images)
    assert [s.caption for s in samples] == [s.caption for s in ref_samples]


def test_pipeline_recipe_chains_stages(tmp_path, monkeypatch):
    """A two-stage recipe: stage 0 goes to <out>-stage0 and initialises stage 1, which is the output."""
    import time

    from diffusion_accel.pipelines.testbed import train as train_mod
    from diffusion_accel.pipelines.testbed import train_diffusion

    calls = []
    clock = [1000.0]  # a fake time.monotonic(): the fake trainings below "take" minutes
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])

    def fake_train_pipeline(name, output_dir, seed=0, minutes=None, **kwargs):
        calls.append((name, output_dir, minutes, kwargs))
        if minutes is not None:
            clock[0] += 60 * minutes  # uses its whole share
        return {"steps": kwargs["steps"]}

    monkeypatch.setattr(train_diffusion, "train_pipeline", fake_train_pipeline)
    monkeypatch.setitem(train_mod.PIPELINE_RECIPES, "tiny", {"pixart": ({"steps": 1, "lr": 1e-3},
                                                                        {"steps": 3, "lr": 5e-4})})
    from diffusion_accel.pipelines.testbed import train_vae as train_vae_mod

    vae_trainings = []

    def fake_train_vae(path, minutes=None, **kwargs):
        vae_trainings.append((path, minutes))
        clock[0] += 60 * 2.0  # the VAE takes 2 of the 8 minutes
        path.mkdir(parents=True)
        (path / "config.json").write_text("{}")

    monkeypatch.setattr(train_vae_mod, "train_vae", fake_train_vae)
    out = tmp_path / "pixart"
    metrics = train_mod.train("pixart", out, minutes=8.0, recipe="tiny", num_train=64)
    assert metrics == {"steps": 3, "recipe": "tiny"}
    (_, dir0, min0, kw0), (_, dir1, min1, kw1) = calls
    # no VAE given: one is trained next to the final output, once, and every stage uses it
    assert vae_trainings == [(tmp_path / "pixart-vae", pytest.approx(8.0 / 3))]  # capped at a third
    assert kw0["vae_path"] == kw1["vae_path"] == tmp_path / "pixart-vae"
    assert dir0 == tmp_path / "pixart-stage0" and dir1 == out
    # --minutes caps the whole command: the 6 minutes left after the VAE are split by steps (1 : 3)
    assert (min0, min1) == (pytest.approx(1.5), pytest.approx(4.5))
    assert kw0["init_from"] is None and kw1["init_from"] == dir0
    assert kw0["eval_prompts"] == 0 and "eval_prompts" not in kw1
    assert kw0["num_train"] == kw1["num_train"] == 64
    with pytest.raises(ValueError, match="Unknown recipe"):
        train_mod.train("pixart", out, recipe="nope")
    with pytest.raises(ValueError, match="drop steps"):
        train_mod.train("pixart", out, recipe="tiny", steps=5)
    # explicit hyper-parameters mean one plain run, no recipe
    calls.clear()
    train_mod.train("pixart", out, steps=2, lr=1e-3)
    assert len(calls) == 1 and calls[0][3] == {"steps": 2, "lr": 1e-3}


def test_flow_objective_trains_at_two_resolutions():
    """Multi-resolution flow training: the half-resolution set gets its own (4x fewer) position ids, and a step at
    either resolution gives a finite loss with gradients."""
    import torch
    from diffusion_accel.pipelines.testbed.evaluate import load
    from diffusion_accel.pipelines.testbed.train_diffusion import FlowObjective

    pipe = load("flow")
    full, half = torch.randn(3, 4, 16, 16), torch.randn(3, 4, 8, 8)
    objective = FlowObjective(pipe, ["", "a red circle"], [full, half], scaling=1.0, shift=0.0)
    assert [len(ids) for ids in objective.img_ids] == [64, 16]
    assert [tuple(x.shape[1:]) for x in objective.x0] == [(64, 16), (16, 16)]
    model = pipe.transformer.train()
    for res in (0, 1):
        model.zero_grad()
        gen = torch.Generator().manual_seed(0)
        loss = objective.loss(model, torch.tensor([0, 2]), torch.tensor([1, 0]), gen, res=res)
        loss.backward()
        assert torch.isfinite(loss)
        assert model.x_embedder.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("name", "share"), [("pixart", 0.3), ("flow", 1.0), ("flow", -0.1)])
def test_low_res_share_is_checked_before_any_work(name, share, tmp_path):
    from diffusion_accel.pipelines.testbed.train_diffusion import train_pipeline

    with pytest.raises(ValueError, match="low_res_share"):
        train_pipeline(name, tmp_path / "out", low_res_share=share)
    assert not (tmp_path / "out").exists()
