"""``python -m diffusion_accel.benchmarks.distill --family wan``: its MACs accounting and a 2-prompt run."""

from __future__ import annotations

import json

import pytest
import torch

from diffusion_accel.benchmarks import distill, distill_wan


def test_self_attention_core_macs_is_what_the_flop_counter_counts():
    """The MACs the sparse rows are credited with (the self-attention cores scaled by density) are exactly what the
    flop counter counts for those cores on a quality-tier forward of the testbed's 48 tokens."""
    from diffusion_accel.pipelines.testbed.wan import UMT5_DIM, Z_DIM, build_transformer, transformer_config
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_transformer("quality")
        x, text = torch.empty(1, Z_DIM, 3, 8, 8), torch.empty(1, 8, UMT5_DIM)
        timestep = torch.tensor([500])
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(hidden_states=x, timestep=timestep, encoder_hidden_states=text, return_dict=False)
    counts = counter.get_flop_counts()
    cores = sum(v for k, ops in counts.items() if k.endswith(".attn1") for op, v in ops.items()
                if "bmm" in str(op) or "attention" in str(op)) / 2
    assert cores == distill_wan.self_attention_core_macs(48, transformer_config("quality"))
    speed = distill_wan.speed_tier_forward_macs()
    assert speed["tokens"] == 17160 and 0.8 < speed["self_attention_core_macs"] / speed["forward_macs"] < 0.95
    assert speed["asa_estimate_macs"] < 0.01 * speed["self_attention_core_macs"]


def test_wan_rows_are_the_issues_rows():
    sparse = {"method": "sparse_attention", "mask": "asa", "block_size": 4}
    labels = [r.label for r in distill_wan.wan_rows(True, True, sparse)]
    assert labels == ["teacher 25 steps, CFG (reference)", "teacher 8 steps, CFG", "teacher 4 steps, CFG",
                      "TDM 4 steps (dense student)", "TDM 4 steps + ASA (training-free)",
                      "BLADE 4 steps (trained sparse)"]
    post = distill_wan.wan_rows(True, True, sparse)[4]
    assert post.pipeline == "tdm" and post.method == sparse


def test_wan_family_runs_on_two_prompts(tmp_path):  # ~10 s on one free core (the 25-step CFG reference, the judge)
    from diffusion_accel.pipelines.testbed import registry

    for name in ("wan-tdm", "wan-blade"):
        try:
            registry.testbed_path(name)
        except FileNotFoundError as exc:
            pytest.skip(str(exc))
    assert distill.main(["--family", "wan", "--prompts", "2", "--repeats", "1", "--timing-batch", "1",
                         "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "distill_wan.json").read_text())
    rows = {r["label"]: r for r in report["rows"]}
    assert len(rows) == 6 and report["num_prompts"] == 2
    assert rows["teacher 25 steps, CFG (reference)"]["denoiser_forwards_per_clip"] == 50
    blade = rows["BLADE 4 steps (trained sparse)"]
    assert blade["denoiser_forwards_per_clip"] == 4 and 0.15 < blade["attention_density"] < 0.26
    assert blade["macs_ratio"] > rows["TDM 4 steps (dense student)"]["macs_ratio"]
    assert "blade_adherence_within_5_points_of_reference" in report["claims"]
    assert (tmp_path / "distill_wan.md").read_text().startswith("| row |")
