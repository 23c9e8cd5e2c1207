"""Fidelity to a reference image (PSNR, SSIM: pure code) and learned scores from local weights only.

Pinned definitions (documented next to every score):

* **PSNR** on 8-bit RGB: ``10·log10(255² / MSE)`` over all pixels and channels; ``inf`` for identical images.
* **SSIM**: Wang et al. 2004 with a Gaussian window σ = 1.5 truncated at 3.5σ (11x11), K1 = 0.01, K2 = 0.03,
  data range 1 (images scaled to [0, 1]), population covariances, computed per channel and averaged over channels
  and the valid (unpadded) area. This is scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1.0, channel_axis=-1)``; the filtering is SciPy's ``gaussian_filter``.

Inputs: uint8 ``[H, W, 3]`` arrays, float arrays / torch tensors in [0, 1] (HWC or CHW), or batches of them
(``[N, H, W, 3]`` / ``[N, 3, H, W]``); for a batch the score is the mean of the per-image scores.

Learned metrics (:func:`lpips`, :func:`clip_score`, :func:`reward_score`) load weights **only from explicit local
paths** and never download; without a path they return ``{"skipped": "weights not given", ...}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SSIM_DEFINITION = "gaussian sigma=1.5 truncate=3.5, K1=0.01, K2=0.03, data_range=1, per-channel mean"
PSNR_DEFINITION = "10*log10(1/MSE) on [0,1] RGB (= 8-bit peak 255), all pixels and channels"
SKIPPED_NO_WEIGHTS = "skipped: weights not given"


def _to_numpy(image: Any) -> np.ndarray:
    if hasattr(image, "detach"):
        image = image.detach().cpu().float().numpy()
    return np.asarray(image)


def _as_float01(image: Any) -> np.ndarray:
    """uint8 ``[H, W, C]`` (or a torch tensor / float array in [0, 1], HWC or CHW) → float64 ``[H, W, C]`` in [0, 1]."""
    array = _to_numpy(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.moveaxis(array, 0, -1)  # CHW tensors
    if array.ndim == 2:
        array = array[..., None]
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    return np.clip(array.astype(np.float64), 0.0, 1.0)


def _pairs(image: Any, reference: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split batches (4-D) into per-image pairs; single images give one pair."""
    a, b = _to_numpy(image), _to_numpy(reference)
    if a.ndim == 4 or b.ndim == 4:
        if a.ndim != 4 or b.ndim != 4 or a.shape[0] != b.shape[0]:
            raise ValueError(f"batches must have the same shape, got {a.shape} and {b.shape}.")
        return [(_as_float01(x), _as_float01(y)) for x, y in zip(a, b, strict=True)]
    return [(_as_float01(a), _as_float01(b))]


def _psnr_single(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise ValueError(f"psnr needs images of the same shape, got {a.shape} and {b.shape}.")
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def psnr(image: Any, reference: Any) -> float:
    """Peak signal-to-noise ratio in dB (8-bit scale); for batches, the mean of per-image PSNRs."""
    return float(np.mean([_psnr_single(a, b) for a, b in _pairs(image, reference)]))


def latent_psnr(latents: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of latents (any range) against ``reference``, with the reference's value range as the peak.

    ``inf`` when identical, ``nan`` when the shapes differ. Latents have no pixel scale, so :func:`psnr` does not
    apply to them."""
    if latents.shape != reference.shape:
        return math.nan
    ref = reference.float()
    peak = float(ref.max() - ref.min())
    mse = float(((latents.float() - ref) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(peak**2 / mse)


def _ssim_single(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.ndimage import gaussian_filter

    if a.shape != b.shape:
        raise ValueError(f"ssim needs images of the same shape, got {a.shape} and {b.shape}.")
    sigma, truncate = 1.5, 3.5
    radius = int(truncate * sigma + 0.5)
    c1, c2 = 0.01**2, 0.03**2
    scores = []
    for channel in range(a.shape[-1]):
        x, y = a[..., channel], b[..., channel]

        def blur(z: np.ndarray) -> np.ndarray:
            return gaussian_filter(z, sigma=sigma, truncate=truncate, mode="reflect")

        mu_x, mu_y = blur(x), blur(y)
        sxx = blur(x * x) - mu_x**2
        syy = blur(y * y) - mu_y**2
        sxy = blur(x * y) - mu_x * mu_y
        ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
        inner = ssim_map[radius:-radius, radius:-radius] if min(x.shape) > 2 * radius else ssim_map
        scores.append(float(inner.mean()))
    return float(np.mean(scores))


def ssim(image: Any, reference: Any) -> float:
    """Structural similarity (pinned definition above); for batches, the mean of per-image SSIMs."""
    return float(np.mean([_ssim_single(a, b) for a, b in _pairs(image, reference)]))


# ---------------------------------------------------------------------------------------------- LPIPS


def _skipped(metric: str, reason: str = SKIPPED_NO_WEIGHTS) -> dict:
    return {"metric": metric, "value": None, "skipped": reason}


class _AlexNetFeatures(nn.Module):
    """AlexNet conv trunk with torchvision's parameter names (``features.{0,3,6,8,10}``), returning relu1..relu5.

    Written here because torchvision is not usable in this environment; it loads a torchvision-format state dict.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
        )
        self.taps = (1, 4, 7, 9, 11)
        self.channels = (64, 192, 384, 256, 256)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.taps:
                outs.append(x)
        return outs


class LPIPSAlex(nn.Module):
    """LPIPS (Zhang et al. 2018), AlexNet variant, v0.1 heads:

    d(x, y) = Σ_l (1 / H_l W_l) Σ_{h,w} ‖ w_l ⊙ (φ̂_l(x)_{hw} − φ̂_l(y)_{hw}) ‖²,  φ̂ = channel-unit-normalised features,
    inputs in [−1, 1] shifted/scaled by the LPIPS ``ScalingLayer`` constants.
    """

    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def __init__(self) -> None:
        super().__init__()
        self.net = _AlexNetFeatures()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.net.channels)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx = self.net((x - self.shift) / self.scale)
        fy = self.net((y - self.shift) / self.scale)
        total = torch.zeros(x.shape[0])
        for lin, a, b in zip(self.lins, fx, fy, strict=True):
            a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
            b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
            total = total + lin((a - b) ** 2).mean(dim=(1, 2, 3))
        return total


