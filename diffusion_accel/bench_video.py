"""The bench's video-testbed rows: per-clip VBench-style dimensions and per-attribute adherence, their comparison
with the baseline, and their Markdown tables.

The dimensions themselves are computed in one place, :func:`diffusion_accel.pipelines.testbed.evaluate_video.
vbench_per_clip` (what ``diffusion-accel testbed eval wan`` prints); this module only pairs them with the baseline.
The "VBench-style total" here is the **unweighted mean of the five raw dimensions** per clip, not VBench's Total
(which min–max normalises and weights sixteen dimensions, :func:`diffusion_accel.eval.video.aggregate`): with five
proxy dimensions a VBench-comparable total does not exist, and a plain mean keeps the relative change readable.

Clips of a method and of the baseline share prompts and seeds, so the total's relative change gets a paired
bootstrap interval over clips (the same clip indices drawn for both).

Adherence per attribute (colour, shape, direction; the video judge's verdicts, :func:`~diffusion_accel.pipelines.
testbed.video_judge.judge_clips`) is paired with the baseline as the all-three verdict is: a testbed whose clips are
rarely right on all three at once (``testbed:wan``: 10.9 %) can lose only those few clips on that verdict, while
each attribute alone is right on far more of them, so its paired difference can see a loss the all-three one cannot.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .pipelines.testbed.evaluate_video import VBENCH_DIMS, vbench_per_clip

TOTAL_KEY = "vbench_total"
TOTAL_DEFINITION = ("unweighted mean of the five VBench-style dimensions (raw values; not VBench's normalised, "
                    "weighted Total)")
INTERVAL_METHOD = "paired bootstrap over clips (same clips drawn for method and baseline), percentile, 95 %"
RESAMPLES = 2000


def clip_scores(clips: np.ndarray) -> dict[str, np.ndarray]:
    """Per clip ``[N]``: each VBench-style dimension of uint8 clips ``[N, T, H, W, 3]`` and their mean
    (:data:`TOTAL_KEY`)."""
    scores = vbench_per_clip(clips)
    scores[TOTAL_KEY] = np.mean([scores[k] for k in VBENCH_DIMS], axis=0)
    return scores


def method_scores(images: dict[str, np.ndarray], judged: set[str]) -> dict[str, dict[str, np.ndarray]]:
    """:func:`clip_scores` for every label whose outputs are clips the video judge read (``judged``: labels with
    shape metrics). Other pipelines' videos get none: the subject-consistency proxy uses shapes-net features, which
    mean something only on the testbed's clips."""
    return {label: clip_scores(batch) for label, batch in images.items() if batch.ndim == 5 and label in judged}


ATTRIBUTES = ("colour", "shape", "direction")


def method_attributes(images: dict[str, np.ndarray], judged: set[str],
                      prompts: list[str]) -> dict[str, dict[str, list[bool]]]:
    """Per label (clips the video judge read): per-clip verdicts of each attribute."""
    from .pipelines.testbed.video_judge import judge_clips

    out = {}
    for label, batch in images.items():
        if batch.ndim == 5 and label in judged:
            verdicts = judge_clips(batch, prompts)
            out[label] = {a: [bool(getattr(v, f"{a}_ok")) for v in verdicts] for a in ATTRIBUTES}
    return out


def compare_attributes(flags: dict[str, list[bool]], baseline: dict[str, list[bool]]) -> dict[str, dict[str, Any]]:
    """Per attribute: the method's adherence and its paired comparison with the baseline (same clips)."""
    from .eval.paired import paired_summary

    return {a: {"adherence": float(np.mean(flags[a])), "paired": paired_summary(baseline[a], flags[a])}
            for a in ATTRIBUTES}


