"""The side-by-side bench harness writes the JSON (exact keys), table and PNGs, and lists peers it cannot run."""

from __future__ import annotations

import json

from diffusion_accel.bench import METRIC_KEYS, markdown_table, parse_method_specs, run_bench


def test_bench_outputs_and_keys(tmp_path):
    report = run_bench("tiny:flux", "baseline,delta_cache,fbcache:threshold=0.2,fastercache,steps=2",
                       num_prompts=2, steps=4, repeats=1, out_dir=tmp_path, json_path=tmp_path / "out.json")
    data = json.loads((tmp_path / "out.json").read_text())
    assert set(data["methods"]) == {"baseline", "delta_cache", "fbcache:threshold=0.2", "steps=2"}
    for row in data["methods"].values():
        assert set(row) == set(METRIC_KEYS)
    assert "fastercache" in data["skipped"] and "supports the families" in data["skipped"]["fastercache"]
    assert data["methods"]["baseline"]["speedup_wall"] == 1.0 and data["methods"]["baseline"]["macs_ratio"] == 1.0
    assert data["methods"]["delta_cache"]["macs_ratio"] > 1.1
    assert data["methods"]["steps=2"]["macs_ratio"] > 1.9
    assert 0 < data["methods"]["delta_cache"]["psnr_vs_baseline"] < 100
    assert data["methods"]["steps=2"]["nfe"] == 4  # 2 steps x 2 passes (true CFG)
    for name in ("bench.md", "grid.png", "pareto.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "skipped:" in markdown_table(report)


def test_method_spec_parsing():
    specs = parse_method_specs("delta_cache:interval=3:num_cached_blocks=0.5,adaptive_guidance+delta_cache,steps=7,"
                               "bottleneck:start_sigmas=[1.0,0.7,0.5]")
    assert [s.label for s in specs][0] == "baseline"
    assert specs[1].configs[0].interval == 3 and specs[1].configs[0].num_cached_blocks == 0.5
    assert [c.name for c in specs[2].configs] == ["adaptive_guidance", "delta_cache"]
    assert specs[3].call_overrides == {"num_inference_steps": 7}
    assert specs[4].configs[0].start_sigmas == (1.0, 0.7, 0.5)


def test_quality_tier_counts_macs_over_every_prompt(tmp_path):
    """Quality tier: the denoiser MACs are the sum over all prompts' calls (the mean cost of per-prompt-adaptive
    methods), i.e. n prompts cost n times one prompt for a method whose work does not depend on the prompt."""
    import diffusion_accel as da
    from diffusion_accel.bench import MethodSpec, call_kwargs, count_denoiser_macs
    from diffusion_accel.loading import base_call_kwargs

    report = run_bench("tiny:flux", "baseline,steps=2", num_prompts=3, steps=4, repeats=1, batch_size=1,
                       tier="quality", out_dir=tmp_path, shape_metrics=False)
    settings = report["settings"]
    assert settings["macs_counted_over"] == "all prompts"
    pipe = da.load_pipeline("tiny:flux")
    pipe.set_progress_bar_config(disable=True)
    kwargs = call_kwargs(pipe, "flux", ["a red circle"], base_call_kwargs("tiny:flux"), 4, None, None, [0])
    one = count_denoiser_macs(pipe, kwargs, MethodSpec(label="baseline"))
    assert settings["denoiser_macs"]["baseline"] == 3 * one
    assert report["methods"]["steps=2"]["macs_ratio"] == 2.0


# ---------------------------------------------------------------------------------------------- sharding
class _State:
    """Stands in for accelerate's PartialState of process ``index`` of ``count``."""

    def __init__(self, count, index):
        import torch

        self.num_processes, self.process_index = count, index
        self.is_main_process, self.device = index == 0, torch.device("cpu")


def test_shard_matches_accelerate_and_covers_every_item_once():
    from accelerate import PartialState

    from diffusion_accel.distributed import gather, shard, shard_bounds

    for count in range(0, 12):
        for processes in (1, 2, 3, 5):
            items = list(range(count))
            shares = [shard(items, _State(processes, r)) for r in range(processes)]
            assert sum(shares, []) == items, (count, processes)  # contiguous, in order: concatenation is the whole
            for rank in range(processes):  # the same split as accelerate's split_between_processes (eval uses it)
                with PartialState.split_between_processes(_State(processes, rank), items) as expected:
                    assert shares[rank] == list(expected)
                assert shard_bounds(count, processes, rank)[1] - shard_bounds(count, processes, rank)[0] \
                    == len(shares[rank])
    assert gather([1, 2], _State(1, 0)) == [1, 2]


def test_sharded_bench_report_equals_one_process(tmp_path, monkeypatch):
    """Two processes simulated in one: rank 1's shares are computed as rank 1 computes them and handed to rank 0 by
    a stand-in ``gather``; rank 0's report then equals a one-process run's in everything but the timings (same
    images, bit for bit), and rank 1 writes nothing. The real two-process run is the slow test below."""
    import diffusion_accel as da
    import diffusion_accel.distributed as distributed
    from diffusion_accel.bench import _quality_share
    from diffusion_accel.distributed import shard
    from diffusion_accel.loading import base_call_kwargs
    from diffusion_accel.prompts import bench_prompts

    options = dict(num_prompts=3, steps=4, repeats=1, batch_size=1, tier="quality", shape_metrics=False,
                   cache_dir=None)
    methods = "baseline,delta_cache,fbcache:threshold=0.2"
    single = run_bench("tiny:flux", methods, out_dir=tmp_path / "one", **options)

    other = da.load_pipeline("tiny:flux")
    other.set_progress_bar_config(disable=True)
    batches = [(i, [p]) for i, p in enumerate(bench_prompts("tiny:flux", 3, None))]
    rank1 = [_quality_share(other, spec, shard(batches, _State(2, 1)), "flux", base_call_kwargs("tiny:flux"), 4,
                            None, None, 0, True, process=1) for spec in parse_method_specs(methods)]
    assert [len(share) for share in rank1] == [1, 1, 1]  # 3 batches over 2 processes: 2 + 1
    handed = iter(rank1)

    def gather_as_rank0(local, state):
        return local + ([False] if local and isinstance(local[0], bool) else next(handed))

    monkeypatch.setattr(distributed, "gather", gather_as_rank0)
    sharded = run_bench("tiny:flux", methods, out_dir=tmp_path / "two", state=_State(2, 0), **options)
    assert next(handed, None) is None
    assert sharded["settings"]["processes"] == 2 and sharded["settings"]["batches_per_process"] == [2, 1]
    for label, row in single["methods"].items():
        same = {k: v for k, v in row.items() if k != "speedup_wall"}
        assert {k: v for k, v in sharded["methods"][label].items() if k != "speedup_wall"} == same, label
    assert sharded["settings"]["denoiser_macs"] == single["settings"]["denoiser_macs"]
    assert (tmp_path / "two" / "grid.png").read_bytes() == (tmp_path / "one" / "grid.png").read_bytes()

    monkeypatch.setattr(distributed, "gather", lambda local, state: local)
    assert run_bench("tiny:flux", methods, out_dir=tmp_path / "rank1", state=_State(2, 1), **options) is None
    assert not (tmp_path / "rank1" / "bench.json").exists()


def test_bench_under_accelerate_launch_two_cpu_processes(tmp_path):
    """``accelerate launch`` with two gloo processes on CPU: both generate a share, rank 0 writes the one report, and
    it equals the one-process run's in everything but the timings (images bit for bit: the grids are equal)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:  # a free port: other test runs on this host may hold accelerate's default
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    bench = ["bench", "--pipeline", "tiny:flux", "--methods", "baseline,delta_cache,fbcache:threshold=0.2",
             "--prompts", "5", "--steps", "4", "--repeats", "1", "--batch-size", "2", "--no-baseline-cache"]
    subprocess.run([sys.executable, "-m", "diffusion_accel.cli", *bench, "--out", str(tmp_path / "one")],
                   check=True, env=env, timeout=300, capture_output=True)
    launched = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                               "2", "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
                               "--dynamo_backend", "no", "-m", "diffusion_accel.cli", *bench,
                               "--out", str(tmp_path / "two")], env=env, timeout=300, capture_output=True, text=True)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("| delta_cache |") == 1, "only the main process prints the table"
    one = json.loads((tmp_path / "one" / "bench.json").read_text())
    two = json.loads((tmp_path / "two" / "bench.json").read_text())
    assert two["settings"]["processes"] == 2 and two["settings"]["batches_per_process"] == [2, 1]
    for label, row in one["methods"].items():
        assert {k: v for k, v in two["methods"][label].items() if k != "speedup_wall"} == \
            {k: v for k, v in row.items() if k != "speedup_wall"}, label
    assert two["settings"]["denoiser_macs"] == one["settings"]["denoiser_macs"]
    assert (tmp_path / "two" / "grid.png").read_bytes() == (tmp_path / "one" / "grid.png").read_bytes()
