"""``--train_data_dir``: reading an imagefolder (metadata.jsonl / .csv), resize and crop, deterministic flips and
subsets, the errors for bad folders, and a 2-step LCD run on a folder (fast, tiny pipeline)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion_accel.train import options as opts_mod
from diffusion_accel.train.image_folder import (
    ImageFolderError,
    load_image_folder,
    resize_and_crop,
    scan_image_folder,
    select_rows,
)
from diffusion_accel.train.lcd import LCDOptions
from diffusion_accel.train.rglcd import RGLCD, RGLCDOptions

CAPTIONS = ["a red circle", "a blue square in the top left", "a large green triangle", "a small red square"]


def _image(index: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A left-right asymmetric image (so its mirror differs) that differs per index."""
    w, h = size
    x = np.zeros((h, w, 3), np.uint8)
    x[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]  # red ramps up left to right
    x[..., 1] = (index * 60) % 256
    x[: h // 2, : w // 3, 2] = 255
    return Image.fromarray(x)


def _folder(root: Path, captions=CAPTIONS, fmt: str = "jsonl", sub: str = "") -> Path:
    folder = root / "data"
    (folder / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for i, caption in enumerate(captions):
        name = f"img/{i:04d}.png"
        (folder / sub / "img").mkdir(exist_ok=True)
        _image(i).save(folder / sub / name)
        rows.append({"file_name": name, "text": caption, "id": i})
    if fmt == "jsonl":
        (folder / sub / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:  # a hand-written CSV: a space after each comma, a quoted caption holding a comma
        lines = ["file_name, text, id"] + [f'{r["file_name"]}, "{r["text"]}, ok", {r["id"]}' for r in rows]
        (folder / sub / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_reads_jsonl_csv_and_nested_metadata(tmp_path):
    folder = scan_image_folder(_folder(tmp_path / "a"))
    assert [r.captions for r in folder.rows] == [(c,) for c in CAPTIONS]
    assert folder.columns == ["file_name", "text", "id"]
    images, captions = load_image_folder(folder, 32, center_crop=True)
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8 and captions == CAPTIONS

    csv_folder = scan_image_folder(_folder(tmp_path / "b", fmt="csv"))
    assert [r.captions[0] for r in csv_folder.rows] == [f"{c}, ok" for c in CAPTIONS]
    csv_images, _ = load_image_folder(csv_folder, 32, center_crop=True)
    np.testing.assert_array_equal(csv_images, images)  # same pixels whichever metadata format

    nested = scan_image_folder(_folder(tmp_path / "c", sub="train"))  # file names relative to train/
    assert len(nested.rows) == 4 and nested.rows[0].image == (tmp_path / "c/data/train/img/0000.png").resolve()

    other = tmp_path / "d"
    _folder(other)
    meta = other / "data" / "metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    for r in rows:  # --image_column naming another column of paths; list captions (one is chosen per image)
        r["path"], r["text"] = r.pop("file_name"), [r["text"], r["text"] + " again"]
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    listed = scan_image_folder(other / "data", image_column="path")
    _, picked = load_image_folder(listed, 32, seed=3)
    assert all(p in (c, c + " again") for p, c in zip(picked, CAPTIONS, strict=True))
    assert load_image_folder(listed, 32, seed=3)[1] == picked


def test_resize_then_center_or_seeded_random_crop():
    # 80 x 40, left half red and right half blue: the shorter side goes to 32, the width to 64
    x = np.zeros((40, 80, 3), np.uint8)
    x[:, :40, 0] = 255
    x[:, 40:, 2] = 255
    image = Image.fromarray(x)
    centre = resize_and_crop(image, 32, center_crop=True, rng=None)
    assert centre.shape == (32, 32, 3)
    assert centre[:, :14, 0].min() > 240 and centre[:, 18:, 2].min() > 240  # the crop straddles the boundary
    crops = [resize_and_crop(image, 32, False, np.random.default_rng(s)) for s in range(8)]
    assert len({c.tobytes() for c in crops}) > 1  # random offsets along the long side
    np.testing.assert_array_equal(resize_and_crop(image, 32, False, np.random.default_rng(5)), crops[5])
    # an image smaller than the resolution is enlarged, never padded
    assert resize_and_crop(Image.fromarray(x[:10, :20]), 32, True, None).shape == (32, 32, 3)


def test_flip_and_subset_are_deterministic(tmp_path):
    folder = scan_image_folder(_folder(tmp_path, captions=[f"caption {i}" for i in range(10)]))
    images, captions = load_image_folder(folder, 32, random_flip=True, seed=1)
    assert images.shape[0] == 20 and captions[:10] == captions[10:]
    np.testing.assert_array_equal(images[10:], images[:10, :, ::-1])  # every image and its mirror
    assert not np.array_equal(images[10:], images[:10])
    again, _ = load_image_folder(folder, 32, random_flip=True, seed=1)
    np.testing.assert_array_equal(again, images)  # same seed, same crops: a resume re-encodes the same latents
    other, _ = load_image_folder(folder, 32, random_flip=True, seed=2)
    assert not np.array_equal(other, images)  # the random crops follow the seed

    _, subset = load_image_folder(folder, 32, max_train_samples=4, seed=7)
    assert len(subset) == 4 and subset == load_image_folder(folder, 32, max_train_samples=4, seed=7)[1]
    assert len({tuple(select_rows(10, 4, s)) for s in range(6)}) > 1
    assert select_rows(10, 50, 0).tolist() == list(range(10))


def _write(folder: Path, name: str, text: str) -> None:
    (folder / name).write_text(text)


@pytest.mark.parametrize("breakage, kwargs, message", [
    (lambda d: None, {"train_data_dir_suffix": "-missing"}, "does not exist; pass the folder"),
    (lambda d: (d / "metadata.jsonl").unlink(), {}, r"no metadata.jsonl or metadata.csv \(4 image files found\)"),
    (lambda d: _write(d, "metadata.jsonl", '{"file_name": "img/0000.png", "text": "a"}\n'
                                           '{"file_name": "img/0099.png", "text": "b"}\n'),
     {}, r"1 metadata row\(s\) name an image that does not exist \(metadata.jsonl line 2: img/0099.png\)"),
    (lambda d: _write(d, "metadata.jsonl", '{"file_name": "img/0000.png", "text": ""}\n'
                                           '{"file_name": "img/0001.png", "text": "  "}\n'),
     {}, r"empty caption in column 'text' \(the whole column is empty\)"),
    (lambda d: None, {"caption_column": "caption"},
     r"--caption_column 'caption' is not a metadata column \(columns found: file_name, text, id\)"),
    (lambda d: None, {"image_column": "picture"}, r"no column 'picture' \(columns found: file_name, text, id\)"),
    (lambda d: _write(d, "metadata.jsonl", '{"path": "img/0000.png", "text": "a"}\n'), {},
     r"--image_column 'image'.*no column 'file_name' \(columns found: path, text\)"),
    (lambda d: (d / "img" / "0002.png").write_bytes(b"not an image"), {},
     r"1 image\(s\) cannot be read by Pillow \(metadata.jsonl line 3: 0002.png"),
    (lambda d: _write(d, "metadata.jsonl", '{"file_name": "img/0000.png", "text": "a"}\nnot json\n'), {},
     "line 2 is not JSON"),
    (lambda d: _write(d, "metadata.csv", "file_name,text\n"), {}, "holds both a metadata.jsonl and a metadata.csv"),
    (lambda d: _write(d, "metadata.jsonl", '{"file_name": "img/0000.png", "text": 3}\n'), {},
     "are not text or lists of text"),
])
def test_bad_folders_name_the_fix_and_are_left_alone(tmp_path, breakage, kwargs, message):
    folder = _folder(tmp_path)
    breakage(folder)
    before = _snapshot(folder)
    target = str(folder) + kwargs.pop("train_data_dir_suffix", "")
    with pytest.raises(ImageFolderError, match=message):
        scan_image_folder(target, **kwargs)
    # the same check runs when the options are built, i.e. before a run claims --output_dir or loads a model
    values = {"output_dir": str(tmp_path / "out"), "train_data_dir": target, **kwargs}
    with pytest.raises(ValueError, match=message):
        opts_mod.build_options(LCDOptions, values)
    assert _snapshot(folder) == before and not (tmp_path / "out").exists()


def test_folder_flags_without_a_folder_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--random_flip, --max_train_samples only apply to --train_data_dir"):
        opts_mod.parse_options(LCDOptions, ["--output_dir", "o", "--random_flip", "--max_train_samples", "3"], "t")
    with pytest.raises(ValueError, match="--max_train_samples must be >= 1"):
        opts_mod.build_options(LCDOptions, {"output_dir": "o", "train_data_dir": str(_folder(tmp_path)),
                                            "max_train_samples": 0})
    assert opts_mod.build_options(LCDOptions, {"output_dir": "o"}).data_record()["source"] == "shapes"


def test_rglcd_needs_captions_its_reward_can_read(tmp_path):
    def check(captions, *flags):
        recipe = RGLCD.__new__(RGLCD)  # the caption check alone: no teacher needed
        folder = _folder(tmp_path / str(len(list(tmp_path.iterdir()))), captions=captions)
        recipe.options = opts_mod.parse_options(RGLCDOptions, ["--output_dir", "o", "--train_data_dir",
                                                               str(folder), *flags], "t")
        recipe.image_folder = recipe.options.image_folder()
        recipe._check_reward_captions()

    check(["a red circle", "a small blue square in the center"], "--random_flip")  # no side named: flips are fine
    with pytest.raises(ValueError, match=r"1 caption\(s\) of --train_data_dir are not .*a photo of a cat.*lcd"):
        check(["a red circle", "a photo of a cat"])
    check(["a red circle in the top left"])
    with pytest.raises(ValueError, match="drop --random_flip"):
        check(["a red circle in the top left"], "--random_flip")


def test_lcd_trains_on_a_folder_and_records_it(tmp_path):
    from diffusion_accel.train import train

    folder = _folder(tmp_path)
    out = tmp_path / "run"
    flags = dict(pretrained_teacher_model="tiny:pixart_alpha", guidance_scale=4.0, resolution=32, train_batch_size=2,
                 validation_steps=0, checkpointing_steps=0, output_dir=str(out), train_data_dir=str(folder),
                 random_flip=True, max_train_samples=3)
    record = train("lcd", max_train_steps=2, **flags)
    assert record["steps"] == 2 and np.isfinite(record["final_logs"]["loss"])
    data = json.loads((out / "training_run.json").read_text())["data"]
    assert data["source"] == "image_folder" and data["train_data_dir"] == str(folder.resolve())
    assert (data["num_rows"], data["num_images"], data["num_samples"]) == (4, 3, 6)
    assert data["metadata_files"] == ["metadata.jsonl"] and len(data["fingerprint_sha256"]) == 64
    assert (out / "model_index.json").is_file()

    # resuming on the same files continues; on edited captions it is refused before training
    assert train("lcd", max_train_steps=3, resume_from_checkpoint="latest", **flags)["steps_this_session"] == 1
    meta = folder / "metadata.jsonl"
    meta.write_text(meta.read_text().replace("a red circle", "a blue circle"))
    with pytest.raises(ValueError, match="trained on other data \\(fingerprint_sha256 differ"):
        train("lcd", max_train_steps=4, resume_from_checkpoint="latest", **flags)
