"""``diffusion-accel bench``: baseline and methods side by side in one process.

Per method it reports ``speedup_wall`` (median of interleaved timed calls, baseline / method), ``macs_ratio``
(denoiser MACs counted with ``torch.utils.flop_counter``, baseline / method; summed over every prompt on the
quality tier, over the timing call on the speed tier), ``nfe``, ``psnr_vs_baseline`` and
``ssim_vs_baseline`` (same seeds), and on the testbed ``adherence`` and ``fid_shapes`` (shapes-net). It writes a
JSON file, a Markdown table, a Pareto plot and an image grid.

Adherence is compared in pairs (the same prompt and seed in both runs): prompts lost, prompts gained and the paired
difference with Newcombe's hybrid score 95 % interval for paired proportions and the exact McNemar p-value;
FID-shapes gets a bias-shifted percentile bootstrap interval over images (:mod:`diffusion_accel.eval.paired`).
Per-image verdicts are kept in the JSON. Clips of the video testbed also get the VBench-style dimensions beside the
baseline's, with a VBench-style total, and adherence per attribute (colour, shape, direction) paired with the
baseline's (:mod:`diffusion_accel.bench_video`); a sparse-attention row reports the
attention density it measured. On the quality tier the baseline's images, verdicts and features are cached
between runs of the same settings (:func:`baseline_cache_key`: pipeline weights, call, prompts, seeds, batch size,
versions).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .loading import base_call_kwargs, default_pipeline
from .prompts import bench_prompts

METRIC_KEYS = ("speedup_wall", "macs_ratio", "nfe", "psnr_vs_baseline", "ssim_vs_baseline", "adherence", "fid_shapes")
#: Held-out samples (prompt + seed pairs) of a testbed quality run: enough for a paired-difference 95 % interval of
#: about ±3 points at the discordance the shipped methods show on the testbeds (see README, "Benchmarks").
QUALITY_PROMPTS = 1024
#: Bumped when the per-image metrics change, so cached baseline verdicts from older code are not reused.
METRICS_VERSION = 1



@dataclass
class MethodSpec:
    """One bench entry: a label and the method configs it applies (none for the baseline)."""

    label: str
    configs: list[Any] = field(default_factory=list)
    #: Call arguments this entry changes (``steps=12``: the baseline with fewer steps, the honest comparison).
    call_overrides: dict[str, Any] = field(default_factory=dict)


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets, so list values such as ``scales=[1,0.5,1]`` stay whole."""
    parts, depth, current = [], 0, []
    for char in text:
        depth += char in "[("
        depth -= char in "])"
        if char == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_method_specs(text: str) -> list[MethodSpec]:
    """``"baseline,delta_cache,fbcache:threshold=0.1,delta_cache:interval=3:num_cached_blocks=0.5"``.

    Each comma-separated item is a method name (or a ``.json``/``.yaml`` config path) followed by ``:key=value``
    overrides; ``+`` combines methods in one entry (``adaptive_guidance+delta_cache``); ``steps=N`` is the baseline
    run with N steps (same cost comparison). ``baseline`` is always run.
    """
    from .config import parse_config, parse_key_value

    specs = [MethodSpec("baseline")]
    for item in (part.strip() for part in _split_top_level(text)):
        if not item or item == "baseline":
            continue
        if item.startswith("steps="):
            specs.append(MethodSpec(item, [], {"num_inference_steps": int(item.split("=", 1)[1])}))
            continue
        configs = []
        for piece in item.split("+"):
            name, *options = piece.split(":")
            overrides = dict(parse_key_value(option, f"Bench method option in {item!r}") for option in options)
            configs.append(parse_config(name, **overrides))
        specs.append(MethodSpec(item, configs))
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"Bench methods must be distinct, got {labels}.")
    return specs


