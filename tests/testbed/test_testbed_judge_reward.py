"""The independent judge (shapes-judge) and the differentiable prompt reward built on a shapes classifier."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusion_accel.pipelines.testbed import shapes as S
from diffusion_accel.pipelines.testbed import shapes_net as N
from diffusion_accel.pipelines.testbed.reward import frozen, prompt_reward, prompt_targets


@pytest.fixture(scope="module")
def fresh():
    return S.make_batch("test", 30_000, 96)  # a range no training or metric run uses


def _signed(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _wrong_caption(sample: S.ShapesSample, rng: np.random.Generator) -> str:
    """The caption with one object's colour, shape or (true) position changed: never true of the image."""
    objects = list(sample.mentioned)
    i = int(rng.integers(len(objects)))
    o, true = objects[i], sample.objects[i]
    kind = int(rng.integers(3))
    if kind == 0:
        o = S.PromptObject(o.shape, [c for c in S.COLOUR_NAMES if c != o.colour][rng.integers(7)], o.position, o.size)
    elif kind == 1:
        o = S.PromptObject([s for s in S.SHAPES if s != o.shape][rng.integers(2)], o.colour, o.position, o.size)
    else:
        o = S.PromptObject(o.shape, o.colour, [p for p in range(9) if p != true.position][rng.integers(8)], o.size)
    objects[i] = o
    return S.caption_for(objects)


# ------------------------------------------------------------------------------------------------ judge
def test_judge_loads_with_its_architecture_and_reads_real_images(fresh):
    judge = N.load_judge("shapes-judge")
    assert isinstance(judge, N.ShapesJudge) and not judge.training
    config = json.loads((N.judge_path("shapes-judge") / N.CONFIG_FILE).read_text())
    assert config["architecture"] == "shapes-judge" and config["data_split"] == "judge"
    assert isinstance(N.load_shapes_net(), N.ShapesNet)  # the shipped config has no "architecture" key
    images, samples = fresh
    captions = [s.caption for s in samples]
    out = N.run_net(list(images[:4]), "shapes-judge")
    assert out["cls"].shape == (4, 9, 25) and out["size"].shape == (4, 9, 3) and out["features"].ndim == 2
    assert N.adherence(list(images), captions, net="shapes-judge") >= 0.9
    assert N.adherence(list(images), captions[1:] + captions[:1], net=judge) <= 0.2
    flags, feats = N.verdicts_and_features(list(images[:8]), captions[:8], net="shapes-judge")
    assert len(flags) == 8 and feats.shape[0] == 8


def test_loader_rejects_an_unknown_architecture(tmp_path):
    N.save_shapes_net(N.ShapesJudge(width=16, feature_dim=32), tmp_path)
    assert isinstance(N.load_shapes_net(tmp_path), N.ShapesJudge)
    config = json.loads((tmp_path / N.CONFIG_FILE).read_text())
    (tmp_path / N.CONFIG_FILE).write_text(json.dumps({**config, "architecture": "vit-huge"}))
    with pytest.raises(ValueError, match="Unknown classifier architecture 'vit-huge'.*shapes-judge"):
        N.load_shapes_net(tmp_path)
    with pytest.raises(ValueError, match="Unknown judge"):
        N.load_judge("nope")


# ------------------------------------------------------------------------------------------------ reward
def test_prompt_targets_enumerate_the_matching_labellings():
    cls, size, valid = prompt_targets(["a red circle in the center", "a large blue square and a green triangle",
                                       "a red circle"])
    assert cls.shape == (3, 72, 9) and valid.sum(1).tolist() == [1, 72, 9]
    red, blue = N.class_index("red", "circle"), N.class_index("blue", "square")
    assert cls[0, 0].tolist() == [0, 0, 0, 0, red, 0, 0, 0, 0] and (size[0, 0] == -1).all()
    assert ((cls[1, :72] == blue).sum(1) == 1).all() and ((cls[1, :72] != 0).sum(1) == 2).all()
    assert (size[1, :72][cls[1, :72] == blue] == S.SIZE_NAMES.index("large")).all()


@pytest.mark.parametrize("judge", ["shapes-net", "shapes-judge"])
def test_reward_prefers_the_true_caption_and_has_gradients(fresh, judge):
    images, samples = fresh
    rng = np.random.default_rng(0)
    x = _signed(images).requires_grad_(True)
    true = prompt_reward(judge, x, [s.caption for s in samples])
    assert true.shape == (len(samples),) and (true <= 1e-6).all()
    true.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with torch.no_grad():
        wrong = prompt_reward(judge, x, [_wrong_caption(s, rng) for s in samples])
    assert (true.detach() > wrong).float().mean() >= 0.9
    # [0, 1] input through value_range gives the same reward
    with torch.no_grad():
        again = prompt_reward(judge, (x.detach()[:8] + 1) / 2, [s.caption for s in samples[:8]], value_range=(0.0, 1.0))
    torch.testing.assert_close(again, true.detach()[:8], atol=1e-4, rtol=1e-4)


def test_reward_freezes_the_net_only_for_the_call(fresh):
    images, samples = fresh
    net = N.load_shapes_net().train()  # BatchNorm in train mode, parameters trainable
    x = _signed(images[:4]).requires_grad_(True)
    reward = prompt_reward(net, x, [s.caption for s in samples[:4]])
    assert net.training and all(p.requires_grad for p in net.parameters())
    reward.sum().backward()
    assert all(p.grad is None for p in net.parameters()) and x.grad is not None
    with torch.no_grad(), frozen(net):  # the reward used running statistics (eval mode), not batch statistics
        ref = prompt_reward(net, x, [s.caption for s in samples[:4]])
    torch.testing.assert_close(reward.detach(), ref)
