"""Smoke run of the kernel benchmark (``--quick``): the table and JSON have every cell, outputs agree."""

from __future__ import annotations

import json

from diffusion_accel.kernels import bench


def test_bench_quick_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["config"]["seq_len"] == 1024 and res["config"]["backends"] == ["cpp", "flex", "eager"]
    rows = res["rows"]
    assert [r["sparsity_pct"] for r in rows] == [0, 50, 90]
    for r in rows:
        assert r["dense_ms"] > 0 and r["cpp_ms"] > 0 and r["flex_ms"] > 0 and r["eager_ms"] > 0
        assert abs(r["cpp_speedup"] - r["dense_ms"] / r["cpp_ms"]) < 0.01 * r["cpp_speedup"] + 1e-3
        assert abs(r["flex_speedup"] - r["dense_ms"] / r["flex_ms"]) < 0.01 * r["flex_speedup"] + 1e-3
        assert r["max_abs_diff_between_backends"] < 1e-4  # the three backends compute the same attention
    assert res["skipped_backends"] == {}
    # 8 key blocks: keep 8, 4, 1 -> sparsity 0, 0.5, 0.875
    assert [r["actual_sparsity"] for r in rows] == [0.0, 0.5, 0.875]
    table = capsys.readouterr().out
    assert "sparsity" in table and "cpp ms" in table and "flex ms" in table and "90%" in table


def test_both_kernel_benches_reject_bad_sparsities_and_lengths(capsys):
    import pytest
    from diffusion_accel.kernels import bench_cuda

    for main, argv in ((bench.main, ["--sparsities", "0,100"]), (bench_cuda.main, ["--sparsities", "50,120"]),
                       (bench_cuda.main, ["--sparsities", "half"]), (bench_cuda.main, ["--lengths", "0,4096"]),
                       (bench.main, ["--backends", "cpp,sdpa"])):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "percentages in [0, 100)" in err and "integer percentages" in err and "positive token counts" in err
    assert "subset of cpp,flex,eager" in err
