"""Paired comparisons of a method against its baseline on the same prompts and seeds.

Every benchmark that reports prompt adherence compares per-image verdicts of two runs that share prompts and seeds,
so the right unit is the *pair*. This module is the one home of that statistics:

* :func:`paired_counts`: prompts lost (baseline right, method wrong), gained, and the concordant counts.
* :func:`paired_difference_ci`: the paired difference in adherence, method − baseline = (gained − lost) / n, with
  **Newcombe's hybrid score interval for paired proportions** (Newcombe 1998, Stat. Med. 17:2635, method 10; the
  worked example of Altman et al., *Statistics with Confidence*, 2000, Table 6.2): Wilson score intervals of the two
  marginal proportions (``scipy.stats.binomtest(...).proportion_ci(method="wilson")``) combined with the
  continuity-corrected correlation φ of the pairs. Unlike an interval conditioned on the discordant pairs, it
  stays honest when every discordant pair goes one way or there are none. With it comes the two-sided **exact
  McNemar** p-value (``binomtest(lost, lost + gained, 0.5)``).
* :func:`fid_bootstrap`: FID-shapes with a **percentile bootstrap** interval over images resampled with replacement
  (the reference statistics held fixed) and, given the baseline's features, the paired bootstrap interval of
  FID(method) − FID(baseline) (the same resampled indices for both).
* :func:`proportion_ci`: Wilson's score interval of a single run's adherence (no baseline to pair with).
* :func:`claim_within`: the wording rule "within N points": the interval's lower end is above −N.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: How the paired-difference interval is computed (written into every report that uses it).
PAIRED_METHOD = "Newcombe hybrid score interval for paired proportions (method 10), 95 %"
FID_METHOD = "bootstrap over images, percentile interval shifted by the bootstrap bias estimate, 95 %"


@dataclass(frozen=True)
class PairedCounts:
    """Verdict pairs (baseline, method) of ``n`` images with the same prompt and seed."""

    n: int
    both: int  # right in both runs
    lost: int  # baseline right, method wrong
    gained: int  # baseline wrong, method right
    neither: int

    @property
    def discordant(self) -> int:
        return self.lost + self.gained

    @property
    def difference(self) -> float:
        """Method adherence − baseline adherence (a fraction)."""
        return (self.gained - self.lost) / self.n if self.n else float("nan")


def paired_counts(baseline: Sequence[bool], method: Sequence[bool]) -> PairedCounts:
    """The 2x2 table of per-image verdicts; ``baseline[i]`` and ``method[i]`` must share prompt and seed."""
    a = np.asarray(baseline, dtype=bool)
    b = np.asarray(method, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired verdicts need equal 1-d lengths, got {a.shape} and {b.shape}.")
    return PairedCounts(n=int(a.size), both=int((a & b).sum()), lost=int((a & ~b).sum()),
                        gained=int((~a & b).sum()), neither=int((~a & ~b).sum()))


def _wilson(successes: int, n: int, confidence: float) -> tuple[float, float]:
    from scipy.stats import binomtest

    ci = binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def proportion_ci(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of one proportion (e.g. a single run's adherence, with no baseline to pair with)."""
    return _wilson(successes, n, confidence)


