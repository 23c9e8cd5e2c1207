"""The bench's VBench-style video rows: zero change for identical clips, lower dims for damaged clips, and the
columns, baseline cache and measured attention density of a real ``testbed:wan`` bench run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from diffusion_accel.pipelines.testbed.evaluate_video import VBENCH_DIMS, vbench_dims

from diffusion_accel.bench_video import TOTAL_KEY, clip_scores, compare


@pytest.fixture(scope="module")
def heldout():
    from diffusion_accel.pipelines.testbed.video_data import SPLIT_HELDOUT, make_clips

    return make_clips(SPLIT_HELDOUT, 0, 6)


@pytest.fixture(scope="module")
def real_clips(heldout):
    return heldout[0]


def test_identical_clips_give_zero_change(real_clips):
    scores = clip_scores(real_clips)
    result = compare(scores, {k: v.copy() for k, v in scores.items()})
    assert all(result["relative_change"][k] == 0.0 for k in (*VBENCH_DIMS, TOTAL_KEY))
    assert result["total_relative_change_ci"] == [0.0, 0.0]
    assert result["dims"] == result["baseline"]
    # the total is the plain mean of the five dims, and the dims are the ones `testbed eval wan` reports
    assert result["dims"][TOTAL_KEY] == pytest.approx(np.mean([result["dims"][k] for k in VBENCH_DIMS]))
    assert result["dims"][k := "motion_smoothness"] == pytest.approx(vbench_dims(real_clips)[k])


def test_damaged_clips_lower_the_dims(real_clips):
    """Frames shuffled in time and flickering in brightness: a generator that broke temporal coherence. Flicker,
    smoothness, both consistencies and the total must all drop, and the paired interval must exclude zero."""
    rng = np.random.default_rng(0)
    damaged = []
    for clip in real_clips:
        order = rng.permutation(len(clip))
        gain = rng.uniform(-40, 40, size=(len(clip), 1, 1, 1))
        damaged.append(np.clip(clip[order].astype(np.float64) + gain, 0, 255).astype(np.uint8))
    base, bad = clip_scores(real_clips), clip_scores(np.stack(damaged))
    result = compare(bad, base)
    for key in ("temporal_flickering", "motion_smoothness", "subject_consistency", "background_consistency",
                TOTAL_KEY):
        assert result["relative_change"][key] < -0.005, key
    assert result["total_relative_change_ci"][1] < 0
    # one damaged clip among good ones lowers the total less than all of them damaged
    one = {k: v.copy() for k, v in base.items()}
    for k in one:
        one[k][0] = bad[k][0]
    partial = compare(one, base)["relative_change"][TOTAL_KEY]
    assert result["relative_change"][TOTAL_KEY] < partial < 0


def test_time_reversed_clips_lose_direction_only(heldout):
    """Played backwards, every clip moves the other way: the paired direction verdict loses every clip while colour
    and shape lose none, and temporal flickering (symmetric in time) cannot see it. On this testbed the all-three
    verdict could only lose the baseline's few right clips; per attribute the loss is visible."""
    from diffusion_accel.bench_video import attribute_table, compare_attributes, method_attributes

    clips, meta = heldout
    prompts = [c.caption for c in meta]
    flags = method_attributes({"baseline": clips, "reversed": clips[:, ::-1].copy(), "image": clips[:, 0]},
                              {"baseline", "reversed", "image"}, prompts)
    assert set(flags) == {"baseline", "reversed"}  # still images get no video verdicts
    result = compare_attributes(flags["reversed"], flags["baseline"])
    n = len(clips)
    assert result["direction"]["paired"]["lost"] == n and result["direction"]["adherence"] == 0.0
    assert result["colour"]["paired"]["lost"] == result["shape"]["paired"]["lost"] == 0
    assert compare(clip_scores(clips[:, ::-1].copy()), clip_scores(clips))["relative_change"][
        "temporal_flickering"] == pytest.approx(0.0, abs=1e-12)
    methods = {"baseline": {"adherence_attributes": compare_attributes(flags["baseline"], flags["baseline"])},
               "reversed": {"adherence_attributes": result}}
    reversed_row = next(line for line in attribute_table(methods) if line.startswith("| reversed"))
    assert f"0.0 % ({n} / 0, -100.0 [" in reversed_row


