"""VBench-style video metrics on synthetic clips."""

from __future__ import annotations

import numpy as np
import pytest
from diffusion_accel.eval import (
    aggregate,
    background_consistency,
    dynamic_degree,
    motion_smoothness,
    subject_consistency,
    temporal_flickering,
)


def _textured_background(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(40, 120, (size // 8, size // 8, 3)).astype(np.uint8)
    return np.kron(small, np.ones((8, 8, 1), np.uint8))


def _moving_square(frames: int = 12, size: int = 64, step: float = 2.0, square: int = 16) -> np.ndarray:
    """A bright square moving right by ``step`` px per frame over a fixed blocky background."""
    background = _textured_background(size)
    clip = np.repeat(background[None], frames, axis=0)
    yy, xx = np.mgrid[:size, :size]
    for t in range(frames):
        x0 = 4 + step * t
        mask = (xx >= x0) & (xx < x0 + square) & (yy >= size // 3) & (yy < size // 3 + square)
        clip[t][mask] = (230, 90, 40)
    return clip


def test_static_clip_flicker_one_and_not_dynamic():
    static = np.repeat(_moving_square(1), 8, axis=0)
    assert temporal_flickering(static) == 1.0
    assert dynamic_degree(static) == 0.0


def test_flickering_formula_and_monotonicity():
    static = np.repeat(_moving_square(1), 6, axis=0)
    rng = np.random.default_rng(1)
    mild = np.clip(static + rng.integers(-5, 6, static.shape), 0, 255).astype(np.uint8)
    strong = np.clip(static + rng.integers(-40, 41, static.shape), 0, 255).astype(np.uint8)
    expected = (255 - np.mean([np.abs(mild[t].astype(int) - mild[t + 1]).mean() for t in range(5)])) / 255
    assert temporal_flickering(mild) == pytest.approx(expected, rel=1e-12)
    assert 1.0 > temporal_flickering(mild) > temporal_flickering(strong)


def test_smooth_motion_scores_higher_than_shuffled_frames():
    clip = _moving_square()
    shuffled = clip[np.random.default_rng(0).permutation(len(clip))]
    smooth, jumbled = motion_smoothness(clip), motion_smoothness(shuffled)
    assert 0 < jumbled < smooth <= 1.0
    duplicated = np.repeat(clip[::2], 2, axis=0)  # stutter: every frame shown twice
    assert motion_smoothness(duplicated) < smooth


def test_dynamic_degree_threshold_rule():
    fast = _moving_square(frames=16, size=128, step=8.0, square=32)
    slow = _moving_square(frames=16, size=128, step=0.25, square=32)
    assert dynamic_degree(fast) == 1.0
    assert dynamic_degree(slow) == 0.0


def test_consistency_uses_the_given_feature_extractor():
    clip = _moving_square()

    def colour_histogram(frames: np.ndarray) -> np.ndarray:
        return np.stack([np.histogram(f, bins=16, range=(0, 256))[0] for f in frames]).astype(float)

    steady = subject_consistency(clip, colour_histogram)
    rng = np.random.default_rng(2)
    noise = rng.integers(0, 256, clip.shape, dtype=np.uint8)
    mixed = np.concatenate([clip[:1], noise[1:]])
    assert 0.99 < steady <= 1.0
    assert background_consistency(mixed, colour_histogram) < steady


def test_aggregate_weights_and_names_missing_dimensions():
    scores = {"temporal_flickering": 1.0, "dynamic_degree": 0.0, "motion_smoothness": 0.9975}
    result = aggregate(scores)
    # normalised: flicker 1, dynamic 0 (weight 0.5), smoothness 1 → (1 + 1 + 0) / 2.5
    assert result["quality"] == pytest.approx(2.0 / 2.5)
    assert result["semantic"] is None and result["total"] == result["quality"]
    assert "subject consistency" in result["missing"] and "temporal flickering" not in result["missing"]
    assert set(result["proxies"]) == {"dynamic degree", "motion smoothness"}
    both = aggregate({**scores, "scene": 0.8222})
    assert both["total"] == pytest.approx((4 * both["quality"] + 1.0) / 5)
    with pytest.raises(ValueError, match="unknown"):
        aggregate({"sharpness": 1.0})
