"""Block-sparse self-attention in Diffusers pipelines (Video-BLADE's adaptive masks and the static baselines).

How it plugs in: a ``ModelHook`` on every self-attention module of the transformer's blocks runs that module
inside a ``TorchFunctionMode`` that routes its ``F.scaled_dot_product_attention`` call to
:func:`diffusion_accel.kernels.block_sparse_attention`. This is the route Diffusers' own LayerSkip takes for
``skip_attention_scores``; we prefer it to registering a new attention-dispatch backend because (a) PixArt's
``AttnProcessor2_0`` calls SDPA directly and never reaches the dispatcher, (b) a new backend name needs the
``AttentionBackendName`` enum patched and ``reset_attention_backend()`` does not restore the global backend, and
(c) the dispatcher never learns which layer or latent grid it serves. Processors and backends are left untouched,
so removing the hooks restores the model exactly. Cross-attention (Lq != Lk), masked or causal calls stay dense.

Joint (MMDiT) attention concatenates text and image tokens: text rows attend densely to everything, image rows
attend block-sparsely to image keys and densely to text keys, and the two partial attentions are merged exactly
through their log-sum-exp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from torch.overrides import TorchFunctionMode

from ..config import MethodConfig, register_method
from ..method import Method
from ..pipelines.adapters import families_where

if TYPE_CHECKING:
    from ..pipelines.adapters import ModelAdapter
    from ..session import AccelSession

MASKS = ("asa", "sliding_tile", "topk")


@register_method
@dataclass
class SparseAttentionConfig(MethodConfig):
    """Block-sparse self-attention.

    Attributes:
        mask: ``"asa"`` (Video-BLADE adaptive sparse attention), ``"sliding_tile"`` (static 3-D local window) or
            ``"topk"`` (mean-pooled top-k blocks).
        block_size: tokens per block b.
        tau: ASA τ, the cumulative importance mass kept per query-block row.
        samples_per_block: ASA k, tokens sampled per block to estimate block importance.
        min_keep, max_keep: clamp of kept key blocks per row (int = blocks, float = fraction of the row).
        density: top-k: fraction of key blocks kept per row.
        window: sliding tile: (f, h, w) token distance of kept tiles (int = same on every axis).
        reorder: order tokens along the 3-D Gilbert curve of the latent grid before blocking.
        mask_refresh: recompute masks every this many steps (1 = every step).
        backend: kernel backend (``"auto"``: Triton on CUDA, our C++ kernel on CPU, compiled FlexAttention
            elsewhere, eager last).
        min_tokens: self-attention over fewer image tokens than this stays dense (a few blocks leave nothing to
            skip, and compiling a kernel for them costs more than it saves).
        dense_backend: what the calls that stay dense run on: ``"sdpa"`` (PyTorch, any device) or ``"xformers"``
            (the ``[xformers]`` extra, CUDA only; refused at apply with the reason elsewhere).
    """

    name: ClassVar[str] = "sparse_attention"
    families: ClassVar[tuple[str, ...] | None] = families_where(
        lambda a: bool(a.block_lists) and bool(a.extra.get("self_attention")))
    summary: ClassVar[str] = "Block-sparse self-attention (Video-BLADE ASA, sliding tile, top-k) via our kernels"
    mask: str = "asa"
    block_size: int = 128
    tau: float = 0.9
    samples_per_block: int = 16
    min_keep: int | float = 1
    max_keep: int | float | None = None
    density: float = 0.25
    window: int | tuple[int, int, int] = 4
    reorder: bool = True
    mask_refresh: int = 1
    backend: str = "auto"
    min_tokens: int = 512
    dense_backend: str = "sdpa"

    def validate(self) -> None:
        from ..kernels.dispatch import BACKENDS

        if self.mask not in MASKS:
            raise ValueError(f"sparse_attention mask must be one of {MASKS}, got {self.mask!r}.")
        if self.block_size < 1:
            raise ValueError(f"sparse_attention block_size must be >= 1, got {self.block_size}.")
        if not 0 < self.tau <= 1:
            raise ValueError(f"sparse_attention tau (τ) must be in (0, 1], got {self.tau}.")
        if not 0 < self.density <= 1:
            raise ValueError(f"sparse_attention density must be in (0, 1], got {self.density}.")
        if self.mask_refresh < 1:
            raise ValueError(f"sparse_attention mask_refresh must be >= 1, got {self.mask_refresh}.")
        if self.backend not in BACKENDS:
            raise ValueError(f"sparse_attention backend must be one of {BACKENDS}, got {self.backend!r}.")
        from ..kernels.dense import DENSE_BACKENDS

        if self.dense_backend not in DENSE_BACKENDS:
            raise ValueError(f"sparse_attention dense_backend must be one of {DENSE_BACKENDS}, "
                             f"got {self.dense_backend!r}.")

    def not_applicable_reason(self, adapter: ModelAdapter, pipe: Any) -> str | None:
        reason = super().not_applicable_reason(adapter, pipe)
        if reason is None and not adapter.extra.get("self_attention"):
            return f"the {adapter.family} adapter does not name its self-attention modules"
        if reason is None and self.dense_backend == "xformers":
            from ..kernels.dense import xformers_unavailable_reason

            denoiser = adapter.get_denoiser(pipe)
            device = next((p.device for p in denoiser.parameters()), torch.device("cpu"))
            reason = xformers_unavailable_reason(device)
        return reason

    def build(self) -> Method:
        return SparseAttentionMethod(self)


def _sdpa_arguments(args: tuple, kwargs: dict) -> dict[str, Any]:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    return bound


class _SDPARouter(TorchFunctionMode):
    """Sends one attention module's SDPA call to the method (dense when it is not plain self-attention)."""

    def __init__(self, method: SparseAttentionMethod, layer: int) -> None:
        super().__init__()
        self.method = method
        self.layer = layer

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            call = _sdpa_arguments(args, kwargs)
            q, k = call["query"], call["key"]
            plain = (call.get("attn_mask") is None and not call.get("is_causal", False)
                     and not call.get("dropout_p", 0.0) and not call.get("enable_gqa", False)
                     and q.ndim == 4 and q.shape[-2] == k.shape[-2])
            if plain:
                out = self.method.attend(self.layer, q, k, call["value"], call.get("scale"))
                if out is not None:
                    return out
                if self.method.config.dense_backend != "sdpa":
                    from ..kernels.dense import dense_attention

                    return dense_attention(q, k, call["value"], call.get("scale"), self.method.config.dense_backend)
        return func(*args, **kwargs)


