"""Procedural "shapes" data: seeded 64x64 images of 1-2 solid shapes, their captions and structured labels.

Every sample is a pure function of ``(split, index)``: the random stream is ``numpy.random.default_rng((split
code, index))``, so the training split, the validation split (real-image statistics for FID-shapes) and the held-out
prompts never share a seed. Captions follow one small grammar::

    a [small|large] <colour> <shape> [in the <position>] [and a [small|large] <colour> <shape> [in the <position>]]

which :func:`parse_caption` inverts. Position and size words are optional, so "a red circle" is in distribution.
A video variant (:func:`make_video`) moves one shape with constant velocity, bouncing off the borders.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

import cv2
import numpy as np

IMAGE_SIZE = 64
GRID = 3
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 65, 225),
    "yellow": (240, 220, 30),
    "purple": (140, 50, 190),
    "orange": (250, 135, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
#: Cell names in row-major order (row 0 = top); cell index = 3 * row + column.
POSITIONS: tuple[str, ...] = (
    "top left", "top center", "top right",
    "center left", "center", "center right",
    "bottom left", "bottom center", "bottom right",
)
#: Half-extent in pixels of each size class (a circle's radius, half a square's side).
SIZES: dict[str, tuple[float, float]] = {"small": (4.5, 5.5), "medium": (7.0, 8.0), "large": (9.0, 10.0)}
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)
#: Size words a caption may use; "medium" objects are never described by size.
SIZE_WORDS: tuple[str, ...] = ("small", "large")
DIRECTIONS: dict[str, tuple[float, float]] = {"right": (1.0, 0.0), "left": (-1.0, 0.0), "up": (0.0, -1.0),
                                              "down": (0.0, 1.0)}

#: Split → stream code. "judge" holds the training images of the independent classifier ``shapes-judge`` (disjoint
#: from shapes-net's "train" images and from every evaluation split); "wan-*" are the video testbed's clips
#: (:mod:`.video_data`).
SPLITS: dict[str, int] = {"train": 1, "val": 2, "heldout": 3, "video": 4, "test": 5, "judge": 6,
                          "wan-train": 7, "wan-val": 8, "wan-heldout": 9}
NUM_HELDOUT = 64
_SUPERSAMPLE = 4
_CELL = IMAGE_SIZE / GRID


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: its labels and its exact geometry (centre in pixels, half-extent)."""

    shape: str
    colour: str
    position: int
    size: str
    cx: float = 0.0
    cy: float = 0.0
    half: float = 0.0

    @property
    def position_name(self) -> str:
        return POSITIONS[self.position]


@dataclass(frozen=True)
class PromptObject:
    """What a caption says about one object; ``None`` fields are left unconstrained."""

    shape: str
    colour: str
    position: int | None = None
    size: str | None = None


@dataclass
class ShapesSample:
    """An RGB uint8 image ``[64, 64, 3]``, its objects (labels) and its caption."""

    image: np.ndarray
    objects: list[ShapeObject]
    caption: str
    mentioned: list[PromptObject] = field(default_factory=list)


def vocabulary() -> list[str]:
    """Every word a caption or a video caption can contain."""
    words = ["a", "and", "in", "the", "moving", *SIZE_WORDS, *COLOUR_NAMES, *SHAPES, *DIRECTIONS]
    for name in POSITIONS:
        words += name.split()
    return list(dict.fromkeys(words))


