"""Eval runner: generation to disk, resume, metrics from disk, reports, CLI wiring, sharding."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusion_accel.eval.cli import add_eval_parser, config_from_args
from diffusion_accel.eval.fidelity import psnr, ssim
from diffusion_accel.eval.runner import EvalConfig, compute_metrics, run_eval
from PIL import Image


class StubPipeline:
    """Stands in for a Diffusers pipeline: one image per prompt drawn from that item's generator."""

    def __init__(self, noise: float = 0.0, fail_after: int | None = None, video: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.noise, self.fail_after, self.video = noise, fail_after, video

    def __call__(self, prompt, generator, **kwargs):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("simulated crash")
        self.calls.append(list(prompt))
        outputs = []
        for g in generator:
            base = torch.rand(16, 16, 3, generator=g).numpy()
            if self.video:
                shift = [np.roll(base, t, axis=1) for t in range(5)]
                outputs.append([(f * 255).round().astype(np.uint8) for f in shift])
                continue
            noisy = np.clip(base + self.noise * np.sin(np.arange(16))[:, None, None], 0, 1)
            outputs.append(Image.fromarray((noisy * 255).round().astype(np.uint8)))
        return SimpleNamespace(frames=outputs) if self.video else SimpleNamespace(images=outputs)


def _factory(pipe: StubPipeline, made: list):
    def factory(name):
        made.append(name)
        return pipe

    return factory


def _config(out: Path, **overrides) -> EvalConfig:
    base = dict(out=str(out), pipeline="stub", prompts=["a", "b", "c"], num_images=5, metrics=["psnr", "ssim"],
                batch_size=2, progress=False)
    return EvalConfig(**{**base, **overrides})


def test_generate_resume_and_metrics_from_disk(tmp_path):
    base_dir, made = tmp_path / "base", []
    pipe = StubPipeline()
    result = run_eval(_config(base_dir), _factory(pipe, made))
    files = sorted((base_dir / "images").glob("*.png"))
    assert [f.name for f in files] == [f"{i:05d}.png" for i in range(5)]
    assert result["metrics"]["psnr"]["skipped"].startswith("skipped")  # no reference given
    manifest = json.loads((base_dir / "manifest.json").read_text())["items"]
    assert [(m["prompt"], m["seed"]) for m in manifest] == [("a", 0), ("b", 1), ("c", 2), ("a", 3), ("b", 4)]
    first = np.asarray(Image.open(files[3])).copy()

    # resume: only the missing item is generated, identical to before (seed = seed + index, batching irrelevant)
    files[3].unlink()
    resumed = StubPipeline()
    again = run_eval(_config(base_dir, batch_size=1), _factory(resumed, made))
    assert resumed.calls == [["a"]]
    assert again["generation"][0]["generated"] == 1 and again["generation"][0]["skipped_existing"] == 4
    np.testing.assert_array_equal(np.asarray(Image.open(files[3])), first)

    # nothing missing: the pipeline is not even loaded
    made.clear()
    run_eval(_config(base_dir), _factory(StubPipeline(), made))
    assert made == []

    # a crash mid-run keeps finished items; the rerun completes the rest
    test_dir = tmp_path / "test"
    with pytest.raises(KeyboardInterrupt):
        run_eval(_config(test_dir, reference=str(base_dir / "images")), _factory(StubPipeline(0.05, 1), made))
    assert len(list((test_dir / "images").glob("*.png"))) == 2
    assert not list((test_dir / "images").glob(".*"))  # no half-written temporary left behind
    result = run_eval(_config(test_dir, reference=str(base_dir / "images")), _factory(StubPipeline(0.05), made))
    pairs = [(np.asarray(Image.open(test_dir / "images" / f.name)), np.asarray(Image.open(f))) for f in files]
    assert result["metrics"]["psnr"]["value"] == pytest.approx(np.mean([psnr(a, b) for a, b in pairs]))
    assert result["metrics"]["ssim"]["value"] == pytest.approx(np.mean([ssim(a, b) for a, b in pairs]))
    assert result["metrics"]["psnr"]["n"] == 5 and result["metrics"]["ssim"]["value"] < 1

    # metrics are read from disk: replacing a file on disk changes them
    Image.open(files[0]).save(test_dir / "images" / files[0].name)
    assert compute_metrics(_config(test_dir, reference=str(base_dir / "images")))["psnr"]["value"] == np.inf
    report = (test_dir / "results.md").read_text()
    assert "| psnr |" in report and json.loads((test_dir / "results.json").read_text())["config"]["num_images"] == 5


def test_video_outputs_and_vbench_style_metrics(tmp_path):
    metrics = ["temporal_flickering", "motion_smoothness", "vbench", "fid"]
    result = run_eval(_config(tmp_path, num_images=2, metrics=metrics), _factory(StubPipeline(video=True), []))
    assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == ["00000", "00001"]
    assert len(list((tmp_path / "videos" / "00000").glob("*.png"))) == 5
    got = result["metrics"]
    assert 0 < got["temporal_flickering"]["value"] < 1 and got["motion_smoothness"]["proxy"] is True
    assert got["vbench"]["label"].startswith("VBench-style") and "subject consistency" in got["vbench"]["missing"]
    assert got["fid"]["skipped"]


def test_tiny_diffusers_pipeline_with_method(tmp_path):
    """The default factory (diffusion_accel.load_pipeline) and diffusion_accel.apply on a tiny real pipeline."""
    common = dict(pipeline="tiny:pixart_alpha", prompts=["a red circle", "a blue square"], num_images=2,
                  call_kwargs={"clean_caption": False})
    run_eval(_config(tmp_path / "base", **common, metrics=["psnr"]))
    result = run_eval(_config(tmp_path / "cached", **common, method=["delta_cache"], method_options={"interval": 2},
                              reference=str(tmp_path / "base" / "images"), metrics=["psnr", "ssim"]))
    assert result["config"]["method"] == ["delta_cache"]
    assert np.isfinite(result["metrics"]["ssim"]["value"]) and result["metrics"]["psnr"]["n"] == 2


def test_cli_parser_builds_the_config(tmp_path):
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--pipeline", "tiny:dit", "--method", "delta_cache", "--set", "interval=3",
                              "--prompts", "builtin", "--num-images", "7", "--metrics", "fid,psnr",
                              "--reference", "ref", "--out", str(tmp_path), "--steps", "4", "--call", "eta=0.5",
                              "--fid-mode", "tf1"])
    config = config_from_args(args)
    assert config.method == ["delta_cache"] and config.method_options == {"interval": 3}
    assert config.metrics == ["fid", "psnr"] and config.num_images == 7 and config.fid_mode == "tf1"
    assert config.call_kwargs == {"eta": 0.5, "num_inference_steps": 4}
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--out", "x", "--fid-mode", "nope"])
    with pytest.raises(ValueError, match="unknown metrics"):
        EvalConfig(out="x", metrics=["fidd"])


