"""Block-sparse attention kernels: one mask type, mask builders, and backends behind one dispatcher.

Shapes: q, k, v ``[B, H, L, D]``; block masks ``[B or 1, H or 1, ceil(Lq/bs), ceil(Lk/bs)]`` (True = computed).

    from diffusion_accel.kernels import asa_mask, block_sparse_attention
    mask = asa_mask(q, k, block_size=128, tau=0.9, grid=(F, H, W))
    out = block_sparse_attention(q, k, v, mask)

This package does not import triton itself; the Triton backend module loads on first use.
"""

from .block_mask import BlockSparseMask, full_mask, num_blocks
from .dispatch import BACKENDS, block_sparse_attention, triton_available
from .eager import eager_block_sparse_attention
from .flex import flex_block_sparse_attention
from .gilbert import gilbert_permutation, gilbert_points, reorder_tokens
from .global_tokens import global_token_attention, pool_global_tokens
from .masks import asa_importance, asa_mask, meanpool_topk_mask, sliding_window_mask
from .reference import masked_attention, merge_attention_outputs, reference_attention

__all__ = [
    "BACKENDS",
    "BlockSparseMask",
    "asa_importance",
    "asa_mask",
    "block_sparse_attention",
    "eager_block_sparse_attention",
    "flex_block_sparse_attention",
    "full_mask",
    "gilbert_permutation",
    "gilbert_points",
    "global_token_attention",
    "masked_attention",
    "meanpool_topk_mask",
    "merge_attention_outputs",
    "num_blocks",
    "pool_global_tokens",
    "reference_attention",
    "reorder_tokens",
    "sliding_window_mask",
    "triton_available",
]