# ---------------------------------------------------------------------------------------------- pipeline calls
def call_kwargs(pipe: Any, family: str, prompts: list[str], base: dict[str, Any], steps: int | None,
                guidance: float | None, size: int | None, seeds: list[int]) -> dict[str, Any]:
    """The bench's call arguments for ``prompts`` (DiT: class labels) on ``pipe``: ``base`` (the pipeline's
    defaults, :func:`~diffusion_accel.loading.base_call_kwargs`) with ``steps``, CFG scale ``guidance`` and square
    ``size`` overriding where given, a negative prompt where the family's CFG needs one, and one generator per seed.
    ``family`` is accepted for callers' convenience; the adapter is looked up from ``pipe``."""
    from .pipelines.adapters import find_adapter

    adapter = find_adapter(pipe)
    kwargs: dict[str, Any] = dict(base)
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    kwargs.setdefault("num_inference_steps", 20)
    if adapter.family == "dit":
        labels = list(pipe.labels) if hasattr(pipe, "labels") else [0]
        kwargs["class_labels"] = [i % max(len(labels), 1) for i in range(len(prompts))]
    else:
        kwargs["prompt"] = list(prompts)
    if adapter.family in ("pixart_alpha", "pixart_sigma"):
        kwargs.setdefault("clean_caption", False)
        kwargs.setdefault("use_resolution_binning", False)
    if guidance is not None:
        kwargs[adapter.cfg_scale_arg] = guidance
    negative = kwargs.get("negative_prompt")
    if isinstance(negative, str):
        kwargs["negative_prompt"] = [negative] * len(prompts)
    if adapter.cfg_needs_negative_prompt and kwargs.get(adapter.cfg_scale_arg, 1.0) > 1.0:
        kwargs.setdefault("negative_prompt", [""] * len(prompts))
    if size:
        kwargs["height"] = kwargs["width"] = size
    kwargs["generator"] = [torch.Generator().manual_seed(s) for s in seeds]
    return kwargs


def to_uint8(output: Any) -> np.ndarray:
    """Pipeline output → uint8 array ``[N, H, W, 3]`` (videos: frames stacked as ``[N, T, H, W, 3]``)."""
    if hasattr(output, "frames"):
        frames = np.asarray(output.frames, dtype=np.float32)
        return (frames * 255).round().clip(0, 255).astype(np.uint8)
    return np.stack([np.asarray(image.convert("RGB")) for image in output.images])


def generate(pipe: Any, kwargs: dict[str, Any]) -> Any:
    """``pipe(**kwargs)`` with fresh generators re-seeded from ``kwargs["generator"]``, so that calling twice with
    the same ``kwargs`` gives the same images."""
    kwargs = dict(kwargs)
    kwargs["generator"] = [torch.Generator().manual_seed(g.initial_seed()) for g in kwargs["generator"]]
    return pipe(**kwargs)


def _with_method(pipe: Any, spec: MethodSpec):
    import diffusion_accel as da

    return da.accelerated(pipe, *spec.configs)


def count_denoiser_macs(pipe: Any, kwargs: dict[str, Any], spec: MethodSpec) -> float:
    """MACs of the denoiser for one call (FLOPs / 2, counted by ``torch.utils.flop_counter``)."""
    with _with_method(pipe, spec):
        return generate_counting_macs(pipe, kwargs)[1]


def generate_counting_macs(pipe: Any, kwargs: dict[str, Any]) -> tuple[Any, float]:
    """``(output, denoiser MACs)`` of one call of the (already patched) pipeline."""
    from torch.utils.flop_counter import FlopCounterMode

    from .pipelines.adapters import find_adapter

    denoiser_name = type(find_adapter(pipe).get_denoiser(pipe)).__name__
    counter = FlopCounterMode(display=False)
    with counter:
        output = generate(pipe, kwargs)
    counts = counter.get_flop_counts().get(denoiser_name, {})
    return output, sum(counts.values()) / 2.0


def _peer_reason(pipe: Any, spec: MethodSpec) -> str | None:
    from .pipelines.adapters import find_adapter

    adapter = find_adapter(pipe)
    for config in spec.configs:
        reason = config.not_applicable_reason(adapter, pipe)
        if reason:
            return reason
    return None