def test_runner_does_not_import_the_command_line():
    """The library never imports the CLI: the eval CLI imports the runner, not the reverse."""
    code = ("import sys, diffusion_accel.eval.runner; "
            "print(sorted(m for m in sys.modules if m in ('diffusion_accel.eval.cli', 'diffusion_accel.cli')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]"


def test_module_entry_point_with_dit_labels(tmp_path, capsys):
    """``python -m diffusion_accel.eval`` (its ``main``, in-process) on the tiny DiT (class-label prompts)."""
    from diffusion_accel.eval.cli import main

    prompts = tmp_path / "labels.txt"
    prompts.write_text("1\n3\n")
    out = tmp_path / "run"
    assert main(["--pipeline", "tiny:dit", "--prompts", str(prompts), "--num-images", "2", "--metrics", "psnr",
                 "--out", str(out), "--no-progress"]) == 0
    assert len(list((out / "images").glob("*.png"))) == 2
    assert "| psnr |" in capsys.readouterr().out


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tmp_path):
    out = tmp_path / "sharded"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # the launcher of this interpreter: a bare `accelerate` on PATH may belong to another install of the package
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "-m", "diffusion_accel.eval",
                    "--pipeline", "tiny:pixart_alpha", "--num-images", "5", "--metrics", "psnr", "--out", str(out),
                    "--no-progress", "--call", "clean_caption=false"], check=True, env=env, timeout=600)
    generation = json.loads((out / "results.json").read_text())["generation"]
    assert sorted(g["process"] for g in generation) == [0, 1]
    assert sum(g["generated"] for g in generation) == 5 and all(g["generated"] > 0 for g in generation)
    assert len(list((out / "images").glob("*.png"))) == 5


def test_testbed_pipelines_get_their_call_defaults_and_shapes_prompts(tmp_path):
    """``testbed:<name>`` runs at the testbed's 64x64 defaults (PixArt would reject its binned default size)."""
    from diffusion_accel.eval.runner import _default_call_kwargs

    pixart = _default_call_kwargs("testbed:pixart")
    assert pixart["height"] == pixart["width"] == 64 and pixart["use_resolution_binning"] is False
    assert _default_call_kwargs("testbed:flow")["height"] == 64
    assert _default_call_kwargs("runwayml/some-model") == {}
