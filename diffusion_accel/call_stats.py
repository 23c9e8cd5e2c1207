"""Per-call statistics: denoiser forwards (NFE), blocks run or skipped per step, skipped unconditional rows, time.

``diffusion_accel.stats(pipe)`` returns :meth:`CallStats.to_dict` of the last pipeline call; ``print(stats)``-style
tables come from :func:`format_stats` (like cache-dit's ``summary``). This module is ``call_stats`` rather than
``stats`` so that the package attribute ``diffusion_accel.stats`` (the function) does not hide it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepStats:
    stage: int
    step: int
    timestep: float
    nfe: int = 0
    rows: int = 0
    uncond_skipped: int = 0
    blocks_total: int = 0
    blocks_run: int = 0
    block_runs: dict[int, int] = field(default_factory=dict)
    start: float = 0.0
    end: float = 0.0

    def skipped_blocks(self) -> list[int]:
        """Blocks that did not run in at least one denoiser forward of this step."""
        if self.nfe == 0:
            return []
        num_blocks = self.blocks_total // self.nfe
        return [i for i in range(num_blocks) if self.block_runs.get(i, 0) < self.nfe]

    @property
    def wall_time(self) -> float:
        return max(self.end - self.start, 0.0)


@dataclass
class CallStats:
    """Statistics of one pipeline call."""

    methods: list[str] = field(default_factory=list)
    steps: dict[tuple[int, int], StepStats] = field(default_factory=dict)
    nfe: int = 0
    wall_time: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    _t0: float = field(default_factory=time.perf_counter)
    _current: StepStats | None = None
    blocks_per_forward: int = 0

    def begin_forward(self, stage: int, step: int, timestep: float, rows: int, blocks_total: int) -> StepStats:
        now = time.perf_counter()
        key = (stage, step)
        record = self.steps.get(key)
        if record is None:
            if self._current is not None:
                self._current.end = now
            record = StepStats(stage=stage, step=step, timestep=timestep, start=now, end=now)
            self.steps[key] = record
        self._current = record
        record.nfe += 1
        self.blocks_per_forward = blocks_total
        record.rows += rows
        record.blocks_total += blocks_total
        self.nfe += 1
        return record

    def discount_forward(self) -> None:
        """The current forward was answered without running the denoiser (e.g. a skipped uncond pass)."""
        if self._current is not None:
            self._current.nfe -= 1
            self.nfe -= 1
            self._current.blocks_total -= self.blocks_per_forward

    def end_forward(self) -> None:
        if self._current is not None:
            self._current.end = time.perf_counter()

    def finish(self) -> None:
        self.wall_time = time.perf_counter() - self._t0

    # -------------------------------------------------------------- recording from methods
    def record_block_run(self, index: int) -> None:
        if self._current is not None:
            self._current.blocks_run += 1
            self._current.block_runs[index] = self._current.block_runs.get(index, 0) + 1

    def record_uncond_skipped(self, rows: int) -> None:
        """``rows`` unconditional rows of the current forward were not computed."""
        if self._current is not None:
            self._current.uncond_skipped += rows
            self._current.rows -= rows

    def to_dict(self) -> dict[str, Any]:
        steps = []
        for record in self.steps.values():
            steps.append(
                {
                    "stage": record.stage,
                    "step": record.step,
                    "timestep": record.timestep,
                    "nfe": record.nfe,
                    "rows": record.rows,
                    "blocks_total": record.blocks_total,
                    "blocks_run": record.blocks_run,
                    "blocks_skipped": record.skipped_blocks(),
                    "uncond_skipped": record.uncond_skipped,
                    "wall_time_s": record.wall_time,
                }
            )
        return {
            "methods": list(self.methods),
            "nfe": self.nfe,
            "num_steps": len(self.steps),
            "blocks_total": sum(s["blocks_total"] for s in steps),
            "blocks_run": sum(s["blocks_run"] for s in steps),
            "uncond_skipped": sum(s["uncond_skipped"] for s in steps),
            "wall_time_s": self.wall_time,
            "steps": steps,
            **self.extra,
        }


def format_stats(stats: dict[str, Any]) -> str:
    """A plain-text table of :meth:`CallStats.to_dict`."""
    header = f"{'stage':>5} {'step':>4} {'timestep':>9} {'nfe':>3} {'rows':>4} {'blocks run':>11} " \
             f"{'uncond skipped':>14} {'time (ms)':>9}  skipped blocks"
    lines = [
        f"methods: {', '.join(stats.get('methods') or ['none'])} | NFE {stats['nfe']} | steps {stats['num_steps']}"
        f" | blocks run {stats['blocks_run']}/{stats['blocks_total']} | uncond rows skipped"
        f" {stats['uncond_skipped']} | wall {stats['wall_time_s'] * 1e3:.1f} ms",
        header,
        "-" * len(header),
    ]
    for s in stats["steps"]:
        skipped = ",".join(str(i) for i in s["blocks_skipped"]) or "-"
        lines.append(
            f"{s['stage']:>5} {s['step']:>4} {s['timestep']:>9.3f} {s['nfe']:>3} {s['rows']:>4} "
            f"{s['blocks_run']:>5}/{s['blocks_total']:<5} {s['uncond_skipped']:>14} {s['wall_time_s'] * 1e3:>9.1f}  "
            f"{skipped}"
        )
    lines += _footer(stats)
    return "\n".join(lines)


def format_bytes(count: float) -> str:
    """``1536`` → ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def _footer(stats: dict[str, Any]) -> list[str]:
    """What ``torch.compile`` did during the call, the methods' cache memory and where a NaN/inf stopped it."""
    lines = []
    compiled = stats.get("compile")
    if compiled:
        total = compiled.get("since_apply", {})
        lines.append(
            f"compile: {compiled.get('regions', 0)} compiled regions"
            f"{', whole model compiled' if compiled.get('whole_model') else ''} | this call: frames compiled "
            f"{compiled.get('frames_compiled', 0)}, recompiles {compiled.get('recompiles', 0)}, graph breaks "
            f"{compiled.get('graph_breaks', 0)} | since apply: frames compiled {total.get('frames_compiled', 0)}, "
            f"recompiles {total.get('recompiles', 0)}, graph breaks {total.get('graph_breaks', 0)}"
        )
    memory = stats.get("cache_memory")
    if memory is not None:
        by_dtype = ", ".join(f"{dtype} {format_bytes(n)}" for dtype, n in sorted(memory.get("by_dtype", {}).items()))
        lines.append(f"cache memory: {format_bytes(memory.get('bytes', 0))}" + (f" ({by_dtype})" if by_dtype else ""))
    where = stats.get("non_finite")
    if where:
        lines.append(f"non-finite output: step {where.get('step')} of {where.get('num_steps')} "
                     f"({where.get('branch')} pass, stage {where.get('stage')}): the call was stopped")
    return lines


