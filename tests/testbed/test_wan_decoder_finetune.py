"""``testbed train wan-decoder``: the Wan VAE's decoder fine-tuned with its encoder side frozen, so the latent space
the shipped transformer and its students were trained in stays valid."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

WEIGHTS = "diffusion_pytorch_model.safetensors"
ENCODER_SIDE = ("encoder.", "quant_conv.")


@pytest.fixture()
def trained_with(tmp_path):
    """A testbed-architecture ``AutoencoderKLWan`` with non-default latent statistics: the latent space a transformer
    was trained in."""
    from diffusion_accel.pipelines.testbed.wan import Z_DIM, build_vae

    vae = build_vae(seed=0)
    vae.register_to_config(latents_mean=[0.1 * i for i in range(Z_DIM)], latents_std=[1.0 + i for i in range(Z_DIM)])
    folder = tmp_path / "trained_with"
    vae.save_pretrained(folder)
    return folder


def test_decoder_only_keeps_every_encoder_tensor_bit_for_bit(trained_with, tmp_path, monkeypatch):
    """Two chained decoder-only stages through the CLI (each with its own optimiser and EMA): every encoder and
    quant_conv tensor and the latent statistics are the initial ones exactly; the decoder side has moved."""
    from diffusion_accel.pipelines.testbed import train_wan

    from diffusion_accel.cli import main

    stage = {"steps": 2, "batch_size": 1, "lr": 1e-3, "decoder_only": True}
    monkeypatch.setattr(train_wan, "WAN_DECODER_RECIPE", (stage, stage))
    monkeypatch.setattr(train_wan, "vae_reconstruction_metrics", lambda vae: {})  # the weights are what is tested
    out = tmp_path / "decoder"
    assert main(["testbed", "train", "wan-decoder", "--init-from", str(trained_with), "--output", str(out)]) == 0
    before, after = load_file(str(trained_with / WEIGHTS)), load_file(str(out / WEIGHTS))
    assert before.keys() == after.keys()
    encoder = [k for k in before if k.startswith(ENCODER_SIDE)]
    assert encoder and all(torch.equal(after[k], before[k]) for k in encoder)
    decoder = [k for k in before if not k.startswith(ENCODER_SIDE)]
    assert any(not torch.equal(after[k], before[k]) for k in decoder if k.startswith("decoder."))
    assert any(not torch.equal(after[k], before[k]) for k in decoder if k.startswith("post_quant_conv."))
    config_before, config_after = (json.loads((f / "config.json").read_text()) for f in (trained_with, out))
    for key in ("latents_mean", "latents_std"):
        assert config_after[key] == config_before[key]
    assert (tmp_path / "decoder-stage0").is_dir()
    assert json.loads((out / "metrics.json").read_text())["decoder_only"] is True


def test_decoder_only_needs_a_trained_vae_and_the_recipe_takes_no_settings(tmp_path):
    from diffusion_accel.pipelines.testbed.train import train
    from diffusion_accel.pipelines.testbed.train_wan import train_wan_vae

    with pytest.raises(ValueError, match="decoder_only needs init_from"):
        train_wan_vae(tmp_path, decoder_only=True)
    with pytest.raises(ValueError, match="WAN_DECODER_RECIPE.*lr"):
        train("wan-decoder", tmp_path, lr=1e-3)


def test_bad_init_from_is_refused_before_any_work(tmp_path, capsys):
    """A folder with no saved VAE is named (not looked up on the Hub); a model that cannot continue from a saved one
    refuses --init-from instead of failing inside its trainer. Nothing is written either way."""
    from diffusion_accel.cli import main

    out = tmp_path / "out"
    assert main(["testbed", "train", "wan-decoder", "--init-from", str(tmp_path / "none"), "--output", str(out)]) != 0
    assert "no saved AutoencoderKLWan there" in capsys.readouterr().err
    assert main(["testbed", "train", "wan", "--init-from", str(tmp_path), "--output", str(out)]) != 0
    assert "--init-from applies to vae, pixart, flow, wan-decoder" in capsys.readouterr().err
    assert not out.exists()


def test_install_decoder_takes_only_a_decoder_fine_tune(trained_with, tmp_path):
    """A VAE whose encoder side and latent statistics are the pipeline's replaces its ``vae/``; one with another
    encoder (a VAE trained afresh) is refused with the command that makes the right one, the pipeline untouched."""
    from diffusers import AutoencoderKLWan
    from diffusion_accel.pipelines.testbed.train_wan import install_decoder
    from diffusion_accel.pipelines.testbed.wan import build_vae

    pipeline = tmp_path / "pipeline"
    AutoencoderKLWan.from_pretrained(str(trained_with)).save_pretrained(pipeline / "vae")
    original = (pipeline / "vae" / WEIGHTS).read_bytes()
    other = tmp_path / "other"
    build_vae(seed=1).save_pretrained(other)
    with pytest.raises(ValueError, match="not a decoder fine-tune.*testbed train wan-decoder --init-from"):
        install_decoder(other, pipeline)
    assert (pipeline / "vae" / WEIGHTS).read_bytes() == original

    fine_tuned = AutoencoderKLWan.from_pretrained(str(trained_with))
    with torch.no_grad():
        fine_tuned.post_quant_conv.bias.add_(1.0)
    fine_tuned.save_pretrained(tmp_path / "fine_tuned")
    install_decoder(tmp_path / "fine_tuned", pipeline)
    assert (pipeline / "vae" / WEIGHTS).read_bytes() == (tmp_path / "fine_tuned" / WEIGHTS).read_bytes()


def test_cpu_4x_recipe_chains_vae_transformer_and_decoder(tmp_path, monkeypatch):
    """``cpu-4x``: the fresh 4x VAE, the transformer on its latents, then the decoder-only continuation from that
    VAE, installed in the pipeline; ``minutes`` is split as the recipe's own budgets are (45 : 90 : 90)."""
    from diffusion_accel.pipelines.testbed import train_wan

    calls = []

    def fake_vae(out, seed=0, **stage):
        calls.append(("vae", str(out), stage))
        return {"psnr": 1.0}

    def fake_transformer(out, vae_path, seed=0, **stage):
        calls.append(("transformer", str(vae_path), stage))
        return {"steps": 1}

    monkeypatch.setattr(train_wan, "train_wan_vae", fake_vae)
    monkeypatch.setattr(train_wan, "train_wan_transformer", fake_transformer)
    monkeypatch.setattr(train_wan, "install_decoder", lambda vae_dir, pipe_dir: calls.append(("install", str(vae_dir))))
    monkeypatch.setattr(train_wan, "report_metrics", lambda name, out, metrics, *a: metrics)
    out = tmp_path / "wan4x"
    metrics = train_wan.train_wan_recipe(out, recipe="cpu-4x", minutes=45.0, side_by_side=False)
    assert [c[0] for c in calls] == ["vae", "transformer", "vae", "install"]
    fresh, transformer, decoder = calls[0][2], calls[1][2], calls[2][2]
    assert fresh["spatial_compression"] == 4 and fresh["logvar_init"] < -5 and "init_from" not in fresh
    assert calls[1][1] == str(tmp_path / "wan4x-vae")
    assert decoder["decoder_only"] and decoder["init_from"] == tmp_path / "wan4x-vae"
    assert calls[3][1] == str(tmp_path / "wan4x-decoder")
    assert [fresh["minutes"], transformer["minutes"], decoder["minutes"]] == [9.0, 18.0, 18.0]
    assert metrics["vae_psnr"] == 1.0 and metrics["decoder_psnr"] == 1.0 and metrics["recipe"] == "cpu-4x"


