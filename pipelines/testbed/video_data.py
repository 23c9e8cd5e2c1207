"""The video testbed's clips: one shape crossing a plain background in a straight line, captioned with its colour,
shape and motion direction ("a red circle moving left").

Deliberately narrower than the image data (4 colours x 3 shapes x 4 directions = 48 captions, one object, plain
background, no bouncing) so that a tiny ``WanPipeline`` can learn it on a CPU and a judge can read every attribute
back without ambiguity: the start point is drawn so that the object never touches a border within the clip, so the
captioned direction is the direction of every frame pair. Like every testbed sample, clip ``index`` of ``split`` is a
pure function of ``(split, index)`` (:func:`.shapes.rng_for`), and the splits never share a stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .shapes import DIRECTIONS, IMAGE_SIZE, SHAPES, SIZES, ShapeObject, cell_of, render, rng_for

#: 4k + 1 frames (Wan's causal VAE keeps the first frame and compresses every following 4): 9 → 3 latent frames.
NUM_FRAMES = 9
#: Saturated colours only: white/black/purple/orange are left out to keep the task small; all four are far from the
#: grey backgrounds, which :mod:`.video_judge` relies on to find the object.
VIDEO_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
VIDEO_SIZES: tuple[str, ...] = ("medium", "large")
SPEED = (2.0, 3.0)  # pixels per frame along the direction
DRIFT = 0.3  # largest perpendicular pixels per frame
NUM_HELDOUT_CLIPS = 64
SPLIT_TRAIN, SPLIT_VAL, SPLIT_HELDOUT = "wan-train", "wan-val", "wan-heldout"


@dataclass
class VideoClip:
    """Frames ``[T, 64, 64, 3]`` uint8, the object's labels and its centre per frame ``track [T, 2]`` (x, y)."""

    frames: np.ndarray
    caption: str
    colour: str
    shape: str
    direction: str
    track: np.ndarray


def vocabulary() -> list[str]:
    """Every word of a video caption."""
    return ["a", "moving", *VIDEO_COLOURS, *SHAPES, *DIRECTIONS]


def video_caption(colour: str, shape: str, direction: str) -> str:
    """``"a red circle moving left"``."""
    return f"a {colour} {shape} moving {direction}"


def parse_video_caption(caption: str) -> tuple[str, str, str]:
    """``(colour, shape, direction)`` of a caption made by :func:`video_caption`; ``ValueError`` otherwise."""
    words = caption.lower().strip().rstrip(".").split()
    if (len(words) != 5 or words[0] != "a" or words[3] != "moving" or words[1] not in VIDEO_COLOURS
            or words[2] not in SHAPES or words[4] not in DIRECTIONS):
        raise ValueError(f"not a video caption: {caption!r} (expected 'a <colour> <shape> moving <direction>')")
    return words[1], words[2], words[4]


def _start(rng: np.random.Generator, half: float, velocity: float) -> float:
    """A start coordinate from which ``NUM_FRAMES - 1`` steps of ``velocity`` stay at least a pixel inside."""
    travel = abs(velocity) * (NUM_FRAMES - 1)
    low, high = half + 1.0, IMAGE_SIZE - half - 1.0 - travel
    start = rng.uniform(low, max(low, high))
    return start if velocity >= 0 else IMAGE_SIZE - start


def make_clip(split: str, index: int) -> VideoClip:
    """Clip ``index`` of ``split``: plain grey background, one medium or large shape in straight-line motion."""
    rng = rng_for(split, index)
    colour = VIDEO_COLOURS[rng.integers(len(VIDEO_COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    size = VIDEO_SIZES[rng.integers(len(VIDEO_SIZES))]
    half = float(rng.uniform(*SIZES[size]))
    dx, dy = DIRECTIONS[direction]
    speed, drift = rng.uniform(*SPEED), rng.uniform(-DRIFT, DRIFT)
    vx, vy = dx * speed + dy * drift, dy * speed + dx * drift
    x, y = _start(rng, half, vx), _start(rng, half, vy)
    background = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    background[:] = rng.uniform(95, 165) + rng.uniform(-8, 8, size=3)
    frames, track = [], []
    for t in range(NUM_FRAMES):
        cx, cy = x + t * vx, y + t * vy
        frames.append(render([ShapeObject(shape, colour, cell_of(cx, cy), size, cx, cy, half)], background))
        track.append((cx, cy))
    return VideoClip(np.stack(frames), video_caption(colour, shape, direction), colour, shape, direction,
                     np.asarray(track, np.float32))


def make_clips(split: str, start: int, count: int) -> tuple[np.ndarray, list[VideoClip]]:
    """Frames ``[count, T, 64, 64, 3]`` uint8 of clips ``start .. start + count - 1`` and the clips."""
    clips = [make_clip(split, i) for i in range(start, start + count)]
    return np.stack([c.frames for c in clips]), clips


@lru_cache(maxsize=4)
def heldout_video_prompts(count: int = NUM_HELDOUT_CLIPS) -> tuple[str, ...]:
    """Captions of the first ``count`` clips of the held-out split (never trained on; the real clips with the same
    index are the ceiling the evaluation reports beside the generated ones)."""
    return tuple(make_clip(SPLIT_HELDOUT, i).caption for i in range(count))
