"""Offline tiny pipelines for tests: ``FAMILIES`` and ``tiny_pipeline(family, seed=0)``.

Each builds the family's real Diffusers pipeline class with tiny random components and tokenizers made in code.
"""

from .pipelines.tiny import FAMILIES, tiny_call_kwargs, tiny_pipeline

__all__ = ["FAMILIES", "tiny_call_kwargs", "tiny_pipeline"]