# ---------------------------------------------------------------------------------------------- metrics
def fidelity(images: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Mean PSNR and SSIM of ``images`` against ``reference`` (same shape; videos compared frame by frame)."""
    from .eval.fidelity import psnr, ssim

    flat = images.reshape(-1, *images.shape[-3:])
    ref = reference.reshape(-1, *reference.shape[-3:])
    return float(np.mean([psnr(a, b) for a, b in zip(flat, ref, strict=True)])), float(
        np.mean([ssim(a, b) for a, b in zip(flat, ref, strict=True)])
    )


def _shape_metrics(images: np.ndarray, prompts: list[str]) -> tuple[list[bool], np.ndarray] | None:
    """Per-image adherence verdicts and shapes-net features of testbed images; for clips of the video testbed
    (captions "a red circle moving left") the video judge's per-clip verdicts (colour, shape and direction all right)
    and the features of every frame; ``None`` for other videos."""
    try:
        if images.ndim == 5:
            from .pipelines.testbed.video_judge import video_verdicts_and_features

            return video_verdicts_and_features(images, prompts)
        if images.ndim != 4:
            return None
        from .pipelines.testbed.shapes_net import verdicts_and_features
    except ImportError:
        return None
    return verdicts_and_features(list(images), prompts)


def _quality_stats(metrics: dict[str, tuple[list[bool], np.ndarray]], base: str,
                   fid_resamples: int, videos: bool = False) -> dict[str, dict[str, Any]]:
    """Per label: adherence, the paired comparison with the baseline, FID-shapes with bootstrap intervals (over the
    frames of real video-testbed clips when ``videos``, else the cached real images)."""
    from .eval.paired import fid_bootstrap, paired_summary
    from .pipelines.testbed.shapes_net import load_real_statistics

    if videos:
        from .pipelines.testbed.evaluate_video import reference_statistics

        mu, sigma = reference_statistics()
    else:
        mu, sigma = load_real_statistics()
    base_flags, base_features = metrics[base]
    out = {}
    for label, (flags, feats) in metrics.items():
        fid = fid_bootstrap(feats, mu, sigma, None if label == base else base_features, resamples=fid_resamples)
        out[label] = {"adherence": float(np.mean(flags)), "fid_shapes": fid.pop("fid"),
                      "adherence_paired": paired_summary(base_flags, flags), "fid_shapes_interval": fid}
    return out


# ---------------------------------------------------------------------------------------------- baseline cache
def default_cache_dir() -> Path:
    """``$DIFFUSION_ACCEL_CACHE/bench`` or ``~/.cache/diffusion_accel/bench``."""
    root = os.environ.get("DIFFUSION_ACCEL_CACHE") or Path.home() / ".cache" / "diffusion_accel"
    return Path(root) / "bench"


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    """sha256 of a file (memoised on path, size and mtime); files over 256 MB by size and mtime only."""
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _FILE_HASHES:
        if stat.st_size > 256 << 20:
            _FILE_HASHES[memo] = f"size={stat.st_size}:mtime={stat.st_mtime_ns}"
        else:
            from .eval.inception import sha256_file

            _FILE_HASHES[memo] = sha256_file(path)
    return _FILE_HASHES[memo]


def _folder_digest(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): _file_digest(f) for f in sorted(folder.rglob("*"))
            if f.is_file() and "__pycache__" not in f.parts}


def pipeline_fingerprint(pipeline: str, pipe: Any) -> Any:
    """What identifies the weights: the files of a local folder (``testbed:`` names resolve to theirs), else a hash
    of every component's parameters and buffers (``tiny:`` pipelines, Hub ids)."""
    folder: Path | None = None
    if pipeline.startswith("testbed:"):
        from .loading import _testbed_path

        folder = _testbed_path(pipeline.split(":", 1)[1])
    elif Path(pipeline).is_dir():
        folder = Path(pipeline)
    if folder is not None:
        return {"name": pipeline, "files": _folder_digest(folder)}
    from .eval.inception import state_dict_sha256

    digest = hashlib.sha256()
    for name, component in sorted(getattr(pipe, "components", {}).items()):
        if isinstance(component, torch.nn.Module):
            digest.update(f"{name}|{state_dict_sha256(component.state_dict())}".encode())
        elif hasattr(component, "config"):
            digest.update(json.dumps(dict(component.config), sort_keys=True, default=str).encode())
    return {"name": pipeline, "parameters": digest.hexdigest()}


def baseline_cache_key(fingerprint: Any, call: dict[str, Any], prompts: list[str], seeds: list[int],
                       batch_size: int, shape_metrics: bool) -> str:
    """sha256 of everything the baseline's images and verdicts depend on: the weights (:func:`pipeline_fingerprint`),
    the call arguments, prompts, seeds, batch size, and the versions of diffusion_accel, torch, Diffusers and the
    metrics (shapes-net weights and real statistics included)."""
    import diffusers

    from . import __version__

    metric: Any = None
    if shape_metrics:
        from .pipelines.testbed.shapes_net import default_path

        metric = _folder_digest(default_path())
    material = {"pipeline": fingerprint, "call": call, "prompts": prompts, "seeds": seeds, "batch_size": batch_size,
                "versions": {"diffusion_accel": __version__, "torch": torch.__version__,
                             "diffusers": diffusers.__version__, "metrics": METRICS_VERSION},
                "shape_metrics": metric}
    text = json.dumps(material, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _cache_load(folder: Path, key: str) -> dict[str, Any] | None:
    from safetensors.numpy import load_file

    record_file, tensor_file = folder / "record.json", folder / "baseline.safetensors"
    if not (record_file.exists() and tensor_file.exists()):
        return None
    try:
        record = json.loads(record_file.read_text())
        tensors = load_file(str(tensor_file))
    except (OSError, ValueError):
        return None
    if record.get("key") != key:
        return None
    record["images"] = tensors["images"]
    record["features"] = tensors.get("features")
    return record


def _cache_store(folder: Path, key: str, images: np.ndarray, nfe: float, macs: float | None,
                 metrics: tuple[list[bool], np.ndarray] | None) -> None:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"images": np.ascontiguousarray(images)}
    if metrics is not None:
        tensors["features"] = np.ascontiguousarray(metrics[1])
    save_file(tensors, str(folder / "baseline.safetensors"))
    record = {"key": key, "nfe": nfe, "macs": macs,
              "verdicts": None if metrics is None else [bool(v) for v in metrics[0]]}
    (folder / "record.json").write_text(json.dumps(record))


def _quality_share(pipe: Any, spec: MethodSpec, batches: list[tuple[int, list[str]]], family: str,
                   base_kwargs: dict[str, Any], steps: int | None, guidance: float | None, size: int | None,
                   seed: int, count_macs: bool, process: int = 0) -> list[dict[str, Any]]:
    """One method's quality calls over ``batches`` (``(index of the first prompt, prompts)``), one record per batch:
    its uint8 images, NFE and (``count_macs``) denoiser MACs. The seed of prompt ``i`` is ``seed + i`` wherever the
    batch runs, so the records of all processes, in batch order, are those of one process."""
    import diffusion_accel as da

    records = []
    for start, batch in batches:
        kwargs = call_kwargs(pipe, family, batch, base_kwargs, steps, guidance, size,
                              [seed + start + i for i in range(len(batch))])
        kwargs.update(spec.call_overrides)
        with _with_method(pipe, spec):
            if count_macs:
                output, batch_macs = generate_counting_macs(pipe, kwargs)
            else:
                output, batch_macs = generate(pipe, kwargs), None
            stats = da.stats(pipe)
            records.append({"start": start, "images": to_uint8(output), "nfe": stats["nfe"],
                            "macs": batch_macs, "process": process, "density": _attention_density(stats)})
    return records


def _attention_density(stats: dict[str, Any]) -> float | None:
    """Mean measured density (kept key blocks / all) of a call's sparse-attention masks; ``None`` without them (the
    knob a mask is set by is not its density, so a matched-density comparison must report what was measured)."""
    entries = (stats.get("sparse_attention") or {}).get("density") or []
    return float(np.mean([e["density"] for e in entries])) if entries else None


# ---------------------------------------------------------------------------------------------- the run
def run_bench(
    pipeline: str,
    methods: str | list[MethodSpec],
    *,
    num_prompts: int = 16,
    prompts_file: str | None = None,
    steps: int | None = None,
    tier: str = "quality",
    repeats: int = 3,
    guidance_scale: float | None = None,
    size: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    timing_batch: int = 1,
    out_dir: str | Path = "bench_out",
    json_path: str | Path | None = None,
    shape_metrics: bool | None = None,
    cache_dir: str | Path | None = "default",
    fid_resamples: int = 200,
    pareto_x: str = "speedup_wall",
    state: Any = None,
) -> dict[str, Any] | None:
    """Run the side-by-side benchmark and write its JSON, Markdown, Pareto plot and image grid.

    ``cache_dir``: where the baseline's quality-tier images and verdicts are cached (``"default"``:
    :func:`default_cache_dir`; ``None``: no cache). ``pareto_x``: ``"speedup_wall"`` or ``"macs_ratio"``.

    Under ``accelerate launch`` / ``torchrun`` (``state``: :func:`diffusion_accel.distributed.partial_state` by
    default) every process generates its contiguous share of the quality batches (:func:`diffusion_accel.distributed.
    shard`; whole batches, so each image is computed exactly as in one process), the shares are gathered, and the main
    process computes the metrics, times the methods and writes the outputs; it returns the report, the others
    ``None``. The report equals a one-process run's except for the timings."""
    import diffusion_accel as da

    from .distributed import gather, partial_state, shard

    state = state if state is not None else partial_state()
    specs = parse_method_specs(methods) if isinstance(methods, str) else methods
    pipe = da.load_pipeline(pipeline, tier=tier) if pipeline.startswith("testbed:") else da.load_pipeline(pipeline)
    if state.num_processes > 1 and state.device.type != "cpu":  # one accelerator per process
        pipe = pipe.to(state.device)
    pipe.set_progress_bar_config(disable=True)
    family = da.find_adapter(pipe).family
    base_kwargs = base_call_kwargs(pipeline, tier)
    prompts = bench_prompts(pipeline, num_prompts, prompts_file)
    if shape_metrics is None:
        shape_metrics = pipeline.startswith("testbed:") and tier == "quality"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    runnable, skipped = [], {}
    for spec in specs:
        reason = _peer_reason(pipe, spec)
        if reason:
            skipped[spec.label] = reason
        else:
            runnable.append(spec)

    # 1. quality: every prompt with a fixed seed per prompt, in batches. On the quality tier the denoiser MACs are
    #    counted over all of these calls, so methods whose work varies per prompt (adaptive guidance, threshold
    #    caches) get their mean cost, not the cost of one prompt.
    macs_over_all = tier == "quality"
    images: dict[str, np.ndarray] = {}
    nfe: dict[str, float] = {}
    density: dict[str, float] = {}
    macs: dict[str, float] = {}
    metrics: dict[str, tuple[list[bool], np.ndarray]] = {}
    seeds = [seed + i for i in range(len(prompts))]
    cache_folder, cache_key, cache_hit = None, None, False
    if cache_dir is not None and tier == "quality" and state.is_main_process:
        probe = call_kwargs(pipe, family, prompts[:1], base_kwargs, steps, guidance_scale, size, [seed])
        call = {k: v for k, v in probe.items() if k not in ("prompt", "generator", "negative_prompt")}
        call["negative_prompt"] = probe.get("negative_prompt", [None])[0] if "negative_prompt" in probe else None
        cache_key = baseline_cache_key(pipeline_fingerprint(pipeline, pipe), call, prompts, seeds, batch_size,
                                       bool(shape_metrics))
        cache_folder = (default_cache_dir() if cache_dir == "default" else Path(cache_dir)) / cache_key[:32]
        cached = _cache_load(cache_folder, cache_key)
        if cached is not None and (not shape_metrics or cached.get("verdicts") is not None):
            cache_hit = True
            images["baseline"], nfe["baseline"] = cached["images"], cached["nfe"]
            if cached.get("macs") is not None:
                macs["baseline"] = cached["macs"]
            if shape_metrics:
                metrics["baseline"] = (cached["verdicts"], cached["features"])
    batches_per_process = None
    cache_hit = gather([cache_hit], state)[0]  # the main process's answer: the others skip a cached baseline too
    quality_start = time.perf_counter()
    batches = [(start, prompts[start : start + batch_size]) for start in range(0, len(prompts), batch_size)]
    mine = shard(batches, state)
    for spec in runnable:
        if spec.label == "baseline" and cache_hit:
            continue
        shares = gather(_quality_share(pipe, spec, mine, family, base_kwargs, steps, guidance_scale, size, seed,
                                       macs_over_all, state.process_index), state)
        if not state.is_main_process:
            continue
        if [share["start"] for share in shares] != [start for start, _ in batches]:
            raise RuntimeError(f"bench: gathered quality batches {[share['start'] for share in shares]} are not the "
                               f"batches {[start for start, _ in batches]} in order (processes out of step?).")
        batches_per_process = [sum(share["process"] == p for share in shares) for p in range(state.num_processes)]
        images[spec.label] = np.concatenate([share["images"] for share in shares])
        nfe[spec.label] = float(np.mean([share["nfe"] for share in shares]))
        densities = [share["density"] for share in shares if share.get("density") is not None]
        if densities:
            density[spec.label] = float(np.mean(densities))
        if macs_over_all:
            macs[spec.label] = sum((share["macs"] for share in shares), 0.0)
        if shape_metrics:
            found = _shape_metrics(images[spec.label], prompts)
            if found is not None:
                metrics[spec.label] = found
        if spec.label == "baseline" and cache_folder is not None:
            _cache_store(cache_folder, cache_key, images["baseline"], nfe["baseline"], macs.get("baseline"),
                         metrics.get("baseline"))
    if not state.is_main_process:
        return None  # the main process times the methods and writes the one report
    quality_seconds = time.perf_counter() - quality_start

    # 2. MACs on the speed tier: one timing call per method
    macs_kwargs = call_kwargs(pipe, family, prompts[:timing_batch], base_kwargs, steps, guidance_scale, size,
                               [seed + i for i in range(timing_batch)])
    if not macs_over_all:
        macs = {spec.label: count_denoiser_macs(pipe, {**macs_kwargs, **spec.call_overrides}, spec)
                for spec in runnable}

    # 3. wall time: interleaved repeats (the order rotates every round), median per method
    times: dict[str, list[float]] = {spec.label: [] for spec in runnable}
    for spec in runnable:  # warm-up
        with _with_method(pipe, spec):
            generate(pipe, {**macs_kwargs, **spec.call_overrides})
    for round_index in range(repeats):
        order = runnable[round_index % len(runnable):] + runnable[: round_index % len(runnable)]
        for spec in order:
            call = {**macs_kwargs, **spec.call_overrides}
            with _with_method(pipe, spec):
                start = time.perf_counter()
                generate(pipe, call)
                times[spec.label].append(time.perf_counter() - start)

    base = "baseline"
    quality = (_quality_stats(metrics, base, fid_resamples, videos=images[base].ndim == 5) if base in metrics
               else {})
    vbench, attributes = {}, {}
    if base in metrics and images[base].ndim == 5:
        from .bench_video import method_attributes, method_scores

        vbench = method_scores(images, set(metrics))
        attributes = method_attributes(images, set(metrics), prompts)
    results: dict[str, dict[str, Any]] = {}
    for spec in runnable:
        psnr, ssim = (math.inf, 1.0) if spec.label == base else fidelity(images[spec.label], images[base])
        q = quality.get(spec.label, {})
        adherence, fid = q.get("adherence"), q.get("fid_shapes")
        results[spec.label] = {
            "speedup_wall": statistics.median(times[base]) / statistics.median(times[spec.label]),
            "macs_ratio": macs[base] / macs[spec.label] if macs[spec.label] else None,
            "nfe": nfe[spec.label],
            "psnr_vs_baseline": psnr,
            "ssim_vs_baseline": ssim,
            "adherence": adherence,
            "fid_shapes": fid,
        }
        if q:
            results[spec.label]["adherence_paired"] = q["adherence_paired"]
            results[spec.label]["fid_shapes_interval"] = q["fid_shapes_interval"]
        if spec.label in vbench and base in vbench:
            from .bench_video import compare

            results[spec.label]["vbench"] = compare(vbench[spec.label], vbench[base])
        if spec.label in attributes and base in attributes:
            from .bench_video import compare_attributes

            results[spec.label]["adherence_attributes"] = compare_attributes(attributes[spec.label], attributes[base])
        if spec.label in density:
            results[spec.label]["attention_density"] = density[spec.label]
    report = {
        "settings": {
            "pipeline": pipeline, "family": family, "tier": tier, "steps": macs_kwargs["num_inference_steps"],
            "num_prompts": len(prompts), "call": {k: v for k, v in macs_kwargs.items()
                                                  if k not in ("prompt", "generator", "negative_prompt")},
            "repeats": repeats, "guidance_scale": guidance_scale, "size": size, "seed": seed,
            "batch_size": batch_size, "timing_batch": timing_batch, "processes": state.num_processes,
            "batches_per_process": batches_per_process,
            "distinct_prompts": len(set(prompts)), "seeds": f"{seed} + prompt index",
            "quality_seconds": quality_seconds,
            "baseline_cache": {"hit": cache_hit, "key": cache_key,
                               "folder": str(cache_folder) if cache_folder else None},
            "methods": {s.label: {"configs": [c.to_dict() for c in s.configs], "call_overrides": s.call_overrides}
                        for s in runnable},
            "median_wall_s": {k: statistics.median(v) for k, v in times.items()},
            "denoiser_macs": macs,
            "macs_counted_over": "all prompts" if macs_over_all else f"the {timing_batch} timing prompt(s)",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
        },
        "methods": results,
        "skipped": skipped,
    }
    if metrics:
        report["per_image"] = {"prompts": prompts, "seeds": seeds,
                               "verdicts": {k: "".join("1" if v else "0" for v in m[0]) for k, m in metrics.items()}}
        if attributes:  # per clip and attribute, so that any two rows can be paired later (AG vs its cutoff)
            report["per_image"]["attribute_verdicts"] = {
                label: {a: "".join("1" if v else "0" for v in flags) for a, flags in per.items()}
                for label, per in attributes.items()}
    _write_outputs(report, images, prompts, out_dir, json_path, pareto_x)
    return report


# ---------------------------------------------------------------------------------------------- outputs
def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.3f}"
    return str(value)


