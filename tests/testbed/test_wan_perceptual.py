"""The perceptual term of the Wan decoder's training: LPIPS's construction on a frame classifier we train."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def frame_net(tmp_path_factory):
    """A briefly trained :class:`FramePerceptualNet`, saved and loaded back as a Diffusers model."""
    from diffusion_accel.pipelines.testbed.perceptual import FramePerceptualNet, train_frame_perceptual_net

    folder = tmp_path_factory.mktemp("frame-net")
    metrics = train_frame_perceptual_net(folder, steps=30, batch_size=16, num_clips=64)
    assert set(metrics) >= {"colour_accuracy", "shape_accuracy"}
    return folder, FramePerceptualNet.from_pretrained(str(folder)).eval()


def test_the_distance_is_zero_on_itself_and_grows_with_the_error(frame_net):
    from diffusion_accel.pipelines.testbed.perceptual import perceptual_distance

    _, net = frame_net
    torch.manual_seed(0)
    clip = torch.rand(2, 3, 5, 64, 64) * 2 - 1
    noise = torch.randn_like(clip)
    assert perceptual_distance(net, clip, clip).item() == 0.0
    near, far = (perceptual_distance(net, (clip + s * noise).clamp(-1, 1), clip).item() for s in (0.05, 0.5))
    assert 0.0 < near < far


def test_gradients_reach_the_clip_and_not_the_net(frame_net):
    from diffusion_accel.pipelines.testbed.perceptual import perceptual_distance
    from diffusion_accel.pipelines.testbed.train_wan import load_perceptual_net

    folder, _ = frame_net
    net = load_perceptual_net(folder, "cpu")
    torch.manual_seed(0)
    reference = torch.rand(1, 3, 1, 64, 64) * 2 - 1
    clip = (reference + 0.2 * torch.randn_like(reference)).requires_grad_(True)
    perceptual_distance(net, clip, reference).backward()
    assert clip.grad is not None and clip.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in net.parameters())


def test_a_missing_perceptual_net_is_refused_with_the_fix(tmp_path):
    from diffusion_accel.pipelines.testbed.train_wan import train_wan_vae

    with pytest.raises(ValueError, match="train_frame_perceptual_net"):
        train_wan_vae(tmp_path / "out", steps=1, perceptual_weight=1.0, perceptual_net=tmp_path / "nothing")
    assert not (tmp_path / "out").exists()


def test_the_perceptual_term_changes_the_decoder_and_keeps_the_encoder(tmp_path, monkeypatch, frame_net):
    """One decoder-only step with the term lands elsewhere than the same step without it; the encoder side stays bit
    for bit and the metrics name the term."""
    from diffusion_accel.pipelines.testbed import train_wan
    from diffusion_accel.pipelines.testbed.wan import build_vae

    folder, _ = frame_net
    monkeypatch.setattr(train_wan, "vae_reconstruction_metrics", lambda vae: {})
    start = tmp_path / "start"
    build_vae(seed=0).save_pretrained(start)
    runs = {}
    for weight in (0.0, 1.0):
        out = tmp_path / f"w{weight}"
        metrics = train_wan.train_wan_vae(out, steps=1, init_from=start, decoder_only=True, clip_schedule=((5, 2),),
                                          perceptual_weight=weight, perceptual_net=folder, perceptual_frames=2)
        assert metrics["perceptual_weight"] == weight
        assert metrics["perceptual_frames"] == (2 if weight else None)
        runs[weight] = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    before = load_file(str(start / "diffusion_pytorch_model.safetensors"))
    encoder = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert all(torch.equal(runs[1.0][k], before[k]) for k in encoder)
    assert any(not torch.equal(runs[1.0][k], runs[0.0][k]) for k in before if k.startswith("decoder."))


def test_the_testbed_trainer_makes_the_frame_net_by_name(tmp_path):
    """``testbed train wan-frame-net`` runs :func:`train_frame_perceptual_net`; it has no time cap to take."""
    from diffusion_accel.pipelines.testbed.perceptual import FramePerceptualNet
    from diffusion_accel.pipelines.testbed.train import train

    metrics = train("wan-frame-net", tmp_path / "net", steps=2, batch_size=4, num_clips=8)
    assert metrics["steps"] == 2
    assert isinstance(FramePerceptualNet.from_pretrained(str(tmp_path / "net")), FramePerceptualNet)
    with pytest.raises(ValueError, match="drop --minutes"):
        train("wan-frame-net", tmp_path / "other", minutes=1.0)
    assert not (tmp_path / "other").exists()
