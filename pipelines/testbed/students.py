"""Ship a distilled student of a testbed pipeline into ``assets/`` (``testbed:pixart-lcm``, ``testbed:pixart-rglcd``,
the video students ``testbed:wan-tdm`` and ``testbed:wan-blade``), or a restoration pipeline trained in the testbed
VAE's latent space (``testbed:resshift``).

A training run's folder holds checkpoints, validation grids and logs besides the pipeline; the shipped folder keeps
the pipeline only. The student's frozen components (VAE, text encoder, tokenizer) are the teacher's, byte for byte,
so they are linked to the teacher's folder (relative symlinks) instead of stored twice: ``assets/`` stays under its
50 MB budget, and ``from_pretrained`` and the wheel build follow the links.

A restoration pipeline may ship its own VAE instead (``--vae``): the teacher's encoder (the latent space the network
was trained in, checked tensor for tensor) with a decoder fine-tuned for it (``train("resshift-vae", ...)``,
:data:`~.train.RESSHIFT_VAE_RECIPE`). That VAE and the network are then stored in fp16, so the folder fits the
budget without the link.

The video students' transformers are stored in fp16 (:data:`~.registry.VIDEO_STUDENT_NAMES`; 0.56 MB instead of
1.13 MB each): Diffusers loads a checkpoint into the model's default dtype when no ``torch_dtype`` is given, so
``load_pipeline`` and ``DiffusionPipeline.from_pretrained`` return fp32 weights that are the fp32 training weights
rounded to fp16 (:func:`store_fp16`).

``python -m diffusion_accel.pipelines.testbed.students <run_dir> <name>``
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
from pathlib import Path
from typing import Any

from .registry import RESTORATION_NAMES, STUDENT_NAMES, STUDENT_TEACHERS, VIDEO_STUDENT_NAMES, asset_dir_name
from .shapes_net import assets_root

COPIED = ("model_index.json", "pipeline_with_contract.py", "scheduler", "transformer", "distillation.json",
          "train_metrics.json", "training_run.json")
SHARED_WITH_TEACHER = ("vae", "text_encoder", "tokenizer")
#: A ResShift folder: its own denoiser and scheduler; the VAE is the teacher's (its latent space is the one trained in).
RESTORATION_COPIED = ("model_index.json", "resshift_pipeline.py", "scheduler", "unet", "resshift.json",
                      "train_metrics.json", "training_run.json")
RESTORATION_SHARED = ("vae",)


def _same_component(a: Path, b: Path) -> bool:
    """Same weights and vocabulary, byte for byte, and the same model config (``_name_or_path`` aside: it records
    where the component was loaded from)."""
    for path in b.rglob("*"):
        rel = path.relative_to(b)
        if path.suffix in (".safetensors", ".model") or path.name == "tokenizer.json":
            if not ((a / rel).is_file() and filecmp.cmp(a / rel, path, shallow=False)):
                return False
        elif path.name == "config.json" and _model_config(a / rel) != _model_config(path):
            return False
    return True


def _model_config(path: Path) -> dict[str, Any]:
    """A component's ``config.json`` without ``_name_or_path`` (it records where the component was loaded from)."""
    config = json.loads(path.read_text())
    config.pop("_name_or_path", None)
    return config


WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def store_fp16(component: Path) -> dict[str, float]:
    """Rewrite ``component``'s fp32 safetensors weights in fp16 (same names and shapes, metadata kept); returns the
    largest absolute and relative rounding error of a weight."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = component / WEIGHTS_FILE
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    weights = load_file(str(path))
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in weights.items()}
    abs_err = max(float((half[k].float() - v.float()).abs().max()) for k, v in weights.items())
    rel_err = max(float(((half[k].float() - v.float()).abs() / v.float().abs().clamp_min(1e-6)).max())
                  for k, v in weights.items() if v.is_floating_point() and v.abs().max() > 0)
    save_file(half, str(path), metadata=metadata)
    path.chmod(0o644)
    return {"max_abs_weight_error": abs_err, "max_rel_weight_error": rel_err}


#: The VAE parts that define a latent space: a VAE shipped with a restoration pipeline must equal its training VAE
#: there (and in the config: scaling and shift factors), whatever its decoder.
ENCODER_PREFIXES = ("encoder.", "quant_conv.")


def check_same_encoder(vae: Path, trained_with: Path,
                       fix: str = "Fine-tune the decoder only (train 'resshift-vae').") -> None:
    """Raise ``ValueError`` unless VAE folder ``vae`` has the encoder, ``quant_conv`` and config (``_name_or_path``
    aside) of ``trained_with``: the latent space the restoration network was trained in. ``fix``: the remedy the
    error names."""
    from safetensors.torch import load_file

    for folder in (vae, trained_with):
        if not (folder / WEIGHTS_FILE).is_file():
            raise ValueError(f"{folder} is not a VAE folder (no {WEIGHTS_FILE}).")
    ours, theirs = (_model_config(f / "config.json") for f in (vae, trained_with))
    if ours != theirs:
        changed = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        raise ValueError(f"{vae} has another VAE config than {trained_with} ({', '.join(changed)}): its latents are "
                         f"not the ones the network was trained on. {fix}")
    a, b = load_file(str(vae / WEIGHTS_FILE)), load_file(str(trained_with / WEIGHTS_FILE))
    for key in sorted(k for k in b if k.startswith(ENCODER_PREFIXES)):
        if key not in a or a[key].dtype != b[key].dtype or not bool((a[key] == b[key]).all()):
            raise ValueError(f"{vae}'s encoder differs from {trained_with}'s at {key}: its latent space is not the "
                             f"one the network was trained in. {fix}")


def ship_student(run_dir: str | Path, name: str, teacher: str | None = None, vae: str | Path | None = None) -> Path:
    """Copy the pipeline of training run ``run_dir`` to ``assets/testbed-<name>``; returns that folder. ``teacher``:
    the testbed whose frozen components are linked (default: the student's, :data:`~.registry.STUDENT_TEACHERS`).
    ``vae`` (restoration pipelines only): a VAE folder to ship instead of the link, with the run's encoder
    (:func:`check_same_encoder`); it and the network are stored in fp16. ``run_dir`` may be the shipped folder itself
    (the new folder is built beside it and swapped in only when complete)."""
    if name not in STUDENT_NAMES and name not in RESTORATION_NAMES:
        raise ValueError(f"unknown student {name!r}; known: {', '.join((*STUDENT_NAMES, *RESTORATION_NAMES))}")
    if vae is not None and name not in RESTORATION_NAMES:
        raise ValueError(f"--vae is for a restoration pipeline ({', '.join(RESTORATION_NAMES)}); a distilled "
                         "student shares its teacher's VAE.")
    teacher = teacher or STUDENT_TEACHERS.get(name, "pixart")
    copied, shared = ((RESTORATION_COPIED, RESTORATION_SHARED) if name in RESTORATION_NAMES
                      else (COPIED, SHARED_WITH_TEACHER))
    run_dir = Path(run_dir)
    teacher_dir = assets_root() / asset_dir_name(teacher)
    for component in shared:
        if not _same_component(run_dir / component, teacher_dir / component):
            raise ValueError(f"{run_dir / component} differs from the teacher's {teacher_dir / component}; a "
                             "student whose frozen components changed cannot share them.")
    if vae is not None:
        check_same_encoder(Path(vae), run_dir / "vae")
    dest = assets_root() / asset_dir_name(name)
    building = dest.with_name(dest.name + ".partial")
    if building.exists():
        shutil.rmtree(building)
    building.mkdir(parents=True)
    for item in copied:
        src = run_dir / item
        if src.is_dir():
            shutil.copytree(src, building / item)
        elif src.exists():
            shutil.copy2(src, building / item)
    for component in shared:
        if component == "vae" and vae is not None:
            shutil.copytree(vae, building / "vae")
            continue
        os.symlink(Path("..") / teacher_dir.name / component, building / component, target_is_directory=True)
    if name in VIDEO_STUDENT_NAMES:
        _record_fp16(building / "distillation.json", {"transformer": store_fp16(building / "transformer")})
    if vae is not None:
        _record_fp16(building / "resshift.json", {
            "unet": store_fp16(building / "unet"), "vae": store_fp16(building / "vae"),
            "vae_decoder": f"fine-tuned for this pipeline ({Path(vae).name}); encoder and quant_conv: the training "
                           "VAE's, rounded to fp16 like every stored weight"})
    if dest.exists():
        shutil.rmtree(dest)
    building.rename(dest)
    return dest


def _record_fp16(record_path: Path, components: dict[str, Any]) -> None:
    """Note in the folder's JSON record which components are stored in fp16 and their rounding error."""
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    record["stored_weights"] = {"dtype": "float16 safetensors, loaded as float32", **components}
    record_path.write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("name", choices=sorted((*STUDENT_NAMES, *RESTORATION_NAMES)))
    parser.add_argument("--vae", default=None, help="restoration pipelines: a VAE folder to ship with it (the run's "
                        "encoder, another decoder) instead of linking the teacher's")
    args = parser.parse_args(argv)
    print(ship_student(args.run_dir, args.name, vae=args.vae))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
