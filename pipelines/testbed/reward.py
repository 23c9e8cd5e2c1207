"""A differentiable prompt reward from a shapes classifier: ``log P(the image matches the prompt)``.

The classifier (:class:`~.shapes_net.ShapesNet` or the independent :class:`~.shapes_net.ShapesJudge`) gives, per
grid cell, a distribution over 25 classes (empty or colour x shape) and, for an occupied cell, over 3 sizes. Read as
independent per-cell distributions, they give the probability of any full labelling of the 3x3 grid, and a prompt
is a *set* of labellings: every way to put its objects in distinct cells that respects the named positions, with
every other cell empty. :func:`prompt_reward` is the log of the total probability of that set,

    reward = log sum_{a in A(prompt)} prod_cells p(cell = a[cell]) * prod_{named sizes} p(size of that cell),

which is exactly the classifier's probability that :func:`~.shapes_net.adherence` (the argmax reading, no extra
objects) would call the image a match, under the per-cell independence the classifier is trained with. So:

* an object with a named position contributes ``log p(cell = colour+shape)`` at that cell (every assignment agrees);
* an object without a position is summed over the cells no positioned object claims: a soft assignment whose
  weights are the classifier's own posteriors, with no arbitrary temperature or normaliser; two unpositioned objects
  are summed over ordered pairs of distinct free cells;
* every cell an assignment leaves free contributes ``log p(empty)``: all other cells when every object is
  positioned; otherwise each assignment's own free cells, so an object found in cell ``c`` is not also penalised
  for ``c`` not being empty;
* a named size adds ``log p(size)`` at the object's cell (``use_size=False`` drops it).

The reward is a log-probability (<= 0), comparable across prompts, and its gradient is the posterior-weighted
gradient of the matching labellings. A prompt of the grammar has at most 2 objects, so at most 9 * 8 = 72
assignments; they are built once per caption (cached) as index tensors, and a batch is one gather and one
``logsumexp`` over ``[B, 72]``.

Images are float ``[B, 3, H, W]`` in the VAE output range **[-1, 1]** (``value_range=(0, 1)`` for [0, 1]); other
sizes are area-resized to 64x64. Values are not clamped (clamping would zero the gradient of out-of-range pixels).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache

import torch
from torch import nn

from .shapes import IMAGE_SIZE, SIZE_NAMES, parse_caption
from .shapes_net import NUM_CELLS, class_index, resolve_net

__all__ = ["prompt_reward", "prompt_targets", "frozen", "freeze_for_reward", "PromptTargets"]

#: A prompt's assignments: ``cls [A, 9]`` (target class per cell, 0 = empty), ``size [A, 9]`` (target size class,
#: -1 = not constrained).
PromptTargets = tuple[torch.Tensor, torch.Tensor]


@lru_cache(maxsize=4096)
def _targets(caption: str, use_size: bool) -> PromptTargets:
    objects = parse_caption(caption)
    cls = [0] * NUM_CELLS
    size = [-1] * NUM_CELLS
    claimed: set[int] = set()
    floating = []
    for o in objects:
        if o.position is None:
            floating.append(o)
            continue
        if o.position in claimed:  # two objects named in one cell: no labelling matches
            return torch.zeros(0, NUM_CELLS, dtype=torch.long), torch.zeros(0, NUM_CELLS, dtype=torch.long)
        claimed.add(o.position)
        cls[o.position] = class_index(o.colour, o.shape)
        if use_size and o.size is not None:
            size[o.position] = SIZE_NAMES.index(o.size)
    free = [c for c in range(NUM_CELLS) if c not in claimed]
    rows_cls, rows_size = [], []
    for cells in itertools.permutations(free, len(floating)):
        row_cls, row_size = list(cls), list(size)
        for cell, o in zip(cells, floating, strict=True):
            row_cls[cell] = class_index(o.colour, o.shape)
            if use_size and o.size is not None:
                row_size[cell] = SIZE_NAMES.index(o.size)
        rows_cls.append(row_cls)
        rows_size.append(row_size)
    return torch.tensor(rows_cls, dtype=torch.long), torch.tensor(rows_size, dtype=torch.long)


def prompt_targets(prompts: Sequence[str], use_size: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded assignment tensors of a batch of prompts: ``cls [B, A, 9]``, ``size [B, A, 9]`` (-1 = free) and
    ``valid [B, A]`` (bool), ``A`` the largest number of assignments in the batch. Per-caption parts are cached."""
    parts = [_targets(" ".join(p.lower().split()), use_size) for p in prompts]
    width = max(1, max(len(c) for c, _ in parts))
    cls = torch.zeros(len(parts), width, NUM_CELLS, dtype=torch.long)
    size = torch.full((len(parts), width, NUM_CELLS), -1, dtype=torch.long)
    valid = torch.zeros(len(parts), width, dtype=torch.bool)
    for i, (c, s) in enumerate(parts):
        cls[i, :len(c)], size[i, :len(s)], valid[i, :len(c)] = c, s, True
    return cls, size, valid


def freeze_for_reward(net: nn.Module) -> nn.Module:
    """Put ``net`` in eval mode (BatchNorm uses its running statistics) and stop its parameters' gradients, for a
    net used only as a reward. Returns ``net``."""
    return net.eval().requires_grad_(False)


@contextmanager
def frozen(net: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and ``requires_grad=False`` inside the block; the previous mode and flags are restored after."""
    was_training = net.training
    flags = [p.requires_grad for p in net.parameters()]
    try:
        yield freeze_for_reward(net)
    finally:
        net.train(was_training)
        for p, flag in zip(net.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def prompt_reward(net: nn.Module | str | None, images: torch.Tensor, prompts: Sequence[str],
                  value_range: tuple[float, float] = (-1.0, 1.0), use_size: bool = True) -> torch.Tensor:
    """``log P(image matches prompt)`` under ``net``'s per-cell posteriors, ``[B]`` (see the module docstring).

    ``net``: a classifier, a name of :data:`~.shapes_net.JUDGES`, or ``None`` for the shipped shapes-net; it runs
    in eval mode with frozen parameters for this call (its mode and flags are restored afterwards). ``images``:
    float ``[B, 3, H, W]`` in ``value_range`` (default [-1, 1], the VAE decoder's range); gradients flow to them.
    A prompt that no labelling can satisfy (two objects named in one cell) gets ``-inf``."""
    net = resolve_net(net)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    lo, hi = value_range
    x = (images.float() - lo) / (hi - lo)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
    cls_t, size_t, valid = (t.to(x.device) for t in prompt_targets(prompts, use_size))
    with frozen(net):
        out = net(x)
    logp_cls = out["cls"].float().log_softmax(-1)  # [B, 9, 25]
    logp_size = out["size"].float().log_softmax(-1)  # [B, 9, 3]
    batch, width = cls_t.shape[:2]
    cell_terms = logp_cls.unsqueeze(1).expand(batch, width, NUM_CELLS, -1).gather(-1, cls_t.unsqueeze(-1))
    score = cell_terms.squeeze(-1).sum(-1)  # [B, A]
    sized = size_t >= 0
    size_terms = logp_size.unsqueeze(1).expand(batch, width, NUM_CELLS, -1).gather(
        -1, size_t.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    score = score + torch.where(sized, size_terms, torch.zeros_like(size_terms)).sum(-1)
    score = score.masked_fill(~valid, float("-inf"))
    return torch.logsumexp(score, dim=1)