def test_unpaired_clip_counts_are_refused(real_clips):
    scores = clip_scores(real_clips)
    with pytest.raises(ValueError, match="paired"):
        compare({k: v[:-1] for k, v in scores.items()}, scores)


def test_markdown_puts_each_dim_beside_the_baseline(real_clips):
    from diffusion_accel.bench import markdown_table

    base = clip_scores(real_clips)
    darker = clip_scores((real_clips // 2).astype(np.uint8))
    row = {"speedup_wall": 1.0, "macs_ratio": 1.0, "nfe": 50.0, "psnr_vs_baseline": 30.0, "ssim_vs_baseline": 0.9,
           "adherence": None, "fid_shapes": None}
    report = {"settings": {"pipeline": "testbed:wan", "family": "wan", "tier": "quality", "steps": 25,
                           "num_prompts": 6, "repeats": 1},
              "methods": {"baseline": {**row, "vbench": compare(base, base)},
                          "sparse": {**row, "vbench": compare(darker, base), "attention_density": 0.2504}}}
    table = markdown_table(report)
    lines = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    assert "VBench-style total" in lines["| method"] and "total vs baseline" in lines["| method"]
    assert "(+0.0 %)" not in lines["| baseline"] and lines["| baseline"].endswith("| - |")
    change = compare(darker, base)["relative_change"]["background_consistency"]
    assert f"({100 * change:+.1f} %)" in lines["| sparse"]
    assert "unweighted mean" in table and "sparse: 0.250" in table


@pytest.mark.slow
def test_wan_bench_reports_vbench_and_density(tmp_path, monkeypatch):
    """A 2-prompt, 2-step bench on the shipped ``testbed:wan``: every row has the dims beside the baseline's, the
    baseline's change is zero, a cached baseline gives the same dims, and the sparse row reports the density its
    masks measured (top-k at 0.25 over 12 blocks of 4 tokens keeps exactly 3 per row)."""
    from diffusion_accel.pipelines.testbed import evaluate_video

    from diffusion_accel import bench

    stats = evaluate_video.reference_statistics(8)  # a small FID reference: this test is about the VBench rows
    monkeypatch.setattr(evaluate_video, "reference_statistics", lambda *args: stats)
    methods = "baseline,sparse_attention:mask=topk:block_size=4:min_tokens=0:density=0.25:backend=eager"
    kwargs = dict(num_prompts=2, steps=2, repeats=1, batch_size=2, cache_dir=tmp_path / "cache", fid_resamples=10)
    report = bench.run_bench("testbed:wan", methods, out_dir=tmp_path / "a", **kwargs)
    rows = report["methods"]
    sparse = rows["sparse_attention:mask=topk:block_size=4:min_tokens=0:density=0.25:backend=eager"]
    assert rows["baseline"]["vbench"]["relative_change"][TOTAL_KEY] == 0.0
    assert sparse["vbench"]["baseline"] == rows["baseline"]["vbench"]["dims"]
    assert set(sparse["vbench"]["dims"]) == {*VBENCH_DIMS, TOTAL_KEY}
    assert sparse["attention_density"] == pytest.approx(0.25)
    assert "attention_density" not in rows["baseline"]
    assert set(sparse["adherence_attributes"]) == {"colour", "shape", "direction"}
    assert rows["baseline"]["adherence_attributes"]["direction"]["paired"]["difference"] == 0.0
    table = (tmp_path / "a" / "bench.md").read_text()
    assert "VBench-style total" in table and "unweighted mean" in table and "density" in table
    written = json.loads((tmp_path / "a" / "bench.json").read_text())
    assert written["methods"]["baseline"]["vbench"]
    assert len(written["per_image"]["attribute_verdicts"]["baseline"]["direction"]) == 2

    again = bench.run_bench("testbed:wan", methods, out_dir=tmp_path / "b", **kwargs)
    assert again["settings"]["baseline_cache"]["hit"]
    # the same cached clips: the same dims up to float32 feature noise between shapes-net calls
    assert again["methods"]["baseline"]["vbench"]["dims"] == pytest.approx(rows["baseline"]["vbench"]["dims"], rel=1e-6)
