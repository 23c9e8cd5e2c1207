"""×4 super-resolution on the testbed: ``python -m diffusion_accel.benchmarks.super_resolution``.

64 held-out shapes images (split ``test``, never used in training or validation), HR 64x64, LR 16x16 made by each
degradation (``bicubic``; ``realistic`` = blur + noise + JPEG, :mod:`diffusion_accel.pipelines.resshift.degrade`).
Rows: bicubic upsampling; the regression network (same UNet, parameters and training budget: the PSNR-optimal
point estimate, expected to win PSNR); the SR3-style conditional DDPM (same UNet and budget) with DDIM at 50 and 4
steps; ResShift at T = 4 (the shipped ``testbed:resshift`` for bicubic) and T = 15; and, for scale, the HR images
through the VAE (the latent-space ceiling) and the HR images themselves.

Every row encodes and decodes with one VAE, ``--vae`` (default: the one ``testbed:resshift`` ships: the shared
testbed VAE's encoder, in whose latent space every network here was trained, with a decoder fine-tuned for SR;
``testbed:pixart`` gives the shared decoder).

Columns: PSNR and SSIM (pinned definitions: :mod:`diffusion_accel.eval.restoration`; RGB in [0, 1], Gaussian
window 11, σ = 1.5, Wang et al. 2004) with 95 % intervals over images; FID-shapes of the 64 outputs against the
cached real-image statistics of shapes-net (64 images: the absolute value carries a large small-sample bias; compare
rows); shapes-net accuracy on the SR output: colour and shape of every ground-truth object read at its grid cell,
and position = the set of occupied cells is exactly right; denoiser passes per image (counted by a forward hook);
wall time for the 64 images (one batch, this process's threads, VAE included).

The trained models are the runs of ``diffusion-accel train resshift`` in ``--runs_dir`` (README: the commands); a
missing run is reported with the command that makes it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEGRADATIONS = ("bicubic", "realistic")
RUN_FLAGS = {"resshift4": "", "resshift15": "--num_train_timesteps 15 --min_noise_level 0.04",
             "regression": "--objective regression", "ddpm": "--objective ddpm"}


def train_command(run: str, degradation: str, runs_dir: str) -> str:
    flags = RUN_FLAGS[run] + (" --degradation realistic" if degradation == "realistic" else "")
    return (f"diffusion-accel train resshift --config resshift-bicubic --output_dir {runs_dir}/{run}-{degradation} "
            f"{flags}").strip()


def to_unit(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW → quantised uint8 NHWC → float [0, 1] (every row is scored as an 8-bit image)."""
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return arr


def attribute_accuracy(images_u8: np.ndarray, samples) -> dict[str, float]:
    """shapes-net read of the SR output against the ground-truth objects (definition in the module docstring)."""
    from ..pipelines.testbed.shapes_net import class_labels, run_net

    cls = run_net(images_u8)["cls"].argmax(-1).numpy()  # [N, 9] class per grid cell (0 = empty)
    colour = shape = objects = position = 0
    for row, sample in zip(cls, samples, strict=True):
        for obj in sample.objects:
            labels = class_labels(int(row[obj.position]))
            objects += 1
            if labels is not None:
                colour += labels[0] == obj.colour
                shape += labels[1] == obj.shape
        position += {i for i, c in enumerate(row) if c != 0} == {o.position for o in sample.objects}
    return {"colour": colour / objects, "shape": shape / objects, "position": position / len(samples)}


def _interval(values: np.ndarray) -> list[float]:
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    return [float(values.mean() - half), float(values.mean() + half)]


