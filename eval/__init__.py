"""Evaluators: Fréchet distance / FID, KID, fidelity (PSNR/SSIM/LPIPS/CLIP score), VBench-style video metrics and
the eval runner (``diffusion-accel eval``). Heavy pieces (Inception, runner) are imported lazily by their modules."""

from .fidelity import clip_score, lpips, psnr, reward_score, ssim
from .frechet import (
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    frechet_distance_to_statistics,
    trace_sqrt_product,
)
from .kid import kernel_inception_distance, polynomial_mmd2_unbiased
from .video import (
    aggregate,
    background_consistency,
    dynamic_degree,
    motion_smoothness,
    subject_consistency,
    temporal_flickering,
)


def __getattr__(name: str):
    """Lazy exports that pull in the Inception network or accelerate only when used."""
    if name in ("InceptionFeatures", "compute_fid", "reference_statistics", "save_statistics"):
        from . import fid

        return getattr(fid, name)
    if name in ("EvalConfig", "run_eval"):
        from . import runner

        return getattr(runner, name)
    if name in ("FIDInceptionV3", "load_fid_inception"):
        from . import inception

        return getattr(inception, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EvalConfig",
    "FIDInceptionV3",
    "InceptionFeatures",
    "aggregate",
    "background_consistency",
    "clip_score",
    "compute_fid",
    "dynamic_degree",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "frechet_distance_to_statistics",
    "kernel_inception_distance",
    "load_fid_inception",
    "lpips",
    "motion_smoothness",
    "polynomial_mmd2_unbiased",
    "psnr",
    "reference_statistics",
    "reward_score",
    "run_eval",
    "save_statistics",
    "ssim",
    "subject_consistency",
    "temporal_flickering",
    "trace_sqrt_product",
]
