"""Eval runner: generate → save each output as it is made (resumable) → metrics from disk → JSON + Markdown.

Layout of ``out``::

    manifest.json           index, prompt, seed and file of every item (written before generation)
    images/00000.png …      one PNG per image, written atomically as soon as it is generated
    videos/00000/000.png …  video pipelines: one folder of PNG frames per video (renamed into place when complete)
    results.json / results.md

A restart skips every item already on disk, so an interrupted run continues where it stopped; item ``i`` always uses
prompt ``prompts[i % len(prompts)]`` and seed ``seed + i`` (one ``torch.Generator`` per item), so outputs do not depend
on batching or sharding. Sharding: ``accelerate launch -m diffusion_accel.eval …`` splits the missing items
between processes with :func:`diffusion_accel.distributed.shard`, gathers the per-process generation stats on the
main process, which then computes the metrics from the files. On a CPU-only machine start the processes with
``accelerate launch --multi_gpu --num_processes 2 -m diffusion_accel.eval …`` (or ``torchrun
--nproc_per_node 2 -m …``); they use the gloo backend. ``accelerate launch --cpu`` starts a single process.

This module is the library: the command line (``diffusion-accel eval``, ``python -m diffusion_accel.eval``) is
:mod:`diffusion_accel.eval.cli`, which imports it, never the other way round.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_accel.distributed import gather, partial_state, shard

IMAGE_METRICS = ("fid", "kid", "psnr", "ssim", "lpips", "clip_score")
VIDEO_METRICS = ("temporal_flickering", "dynamic_degree", "motion_smoothness", "vbench")
ALL_METRICS = IMAGE_METRICS + VIDEO_METRICS
PipelineFactory = Callable[[str | None], Any]


@dataclass
class EvalConfig:
    """Everything one eval run depends on (recorded in ``results.json``)."""

    out: str
    pipeline: str | None = None
    method: list[str] = field(default_factory=list)
    method_options: dict[str, Any] = field(default_factory=dict)
    prompts: str | list[str] = "builtin"
    num_images: int = 16
    metrics: list[str] = field(default_factory=lambda: ["fid"])
    reference: str | None = None
    seed: int = 0
    batch_size: int = 1
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    fid_mode: str = "clean"
    inception_weights: str | None = None
    lpips_backbone: str | None = None
    lpips_heads: str | None = None
    clip_model: str | None = None
    video_fps: float | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = [m for m in self.metrics if m not in ALL_METRICS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(ALL_METRICS)}.")
        if self.num_images < 1 or self.batch_size < 1:
            raise ValueError("num_images and batch_size must be positive.")


# ------------------------------------------------------------------------------------------------ generation


def default_pipeline_factory(name: str | None) -> Any:
    """``diffusion_accel.load_pipeline(name)`` (imported lazily); ``None`` → the project's default pipeline."""
    import diffusion_accel

    if name is None:
        from diffusion_accel.loading import default_pipeline

        name = default_pipeline()
    return diffusion_accel.load_pipeline(name)


def _default_call_kwargs(pipeline: str | None) -> dict[str, Any]:
    """The project's own call defaults for ``tiny:``/``testbed:`` names (prompt / labels are set per item)."""
    from diffusion_accel.loading import base_call_kwargs, default_pipeline

    return base_call_kwargs(pipeline or default_pipeline())


def _item_path(out: Path, index: int, video: bool) -> Path:
    return out / "videos" / f"{index:05d}" if video else out / "images" / f"{index:05d}.png"


def _is_done(out: Path, index: int) -> bool:
    return _item_path(out, index, False).is_file() or _item_path(out, index, True).is_dir()


def _to_uint8(image: Any) -> np.ndarray:
    from .preprocess import to_uint8

    return to_uint8(image)