def score(label: str, out_u8: np.ndarray, hr: torch.Tensor, samples, passes: float, seconds: float,
          note: str = "") -> dict[str, Any]:
    from ..eval.restoration import psnr, ssim
    from ..pipelines.testbed.shapes_net import fid_shapes

    ref = hr.permute(0, 2, 3, 1).numpy().astype(np.float64)
    out = out_u8.astype(np.float64) / 255.0
    p, s = psnr(out, ref), ssim(out, ref)
    return {"row": label, "psnr": float(p.mean()), "psnr_ci95": _interval(p), "ssim": float(s.mean()),
            "ssim_ci95": _interval(s), "fid_shapes": fid_shapes(out_u8), **attribute_accuracy(out_u8, samples),
            "passes": passes, "seconds": seconds, "note": note, "psnr_per_image": p.tolist()}


class PassCounter:
    """Counts denoiser forward calls (one call = one pass for the whole batch)."""

    def __init__(self, module: torch.nn.Module):
        self.count = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.count += 1

    def close(self) -> None:
        self.handle.remove()


def timed(fn, unet=None) -> tuple[torch.Tensor, float, int]:
    counter = PassCounter(unet) if unet is not None else None
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    passes = counter.count if counter else 0
    if counter:
        counter.close()
    return out, seconds, passes


