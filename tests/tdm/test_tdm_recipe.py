"""The ``tdm`` recipe end to end on tiny pipelines: the saved student and its sampler contract, the checks that run
before any work, resume after SIGKILL, and two processes against one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from diffusion_accel.testing import assert_pickle_free, kill_once_saved, one_and_two_process_runs, train_process
from diffusion_accel.train import run_folder, train

TINY_PIXART = dict(pretrained_teacher_model="tiny:pixart_alpha", guidance_scale=4.0, resolution=32,
                   num_train_samples=16, train_batch_size=2, validation_steps=0, checkpointing_steps=0)
TINY_WAN = dict(pretrained_teacher_model="tiny:wan", guidance_scale=4.0, resolution=32, num_frames=9,
                num_train_samples=16, train_batch_size=2, validation_steps=0, checkpointing_steps=0)


def _received_timesteps(pipe) -> list[float]:
    seen: list[float] = []

    def record(module, args, kwargs):
        t = kwargs.get("timestep")
        seen.append(float(torch.as_tensor(t).flatten()[0]))

    pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    return seen


def test_pixart_student_samples_its_trained_timesteps_from_a_plain_load(tmp_path):
    from diffusers import DDIMScheduler, DiffusionPipeline, PixArtAlphaPipeline

    out = tmp_path / "student"
    record = train("tdm", output_dir=str(out), max_train_steps=2, learning_rate=1e-3, **TINY_PIXART)
    assert record["student_timesteps"] == [999.0, 749.0, 499.0, 249.0]
    assert record["scheduler"] == "DDIMScheduler" and record["sampler_contract"]["guidance_scale"] == 1.0
    logs = record["final_logs"]
    assert logs["fake_lr"] == pytest.approx(5e-3) and logs["fake_loss"] > 0 and logs["loss"] > 0
    assert json.loads((out / "distillation.json").read_text())["student_timesteps"] == record["student_timesteps"]
    pipe = DiffusionPipeline.from_pretrained(str(out), trust_remote_code=True)
    assert isinstance(pipe, PixArtAlphaPipeline) and isinstance(pipe.scheduler, DDIMScheduler)
    pipe.set_progress_bar_config(disable=True)
    seen = _received_timesteps(pipe)
    image = pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 32, 32, 3) and seen == record["student_timesteps"]  # one pass per step: no CFG
    # the student moved away from the teacher it was copied from, and the fake score from it too
    final = out / "checkpoint-2"
    assert_pickle_free(final)
    student, fake = load_file(str(final / "model.safetensors")), load_file(str(final / "model_1.safetensors"))
    name = next(n for n in student if n.endswith("attn1.to_q.weight"))
    assert (student[name] - fake[name]).abs().max() > 0
    assert {"optimizer_1.json", "scheduler_1.json", "custom_checkpoint_1.json"} <= {p.name for p in final.iterdir()}


def test_wan_student_is_a_wan_pipeline_with_its_steps(tmp_path):
    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler, WanPipeline

    from diffusion_accel.loading import load_pipeline

    out = tmp_path / "wan-tdm"
    record = train("tdm", output_dir=str(out), max_train_steps=1, num_inference_steps=2, **TINY_WAN)
    assert record["student_timesteps"] == [999.0, 499.0]
    for pipe in (load_pipeline(str(out)), DiffusionPipeline.from_pretrained(str(out), trust_remote_code=True)):
        assert isinstance(pipe, WanPipeline) and isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
        pipe.set_progress_bar_config(disable=True)
        seen = _received_timesteps(pipe)
        video = pipe("a red circle moving left", max_sequence_length=16, generator=torch.Generator().manual_seed(0),
                     output_type="np").frames
        assert video.shape[:2] == (1, 9) and seen == [999.0, 499.0]


def test_flux_student_trains_and_loads(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusion_accel.loading import load_pipeline

    out = tmp_path / "flux-tdm"
    record = train("tdm", output_dir=str(out), pretrained_teacher_model="tiny:flux", guidance_scale=4.0,
                   resolution=32, num_train_samples=8, train_batch_size=2, max_train_steps=1, validation_steps=0,
                   checkpointing_steps=0, ship_weights="online", ema_decay=0.0)
    assert record["student_timesteps"] == [1000.0, 750.0, 500.0, 250.0]
    pipe = load_pipeline(str(out))
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert not pipe.scheduler.config.use_dynamic_shifting
    pipe.set_progress_bar_config(disable=True)
    seen = _received_timesteps(pipe)
    pipe("a red circle", max_sequence_length=16, generator=torch.Generator().manual_seed(0), output_type="np")
    assert [round(t * 1000) for t in seen] == [1000, 750, 500, 250]  # FluxPipeline passes t / 1000


@pytest.mark.parametrize("recipe, options, message", [
    ("tdm", dict(TINY_PIXART, guidance_scale=None), "pass --guidance_scale"),
    ("tdm", dict(TINY_PIXART, resolution=None), "pass --resolution"),
    ("tdm", dict(TINY_WAN, num_frames=None), "pass --num_frames"),
    ("tdm", dict(TINY_PIXART, num_frames=9), "--num_frames is for video"),
    ("tdm", dict(TINY_PIXART, flow_shift=3.0), "--flow_shift shapes a flow teacher"),
    ("tdm", dict(TINY_PIXART, ema_decay=0.0), "--ship_weights ema needs an EMA"),
    ("tdm", dict(TINY_PIXART, num_inference_steps=60), "use fewer steps"),
    ("tdm", dict(TINY_PIXART, sparse_attention="asa:block_size=128"), "every call would stay dense"),
    ("blade", dict(TINY_PIXART, sparse_attention=""), "pass --sparse_attention"),
    ("blade", dict(TINY_PIXART, sparse_attention="dense"), "start with the mask"),
    ("lcd", dict(TINY_WAN, num_frames=None, num_train_samples=4), "data-free recipe `tdm`"),
])
def test_bad_input_names_the_fix_before_any_training(tmp_path, recipe, options, message):
    options = {k: v for k, v in options.items() if v is not None or k == "sparse_attention"}
    if recipe == "lcd":
        options.pop("num_frames", None)
    with pytest.raises(ValueError, match=message):
        train(recipe, output_dir=str(tmp_path / "run"), max_train_steps=1, **options)
    assert not run_folder.checkpoints(tmp_path / "run")


CLI = ["--pretrained_teacher_model", "tiny:pixart_alpha", "--guidance_scale", "4.0", "--resolution", "32",
       "--num_train_samples", "16", "--validation_steps", "0", "--learning_rate", "1e-3", "--ema_decay", "0.9"]


def test_killed_and_resumed_tdm_run_matches_an_uninterrupted_one(tmp_path):
    """6 steps straight == 3 steps, SIGKILL, resume from checkpoint-3, 3 more: the student, the fake score, the
    EMA, both optimizers' moments and both LR schedules end bit-identical (CPU, fixed seed)."""
    common = ["tdm", *CLI, "--train_batch_size", "2", "--max_train_steps", "6", "--checkpointing_steps", "3",
              "--lr_scheduler", "linear"]
    straight = train_process([*common, "--output_dir", str(tmp_path / "straight")])
    killed = train_process([*common, "--output_dir", str(tmp_path / "killed")])
    state = tmp_path / "killed" / "checkpoint-3" / run_folder.STATE_FILE
    kill_once_saved(killed, state)
    assert_pickle_free(state.parent)
    out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, out
    resumed = train_process([*common, "--output_dir", str(tmp_path / "killed"), "--resume_from_checkpoint", "latest"])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    a_dir, b_dir = tmp_path / "straight" / "checkpoint-6", tmp_path / "killed" / "checkpoint-6"
    for name in ("model", "model_1", "optimizer", "optimizer_1", "custom_checkpoint_1"):
        a, b = load_file(str(a_dir / f"{name}.safetensors")), load_file(str(b_dir / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=f"{name}: {key}")
    for name in ("scheduler", "scheduler_1"):
        assert (a_dir / f"{name}.json").read_text() == (b_dir / f"{name}.json").read_text()
    first = json.loads((tmp_path / "straight" / "train_metrics.json").read_text())
    second = json.loads((tmp_path / "killed" / "train_metrics.json").read_text())
    assert second["steps_this_session"] == 3 and first["final_logs"] == second["final_logs"]


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` on CPU (gloo), per-process batch 2 == one process with
    batch 4: the same student and fake score, and both LR schedules stepped once per optimizer step."""
    args = [*CLI, "--max_train_steps", "3", "--checkpointing_steps", "0", "--lr_scheduler",
            "constant_with_warmup", "--lr_warmup_steps", "6"]
    one, two = one_and_two_process_runs("tdm", args, tmp_path)
    m1 = json.loads((one / "train_metrics.json").read_text())
    m2 = json.loads((two / "train_metrics.json").read_text())
    assert m2["num_processes"] == 2 and m1["global_batch"] == m2["global_batch"] == 4
    for key, peak in (("lr", 1e-3), ("fake_lr", 5e-3)):  # half-way through warm-up, not at its end
        assert m1["final_logs"][key] == m2["final_logs"][key] == pytest.approx(peak / 2)
    # Tolerance: gloo sums the gradients in another order than one process does, and Adam with β1 = 0 turns a
    # gradient element near zero into a ±lr step, so float noise reaches ~1e-5. Another batch, a doubled LR step or
    # an unsynchronised fake score moves weights by ~lr (1e-3) and fails.
    for name in ("model", "model_1"):
        a = load_file(str(one / "checkpoint-3" / f"{name}.safetensors"))
        b = load_file(str(two / "checkpoint-3" / f"{name}.safetensors"))
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=2e-4, msg=f"{name}: {key}")
