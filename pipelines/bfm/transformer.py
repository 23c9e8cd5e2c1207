"""Blockwise Flow Matching's denoiser (BFM, Park et al., NeurIPS 2025, arXiv 2510.21167) with Flux's interface.

The time axis t ∈ [0, 1] (t = 1 noise, t = 0 data, ``x_t = (1 − t) x + t ε``) is cut into M equal segments,
segment m covering ``(σ_{m+1}, σ_m]`` with ``σ = linspace(1, 0, M + 1)``. Each segment has its own small stack of
transformer blocks, the *velocity blocks* (paper: ``velocity_blocks[m]``); a step at time t runs only the segment
that holds t. A shared *feature alignment network* R (semantic feature guidance) reads the noisy tokens first; its
image-token output ``h_rep`` is projected to a frozen encoder's features for the alignment loss (REPA-style, paper
λ_proj = 0.05) and conditions every velocity block. A second-stage *feature residual network* (FRN) replaces R
inside a segment: ``ĥ_rep(t) = R(x_{t_a}, t_a) + coeff(t) · FRN(x_t, t)`` with ``coeff = (t_a − t) / (t_a −
σ_{m+1})`` and ``t_a`` the time of the segment's first step, where R ran (:mod:`.fra`).

Why Flux's interface: the class takes ``FluxTransformer2DModel.forward``'s arguments (packed 2x2 latent tokens,
T5 sequence, CLIP pooled vector, ``timestep`` in [0, 1], rotary position ids) and is built from Diffusers' own Flux
blocks, so a plain ``FluxPipeline`` samples it, ``save_pretrained`` / ``from_pretrained`` store it as a custom
component, and the method hooks reach its blocks through the ``bfm`` adapter.

Two changes from the paper, both because Diffusers' Flux blocks take a *per-sample* adaLN embedding: R's features
enter the velocity blocks additively (``h = x_embed(x_t) + W_fuse h_rep``, ``W_fuse`` zero-initialised so that
training starts as plain flow matching) instead of through per-token adaLN; and the paper's class label is the
caption (T5 sequence in the joint attention, CLIP pooled vector in the timestep embedding), as in Flux.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous
from diffusers.models.transformers.transformer_flux import (
    FluxPosEmbed,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from torch import nn

#: A timestep within this distance *below* a segment boundary σ_m still counts as segment m: the pipeline passes
#: ``float32(σ · 1000) / 1000``, which can land a few ulps off the boundary the step grid was built on.
BOUNDARY_TOLERANCE = 1e-5


def segment_boundaries(num_segments: int) -> torch.Tensor:
    """σ_0 = 1 > σ_1 > ... > σ_M = 0 (float64): segment m covers ``(σ_{m+1}, σ_m]``."""
    return torch.linspace(1.0, 0.0, num_segments + 1, dtype=torch.float64)


def segment_index(t: torch.Tensor, num_segments: int) -> torch.Tensor:
    """The segment m of each time t (``[B]`` long): ``σ_{m+1} < t ≤ σ_m``; t = 0 belongs to the last segment.

    The noisy end of a segment is inclusive because sampling enters the segment at σ_m: Euler with M·S steps on
    ``linspace(1, 0, M·S + 1)`` evaluates segment m at exactly its S grid points σ_m, ..., σ_{m+1} + 1/(M·S)."""
    position = (1.0 - t.double()) * num_segments + BOUNDARY_TOLERANCE * num_segments
    return position.floor().long().clamp(0, num_segments - 1)


class _BlockStack(nn.Module):
    """Flux dual-stream then single-stream blocks over (text, image) tokens."""

    def __init__(self, dim: int, heads: int, head_dim: int, dual: int, single: int):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(
            [FluxTransformerBlock(dim=dim, num_attention_heads=heads, attention_head_dim=head_dim)
             for _ in range(dual)])
        self.single_transformer_blocks = nn.ModuleList(
            [FluxSingleTransformerBlock(dim=dim, num_attention_heads=heads, attention_head_dim=head_dim)
             for _ in range(single)])

    def run(self, hidden: torch.Tensor, context: torch.Tensor, temb: torch.Tensor, rotary: Any,
            attention_kwargs: dict[str, Any] | None) -> torch.Tensor:
        for block in (*self.transformer_blocks, *self.single_transformer_blocks):
            context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb,
                                    image_rotary_emb=rotary, joint_attention_kwargs=attention_kwargs)
        return hidden


class AlignmentNetwork(_BlockStack):
    """R: the shared feature alignment network (semantic feature guidance). Its own token embedding (the paper's
    ``rep_x_embedder``), then Flux blocks; returns the image tokens ``h_rep`` ``[B, N, D]``.

    ``t`` is unused by the blocks (they read ``temb``); it is an argument so that the feature-residual hook
    (:mod:`.fra`), which wraps this module's forward, knows where in the trajectory the call is."""

    def __init__(self, in_channels: int, dim: int, heads: int, head_dim: int, dual: int, single: int):
        super().__init__(dim, heads, head_dim, dual, single)
        self.x_embedder = nn.Linear(in_channels, dim)

    def forward(self, tokens: torch.Tensor, context: torch.Tensor, temb: torch.Tensor, rotary: Any,
                attention_kwargs: dict[str, Any] | None, t: torch.Tensor) -> torch.Tensor:
        return self.run(self.x_embedder(tokens), context, temb, rotary, attention_kwargs)