def _save_image(path: Path, image: Any) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    Image.fromarray(_to_uint8(image)).save(tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written file that resume would trust


def _save_video(path: Path, frames: Sequence[Any]) -> None:
    from PIL import Image

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for t, frame in enumerate(frames):
        Image.fromarray(_to_uint8(frame)).save(tmp / f"{t:03d}.png")
    os.replace(tmp, path)


def _call_pipeline(pipe: Any, prompts: list[str], seeds: list[int], call_kwargs: dict[str, Any]) -> tuple[list, bool]:
    """One batched call with one generator per item; returns (outputs, is_video)."""
    import torch

    kwargs = dict(call_kwargs)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    if type(pipe).__name__ == "DiTPipeline":  # class-conditional: prompts are label names or integers
        kwargs["class_labels"] = [int(p) if p.strip().isdigit() else pipe.get_label_ids([p])[0] for p in prompts]
    else:
        kwargs["prompt"] = prompts
        if isinstance(kwargs.get("negative_prompt"), str):  # one per item (Flux's true CFG needs equal batches)
            kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * len(prompts)
    output = pipe(**kwargs, generator=generators)
    if hasattr(output, "frames"):
        return list(output.frames), True
    images = output.images if hasattr(output, "images") else output
    return list(images), False


def _manifest(config: EvalConfig, prompts: list[str]) -> list[dict]:
    return [{"index": i, "prompt": prompts[i % len(prompts)], "seed": config.seed + i}
            for i in range(config.num_images)]


def generate(config: EvalConfig, pipeline_factory: PipelineFactory | None = None) -> dict:
    """Generate the items missing on disk (this process's share); returns this process's stats."""
    state = partial_state()
    out = Path(config.out)
    source = config.prompts
    if source == "builtin" and (config.pipeline or "").startswith("testbed:"):
        source = "builtin:shapes"  # the testbed's vocabulary is the shapes captions
    prompts = source if isinstance(source, list) else _load_prompts(source)
    items = _manifest(config, prompts)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "manifest.json").write_text(json.dumps({"prompts": prompts, "items": items}, indent=1))
    state.wait_for_everyone()
    pending = [item["index"] for item in items if not _is_done(out, item["index"])]
    stats = {"process": state.process_index, "generated": 0, "skipped_existing": 0, "seconds": 0.0}
    mine = shard(pending, state)
    stats["skipped_existing"] = len(items) - len(pending) if state.is_main_process else 0
    if mine:
        pipe = (pipeline_factory or default_pipeline_factory)(config.pipeline)
        if hasattr(pipe, "to") and state.device.type != "cpu":
            pipe = pipe.to(state.device)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        handle = None
        if config.method:
            import diffusion_accel

            handle = diffusion_accel.apply(pipe, *config.method, **config.method_options)
        call_kwargs = {**_default_call_kwargs(config.pipeline), **config.call_kwargs}
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc=f"generate [{state.process_index}]", unit="img",
                   position=state.process_index, disable=not config.progress)
        start = time.perf_counter()
        for offset in range(0, len(mine), config.batch_size):
            batch = mine[offset:offset + config.batch_size]
            outputs, is_video = _call_pipeline(pipe, [items[i]["prompt"] for i in batch],
                                               [items[i]["seed"] for i in batch], call_kwargs)
            for index, result in zip(batch, outputs, strict=True):
                if is_video:
                    _save_video(_item_path(out, index, True), result)
                else:
                    _save_image(_item_path(out, index, False), result)
            stats["generated"] += len(batch)
            bar.update(len(batch))
        stats["seconds"] = time.perf_counter() - start
        bar.close()
        if handle is not None and hasattr(handle, "remove"):
            handle.remove()
    return stats


def _load_prompts(source: str) -> list[str]:
    from ..prompts import load_prompts

    return load_prompts(source)


# ------------------------------------------------------------------------------------------------ metrics


def _skip(reason: str) -> dict:
    return {"value": None, "skipped": reason}


def _paired_files(out: Path, reference: str | None) -> list[tuple[Path, Path]] | str:
    if not reference or not Path(reference).is_dir():
        return "skipped: paired metrics need --reference DIR holding images with the same file names"
    ours = sorted((out / "images").glob("*.png"))
    pairs = [(p, Path(reference) / p.name) for p in ours if (Path(reference) / p.name).is_file()]
    return pairs or f"skipped: no file in {reference} matches the generated file names"


def _read(path: Path) -> np.ndarray:
    from .fid import load_image

    return load_image(path)


def _video_frames(folder: Path) -> np.ndarray:
    return np.stack([_read(p) for p in sorted(folder.glob("*.png"))])


def compute_metrics(config: EvalConfig) -> dict[str, Any]:
    """Every requested metric from the files in ``out`` (never from memory), each with its provenance."""
    from . import fidelity, video

    out = Path(config.out)
    images_dir = out / "images"
    videos = sorted(p for p in (out / "videos").glob("*") if p.is_dir() and not p.name.startswith("."))
    results: dict[str, Any] = {}
    wanted = list(config.metrics)
    if {"fid", "kid"} & set(wanted):
        results.update(_fid_metrics(config, images_dir, wanted))
    for name in ("psnr", "ssim"):
        if name in wanted:
            pairs = _paired_files(out, config.reference)
            if isinstance(pairs, str):
                results[name] = _skip(pairs)
                continue
            function = fidelity.psnr if name == "psnr" else fidelity.ssim
            values = [function(_read(a), _read(b)) for a, b in pairs]
            results[name] = {"value": float(np.mean(values)), "n": len(values), "reference": config.reference,
                             "definition": fidelity.PSNR_DEFINITION if name == "psnr" else fidelity.SSIM_DEFINITION}
    if "lpips" in wanted:
        pairs = _paired_files(out, config.reference)
        if isinstance(pairs, str):
            results["lpips"] = _skip(pairs)
        elif not (config.lpips_backbone and config.lpips_heads):
            results["lpips"] = _skip(fidelity.SKIPPED_NO_WEIGHTS)
        else:
            model = fidelity.load_lpips_alex(config.lpips_backbone, config.lpips_heads)
            values = [fidelity.lpips(_read(a), _read(b), model=model)["value"] for a, b in pairs]
            results["lpips"] = {"value": float(np.mean(values)), "n": len(values), "variant": "alex v0.1"}
    if "clip_score" in wanted:
        manifest = json.loads((out / "manifest.json").read_text())["items"]
        files = [(images_dir / f"{item['index']:05d}.png", item["prompt"]) for item in manifest]
        files = [(p, prompt) for p, prompt in files if p.is_file()]
        record = fidelity.clip_score([_read(p) for p, _ in files], [t for _, t in files], config.clip_model) \
            if config.clip_model else _skip(fidelity.SKIPPED_NO_WEIGHTS)
        results["clip_score"] = record
    video_wanted = [m for m in VIDEO_METRICS if m in wanted and m != "vbench"]
    if video_wanted or "vbench" in wanted:
        if not videos:
            for name in [*video_wanted, *(["vbench"] if "vbench" in wanted else [])]:
                results[name] = _skip("skipped: no videos in this run")
        else:
            dims = video_wanted or ["temporal_flickering", "dynamic_degree", "motion_smoothness"]
            per_dim = {name: [] for name in dims}
            for folder in videos:
                frames = _video_frames(folder)
                for name in dims:
                    function = getattr(video, name)
                    value = function(frames, fps=config.video_fps) if name == "dynamic_degree" else function(frames)
                    per_dim[name].append(value)
            for name in video_wanted:
                results[name] = {"value": float(np.mean(per_dim[name])), "n": len(videos),
                                 "proxy": name.replace("_", " ") in video.PROXY_DIMENSIONS}
            if "vbench" in wanted:
                results["vbench"] = video.aggregate({k: float(np.mean(v)) for k, v in per_dim.items()})
    return results