#: Columns of the paired comparison (present when the run has per-image verdicts).
PAIRED_KEYS = ("lost", "gained", "adherence_diff_pts", "fid_shapes_ci")


def _paired_cells(label: str, row: dict[str, Any]) -> list[str]:
    paired, fid = row.get("adherence_paired"), row.get("fid_shapes_interval")
    fid_cell = f"[{fid['ci_low']:.1f}, {fid['ci_high']:.1f}]" if fid else "-"
    if paired is None or label == "baseline":  # the baseline against itself: nothing to pair
        return ["-"] * (len(PAIRED_KEYS) - 1) + [fid_cell]
    from .eval.paired import format_difference

    return [str(paired["lost"]), str(paired["gained"]), format_difference(paired), fid_cell]


def markdown_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table; with per-image verdicts also prompts lost / gained vs the baseline, the paired
    adherence difference in points with its 95 % interval, and the bootstrap interval of FID-shapes."""
    s = report["settings"]
    paired = any("adherence_paired" in row for row in report["methods"].values())
    keys = METRIC_KEYS + (PAIRED_KEYS if paired else ())
    lines = [
        f"Pipeline `{s['pipeline']}` ({s['family']}, {s['tier']} tier), {s['steps']} steps, "
        f"{s['num_prompts']} prompts, {s['repeats']} interleaved timing repeats",
        "",
        "| method | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for label, row in report["methods"].items():
        cells = [_fmt(row[k]) for k in METRIC_KEYS] + (_paired_cells(label, row) if paired else [])
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for label, reason in report.get("skipped", {}).items():
        lines.append(f"| {label} | skipped: {reason} |" + " |" * (len(keys) - 1))
    if paired:
        from .eval.paired import FID_METHOD, PAIRED_METHOD

        lines += ["", f"lost / gained: prompts right in the baseline and wrong with the method / the reverse (same "
                      f"prompt and seed); adherence_diff_pts: method − baseline in points [{PAIRED_METHOD}]; "
                      f"fid_shapes_ci: [{FID_METHOD}]. {s.get('distinct_prompts', '?')} distinct prompts."]
    from .bench_video import attribute_table
    from .bench_video import markdown_table as vbench_table

    lines += attribute_table(report["methods"]) + vbench_table(report["methods"])
    densities = {label: row["attention_density"] for label, row in report["methods"].items()
                 if row.get("attention_density") is not None}
    if densities:
        lines += ["", "Measured self-attention density (kept key blocks / all, mean over layers, steps and calls): "
                      + "; ".join(f"{label}: {value:.3f}" for label, value in densities.items()) + "."]
    return "\n".join(lines)


def _write_outputs(report: dict[str, Any], images: dict[str, np.ndarray], prompts: list[str], out_dir: Path,
                   json_path: str | Path | None, pareto_x: str = "speedup_wall") -> None:
    json_file = Path(json_path) if json_path else out_dir / "bench.json"
    json_file.parent.mkdir(parents=True, exist_ok=True)
    json_file.write_text(json.dumps(report, indent=2, default=_json_default))
    table = markdown_table(report)
    (out_dir / "bench.md").write_text(table + "\n")
    _image_grid(images, out_dir / "grid.png")
    pareto_plot(report, out_dir / "pareto.png", x=pareto_x)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def _image_grid(images: dict[str, np.ndarray], path: Path, columns: int = 8) -> None:
    from PIL import Image, ImageDraw

    rows = []
    for label, batch in images.items():
        picks = batch[:columns]
        if picks.ndim == 5:  # videos: first frame
            picks = picks[:, 0]
        row = np.concatenate(list(picks), axis=1)
        header = Image.new("RGB", (120, row.shape[0]), "white")
        ImageDraw.Draw(header).text((4, 4), label[:18], fill="black")
        rows.append(np.concatenate([np.asarray(header), row], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def short_label(label: str) -> str:
    """A compact legend label: method names shortened, option names cut to their initials
    (``delta_cache:interval=2:num_cached_blocks=5`` → ``Δ i=2 ncb=5``)."""
    names = {"delta_cache": "Δ", "adaptive_guidance": "AG", "linear_ag": "LinAG", "cfg_cutoff": "cutoff",
             "fbcache": "FBC", "taylorseer": "TS", "dbcache": "DBC", "bottleneck": "BN", "magcache": "Mag"}
    parts = []
    for piece in label.split("+"):
        name, *options = piece.split(":")
        words = [names.get(name, name)]
        for option in options:
            key, _, value = option.partition("=")
            value = Path(value).stem if "/" in value else value
            words.append("".join(w[0] for w in key.split("_")) + "=" + value)
        parts.append(" ".join(words))
    return " + ".join(parts)


def pareto_plot(report: dict[str, Any], path: Path, x: str = "speedup_wall") -> None:
    """Cost vs quality: x is ``speedup_wall`` or ``macs_ratio``; y is the paired adherence difference to the baseline
    in points with its 95 % interval as error bars (PSNR vs baseline when there are no verdicts). Points are numbered
    and the legend names them, so ten methods stay readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if x not in ("speedup_wall", "macs_ratio"):
        raise ValueError(f"Pareto x axis must be 'speedup_wall' or 'macs_ratio', got {x!r}.")
    rows = [(label, row) for label, row in report["methods"].items() if label != "baseline" and row.get(x)]
    paired = all("adherence_paired" in row for _, row in rows) and bool(rows)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    cmap = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")
    for index, (label, row) in enumerate(rows, start=1):
        colour = cmap(index - 1)
        if paired:
            p = row["adherence_paired"]
            y = 100 * p["difference"]
            yerr = [[y - 100 * p["ci_low"]], [100 * p["ci_high"] - y]]
            ax.errorbar(row[x], y, yerr=yerr, fmt="o", color=colour, capsize=3, label=f"{index}: {short_label(label)}")
        else:
            y = row["psnr_vs_baseline"]
            ax.scatter(row[x], y, color=colour, label=f"{index}: {short_label(label)}")
        ax.annotate(str(index), (row[x], y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if paired:
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_ylabel("adherence − baseline (points, 95 % CI)")
    else:
        ax.set_ylabel("PSNR vs baseline (dB)")
    ax.set_xlabel("speedup (wall, x)" if x == "speedup_wall" else "MACs ratio (baseline / method, x)")
    ax.set_title(f"{report['settings']['pipeline']} ({report['settings']['tier']} tier, "
                 f"{report['settings']['num_prompts']} prompts)")
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- CLI
def add_bench_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="baseline vs methods side by side: speedup, MACs, NFE, PSNR/SSIM, adherence")
    p.add_argument("--pipeline", default=None, help="pipeline name or path (default: testbed:pixart if shipped)")
    p.add_argument("--methods", default="baseline,delta_cache,fbcache,taylorseer",
                   help="comma list; name[:key=value...]; '+' combines methods in one entry")
    p.add_argument("--prompts", default=None,
                   help=f"number of built-in/held-out prompts, or a text file (default: {QUALITY_PROMPTS} held-out "
                        "prompt+seed pairs for a testbed on the quality tier, else 16)")
    p.add_argument("--steps", type=int, default=None, help="default: the pipeline's testbed default, else 20")
    p.add_argument("--tier", choices=("quality", "speed", "full-width"), default="quality",
                   help="testbed: the trained models, or random weights sized for timing (speed: the testbed's "
                        "speed tier; full-width: the published model's block width at a truncated depth)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--size", type=int, default=None, help="height = width in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None,
                   help="prompts per quality call (default: 32 on a testbed, else 8)")
    p.add_argument("--timing-batch", type=int, default=1)
    p.add_argument("--out", default="bench_out")
    p.add_argument("--json", default=None)
    p.add_argument("--pareto-x", choices=("speedup_wall", "macs_ratio"), default="speedup_wall",
                   help="x axis of the Pareto plot")
    p.add_argument("--no-baseline-cache", action="store_true",
                   help="always regenerate the baseline (default: reuse cached images/verdicts of the same settings)")
    p.add_argument("--cache-dir", default=None, help="baseline cache folder (default: ~/.cache/diffusion_accel/bench)")
    p.add_argument("--fid-resamples", type=int, default=200, help="bootstrap resamples of the FID-shapes interval")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    pipeline = args.pipeline or default_pipeline()
    testbed_quality = pipeline.startswith("testbed:") and args.tier == "quality"
    prompts = args.prompts or str(QUALITY_PROMPTS if testbed_quality else 16)
    prompts_file = prompts if not prompts.isdigit() else None
    batch_size = args.batch_size or (32 if pipeline.startswith("testbed:") else 8)
    cache_dir = None if args.no_baseline_cache else (args.cache_dir or "default")
    report = run_bench(
        pipeline, args.methods,
        num_prompts=int(prompts) if prompts.isdigit() else 10_000, prompts_file=prompts_file,
        steps=args.steps, tier=args.tier, repeats=args.repeats, guidance_scale=args.guidance_scale,
        size=args.size, seed=args.seed, batch_size=batch_size, timing_batch=args.timing_batch,
        out_dir=args.out, json_path=args.json, cache_dir=cache_dir, fid_resamples=args.fid_resamples,
        pareto_x=args.pareto_x,
    )
    if report is None:  # not the main process of a sharded run: the main process writes and prints the report
        return 0
    print(markdown_table(report))
    print(f"\nwrote {args.json or Path(args.out) / 'bench.json'}, {Path(args.out) / 'bench.md'}, "
          f"{Path(args.out) / 'pareto.png'}, {Path(args.out) / 'grid.png'}")
    return 0
