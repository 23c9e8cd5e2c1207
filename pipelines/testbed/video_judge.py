"""The video judge: reads a generated clip back into (colour, shape, motion direction) and scores it.

* Colour and shape: shapes-net on every frame (:func:`.shapes_net.detect`); the clip's answer is the majority over
  all detections of all frames, so a frame or two that the model smears does not decide alone.
* Direction: the object's track. The background of a video clip is plain grey (:mod:`.video_data`), so each frame's
  object mask is the pixels far from the frame's border colour; its centroid per frame, a least-squares line through
  the centroids, and the dominant component of that velocity (:func:`.shapes.direction_of`) give the direction. A
  clip whose object moves less than :data:`MIN_TRAVEL` pixels over the clip has no direction (``"static"``), which
  never matches a prompt: a model that ignores "moving left" and draws a still shape must fail.

:func:`judge_clips` returns per-clip verdicts; :func:`video_scores` the adherence per attribute and all three.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .shapes import direction_of
from .video_data import parse_video_caption

#: Smallest distance (pixels) the fitted track must cover over the clip to count as moving (real clips: 16-24).
MIN_TRAVEL = 4.0
#: A pixel belongs to the object when one of its channels differs this much from the background colour (the video
#: colours differ from the grey backgrounds by > 80 in some channel; grey levels vary by < 10).
MASK_THRESHOLD = 45
MIN_PIXELS = 6  # frames with fewer object pixels have no centroid


@dataclass(frozen=True)
class ClipVerdict:
    """What the judge read from one clip and whether each attribute matches its prompt."""

    colour: str | None
    shape: str | None
    direction: str
    colour_ok: bool
    shape_ok: bool
    direction_ok: bool

    @property
    def all_ok(self) -> bool:
        return self.colour_ok and self.shape_ok and self.direction_ok


def object_track(frames: np.ndarray) -> np.ndarray:
    """Centroid ``(x, y)`` per frame of the pixels that differ from the background ``[T, 2]`` (NaN where none).
    The background colour of a frame is the median of its one-pixel border."""
    x = np.asarray(frames).astype(np.int16)
    border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)  # [T, 4W, 3]
    background = np.median(border, axis=1)  # [T, 3]
    mask = np.abs(x - background[:, None, None, :]).max(axis=-1) > MASK_THRESHOLD  # [T, H, W]
    ys, xs = np.mgrid[0:x.shape[1], 0:x.shape[2]]
    track = np.full((x.shape[0], 2), np.nan)
    for t, m in enumerate(mask):
        if m.sum() >= MIN_PIXELS:
            track[t] = xs[m].mean(), ys[m].mean()
    return track


def track_velocity(track: np.ndarray) -> tuple[float, float] | None:
    """Least-squares velocity (pixels per frame) through the valid centroids; ``None`` with fewer than 3."""
    t = np.flatnonzero(~np.isnan(track[:, 0]))
    if len(t) < 3:
        return None
    vx = np.polyfit(t, track[t, 0], 1)[0]
    vy = np.polyfit(t, track[t, 1], 1)[0]
    return float(vx), float(vy)


def motion_direction(frames: np.ndarray) -> str:
    """``"left"``, ``"right"``, ``"up"``, ``"down"``, or ``"static"`` (no object found, or it moves less than
    :data:`MIN_TRAVEL` pixels over the clip)."""
    velocity = track_velocity(object_track(frames))
    if velocity is None:
        return "static"
    vx, vy = velocity
    if max(abs(vx), abs(vy)) * (len(frames) - 1) < MIN_TRAVEL:
        return "static"
    return direction_of(vx, vy)


def _majority(values: list[str]) -> str | None:
    return Counter(values).most_common(1)[0][0] if values else None


def judge_clips(clips: Sequence[np.ndarray] | np.ndarray, prompts: Sequence[str], net=None) -> list[ClipVerdict]:
    """Per-clip verdicts for uint8 clips ``[N, T, H, W, 3]`` against video captions (one shapes-net pass over all
    frames)."""
    from .shapes_net import detect

    clips = np.asarray(clips)
    if len(clips) != len(prompts):
        raise ValueError(f"{len(clips)} clips but {len(prompts)} prompts")
    num, frames = clips.shape[:2]
    detections = detect(clips.reshape(num * frames, *clips.shape[2:]), net)
    verdicts = []
    for i, prompt in enumerate(prompts):
        colour, shape, direction = parse_video_caption(prompt)
        seen = [d for per_frame in detections[i * frames:(i + 1) * frames] for d in per_frame]
        got_colour, got_shape = _majority([d.colour for d in seen]), _majority([d.shape for d in seen])
        got_direction = motion_direction(clips[i])
        verdicts.append(ClipVerdict(got_colour, got_shape, got_direction, got_colour == colour, got_shape == shape,
                                    got_direction == direction))
    return verdicts


def video_scores(verdicts: Sequence[ClipVerdict]) -> dict[str, float]:
    """Adherence per attribute and for all three at once (fractions of clips)."""
    if not verdicts:
        raise ValueError("no verdicts to score")
    return {
        "colour": float(np.mean([v.colour_ok for v in verdicts])),
        "shape": float(np.mean([v.shape_ok for v in verdicts])),
        "direction": float(np.mean([v.direction_ok for v in verdicts])),
        "all": float(np.mean([v.all_ok for v in verdicts])),
    }


def video_verdicts_and_features(clips: np.ndarray, prompts: Sequence[str],
                                net=None) -> tuple[list[bool], np.ndarray] | None:
    """What the bench needs for a video testbed: per-clip all-three verdicts and shapes-net features of every frame
    ``[N * T, 256]`` (float64; row ``i * T + t`` is frame ``t`` of clip ``i``, so rows pair up across methods run on
    the same prompts and seeds). ``None`` when the prompts are not video captions (no judge applies)."""
    from .shapes_net import features

    try:
        for prompt in prompts:
            parse_video_caption(prompt)
    except ValueError:
        return None
    clips = np.asarray(clips)
    flags = [v.all_ok for v in judge_clips(clips, prompts, net)]
    return flags, features(clips.reshape(-1, *clips.shape[2:]), net)
