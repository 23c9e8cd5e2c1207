"""Smoke test of the real-size Bottleneck Sampling speed bench (``--preset small``: the same code on a CPU)."""

from __future__ import annotations

import json
import math

from diffusion_accel.benchmarks import bottleneck_real_size as bench


def test_small_preset_runs_every_method_and_writes_json(tmp_path, capsys):
    out = tmp_path / "brs.json"
    bench.main(["--preset", "small", "--repeats", "1", "--device", "cpu", "--json", str(out)])
    report = json.loads(out.read_text())
    rows = report["methods"]
    assert set(rows) == {spec.label for spec in bench.parse_method_specs(bench.METHODS)}
    assert rows["baseline"]["speedup_wall"] == 1.0
    assert math.isinf(rows["baseline"]["latent_psnr_vs_baseline_random_weights"])
    # every method returns full-resolution latents of the baseline's shape, changed by the method
    for name in ("bottleneck", "steps=13"):
        assert math.isfinite(rows[name]["latent_psnr_vs_baseline_random_weights"])
    assert [rows[n]["steps"] for n in ("baseline", "steps=13", "steps=11")] == [28, 13, 11]
    assert report["settings"]["image_tokens"] == 256 and report["settings"]["height"] == 64
    assert "| steps=11 | 11 |" in capsys.readouterr().out
