"""``python -m diffusion_accel.benchmarks.distill --family wan``: the video students of ``testbed:wan``.

The teacher at its contract (25 steps, CFG 4: the reference) and at 8 / 4 steps, the dense TDM student
(``testbed:wan-tdm``) at 4 steps, that student with ASA switched on after training at the BLADE student's mask
config (density 0.2), and the BLADE student (``testbed:wan-blade``, trained under that mask). Columns: denoiser MACs
ratio at the testbed's 48 tokens (sparse rows credited with their measured density) and at the speed tier's 17 160
tokens, where attention dominates; wall ratio (48 tokens); video adherence on all three attributes and per
attribute, paired with the reference; the VBench-style dimensions and total with its paired interval
(:mod:`diffusion_accel.bench_video`); FID-shapes over frames; PSNR to the reference clip. The command line is the
image benchmark's (:mod:`.distill`).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from .distill import Row, _row_context, load_optional

#: The video rows' sparse-attention density (the issue's: BLADE and the dense student's post-hoc ASA at 0.2).
WAN_DENSITY = 0.2
#: The speed tier's ASA settings for the mask-estimate MACs at 17 160 tokens (the method's defaults there).
SPEED_ASA_BLOCK, SPEED_ASA_SAMPLES = 128, 16


def wan_rows(have_tdm: bool, have_blade: bool, sparse: dict[str, Any] | None) -> list[Row]:
    """The video rows: the teacher at its contract (25 steps, CFG 4: the reference) and at 8 / 4 steps, the dense
    TDM student at 4 steps, that student with ASA switched on after training (the BLADE student's stored mask
    config, so both sparse rows run the same mask at the same settings), and the BLADE student (its stored ASA)."""
    rows = [Row("teacher 25 steps, CFG (reference)", "teacher", {})]
    rows += [Row(f"teacher {n} steps, CFG", "teacher", {"num_inference_steps": n}) for n in (8, 4)]
    if have_tdm:
        rows.append(Row("TDM 4 steps (dense student)", "tdm", {}))
        if sparse is not None:
            rows.append(Row("TDM 4 steps + ASA (training-free)", "tdm", {}, method=dict(sparse),
                            note="the dense student with BLADE's mask config switched on after training"))
    if have_blade:
        rows.append(Row("BLADE 4 steps (trained sparse)", "blade", {}, note="its stored ASA, applied by the call"))
    return rows


def self_attention_core_macs(tokens: int, config: Any, batch: int = 1) -> float:
    """MACs of one forward's self-attention cores (QKᵀ and PV over ``tokens`` tokens, every block): what block
    sparsity scales by its density (the flop counter counts these as dense even where our kernels skip blocks)."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    return float(batch * config["num_layers"] * 2 * tokens * tokens * inner)


