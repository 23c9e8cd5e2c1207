"""The shared trainer stack: options, run folders, checkpoints, resume, the CLI (fast, tiny pipelines)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion_accel.testing import assert_pickle_free, kill_once_saved, train_process
from diffusion_accel.train import options as opts_mod
from diffusion_accel.train import recipe_class, run_folder
from diffusion_accel.train.cli import main as train_main
from diffusion_accel.train.lcd import LCDOptions

TINY = ["--pretrained_teacher_model", "tiny:pixart_alpha", "--guidance_scale", "4.0", "--resolution", "32",
        "--num_train_samples", "32", "--train_batch_size", "4", "--validation_steps", "0"]


def test_flags_override_config_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("output_dir: out\nlearning_rate: 0.001\nmax_train_steps: 7\nuse_lora: false\n")
    options = opts_mod.parse_options(LCDOptions, ["--config", str(config), "--max_train_steps", "9"], prog="t")
    assert (options.learning_rate, options.max_train_steps, options.output_dir) == (0.001, 9, "out")
    json_config = tmp_path / "run.json"
    json_config.write_text(json.dumps({"output_dir": "o", "lr_scheduler": "cosine"}))
    assert opts_mod.parse_options(LCDOptions, ["--config", str(json_config)], prog="t").lr_scheduler == "cosine"


@pytest.mark.parametrize("values, message", [
    ({"output_dir": "o", "learnig_rate": 1.0}, "unknown option"),
    ({"output_dir": "o", "lr_scheduler": "exponential"}, "lr_scheduler"),
    ({}, "--output_dir is required"),
    ({"output_dir": "o", "ema_decay": 1.0}, "ema_decay"),
    ({"output_dir": "o", "use_lora": "yes"}, "expected true or false"),
])
def test_bad_options_name_the_fix(values, message):
    with pytest.raises(ValueError, match=message):
        opts_mod.build_options(LCDOptions, values)


def test_unknown_recipe_is_refused(capsys):
    assert train_main(["distil", "--output_dir", "x"]) == 2
    assert "unknown training recipe 'distil'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="choose one of: lcd, rglcd, tdm, blade"):
        recipe_class("dmd")  # (tdm was the unknown example until it became a recipe)


def test_output_folder_guards_leave_files_alone(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty and is not a training run"):
        run_folder.claim(foreign, "lcd", resuming=False, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"

    run = tmp_path / "run"
    run_folder.write_run_record(run, "rglcd", {})
    with pytest.raises(ValueError, match="holds a run of recipe 'rglcd'"):
        run_folder.claim(run, "lcd", resuming=False, overwrite=False)
    with pytest.raises(ValueError, match="cannot be resumed as 'lcd'"):
        run_folder.claim(run, "lcd", resuming=True, overwrite=False)
    with pytest.raises(ValueError, match="--resume_from_checkpoint latest to continue"):
        run_folder.claim(run, "rglcd", resuming=False, overwrite=False)

    ckpt = run_folder.checkpoint_path(run, 5)
    ckpt.mkdir()
    run_folder.write_state(ckpt, "rglcd", 5)
    with pytest.raises(ValueError, match="checkpoint of recipe 'rglcd', not 'lcd'"):
        run_folder.resolve_resume(run, "latest", "lcd")
    assert run_folder.resolve_resume(run, "latest", "rglcd") == ckpt
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_folder.resolve_resume(tmp_path / "empty", "latest", "lcd")


def test_rotation_keeps_the_newest(tmp_path):
    for step in (2, 4, 6):
        path = run_folder.checkpoint_path(tmp_path, step)
        path.mkdir()
        run_folder.write_state(path, "lcd", step)
    (tmp_path / "checkpoint-8.partial").mkdir()  # an interrupted save is never a checkpoint
    run_folder.rotate(tmp_path, 2)
    assert [p.name for p in run_folder.checkpoints(tmp_path)] == ["checkpoint-6"]


def test_teacher_checks_before_any_work(tmp_path):
    # tiny pixart has no sampler contract: the guidance scale must be given
    with pytest.raises(ValueError, match="pass --guidance_scale"):
        _train(tmp_path / "a", ["--pretrained_teacher_model", "tiny:pixart_alpha", "--resolution", "32"])
    with pytest.raises(ValueError, match="LCD distils a CFG teacher"):
        _train(tmp_path / "b", [*TINY[:2], "--guidance_scale", "1.0", "--resolution", "32"])
    with pytest.raises(ValueError, match="no LoRA support in Diffusers"):
        _train(tmp_path / "c", [*TINY, "--use_lora"])
    with pytest.raises(ValueError, match="cannot be distilled"):
        _train(tmp_path / "d", ["--pretrained_teacher_model", "tiny:sd3", "--guidance_scale", "4", "--resolution",
                                "32"])


def _train(out: Path, extra: list[str]):
    from diffusion_accel.train.trainer import run

    return run(recipe_class("lcd"), opts_mod.parse_options(LCDOptions, ["--output_dir", str(out), *extra], "t"))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("precision", ["no", pytest.param("fp16", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="fp16 mixed precision (its grad scaler) and CUDA generators need a GPU"))])
def test_killed_and_resumed_run_matches_an_uninterrupted_one(tmp_path, precision):
    """6 steps straight == 3 steps, SIGKILL, resume from checkpoint-3, 3 more steps (fixed seed; on CPU, and with a
    GPU also on CUDA in fp16, which adds the grad scaler and the CUDA generators to the state); the checkpoint holds
    no pickle."""
    common = ["lcd", *TINY, "--max_train_steps", "6", "--checkpointing_steps", "3", "--lr_scheduler", "linear",
              "--learning_rate", "1e-3", "--ship_weights", "online", "--mixed_precision", precision]
    gpu = precision != "no"
    straight = train_process([*common, "--output_dir", str(tmp_path / "straight")], gpu=gpu)
    killed = train_process([*common, "--output_dir", str(tmp_path / "killed")], gpu=gpu)
    state = tmp_path / "killed" / "checkpoint-3" / run_folder.STATE_FILE
    kill_once_saved(killed, state)
    assert_pickle_free(state.parent)
    out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, out
    resumed = train_process([*common, "--output_dir", str(tmp_path / "killed"), "--resume_from_checkpoint",
                    str(tmp_path / "killed" / "checkpoint-3")], gpu=gpu)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    first = json.loads((tmp_path / "straight" / "train_metrics.json").read_text())
    second = json.loads((tmp_path / "killed" / "train_metrics.json").read_text())
    assert second["steps_this_session"] == 3 and first["final_logs"]["lr"] == second["final_logs"]["lr"]
