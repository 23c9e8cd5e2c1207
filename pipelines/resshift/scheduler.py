"""``ResShiftScheduler``: the residual-shifting Markov chain of ResShift (Yue et al., NeurIPS 2023, arXiv 2307.12348;
journal version arXiv 2403.07319), as a Diffusers scheduler.

Home: ``diffusion_accel.pipelines.resshift.scheduler`` (folder ``pipelines/resshift/``), next to the pipeline that
uses it. Symbols (paper → here; the code's 0-based step index ``t_idx = t − 1`` is Diffusers' ``timestep``):

* x0 (HR latent) = ``original_samples`` / ``pred_original_sample``; y0 (latent of the bicubic-upsampled LR image)
  = ``low_res_latents``; e0 = y0 − x0 is the residual the chain shifts.
* η_t = ``etas[t_idx]`` (η_0 = 0), α_t = η_t − η_{t−1} = ``alphas``, κ = ``kappa``, p = ``power``,
  T = ``num_train_timesteps``.
* Forward marginal  q(x_t | x0, y0) = N(x0 + η_t e0, κ² η_t I)                         (:meth:`add_noise`)
* Posterior         q(x_{t−1} | x_t, x0) = N((η_{t−1}/η_t) x_t + (α_t/η_t) x0, κ² α_t η_{t−1}/η_t I)  (:meth:`step`)
* Prior             x_T = y0 + κ √η_T ε                                                   (:meth:`prior_sample`)

The η schedule is the released code's ``get_named_eta_schedule("exponential")`` (zsyOAOA/ResShift @ 3ce1d81), which
the checkpoints were trained with: √η_1 = min(min_noise_level/κ, min_noise_level), √η_T = ``etas_end`` (0.99, so
η_T = 0.9801; the paper's text writes η_T = 0.99), and √η_t = √η_1 · b0^{β_t} with
β_t = ((t−1)/(T−1))^p · (T−1), b0 = exp(log(√η_T/√η_1)/(T−1)). κ = 2 gives the paper's η_1 = min((0.04/κ)², 0.001)
for the conference setting (``min_noise_level`` 0.04, T = 15) and η_1 = 0.01 for the journal one (0.2, T = 4).

The network is trained on exactly these T steps (no respacing, as the released models): ``set_timesteps`` accepts
``num_inference_steps == T`` only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

PREDICTION_TYPES = ("sample", "residual", "epsilon")


@dataclass
class ResShiftSchedulerOutput(BaseOutput):
    """``prev_sample`` = x_{t−1}; ``pred_original_sample`` = the predicted x0."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def exponential_sqrt_etas(num_train_timesteps: int, min_noise_level: float, etas_end: float, kappa: float,
                          power: float) -> np.ndarray:
    """√η_t for t = 1..T (float64), the released code's exponential schedule (module docstring)."""
    T = num_train_timesteps
    sqrt_eta_1 = min(min_noise_level / kappa, min_noise_level)
    if T == 1:
        return np.array([etas_end], dtype=np.float64)
    increaser = np.exp(np.log(etas_end / sqrt_eta_1) / (T - 1))
    beta = np.linspace(0.0, 1.0, T) ** power * (T - 1)
    return sqrt_eta_1 * increaser**beta