def asa_estimate_macs(tokens: int, config: Any, block_size: int, samples_per_block: int) -> float:
    """MACs of ASA's block-importance estimate per forward (sampled QKᵀ, every block and head)."""
    blocks = -(-tokens // block_size)
    sampled = blocks * min(samples_per_block, block_size)
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    return float(config["num_layers"] * sampled * sampled * inner)


def speed_tier_forward_macs() -> dict[str, float]:
    """One ``testbed:wan`` speed-tier denoiser forward (17 160 tokens, batch 1) counted by the flop counter on
    meta tensors (no compute): total MACs and its self-attention core share."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..pipelines.testbed.wan import UMT5_DIM, Z_DIM, build_transformer, latent_tokens, speed_call_kwargs
    from ..pipelines.testbed.wan import transformer_config as wan_transformer_config

    size = speed_call_kwargs()
    frames = (size["num_frames"] - 1) // 4 + 1
    with torch.device("meta"):
        model = build_transformer("speed")
        x = torch.empty(1, Z_DIM, frames, size["height"] // 8, size["width"] // 8)
        text = torch.empty(1, 32, UMT5_DIM)
        timestep = torch.tensor([500])
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(hidden_states=x, timestep=timestep, encoder_hidden_states=text, return_dict=False)
    tokens = latent_tokens(size["height"], size["width"], size["num_frames"])
    config = wan_transformer_config("speed")
    total = sum(counter.get_flop_counts()["Global"].values()) / 2.0
    return {"tokens": tokens, "forward_macs": total, "self_attention_core_macs": self_attention_core_macs(tokens,
                                                                                                        config),
            "asa_estimate_macs": asa_estimate_macs(tokens, config, SPEED_ASA_BLOCK, SPEED_ASA_SAMPLES)}


def _forwards_per_clip(row: Row, pipe: Any) -> int:
    from ..pipelines.contract import contract_of

    call = {**contract_of(pipe), **row.call}
    return int(call["num_inference_steps"]) * (2 if float(call.get("guidance_scale", 1.0)) > 1.0 else 1)


def run_wan(prompts_count: int = 64, teacher: str = "testbed:wan", tdm: str | None = "testbed:wan-tdm",
            blade: str | None = "testbed:wan-blade", repeats: int = 3, timing_batch: int = 8, batch: int = 16,
            fid_resamples: int = 200) -> dict[str, Any]:
    """The video distillation rows on ``testbed:wan``'s held-out clip captions (seed of prompt i: i), scored with the
    video bench's own machinery (:mod:`diffusion_accel.bench_video`, the bench's FID-shapes over frames)."""
    import diffusion_accel as da

    from .. import bench
    from .. import bench_video as bv
    from ..api import _session_of
    from ..eval.paired import claim_within, paired_summary
    from ..loading import load_pipeline
    from ..pipelines.contract import stored_methods
    from ..pipelines.testbed.video_data import heldout_video_prompts
    from ..pipelines.testbed.video_judge import video_verdicts_and_features
    from ..pipelines.testbed.wan import transformer_config as wan_transformer_config

    pipes = {"teacher": load_pipeline(teacher)}
    unavailable = load_optional(pipes, {"tdm": tdm, "blade": blade})
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    sparse = None
    if "blade" in pipes:
        sparse = next((m for m in stored_methods(pipes["blade"]) if m["method"] == "sparse_attention"), None)
    else:  # the BLADE preset's mask, for the post-hoc row without a BLADE student
        from ..train.options import load_config_file
        from ..train.sparse_training import parse_sparse_spec

        sparse = parse_sparse_spec(load_config_file("wan-blade")["sparse_attention"]).to_dict()
    rows = wan_rows("tdm" in pipes, "blade" in pipes, sparse)
    prompts = list(heldout_video_prompts(max(prompts_count, 1)))[:prompts_count]
    seeds = list(range(len(prompts)))

    def call(row: Row, start: int, count: int) -> dict[str, Any]:
        return {"prompt": prompts[start:start + count], "output_type": "np", **row.call,
                "generator": [torch.Generator().manual_seed(s) for s in seeds[start:start + count]]}

    clips: dict[str, np.ndarray] = {}
    macs: dict[str, float] = {}  # counted denoiser MACs per clip (flop counter; sparse cores counted dense)
    density: dict[str, float | None] = {}
    for row in rows:
        pipe = pipes[row.pipeline]
        chunks, total, densities = [], 0.0, []
        with _row_context(pipe, row, None):
            for i in range(0, len(prompts), batch):
                output, m = bench.generate_counting_macs(pipe, call(row, i, batch))
                chunks.append(bench.to_uint8(output))
                total += m
                if _session_of(pipe) is not None:  # a sparse row: the density its masks kept
                    densities.append(bench._attention_density(da.stats(pipe)))
        clips[row.label] = np.concatenate(chunks)
        macs[row.label] = total / len(prompts)
        kept = [d for d in densities if d is not None]
        density[row.label] = float(np.mean(kept)) if kept else None
        print(f"generated {row.label}", flush=True)

    times: dict[str, list[float]] = {row.label: [] for row in rows}
    for _ in range(repeats):  # interleaved: every row once per round, so drift hits all rows alike
        for row in rows:
            pipe = pipes[row.pipeline]
            with _row_context(pipe, row, None):
                start = time.perf_counter()
                pipe(**call(row, 0, timing_batch))
                times[row.label].append(time.perf_counter() - start)

    ref = rows[0].label
    metrics = {label: video_verdicts_and_features(c, prompts) for label, c in clips.items()}
    quality = bench._quality_stats(metrics, ref, fid_resamples, videos=True)
    judged = set(clips)
    attributes = bv.method_attributes(clips, judged, prompts)
    scores = bv.method_scores(clips, judged)
    quality_config = wan_transformer_config("quality")
    tokens = _quality_tokens(pipes["teacher"])
    core48 = self_attention_core_macs(tokens, quality_config)
    speed = speed_tier_forward_macs()
    ref_wall = float(np.median(times[ref]))
    report_rows = []
    for row in rows:
        label, pipe = row.label, pipes[row.pipeline]
        forwards = _forwards_per_clip(row, pipe)
        d = density[label]
        credited = macs[label] - (0.0 if d is None else forwards * (1.0 - d) * core48)
        sparse_row = d is not None
        speed_macs = forwards * (speed["forward_macs"] - (
            (1.0 - WAN_DENSITY) * speed["self_attention_core_macs"] - speed["asa_estimate_macs"] if sparse_row else 0))
        psnr = None if label == ref else bench.fidelity(clips[label], clips[ref])[0]
        entry: dict[str, Any] = {
            "label": label, "pipeline": row.pipeline, "call": row.call, "method": row.method, "note": row.note,
            "denoiser_forwards_per_clip": forwards, "attention_density": d,
            "macs_per_clip_counted": macs[label], "macs_ratio_counted": macs[ref] / macs[label],
            "macs_per_clip": credited, "macs_ratio": macs[ref] / credited,
            "speed_tier_macs_per_clip": speed_macs,
            "wall_median_s": float(np.median(times[label])), "speedup_wall": ref_wall / float(np.median(times[label])),
            "adherence": quality[label]["adherence"], "adherence_paired": quality[label]["adherence_paired"],
            "adherence_attributes": bv.compare_attributes(attributes[label], attributes[ref]),
            "vbench": bv.compare(scores[label], scores[ref]),
            "fid_shapes": quality[label]["fid_shapes"], "fid_shapes_interval": quality[label]["fid_shapes_interval"],
            "psnr_to_reference": psnr,
        }
        report_rows.append(entry)
    for entry in report_rows:
        entry["speed_tier_macs_ratio"] = report_rows[0]["speed_tier_macs_per_clip"] / entry["speed_tier_macs_per_clip"]

    by = {r["label"]: r for r in report_rows}
    claims: dict[str, Any] = {}
    blade_row, post = by.get("BLADE 4 steps (trained sparse)"), by.get("TDM 4 steps + ASA (training-free)")
    t4 = by["teacher 4 steps, CFG"]
    if blade_row is not None:
        total = blade_row["vbench"]["relative_change"][bv.TOTAL_KEY]
        low, high = blade_row["vbench"]["total_relative_change_ci"]
        claims["blade_macs_ratio_at_least_15"] = {
            "at_48_tokens": blade_row["macs_ratio"] >= 15.0, "macs_ratio_48_tokens": blade_row["macs_ratio"],
            "at_speed_tier_17160_tokens": blade_row["speed_tier_macs_ratio"] >= 15.0,
            "macs_ratio_speed_tier": blade_row["speed_tier_macs_ratio"]}
        claims["blade_adherence_within_5_points_of_reference"] = {
            "met": claim_within(blade_row["adherence_paired"]["ci_low"], 5.0),
            "difference": blade_row["adherence_paired"]["difference"],
            "ci": [blade_row["adherence_paired"]["ci_low"], blade_row["adherence_paired"]["ci_high"]]}
        claims["blade_vbench_total_within_3_percent"] = {"met": low > -0.03 and high < 0.03,
                                                         "point_estimate_within": abs(total) <= 0.03,
                                                         "relative_change": total, "ci": [low, high]}

        def versus(other: dict[str, Any]) -> dict[str, Any]:  # positive: BLADE better
            return {"adherence": blade_row["adherence"] - other["adherence"],
                    "adherence_paired": paired_summary(_flags(metrics, other["label"]),
                                                       _flags(metrics, blade_row["label"])),
                    "attributes_paired": {a: paired_summary(attributes[other["label"]][a],
                                                            attributes[blade_row["label"]][a])
                                          for a in bv.ATTRIBUTES},
                    "vbench_total": blade_row["vbench"]["dims"][bv.TOTAL_KEY] - other["vbench"]["dims"][bv.TOTAL_KEY],
                    "fid_lower_is_better": other["fid_shapes"] - blade_row["fid_shapes"],
                    "psnr_to_reference": blade_row["psnr_to_reference"] - other["psnr_to_reference"]}

        if post is not None:
            claims["blade_minus_dense_student_with_posthoc_asa"] = versus(post)
        claims["blade_minus_teacher_4_steps"] = versus(t4)
    return {"benchmark": "distill", "family": "wan", "teacher": teacher, "students": {"tdm": tdm, "blade": blade},
            "unavailable": unavailable, "sparse_attention": sparse, "num_prompts": len(prompts), "seeds": "prompt i: i",
            "repeats": repeats, "timing_batch": timing_batch, "threads": torch.get_num_threads(),
            "tokens": tokens, "self_attention_core_macs_per_forward": core48, "speed_tier": speed,
            "speed_tier_density": WAN_DENSITY,
            "macs_note": ("macs_ratio: denoiser MACs counted by torch.utils.flop_counter over every clip, with each "
                          "sparse row's self-attention cores scaled by its measured density (the counter counts them "
                          "dense; ASA's estimate is counted); macs_ratio_counted: without that credit. "
                          "speed_tier_macs_ratio: the same rows' forwards at the speed tier's 17 160 tokens (one "
                          f"forward counted on meta tensors), sparse rows at density {WAN_DENSITY} with ASA's "
                          f"estimate at block {SPEED_ASA_BLOCK}, {SPEED_ASA_SAMPLES} samples per block"),
            "wall_note": "quality tier (48 tokens), median of interleaved calls on the timing prompts",
            "rows": report_rows, "claims": claims}


def _flags(metrics: dict[str, Any], label: str) -> list[bool]:
    return list(metrics[label][0])


def _quality_tokens(pipe: Any) -> int:
    from ..pipelines.contract import contract_of
    from ..pipelines.testbed.wan import latent_tokens

    c = contract_of(pipe)
    return latent_tokens(c["height"], c["width"], c["num_frames"])


def markdown_wan(report: dict[str, Any]) -> str:
    from .. import bench_video as bv
    from ..eval.paired import format_difference

    head = ["row", "MACs ratio (48 tok)", "MACs ratio (17k tok)", "wall ratio", "attention density",
            "adherence (all three)", "Δ vs ref, points [95% CI] (lost / gained)", "VBench-style total",
            "total vs ref [95% CI]", "FID-shapes (frames)", "PSNR to ref"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(report["rows"]):
        p, v = r["adherence_paired"], r["vbench"]
        low, high = v["total_relative_change_ci"]
        change = v["relative_change"][bv.TOTAL_KEY]
        d, psnr = r["attention_density"], r["psnr_to_reference"]
        cells = [r["label"], f"{r['macs_ratio']:.2f}x", f"{r['speed_tier_macs_ratio']:.2f}x",
                 f"{r['speedup_wall']:.2f}x", "—" if d is None else f"{d:.3f}", f"{100 * r['adherence']:.1f}%",
                 "—" if i == 0 else f"{format_difference(p)} ({p['lost']} / {p['gained']})",
                 f"{v['dims'][bv.TOTAL_KEY]:.4f}",
                 "—" if i == 0 else f"{100 * change:+.2f} % [{100 * low:+.2f}, {100 * high:+.2f}]",
                 f"{r['fid_shapes']:.1f}", "—" if psnr is None else f"{psnr:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    methods = {("baseline" if i == 0 else r["label"]): r for i, r in enumerate(report["rows"])}
    lines += bv.attribute_table(methods)
    lines += bv.markdown_table(methods)
    lines += ["", f"MACs: {report['macs_note']}. Wall: {report['wall_note']}."]
    return "\n".join(lines)
