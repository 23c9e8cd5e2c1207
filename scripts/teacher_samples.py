"""Write a teacher's own samples as a training folder (the ``imagefolder`` layout ``--train_data_dir`` reads).

LCD trains its consistency function on states x_t ~ q(x_t | x_0) of the training images; at inference the student
walks the teacher's *guided* ODE, whose states concentrate on what CFG at scale w makes of each caption. With x_0
taken from the teacher's own CFG samples instead of the data, training states lie on the trajectories the student
is asked to reproduce. This script makes such a folder from the testbed data's captions (the same captions, in the
same order, as ``--num_train_samples`` / ``--dataloader_seed_offset`` take from the shapes set), each sampled at the
teacher's sampler contract with seed = its index.

    python scripts/teacher_samples.py --teacher testbed:pixart --count 4096 --out runs/pixart-teacher-samples
    diffusion-accel train lcd --config pixart-lcm --train_data_dir runs/pixart-teacher-samples --output_dir runs/lcd-ts
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="testbed:pixart")
    parser.add_argument("--count", type=int, default=4096)
    parser.add_argument("--start", type=int, default=200_000, help="first caption index of the shapes set")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from diffusion_accel.pipelines.testbed.train_common import dataset

    from diffusion_accel.loading import base_call_kwargs, load_pipeline

    out = Path(args.out)
    if out.exists():  # never mix two runs' samples in one folder
        parser.error(f"--out {out} exists; pass a new folder")
    _, samples = dataset("train", args.count, start=args.start)
    captions = [s.caption for s in samples]
    pipe = load_pipeline(args.teacher)
    out.mkdir(parents=True)  # only once the teacher has loaded: a bad --teacher leaves no folder behind
    pipe.set_progress_bar_config(disable=True)
    kwargs = base_call_kwargs(args.teacher)
    started = time.monotonic()
    with open(out / "metadata.jsonl", "w") as meta:
        for first in range(0, args.count, args.batch):
            chunk = captions[first:first + args.batch]
            generators = [torch.Generator().manual_seed(first + i) for i in range(len(chunk))]
            images = pipe(chunk, generator=generators, output_type="pil", **kwargs).images
            for i, (image, caption) in enumerate(zip(images, chunk, strict=True)):
                name = f"{first + i:05d}.png"
                image.save(out / name)
                meta.write(json.dumps({"file_name": name, "text": caption}) + "\n")
            print(f"{first + len(chunk)}/{args.count} ({(time.monotonic() - started) / 60:.1f} min)", flush=True)
    (out / "teacher.json").write_text(json.dumps({"teacher": args.teacher, "start": args.start,
                                                  "count": args.count, "call": {k: v for k, v in kwargs.items()
                                                                                 if isinstance(v, (int, float, str))}},
                                                 indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
