"""The shipped shapes-net: accuracy on fresh generator samples, adherence and FID-shapes behave."""

from __future__ import annotations

import numpy as np
import pytest
from diffusion_accel.pipelines.testbed import shapes as S
from diffusion_accel.pipelines.testbed import shapes_net as N


@pytest.fixture(scope="module")
def net():
    return N.load_shapes_net()


@pytest.fixture(scope="module")
def fresh():
    return S.make_batch("test", 20_000, 200)  # a range no training or metric run uses


def _full_caption(sample: S.ShapesSample) -> str:
    return S.caption_for([S.PromptObject(o.shape, o.colour, o.position, o.size) for o in sample.objects])


def test_classifier_reads_fresh_images(net, fresh):
    images, samples = fresh
    dets = N.detect(list(images), net)
    exact = [N.matches_prompt(d, S.parse_caption(_full_caption(s))) for d, s in zip(dets, samples, strict=True)]
    assert np.mean(exact) >= 0.95


def test_adherence_separates_matching_from_mismatched_images(net, fresh):
    images, samples = fresh
    captions = [s.caption for s in samples]
    score, flags = N.adherence(list(images), captions, net, return_per_image=True)
    assert score >= 0.95 and len(flags) == len(images)
    shifted = captions[1:] + captions[:1]  # every image paired with another image's caption
    assert N.adherence(list(images), shifted, net) <= 0.2
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 64, 3), dtype=np.uint8)
    assert N.adherence(list(noise), captions[:64], net) <= 0.1


def test_adherence_checks_positions_and_counts():
    red = N.Detection("red", "circle", 0, "small")
    blue = N.Detection("blue", "square", 8, "large")
    assert N.matches_prompt([red, blue], S.parse_caption("a blue square and a red circle in the top left"))
    assert not N.matches_prompt([red, blue], S.parse_caption("a red circle in the center and a blue square"))
    assert not N.matches_prompt([red, blue], S.parse_caption("a red circle"))
    assert N.matches_prompt([blue], S.parse_caption("a large blue square"), check_size=True)
    assert not N.matches_prompt([blue], S.parse_caption("a small blue square"), check_size=True)


def test_fid_shapes_is_small_for_real_images_and_large_for_noise(net, fresh):
    images, _ = fresh
    real = N.fid_shapes(list(images), net=net)
    noise = np.random.default_rng(1).integers(0, 256, size=(200, 64, 64, 3), dtype=np.uint8)
    fake = N.fid_shapes(list(noise), net=net)
    assert real < 0.2 * fake
    other, _ = S.make_batch("test", 30_000, 200)
    assert N.fid_shapes(list(images), list(other), net=net) < 0.2 * fake  # reference given as images
