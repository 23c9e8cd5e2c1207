"""Pipelines, adapters and testbeds of diffusion-accel.

Diffusers loads a custom component named in ``model_index.json`` (``["diffusion_accel.pipelines.bfm.transformer",
"BlockwiseFlowTransformer"]``) only when its module is already imported, and every saved pipeline of ours reaches
this package first (its loader file imports ``diffusion_accel.pipelines.contract``), so the component classes are
imported here.
"""

from . import bfm  # noqa: F401  (registers BlockwiseFlowTransformer for DiffusionPipeline.from_pretrained)
