"""Loads ResShiftPipeline (diffusion-accel) for DiffusionPipeline.from_pretrained."""
from diffusion_accel.pipelines.resshift.pipeline import ResShiftPipeline  # noqa: F401
