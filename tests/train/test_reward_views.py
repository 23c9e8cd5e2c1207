"""RG-LCD's reward views: random shifted, blurred, noised views of the decoded image, averaged by the reward."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusion_accel.pipelines.testbed.reward import prompt_reward
from diffusion_accel.pipelines.testbed.shapes import make_batch
from diffusion_accel.pipelines.testbed.shapes_net import load_shapes_net, resolve_net

from diffusion_accel.train import options as opts_mod
from diffusion_accel.train import train
from diffusion_accel.train.reward_views import RewardViews, draw_views, gaussian_blur, random_views, shift
from diffusion_accel.train.rglcd import RGLCDOptions
from diffusion_accel.train.run_folder import RUN_FILE

TINY_PIXART = dict(pretrained_teacher_model="tiny:pixart_alpha", guidance_scale=4.0, resolution=32,
                   num_train_samples=32, train_batch_size=4, validation_steps=0, checkpointing_steps=0)


def test_blur_keeps_flat_images_and_spreads_a_point_symmetrically():
    flat = torch.full((1, 3, 9, 9), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, 1.0), flat)
    point = torch.zeros(1, 1, 9, 9)
    point[0, 0, 4, 4] = 1.0
    out = gaussian_blur(point, 1.0)[0, 0]
    assert abs(float(out.sum()) - 1.0) < 1e-5 and out[4, 4] < 0.2
    torch.testing.assert_close(out, out.flip(0))
    torch.testing.assert_close(out, out.t())
    assert gaussian_blur(point, 0.0) is point


def test_shift_moves_each_image_by_its_own_offset_and_replicates_edges():
    images = torch.zeros(2, 1, 8, 8)
    images[:, 0, 3, 3] = 1.0
    images[:, 0, :, 0] = 0.5  # left edge column
    out = shift(images, torch.tensor([2, -1]), torch.tensor([1, 0]), max_shift=2)
    assert out[0, 0, 4, 5] == 1.0 and out[1, 0, 3, 2] == 1.0
    assert float(out[0, 0, 2:, 0].min()) == 0.5 and float(out[0, 0, 2:, 2].min()) == 0.5  # the edge, replicated
    assert float(out[1, 0, :, 7].max()) == 0.0  # shifted left: the right edge replicates column 7 (zeros)


def test_views_are_drawn_for_the_global_batch_so_processes_see_one_run():
    settings = RewardViews(views=3, max_shift=2, blur_sigma=0.8, noise_std=0.05)
    whole = draw_views(settings, 4, (3, 8, 8), torch.Generator().manual_seed(5))
    for rows in (slice(0, 2), slice(2, 4)):
        part = draw_views(settings, 4, (3, 8, 8), torch.Generator().manual_seed(5)).rows(rows)
        torch.testing.assert_close(part.shifts, whole.shifts[:, :, rows])
        torch.testing.assert_close(part.noise, whole.noise[:, rows])
    images = torch.rand(4, 3, 8, 8, requires_grad=True)
    out = random_views(images, settings, whole)
    assert out.shape == (12, 3, 8, 8)
    out.sum().backward()
    assert images.grad is not None and float(images.grad.abs().sum()) > 0
    identity = RewardViews()
    assert identity.identity and random_views(images, identity, whole) is images


def _attack(net, images, captions, reward_of, eps: float, steps: int = 10) -> torch.Tensor:
    """Projected signed-gradient ascent of ``reward_of`` within ``eps`` of ``images``: what a generator climbing
    the reward can reach without changing the picture by more than ``eps``."""
    x = images.clone()
    for k in range(steps):
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(reward_of(x, k).sum(), x)
        x = (x.detach() + 2 * eps / steps * grad.sign()).clamp(images - eps, images + eps).clamp(-1, 1)
    return x


def test_views_turn_a_texture_attack_into_changes_an_independent_judge_sees():
    """The purpose, on the shipped classifiers: raising shapes-net's reward of a *wrong* caption on the image as is
    takes a perturbation of 3 % of the range and the judge sees none of it; views of a few pixels' shift, a blur
    and noise resist that texture, and what raises their reward moves the independent judge several times more."""
    net, judge = load_shapes_net(), resolve_net("shapes-judge")
    images_u8, samples = make_batch("val", 0, 16)
    images = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    captions = [s.caption for s in samples[1:] + samples[:1]]  # each image against another image's caption
    settings = RewardViews(views=4, max_shift=3, blur_sigma=1.0, noise_std=0.05)

    def plain(x, _k=0):
        return prompt_reward(net, x, captions)

    def viewed(x, k):
        draws = draw_views(settings, len(captions), (3, 64, 64), torch.Generator().manual_seed(k))
        return prompt_reward(net, random_views(x, settings, draws), captions * 4).view(4, -1).mean(0)

    with torch.no_grad():
        before = {"plain": float(plain(images).mean()), "views": float(viewed(images, 99).mean()),
                  "judge": float(prompt_reward(judge, images, captions).mean())}
    texture = _attack(net, images, captions, plain, eps=0.03)
    with torch.no_grad():
        assert float(plain(texture).mean()) - before["plain"] > 10, "a 3 % texture should fool shapes-net"
        assert float(viewed(texture, 99).mean()) - before["views"] < 0.3 * (float(plain(texture).mean())
                                                                             - before["plain"])
    judge_gain = {}
    for name, reward_of in (("plain", plain), ("views", viewed)):
        attacked = _attack(net, images, captions, reward_of, eps=0.3)
        with torch.no_grad():
            judge_gain[name] = float(prompt_reward(judge, attacked, captions).mean()) - before["judge"]
    assert judge_gain["views"] > 2 * max(judge_gain["plain"], 0.5), judge_gain


def test_view_options_are_checked_and_refused_with_the_latent_proxy():
    base = ["--output_dir", "o", "--pretrained_teacher_model", "tiny:pixart_alpha"]
    with pytest.raises(ValueError, match="--reward_views must be >= 1"):
        opts_mod.parse_options(RGLCDOptions, [*base, "--reward_views", "0"], "t")
    with pytest.raises(ValueError, match="must be >= 0"):
        opts_mod.parse_options(RGLCDOptions, [*base, "--reward_blur_sigma", "-1"], "t")
    with pytest.raises(ValueError, match="drop --latent_reward or the view options"):
        opts_mod.parse_options(RGLCDOptions, [*base, "--latent_reward", "--reward_views", "2"], "t")


def test_rglcd_with_reward_views_trains_reproducibly_and_records_them(tmp_path):
    views = dict(reward_views=2, reward_max_shift=2, reward_blur_sigma=1.0, reward_noise_std=0.05)
    first = train("rglcd", output_dir=str(tmp_path / "a"), max_train_steps=2, reward_scale=1.0, **views, **TINY_PIXART)
    again = train("rglcd", output_dir=str(tmp_path / "b"), max_train_steps=2, reward_scale=1.0, **views, **TINY_PIXART)
    plain = train("rglcd", output_dir=str(tmp_path / "c"), max_train_steps=2, reward_scale=1.0, **TINY_PIXART)
    logs = first["final_logs"]
    assert logs["reward"] < 0 and abs(logs["loss"] - (logs["distill_loss"] - logs["reward"])) < 1e-4
    assert logs == again["final_logs"]
    assert logs["reward"] != plain["final_logs"]["reward"]
    record = json.loads((tmp_path / "a" / RUN_FILE).read_text())
    assert record["reward_views"] == {"views": 2, "max_shift": 2, "blur_sigma": 1.0, "noise_std": 0.05}
    assert np.isfinite(logs["loss"])
