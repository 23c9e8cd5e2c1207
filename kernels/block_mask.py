"""One block-sparse mask type for every kernel: kept key blocks per query block (CSR form).

Shapes (``bs`` = block size, ``Qb = ceil(Lq / bs)``, ``Kb = ceil(Lk / bs)``):

* ``counts``  ``[B, H, Qb]`` int32: number of kept key blocks of each query block (``B``/``H`` may be 1 = broadcast).
* ``indices`` ``[B, H, Qb, max_keep]`` int32: the kept key-block ids, ascending; entries past ``counts`` are 0
  and never read.
* ``permutation`` (optional) ``[L]`` int64: the block structure is defined over the tokens reordered as
  ``x[..., permutation, :]`` (e.g. a Gilbert curve, see :mod:`.gilbert`); :func:`block_sparse_attention` applies it
  to q/k/v and undoes it on the output, so callers keep their own token order.

This is exactly FlexAttention's ``kv_num_blocks``/``kv_indices`` layout and what the Triton kernel reads, so one
object drives the reference, the eager path, compiled FlexAttention and Triton.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch


def num_blocks(length: int, block_size: int) -> int:
    """``ceil(length / block_size)``."""
    return (length + block_size - 1) // block_size


@dataclass(frozen=True)
class BlockSparseMask:
    """Kept key blocks per query block; see the module docstring for shapes."""

    counts: torch.Tensor
    indices: torch.Tensor
    block_size: int
    q_len: int
    kv_len: int
    permutation: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.counts.dim() != 3 or self.indices.dim() != 4:
            raise ValueError(
                f"counts must be [B,H,Qb] and indices [B,H,Qb,max_keep]; got {tuple(self.counts.shape)} and "
                f"{tuple(self.indices.shape)}"
            )
        if self.counts.dtype != torch.int32 or self.indices.dtype != torch.int32:
            raise ValueError("counts and indices must be int32 (use BlockSparseMask.from_dense to build one)")
        if tuple(self.indices.shape[:3]) != tuple(self.counts.shape):
            raise ValueError(f"indices {tuple(self.indices.shape)} do not match counts {tuple(self.counts.shape)}")
        if self.counts.shape[2] != self.num_q_blocks:
            raise ValueError(
                f"mask has {self.counts.shape[2]} query blocks but q_len={self.q_len} with block_size="
                f"{self.block_size} needs {self.num_q_blocks}"
            )
        if self.permutation is not None and (self.q_len != self.kv_len or self.permutation.numel() != self.q_len):
            raise ValueError("a token permutation needs q_len == kv_len == len(permutation)")

    # ------------------------------------------------------------------ sizes
    @property
    def num_q_blocks(self) -> int:
        return num_blocks(self.q_len, self.block_size)

    @property
    def num_kv_blocks(self) -> int:
        return num_blocks(self.kv_len, self.block_size)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Shape of the equivalent dense block mask ``[B or 1, H or 1, Qb, Kb]``."""
        b, h, qb = self.counts.shape
        return (b, h, qb, self.num_kv_blocks)

    @property
    def device(self) -> torch.device:
        return self.counts.device

    def density(self) -> float:
        """Fraction of (query block, key block) tiles computed, in ``[0, 1]`` (sparsity = 1 - density)."""
        b, h, qb, kb = self.shape
        return float(self.counts.sum().item()) / float(b * h * qb * kb)

    # ------------------------------------------------------------ conversions
    @classmethod
    def from_dense(
        cls,
        dense: torch.Tensor,
        block_size: int,
        q_len: int | None = None,
        kv_len: int | None = None,
        permutation: torch.Tensor | None = None,
    ) -> BlockSparseMask:
        """Build from a dense bool ``[B or 1, H or 1, Qb, Kb]`` block mask (True = computed).

        ``q_len``/``kv_len`` default to ``Qb * block_size`` / ``Kb * block_size``.
        """
        if dense.dtype != torch.bool or dense.dim() != 4:
            raise ValueError(
                f"dense block mask must be a 4-D bool tensor [B or 1, H or 1, Qb, Kb]; got dtype {dense.dtype} "
                f"and shape {tuple(dense.shape)}"
            )
        b, h, qb, kb = dense.shape
        q_len = qb * block_size if q_len is None else q_len
        kv_len = kb * block_size if kv_len is None else kv_len
        if num_blocks(q_len, block_size) != qb or num_blocks(kv_len, block_size) != kb:
            raise ValueError(
                f"dense block mask shape {tuple(dense.shape)} does not fit q_len={q_len}, kv_len={kv_len}, "
                f"block_size={block_size}: expected [..., {num_blocks(q_len, block_size)}, "
                f"{num_blocks(kv_len, block_size)}]"
            )
        counts = dense.sum(-1, dtype=torch.int32)
        max_keep = max(1, int(counts.max().item()) if counts.numel() else 1)
        # A stable sort of "not kept" puts the kept block ids first, in ascending order.
        order = torch.sort((~dense).to(torch.int8), dim=-1, stable=True).indices[..., :max_keep]
        slot = torch.arange(max_keep, device=dense.device)
        indices = torch.where(slot < counts.unsqueeze(-1), order, torch.zeros_like(order)).to(torch.int32)
        return cls(counts.contiguous(), indices.contiguous(), block_size, q_len, kv_len, permutation)

    def to_dense(self) -> torch.Tensor:
        """Dense bool block mask ``[B or 1, H or 1, Qb, Kb]``."""
        b, h, qb, kb = self.shape
        dense = torch.zeros(b, h, qb, kb + 1, dtype=torch.bool, device=self.device)
        slot = torch.arange(self.indices.shape[-1], device=self.device)
        # Unused slots are routed to an extra dummy column that is cut off afterwards.
        used = slot < self.counts.unsqueeze(-1)
        target = torch.where(used, self.indices.long(), torch.full_like(self.indices, kb).long())
        dense.scatter_(-1, target, True)
        return dense[..., :kb].contiguous()

    def check_indices(self) -> None:
        """Raise ``ValueError`` unless every count is in ``[0, max_keep]`` and every used index in ``[0, Kb)``.

        Kernels that read key blocks by index (the C++ CPU kernel) call this first: a hand-built mask with a bad
        index would otherwise read outside K/V. Masks from our builders and ``from_dense`` always pass.
        """
        kb, width = self.num_kv_blocks, self.indices.shape[-1]
        if bool(((self.counts < 0) | (self.counts > width)).any()):
            raise ValueError(f"mask counts must be in [0, {width}] (the indices' last dim); rebuild it with from_dense")
        used = torch.arange(width, device=self.device) < self.counts.unsqueeze(-1)
        if bool((used & ((self.indices < 0) | (self.indices >= kb))).any()):
            raise ValueError(f"mask indices must be key-block ids in [0, {kb}) for kv_len={self.kv_len}, block_size="
                             f"{self.block_size}; rebuild it with from_dense")

    def to_token_mask(self) -> torch.Tensor:
        """Token-level bool mask ``[B or 1, H or 1, Lq, Lk]`` (memory O(L^2): references and small tests only)."""
        dense = self.to_dense()
        bs = self.block_size
        tok = dense.repeat_interleave(bs, dim=2).repeat_interleave(bs, dim=3)
        return tok[:, :, : self.q_len, : self.kv_len]

    def transpose(self) -> BlockSparseMask:
        """Kept query blocks per key block (CSC form), used by the backward pass; lengths swapped."""
        return BlockSparseMask.from_dense(self.to_dense().transpose(-1, -2), self.block_size, self.kv_len, self.q_len)

    def expand(self, batch: int, heads: int) -> BlockSparseMask:
        """Broadcast a ``B``/``H`` of 1 to ``batch``/``heads`` (views, no copy)."""
        b, h, qb = self.counts.shape
        if b not in (1, batch) or h not in (1, heads):
            raise ValueError(
                f"mask batch/heads ({b}, {h}) cannot broadcast to ({batch}, {heads}); use 1 or the exact size"
            )
        return replace(
            self,
            counts=self.counts.expand(batch, heads, qb),
            indices=self.indices.expand(batch, heads, qb, self.indices.shape[-1]),
        )

    def to(self, device: torch.device | str) -> BlockSparseMask:
        perm = None if self.permutation is None else self.permutation.to(device)
        return replace(self, counts=self.counts.to(device), indices=self.indices.to(device), permutation=perm)

    def to_flex_block_mask(self):
        """FlexAttention ``BlockMask`` with a block-lookup ``mask_mod`` (handles the ragged last block).

        Eager ``flex_attention`` ignores ``kv_num_blocks``/``kv_indices`` and evaluates only ``mask_mod``; with the
        default no-op ``mask_mod`` it silently computes *dense* attention. So the block table is always attached as a
        ``mask_mod`` too, which makes eager == compiled == reference. Kept blocks are registered as partial blocks
        (``mask_mod`` evaluated) only where they are ragged; interior kept blocks are "full" (no ``mask_mod`` cost).
        """
        from torch.nn.attention.flex_attention import BlockMask

        b, h, qb, kb = self.shape
        bs = self.block_size
        dense = self.to_dense()
        table = dense  # captured by mask_mod; B/H of size 1 are indexed with 0 below
        b_one, h_one = b == 1, h == 1
        kv_len = self.kv_len

        def mask_mod(bi, hi, q_idx, kv_idx):
            bb = bi * 0 if b_one else bi
            hh = hi * 0 if h_one else hi
            return table[bb, hh, q_idx // bs, kv_idx // bs] & (kv_idx < kv_len)

        ragged_k = self.kv_len % bs != 0
        ragged_q = self.q_len % bs != 0
        partial = torch.zeros_like(dense)
        if ragged_k:
            partial[..., -1] = dense[..., -1]
        if ragged_q:
            partial[..., -1, :] = dense[..., -1, :]
        full = dense & ~partial
        kv_num, kv_idx = _dense_to_flex(partial, kb)
        full_num, full_idx = _dense_to_flex(full, kb)
        return BlockMask.from_kv_blocks(
            kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=bs, mask_mod=mask_mod, seq_lengths=(self.q_len, self.kv_len)
        )


def _dense_to_flex(dense: torch.Tensor, kb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``kv_num_blocks [B,H,Qb]`` and ``kv_indices [B,H,Qb,Kb]`` (the width FlexAttention expects)."""
    counts = dense.sum(-1, dtype=torch.int32)
    order = torch.sort((~dense).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return counts.contiguous(), order[..., :kb].contiguous()


def as_block_mask(
    mask: BlockSparseMask | torch.Tensor,
    q_len: int,
    kv_len: int,
    batch: int,
    heads: int,
    block_size: int | None = None,
) -> BlockSparseMask:
    """Validate ``mask`` (our type or a dense bool ``[B or 1, H or 1, Qb, Kb]`` tensor) against the inputs."""
    if isinstance(mask, BlockSparseMask):
        if block_size is not None and block_size != mask.block_size:
            raise ValueError(
                f"block_size={block_size} differs from the mask's block_size={mask.block_size}; pass "
                f"block_size={mask.block_size} or leave it out"
            )
        if (mask.q_len, mask.kv_len) != (q_len, kv_len):
            raise ValueError(
                f"mask was built for Lq={mask.q_len}, Lk={mask.kv_len} but q/k have Lq={q_len}, Lk={kv_len}; "
                "rebuild the mask for these lengths"
            )
        b, h = mask.counts.shape[:2]
        if b not in (1, batch) or h not in (1, heads):
            raise ValueError(f"mask batch/heads ({b}, {h}) must be 1 or equal to q's ({batch}, {heads})")
        return mask
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"block_mask must be a BlockSparseMask or a bool tensor, got {type(mask).__name__}")
    bs = 128 if block_size is None else block_size
    expected = (num_blocks(q_len, bs), num_blocks(kv_len, bs))
    if mask.dtype != torch.bool:
        raise ValueError(f"dense block_mask must be torch.bool (True = computed), got {mask.dtype}; use mask.bool()")
    if mask.dim() != 4 or tuple(mask.shape[2:]) != expected or mask.shape[0] not in (1, batch) or mask.shape[1] not in (
        1,
        heads,
    ):
        raise ValueError(
            f"dense block_mask must have shape [B or 1, H or 1, ceil(Lq/bs), ceil(Lk/bs)] = "
            f"[{batch} or 1, {heads} or 1, {expected[0]}, {expected[1]}] for Lq={q_len}, Lk={kv_len}, block_size={bs}; "
            f"got {tuple(mask.shape)}"
        )
    return BlockSparseMask.from_dense(mask, bs, q_len, kv_len)


def full_mask(q_len: int, kv_len: int, block_size: int, device: torch.device | str = "cpu") -> BlockSparseMask:
    """All blocks kept (density 1)."""
    qb, kb = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
    ones = torch.ones(1, 1, qb, kb, dtype=torch.bool, device=device)
    return BlockSparseMask.from_dense(ones, block_size, q_len, kv_len)


def keep_count(value: int | float, total: int) -> int:
    """Blocks to keep: an ``int`` is a count, a ``float`` in (0, 1] a ratio (``ceil(r * total)``)."""
    if isinstance(value, bool):
        raise ValueError("keep count must be an int (blocks) or a float ratio in (0, 1]")
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"a keep ratio must be in (0, 1], got {value}")
        return max(1, min(total, math.ceil(value * total)))
    if value < 0:
        raise ValueError(f"a keep count must be >= 0, got {value}")
    return min(total, int(value))
