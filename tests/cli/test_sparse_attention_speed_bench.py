"""Smoke run of the end-to-end sparse-attention speed bench (``--quick``) and its argument checks."""

from __future__ import annotations

import json

import pytest

from diffusion_accel.benchmarks import sparse_attention_speed as bench


def test_quick_run_writes_matched_masks_and_ratios(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert bench.main(["--quick", "--masks", "topk,asa", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["settings"]["latent_tokens"] == 3 * 8 * 8 and res["settings"]["repeats"] == 1
    methods = res["methods"]
    assert list(methods) == ["baseline", "topk", "asa"]
    for name in ("topk", "asa"):
        row = methods[name]
        assert 0 < row["density"] < 1  # the hook really ran sparse
        assert row["speedup_wall"] == pytest.approx(methods["baseline"]["wall_s"] / row["wall_s"], rel=0.02)
        assert row["psnr_latents"] > 20  # close to dense attention on random weights
    assert "| asa |" in capsys.readouterr().out


@pytest.mark.parametrize("argv,msg", [(["--masks", "asa,dense"], "subset of"), (["--sparsity", "1.2"], "(0, 1)"),
                                      (["--size", "100"], "multiple of 16")])
def test_bad_arguments_are_argparse_errors(argv, msg, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2 and msg in capsys.readouterr().err
