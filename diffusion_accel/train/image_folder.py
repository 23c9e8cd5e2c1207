"""Training images from your own folder: the ``imagefolder`` layout of Diffusers' training examples.

A folder of images with a metadata file that captions them, the layout ``datasets``' ``imagefolder`` builder reads
and Diffusers' ``--train_data_dir`` expects::

    my_data/
      metadata.jsonl        {"file_name": "0001.png", "text": "a red circle"}   (one JSON object per line)
      0001.png              or metadata.csv with a header: file_name,text
      photos/0002.jpg       file_name is relative to the metadata file's own folder

Metadata files may also sit in subfolders (``my_data/train/metadata.jsonl``); every one under the folder is read, in
path order. Images no metadata row names are not used. The image column ``image`` (``--image_column``, the default)
is the ``file_name`` column, as ``imagefolder`` names it; another ``--image_column`` names a metadata column that
holds relative image paths. The caption column (``--caption_column``, default ``text``) holds a string, or a list of
strings of which one per image is used (chosen from ``--seed``; Diffusers' examples draw one at random per step).

This module needs only Pillow (no ``datasets``). :func:`scan_image_folder` checks a folder without decoding it (it
runs in ``options.validate``, before any model is loaded or any file is written); :func:`load_image_folder` decodes,
resizes and crops the images into the ``(uint8 [N, H, W, 3], captions)`` pair the recipes pre-encode.

The recipes encode every training image once and index the latents from a stream that is a pure function of
``(seed, step)`` (:mod:`.data`), so augmentations are fixed when encoding, not redrawn per epoch as torchvision's
transforms in Diffusers' examples are:

* ``--random_flip`` stores each image *and* its mirror image (2N samples): a uniform draw over them picks an image
  uniformly and mirrors it with probability 1/2, which is exactly ``RandomHorizontalFlip`` for every draw. Do not
  use it with captions that name left and right.
* without ``--center_crop``, each image gets one random crop, drawn from ``(seed, its row number)``: the same in
  every epoch, every process and after a resume.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .options import TrainOptions

METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
#: ``imagefolder``'s name for the image that the ``file_name`` column points at.
DEFAULT_IMAGE_COLUMN = "image"
FILE_NAME_COLUMN = "file_name"
DEFAULT_CAPTION_COLUMN = "text"
#: How many offending rows an error message lists before "... and N more".
_SHOWN = 5
# Tags that keep the crop and caption-choice generators apart from each other and from the batch stream's
# ``(seed, step, micro)`` generators.
_CROP_STREAM = 0x63726F70
_CAPTION_STREAM = 0x63617074


class ImageFolderError(ValueError):
    """A training folder that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class FolderRow:
    """One metadata row: the image it names and its caption(s)."""

    image: Path
    captions: tuple[str, ...]
    where: str  # "metadata.jsonl line 3", for messages


@dataclass
class ImageFolder:
    """A checked training folder: its metadata files, their columns and the rows, in file then row order."""

    root: Path
    metadata_files: list[Path]
    columns: list[str]
    image_column: str
    caption_column: str
    rows: list[FolderRow] = field(default_factory=list)

    def fingerprint(self) -> str:
        """SHA-256 of the metadata files' bytes and the images' sizes: changes when a caption or an image does."""
        digest = hashlib.sha256()
        for path in self.metadata_files:
            digest.update(str(path.relative_to(self.root)).encode())
            digest.update(path.read_bytes())
        for row in self.rows:
            digest.update(f"{row.image.relative_to(self.root)}:{row.image.stat().st_size}".encode())
        return digest.hexdigest()


