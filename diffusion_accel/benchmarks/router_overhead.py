"""Where a cache router's wall speed-up goes, beside the MACs ratio it is judged against.

``python -m diffusion_accel.benchmarks.router_overhead --pipeline testbed:pixart --router <folder> --tier speed``

The MACs ratio assumes that a reused unit saves exactly its share of the MACs and that nothing else costs time.
Two things break that on real hardware, and neither is router overhead:

* **work the flop counter does not count**: norms, adaLN modulation, gates, residual adds, patch embedding. Branch
  caching cannot skip them (the block still runs them around a reused branch), so they dilute every saving;
* **unequal speed per MAC**: a unit's share of the wall time is not its share of the MACs (large GEMMs in the
  feed-forward run more MACs per second than attention with short sequences).

So this measures, in one process:

1. each unit's wall time per denoiser forward in plain baseline calls (forward hooks on the unit modules), and the
   **free-reuse ratio**: the denoiser speed-up the router's schedule would give if reusing a unit cost nothing,
   ``T_den / (T_den − Σ_{reused (k, u)} t_{k,u})``. This is the ceiling for this schedule on this machine;
2. the denoiser's wall time and the whole call's, baseline vs the router, interleaved repeats, medians;
3. the router's **overhead**: free-reuse ratio / measured denoiser ratio − 1 (hooks, stores, decisions);
4. time share vs MAC share per unit kind (``attn1``, ``ff``, ...) and outside every unit.

Writes ``router_overhead.json`` beside the printed table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch


@contextmanager
def _timed_spans(spans: list[tuple[list[torch.nn.Module], torch.nn.Module]], seconds: list[list[float]]):
    """Append to ``seconds[i]`` the wall time from the first forward start of any of span i's opening modules to
    the end of its closing module's forward, each time the closing module runs, while active (plain
    ``torch.nn.Module`` hooks, so the diffusers hooks of a method under test run inside the timed span)."""
    handles, starts = [], {}
    for index, (openers, closer) in enumerate(spans):
        def pre(_module, _args, _kwargs, index=index):
            starts.setdefault(index, time.perf_counter())

        def post(_module, _args, _kwargs, _output, index=index):
            seconds[index].append(time.perf_counter() - starts.pop(index))

        handles.extend(module.register_forward_pre_hook(pre, with_kwargs=True) for module in openers)
        handles.append(closer.register_forward_hook(post, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _timed_forwards(modules: list[torch.nn.Module], seconds: list[list[float]]):
    """Each forward of ``modules[i]`` timed into ``seconds[i]``."""
    return _timed_spans([([module], module) for module in modules], seconds)


def unit_seconds(pipe: Any, units: list[tuple[str, torch.nn.Module]], call: dict[str, Any], num_steps: int,
                 repeats: int, feeders: dict[str, list[tuple[str, torch.nn.Module]]] | None = None,
                 ) -> tuple[torch.Tensor, float]:
    """``(t [T, U], T_den)``: median seconds of unit u at step k, and of all denoiser forwards, over ``repeats``
    plain calls (after one warm-up). A step with several denoiser forwards (separate CFG passes) sums them.

    A unit with ``feeders`` is timed from its first feeder's start to its own end: a reuse skips the feeders, and
    their zero-width placeholders make the block's work between them and the unit free too (Flux's GELU and
    concatenation before ``proj_out``; :mod:`diffusion_accel.routed_units`)."""
    from ..bench import generate
    from ..pipelines.adapters import find_adapter

    denoiser = find_adapter(pipe).get_denoiser(pipe)
    spans = [([denoiser], denoiser)] + [([module for _, module in (feeders or {}).get(name, [])] + [module], module)
                                        for name, module in units]
    per_call: list[tuple[torch.Tensor, float]] = []
    for repeat in range(repeats + 1):
        seconds: list[list[float]] = [[] for _ in spans]
        with _timed_spans(spans, seconds):
            generate(pipe, call)
        forwards = len(seconds[0])
        if forwards % num_steps:
            raise ValueError(f"{forwards} denoiser forwards in a {num_steps}-step call: not a whole number per step")
        table = torch.zeros(num_steps, len(units), dtype=torch.float64)
        for u, times in enumerate(seconds[1:]):
            if len(times) != forwards:
                raise ValueError(f"unit {units[u][0]} ran {len(times)} times in {forwards} denoiser forwards")
            for f, value in enumerate(times):
                table[f * num_steps // forwards, u] += value
        if repeat:  # the first call is the warm-up
            per_call.append((table, sum(seconds[0])))
    return torch.stack([t for t, _ in per_call]).median(dim=0).values, statistics.median(d for _, d in per_call)


def free_reuse_ratio(seconds: torch.Tensor, denoiser_seconds: float, compute: torch.Tensor) -> float:
    """The denoiser speed-up of schedule ``compute`` (bool [T, U], True = computed) if reuse cost nothing."""
    saved = float(seconds[~compute].sum())
    return denoiser_seconds / (denoiser_seconds - saved)


def account(pipe: Any, router_folder: str | Path, call: dict[str, Any], *, threshold: float | None = None,
            repeats: int = 5, objective: str = "harmonica") -> dict[str, Any]:
    """The measurements of the module docstring for ``router_folder`` on ``pipe`` called with ``call``."""
    import diffusion_accel as da

    from ..bench import generate
    from ..cache_router import CacheRouter, measure_unit_macs_shares
    from ..pipelines.adapters import find_adapter

    router = CacheRouter.load(router_folder)
    adapter = find_adapter(pipe)
    units = adapter.routing_units(pipe)
    names = [name for name, _ in units]
    if names != router.units:
        raise ValueError(f"the router's units do not match this pipeline's ({len(router.units)} vs {len(names)}); "
                         "pass the router trained (or stretched) for this pipeline")
    tau = float(router.config.get("threshold", 0.1)) if threshold is None else float(threshold)
    compute = router.decisions(tau)
    steps = router.num_steps

    feeders = adapter.unit_feeders(pipe)
    seconds, den_plain = unit_seconds(pipe, units, call, steps, repeats, feeders)
    denoiser = adapter.get_denoiser(pipe)
    shares, rest = measure_unit_macs_shares(pipe, denoiser, names, call,
                                            {unit: [n for n, _ in found] for unit, found in feeders.items()})
    unit_macs = torch.tensor(shares, dtype=torch.float64)
    macs_ratio = (CacheRouter.predicted_macs(torch.ones_like(compute), unit_macs, rest)
                  / CacheRouter.predicted_macs(compute, unit_macs, rest))

    walls: dict[str, list[float]] = {"baseline": [], "router": []}
    dens: dict[str, list[float]] = {"baseline": [], "router": []}
    setups: list[float] = []

    def timed(label: str) -> None:
        """One call, timed as a user who applied the router once sees every later call: applying it (reading the
        router file, installing the hooks) and removing it run outside the clock, as the bench's wall column does,
        and applying is reported apart (``median_seconds["apply"]``)."""
        clock: list[list[float]] = [[]]
        with ExitStack() as stack:
            if label == "router":
                begin = time.perf_counter()
                stack.enter_context(da.accelerated(pipe, objective, router=str(router_folder), threshold=tau))
                setups.append(time.perf_counter() - begin)
            with _timed_forwards([denoiser], clock):
                start = time.perf_counter()
                generate(pipe, call)
                walls[label].append(time.perf_counter() - start)
        dens[label].append(sum(clock[0]))

    for label in walls:  # warm-up
        timed(label)
        walls[label].clear()
        dens[label].clear()
    setups.clear()
    for repeat in range(repeats):
        for label in (("baseline", "router") if repeat % 2 == 0 else ("router", "baseline")):
            timed(label)
    wall = {k: statistics.median(v) for k, v in walls.items()}
    den = {k: statistics.median(v) for k, v in dens.items()}

    kinds: dict[str, dict[str, float]] = defaultdict(lambda: {"time_share": 0.0, "macs_share": 0.0})
    for u, name in enumerate(names):
        kind = name.split(".")[-1] if name.count(".") > 1 else "block"
        kinds[kind]["time_share"] += float(seconds[:, u].sum()) / den_plain
        kinds[kind]["macs_share"] += shares[u]
    kinds["outside units"] = {"time_share": 1.0 - float(seconds.sum()) / den_plain, "macs_share": rest}
    ceiling = free_reuse_ratio(seconds, den_plain, compute)
    denoiser_ratio = den["baseline"] / den["router"]
    return {
        "router": str(router_folder), "threshold": tau, "repeats": repeats, "threads": torch.get_num_threads(),
        "macs_ratio": macs_ratio,
        "free_reuse_ratio": ceiling, "free_reuse_over_macs": ceiling / macs_ratio,
        "denoiser_wall_ratio": denoiser_ratio, "denoiser_wall_over_macs": denoiser_ratio / macs_ratio,
        "end_to_end_wall_ratio": wall["baseline"] / wall["router"],
        "end_to_end_over_macs": wall["baseline"] / wall["router"] / macs_ratio,
        "router_overhead": ceiling / denoiser_ratio - 1.0,
        "median_seconds": {"wall": wall, "denoiser": den, "denoiser_plain_timed_units": den_plain,
                           "apply": statistics.median(setups)},
        "shares": dict(kinds),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = ["| quantity | value |", "|---|---|"]
    for key, label in (("macs_ratio", "MACs ratio (flop counter shares × schedule)"),
                       ("free_reuse_ratio", "free-reuse ratio (ceiling: reuse costs nothing)"),
                       ("denoiser_wall_ratio", "denoiser wall ratio (measured)"),
                       ("end_to_end_wall_ratio", "end-to-end wall ratio (measured)")):
        lines.append(f"| {label} | {result[key]:.3f}x ({result[key] / result['macs_ratio']:.3f} of MACs) |")
    lines.append(f"| router overhead (ceiling / measured − 1) | {100 * result['router_overhead']:+.1f} % |")
    apply = result["median_seconds"].get("apply")
    if apply is not None:
        lines.append(f"| applying the router, once (outside the timed calls, as is removing it) | {apply:.3f} s |")
    lines += ["", "| unit kind | share of denoiser wall time | share of denoiser MACs |", "|---|---|---|"]
    for kind, share in result["shares"].items():
        lines.append(f"| {kind} | {100 * share['time_share']:.1f} % | {100 * share['macs_share']:.1f} % |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ..bench import call_kwargs
    from ..loading import base_call_kwargs, load_pipeline
    from ..prompts import bench_prompts

    parser = argparse.ArgumentParser(prog="python -m diffusion_accel.benchmarks.router_overhead",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="testbed:pixart")
    parser.add_argument("--router", required=True, help="router folder matching the pipeline (and tier)")
    parser.add_argument("--tier", default="speed", choices=("quality", "speed", "full-width"))
    parser.add_argument("--threshold", type=float, default=None, help="default: the router's stored τ")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt", default=None, help="default: the first held-out prompt")
    parser.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = parser.parse_args(argv)

    from ..cache_router import CacheRouter

    router = CacheRouter.load(args.router)
    pipe = load_pipeline(args.pipeline, tier=args.tier)
    pipe.set_progress_bar_config(disable=True)
    prompts = [args.prompt] if args.prompt else bench_prompts(args.pipeline, 1)
    call = call_kwargs(pipe, "", prompts, base_call_kwargs(args.pipeline, tier=args.tier), router.num_steps,
                       router.config.get("guidance_scale"), None, [0])
    result = account(pipe, args.router, call, threshold=args.threshold, repeats=args.repeats,
                     objective=router.config.get("objective", "harmonica"))
    print(markdown(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