class FeatureResidualNetwork(_BlockStack):
    """FRN: single-stream blocks on R's token embedding of x_t, then a zero-initialised projection, so that an
    untrained FRN returns 0 and FRA starts as reusing the segment's anchor representation unchanged."""

    def __init__(self, dim: int, heads: int, head_dim: int, single: int):
        super().__init__(dim, heads, head_dim, 0, single)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, embedded: torch.Tensor, context: torch.Tensor, temb: torch.Tensor, rotary: Any,
                attention_kwargs: dict[str, Any] | None) -> torch.Tensor:
        return self.proj(self.norm(self.run(embedded, context, temb, rotary, attention_kwargs)))


class VelocitySegment(_BlockStack):
    """``velocity_blocks[m]`` and its own output layer: tokens → velocity for times in segment m."""

    def __init__(self, dim: int, heads: int, head_dim: int, dual: int, single: int, out_channels: int):
        super().__init__(dim, heads, head_dim, dual, single)
        self.norm_out = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(dim, out_channels)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor, temb: torch.Tensor, rotary: Any,
                attention_kwargs: dict[str, Any] | None) -> torch.Tensor:
        return self.proj_out(self.norm_out(self.run(hidden, context, temb, rotary, attention_kwargs), temb))


def _rows(attention_kwargs: dict[str, Any] | None, rows: torch.Tensor, batch: int) -> dict[str, Any] | None:
    """``attention_kwargs`` with batch-shaped tensors (a per-sample attention bias) restricted to ``rows``."""
    if not attention_kwargs:
        return attention_kwargs
    return {k: v[rows] if torch.is_tensor(v) and v.ndim and v.shape[0] == batch else v
            for k, v in attention_kwargs.items()}


