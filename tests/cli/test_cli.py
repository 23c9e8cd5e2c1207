"""The ``diffusion-accel`` command line, run in-process."""

from __future__ import annotations

import json

import pytest

from diffusion_accel.cli import main


def test_list_methods(capsys):
    assert main(["list-methods"]) == 0
    out = capsys.readouterr().out
    assert "delta_cache" in out and "fbcache" in out


def test_list_methods_for_a_pipeline(capsys):
    assert main(["list-methods", "--pipeline", "tiny:sd"]) == 0
    assert "delta_cache" not in capsys.readouterr().out


def test_info_json(capsys):
    assert main(["info", "tiny:flux", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "flux" and info["cfg_layout"] == "separate" and "delta_cache" in info["methods"]


def test_generate_image_with_method(tmp_path, capsys):
    code = main(["generate", "--pipeline", "tiny:pixart_alpha", "--method", "delta_cache", "--set", "interval=2",
                 "--prompt", "a red circle", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "NFE 4" in out and (tmp_path / "seed0_0.png").is_file()


def test_generate_video_gif(tmp_path):
    assert main(["generate", "--pipeline", "tiny:wan", "--out", str(tmp_path)]) == 0
    from PIL import Image

    gif = Image.open(tmp_path / "seed0_0.gif")
    assert gif.n_frames == 9


def test_generate_bad_method_is_a_clean_error(tmp_path, capsys):
    code = main(["generate", "--pipeline", "tiny:pixart_alpha", "--method", "nope", "--out", str(tmp_path)])
    assert code == 2 and "Unknown method 'nope'" in capsys.readouterr().err


def test_generate_on_the_shipped_testbed_uses_its_call_defaults(tmp_path):
    """The README's first command: the testbed PixArt at 64x64 (its resolution binning would reject the size)."""
    from diffusion_accel.cli import main

    assert main(["generate", "--pipeline", "testbed:pixart", "--method", "delta_cache", "--steps", "4",
                 "--prompt", "a red circle", "--out", str(tmp_path)]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "seed0_0.png").size == (64, 64)


def _run_cli(*args: str, cwd) -> str:
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "CACHE_DIT_LOG_LEVEL"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-m", "diffusion_accel.cli", *args], capture_output=True, text=True,
                            cwd=cwd, env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout + result.stderr


def test_default_output_is_ours_only_and_verbose_shows_the_rest(tmp_path):
    # Diffusers' loading and per-step progress bars; dbcache is cache-dit, which logs INFO lines on apply
    args = ("generate", "--pipeline", "testbed:pixart", "--steps", "2", "--prompt", "a red circle",
            "--method", "dbcache", "--out", str(tmp_path / "out"))
    quiet = _run_cli(*args, cwd=tmp_path)
    lines = [line for line in quiet.splitlines() if line.strip()]
    assert lines[0].startswith("methods: dbcache | NFE ") and lines[-1].startswith("saved ")
    for line in lines[1:-1]:  # the per-step table: header, rule, one row per step; compile and cache memory lines
        assert line.startswith(("stage", "---", "compile: ", "cache memory: ")) or line.split()[0].isdigit(), line
    verbose = _run_cli(*args, "--verbose", cwd=tmp_path)
    assert "it/s" in verbose or "s/it" in verbose  # Diffusers' progress bar
    assert "[Cache-DiT]" in verbose and "[Cache-DiT]" not in quiet  # cache-dit's log lines


def test_one_key_value_parser_for_set_call_and_bench_options():
    import pytest

    from diffusion_accel.config import parse_key_value, parse_key_values

    assert parse_key_values(["interval=2", " num-cached-blocks =[1, 2]", "name=abc"], "--set") == {
        "interval": 2, "num_cached_blocks": [1, 2], "name": "abc"}
    with pytest.raises(ValueError, match="--call expects KEY=VALUE"):
        parse_key_value("steps", "--call")


def test_every_sub_command_is_registered():
    from diffusion_accel.cli import build_parser

    text = build_parser().format_help()
    for command in ("generate", "list-methods", "info", "bench", "calibrate", "testbed", "eval"):
        assert command in text


def test_a_command_ends_the_process_group_it_ran_under(tmp_path, capsys):
    """Under a launcher the CLI destroys the default process group when its command ends, error or not: left to
    interpreter shutdown, gloo's threads can abort a finished process (``terminate called without an active
    exception``) and the launcher then kills its peers."""
    import torch.distributed as dist

    for argv, code in ((["list-methods"], 0), (["generate", "--pipeline", "tiny:sd", "--method", "no_such_method",
                                                "--out", str(tmp_path / "x.png")], 2)):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / argv[0]}", rank=0, world_size=1)
        assert main(argv) == code
        assert not dist.is_initialized(), argv

    from diffusion_accel.eval.cli import main as eval_main  # the `python -m diffusion_accel.eval` entry

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'eval'}", rank=0, world_size=1)
    with pytest.raises(SystemExit, match="--set needs exactly one --method"):
        eval_main(["--pipeline", "tiny:sd", "--out", str(tmp_path / "e"), "--set", "a=1"])
    assert not dist.is_initialized()