def compare(scores: dict[str, np.ndarray], baseline: dict[str, np.ndarray], resamples: int = RESAMPLES,
            seed: int = 0) -> dict[str, Any]:
    """A method's mean dimensions beside the baseline's, the relative change of each (method / baseline − 1), and a
    paired bootstrap 95 % interval of the total's relative change. Identical clips give exactly zero change."""
    keys = (*VBENCH_DIMS, TOTAL_KEY)
    n = len(baseline[TOTAL_KEY])
    if any(len(scores[k]) != n for k in keys):
        raise ValueError(f"VBench-style comparison needs the baseline's {n} clips, paired one to one.")
    method_mean = {k: float(np.mean(scores[k])) for k in keys}
    base_mean = {k: float(np.mean(baseline[k])) for k in keys}
    change = {k: (method_mean[k] / base_mean[k] - 1.0) if base_mean[k] else None for k in keys}
    rng = np.random.default_rng(seed)
    index = rng.integers(0, n, size=(resamples, n))
    ratios = scores[TOTAL_KEY][index].mean(axis=1) / baseline[TOTAL_KEY][index].mean(axis=1) - 1.0
    low, high = np.percentile(ratios, [2.5, 97.5])
    return {"dims": method_mean, "baseline": base_mean, "relative_change": change,
            "total_relative_change_ci": [float(low), float(high)], "total_definition": TOTAL_DEFINITION,
            "interval": INTERVAL_METHOD, "per_clip": {k: [round(float(v), 6) for v in scores[k]] for k in keys}}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f} %"


def attribute_table(methods: dict[str, dict[str, Any]]) -> list[str]:
    """Lines of the per-attribute adherence table (empty without it): adherence, and for methods the paired
    difference vs the baseline in points with its interval."""
    from .eval.paired import PAIRED_METHOD, format_difference

    rows = [(label, row["adherence_attributes"]) for label, row in methods.items() if row.get("adherence_attributes")]
    if not rows:
        return []
    lines = ["", "| method | " + " | ".join(f"{a} (lost / gained, − baseline in points [95 % CI])" for a in ATTRIBUTES)
             + " |", "|---|" + "---|" * len(ATTRIBUTES)]
    for label, attributes in rows:
        cells = []
        for a in ATTRIBUTES:
            value, paired = attributes[a]["adherence"], attributes[a]["paired"]
            cells.append(f"{100 * value:.1f} %" if label == "baseline" else
                         f"{100 * value:.1f} % ({paired['lost']} / {paired['gained']}, {format_difference(paired)})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Adherence per attribute (the video judge's colour, shape and direction verdicts, each paired with "
                  f"the baseline's on the same clip) [{PAIRED_METHOD}]."]
    return lines


def markdown_table(methods: dict[str, dict[str, Any]]) -> list[str]:
    """Lines of the VBench-style table (empty when no row has the dims): each cell is the method's value with its
    change vs the baseline's; the baseline row gives the values compared against."""
    rows = [(label, row["vbench"]) for label, row in methods.items() if row.get("vbench")]
    if not rows:
        return []
    keys = VBENCH_DIMS
    header = [k.replace("_", " ") for k in keys] + ["VBench-style total", "total vs baseline [95 % CI]"]
    lines = ["", "| method | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for label, v in rows:
        if label == "baseline":
            cells = [f"{v['dims'][k]:.4f}" for k in keys] + [f"{v['dims'][TOTAL_KEY]:.4f}", "-"]
        else:
            low, high = v["total_relative_change_ci"]
            cells = [f"{v['dims'][k]:.4f} ({_pct(v['relative_change'][k])})" for k in keys]
            cells += [f"{v['dims'][TOTAL_KEY]:.4f}",
                      f"{_pct(v['relative_change'][TOTAL_KEY])} [{100 * low:+.1f}, {100 * high:+.1f}]"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"VBench-style dimensions (proxies from `eval/video.py` as `testbed eval wan` computes them; "
                  f"compare only with the baseline's): value (change vs baseline). VBench-style total: "
                  f"{TOTAL_DEFINITION}; its interval: {INTERVAL_METHOD}."]
    return lines
