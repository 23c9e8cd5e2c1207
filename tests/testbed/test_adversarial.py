"""The adversarial term of the testbed VAEs' decoder training (:mod:`pipelines.testbed.adversarial`) and its use in
``train_wan_vae``."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file


def test_patch_discriminator_judges_every_frame_by_patches():
    from diffusion_accel.pipelines.testbed.adversarial import PatchDiscriminator

    disc = PatchDiscriminator()
    clips = torch.randn(2, 3, 9, 64, 64)
    logits = disc(clips)
    assert logits.shape == (18, 1, 8, 8)
    # a clip's frame is judged alone: the same frame as an image gets the same logits
    assert torch.allclose(disc(clips[1, :, 4][None]), logits[9 + 4][None], atol=1e-6)


def test_hinge_losses_are_zero_past_the_margin_and_linear_inside_it():
    from diffusion_accel.pipelines.testbed.adversarial import discriminator_hinge_loss, generator_loss

    confident = discriminator_hinge_loss(torch.full((4,), 2.0), torch.full((4,), -2.0))
    assert confident.item() == 0.0
    assert discriminator_hinge_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(2.0)
    assert discriminator_hinge_loss(torch.full((4,), 0.5), torch.full((4,), 0.25)).item() == pytest.approx(1.75)
    assert generator_loss(torch.tensor([1.0, 3.0])).item() == pytest.approx(-2.0)


def test_adaptive_weight_is_the_ratio_of_the_gradient_norms_at_the_last_layer():
    from diffusion_accel.pipelines.testbed.adversarial import adaptive_weight

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    out = layer(torch.randn(5, 4))
    rec, adv = (out ** 2).mean(), 0.1 * out.sum()
    rec_grad = torch.autograd.grad(rec, layer.weight, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adv, layer.weight, retain_graph=True)[0]
    weight = adaptive_weight(rec, adv, layer.weight)
    assert weight.item() == pytest.approx((rec_grad.norm() / (adv_grad.norm() + 1e-4)).item(), rel=1e-6)
    assert not weight.requires_grad
    assert adaptive_weight(rec, 0.0 * out.sum(), layer.weight, max_weight=50.0).item() == 50.0


def test_adversarial_decoder_stage_keeps_the_encoder_and_leaves_the_random_stream(tmp_path, monkeypatch):
    """With the adversarial term, a decoder-only stage still keeps every encoder tensor bit for bit and moves the
    decoder; it records its weight. Building the discriminator does not draw from the global random stream, so the
    same seed gives the same clips and the same decoder start with or without it."""
    from diffusion_accel.pipelines.testbed import train_wan
    from diffusion_accel.pipelines.testbed.wan import build_vae

    monkeypatch.setattr(train_wan, "vae_reconstruction_metrics", lambda vae: {})
    start = tmp_path / "start"
    build_vae(seed=0).save_pretrained(start)
    out = tmp_path / "adversarial"
    metrics = train_wan.train_wan_vae(out, steps=2, batch_size=1, init_from=start, decoder_only=True,
                                      adversarial_weight=0.5)
    assert metrics["adversarial_weight"] == 0.5
    before, after = (load_file(str(f / "diffusion_pytorch_model.safetensors")) for f in (start, out))
    encoder = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert encoder and all(torch.equal(after[k], before[k]) for k in encoder)
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("decoder."))

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_wan.Adversary(train_wan.make_accelerator(), lr=2e-4, seed=0)
    assert torch.equal(torch.rand(3), expected)
