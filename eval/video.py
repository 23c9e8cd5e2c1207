"""VBench-style video metrics (Huang et al. 2024, "VBench"), on uint8 frames ``[T, H, W, 3]``.

Which are exact and which are proxies (never call the aggregate "the VBench score"):

* :func:`temporal_flickering` — **exact** VBench formula, (255 − mean_t mean|f_t − f_{t+1}|) / 255. (The official
  protocol first keeps only static videos with a RAFT filter; that filter is not applied here.)
* :func:`dynamic_degree` — **proxy**: VBench's decision rule, with OpenCV DIS optical flow instead of RAFT.
* :func:`motion_smoothness` — **proxy**: VBench's score on odd frames re-synthesised from their even neighbours, with
  a DIS-flow midpoint warp instead of the AMT-S interpolation network.
* :func:`subject_consistency` / :func:`background_consistency` — VBench's formula on the features of any extractor
  the caller gives (VBench uses DINO ViT-B/16 and CLIP ViT-B/32; the numbers match only with those and their
  exact transforms).

:func:`aggregate` min–max normalises and weights the computed dimensions as VBench's ``cal_final_score.py`` does
(Quality/Semantic, Total = (4·Quality + 1·Semantic)/5) and lists the dimensions that were not computed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import cv2
import numpy as np

#: VBench ``scripts/constant.py``: per-dimension min–max normalisation ranges and weights.
NORMALIZE_RANGE: dict[str, tuple[float, float]] = {
    "subject consistency": (0.1462, 1.0), "background consistency": (0.2615, 1.0),
    "temporal flickering": (0.6293, 1.0), "motion smoothness": (0.706, 0.9975), "dynamic degree": (0.0, 1.0),
    "aesthetic quality": (0.0, 1.0), "imaging quality": (0.0, 1.0), "object class": (0.0, 1.0),
    "multiple objects": (0.0, 1.0), "human action": (0.0, 1.0), "color": (0.0, 1.0),
    "spatial relationship": (0.0, 1.0), "scene": (0.0, 0.8222), "appearance style": (0.0009, 0.2855),
    "temporal style": (0.0, 0.364), "overall consistency": (0.0, 0.364),
}
QUALITY_DIMENSIONS = ("subject consistency", "background consistency", "temporal flickering", "motion smoothness",
                      "aesthetic quality", "imaging quality", "dynamic degree")
SEMANTIC_DIMENSIONS = ("object class", "multiple objects", "human action", "color", "spatial relationship", "scene",
                       "appearance style", "temporal style", "overall consistency")
DIMENSION_WEIGHT = {name: (0.5 if name == "dynamic degree" else 1.0) for name in NORMALIZE_RANGE}
QUALITY_WEIGHT, SEMANTIC_WEIGHT = 4.0, 1.0
PROXY_DIMENSIONS = ("dynamic degree", "motion smoothness")


def _frames(frames: Any, minimum: int = 2) -> np.ndarray:
    array = np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"frames must be a uint8 array [T, H, W, 3], got {array.dtype} {array.shape}.")
    if array.shape[0] < minimum:
        raise ValueError(f"need at least {minimum} frames, got {array.shape[0]}.")
    return array


def temporal_flickering(frames: Any) -> float:
    """VBench temporal flickering: (255 − mean over consecutive pairs of mean|f_t − f_{t+1}|) / 255 ∈ [0, 1]."""
    x = _frames(frames).astype(np.int16)
    per_pair = np.abs(np.diff(x, axis=0)).reshape(x.shape[0] - 1, -1).mean(axis=1)
    return float((255.0 - per_pair.mean()) / 255.0)


def _gray(frame: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)


def dis_flow(frame_a: np.ndarray, frame_b: np.ndarray) -> np.ndarray:
    """Dense optical flow a → b (``[H, W, 2]`` float32, pixels) with OpenCV DIS, medium preset."""
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    return dis.calc(_gray(frame_a), _gray(frame_b), None)


def _top5_magnitude(flow: np.ndarray) -> float:
    """VBench's per-pair motion: mean of the largest 5% flow magnitudes."""
    magnitude = np.sqrt((flow.astype(np.float64) ** 2).sum(-1)).ravel()
    cut = max(1, int(magnitude.size * 0.05))
    return float(np.sort(magnitude)[-cut:].mean())


def dynamic_degree(frames: Any, fps: float | None = None) -> float:
    """**Proxy** of VBench dynamic degree (DIS flow instead of RAFT): 1.0 if the clip is "dynamic", else 0.0.

    VBench rule: frames subsampled to about 8 fps (when ``fps`` is given); per consecutive pair the mean of the top-5%
    flow magnitudes; the clip is dynamic if at least round(4·T/16) pairs exceed 6·min(H, W)/256 pixels.
    The benchmark score is the fraction of dynamic clips: average this over clips.
    """
    x = _frames(frames)
    if fps is not None and fps > 8:
        x = x[:: max(1, round(fps / 8.0))]
    if x.shape[0] < 2:
        return 0.0
    threshold = 6.0 * min(x.shape[1:3]) / 256.0
    needed = round(4 * x.shape[0] / 16.0)
    moving = sum(_top5_magnitude(dis_flow(a, b)) > threshold for a, b in zip(x[:-1], x[1:], strict=True))
    return float(moving >= max(needed, 1))