def _fid_metrics(config: EvalConfig, images_dir: Path, wanted: list[str]) -> dict[str, Any]:
    from .fid import InceptionFeatures, compute_fid

    if not config.reference:
        return {name: _skip("skipped: FID/KID need --reference DIR|npz") for name in ("fid", "kid") if name in wanted}
    try:
        extractor = InceptionFeatures(config.inception_weights, mode=config.fid_mode)
    except FileNotFoundError as exc:
        return {name: _skip(f"skipped: {exc}") for name in ("fid", "kid") if name in wanted}
    record = compute_fid(images_dir, config.reference, extractor, kid="kid" in wanted, progress=config.progress)
    results: dict[str, Any] = {}
    common = {k: v for k, v in record.items() if k not in ("fid", "kid")}
    if "fid" in wanted:
        results["fid"] = {"value": record["fid"], **common}
    if "kid" in wanted:
        kid = record["kid"]
        results["kid"] = _skip(kid) if isinstance(kid, str) else {"value": kid["mean"], **kid, **common}
    return results


# ------------------------------------------------------------------------------------------------ reports


def _format(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4f}"
    return str(value)


def write_reports(config: EvalConfig, metrics: dict[str, Any], generation: list[dict]) -> dict:
    """Write ``results.json`` and ``results.md``; returns the JSON payload."""
    out = Path(config.out)
    from .fid import library_versions

    payload = {"config": asdict(config), "generation": generation, "metrics": metrics,
               "versions": library_versions()}
    (out / "results.json").write_text(json.dumps(payload, indent=1, default=str))
    prompt_source = config.prompts if isinstance(config.prompts, str) else f"{len(config.prompts)} given"
    lines = [f"# Evaluation: {config.pipeline or 'default pipeline'}"
             + (f" + {', '.join(config.method)}" if config.method else ""), "",
             f"{config.num_images} items, seed {config.seed}, prompts `{prompt_source}`, "
             f"reference `{config.reference}`.", "", "| metric | value | details |", "|---|---|---|"]
    for name, record in metrics.items():
        if record.get("skipped"):
            details = record["skipped"]
        elif name in ("fid", "kid"):
            details = (f"N={record.get('n')} vs {record.get('n_reference')}, mode={record.get('preprocessing')}, "
                       f"weights sha256 {str(record.get('weights_sha256'))[:12]}")
        elif name == "vbench":
            details = f"{record['label']}; computed {record['computed']}"
        else:
            details = ", ".join(f"{k}={v}" for k, v in record.items() if k != "value")
        value = record.get("total") if name == "vbench" else record.get("value")
        lines.append(f"| {name} | {_format(value)} | {details.replace('|', '/')} |")
    seconds = sum(g["seconds"] for g in generation)
    made = sum(g["generated"] for g in generation)
    lines += ["", f"Generated this run: {made} (skipped, already on disk: "
                  f"{sum(g['skipped_existing'] for g in generation)}), {seconds:.1f} process-seconds.", ""]
    (out / "results.md").write_text("\n".join(lines))
    return payload


def run_eval(config: EvalConfig, pipeline_factory: PipelineFactory | None = None) -> dict | None:
    """Generate (sharded, resumable), gather, and on the main process compute metrics and write the reports.
    Returns the results payload on the main process, ``None`` on the others."""
    state = partial_state()
    stats = generate(config, pipeline_factory)
    generation = gather([stats], state)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    return write_reports(config, compute_metrics(config), generation)
