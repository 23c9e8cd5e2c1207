"""Size the GPU run of scripts/bfm_equal_budget.sh from a short probe of every row at once (same contention).

``python scripts/bfm_sizing.py PROBE_RUNS PROBE_WALL_S SECONDS_LEFT`` prints ``STEPS FRN_STEPS note``: the largest
stage-1 step count (a multiple of 100) with which the longest lane (M = 4, then its FRN stage at 0.4x the steps)
ends within SECONDS_LEFT. Per step: the progress bar's smoothed rate at the probe's end (the mean over the probe
would count the first steps' CUDA warm-up), +10 %; setup: the probe's wall minus its training, +30 s for the larger
data set, paid twice on that lane.
"""

import glob
import json
import re
import sys
from pathlib import Path

FRN_RATIO = 0.4


def main(runs: str, wall: float, left: float) -> str:
    per_step, trained = [], []
    for log in glob.glob(str(Path(runs) / "*.log")):
        # the trainer's bar only ("train bfm: ... 12.3it/s"), not the model-saving bars after it
        bars = [line for line in re.split(r"[\r\n]", Path(log).read_text(errors="replace"))
                if line.startswith("train ")]
        rates = [m for line in bars for m in re.findall(r"([0-9.]+)(it/s|s/it)", line)]
        # the bar's closing line is the mean over the whole probe (warm-up included): take the median of the
        # smoothed rates just before it
        seconds = [1 / float(v) if unit == "it/s" else float(v) for v, unit in rates]
        if seconds:
            recent = sorted(seconds[-10:-1] or seconds)
            per_step.append(recent[len(recent) // 2])
    for f in glob.glob(str(Path(runs) / "*" / "train_metrics.json")):
        trained.append(json.loads(Path(f).read_text())["train_seconds_this_session"])
    if not per_step or not trained:
        raise SystemExit(f"no finished probe row under {runs}")
    step = 1.1 * max(per_step)
    setup = wall - max(trained) + 30
    steps = int((left - 2 * setup - 15) / (step * (1 + FRN_RATIO))) // 100 * 100
    return (f"{max(steps, 200)} {max(int(steps * FRN_RATIO), 100)} "
            f"per_step={step:.4f}s,setup={setup:.0f}s,rows={len(trained)},left={left:.0f}s")


if __name__ == "__main__":
    print(main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3])))
