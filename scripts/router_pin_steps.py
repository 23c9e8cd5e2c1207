"""Probe of where a cache router's adherence loss comes from: pin whole steps of a trained router to full compute.

``python scripts/router_pin_steps.py assets/testbed-pixart/routers/harmonica --pin 1 3 --out runs/pixvar/pin13``

Steps given with ``--pin`` compute every unit; the threshold τ is then re-calibrated so that the router still
reaches ``--target`` (default 1.6x MACs), which moves the reuse to the remaining cells with the lowest scores. Bench
the result with ``python -m diffusion_accel.benchmarks.learned_cache --pipeline testbed:pixart --harmonica-router
<out> --peers fbcache:threshold=0.1 --no-speed --repeats 1``. The script prints, per step, the number of units the
re-calibrated router reuses.
"""

from __future__ import annotations

import argparse

from diffusion_accel.cache_router import PINNED_LOGIT, CacheRouter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/router_pin_steps.py", description=__doc__.split("\n")[0])
    parser.add_argument("router", help="a trained router folder")
    parser.add_argument("--pin", type=int, nargs="+", required=True, help="steps to compute in full (0-based)")
    parser.add_argument("--target", type=float, default=1.6, help="MACs ratio to re-calibrate τ to")
    parser.add_argument("--out", required=True, help="folder for the pinned router")
    args = parser.parse_args(argv)

    router = CacheRouter.load(args.router)
    for step in args.pin:
        if not 0 < step < router.num_steps:
            parser.error(f"--pin {step}: steps run from 1 to {router.num_steps - 1} (step 0 always computes)")
        router.trainable[step] = False
        router.logits[step] = PINNED_LOGIT
    tau = router.threshold_for(macs_ratio=args.target)
    router.set_threshold(tau)
    router.config["pinned_by_probe"] = sorted(args.pin)
    router.save(args.out)
    reused = (~router.decisions(tau)).sum(dim=1).tolist()
    print(f"{args.out}: τ = {tau:.4f}, MACs {router.config['macs_ratio']:.3f}x; units reused per step: {reused}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