def tensor_footprint(roots: list[Any], skip_types: tuple[type, ...] = ()) -> dict[str, Any]:
    """Bytes of the distinct tensors reachable from ``roots`` (a method's caches, its hooks' states), by dtype.

    Follows containers and the attributes of our own and Diffusers' hook objects; never enters ``nn.Module``s
    (weights are not cache) or ``skip_types`` (the session, which reaches the pipeline).
    """
    import torch

    seen: set[int] = set()
    by_dtype: dict[str, int] = {}
    stack: list[tuple[Any, int]] = [(root, 0) for root in roots]
    while stack:
        obj, depth = stack.pop()
        if id(obj) in seen or depth > 8 or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            key = str(obj.dtype).removeprefix("torch.")
            by_dtype[key] = by_dtype.get(key, 0) + obj.numel() * obj.element_size()
        elif isinstance(obj, (torch.nn.Module, type)) or isinstance(obj, skip_types) or callable(obj):
            continue
        elif isinstance(obj, dict):
            stack.extend((v, depth + 1) for v in obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend((v, depth + 1) for v in obj)
        elif type(obj).__module__.startswith(("diffusion_accel", "diffusers.hooks", "cache_dit")):
            stack.extend((v, depth + 1) for v in getattr(obj, "__dict__", {}).values())
    return {"bytes": sum(by_dtype.values()), "by_dtype": by_dtype}