def test_cpu_long_recipe_trains_the_8x_vae_narrow_then_the_transformer_on_30000_clips(tmp_path, monkeypatch):
    """``cpu-long``: the stages the CPU runs sized (README, "The video testbed"): a fresh 8x VAE with a narrow
    posterior, then the transformer on its latents in turn (no decoder stage, nothing run side by side)."""
    from diffusion_accel.pipelines.testbed import train_wan

    calls = []
    monkeypatch.setattr(train_wan, "train_wan_vae", lambda out, seed=0, **stage: calls.append(("vae", stage)) or {})
    monkeypatch.setattr(train_wan, "train_wan_transformer",
                        lambda out, vae_path, seed=0, **stage: calls.append(("transformer", stage)) or {})
    monkeypatch.setattr(train_wan, "run_side_by_side", lambda *a, **k: pytest.fail("cpu-long runs its stages in turn"))
    monkeypatch.setattr(train_wan, "report_metrics", lambda name, out, metrics, *a: metrics)
    train_wan.train_wan_recipe(tmp_path / "wan", recipe="cpu-long")
    (_, vae), (_, transformer) = calls
    assert vae.get("spatial_compression", 8) == 8 and vae["logvar_init"] < -5 and vae["minutes"] == 40.0
    assert transformer["num_train"] == 30000 and transformer["minutes"] == 85.0


def test_minutes_are_the_wall_clock_of_the_chain():
    """``--minutes`` caps the command's wall clock: the side-by-side stages share it, the ones run in turn add up;
    a VAE given by ``vae_path`` (no ``vae`` stage) takes no share."""
    from diffusion_accel.pipelines.testbed.train_wan import WAN_RECIPES, scale_to_wall_clock

    for side_by_side, expected in ((True, [45.0, 90.0, 90.0]), (False, [27.0, 54.0, 54.0])):
        stages = {name: dict(stage) for name, stage in WAN_RECIPES["cpu-4x"].items()}
        scale_to_wall_clock(stages, 135.0, side_by_side)
        assert [stages[n]["minutes"] for n in ("vae", "transformer", "decoder")] == pytest.approx(expected)
    stages = {name: dict(stage) for name, stage in WAN_RECIPES["cpu-4x"].items() if name != "vae"}
    scale_to_wall_clock(stages, 60.0, True)
    assert [stages[n]["minutes"] for n in ("transformer", "decoder")] == pytest.approx([60.0, 60.0])
    stages = {name: dict(stage) for name, stage in WAN_RECIPES["cpu"].items()}
    scale_to_wall_clock(stages, 28.0, True)
    assert [stages[n]["minutes"] for n in ("vae", "transformer")] == pytest.approx([12.0, 16.0])


def _threads_and_pid(tag):
    import os

    return tag, os.environ["DA_THREADS"], os.getpid()


def test_side_by_side_stages_run_in_their_own_single_thread_processes():
    import os

    from diffusion_accel.pipelines.testbed.train_wan import run_side_by_side

    results = run_side_by_side([(_threads_and_pid, ("a",), {}), (_threads_and_pid, ("b",), {})])
    assert [r[:2] for r in results] == [("a", "1"), ("b", "1")]
    assert len({r[2] for r in results} | {os.getpid()}) == 3


def test_both_clis_offer_every_recipe():
    from diffusion_accel.pipelines.testbed.train import PIPELINE_RECIPES, RECIPE_CHOICES
    from diffusion_accel.pipelines.testbed.train_wan import WAN_RECIPES

    assert set(RECIPE_CHOICES) == set(PIPELINE_RECIPES) | set(WAN_RECIPES)
