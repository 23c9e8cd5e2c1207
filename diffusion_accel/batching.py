"""Slicing a denoiser call to a subset of batch rows and rebuilding its output.

Used by methods that drop rows (adaptive guidance drops the unconditional rows of switched samples). Every tensor
argument whose first dimension equals the full batch is sliced; positional embeddings (``img_ids``, rotary
tables, ...) are left alone even when their length happens to equal the batch.
"""

from __future__ import annotations

from typing import Any

import torch

#: Keyword arguments that are never batched, whatever their shape.
UNBATCHED_KWARGS = frozenset({
    "img_ids", "txt_ids", "image_rotary_emb", "rotary_emb", "freqs_cis", "position_ids", "video_coords",
    "rope_interpolation_scale", "num_frames", "height", "width", "attention_kwargs", "joint_attention_kwargs",
})


def slice_batch(value: Any, index: torch.Tensor, full: int) -> Any:
    """Recursively take rows ``index`` of every tensor in ``value`` whose dim 0 is ``full``."""
    if isinstance(value, torch.Tensor):
        if value.ndim >= 1 and value.shape[0] == full:
            return value.index_select(0, index.to(value.device))
        return value
    if isinstance(value, dict):
        return {k: (v if k in UNBATCHED_KWARGS else slice_batch(v, index, full)) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(slice_batch(v, index, full) for v in value)
    if isinstance(value, list):
        return [slice_batch(v, index, full) for v in value]
    return value


def output_sample(output: Any) -> torch.Tensor:
    """The prediction tensor of a denoiser output (tuple with ``return_dict=False``, ModelOutput or tensor)."""
    if isinstance(output, tuple):
        return output[0]
    if hasattr(output, "sample"):
        return output.sample
    return output


def with_sample(output: Any, sample: torch.Tensor) -> Any:
    """``output`` with its prediction tensor replaced, in the same container type."""
    if isinstance(output, tuple):
        return (sample, *output[1:])
    if hasattr(output, "sample"):
        return type(output)(**{**output, "sample": sample})
    return sample


def denoiser_sample_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The latent ``x_t`` a denoiser call receives (``hidden_states`` or ``sample``)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return kwargs.get("hidden_states", kwargs.get("sample"))
