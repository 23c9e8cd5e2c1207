"""LCD / RG-LCD: the consistency math, the saved student (full weights and LoRA), multi-process equivalence."""

from __future__ import annotations

import itertools
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from diffusion_accel.testing import assert_pickle_free, one_and_two_process_runs
from diffusion_accel.train import train
from diffusion_accel.train.latent_reward import LatentRewardModel, pairwise_kl
from diffusion_accel.train.lcd import FlowODE, boundary_scalings, huber

TINY_PIXART = dict(pretrained_teacher_model="tiny:pixart_alpha", guidance_scale=4.0, resolution=32,
                   num_train_samples=32, train_batch_size=4, validation_steps=0, checkpointing_steps=0)


def test_boundary_condition_and_huber():
    c_skip, c_out = boundary_scalings(torch.tensor([0.0, 19.0, 999.0]))
    assert c_skip[0] == 1 and c_out[0] == 0  # f(x, 0) = x
    assert c_skip[1] < 1e-3 and c_out[1] > 0.999  # ≈ the x0 prediction for every grid timestep
    x = torch.randn(8)
    assert huber(x, x, 1e-3) == 0 and huber(x, x + 1, 1e-3) > 0.99


def test_epsilon_solver_step_is_exact_for_the_true_noise():
    """With the true ε (and no guidance), the DDIM skipping step lands exactly on the noised latent at t_n."""
    from diffusion_accel.train.lcd import EpsilonODE

    class Fam:
        @staticmethod
        def alphas_cumprod():
            return torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)

    ode = EpsilonODE(Fam(), 50, torch.device("cpu"))
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t_from, t_to = ode.times(torch.tensor([49, 10, 0]))
    assert t_from.tolist() == [999, 219, 19] and t_to.tolist() == [979, 199, 0]
    x = ode.noise(x0, eps, t_from)
    torch.testing.assert_close(ode.solver_step(x, eps, eps, t_from, t_to, 3.5), ode.noise(x0, eps, t_to))
    torch.testing.assert_close(ode.x0_from(x, eps, t_from), x0, rtol=1e-4, atol=1e-4)


def _teacher_like(x, t):
    """A smooth, non-linear stand-in for a CFG teacher's two outputs at (x, t)."""
    scale = t.float().view(-1, *([1] * (x.ndim - 1))) / 1000.0
    return torch.tanh(x) * (1 + scale), torch.sin(x) * scale


def _solve(ode, x, times, w):
    for t_from, t_to in itertools.pairwise(times):
        x = ode.solver_step(x, *_teacher_like(x, t_from), t_from, t_to, w)
    return x


@pytest.mark.parametrize("family", ["epsilon", "flow"])
def test_substeps_follow_the_finer_grid(family):
    """m sub-steps across one skip of the N grid are the single steps of the m·N grid between the same ends."""
    from diffusion_accel.train.lcd import EpsilonODE

    class Fam:
        @staticmethod
        def alphas_cumprod():
            return torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)

    make = EpsilonODE if family == "epsilon" else FlowODE
    coarse, fine = make(Fam(), 20, torch.device("cpu")), make(Fam(), 40, torch.device("cpu"))
    index = torch.tensor([19, 7, 0])
    t_start, t_end = coarse.times(index)
    times = coarse.substep_times(t_start, t_end, 2)
    fine_from, fine_mid = fine.times(2 * index + 1)
    torch.testing.assert_close(times[1], fine_mid)
    torch.testing.assert_close(fine_from, t_start)
    x = torch.randn(3, 4, 8, 8)
    one_step = _solve(coarse, x, [t_start, t_end], 3.5)
    two_steps = _solve(coarse, x, times, 3.5)
    torch.testing.assert_close(two_steps, _solve(fine, x, [fine_from, fine_mid, fine.times(2 * index)[1]], 3.5))
    assert (two_steps - one_step).abs().max() > 1e-3  # the finer grid changes the target


def test_substeps_that_miss_integer_timesteps_are_refused(tmp_path):
    with pytest.raises(ValueError, match="does not divide the skip 50"):
        train("lcd", output_dir=str(tmp_path / "run"), max_train_steps=1, num_ddim_timesteps=20, solver_substeps=3,
              **TINY_PIXART)
    assert not (tmp_path / "run").exists()


def test_flow_solver_step_follows_the_straight_path():
    ode = FlowODE(None, 20, torch.device("cpu"))
    x0, eps = torch.randn(2, 16, 8), torch.randn(2, 16, 8)
    s_from, s_to = ode.times(torch.tensor([19, 3]))
    v = eps - x0
    torch.testing.assert_close(ode.solver_step(ode.noise(x0, eps, s_from), v, v, s_from, s_to, 2.0),
                               ode.noise(x0, eps, s_to))
    torch.testing.assert_close(ode.consistency(ode.noise(x0, eps, s_from), v, s_from), x0)


