"""ResShift super-resolution (residual shifting, arXiv 2307.12348 / 2403.07319): :class:`ResShiftScheduler`,
:class:`ResShiftPipeline`, the shared denoiser builder, the degradations and the latent-space helpers. The
trainer recipe is :mod:`diffusion_accel.train.resshift`; the benchmark
:mod:`diffusion_accel.benchmarks.super_resolution`."""

from .denoiser import build_denoiser
from .pipeline import ResShiftPipeline, ResShiftPipelineOutput, is_own_resshift_folder
from .scheduler import ResShiftScheduler, ResShiftSchedulerOutput

__all__ = ["ResShiftPipeline", "ResShiftPipelineOutput", "ResShiftScheduler", "ResShiftSchedulerOutput",
           "build_denoiser", "is_own_resshift_folder"]
