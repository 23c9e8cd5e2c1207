"""``testbed:wan`` on its 64 held-out prompts: adherence (colour, shape, direction, all three), FID-shapes over
frames, and the VBench-style dimensions of :mod:`diffusion_accel.eval.video`, each beside the same number measured on
the real held-out clips (the ceiling a generator of this data can reach) and on those clips passed through the
pipeline's own VAE (the ceiling its decoder allows).

"Frame adherence" is shapes-net's image adherence on every frame against "a <colour> <shape>"; it is well below 1 on
real clips because an object crossing a grid-cell border is often seen in both cells (an extra object for the image
metric). The clip-level colour and shape take the majority over frames and do not have that problem.

Feature extractors for the two consistency dimensions (VBench uses DINO and CLIP, which are not shipped): subject
consistency on shapes-net's 256-d features (they encode the object), background consistency on an 8x8 thumbnail of
the frame centred on mid-grey (dominated by the plain background, so it drops when the background drifts or
flickers). Both are proxies of VBench's numbers; compare them only with the real-clip column.
"""

from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

VBENCH_DIMS = ("subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
               "dynamic_degree")
NUM_REFERENCE_CLIPS = 256


@lru_cache(maxsize=2)
def reference_statistics(count: int = NUM_REFERENCE_CLIPS) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of shapes-net features of every frame of the first ``count`` real validation clips: the
    reference of FID-shapes over frames (the image testbed's cached statistics describe other pictures)."""
    from ...eval.frechet import feature_statistics
    from .shapes_net import features
    from .video_data import SPLIT_VAL, make_clips

    reference, _ = make_clips(SPLIT_VAL, 0, count)
    return feature_statistics(features(_frames(reference)))


def thumbnail_features(frames: np.ndarray) -> np.ndarray:
    """``[T, 192]``: each frame area-averaged to 8x8, minus 128 (so cosine similarity sees colour, not brightness)."""
    x = torch.from_numpy(np.asarray(frames)).permute(0, 3, 1, 2).float()
    return (torch.nn.functional.adaptive_avg_pool2d(x, 8) - 128.0).flatten(1).numpy()


def vbench_per_clip(clips: np.ndarray) -> dict[str, np.ndarray]:
    """Each VBench-style dimension of every clip (``[N]`` per dimension; dynamic degree is 0 or 1 per clip): the one
    place these proxies are computed, for ``testbed eval wan`` and for the bench's video rows alike."""
    from ...eval.video import (
        background_consistency,
        dynamic_degree,
        motion_smoothness,
        subject_consistency,
        temporal_flickering,
    )
    from .shapes_net import features

    per_clip: dict[str, list[float]] = {k: [] for k in VBENCH_DIMS}
    for clip in clips:
        per_clip["subject_consistency"].append(subject_consistency(clip, features))
        per_clip["background_consistency"].append(background_consistency(clip, thumbnail_features))
        per_clip["temporal_flickering"].append(temporal_flickering(clip))
        per_clip["motion_smoothness"].append(motion_smoothness(clip))
        per_clip["dynamic_degree"].append(dynamic_degree(clip))
    return {k: np.asarray(v, dtype=np.float64) for k, v in per_clip.items()}


def vbench_dims(clips: np.ndarray) -> dict[str, float]:
    """Mean over clips of each VBench-style dimension (dynamic degree: the fraction of dynamic clips)."""
    return {k: float(v.mean()) for k, v in vbench_per_clip(clips).items()}


@torch.no_grad()
def generate_clips(pipe, prompts: list[str], seed: int = 0, batch_size: int = 16, **overrides: Any) -> np.ndarray:
    """uint8 clips ``[N, T, H, W, 3]``; prompt ``i`` with generator seed ``seed + i``, the sampler contract's
    settings unless overridden."""
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        frames = pipe(prompt=chunk, generator=gens, output_type="np", **overrides).frames
        out.append(np.clip(np.round(np.asarray(frames) * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


@torch.no_grad()
def reconstruct(vae, clips: np.ndarray, batch: int = 16) -> np.ndarray:
    """The real clips through the pipeline's VAE (posterior mean): the ceiling its decoder puts on any generation,
    which tells whether the VAE or the transformer limits a score."""
    from .train_wan import clips_to_tensor, tensor_to_clips

    out = [tensor_to_clips(vae.decode(vae.encode(clips_to_tensor(clips[i:i + batch]).to(vae.device))
                                      .latent_dist.mode()).sample) for i in range(0, len(clips), batch)]
    return np.concatenate(out)


def _frames(clips: np.ndarray) -> np.ndarray:
    return clips.reshape(-1, *clips.shape[2:])


def evaluate_wan(path: str | Path | None = None, num_prompts: int = 64, seed: int = 0,
                 **overrides: Any) -> dict[str, Any]:
    """Generate the held-out prompts with the shipped (or a given) ``testbed:wan`` and score them against the real
    clips of the same prompts."""
    from ...eval.paired import proportion_ci
    from ...loading import load_pipeline
    from .shapes_net import adherence, fid_shapes
    from .video_data import SPLIT_HELDOUT, heldout_video_prompts, make_clips
    from .video_judge import judge_clips, video_scores
    from .wan import SAMPLER_CONTRACT

    pipe = load_pipeline(str(path) if path is not None else "testbed:wan")
    pipe.set_progress_bar_config(disable=True)
    prompts = list(heldout_video_prompts(max(num_prompts, 1)))[:num_prompts]
    start = time.time()
    generated = generate_clips(pipe, prompts, seed=seed, **overrides)
    seconds = time.time() - start
    real, _ = make_clips(SPLIT_HELDOUT, 0, len(prompts))
    reconstructed = reconstruct(pipe.vae, real)
    stats = reference_statistics(NUM_REFERENCE_CLIPS)
    result: dict[str, Any] = {"name": "wan", "num_prompts": len(prompts),
                              "call_kwargs": {**SAMPLER_CONTRACT, **overrides}, "generation_seconds": seconds}
    for label, clips in (("generated", generated), ("real", real), ("vae_reconstruction", reconstructed)):
        verdicts = judge_clips(clips, prompts)
        scores = video_scores(verdicts)
        frame_prompts = [p for p in prompts for _ in range(clips.shape[1])]
        result[label] = {
            "adherence": scores,
            "adherence_all_ci": proportion_ci(sum(v.all_ok for v in verdicts), len(verdicts)),
            "frame_adherence": float(adherence(list(_frames(clips)), frame_prompts)),
            "fid_shapes_frames": float(fid_shapes(list(_frames(clips)), reference=stats)),
            "vbench": vbench_dims(clips),
        }
        if label == "generated":
            result["failed_prompts"] = [f"{p} -> {v.colour} {v.shape} {v.direction}"
                                        for p, v in zip(prompts, verdicts, strict=True) if not v.all_ok]
    result["vbench_within_10pct_of_real"] = {
        k: abs(result["generated"]["vbench"][k] - result["real"]["vbench"][k]) <= 0.1 * abs(result["real"]["vbench"][k])
        for k in VBENCH_DIMS}
    return result


def format_table(result: dict[str, Any]) -> str:
    """The table that ``diffusion-accel testbed eval wan`` prints: generated clips, the real clips of the same
    prompts (the ceiling) and those real clips through the pipeline's VAE (the decoder's ceiling)."""
    columns = [result[k] for k in ("generated", "real", "vae_reconstruction")]
    rows = [f"{'testbed:wan (' + str(result['num_prompts']) + ' held-out prompts)':<34}{'generated':>11}{'real':>9}"
            f"{'VAE recon':>11}"]

    def row(label: str, values: list[float], fmt: str) -> str:
        return f"{label:<34}" + "".join(f"{v:>{w}{fmt}}" for v, w in zip(values, (11, 9, 11), strict=True))

    for key in ("colour", "shape", "direction", "all"):
        rows.append(row(f"adherence {key}", [c["adherence"][key] for c in columns], ".3f"))
    rows.append(row("frame adherence (shapes-net)", [c["frame_adherence"] for c in columns], ".3f"))
    rows.append(row("FID-shapes over frames", [c["fid_shapes_frames"] for c in columns], ".2f"))
    for key in VBENCH_DIMS:
        rows.append(row(key.replace("_", " "), [c["vbench"][key] for c in columns], ".3f"))
    return "\n".join(rows)
