"""Blockwise Flow Matching (BFM): segment-wise velocity networks served through a plain ``FluxPipeline``."""

from .fra import FeatureResidualHook, feature_residual_hook, use_feature_residual
from .transformer import BlockwiseFlowTransformer, segment_boundaries, segment_index

__all__ = ["BlockwiseFlowTransformer", "FeatureResidualHook", "feature_residual_hook", "segment_boundaries",
           "segment_index", "use_feature_residual"]
