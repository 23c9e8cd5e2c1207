"""The router-overhead account: the free-reuse ceiling is computed from the right cells, the per-unit table covers
every forward, and the MACs ratio it rebuilds from flop-counter shares is the one the flop counter gives."""

from __future__ import annotations

import pytest
import torch
from diffusion_accel.pipelines.adapters import find_adapter
from diffusion_accel.pipelines.tiny import tiny_call_kwargs

from diffusion_accel.bench import count_denoiser_macs, parse_method_specs
from diffusion_accel.benchmarks.router_overhead import _timed_spans, account, free_reuse_ratio, unit_seconds
from diffusion_accel.cache_router import CacheRouter
from diffusion_accel.testing import tiny_pipeline

STEPS = 4


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_pipeline("pixart_alpha")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call():
    kwargs = {**tiny_call_kwargs("pixart_alpha"), "num_inference_steps": STEPS, "clean_caption": False,
              "output_type": "pt"}
    kwargs["generator"] = [torch.Generator().manual_seed(0)]
    return kwargs


def test_free_reuse_ratio_counts_only_reused_cells():
    seconds = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    compute = torch.tensor([[True, True], [False, True]])
    # 20 s of denoiser time, the reused cell (step 1, unit 0) took 3 s
    assert free_reuse_ratio(seconds, 20.0, compute) == pytest.approx(20.0 / 17.0)
    assert free_reuse_ratio(seconds, 20.0, torch.ones(2, 2, dtype=torch.bool)) == 1.0


class _Sleeps(torch.nn.Module):
    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        import time

        time.sleep(self.seconds)
        return x


def test_a_unit_with_feeders_is_timed_from_its_first_feeder():
    """A reuse skips the feeders and the work between them and the unit, so the unit's time spans all of it: from
    the first feeder's start to the unit's end, once per unit forward."""
    feeder, between, unit = _Sleeps(0.02), _Sleeps(0.02), _Sleeps(0.0)
    spans, plain = [[]], [[]]
    with _timed_spans([([feeder, unit], unit)], spans), _timed_spans([([unit], unit)], plain):
        for _ in range(2):
            unit(between(feeder(torch.zeros(1))))
    assert len(spans[0]) == len(plain[0]) == 2
    assert all(t >= 0.04 for t in spans[0]) and all(t < 0.04 for t in plain[0])


def test_unit_table_covers_every_step_and_unit(pipe):
    units = find_adapter(pipe).routing_units(pipe)
    table, denoiser_seconds = unit_seconds(pipe, units, _call(), STEPS, repeats=1)
    assert table.shape == (STEPS, len(units))
    assert bool((table > 0).all())
    assert 0 < float(table.sum()) < denoiser_seconds
    with pytest.raises(ValueError, match="not a whole number per step"):
        unit_seconds(pipe, units, _call(), STEPS + 1, repeats=1)


def test_account_rebuilds_the_flop_counters_macs_ratio(pipe, tmp_path):
    units = find_adapter(pipe).routing_units(pipe)
    logits = torch.randn(STEPS, len(units), generator=torch.Generator().manual_seed(3))
    folder = CacheRouter.for_pipeline(pipe, STEPS, None, logits=logits).save(tmp_path / "router")
    result = account(pipe, folder, _call(), threshold=0.5, repeats=1)
    baseline, routed = parse_method_specs(f"baseline,harmonica:router={folder}:threshold=0.5")
    counted = count_denoiser_macs(pipe, _call(), baseline) / count_denoiser_macs(pipe, _call(), routed)
    assert result["macs_ratio"] == pytest.approx(counted, rel=1e-7)  # shares are float sums
    assert result["macs_ratio"] > 1.0
    assert sum(s["time_share"] for s in result["shares"].values()) == pytest.approx(1.0)
    assert sum(s["macs_share"] for s in result["shares"].values()) == pytest.approx(1.0)
    assert set(result["shares"]) == {"attn1", "attn2", "ff", "outside units"}
    assert result["free_reuse_ratio"] > 1.0


def test_applying_the_router_stays_outside_the_timed_calls(pipe, tmp_path, monkeypatch):
    """The wall ratio is what a user who applied the router once sees per call: a slow apply (reading the router
    file) shows in ``median_seconds["apply"]``, not in the router's call time."""
    import time

    units = find_adapter(pipe).routing_units(pipe)
    folder = CacheRouter.for_pipeline(pipe, STEPS, None, logits=torch.zeros(STEPS, len(units))).save(tmp_path / "r")
    load = CacheRouter.load.__func__
    delay = 0.5

    def slow_load(cls, path):
        time.sleep(delay)
        return load(cls, path)

    monkeypatch.setattr(CacheRouter, "load", classmethod(slow_load))
    result = account(pipe, folder, _call(), threshold=0.5, repeats=1)
    seconds = result["median_seconds"]
    assert seconds["apply"] >= delay
    assert seconds["wall"]["router"] < seconds["wall"]["baseline"] + delay


def test_account_refuses_a_router_of_another_layout(pipe, tmp_path):
    units = find_adapter(pipe).routing_units(pipe)
    folder = CacheRouter.for_pipeline(pipe, STEPS, None, logits=torch.zeros(STEPS, len(units))).save(tmp_path / "r")
    router = CacheRouter.load(folder)
    router.config["units"] = router.units[:-1]
    router.logits = router.logits[:, :-1]
    router.trainable = router.trainable[:, :-1]
    router.save(tmp_path / "short")
    with pytest.raises(ValueError, match="units do not match"):
        account(pipe, tmp_path / "short", _call(), repeats=1)


def test_stretched_router_gives_a_shallower_model_the_decisions_of_block_i_times_the_depth_ratio(tmp_path):
    """The full-width tier (4 PixArt blocks) times the 6-block shipped router: block i takes block ⌊6i/4⌋'s row of θ,
    branch by branch, at the router's τ (so the schedule is the quality router's, thinned)."""
    from diffusion_accel.benchmarks.learned_cache import stretched_router
    from diffusion_accel.loading import load_pipeline
    from diffusion_accel.methods.harmonica import shipped_router

    source_folder = shipped_router(load_pipeline("testbed:pixart"), "harmonica")
    wide = load_pipeline("testbed:pixart", tier="full-width")
    source = CacheRouter.load(source_folder)
    stretched = CacheRouter.load(stretched_router(source_folder, wide, tmp_path / "router"))
    assert len(stretched.units) == 4 * 3 and stretched.config["threshold"] == source.config["threshold"]
    taken = {int(name.split(".")[1]) for name in stretched.units}
    assert taken == {0, 1, 2, 3}
    for u, name in enumerate(stretched.units):
        list_name, index, branch = name.split(".")
        mapped = source.units.index(f"{list_name}.{int(index) * 6 // 4}.{branch}")
        assert torch.equal(stretched.logits[:, u], source.logits[:, mapped]), name
    assert not torch.equal(stretched.logits[:, 3 * 3], source.logits[:, 3 * 3])  # block 3 ← block 4, not block 3