def _warp(frame: np.ndarray, flow: np.ndarray, fraction: float) -> np.ndarray:
    """Backward warp: out(p) = frame(p + fraction · flow(p)), bilinear, border replicate."""
    h, w = flow.shape[:2]
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    map_x = grid_x + fraction * flow[..., 0]
    map_y = grid_y + fraction * flow[..., 1]
    return cv2.remap(frame, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def interpolate_midpoint(frame_a: np.ndarray, frame_b: np.ndarray) -> np.ndarray:
    """Flow-based middle frame: average of a warped half-way along flow(mid→a) ≈ −½·flow(a→b) and b warped
    half-way along flow(mid→b) ≈ −½·flow(b→a) (linear-motion assumption, flows sampled at the target pixel)."""
    forward, backward = dis_flow(frame_a, frame_b), dis_flow(frame_b, frame_a)
    from_a = _warp(frame_a.astype(np.float32), forward, -0.5)
    from_b = _warp(frame_b.astype(np.float32), backward, -0.5)
    return (from_a + from_b) / 2.0


def motion_smoothness(frames: Any) -> float:
    """**Proxy** of VBench motion smoothness: every odd frame t is re-synthesised from frames t−1 and t+1 by
    :func:`interpolate_midpoint` (VBench uses AMT-S) and scored (255 − mean|f_t − f̂_t|)/255, averaged over t.
    ≈ 1 for linear motion; lower for jitter, shuffled or duplicated frames."""
    x = _frames(frames, minimum=3)
    errors = [np.abs(x[t].astype(np.float32) - interpolate_midpoint(x[t - 1], x[t + 1])).mean()
              for t in range(1, x.shape[0] - 1, 2)]
    return float((255.0 - np.mean(errors)) / 255.0)


def _consistency(features: Any) -> float:
    """VBench: mean over t ≥ 1 of ½[max(0, cos(f_t, f_{t−1})) + max(0, cos(f_t, f_0))] on L2-normalised features."""
    if hasattr(features, "detach"):
        features = features.detach().cpu().double().numpy()
    f = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    if f.shape[0] < 2:
        raise ValueError("consistency needs features of at least 2 frames.")
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    to_previous = np.clip((f[1:] * f[:-1]).sum(1), 0, None)
    to_first = np.clip(f[1:] @ f[0], 0, None)
    return float(((to_previous + to_first) / 2.0).mean())


def subject_consistency(frames: Any, feature_fn: Callable[[np.ndarray], Any]) -> float:
    """VBench subject consistency on ``feature_fn(frames) → [T, D]`` (VBench: DINO ViT-B/16 CLS features)."""
    return _consistency(feature_fn(_frames(frames)))


def background_consistency(frames: Any, feature_fn: Callable[[np.ndarray], Any]) -> float:
    """VBench background consistency on ``feature_fn(frames) → [T, D]`` (VBench: CLIP ViT-B/32 image features)."""
    return _consistency(feature_fn(_frames(frames)))


def _canonical(name: str) -> str:
    return name.replace("_", " ").strip().lower()


def aggregate(scores: Mapping[str, float]) -> dict:
    """VBench-style aggregate of the dimensions present in ``scores`` (keys like ``"temporal_flickering"``).

    Each value v is normalised (v − min)/(max − min) with VBench's ranges; Quality = weighted mean over the quality
    dimensions computed (dynamic degree weight ½), Semantic = mean over the semantic ones computed, and
    Total = (4·Quality + 1·Semantic)/5 (or whichever of the two exists). Dimensions not computed are listed in
    ``"missing"`` and proxies in ``"proxies"``; with missing dimensions the totals are *not* comparable to VBench.
    """
    normalised = {}
    for key, value in scores.items():
        name = _canonical(key)
        if name not in NORMALIZE_RANGE:
            raise ValueError(f"unknown VBench dimension {key!r}.")
        low, high = NORMALIZE_RANGE[name]
        normalised[name] = (float(value) - low) / (high - low)

    def weighted(names: tuple[str, ...]) -> float | None:
        present = [n for n in names if n in normalised]
        if not present:
            return None
        return sum(normalised[n] * DIMENSION_WEIGHT[n] for n in present) / sum(DIMENSION_WEIGHT[n] for n in present)

    quality, semantic = weighted(QUALITY_DIMENSIONS), weighted(SEMANTIC_DIMENSIONS)
    if quality is not None and semantic is not None:
        total = (QUALITY_WEIGHT * quality + SEMANTIC_WEIGHT * semantic) / (QUALITY_WEIGHT + SEMANTIC_WEIGHT)
    else:
        total = quality if quality is not None else semantic
    return {
        "label": "VBench-style (proxy; not the official VBench score)",
        "quality": quality, "semantic": semantic, "total": total,
        "normalized": normalised,
        "computed": sorted(normalised),
        "missing": [n for n in (*QUALITY_DIMENSIONS, *SEMANTIC_DIMENSIONS) if n not in normalised],
        "proxies": [n for n in PROXY_DIMENSIONS if n in normalised],
    }