def test_pairwise_kl_is_zero_when_the_proxy_ranks_like_the_expert():
    expert = torch.randn(5, 3)
    assert pairwise_kl(expert, expert.clone()) < 1e-6
    assert pairwise_kl(expert, -expert) > 0.01
    lrm = LatentRewardModel(4, 32)
    scores = lrm(torch.randn(2, 4, 16, 16), torch.randn(2, 32))
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_full_weight_student_loads_as_the_real_pipeline_class(tmp_path):
    from diffusers import DiffusionPipeline, LCMScheduler, PixArtAlphaPipeline

    out = tmp_path / "student"
    record = train("lcd", output_dir=str(out), max_train_steps=2, num_inference_steps=2, **TINY_PIXART)
    assert record["scheduler"] == "LCMScheduler" and record["sampler_contract"]["guidance_scale"] == 1.0
    pipe = DiffusionPipeline.from_pretrained(str(out), trust_remote_code=True)
    assert isinstance(pipe, PixArtAlphaPipeline) and isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.scheduler.config.original_inference_steps == 50
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    image = pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 32, 32, 3) and len(calls) == 2  # 2 steps, one pass each (no CFG)
    assert (out / "validation").is_dir() and any((out / "validation").iterdir())


def test_flux_lora_student_both_loading_paths_agree(tmp_path):
    pytest.importorskip("peft")
    from diffusers import FlowMatchLCMScheduler

    from diffusion_accel.loading import load_pipeline

    out = tmp_path / "flux-lcm"
    train("lcd", output_dir=str(out), pretrained_teacher_model="tiny:flux", guidance_scale=4.0, resolution=32,
          num_train_samples=16, train_batch_size=2, max_train_steps=2, use_lora=True, lora_rank=4,
          learning_rate=1e-2, validation_steps=0, checkpointing_steps=0)
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    call = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, max_sequence_length=16,
                output_type="np")
    plain = load_pipeline(str(out))
    assert isinstance(plain.scheduler, FlowMatchLCMScheduler)
    teacher = load_pipeline("tiny:flux")
    untouched = teacher(**call, generator=torch.Generator().manual_seed(0)).images
    teacher.load_lora_weights(str(out))
    teacher.scheduler = FlowMatchLCMScheduler.from_config(teacher.scheduler.config)
    for p in (plain, teacher):
        p.set_progress_bar_config(disable=True)

    def sample(pipe):
        # FluxPipeline does not pass its generator to scheduler.step, and FlowMatchLCMScheduler re-noises from
        # the global RNG: seed both
        torch.manual_seed(0)
        return pipe(**call, generator=torch.Generator().manual_seed(0)).images

    a, b = sample(plain), sample(teacher)
    assert abs(a - b).max() < 1e-4
    teacher.unload_lora_weights()
    assert abs(sample(teacher) - a).max() > 1e-3
    del untouched


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` on CPU (gloo; accelerate 1.15's ``--cpu`` starts one
    process) with per-process batch 2 == 1 process with batch 4: same
    weights and the same LR schedule length (the schedule is stepped once per optimizer step); the checkpoint holds
    both processes' random generators."""
    args = ["--pretrained_teacher_model", "tiny:pixart_alpha", "--guidance_scale", "4.0", "--resolution", "32",
            "--num_train_samples", "32", "--max_train_steps", "4", "--lr_scheduler", "constant_with_warmup",
            "--learning_rate", "1e-3", "--lr_warmup_steps", "8", "--validation_steps", "0",
            "--checkpointing_steps", "0", "--ship_weights", "online"]
    one, two = one_and_two_process_runs("lcd", args, tmp_path)
    m1 = json.loads((one / "train_metrics.json").read_text())
    m2 = json.loads((two / "train_metrics.json").read_text())
    assert m2["num_processes"] == 2 and m1["global_batch"] == m2["global_batch"] == 4
    assert m1["final_logs"]["lr"] == m2["final_logs"]["lr"]  # half-way through warm-up, not at its end
    final = two / "checkpoint-4"  # the main process's shared files and each process's generators
    assert_pickle_free(final)
    assert {p.name for p in final.glob("random_states_*.json")} == {"random_states_0.json", "random_states_1.json"}
    a = load_file(str(one / "transformer" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(two / "transformer" / "diffusion_pytorch_model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)


def test_rglcd_with_latent_reward_resumes_every_model(tmp_path):
    """RG-LCD with the LRM: resuming from checkpoint-2 of a 4-step run ends on the same student *and* the same
    latent reward model as the run itself (the LRM and its optimizer are part of the checkpoint)."""
    options = dict(TINY_PIXART, max_train_steps=4, checkpointing_steps=2, latent_reward=True, rm_warmup_steps=1,
                   reward_scale=0.1, learning_rate=1e-3, ship_weights="online")
    first = tmp_path / "first"
    record = train("rglcd", output_dir=str(first), **options)
    assert "rm_loss" in record["final_logs"] and "proxy_reward" in record["final_logs"]
    assert_pickle_free(first / "checkpoint-2")
    second = tmp_path / "second"
    second.mkdir()
    shutil.copytree(first / "checkpoint-2", second / "checkpoint-2")
    shutil.copy(first / "training_run.json", second / "training_run.json")
    train("rglcd", output_dir=str(second), resume_from_checkpoint="latest", **options)
    for folder in ("transformer/diffusion_pytorch_model.safetensors", "checkpoint-4/model_1.safetensors"):
        a, b = load_file(str(first / folder)), load_file(str(second / folder))
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=f"{folder}: {name}")


def test_rglcd_direct_reward_moves_the_student(tmp_path):
    record = train("rglcd", output_dir=str(tmp_path / "rg"), max_train_steps=1, reward_scale=1.0, **TINY_PIXART)
    logs = record["final_logs"]
    assert logs["reward"] < 0 and abs(logs["loss"] - (logs["distill_loss"] - logs["reward"])) < 1e-4
