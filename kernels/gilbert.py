"""3-D generalized Hilbert ("Gilbert") space-filling curve over a (frames, height, width) latent grid.

Video-BLADE reorders video tokens along this curve before cutting them into blocks, so that each block of
``block_size`` consecutive tokens is a compact 3-D tile and block-level importance is meaningful.

Token convention: Diffusers flattens latent patches in raster order, ``raster = f * (H * W) + h * W + w``.
``gilbert_permutation((F, H, W))`` returns ``perm`` with ``perm[i]`` = raster index of the i-th token along the
curve, so ``x_curve = x[..., perm, :]`` and ``x = x_curve[..., inverse, :]``.

Why our own code: no installed library (torch, diffusers) ships a Gilbert curve; this follows the published
generalized-Hilbert recursion (split the longest side(s) in halves kept even where possible, recurse with rotated
axes) written iteratively-free but with recursion depth only O(log(max side)).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import torch

Vec = tuple[int, int, int]


def _sgn(x: int) -> int:
    return (x > 0) - (x < 0)


def _add(a: Vec, b: Vec) -> Vec:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2])


def _sub(a: Vec, b: Vec) -> Vec:
    return (a[0] - b[0], a[1] - b[1], a[2] - b[2])


def _neg(a: Vec) -> Vec:
    return (-a[0], -a[1], -a[2])


def _half(a: Vec) -> Vec:
    # floor division toward zero for each component (directions are signed)
    return (int(a[0] / 2), int(a[1] / 2), int(a[2] / 2))


def _length(a: Vec) -> int:
    return abs(a[0] + a[1] + a[2])


def _unit(a: Vec) -> Vec:
    return (_sgn(a[0]), _sgn(a[1]), _sgn(a[2]))


def _line(p: Vec, step: Vec, n: int) -> Iterator[Vec]:
    for _ in range(n):
        yield p
        p = _add(p, step)


def _even_half(a: Vec, n: int) -> Vec:
    """Half of axis ``a`` (length ``n``), bumped by one step when odd so that sub-boxes stay even-sized."""
    h = _half(a)
    if _length(h) % 2 and n > 2:
        h = _add(h, _unit(a))
    return h


def _curve(p: Vec, a: Vec, b: Vec, c: Vec) -> Iterator[Vec]:
    """Visit the box at corner ``p`` spanned by axes ``a`` (major, the curve's travel direction), ``b``, ``c``."""
    w, h, d = _length(a), _length(b), _length(c)
    da, db, dc = _unit(a), _unit(b), _unit(c)
    if h == 1 and d == 1:
        yield from _line(p, da, w)
        return
    if w == 1 and d == 1:
        yield from _line(p, db, h)
        return
    if w == 1 and h == 1:
        yield from _line(p, dc, d)
        return
    a2, b2, c2 = _even_half(a, w), _even_half(b, h), _even_half(c, d)
    if 2 * w > 3 * h and 2 * w > 3 * d:
        # long box: split only along a
        yield from _curve(p, a2, b, c)
        yield from _curve(_add(p, a2), _sub(a, a2), b, c)
    elif 3 * h > 4 * d:
        # flat in c: split along a and b only
        yield from _curve(p, b2, c, a2)
        yield from _curve(_add(p, b2), a, _sub(b, b2), c)
        yield from _curve(_add(p, _add(_sub(a, da), _sub(b2, db))), _neg(b2), c, _neg(_sub(a, a2)))
    elif 3 * d > 4 * h:
        # flat in b: split along a and c only
        yield from _curve(p, c2, a2, b)
        yield from _curve(_add(p, c2), a, b, _sub(c, c2))
        yield from _curve(_add(p, _add(_sub(a, da), _sub(c2, dc))), _neg(c2), _neg(_sub(a, a2)), b)
    else:
        # regular case: split along all three axes, five sub-boxes
        yield from _curve(p, b2, c2, a2)
        yield from _curve(_add(p, b2), c, a2, _sub(b, b2))
        yield from _curve(_add(p, _add(_sub(b2, db), _sub(c, dc))), a, _neg(b2), _neg(_sub(c, c2)))
        yield from _curve(
            _add(p, _add(_sub(a, da), _add(b2, _sub(c, dc)))), _neg(c), _neg(_sub(a, a2)), _sub(b, b2)
        )
        yield from _curve(_add(p, _add(_sub(a, da), _sub(b2, db))), _neg(b2), c2, _neg(_sub(a, a2)))


def gilbert_points(frames: int, height: int, width: int) -> list[tuple[int, int, int]]:
    """All ``(f, h, w)`` grid points in curve order (each exactly once)."""
    if min(frames, height, width) < 1:
        raise ValueError(f"grid sides must be >= 1, got {(frames, height, width)}")
    # internal axes: x = width, y = height, z = frames; start along the longest side
    x, y, z = (width, 0, 0), (0, height, 0), (0, 0, frames)
    if width >= height and width >= frames:
        pts = _curve((0, 0, 0), x, y, z)
    elif height >= width and height >= frames:
        pts = _curve((0, 0, 0), y, x, z)
    else:
        pts = _curve((0, 0, 0), z, x, y)
    return [(pz, py, px) for px, py, pz in pts]


@lru_cache(maxsize=64)
def _permutation_cached(frames: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    pts = torch.tensor(gilbert_points(frames, height, width), dtype=torch.int64)
    perm = pts[:, 0] * (height * width) + pts[:, 1] * width + pts[:, 2]
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel())
    return perm, inverse


def gilbert_permutation(grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, inverse)`` int64 ``[F*H*W]`` for ``grid = (F, H, W)``; see the module docstring."""
    if len(grid) != 3:
        raise ValueError(f"grid must be (frames, height, width), got {grid!r}")
    perm, inverse = _permutation_cached(*(int(g) for g in grid))
    return perm.clone(), inverse.clone()


def reorder_tokens(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x[..., perm, :]`` for ``x`` of shape ``[..., L, D]`` (use ``inverse`` to undo)."""
    return x.index_select(-2, perm.to(x.device))
