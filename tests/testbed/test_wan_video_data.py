"""The video testbed's data and judge: captions say what the clips do, and the judge reads it back."""

from __future__ import annotations

import numpy as np
import pytest
from diffusion_accel.pipelines.testbed.shapes import DIRECTIONS, IMAGE_SIZE
from diffusion_accel.pipelines.testbed.video_data import (
    NUM_FRAMES,
    SPLIT_HELDOUT,
    SPLIT_TRAIN,
    heldout_video_prompts,
    make_clip,
    make_clips,
    parse_video_caption,
    video_caption,
)
from diffusion_accel.pipelines.testbed.video_judge import judge_clips, motion_direction, video_scores


def _clips_per_direction(count: int) -> dict[str, list]:
    """The first ``count`` held-out clips of each direction."""
    found: dict[str, list] = {d: [] for d in DIRECTIONS}
    index = 0
    while min(len(v) for v in found.values()) < count:
        clip = make_clip(SPLIT_HELDOUT, index)
        if len(found[clip.direction]) < count:
            found[clip.direction].append(clip)
        index += 1
    return found


def test_clip_shape_and_determinism():
    frames, clips = make_clips(SPLIT_TRAIN, 0, 3)
    assert frames.shape == (3, NUM_FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3) and frames.dtype == np.uint8
    assert (NUM_FRAMES - 1) % 4 == 0  # Wan's causal VAE: 4k + 1 frames
    again = make_clip(SPLIT_TRAIN, 1)
    assert np.array_equal(again.frames, frames[1]) and again.caption == clips[1].caption
    assert not np.array_equal(make_clip(SPLIT_HELDOUT, 1).frames, frames[1])  # splits never share a stream


@pytest.mark.parametrize("index", range(0, 400, 7))
def test_caption_matches_the_motion(index):
    clip = make_clip(SPLIT_TRAIN, index)
    colour, shape, direction = parse_video_caption(clip.caption)
    assert (colour, shape, direction) == (clip.colour, clip.shape, clip.direction)
    steps = np.diff(clip.track, axis=0)  # every frame pair moves the captioned way (no bounce)
    dx, dy = DIRECTIONS[direction]
    along = steps @ np.array([dx, dy])
    across = np.abs(steps @ np.array([dy, dx]))
    assert (along >= 2.0).all() and (across < along).all()
    assert (clip.track >= 0).all() and (clip.track <= IMAGE_SIZE).all()


def test_caption_round_trip_and_rejects_others():
    assert parse_video_caption(video_caption("red", "circle", "left")) == ("red", "circle", "left")
    for bad in ("a red circle", "a purple circle moving left", "a red circle moving sideways"):
        with pytest.raises(ValueError):
            parse_video_caption(bad)


def test_heldout_prompts_cover_every_direction():
    prompts = heldout_video_prompts()
    assert len(prompts) == 64 and {parse_video_caption(p)[2] for p in prompts} == set(DIRECTIONS)


def test_bench_uses_the_video_prompts_for_testbed_wan():
    from diffusion_accel.prompts import bench_prompts

    assert bench_prompts("testbed:wan", 8) == list(heldout_video_prompts())[:8]
    assert "moving" not in bench_prompts("testbed:pixart", 8)[0]


def test_judge_reads_real_clips_per_direction():
    per_direction = _clips_per_direction(30)
    for direction, clips in per_direction.items():
        verdicts = judge_clips(np.stack([c.frames for c in clips]), [c.caption for c in clips])
        scores = video_scores(verdicts)
        assert scores["direction"] >= 0.95, (direction, scores)
        assert scores["all"] >= 0.95, (direction, scores)


def test_judge_fails_still_reversed_and_wrong_colour_clips():
    clip = make_clip(SPLIT_HELDOUT, 0)
    still = np.repeat(clip.frames[:1], NUM_FRAMES, axis=0)
    assert motion_direction(still) == "static"
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}[clip.direction]
    assert motion_direction(clip.frames[::-1]) == opposite
    wrong = video_caption("blue" if clip.colour != "blue" else "red", clip.shape, clip.direction)
    verdict = judge_clips(clip.frames[None], [wrong])[0]
    assert verdict.shape_ok and verdict.direction_ok and not verdict.colour_ok and not verdict.all_ok
    verdict = judge_clips(still[None], [clip.caption])[0]
    assert verdict.colour_ok and not verdict.direction_ok


def test_bench_judges_video_testbed_clips():
    from diffusion_accel.bench import _shape_metrics

    frames, clips = make_clips(SPLIT_HELDOUT, 0, 3)
    flags, features = _shape_metrics(frames, [c.caption for c in clips])
    assert flags == [True, True, True] and features.shape == (3 * NUM_FRAMES, 256)
    wrong = [video_caption(c.colour, c.shape, "up" if c.direction != "up" else "down") for c in clips]
    assert _shape_metrics(frames, wrong)[0] == [False, False, False]
    assert _shape_metrics(frames, ["a red circle"] * 3) is None  # not the video testbed's captions
