"""The VAE ``testbed:resshift`` ships: a decoder fine-tuned with the encoder frozen, so its latent space stays the
one the SR networks were trained in; shipping refuses a VAE whose latent space moved."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture()
def trained_with(tmp_path):
    """A testbed-architecture VAE saved to a folder: the latent space a network was trained in."""
    from diffusion_accel.pipelines.testbed.models import build_vae

    folder = tmp_path / "trained_with"
    build_vae(seed=0).save_pretrained(folder)
    return folder


def _encoder(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in weights.items() if k.startswith(("encoder.", "quant_conv."))}


def test_decoder_only_stages_keep_the_encoder_bit_for_bit(trained_with, tmp_path):
    """RESSHIFT_VAE_RECIPE's stages train the decoder only: after two chained stages (each with its own EMA) every
    encoder and quant_conv tensor is the initial one exactly, the decoder has moved, and the scaling is kept."""
    from diffusion_accel.pipelines.testbed.train import train_vae_recipe

    stage = {"steps": 2, "batch_size": 2, "lr": 1e-3, "decoder_only": True, "num_train": 8}
    out = tmp_path / "sr-vae"
    train_vae_recipe(out, seed=1, stages=(stage, stage), init_from=trained_with)
    before, after = load_file(str(trained_with / WEIGHTS)), load_file(str(out / WEIGHTS))
    assert all(torch.equal(after[k], v) for k, v in _encoder(before).items())
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("decoder."))
    config_before, config_after = (json.loads((f / "config.json").read_text()) for f in (trained_with, out))
    assert config_after["scaling_factor"] == config_before["scaling_factor"]
    assert config_after["shift_factor"] == config_before["shift_factor"]
    assert (tmp_path / "sr-vae-stage0").is_dir()


def test_shipping_refuses_a_vae_with_another_latent_space(trained_with, tmp_path):
    from diffusion_accel.pipelines.testbed.models import build_vae
    from diffusion_accel.pipelines.testbed.students import check_same_encoder

    new_decoder = build_vae(seed=0)
    new_decoder.load_state_dict(load_file(str(trained_with / WEIGHTS)))
    with torch.no_grad():
        new_decoder.decoder.conv_out.weight.add_(0.1)
    new_decoder.save_pretrained(tmp_path / "new_decoder")
    check_same_encoder(tmp_path / "new_decoder", trained_with)  # a new decoder is what the option is for

    moved = build_vae(seed=0)
    moved.load_state_dict(load_file(str(trained_with / WEIGHTS)))
    with torch.no_grad():
        moved.encoder.conv_in.weight.add_(1e-3)
    moved.save_pretrained(tmp_path / "moved")
    with pytest.raises(ValueError, match="encoder differs .* encoder.conv_in.weight.*decoder only"):
        check_same_encoder(tmp_path / "moved", trained_with)

    rescaled = build_vae(seed=0, scaling_factor=0.5)
    rescaled.load_state_dict(load_file(str(trained_with / WEIGHTS)))
    rescaled.save_pretrained(tmp_path / "rescaled")
    with pytest.raises(ValueError, match="another VAE config .*scaling_factor"):
        check_same_encoder(tmp_path / "rescaled", trained_with)

    with pytest.raises(ValueError, match="not a VAE folder"):
        check_same_encoder(tmp_path, trained_with)


def test_a_student_cannot_ship_another_vae(tmp_path):
    from diffusion_accel.pipelines.testbed.students import ship_student

    with pytest.raises(ValueError, match="--vae is for a restoration pipeline"):
        ship_student(tmp_path, "pixart-lcm", vae=tmp_path)


def test_resshift_vae_recipe_takes_no_stage_settings(tmp_path):
    from diffusion_accel.pipelines.testbed.train import train

    with pytest.raises(ValueError, match="RESSHIFT_VAE_RECIPE.*lr"):
        train("resshift-vae", tmp_path, lr=1e-3)