def _listing(items: list[str]) -> str:
    shown = "; ".join(items[:_SHOWN])
    return shown + (f"; ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def _read_jsonl(path: Path, shown: str) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue  # a trailing blank line is common and harmless
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ImageFolderError(f"{path} line {number} is not JSON ({exc.msg}); each line of metadata.jsonl "
                                       'is one object such as {"file_name": "0001.png", "text": "a caption"}.'
                                       ) from exc
            if not isinstance(record, dict):
                raise ImageFolderError(f"{path} line {number} is a JSON {type(record).__name__}, not an object; write "
                                       '{"file_name": "0001.png", "text": "a caption"} per line.')
            rows.append((f"{shown} line {number}", record))
    return rows


def _read_csv(path: Path, shown: str) -> list[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8", newline="") as fh:
        # skipinitialspace: "file_name, text" headers (a space after the comma) are common in hand-written files
        reader = csv.DictReader(fh, skipinitialspace=True)
        if not reader.fieldnames:
            raise ImageFolderError(f"{path} is empty; its first line must be a header such as file_name,text.")
        reader.fieldnames = [name.strip() for name in reader.fieldnames]
        # data rows start on line 2 (after the header); DictReader puts surplus cells under the key None
        return [(f"{shown} line {number}", {k: v for k, v in row.items() if k is not None})
                for number, row in enumerate(reader, 2)]


def _metadata_files(root: Path) -> list[Path]:
    found = sorted(p for name in METADATA_NAMES for p in root.rglob(name) if p.is_file())
    folders: dict[Path, list[Path]] = {}
    for path in found:
        folders.setdefault(path.parent, []).append(path)
    both = [str(p) for paths in folders.values() if len(paths) > 1 for p in paths]
    if both:
        raise ImageFolderError(f"{', '.join(both)}: one folder holds both a metadata.jsonl and a metadata.csv; "
                               "keep one of them (they would caption the same images twice).")
    return found


def scan_image_folder(train_data_dir: str | Path, image_column: str = DEFAULT_IMAGE_COLUMN,
                      caption_column: str = DEFAULT_CAPTION_COLUMN, check_images: bool = True) -> ImageFolder:
    """Read and check ``train_data_dir``'s metadata without decoding any image.

    Raises :class:`ImageFolderError` naming the fix for: a missing folder, no metadata file, an unknown image or
    caption column (listing the columns found), rows naming missing images, empty or non-text captions, and (with
    ``check_images``) files Pillow cannot identify as images. Nothing is written."""
    root = Path(train_data_dir)
    flag = f"--train_data_dir {train_data_dir}"
    if not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        raise ImageFolderError(f"{flag} {what}; pass the folder that holds your images and their metadata.jsonl (or "
                               "metadata.csv).")
    root = root.resolve()
    metadata = _metadata_files(root)
    if not metadata:
        images = sum(1 for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        raise ImageFolderError(f"{flag} has no metadata.jsonl or metadata.csv ({images} image files found). Add "
                               "a metadata.jsonl with one line per image, e.g. "
                               '{"file_name": "0001.png", "text": "a caption"}, beside the images.')
    records: list[tuple[Path, str, dict[str, Any]]] = []
    columns: list[str] = []
    for path in metadata:
        shown = str(path.relative_to(root))  # names a row in messages: "train/metadata.jsonl line 3"
        rows = _read_jsonl(path, shown) if path.suffix == ".jsonl" else _read_csv(path, shown)
        for where, record in rows:
            records.append((path, where, record))
            columns += [c for c in record if c not in columns]
    if not records:
        raise ImageFolderError(f"{flag}: {', '.join(str(p) for p in metadata)} hold no rows; add one row per image.")

    file_column = FILE_NAME_COLUMN if image_column == DEFAULT_IMAGE_COLUMN else image_column
    found = ", ".join(columns)
    if file_column not in columns:
        hint = (f"the default image column {DEFAULT_IMAGE_COLUMN!r} reads the {FILE_NAME_COLUMN!r} column, as "
                "Diffusers' imagefolder does; name each row's image file there" if image_column ==
                DEFAULT_IMAGE_COLUMN else "pass --image_column with the column that holds the image paths (or "
                f"leave it at {DEFAULT_IMAGE_COLUMN!r} to read {FILE_NAME_COLUMN!r})")
        raise ImageFolderError(f"--image_column {image_column!r}: the metadata has no column {file_column!r} "
                               f"(columns found: {found}); {hint}.")
    if caption_column not in columns:
        raise ImageFolderError(f"--caption_column {caption_column!r} is not a metadata column (columns found: "
                               f"{found}); pass --caption_column with the column that holds the captions.")

    out: list[FolderRow] = []
    no_file, missing, empty, not_text, unreadable = [], [], [], [], []
    for path, where, record in records:
        name = record.get(file_column)
        if not isinstance(name, str) or not name.strip():
            no_file.append(where)
            continue
        image = (path.parent / name.strip()).resolve()
        if not image.is_file():
            missing.append(f"{where}: {name}")
            continue
        caption = record.get(caption_column, "")
        caption = "" if caption is None else caption  # a JSON null or a short CSV row: no caption
        captions = (caption,) if isinstance(caption, str) else tuple(caption) if isinstance(caption, list) else None
        if captions is None or not all(isinstance(c, str) for c in captions):
            not_text.append(f"{where}: {caption!r}")
            continue
        captions = tuple(c.strip() for c in captions if c.strip())
        if not captions:
            empty.append(where)
            continue
        out.append(FolderRow(image, captions, where))
    if no_file:
        raise ImageFolderError(f"{len(no_file)} metadata row(s) name no image in column {file_column!r} "
                               f"({_listing(no_file)}); give every row its image's file name (relative to the "
                               "metadata file).")
    if missing:
        raise ImageFolderError(f"{len(missing)} metadata row(s) name an image that does not exist "
                               f"({_listing(missing)}); file names are relative to the metadata file's folder: "
                               "fix them or remove those rows.")
    if not_text:
        raise ImageFolderError(f"{len(not_text)} caption(s) in column {caption_column!r} are not text or lists of text "
                               f"({_listing(not_text)}); --caption_column must name a column of strings.")
    if empty:
        every = " (the whole column is empty)" if len(empty) == len(records) else ""
        raise ImageFolderError(f"{len(empty)} row(s) have an empty caption in column {caption_column!r}{every} "
                               f"({_listing(empty)}); write a caption for each image, remove those rows, or pass the "
                               f"--caption_column that holds the captions (columns found: {found}).")
    if check_images:
        from PIL import Image, UnidentifiedImageError

        for row in out:
            try:
                with Image.open(row.image) as im:  # reads the header only
                    if min(im.size) < 1:
                        raise OSError("zero-sized image")
            except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
                unreadable.append(f"{row.where}: {row.image.name} ({type(exc).__name__})")
        if unreadable:
            raise ImageFolderError(f"{len(unreadable)} image(s) cannot be read by Pillow ({_listing(unreadable)}); "
                                   "replace them with PNG/JPEG/WebP files or remove their rows.")
    return ImageFolder(root, metadata, columns, image_column, caption_column, out)


def select_rows(num_rows: int, max_train_samples: int | None, seed: int) -> np.ndarray:
    """Row numbers used for training: all of them, or ``max_train_samples`` chosen by ``seed`` (Diffusers' examples
    shuffle with the seed and take the first ones; the order does not matter here, so they stay sorted)."""
    if max_train_samples is None or max_train_samples >= num_rows:
        return np.arange(num_rows)
    return np.sort(np.random.default_rng(seed).permutation(num_rows)[:max_train_samples])


def resize_and_crop(image, resolution: int, center_crop: bool, rng: np.random.Generator | None) -> np.ndarray:
    """A PIL RGB image → uint8 ``[resolution, resolution, 3]``: the shorter side resized to ``resolution``
    (bicubic; Pillow widens the filter when shrinking, so downscaling is antialiased), then a square crop, central
    or at an offset drawn from ``rng`` (Diffusers' ``Resize`` + ``CenterCrop`` / ``RandomCrop``)."""
    from PIL import Image

    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    spare_x, spare_y = size[0] - resolution, size[1] - resolution
    if center_crop or rng is None:
        left, top = int(round(spare_x / 2)), int(round(spare_y / 2))
    else:
        left, top = int(rng.integers(0, spare_x + 1)), int(rng.integers(0, spare_y + 1))
    return np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)


def open_rgb(path: Path, resolution: int | None = None):
    """The image at ``path`` as RGB, upright (EXIF orientation applied, as a photo viewer shows it).

    ``resolution`` lets JPEG decoding skip detail it would throw away (``draft`` keeps both sides ≥ it)."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        if resolution is not None:
            im.draft("RGB", (resolution, resolution))
        return ImageOps.exif_transpose(im).convert("RGB")


def load_image_folder(folder: ImageFolder, resolution: int, center_crop: bool = False, random_flip: bool = False,
                      max_train_samples: int | None = None, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Decode ``folder`` into uint8 ``[N, resolution, resolution, 3]`` images and their captions.

    Deterministic given ``seed``: the subset (``max_train_samples``), each random crop and each caption chosen from
    a list depend only on the seed and the row number. With ``random_flip`` the mirror images follow the originals
    (``2N`` samples, captions repeated)."""
    from PIL import Image

    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    images, captions = [], []
    for index in select_rows(len(folder.rows), max_train_samples, seed).tolist():
        row = folder.rows[index]
        try:
            rgb = open_rgb(row.image, resolution)
        except (OSError, Image.DecompressionBombError) as exc:  # truncated or corrupt past the header
            raise ImageFolderError(f"{row.where}: {row.image} cannot be decoded ({exc}); replace the file or remove "
                                   "its row.") from exc
        crop_rng = None if center_crop else np.random.default_rng((seed, _CROP_STREAM, index))
        images.append(resize_and_crop(rgb, resolution, center_crop, crop_rng))
        if len(row.captions) == 1:
            captions.append(row.captions[0])
        else:
            pick = np.random.default_rng((seed, _CAPTION_STREAM, index)).integers(len(row.captions))
            captions.append(row.captions[int(pick)])
    stacked = np.stack(images)
    if random_flip:
        stacked = np.concatenate([stacked, stacked[:, :, ::-1]])
        captions = captions + captions
    return np.ascontiguousarray(stacked), captions


@dataclass
class ImageFolderOptions(TrainOptions):
    """Options of recipes that train on images: the shapes set, or your folder with ``--train_data_dir``."""

    train_data_dir: str | None = field(default=None, metadata={
        "help": "train on this image folder (metadata.jsonl or metadata.csv with file_name and caption columns) "
                "instead of the testbed shapes set"})
    image_column: str = field(default=DEFAULT_IMAGE_COLUMN, metadata={
        "help": "--train_data_dir: the image column ('image' = the file_name column, as imagefolder names it; else "
                "a metadata column of relative image paths)"})
    caption_column: str = field(default=DEFAULT_CAPTION_COLUMN, metadata={
        "help": "--train_data_dir: the metadata column of captions (a string or a list of strings per image)"})
    center_crop: bool = field(default=False, metadata={
        "help": "--train_data_dir: crop the centre after resizing (default: one random crop per image, from --seed)"})
    random_flip: bool = field(default=False, metadata={
        "help": "--train_data_dir: also train on each image's mirror image (2x the samples; not for captions that "
                "name left and right)"})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "--train_data_dir: use at most N images, chosen by --seed (the shapes set: --num_train_samples)"})

    def validate(self) -> None:
        super().validate()
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"--max_train_samples must be >= 1 (or left out to use every image), got "
                             f"{self.max_train_samples}.")
        if self.train_data_dir is None:
            defaults = {"image_column": DEFAULT_IMAGE_COLUMN, "caption_column": DEFAULT_CAPTION_COLUMN,
                        "center_crop": False, "random_flip": False, "max_train_samples": None}
            given = [f"--{k}" for k, v in defaults.items() if getattr(self, k) != v]
            if given:
                raise ValueError(f"{', '.join(given)} only apply to --train_data_dir (your own image folder); pass "
                                 "--train_data_dir, or drop them to train on the shapes set.")
            return
        self.image_folder()

    def image_folder(self) -> ImageFolder:
        """The checked ``--train_data_dir`` (raises :class:`ImageFolderError` naming the fix)."""
        if self.train_data_dir is None:
            raise ValueError("no --train_data_dir given")
        return scan_image_folder(self.train_data_dir, self.image_column, self.caption_column)

    def data_record(self, folder: ImageFolder | None = None) -> dict[str, Any]:
        """What ``training_run.json`` says about the training data."""
        if self.train_data_dir is None:
            return {"source": "shapes", "first_index": self.dataloader_seed_offset, "num_images":
                    self.num_train_samples}
        folder = folder or self.image_folder()
        used = len(select_rows(len(folder.rows), self.max_train_samples, self.seed))
        return {"source": "image_folder", "train_data_dir": str(folder.root),
                "metadata_files": [str(p.relative_to(folder.root)) for p in folder.metadata_files],
                "image_column": self.image_column, "caption_column": self.caption_column,
                "num_rows": len(folder.rows), "num_images": used,
                "num_samples": used * (2 if self.random_flip else 1), "center_crop": self.center_crop,
                "random_flip": self.random_flip, "fingerprint_sha256": folder.fingerprint()}
