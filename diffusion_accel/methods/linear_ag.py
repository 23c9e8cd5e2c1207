"""LinearAG (Castillo et al., arXiv 2312.12487): replace unconditional evaluations by affine combinations of
past estimates.

At a "linear" step k the unconditional prediction is estimated, per sample, as

    ε̂_u(k) = a_k · ε_c(k) + b_k · ε_u(k−1) + d_k · ε_c(k−1)

with per-step scalar coefficients (a_k, b_k, d_k) fitted by ridge least squares on full-CFG trajectories of a
calibration prompt set (pooled over samples and elements). The default schedule follows the paper's finding:
in the first half (k < ``split``·T) true CFG on even steps and the linear estimate on odd steps; from ``split``
on, conditional-only (as adaptive guidance after its switch). Coefficients are saved as safetensors (+ JSON
metadata) and loaded by path or by name from the coefficient folders.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..config import MethodConfig, register_method
from ..method import Method
from .adaptive_guidance import GuidanceMethodBase, guidance_not_applicable_reason

if TYPE_CHECKING:
    from ..pipelines.adapters import ModelAdapter
    from ..session import AccelSession

#: Regressors of the affine model, in coefficient order.
REGRESSORS = ("cond_k", "uncond_prev", "cond_prev")


def coefficient_dirs() -> list[Path]:
    """Where named coefficient files are looked up: $DIFFUSION_ACCEL_LINEAR_AG, the user cache, shipped assets."""
    dirs = []
    if os.environ.get("DIFFUSION_ACCEL_LINEAR_AG"):
        dirs.append(Path(os.environ["DIFFUSION_ACCEL_LINEAR_AG"]))
    dirs.append(Path.home() / ".cache" / "diffusion_accel" / "linear_ag")
    dirs.append(Path(__file__).resolve().parents[2] / "assets" / "linear_ag")
    return dirs


def resolve_coefficients(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    if path.is_file():
        return path
    for folder in coefficient_dirs():
        candidate = folder / path.name
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(d) for d in coefficient_dirs())
    raise ValueError(f"LinearAG coefficients {name_or_path!r} not found (searched {searched}). Fit them with "
                     "`diffusion-accel calibrate linear_ag --pipeline P --out NAME`.")


def save_coefficients(path: str | Path, coefficients: torch.Tensor, metadata: dict[str, Any]) -> Path:
    """Write ``[T, 3]`` coefficients as safetensors with JSON metadata."""
    from safetensors.torch import save_file

    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"coefficients": coefficients.float().contiguous()}, str(path),
              metadata={"linear_ag": json.dumps({**metadata, "regressors": list(REGRESSORS)})})
    return path


def load_coefficients(name_or_path: str) -> tuple[torch.Tensor, dict[str, Any]]:
    from safetensors import safe_open

    path = resolve_coefficients(name_or_path)
    with safe_open(str(path), framework="pt") as f:
        coefficients = f.get_tensor("coefficients")
        metadata = json.loads((f.metadata() or {}).get("linear_ag", "{}"))
    return coefficients, metadata


def fit_coefficients(trajectories: list[tuple[torch.Tensor, torch.Tensor]], ridge: float = 1e-4) -> torch.Tensor:
    """Ridge least squares per step from full-CFG trajectories.

    Args:
        trajectories: per sample, ``(cond, uncond)`` with shape ``[T, ...]`` each (true predictions per step).
        ridge: λ in ``(XᵀX + λ·tr(XᵀX)/3·I)⁻¹ Xᵀy``.

    Returns:
        ``[T, 3]`` coefficients (row 0 is ``[1, 0, 0]``: step 0 has no history and is always evaluated).
    """
    steps = trajectories[0][0].shape[0]
    coefficients = torch.zeros(steps, 3, dtype=torch.float64)
    coefficients[0, 0] = 1.0
    for k in range(1, steps):
        xs, ys = [], []
        for cond, uncond in trajectories:
            xs.append(torch.stack([cond[k].flatten(), uncond[k - 1].flatten(), cond[k - 1].flatten()], dim=1))
            ys.append(uncond[k].flatten())
        x = torch.cat(xs).double()
        y = torch.cat(ys).double()
        gram = x.T @ x
        reg = ridge * torch.trace(gram) / 3
        coefficients[k] = torch.linalg.solve(gram + reg * torch.eye(3, dtype=gram.dtype), x.T @ y)
    return coefficients.float()


@register_method
@dataclass
class LinearAGConfig(MethodConfig):
    """LinearAG.

    Attributes:
        coefficients: a ``.safetensors`` path or a name in the coefficient folders (fitted for this model and step
            count by ``diffusion-accel calibrate linear_ag``).
        split: fraction of the steps after which the sampler is conditional-only (default 0.5, as AG's finding).
        linear_every: in the first part, every ``linear_every``-th step (the odd ones for 2) uses the estimate.
    """

    name: ClassVar[str] = "linear_ag"
    summary: ClassVar[str] = "LinearAG: affine estimates of uncond from past predictions, then cond-only"
    coefficients: str | None = None
    split: float = 0.5
    linear_every: int = 2

    def validate(self) -> None:
        if not 0.0 <= self.split <= 1.0:
            raise ValueError(f"linear_ag split must be a fraction in [0, 1], got {self.split}.")
        if self.linear_every < 2:
            raise ValueError(f"linear_ag linear_every must be >= 2 (1 would never evaluate uncond), "
                             f"got {self.linear_every}.")

    def not_applicable_reason(self, adapter: ModelAdapter, pipe: Any) -> str | None:
        reason = self.unsupported_reason(adapter) or guidance_not_applicable_reason(adapter, pipe)
        if reason is None and self.coefficients is None:
            return ("linear_ag needs fitted coefficients: run `diffusion-accel calibrate linear_ag --pipeline P` "
                    "and pass coefficients=<name or path>")
        if reason is None:
            try:
                resolve_coefficients(self.coefficients)
            except ValueError as exc:
                return str(exc)
        return reason

    def build(self) -> Method:
        return LinearAGMethod(self)


class LinearAGMethod(GuidanceMethodBase):
    """Runtime of :class:`LinearAGConfig`."""

    def __init__(self, config: LinearAGConfig) -> None:
        super().__init__(config)
        self.config: LinearAGConfig = config
        coefficients, self.metadata = load_coefficients(config.coefficients)
        # per-step (a, b, d) as Python floats: scalars of the estimate in the model's dtype, and no float32 tensor
        # counted as cache in ``stats(pipe)["cache_memory"]`` of a bf16 / fp16 pipeline
        self.coefficients: list[tuple[float, float, float]] = [tuple(map(float, row)) for row in coefficients.tolist()]
        self.prev: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}
        self.current_cond: dict[int, torch.Tensor] = {}

    def attach(self, session: AccelSession) -> None:
        super().attach(session)

    def on_call_begin(self, session: AccelSession) -> None:
        super().on_call_begin(session)
        self.prev = {}

    def _split_step(self) -> int:
        return round(self.config.split * self.session.context.num_steps)

    def uncond_needed(self, sample: int, step: int) -> bool:
        if step >= self._split_step():
            return False
        if step == 0 or step >= len(self.coefficients) or sample not in self.prev:
            return True
        return step % self.config.linear_every == 0

    def estimate_uncond(self, sample: int, step: int, cond: torch.Tensor) -> torch.Tensor:
        if step >= self._split_step() or sample not in self.prev or step >= len(self.coefficients):
            return cond
        _, prev_cond, prev_uncond = self.prev[sample]
        a, b, d = self.coefficients[step]
        estimate = a * cond + b * prev_uncond + d * prev_cond
        self.prev[sample] = (step, cond, estimate)
        return estimate.to(cond.dtype)

    def observe(self, samples: list[int], step: int, cond: torch.Tensor, uncond: torch.Tensor,
                x_t: torch.Tensor | None) -> None:
        for row, sample in enumerate(samples):
            self.prev[sample] = (step, cond[row], uncond[row])


class TrajectoryRecorder(GuidanceMethodBase):
    """Records true (cond, uncond) predictions of every step under full CFG (used to fit LinearAG)."""

    def __init__(self) -> None:
        super().__init__(_RecorderConfig())
        self.records: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}

    def uncond_needed(self, sample: int, step: int) -> bool:
        return True

    def on_call_begin(self, session: AccelSession) -> None:
        super().on_call_begin(session)
        self.records = {}

    def observe(self, samples: list[int], step: int, cond: torch.Tensor, uncond: torch.Tensor,
                x_t: torch.Tensor | None) -> None:
        for row, sample in enumerate(samples):
            self.records.setdefault(sample, {})[step] = (cond[row].detach().clone(), uncond[row].detach().clone())

    def trajectories(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for sample in sorted(self.records):
            steps = self.records[sample]
            order = sorted(steps)
            out.append((torch.stack([steps[k][0] for k in order]), torch.stack([steps[k][1] for k in order])))
        return out


@dataclass
class _RecorderConfig(MethodConfig):
    name: ClassVar[str] = "_linear_ag_recorder"

    def build(self) -> Method:
        return TrajectoryRecorder()
