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
