"""Context parallelism (Diffusers' ``enable_parallelism(config=ContextParallelConfig(...))``) and our methods.

Under context parallelism every rank holds a slice of the token sequence inside the transformer; the denoiser's
inputs and (gathered) output are the same on every rank. A method that decides to skip work must decide the same on
every rank, or the ranks run different collectives and deadlock (or silently diverge):

* decisions from the step schedule (Δ-cache, CFG cut-off, PAB, FasterCache, TaylorSeer, MagCache's calibrated
  ratios) or from the denoiser's inputs/outputs (adaptive guidance, linear AG) are the same on every rank;
* decisions from block activations (FBCache's and DBCache's residual thresholds) are taken on each rank's slice and
  can differ: refused, with the reason;
* methods that replace the attention processors (sparse attention) would bypass the context-parallel attention;
  methods that change the token count mid-call (bottleneck) are not verified with sharded sequences: refused.

Diffusers 0.42.1 cannot enable context parallelism without an accelerator (``_resolve_parallel_config`` takes the
rank modulo ``torch.accelerator.device_count()``, which is 0 on a CPU-only host), so this is checked on CPU with the
model's recorded ``_parallel_config`` and exercised end to end only on GPUs.
"""

from __future__ import annotations

from typing import Any

from .diffusers_internals import parallel_config

#: Methods refused under context parallelism, and why.
NOT_RANK_CONSISTENT: dict[str, str] = {
    "fbcache": "it compares the first block's residual with a threshold on each rank's slice of the tokens, so "
               "ranks can decide differently and deadlock",
    "dbcache": "its residual-difference threshold is evaluated on each rank's slice of the tokens, so ranks can "
               "decide differently and deadlock",
    "sparse_attention": "it replaces the attention processors, bypassing Diffusers' context-parallel attention",
    "bottleneck": "it changes the token count within a call, which is not verified with sharded sequences",
}


def context_parallel_degree(denoiser: Any) -> int:
    """The number of ranks the denoiser's sequence is split over (1 without context parallelism)."""
    config = parallel_config(denoiser)
    cp = getattr(config, "context_parallel_config", None)
    if cp is None:
        return 1
    return max(int(getattr(cp, "ring_degree", 1) or 1) * int(getattr(cp, "ulysses_degree", 1) or 1), 1)


def check_context_parallel(denoiser: Any, method_names: list[str]) -> None:
    """Raise if a method cannot keep its decisions the same on every rank of the denoiser's context parallelism."""
    degree = context_parallel_degree(denoiser)
    if degree <= 1:
        return
    refused = [(name, NOT_RANK_CONSISTENT[name]) for name in method_names if name in NOT_RANK_CONSISTENT]
    if refused:
        reasons = "; ".join(f"{name}: {why}" for name, why in refused)
        raise ValueError(
            f"Context parallelism over {degree} ranks is enabled on this model and {reasons}. Use a method whose "
            "decisions are the same on every rank (delta_cache, cfg_cutoff, adaptive_guidance, linear_ag, pab, "
            "taylorseer, fastercache, magcache), or disable context parallelism."
        )