class ResShiftScheduler(SchedulerMixin, ConfigMixin):
    """Residual-shifting scheduler (ResShift). Config (paper symbol → parameter):

    * T → ``num_train_timesteps`` (15 in the conference paper, 4 in the journal one);
    * κ → ``kappa`` (2.0 in every released config): the noise scale, x_T ≈ y0 + κ ε;
    * p → ``power`` (0.3): how fast η grows; √η_1 → from ``min_noise_level``; √η_T → ``etas_end`` (0.99);
    * ``prediction_type``: what the network outputs: ``"sample"`` (x0, the paper's), ``"residual"`` (e0 = y0 − x0)
      or ``"epsilon"`` (the noise ε of the forward marginal);
    * ``normalize_input``: :meth:`scale_model_input` divides x_t by √(κ²η_t + 1) (latent data of variance ≈ 1).
    """

    order = 1
    _compatibles: list = []

    @register_to_config
    def __init__(self, num_train_timesteps: int = 4, kappa: float = 2.0, power: float = 0.3,
                 min_noise_level: float = 0.2, etas_end: float = 0.99, prediction_type: str = "sample",
                 normalize_input: bool = True):
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps (T) must be >= 1, got {num_train_timesteps}.")
        if kappa <= 0:
            raise ValueError(f"kappa (κ) must be > 0, got {kappa}.")
        if not 0 < min_noise_level < etas_end <= 1:
            raise ValueError(f"need 0 < min_noise_level < etas_end <= 1, got {min_noise_level} and {etas_end}.")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}.")
        sqrt_etas = exponential_sqrt_etas(num_train_timesteps, min_noise_level, etas_end, kappa, power)
        etas = sqrt_etas**2
        etas_prev = np.append(0.0, etas[:-1])  # η_0 = 0
        alphas = etas - etas_prev
        # Computed in float64 (as the released code) and stored as float32 tensors.
        self.sqrt_etas = torch.from_numpy(sqrt_etas).float()
        self.etas = torch.from_numpy(etas).float()
        self.alphas = torch.from_numpy(alphas).float()
        self.posterior_variance = torch.from_numpy(kappa**2 * etas_prev / etas * alphas).float()
        self.posterior_mean_coef1 = torch.from_numpy(etas_prev / etas).float()
        self.posterior_mean_coef2 = torch.from_numpy(alphas / etas).float()
        self.init_noise_sigma = float(kappa * sqrt_etas[-1])  # std of the prior around y0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.long)

    # -- the sampling grid ------------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None) -> None:
        """The reverse chain t_idx = T−1 … 0. ResShift samples the chain it was trained on, so
        ``num_inference_steps`` must equal T (``None`` means T)."""
        T = self.config.num_train_timesteps
        steps = T if num_inference_steps is None else int(num_inference_steps)
        if steps != T:
            raise ValueError(
                f"this ResShift scheduler has T={T} steps and samples exactly that chain (the network was trained on "
                f"its T noise levels; there is no respacing): pass num_inference_steps={T}, or train a model with "
                f"--num_train_timesteps {steps} (the conference schedule is T=15, min_noise_level=0.04).")
        self.num_inference_steps = steps
        self.timesteps = torch.arange(T - 1, -1, -1, dtype=torch.long, device=device)

    # -- helpers ---------------------------------------------------------------------------------------------
    @staticmethod
    def _gather(values: torch.Tensor, timesteps: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(timesteps, device=values.device).long().reshape(-1)
        if (t < 0).any() or (t >= len(values)).any():
            raise ValueError(f"timestep indices must be in [0, {len(values) - 1}], got {t.tolist()}.")
        out = values[t].to(device=like.device, dtype=like.dtype)
        return out.view(-1, *([1] * (like.ndim - 1)))

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor | int | None = None) -> torch.Tensor:
        """x̃_t = x_t / √(κ² η_t + 1): the network's input at unit variance (``normalize_input``)."""
        if not self.config.normalize_input:
            return sample
        if timestep is None:
            raise ValueError("scale_model_input needs the timestep index t_idx (its η_t sets the scale).")
        eta = self._gather(self.etas, timestep, sample)
        return sample / torch.sqrt(self.config.kappa**2 * eta + 1.0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                  low_res_latents: torch.Tensor) -> torch.Tensor:
        """A draw of q(x_t | x0, y0): x_t = x0 + η_t (y0 − x0) + κ √η_t ε (``timesteps`` are 0-based indices)."""
        eta = self._gather(self.etas, timesteps, original_samples)
        sqrt_eta = self._gather(self.sqrt_etas, timesteps, original_samples)
        return original_samples + eta * (low_res_latents - original_samples) + self.config.kappa * sqrt_eta * noise

    def prior_sample(self, low_res_latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_T = y0 + κ √η_T ε: the start of the reverse chain, centred on the LR latent (not pure noise)."""
        return low_res_latents + self.init_noise_sigma * noise

    def predicted_x0(self, model_output: torch.Tensor, timestep: torch.Tensor | int, sample: torch.Tensor,
                     low_res_latents: torch.Tensor | None) -> torch.Tensor:
        """x0 from the network's output under ``prediction_type``."""
        kind = self.config.prediction_type
        if kind == "sample":
            return model_output
        if low_res_latents is None:
            raise ValueError(f"prediction_type {kind!r} needs low_res_latents (y0) to recover x0.")
        if kind == "residual":
            return low_res_latents - model_output
        eta = self._gather(self.etas, timestep, sample)
        sqrt_eta = self._gather(self.sqrt_etas, timestep, sample)
        return (sample - eta * low_res_latents - self.config.kappa * sqrt_eta * model_output) / (1.0 - eta)

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor | int, sample: torch.Tensor,
             low_res_latents: torch.Tensor | None = None, generator: torch.Generator | None = None,
             noise: torch.Tensor | None = None, return_dict: bool = True) -> ResShiftSchedulerOutput | tuple:
        """One reverse step: a draw of the exact posterior q(x_{t−1} | x_t, x̂0) with x̂0 from ``model_output``.
        At t_idx = 0 (η_0 = 0) the mean is x̂0 and the variance 0, so the chain ends exactly on the prediction."""
        x0 = self.predicted_x0(model_output, timestep, sample, low_res_latents)
        coef1 = self._gather(self.posterior_mean_coef1, timestep, sample)
        coef2 = self._gather(self.posterior_mean_coef2, timestep, sample)
        variance = self._gather(self.posterior_variance, timestep, sample)
        mean = coef1 * sample + coef2 * x0
        if bool((variance > 0).any()):
            if noise is None:
                noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev = mean + torch.sqrt(variance) * noise
        else:
            prev = mean
        if not return_dict:
            return prev, x0
        return ResShiftSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
