"""The BFM benchmark's verdict: each BFM row against the equal-budget monolithic model (the claim) and against the
same model sampled with fewer steps at about the same MACs (the equal-MACs baseline)."""

from __future__ import annotations

import pytest

from diffusion_accel.benchmarks.bfm import FEWER_STEPS, REFERENCE, verdict


def _row(gmacs, adherence, fid):
    return {"macs_per_image": gmacs * 1e9, "adherence_shapes-net": adherence, "fid_shapes": fid}


def test_bfm_rows_are_judged_against_the_reference_and_the_equal_macs_row():
    equal_macs = FEWER_STEPS[0][0]
    rows = {REFERENCE: _row(38.0, 0.50, 125.0), equal_macs: _row(19.0, 0.45, 128.0),
            "BFM M=4 + SG": _row(19.0, 0.47, 124.0), "BFM M=1 + SG": _row(25.0, 0.55, 120.0)}
    result = verdict(rows)
    assert set(result) == {"BFM M=4 + SG", "BFM M=1 + SG"}  # the baselines are not judged
    m4 = result["BFM M=4 + SG"]
    assert m4["macs_factor"] == pytest.approx(2.0) and m4["adherence_diff_points"] == pytest.approx(-3.0)
    assert not m4["meets_claim"]  # 2x fewer MACs and better FID, but lower adherence
    versus = m4[f"vs {equal_macs}"]
    assert versus["macs_over_it"] == pytest.approx(1.0) and versus["adherence_diff_points"] == pytest.approx(2.0)
    assert versus["fid_ratio"] == pytest.approx(124.0 / 128.0)
    assert not result["BFM M=1 + SG"]["meets_claim"]  # better quality, but only 1.52x fewer MACs
    rows["BFM M=1 + SG"] = _row(19.0, 0.55, 120.0)
    assert verdict(rows)["BFM M=1 + SG"]["meets_claim"]