class _AttentionHook(ModelHook):
    def __init__(self, method: SparseAttentionMethod, layer: int) -> None:
        super().__init__()
        self.method = method
        self.layer = layer

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        with _SDPARouter(self.method, self.layer):
            return self.fn_ref.original_forward(*args, **kwargs)


class _GridHook(ModelHook):
    """On the denoiser: reads the latent grid (F, H, W) of image tokens for this forward."""

    def __init__(self, method: SparseAttentionMethod) -> None:
        super().__init__()
        self.method = method

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        hidden = args[0] if args else kwargs.get("hidden_states")
        self.method.set_grid(hidden)
        return args, kwargs


class SparseAttentionMethod(Method):
    """Runtime of :class:`SparseAttentionConfig`."""

    priority = 60

    def __init__(self, config: SparseAttentionConfig) -> None:
        super().__init__(config)
        self.config: SparseAttentionConfig = config
        self.grid: tuple[int, int, int] | None = None
        self.num_image_tokens = 0
        self._masks: dict[int, tuple[int, int, tuple, Any]] = {}
        self.session: AccelSession | None = None

    def attach(self, session: AccelSession) -> None:
        self.session = session
        names = session.adapter.extra["self_attention"]
        layer = 0
        for block in session.blocks:
            for name in names:
                attention = getattr(block, name, None)
                if attention is None:
                    continue
                session.register_hook(attention, _AttentionHook(self, layer), "diffusion_accel.sparse_attention")
                layer += 1
        session.register_hook(session.denoiser, _GridHook(self), "diffusion_accel.sparse_attention.grid")

    def on_call_begin(self, session: AccelSession) -> None:
        self._masks.clear()
        session.stats.extra["sparse_attention"] = {"density": []}

    # ------------------------------------------------------------------ grid
    def set_grid(self, hidden: torch.Tensor) -> None:
        adapter, pipe = self.session.adapter, self.session.pipe
        config = adapter.get_denoiser(pipe).config
        patch = config.get("patch_size", 1) or 1
        patch_hw = patch[-1] if isinstance(patch, (tuple, list)) else patch
        patch_t = (patch[0] if isinstance(patch, (tuple, list)) else config.get("patch_size_t", 1)) or 1
        grid = None
        layout = adapter.latent_layout
        if layout == "image" and hidden.ndim == 4:
            grid = (1, hidden.shape[-2] // patch_hw, hidden.shape[-1] // patch_hw)
        elif layout == "video" and hidden.ndim == 5:
            frames = hidden.shape[1] if adapter.extra.get("frames_first") else hidden.shape[2]
            grid = (frames // patch_t, hidden.shape[-2] // patch_hw, hidden.shape[-1] // patch_hw)
        elif layout in ("packed_image", "packed_video") and hidden.ndim == 3:
            grid = self._packed_grid(hidden.shape[1], layout)
        self.grid = grid
        self.num_image_tokens = math.prod(grid) if grid else 0

    def _packed_grid(self, tokens: int, layout: str) -> tuple[int, int, int] | None:
        call = self.session.call_args
        height, width = call.get("height"), call.get("width")
        frames = 1
        if layout == "packed_video":
            pipe = self.session.pipe
            num_frames = call.get("num_frames") or 1
            frames = (int(num_frames) - 1) // pipe.vae_temporal_compression_ratio + 1
        if not height or not width or tokens % frames:
            return None
        per_frame = tokens // frames
        h = round(math.sqrt(per_frame * height / width))
        if h == 0 or per_frame % h:
            return None
        return (frames, h, per_frame // h)

    # ------------------------------------------------------------------ attention
    def _mask(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> Any:
        from ..kernels import masks  # noqa: F401  (module import keeps the builders' names visible)

        ctx = self.session.context
        key = (tuple(q.shape), ctx.stage)
        cached = self._masks.get(layer)
        if cached is not None and cached[2] == key and ctx.step_index - cached[0] < self.config.mask_refresh and (
            ctx.step_index >= cached[0]
        ):
            return cached[3]
        c = self.config
        grid = self.grid if self.grid and math.prod(self.grid) == q.shape[-2] else None
        if c.mask == "asa":
            generator = torch.Generator(device="cpu").manual_seed(1000 * layer + ctx.step_index)
            mask = masks.asa_mask(q, k, block_size=c.block_size, samples_per_block=c.samples_per_block, tau=c.tau,
                                  min_keep=c.min_keep, max_keep=c.max_keep, grid=grid, reorder=c.reorder,
                                  generator=generator)
        elif c.mask == "topk":
            mask = masks.meanpool_topk_mask(q, k, block_size=c.block_size, density=c.density, grid=grid,
                                            reorder=c.reorder)
        else:
            mask = masks.sliding_window_mask(q, k, block_size=c.block_size, window=c.window, grid=grid,
                                             reorder=c.reorder)
        self._masks[layer] = (ctx.step_index, layer, key, mask)
        self.session.stats.extra.setdefault("sparse_attention", {"density": []})["density"].append(
            {"stage": ctx.stage, "step": ctx.step_index, "layer": layer, "density": float(mask.density())}
        )
        return mask

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float | None) -> torch.Tensor | None:
        """Block-sparse attention for one SDPA call, or ``None`` to leave it dense."""
        from ..kernels.dispatch import block_sparse_attention
        from ..kernels.reference import masked_attention, merge_attention_outputs

        n_img, length = self.num_image_tokens, q.shape[-2]
        if n_img == 0 or n_img > length or n_img < self.config.min_tokens:
            return None
        text = length - n_img
        joint = self.session.adapter.extra.get("joint_text")
        if text and joint not in ("prefix", "suffix"):
            return None
        image = slice(text, length) if joint == "prefix" else slice(0, n_img)
        qi, ki, vi = q[..., image, :], k[..., image, :], v[..., image, :]
        mask = self._mask(layer, qi, ki)
        out_img, lse_img = block_sparse_attention(qi, ki, vi, mask, scale=scale, backend=self.config.backend,
                                                  return_lse=True)
        if not text:
            return out_img.to(q.dtype)
        words = slice(0, text) if joint == "prefix" else slice(n_img, length)
        kt, vt = k[..., words, :], v[..., words, :]
        out_txt_part, lse_txt_part = masked_attention(qi, kt, vt, None, scale)
        out_img, _ = merge_attention_outputs(out_img, lse_img, out_txt_part.to(out_img.dtype), lse_txt_part)
        out_text = F.scaled_dot_product_attention(q[..., words, :], k, v, scale=scale)
        pieces = (out_text, out_img.to(q.dtype)) if joint == "prefix" else (out_img.to(q.dtype), out_text)
        return torch.cat(pieces, dim=-2)
