"""Convert a denoiser prediction between spaces: noise ε, data x0 and (flow) velocity v = ε − x0.

Used where a method compares predictions (adaptive guidance's cosine γ): noise-space cosines saturate near 1, so the
default comparison space is data (x0). Conventions follow Diffusers' schedulers:

* ε-prediction (DDPM family): ``x_t = √ᾱ x0 + √(1−ᾱ) ε``.
* v-prediction: ``v = √ᾱ ε − √(1−ᾱ) x0``.
* flow matching (rectified flow): ``x_t = (1−σ) x0 + σ ε`` and the model predicts ``v = ε − x0``.

The latent the denoiser receives is used as ``x_t``; schedulers that rescale the model input (Euler ε) make the
data-space estimate approximate, which only matters for where the threshold sits, not for correctness.
"""

from __future__ import annotations

import torch

SPACES = ("x0", "eps", "velocity")


def _alpha_bar(scheduler: object, timestep: float, like: torch.Tensor) -> torch.Tensor:
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod; use space='eps' for this model.")
    index = int(round(min(max(timestep, 0), len(alphas) - 1)))
    return torch.as_tensor(alphas[index], dtype=like.dtype, device=like.device)


def convert_prediction(
    prediction: torch.Tensor,
    sample: torch.Tensor,
    prediction_type: str,
    space: str,
    *,
    scheduler: object,
    timestep: float,
    sigma: float | None,
) -> torch.Tensor:
    """Return ``prediction`` (of type ``prediction_type``) expressed in ``space`` (``x0``, ``eps``, ``velocity``)."""
    if space not in SPACES:
        raise ValueError(f"Unknown prediction space {space!r}; choose one of {SPACES}.")
    pred = prediction.float()
    x = sample.float()
    if prediction_type == "flow":
        s = float(sigma) if sigma is not None else float(timestep) / 1000.0
        x0, eps = x - s * pred, x + (1.0 - s) * pred
    elif prediction_type == "epsilon":
        a = _alpha_bar(scheduler, timestep, x)
        eps = pred
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt().clamp_min(1e-8)
    elif prediction_type == "v_prediction":
        a = _alpha_bar(scheduler, timestep, x)
        x0 = a.sqrt() * x - (1 - a).sqrt() * pred
        eps = (1 - a).sqrt() * x + a.sqrt() * pred
    else:
        raise ValueError(f"Unknown prediction type {prediction_type!r}.")
    if space == "x0":
        return x0
    if space == "eps":
        return eps
    return eps - x0


def per_sample_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """γ_i = cos(a_i, b_i) over all dimensions of each sample i."""
    a = a.flatten(1).double()
    b = b.flatten(1).double()
    return torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)