def load_lpips_alex(backbone_path: str | Path, heads_path: str | Path) -> LPIPSAlex:
    """LPIPS-Alex from local files: a torchvision ``alexnet`` state dict (``features.*`` keys; others ignored) and the
    ``lpips`` package's ``weights/v0.1/alex.pth`` heads (``lin{i}.model.1.weight``). Nothing is downloaded."""
    model = LPIPSAlex()
    backbone = torch.load(str(backbone_path), map_location="cpu", weights_only=True)
    model.net.load_state_dict({k: v for k, v in backbone.items() if k.startswith("features.")}, strict=True)
    heads = torch.load(str(heads_path), map_location="cpu", weights_only=True)
    for index, lin in enumerate(model.lins):
        lin.weight.data.copy_(heads[f"lin{index}.model.1.weight"])
    return model.eval().requires_grad_(False)


def _to_nchw_pm1(images: Any) -> torch.Tensor:
    array = _to_numpy(images)
    batch = array if array.ndim == 4 else array[None]
    x = torch.from_numpy(np.stack([_as_float01(im) for im in batch])).permute(0, 3, 1, 2).float()
    return x * 2.0 - 1.0


def lpips(image: Any, reference: Any, backbone_path: str | Path | None = None,
          heads_path: str | Path | None = None, model: LPIPSAlex | None = None) -> dict:
    """Mean LPIPS-Alex over a batch (lower is closer), or a "skipped" record when no local weights are given."""
    if model is None:
        if backbone_path is None or heads_path is None:
            return _skipped("lpips")
        model = load_lpips_alex(backbone_path, heads_path)
    with torch.no_grad():
        values = model(_to_nchw_pm1(image), _to_nchw_pm1(reference))
    return {"metric": "lpips", "value": float(values.mean()), "n": int(values.numel()), "variant": "alex v0.1"}


# ---------------------------------------------------------------------------------------------- CLIP score


def clip_score(images: Sequence[Any], prompts: Sequence[str], model_dir: str | Path | None = None,
               batch_size: int = 16) -> dict:
    """CLIP score (Hessel et al. 2021, torchmetrics convention): 100 · max(cos(E_I(x), E_T(c)), 0), averaged.

    ``model_dir``: a local transformers CLIP directory (model + processor files); loaded with
    ``local_files_only=True``. Without it: a "skipped" record.
    """
    if model_dir is None:
        return _skipped("clip_score")
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts.")
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(str(model_dir), local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(str(model_dir), local_files_only=True)
    scores = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            pil = [im if isinstance(im, Image.Image) else Image.fromarray(
                (np.round(_as_float01(im) * 255)).astype(np.uint8)) for im in images[start:start + batch_size]]
            inputs = processor(text=list(prompts[start:start + batch_size]), images=pil, return_tensors="pt",
                               padding=True, truncation=True)
            image_embeds = F.normalize(model.get_image_features(pixel_values=inputs["pixel_values"]), dim=-1)
            text_embeds = F.normalize(model.get_text_features(input_ids=inputs["input_ids"],
                                                              attention_mask=inputs["attention_mask"]), dim=-1)
            scores.append(100.0 * (image_embeds * text_embeds).sum(-1).clamp(min=0))
    values = torch.cat(scores)
    return {"metric": "clip_score", "value": float(values.mean()), "n": int(values.numel()), "model": str(model_dir)}


# ---------------------------------------------------------------------------------------------- rewards

#: Reward models with a working loader. ImageReward / HPSv2 / PickScore need their own architectures and tokenizers
#: (BLIP + BERT, open_clip ViT-H); they are not implemented, so they are not listed here.
SUPPORTED_REWARDS: tuple[str, ...] = ("callable",)
_NOT_IMPLEMENTED_REWARDS = ("imagereward", "hpsv2", "hpsv2.1", "pickscore")


def reward_score(images: Sequence[Any], prompts: Sequence[str], kind: str = "callable",
                 weights: str | Path | None = None,
                 scorer: Callable[[Sequence[Any], Sequence[str]], Sequence[float]] | None = None) -> dict:
    """Mean human-preference reward of (image, prompt) pairs.

    ``kind="callable"``: ``scorer(images, prompts) -> per-pair scores`` (any locally loaded reward model).
    ``imagereward`` / ``hpsv2`` / ``pickscore`` with a local ``weights`` path: NotImplementedError (no loader yet);
    any kind without weights or scorer: a "skipped" record. Never downloads.
    """
    kind = kind.lower()
    if kind == "callable":
        if scorer is None:
            return _skipped(f"reward:{kind}", "skipped: no scorer given")
        values = np.asarray(scorer(images, prompts), dtype=np.float64)
        return {"metric": "reward", "kind": kind, "value": float(values.mean()), "n": int(values.size)}
    if kind not in _NOT_IMPLEMENTED_REWARDS:
        raise ValueError(f"unknown reward kind {kind!r}; supported: {SUPPORTED_REWARDS}")
    if weights is None:
        return _skipped(f"reward:{kind}")
    raise NotImplementedError(f"{kind} loading from local weights is not implemented; pass kind='callable' with a "
                              "scorer that wraps your locally loaded model.")
