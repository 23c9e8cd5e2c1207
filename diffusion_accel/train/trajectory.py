"""The noise process a few-step student walks, in one notation for DDPM ε-prediction and rectified flow.

    x_t = α_t x0 + σ_t ε        ε-prediction (DDPM): α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t), t an integer timestep
                                 rectified flow:      α = 1 − σ, model time t = 1000 σ

The student's K-step trajectory is a :class:`Grid` of K + 1 points, read from the scheduler it ships with (so the
trained and the sampled timesteps are the same numbers): point K is the pure-noise start, point 0 the clean end
(α = 1, σ = 0). One student step from point k is the deterministic first-order update

    (x̂0, ε̂) = split(G(x_k, t_k));   x_{k−1} = α_{k−1} x̂0 + σ_{k−1} ε̂           (DDIM; Euler for flow)

and TDM re-noises the step's end point into the interval it covers with the forward transition
q(x_t | x_mid), t > mid:  x_t = (α_t/α_mid) x_mid + β ξ,  β² = σ_t² − (α_t σ_mid / α_mid)².
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Model times (0..1000 scale) kept clear of an interval's ends when TDM samples its noise level: t ≥ 20 avoids the
#: near-clean levels where x0-matching is ill-conditioned, t ≤ t_k − 10 keeps the level below the student's own
#: input (the anchor's ``max(20, t_mid) ≤ t < t_k − 10``).
TIME_FLOOR = 20.0
TIME_MARGIN = 10.0


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


@dataclass
class Grid:
    """The student's trajectory: ``[K + 1]`` tensors, index 0 the clean end, index K the noise start."""

    model_time: torch.Tensor  # what the denoiser receives (float; DDPM timesteps are whole numbers)
    alpha: torch.Tensor
    sigma: torch.Tensor

    @property
    def steps(self) -> int:
        return len(self.model_time) - 1

    def timesteps(self) -> list[float]:
        """The K timesteps the student is called at, noisiest first (as its scheduler lists them)."""
        return [float(t) for t in self.model_time.flip(0)[:-1]]


class NoiseProcess:
    """Base class: α/σ at model times, the split of a prediction into (x̂0, ε̂), the TDM transition."""

    prediction = ""

    def at(self, model_time: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(α_t, σ_t)`` at model times ``t`` (``[B]``)."""
        raise NotImplementedError

    def split(self, x: torch.Tensor, out: torch.Tensor, alpha: torch.Tensor,
              sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x̂0, ε̂)`` from the denoiser output at ``x`` (per-sample α, σ ``[B]``)."""
        raise NotImplementedError

    def grid(self, timesteps: torch.Tensor, sigmas: torch.Tensor | None) -> Grid:
        """The :class:`Grid` of a scheduler's timesteps (noisiest first) and, for flow, its sigmas."""
        raise NotImplementedError

    def round_time(self, t: torch.Tensor) -> torch.Tensor:
        return t

    # -- TDM -----------------------------------------------------------------------------------------------------
    def interval_time(self, grid: Grid, k: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """A model time in the interval of student step k (between grid points k − 1 and k), at quantile ``u``."""
        low = torch.clamp(grid.model_time[k - 1], min=TIME_FLOOR)
        high = grid.model_time[k] - TIME_MARGIN
        return self.round_time(low + u.to(low.dtype) * (high - low))

    @staticmethod
    def transition(x_mid: torch.Tensor, alpha_mid, sigma_mid, alpha_t, sigma_t,
                   xi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t, β)``: a draw of q(x_t | x_mid) for the later (noisier) time t, with standard noise ξ."""
        ratio = alpha_t / alpha_mid
        beta = (sigma_t**2 - (ratio * sigma_mid) ** 2).clamp_min(0.0).sqrt()
        return _view(ratio, x_mid) * x_mid + _view(beta, xi) * xi, beta

    @staticmethod
    def snr(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return alpha**2 / sigma.clamp_min(1e-12) ** 2


class EpsilonProcess(NoiseProcess):
    """DDPM ε-prediction; the clean end of the grid is timestep −1 (α = 1, σ = 0), as DDIM's ``set_alpha_to_one``."""

    prediction = "epsilon"

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.ab = alphas_cumprod.double()

    def at(self, model_time):
        t = model_time.round().long()
        ab = torch.where(t >= 0, self.ab.to(t.device)[t.clamp_min(0)], torch.ones((), dtype=torch.float64,
                                                                               device=t.device))
        return ab.sqrt().float(), (1.0 - ab).clamp_min(0).sqrt().float()

    def split(self, x, out, alpha, sigma):
        return (x - _view(sigma, x) * out) / _view(alpha, x), out

    def grid(self, timesteps, sigmas):
        times = torch.cat([torch.tensor([-1.0]), timesteps.double().flip(0)]).float()
        alpha, sigma = self.at(times)
        return Grid(times, alpha, sigma)

    def round_time(self, t):
        return t.round()


class FlowProcess(NoiseProcess):
    """Rectified flow, v = ε − x0: x̂0 = x − σ v, ε̂ = x + α v."""

    prediction = "flow"

    def at(self, model_time):
        sigma = model_time.float() / 1000.0
        return 1.0 - sigma, sigma

    def split(self, x, out, alpha, sigma):
        return x - _view(sigma, x) * out, x + _view(alpha, x) * out

    def grid(self, timesteps, sigmas):
        if sigmas is None:
            raise ValueError("a flow grid needs the scheduler's sigmas")
        sigma = torch.cat([torch.zeros(1), sigmas.float().flip(0)])
        times = torch.cat([torch.zeros(1), timesteps.float().flip(0)])
        return Grid(times, 1.0 - sigma, sigma)


def noise_process(prediction: str, alphas_cumprod: torch.Tensor | None = None) -> NoiseProcess:
    if prediction == "epsilon":
        if alphas_cumprod is None:
            raise ValueError("an ε-prediction process needs the teacher's ᾱ_t")
        return EpsilonProcess(alphas_cumprod)
    if prediction == "flow":
        return FlowProcess()
    raise ValueError(f"no noise process for prediction type {prediction!r}")