def run_degradation(degradation: str, runs_dir: Path, num_images: int, seed: int, vae) -> tuple[list, list]:
    from diffusers import UNet2DModel

    from ..pipelines.resshift.baselines import ddpm_sr, regression_sr
    from ..pipelines.resshift.degrade import bicubic_up
    from ..pipelines.resshift.latents import decode, encode
    from ..pipelines.resshift.pipeline import ResShiftPipeline
    from ..pipelines.testbed.train_common import dataset
    from ..train.resshift import sr_data

    data = sr_data(vae, degradation, 4, "test", num_images)
    _, samples = dataset("test", num_images)
    hr, lr = data["hr"], data["lr"]
    rows, missing = [], []
    out, sec, _ = timed(lambda: to_unit(hr * 2 - 1))
    rows.append(score("HR ground truth (reference)", out, hr, samples, 0, 0.0, "the target itself"))
    out, sec, _ = timed(lambda: to_unit(decode(vae, encode(vae, hr * 2 - 1))))
    rows.append(score("HR through the VAE (ceiling)", out, hr, samples, 0, sec, "decode(encode(HR)): the best any "
                      "latent method can do"))
    out, sec, _ = timed(lambda: to_unit(bicubic_up(lr, 4)))
    rows.append(score("bicubic", out, hr, samples, 0, sec))

    def folder(run: str) -> Path | None:
        path = runs_dir / f"{run}-{degradation}"
        if run == "resshift4" and degradation == "bicubic":
            from ..pipelines.testbed.registry import testbed_path

            try:
                return testbed_path("resshift")
            except FileNotFoundError:
                pass
        if not (path / "unet").is_dir():
            missing.append({"run": f"{run}-{degradation}", "command": train_command(run, degradation, str(runs_dir))})
            return None
        return path

    gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
    if (path := folder("regression")) is not None:
        unet = UNet2DModel.from_pretrained(str(path / "unet")).eval()
        out, sec, n = timed(lambda: to_unit(regression_sr(unet, vae, lr)), unet)
        rows.append(score("regression (same UNet, 1 pass)", out, hr, samples, n, sec, str(path)))
    if (path := folder("ddpm")) is not None:
        unet = UNet2DModel.from_pretrained(str(path / "unet")).eval()
        for steps in (50, 4):
            out, sec, n = timed(lambda s=steps: to_unit(ddpm_sr(unet, vae, lr, s, gen())), unet)
            rows.append(score(f"DDPM (SR3-style) {steps} steps", out, hr, samples, n, sec, f"{path}; DDIM trailing"))
    for run, label in (("resshift4", "ResShift 4 steps"), ("resshift15", "ResShift 15 steps")):
        if (path := folder(run)) is None:
            continue
        pipe = ResShiftPipeline.from_pretrained(str(path), trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        pipe.vae = vae  # the same VAE object for every row (identical weights: checked by the tests)
        out, sec, n = timed(lambda p=pipe: to_unit(p(image=(lr + 1) / 2, generator=gen(), output_type="pt")
                                                   .images * 2 - 1), pipe.unet)
        rows.append(score(label, out, hr, samples, n, sec, str(path)))
    return rows, missing


def targets(rows: list[dict]) -> dict[str, Any]:
    """The issue's targets for ResShift 4 steps, each with the numbers it compares."""
    by = {r["row"]: r for r in rows}
    rs, bic = by.get("ResShift 4 steps"), by.get("bicubic")
    d50, d4 = by.get("DDPM (SR3-style) 50 steps"), by.get("DDPM (SR3-style) 4 steps")
    out: dict[str, Any] = {}
    if rs and bic:
        diff = np.array(rs["psnr_per_image"]) - np.array(bic["psnr_per_image"])
        out["psnr_gain_over_bicubic_db"] = {"value": float(diff.mean()), "ci95": _interval(diff),
                                            "target": ">= 3", "met": bool(diff.mean() >= 3.0)}
    cols = ("fid_shapes", "colour", "shape", "position")
    if rs and d50:
        out["vs_ddpm50"] = {c: {"resshift4": rs[c], "ddpm50": d50[c],
                                "met": bool(rs[c] <= d50[c] if c == "fid_shapes" else rs[c] >= d50[c])}
                            for c in cols}
        out["vs_ddpm50"]["pass_ratio"] = d50["passes"] / max(rs["passes"], 1)
    if rs and d4:
        out["vs_ddpm4"] = {c: {"resshift4": rs[c], "ddpm4": d4[c],
                               "met": bool(rs[c] <= d4[c] if c == "fid_shapes" else rs[c] > d4[c])}
                           for c in ("psnr", "ssim", *cols)}
    return out


def table(report: dict[str, Any]) -> str:
    lines = []
    for deg, block in report["degradations"].items():
        lines += [f"### {deg} ×4 (16x16 → 64x64), {report['num_images']} held-out images", "",
                  "| row | PSNR dB (95% CI) | SSIM | FID-shapes ↓ | colour | shape | position | passes | wall s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in block["rows"]:
            lo, hi = r["psnr_ci95"]
            psnr_cell = "∞ (identical)" if r["psnr"] >= 100 else f"{r['psnr']:.2f} ({lo:.2f}–{hi:.2f})"
            lines.append(f"| {r['row']} | {psnr_cell} | {r['ssim']:.4f} | "
                         f"{r['fid_shapes']:.1f} | {100 * r['colour']:.1f} % | {100 * r['shape']:.1f} % | "
                         f"{100 * r['position']:.1f} % | {r['passes']} | {r['seconds']:.2f} |")
        for m in block["missing"]:
            lines.append(f"| {m['run']}: not trained (`{m['command']}`) | | | | | | | | |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusion_accel.benchmarks.super_resolution", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs_dir", default="runs/sr")
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--degradations", nargs="+", default=list(DEGRADATIONS), choices=DEGRADATIONS)
    parser.add_argument("--out", default="docs/results/super_resolution")
    parser.add_argument("--vae", default="testbed:resshift",
                        help="the pipeline (testbed:<name>, a folder) whose VAE every row decodes with")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ..train.resshift import load_vae

    vae = load_vae(args.vae).eval()
    report: dict[str, Any] = {"num_images": args.num_images, "seed": args.seed, "threads": args.threads,
                              "split": "test", "vae": args.vae, "degradations": {}}
    for deg in args.degradations:
        rows, missing = run_degradation(deg, Path(args.runs_dir), args.num_images, args.seed, vae)
        report["degradations"][deg] = {"rows": rows, "missing": missing, "targets": targets(rows)}
    text = table(report)
    print(text)
    for deg, block in report["degradations"].items():
        print(deg, json.dumps(block["targets"], indent=1, default=float))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "super_resolution.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "super_resolution.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
