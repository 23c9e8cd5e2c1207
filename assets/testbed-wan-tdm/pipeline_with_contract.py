"""Loads the pipeline class that applies this checkpoint's sampler contract (diffusion-accel)."""
from diffusion_accel.pipelines.contract import WanPipelineWithContract  # noqa: F401
