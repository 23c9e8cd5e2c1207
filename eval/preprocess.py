"""Named FID preprocessing modes: uint8 RGB image → float ``[3, 299, 299]`` network input.

The four public FID libraries use the same Inception weights but differ here, by several FID points (Parmar et al.,
"On Aliased Resizing and Surprising Subtleties in GAN Evaluation", CVPR 2022), so the mode is always recorded next to
a score.

========================  ======================================================  ===========================
mode                      resize to 299×299                                       scaling into the network
========================  ======================================================  ===========================
``clean`` (default)       PIL bicubic per channel on float32 (``mode="F"``),      (v − 128) / 128
                          clipped to [0, 255], not re-quantised (clean-fid)
``tf1``                   TF1 legacy bilinear, source index ``i·in/out``,         (v − 128) / 128
                          border clamp, no antialias (torch-fidelity; NVIDIA /
                          clean-fid ``legacy_tensorflow``)
``pytorch-fid``           ``F.interpolate(bilinear, align_corners=False)``,       (v − 127.5) / 127.5
                          no antialias
``torchmetrics-aa``       ``F.interpolate(bilinear, antialias=True)``             (v − 128) / 128
                          (torchmetrics ≥ 1.8 default)
========================  ======================================================  ===========================

Float images must be quantised with ``round`` (as Diffusers' ``numpy_to_pil`` does) before they get here; use
:func:`to_uint8`. We implement the resizes ourselves (PIL and torch already do the kernels) because the libraries
that bundle them need torchvision, which is broken in this environment.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MODES = ("clean", "tf1", "pytorch-fid", "torchmetrics-aa")
DEFAULT_MODE = "clean"
SIZE = 299


def to_uint8(image: Any) -> np.ndarray:
    """``[H, W, 3]`` uint8 from a PIL image, a uint8 array, or a float array/tensor in [0, 1] (HWC or CHW),
    rounding (not truncating) floats."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {array.shape}.")
    if array.dtype == np.uint8:
        return array
    return np.clip(np.round(array.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)


def _tf1_axis_weights(size_in: int, size_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TF1 ``resize_bilinear(align_corners=False)`` (legacy, no half-pixel centres): source = i · in/out."""
    src = torch.arange(size_out, dtype=torch.float64) * (size_in / size_out)
    low = src.floor().long().clamp(max=size_in - 1)
    high = (low + 1).clamp(max=size_in - 1)
    return low, high, (src - low).to(torch.float32)


def resize_tf1_bilinear(x: torch.Tensor, size: int | tuple[int, int] = SIZE) -> torch.Tensor:
    """TF1 legacy bilinear resize of float ``[N, C, H, W]`` to ``size`` (int or (h, w)); rows, then columns."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    low, high, frac = _tf1_axis_weights(x.shape[-2], out_h)
    x = x[..., low, :] + (x[..., high, :] - x[..., low, :]) * frac[:, None]
    low, high, frac = _tf1_axis_weights(x.shape[-1], out_w)
    return x[..., low] + (x[..., high] - x[..., low]) * frac


def resize_clean(image: np.ndarray, size: int = SIZE) -> np.ndarray:
    """clean-fid's resize: each channel as a 32-bit float PIL image, bicubic, clipped to [0, 255] → ``[size, size, 3]``
    float32 (not re-quantised)."""
    channels = [
        np.asarray(Image.fromarray(image[..., c].astype(np.float32), mode="F").resize((size, size), Image.BICUBIC))
        for c in range(image.shape[-1])
    ]
    return np.clip(np.stack(channels, axis=-1), 0.0, 255.0)


def preprocess(image: Any, mode: str = DEFAULT_MODE) -> torch.Tensor:
    """One image → float32 ``[3, 299, 299]`` network input under the named ``mode`` (see module table)."""
    if mode not in MODES:
        raise ValueError(f"unknown FID preprocessing mode {mode!r}; choose one of {MODES}.")
    array = to_uint8(image)
    if mode == "clean":
        resized = resize_clean(array)
        return torch.from_numpy((resized - 128.0) / 128.0).float().permute(2, 0, 1).contiguous()
    x = torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float()  # [1, 3, H, W] in [0, 255]
    same = x.shape[-2:] == (SIZE, SIZE)
    if mode == "tf1":
        x = x if same else resize_tf1_bilinear(x)
        return ((x - 128.0) / 128.0)[0]
    if mode == "pytorch-fid":
        x = x / 255.0
        x = x if same else F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        return (2.0 * x - 1.0)[0]
    x = x if same else F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
    return ((x - 128.0) / 128.0)[0]