def rng_for(split: str, index: int) -> np.random.Generator:
    """The random stream of sample ``index`` in ``split``; distinct splits never share a stream."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {sorted(SPLITS)}.")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    return np.random.default_rng((SPLITS[split], int(index)))


# ------------------------------------------------------------------------------------------------ drawing
def _background(rng: np.random.Generator) -> np.ndarray:
    """A plain or textured grey-ish background (low saturation so it is never confused with a shape colour)."""
    base = rng.uniform(95, 165)
    tint = rng.uniform(-8, 8, size=3)
    bg = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    bg[:] = base + tint
    kind = rng.integers(0, 4)  # 0, 1: plain; 2: stripes; 3: noise
    if kind == 2:
        period = rng.uniform(6, 14)
        angle = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
        wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
        bg += (rng.uniform(6, 14) * wave)[..., None]
    elif kind == 3:
        noise = rng.normal(0, 1, size=(IMAGE_SIZE // 4, IMAGE_SIZE // 4)).astype(np.float32)
        noise = cv2.resize(noise, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_CUBIC)
        bg += (rng.uniform(5, 11) * noise)[..., None]
    return bg


def _draw(canvas: np.ndarray, obj: ShapeObject) -> None:
    """Draw ``obj`` on a supersampled canvas in place."""
    s = _SUPERSAMPLE
    cx, cy, h = obj.cx * s, obj.cy * s, obj.half * s
    colour = tuple(float(c) for c in COLOURS[obj.colour])
    if obj.shape == "circle":
        cv2.circle(canvas, (round(cx), round(cy)), round(h), colour, thickness=-1, lineType=cv2.LINE_8)
    elif obj.shape == "square":
        cv2.rectangle(canvas, (round(cx - h), round(cy - h)), (round(cx + h), round(cy + h)), colour, thickness=-1)
    elif obj.shape == "triangle":  # upright, centred on the bounding box of the circumscribing square
        pts = np.array([[cx, cy - h], [cx - h * 1.1, cy + h], [cx + h * 1.1, cy + h]], np.float32)
        cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], colour)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render(objects: list[ShapeObject], background: np.ndarray) -> np.ndarray:
    """Render ``objects`` (in order, later on top) over a float background; returns uint8 ``[64, 64, 3]``."""
    s = _SUPERSAMPLE
    canvas = cv2.resize(background, (IMAGE_SIZE * s, IMAGE_SIZE * s), interpolation=cv2.INTER_NEAREST)
    for obj in objects:
        _draw(canvas, obj)
    small = cv2.resize(canvas, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_AREA)
    return np.clip(np.round(small), 0, 255).astype(np.uint8)


def cell_centre(position: int) -> tuple[float, float]:
    """Pixel centre of grid cell ``position``."""
    row, col = divmod(position, GRID)
    return (col + 0.5) * _CELL, (row + 0.5) * _CELL


def cell_of(cx: float, cy: float) -> int:
    """Grid cell index containing pixel ``(cx, cy)``."""
    col = min(GRID - 1, max(0, int(cx // _CELL)))
    row = min(GRID - 1, max(0, int(cy // _CELL)))
    return row * GRID + col


def _random_object(rng: np.random.Generator, position: int, taken: set[tuple[str, str]]) -> ShapeObject:
    while True:
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
        if (shape, colour) not in taken:
            break
    size = SIZE_NAMES[rng.integers(len(SIZE_NAMES))]
    half = rng.uniform(*SIZES[size])
    x0, y0 = cell_centre(position)
    jitter = 2.0
    return ShapeObject(shape, colour, position, size, x0 + rng.uniform(-jitter, jitter),
                       y0 + rng.uniform(-jitter, jitter), half)


# ------------------------------------------------------------------------------------------------ captions
def object_phrase(obj: PromptObject) -> str:
    """``a [size] colour shape [in the position]``."""
    words = ["a"]
    if obj.size in SIZE_WORDS:
        words.append(obj.size)
    words += [obj.colour, obj.shape]
    if obj.position is not None:
        words += ["in", "the", POSITIONS[obj.position]]
    return " ".join(words)


def caption_for(objects: list[PromptObject]) -> str:
    """Join object phrases with "and"."""
    if not objects:
        raise ValueError("a caption needs at least one object")
    return " and ".join(object_phrase(o) for o in objects)


def _mention(rng: np.random.Generator, obj: ShapeObject, p_position: float, p_size: float) -> PromptObject:
    position = obj.position if rng.random() < p_position else None
    size = obj.size if (obj.size in SIZE_WORDS and rng.random() < p_size) else None
    return PromptObject(obj.shape, obj.colour, position, size)


_PHRASE = re.compile(
    r"^a (?:(?P<size>{sizes}) )?(?P<colour>{colours}) (?P<shape>{shapes})(?: in the (?P<pos>{positions}))?$".format(
        sizes="|".join(SIZE_WORDS), colours="|".join(COLOUR_NAMES), shapes="|".join(SHAPES),
        positions="|".join(sorted(POSITIONS, key=len, reverse=True)),
    )
)


def parse_caption(caption: str) -> list[PromptObject]:
    """Invert :func:`caption_for` (also accepts a trailing "moving <direction>"); raises ``ValueError`` otherwise."""
    text = " ".join(caption.lower().strip().rstrip(".").split())
    text = re.sub(" moving (?:" + "|".join(DIRECTIONS) + ")$", "", text)
    objects = []
    for part in text.split(" and "):
        match = _PHRASE.match(part.strip())
        if match is None:
            raise ValueError(f"cannot parse caption part {part!r} of {caption!r}")
        pos = match.group("pos")
        objects.append(PromptObject(match.group("shape"), match.group("colour"),
                                    POSITIONS.index(pos) if pos else None, match.group("size")))
    return objects


# ------------------------------------------------------------------------------------------------ samples
def sample_objects(rng: np.random.Generator) -> list[ShapeObject]:
    """1 or 2 objects in distinct grid cells with distinct (shape, colour) pairs."""
    count = 1 if rng.random() < 0.5 else 2
    cells = rng.choice(GRID * GRID, size=count, replace=False)
    taken: set[tuple[str, str]] = set()
    objects = []
    for cell in cells:
        obj = _random_object(rng, int(cell), taken)
        taken.add((obj.shape, obj.colour))
        objects.append(obj)
    return objects


def make_sample(split: str, index: int, p_position: float = 0.6, p_size: float = 0.5) -> ShapesSample:
    """Sample ``index`` of ``split``: deterministic image, labels and caption."""
    rng = rng_for(split, index)
    objects = sample_objects(rng)
    background = _background(rng)
    mentioned = [_mention(rng, o, p_position, p_size) for o in objects]
    return ShapesSample(render(objects, background), objects, caption_for(mentioned), mentioned)


def make_batch(split: str, start: int, count: int) -> tuple[np.ndarray, list[ShapesSample]]:
    """Images ``[count, 64, 64, 3]`` uint8 of samples ``start .. start + count - 1`` and the samples."""
    samples = [make_sample(split, i) for i in range(start, start + count)]
    return np.stack([s.image for s in samples]), samples


@lru_cache(maxsize=4)
def heldout_prompts(count: int = NUM_HELDOUT) -> tuple[str, ...]:
    """The captions of the first ``count`` samples of split "heldout" (never used in training); the default 64 are
    the fixed held-out prompts. A longer list starts with the same 64. The grammar repeats short captions (1 024
    samples give 796 distinct captions), so a repeated caption is the same prompt with another seed."""
    return tuple(make_sample("heldout", i).caption for i in range(count))


# ------------------------------------------------------------------------------------------------ video
def direction_of(vx: float, vy: float) -> str:
    """The named direction of the dominant velocity component."""
    if abs(vx) >= abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"


def make_video(index: int, num_frames: int = 16, split: str = "video") -> tuple[np.ndarray, list[list[ShapeObject]],
                                                                                 str]:
    """Frames ``[T, 64, 64, 3]`` of one shape moving with constant velocity (bouncing off borders), per-frame
    labels, and the caption ``"a red circle moving right"`` (the direction of the initial velocity)."""
    rng = rng_for(split, index)
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    dx, dy = DIRECTIONS[direction]
    speed = rng.uniform(1.5, 2.5)
    drift = rng.uniform(-0.4, 0.4)  # small perpendicular component, always below the main one
    vx, vy = dx * speed + dy * drift, dy * speed + dx * drift
    start = sample_objects(rng)[0]
    background = _background(rng)
    x, y, h = start.cx, start.cy, start.half
    frames, labels = [], []
    for _ in range(num_frames):
        obj = ShapeObject(start.shape, start.colour, cell_of(x, y), start.size, x, y, h)
        frames.append(render([obj], background))
        labels.append([obj])
        x, y = x + vx, y + vy
        if not h <= x <= IMAGE_SIZE - h:
            vx, x = -vx, float(np.clip(x, h, IMAGE_SIZE - h))
        if not h <= y <= IMAGE_SIZE - h:
            vy, y = -vy, float(np.clip(y, h, IMAGE_SIZE - h))
    caption = f"a {start.colour} {start.shape} moving {direction}"
    return np.stack(frames), labels, caption
