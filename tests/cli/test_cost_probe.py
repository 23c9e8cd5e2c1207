"""The cost probe that picks matched settings: counted MACs ratios, measured attention density, and the bisection
that matches a sparse mask's knob to a target density."""

from __future__ import annotations

import pytest

from diffusion_accel.benchmarks import cost_probe


def test_probe_counts_macs_and_density():
    rows = cost_probe.probe("tiny:wan", "steps=2,sparse_attention:mask=topk:block_size=1:min_tokens=0:density=0.5:"
                                        "backend=eager", num_prompts=1)
    assert rows["baseline"]["macs_ratio"] == 1.0 and rows["baseline"]["attention_density"] is None
    assert rows["steps=2"]["macs_ratio"] == pytest.approx(2.0)  # 4 contract steps against 2
    sparse = rows["sparse_attention:mask=topk:block_size=1:min_tokens=0:density=0.5:backend=eager"]
    assert 0.4 <= sparse["attention_density"] <= 0.6  # one-token blocks: the kept fraction is the asked one


def test_match_density_bisects_toward_the_target(monkeypatch):
    """With a density that grows as knob², the bisection must land where knob² = target, and report what it
    measured there (not the knob)."""
    def fake_probe(pipeline, methods, num_prompts, seed=0, baseline=True):
        value = float(methods.rsplit("=", 1)[1])
        return {methods: {"attention_density": value ** 2}}

    monkeypatch.setattr(cost_probe, "probe", fake_probe)
    found = cost_probe.match_density("testbed:wan", "sparse_attention:mask=asa", "tau", 0.25, 0.0, 1.0,
                                     iterations=10)
    assert found["value"] == pytest.approx(0.5, abs=2e-3)
    assert found["density"] == pytest.approx(0.25, abs=2e-3) and len(found["probes"]) == 10
