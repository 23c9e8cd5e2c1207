"""Reading a transformer block's streams from its arguments and building outputs in its return format.

The per-class return layout (which tuple index holds ``hidden_states`` / ``encoder_hidden_states``) comes from
Diffusers' ``TransformerBlockRegistry``, the same table its FirstBlockCache and MagCache use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .diffusers_internals import TransformerBlockMetadata, block_argument, block_metadata, unwrap_module

Streams = tuple[torch.Tensor, torch.Tensor | None]


def deviation(out: Streams, inp: Streams) -> Streams:
    """A block's (or block range's) deviation Δ = h_out − h_in per stream (``None`` where a stream is absent)."""
    encoder = None if out[1] is None or inp[1] is None else out[1] - inp[1]
    return out[0] - inp[0], encoder


def add_deviation(inp: Streams, delta: Streams) -> Streams:
    """h_in + Δ per stream: a cached deviation applied to the current input."""
    encoder = inp[1] if inp[1] is None or delta[1] is None else inp[1] + delta[1]
    return inp[0] + delta[0], encoder


@dataclass
class BlockIO:
    """Reads a block's input streams and writes outputs in the block's own return format."""

    metadata: TransformerBlockMetadata

    @classmethod
    def for_module(cls, module: torch.nn.Module) -> BlockIO:
        block_class = unwrap_module(module).__class__
        try:
            metadata = block_metadata(block_class)
        except ValueError as exc:
            raise ValueError(
                f"Block class {block_class.__name__} is not in Diffusers' TransformerBlockRegistry; register it with "
                "diffusion_accel.diffusers_internals.register_block_class(model_class, hidden_index, encoder_index) "
                "so that block caches know where its hidden states are."
            ) from exc
        return cls(metadata)

    @property
    def dual_stream(self) -> bool:
        return self.metadata.return_encoder_hidden_states_index is not None

    def inputs(self, args: tuple, kwargs: dict) -> Streams:
        m = self.metadata
        hidden = block_argument(m, m.hidden_states_argument_name, args, kwargs)
        encoder = None
        if self.dual_stream:
            encoder = block_argument(m, m.encoder_hidden_states_argument_name, args, kwargs)
        return hidden, encoder

    def outputs(self, output: Any) -> Streams:
        m = self.metadata
        if not isinstance(output, tuple):
            return output, None
        encoder = output[m.return_encoder_hidden_states_index] if self.dual_stream else None
        return output[m.return_hidden_states_index], encoder

    def make_output(self, hidden: torch.Tensor, encoder: torch.Tensor | None) -> Any:
        m = self.metadata
        if not self.dual_stream:
            return hidden
        out: list[Any] = [None, None]
        out[m.return_hidden_states_index] = hidden
        out[m.return_encoder_hidden_states_index] = encoder
        return tuple(out)
