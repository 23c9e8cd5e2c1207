"""Train one candidate VAE for ``testbed:wan`` with its encoder, on the CPU, and print what its reconstructions keep.

The shipped VAE (and its CPU-fine-tuned decoder) draws every shape round, so no generated clip can be judged right on
shape more often than its reconstructions are (31.2 %). This script trains the variants measured for the README
("The video testbed"), each from scratch for a wall-clock budget on one thread, and reports reconstruction PSNR and
the video judge's adherence on 64 validation clips (``train_wan.vae_reconstruction_metrics``):

    python scripts/wan_vae_variants.py --variant 8x --batch 8 --out runs/wan-vae-8x          # 8x, narrow posterior
    python scripts/wan_vae_variants.py --variant 8x-wide-decoder --out runs/wan-vae-8x-wide  # decoder width 16
    python scripts/wan_vae_variants.py --variant 4x --out runs/wan-vae-4x                    # 3x16x16 latents
    python scripts/wan_vae_variants.py --variant 8x-z16 --out runs/wan-vae-8x-z16            # 3x8x8, 16 channels
    python scripts/wan_vae_variants.py --variant 4x-z4 --out runs/wan-vae-4x-z4              # 3x16x16, 4 channels
    python scripts/wan_vae_variants.py --init-from runs/wan-vae-4x --minutes 48 --seed 1 --out runs/wan-vae-4x-b
    python scripts/wan_vae_variants.py --init-from runs/wan4x-vae --decoder-only --minutes 90 --out runs/wan4x-decoder

Every variant starts its posterior narrow (``--logvar-init``, default -10: σ = 0.0067; see
``train_wan.start_posterior_narrow``). Threads: ``OMP_NUM_THREADS`` (the README's runs used 1, two runs side by side).
"""

from __future__ import annotations

import argparse
import json

#: Architecture of each fresh variant: (spatial compression, config keys replaced).
VARIANTS = {"8x": (8, {}), "8x-wide-decoder": (8, {"decoder_base_dim": 16}), "4x": (4, {}),
            "8x-z16": (8, {"z_dim": 16}), "4x-z4": (4, {"z_dim": 4})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=tuple(VARIANTS), default="4x", help="a fresh VAE (not with --init-from)")
    parser.add_argument("--init-from", default=None, help="continue a saved VAE (its own architecture) instead")
    parser.add_argument("--minutes", type=float, default=40.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--logvar-init", type=float, default=-10.0)
    parser.add_argument("--decoder-only", action="store_true",
                        help="with --init-from: its encoder side and latent statistics frozen (train_wan_vae)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.decoder_only and not args.init_from:
        parser.error("--decoder-only continues a trained VAE: pass --init-from <its folder>")

    from diffusion_accel.pipelines.testbed import train_wan

    if args.init_from:  # a continued VAE keeps its own architecture and posterior
        fresh = {"decoder_only": args.decoder_only}
    else:
        compression, overrides = VARIANTS[args.variant]
        fresh = {"spatial_compression": compression, "vae_overrides": overrides, "logvar_init": args.logvar_init}
    metrics = train_wan.train_wan_vae(args.out, seed=args.seed, minutes=args.minutes, steps=10**6,
                                      batch_size=args.batch, lr=args.lr, init_from=args.init_from, **fresh)
    print(json.dumps({"variant": None if args.init_from else args.variant, **metrics}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