class BlockwiseFlowTransformer(ModelMixin, ConfigMixin, CacheMixin):
    """BFM velocity model for packed Flux latents (see the module docstring).

    Args (paper symbol → parameter):
        num_segments: M, the number of time segments (paper default 6).
        segment_layers, segment_single_layers: depth of each segment's velocity blocks (paper ``segment_depth`` 5),
            Flux dual- then single-stream blocks.
        alignment_layers, alignment_single_layers: depth of R (paper 20); both 0: no semantic feature guidance.
        frn_single_layers: depth of the FRN (paper 4); 0: none (stage 1).
        feature_dim: channels of the frozen encoder's per-token features that R's projector predicts
            (the paper's 768 DINOv2 channels).
        projector_dim: hidden width of that projector MLP (paper 2048).
        in_channels, attention_head_dim, num_attention_heads, joint_attention_dim, pooled_projection_dim,
        axes_dims_rope, guidance_embeds: as ``FluxTransformer2DModel`` (``guidance_embeds`` must stay False: the
            model uses true classifier-free guidance).
    """

    _supports_gradient_checkpointing = False
    _no_split_modules = ["FluxTransformerBlock", "FluxSingleTransformerBlock"]

    @register_to_config
    def __init__(self, in_channels: int = 16, num_segments: int = 4, segment_layers: int = 1,
                 segment_single_layers: int = 0, alignment_layers: int = 1, alignment_single_layers: int = 1,
                 frn_single_layers: int = 0, attention_head_dim: int = 32, num_attention_heads: int = 4,
                 joint_attention_dim: int = 64, pooled_projection_dim: int = 64,
                 axes_dims_rope: tuple[int, int, int] = (8, 12, 12), feature_dim: int = 96, projector_dim: int = 256,
                 guidance_embeds: bool = False):
        super().__init__()
        if num_segments < 1:
            raise ValueError(f"num_segments={num_segments}: BFM needs at least one segment.")
        if segment_layers + segment_single_layers < 1:
            raise ValueError("each segment needs at least one velocity block (segment_layers or "
                             "segment_single_layers >= 1).")
        if guidance_embeds:
            raise ValueError("BlockwiseFlowTransformer has no guidance embedding (guidance_embeds=False): it is "
                             "sampled with true classifier-free guidance (FluxPipeline's true_cfg_scale).")
        has_alignment = alignment_layers + alignment_single_layers > 0
        if frn_single_layers and not has_alignment:
            raise ValueError("frn_single_layers > 0 needs an alignment network to approximate (alignment_layers or "
                             "alignment_single_layers >= 1).")
        dim = num_attention_heads * attention_head_dim
        self.inner_dim = dim
        self.out_channels = in_channels
        self.pos_embed = FluxPosEmbed(theta=10000, axes_dim=list(axes_dims_rope))
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(embedding_dim=dim,
                                                                  pooled_projection_dim=pooled_projection_dim)
        self.context_embedder = nn.Linear(joint_attention_dim, dim)
        self.x_embedder = nn.Linear(in_channels, dim)
        heads, head_dim = num_attention_heads, attention_head_dim
        self.alignment = (AlignmentNetwork(in_channels, dim, heads, head_dim, alignment_layers,
                                           alignment_single_layers) if has_alignment else None)
        self.projector = nn.Sequential(
            nn.Linear(dim, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim), nn.SiLU(),
            nn.Linear(projector_dim, feature_dim)) if has_alignment else None
        self.fuse = nn.Linear(dim, dim) if has_alignment else None
        if self.fuse is not None:
            nn.init.zeros_(self.fuse.weight)
            nn.init.zeros_(self.fuse.bias)
        self.frn = FeatureResidualNetwork(dim, heads, head_dim, frn_single_layers) if frn_single_layers else None
        self.segments = nn.ModuleList([VelocitySegment(dim, heads, head_dim, segment_layers, segment_single_layers,
                                                       in_channels) for _ in range(num_segments)])
        if self.frn is not None:
            from .fra import attach_feature_residual

            attach_feature_residual(self)

    # ------------------------------------------------------------------------------------------------ parts
    def segment_of(self, timestep: torch.Tensor) -> torch.Tensor:
        """Segment index of each row's ``timestep`` (in [0, 1], as the pipeline passes it)."""
        return segment_index(timestep, self.config.num_segments)

    def segment_end(self, segment: int) -> float:
        """σ_{m+1}: the clean end of segment ``segment``."""
        return float(segment_boundaries(self.config.num_segments)[segment + 1])

    def embed(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids):
        """``(temb, text tokens, rotary embedding)`` shared by R, the FRN and the velocity blocks."""
        temb = self.time_text_embed(timestep.to(hidden_states.dtype) * 1000, pooled_projections)
        context = self.context_embedder(encoder_hidden_states)
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        rotary = self.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        return temb, context, rotary

    def velocity(self, hidden_states: torch.Tensor, representation: torch.Tensor | None, segments: torch.Tensor,
                 context: torch.Tensor, temb: torch.Tensor, rotary: Any,
                 attention_kwargs: dict[str, Any] | None) -> torch.Tensor:
        """Each row through the velocity blocks of its own segment (rows grouped by segment)."""
        hidden = self.x_embedder(hidden_states)
        if representation is not None:
            hidden = hidden + self.fuse(representation)
        first = int(segments[0])
        if bool((segments == first).all()):  # sampling: every row at the same time, no regrouping copies
            return self.segments[first](hidden, context, temb, rotary, attention_kwargs)
        out = hidden.new_empty(*hidden.shape[:2], self.out_channels)
        for m in segments.unique().tolist():
            rows = (segments == m).nonzero().squeeze(1)
            out[rows] = self.segments[m](hidden[rows], context[rows], temb[rows], rotary,
                                         _rows(attention_kwargs, rows, len(hidden)))
        return out

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                pooled_projections: torch.Tensor = None, timestep: torch.Tensor = None, img_ids: torch.Tensor = None,
                txt_ids: torch.Tensor = None, guidance: torch.Tensor | None = None,
                joint_attention_kwargs: dict[str, Any] | None = None, return_dict: bool = True,
                return_features: bool = False):
        """``FluxTransformer2DModel.forward``'s contract (``timestep`` in [0, 1]); ``return_features`` also returns
        R's projected features ``[B, N, feature_dim]`` (``None`` without R), which the alignment loss reads."""
        if guidance is not None:
            raise ValueError("BlockwiseFlowTransformer takes no guidance embedding; sample it with true CFG "
                             "(true_cfg_scale > 1 and a negative prompt).")
        temb, context, rotary = self.embed(hidden_states, encoder_hidden_states, pooled_projections, timestep,
                                           img_ids, txt_ids)
        segments = self.segment_of(timestep.reshape(-1).expand(len(hidden_states)))
        representation = None
        if self.alignment is not None:
            representation = self.alignment(hidden_states, context, temb, rotary, joint_attention_kwargs, timestep)
        output = self.velocity(hidden_states, representation, segments, context, temb, rotary, joint_attention_kwargs)
        features = (self.projector(representation) if return_features and representation is not None else None)
        if return_features:
            return output, features
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)

    # ------------------------------------------------------------------------------------------------ cost
    def blocks_per_step(self, with_frn: bool = False) -> float:
        """Transformer blocks one forward runs (R + one segment), or with FRA inside a segment FRN + one segment."""
        c = self.config
        segment = c.segment_layers + c.segment_single_layers
        alignment = c.alignment_layers + c.alignment_single_layers
        return segment + (c.frn_single_layers if with_frn else alignment)

