"""Turn what a GPU run of the BFM lane sends back (``<row>.safetensors`` and ``bfm.tgz``, see
scripts/bfm_device_lane.sh) into run folders that ``python -m diffusion_accel.benchmarks.bfm --runs DEST`` loads.

``python scripts/bfm_unpack.py FILES_DIR DEST``

The tarball holds each run folder without its weights and without the components it shares with the pipeline it
was trained on (text encoders, tokenizers, VAE: those are copied from that pipeline, ``pipeline_from`` in its
``bfm.json``). When the FRN stage ended, only ``k4-frn.safetensors`` came back: the M = 4 stage-1 weights are that
file minus the frozen-stage FRN (``frn.*``), which stage 2 loads unchanged and never trains.
"""

import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

SHARED = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


def source_folder(run: Path) -> Path:
    from diffusion_accel.pipelines.testbed.registry import testbed_path

    source = json.loads((run / "bfm.json").read_text())["pipeline_from"]
    return testbed_path(source.split(":", 1)[1]) if source.startswith("testbed:") else Path(source)


def weights_for(row: str, files: Path) -> dict | None:
    own = files / f"{row}.safetensors"
    if own.is_file():
        return load_file(str(own))
    if row == "k4" and (files / "k4-frn.safetensors").is_file():
        return {k: v for k, v in load_file(str(files / "k4-frn.safetensors")).items() if not k.startswith("frn.")}
    return None


def main(files: Path, dest: Path) -> None:
    if not (files / "bfm.tgz").is_file():
        raise SystemExit(f"{files} holds no bfm.tgz: pass the folder a `NAMES=bfm bash scripts/device_session.sh` run "
                         "sent back (its <row>.safetensors and bfm.tgz).")
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(files / "bfm.tgz") as tar:
            tar.extractall(tmp, filter="data")
        dest.mkdir(parents=True, exist_ok=True)
        for run in sorted(p for p in (Path(tmp) / "bfm").iterdir() if (p / "bfm.json").is_file()):
            weights = weights_for(run.name, files)
            if weights is None:
                print(f"{run.name}: no weights came back, skipped")
                continue
            target = dest / run.name
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(run, target)
            source = source_folder(run)
            for component in SHARED:
                if (source / component).exists():
                    shutil.copytree((source / component).resolve(), target / component)
            save_file({k: v.contiguous() for k, v in weights.items()}, str(target / WEIGHTS), metadata={"format": "pt"})
            print(f"{run.name}: {len(weights)} tensors -> {target}")
        for log in (Path(tmp) / "bfm").glob("*.log"):
            shutil.copy(log, dest / log.name)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python scripts/bfm_unpack.py FILES_DIR DEST (DEST's row folders are replaced)")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
