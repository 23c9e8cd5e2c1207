"""The README's benchmark suites: each run reaches ``run_bench`` with its settings and gets its own folder."""

from __future__ import annotations

import json

import pytest

from diffusion_accel import bench
from diffusion_accel.benchmarks import suite


def test_bottleneck_suite_runs_both_speed_sizes_with_the_same_methods(tmp_path, monkeypatch):
    calls = []

    def fake_run_bench(pipeline, methods, **kwargs):
        calls.append((pipeline, methods, kwargs))
        kwargs["out_dir"].mkdir(parents=True)  # as the real one does
        return {"settings": {}, "methods": {}}

    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    monkeypatch.setattr(bench, "markdown_table", lambda report: "")
    suite.run_suite("bottleneck", tmp_path, tier="speed")
    assert [c[2]["size"] for c in calls] == [None, 256]
    assert all(c[0] == "testbed:flow" and c[1] == suite.BOTTLENECK_METHODS for c in calls)
    assert [c[2]["out_dir"].name for c in calls] == ["bottleneck_0_speed", "bottleneck_1_speed_256px"]
    report = json.loads((tmp_path / "bottleneck_1_speed_256px" / "bench.json").read_text())
    assert report["settings"]["suite_seconds"] >= 0


def test_unknown_suite_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="bottleneck"):
        suite.run_suite("nope", tmp_path)