def paired_difference_ci(lost: int, gained: int, n: int, both: int | None = None,
                         confidence: float = 0.95) -> tuple[float, float, float]:
    """``(low, high, mcnemar_p)`` for (gained − lost) / n: Newcombe's method 10 and the exact McNemar p-value.

    ``both`` (pairs right in both runs) enters only φ; without it the concordant pairs are split as the marginals
    imply is impossible, so pass it (:func:`paired_summary` does)."""
    from scipy.stats import binomtest

    if n <= 0:
        raise ValueError("no pairs.")
    both = 0 if both is None else both
    neither = n - both - lost - gained
    if min(lost, gained, both, neither) < 0:
        raise ValueError(f"impossible counts: both {both}, lost {lost}, gained {gained}, n {n}.")
    method_right, base_right = both + gained, both + lost
    p1, p2 = method_right / n, base_right / n
    l1, u1 = _wilson(method_right, n, confidence)
    l2, u2 = _wilson(base_right, n, confidence)
    # φ with Newcombe's continuity correction of the cross-product (B = ad − bc: 0 when |B| ≤ n/2 on the positive
    # side, B − n/2 above it; negative B unchanged), 0 when a margin is empty
    product = float(method_right) * (n - method_right) * base_right * (n - base_right)
    cross = float(both) * neither - float(gained) * lost
    corrected = cross - n / 2 if cross > n / 2 else (cross if cross < 0 else 0.0)
    phi = corrected / np.sqrt(product) if product > 0 else 0.0
    diff = p1 - p2
    low = diff - np.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    high = diff + np.sqrt(max((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2, 0.0))
    discordant = lost + gained
    p_value = float(binomtest(lost, discordant, 0.5).pvalue) if discordant else 1.0
    return float(low), float(high), p_value


def paired_summary(baseline: Sequence[bool], method: Sequence[bool], confidence: float = 0.95) -> dict[str, Any]:
    """Counts, the paired difference and its interval as a JSON-ready dict (fractions, not points)."""
    counts = paired_counts(baseline, method)
    low, high, p_value = paired_difference_ci(counts.lost, counts.gained, counts.n, counts.both, confidence)
    return {**asdict(counts), "difference": counts.difference, "ci_low": low, "ci_high": high,
            "mcnemar_p": p_value, "interval": PAIRED_METHOD}


def half_width_needed(discordant_rate: float, half_width: float = 0.03, z: float = 1.959964) -> int:
    """Pairs needed for a paired-difference half-width of ``half_width`` at a discordance rate (normal
    approximation at no net change: n = z² d / h²)."""
    return int(np.ceil(z * z * discordant_rate / (half_width * half_width)))


def claim_within(ci_low: float, points: float) -> bool:
    """"Within ``points`` points of the baseline": the interval's lower end (a fraction) is above −points/100."""
    return ci_low > -points / 100.0


def fid_bootstrap(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray, baseline_features: np.ndarray | None = None,
                  resamples: int = 200, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """FID of ``features`` to N(``mu``, ``sigma``) with its percentile bootstrap interval; with
    ``baseline_features`` (paired rows) also the interval of the difference to the baseline's FID."""
    from .frechet import frechet_distance_to_statistics

    x = np.asarray(features, dtype=np.float64)
    base = None if baseline_features is None else np.asarray(baseline_features, dtype=np.float64)
    if base is not None and base.shape != x.shape:
        raise ValueError(f"paired features differ in shape: {x.shape} vs {base.shape}.")
    rng = np.random.default_rng(seed)
    point = frechet_distance_to_statistics(x, mu, sigma)
    base_point = None if base is None else frechet_distance_to_statistics(base, mu, sigma)
    values, diffs = [], []
    for _ in range(resamples):
        idx = rng.integers(0, len(x), len(x))
        value = frechet_distance_to_statistics(x[idx], mu, sigma)
        values.append(value)
        if base is not None:
            diffs.append(value - frechet_distance_to_statistics(base[idx], mu, sigma))
    # A resample repeats images, which inflates a Fréchet distance (fewer distinct feature vectors): the percentile
    # interval is shifted by the bootstrap estimate of that bias, mean(resampled) − point (Efron & Tibshirani 1993,
    # §10.2), so that it brackets the estimate from the images actually generated.
    tail = 100.0 * (1.0 - confidence) / 2.0

    def shifted(samples: list[float], estimate: float) -> tuple[float, float]:
        bias = float(np.mean(samples)) - estimate
        return float(np.percentile(samples, tail)) - bias, float(np.percentile(samples, 100.0 - tail)) - bias

    low, high = shifted(values, point)
    out: dict[str, Any] = {"fid": point, "ci_low": low, "ci_high": high, "resamples": resamples,
                           "bootstrap_bias": float(np.mean(values)) - point, "interval": FID_METHOD}
    if base is not None:
        diff_low, diff_high = shifted(diffs, point - base_point)
        out.update(difference=point - base_point, diff_ci_low=diff_low, diff_ci_high=diff_high)
    return out


def format_difference(summary: dict[str, Any]) -> str:
    """``"-6.2 [-12.5, -1.6]"``: the paired difference and its interval in percentage points."""
    return (f"{100 * summary['difference']:+.1f} [{100 * summary['ci_low']:+.1f}, "
            f"{100 * summary['ci_high']:+.1f}]")
