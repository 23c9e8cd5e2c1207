"""TDM's trajectory math: the forward transition, the grid the shipped schedulers sample, the sparse spec parser."""

from __future__ import annotations

import pytest
import torch

from diffusion_accel.train.trajectory import EpsilonProcess, FlowProcess


def _ddpm_alphas_cumprod() -> torch.Tensor:
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)


@pytest.mark.parametrize("process", [EpsilonProcess(_ddpm_alphas_cumprod()), FlowProcess()], ids=["eps", "flow"])
def test_transition_from_the_interval_start_lands_on_the_marginal(process):
    """x_mid ~ q(x_mid | x0) then x_t ~ q(x_t | x_mid) must be distributed as q(x_t | x0) = N(α_t x0, σ_t²)."""
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 1), 0.7)
    a_mid, s_mid = process.at(torch.full((n,), 300.0))
    a_t, s_t = process.at(torch.full((n,), 700.0))
    x_mid = a_mid[:, None] * x0 + s_mid[:, None] * torch.randn(n, 1, generator=gen)
    x_t, beta = process.transition(x_mid, a_mid, s_mid, a_t, s_t, torch.randn(n, 1, generator=gen))
    assert float(beta[0]) > 0
    torch.testing.assert_close(x_t.mean(), a_t[0] * 0.7, atol=5e-3, rtol=0)
    torch.testing.assert_close(x_t.std(), s_t[0], atol=5e-3, rtol=0)


def test_split_inverts_the_noising():
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    ddpm = EpsilonProcess(_ddpm_alphas_cumprod())
    a, s = ddpm.at(torch.tensor([999.0, 500.0, 20.0]))
    got_x0, got_eps = ddpm.split(a.view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * eps, eps, a, s)
    torch.testing.assert_close(got_x0, x0, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(got_eps, eps)
    flow = FlowProcess()
    a, s = flow.at(torch.tensor([1000.0, 500.0, 20.0]))
    x = a.view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * eps
    got_x0, got_eps = flow.split(x, eps - x0, a, s)
    torch.testing.assert_close(got_x0, x0)
    torch.testing.assert_close(got_eps, eps)


@pytest.mark.parametrize("name", ["tiny:pixart_alpha", "tiny:flux", "tiny:wan"])
def test_shipped_scheduler_steps_are_the_trained_updates(name):
    """The student's scheduler, stepped as its pipeline steps it, computes exactly x' = α' x̂0 + σ' ε̂ on the grid
    the recipe trains on, and ends on x̂0: the sampler contract of a TDM student."""
    from diffusion_accel.loading import load_pipeline
    from diffusion_accel.train.teachers import teacher_family
    from diffusion_accel.train.trajectory import noise_process

    family = teacher_family(load_pipeline(name))
    steps = 4
    scheduler = family.few_step_scheduler(1.0)
    timesteps, sigmas = family.few_step_grid(scheduler, steps)
    alphas = family.alphas_cumprod() if family.prediction == "epsilon" else None
    process = noise_process(family.prediction, alphas)
    grid = process.grid(timesteps, sigmas)
    assert grid.steps == steps and grid.timesteps() == [float(t) for t in timesteps]
    assert grid.sigma[0] == 0 and grid.alpha[0] == 1  # the last step returns x̂0
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    ours = x.clone()
    for i, t in enumerate(scheduler.timesteps):
        out = torch.randn_like(x)
        x = scheduler.step(out, t, x, return_dict=False)[0]
        j = steps - i
        x0, eps = process.split(ours, out, grid.alpha[j].expand(2), grid.sigma[j].expand(2))
        ours = grid.alpha[j - 1] * x0 + grid.sigma[j - 1] * eps
        torch.testing.assert_close(x, ours, atol=1e-4, rtol=1e-4, msg=f"{name} step {i}")
    if name == "tiny:pixart_alpha":
        assert grid.timesteps() == [999.0, 749.0, 499.0, 249.0]
    if name == "tiny:flux":
        torch.testing.assert_close(grid.sigma.flip(0)[:-1], torch.tensor([1.0, 0.75, 0.5, 0.25]))


def test_sparse_spec_parsing_names_the_fix():
    from diffusion_accel.train.sparse_training import parse_sparse_spec

    config = parse_sparse_spec("asa:block_size=16,tau=0.8,min_tokens=0")
    assert (config.mask, config.block_size, config.tau, config.min_tokens) == ("asa", 16, 0.8, 0)
    assert parse_sparse_spec("sliding_tile:window=[1,2,2],block_size=8").window == (1, 2, 2)
    with pytest.raises(ValueError, match="start with the mask"):
        parse_sparse_spec("block_size=16")
    with pytest.raises(ValueError, match="Unknown option"):
        parse_sparse_spec("asa:blocksize=16")
    with pytest.raises(ValueError, match="tau"):
        parse_sparse_spec("asa:tau=2")


@pytest.mark.parametrize("preset, recipe", [("pixart-tdm", "tdm"), ("wan-tdm", "tdm"), ("wan-blade", "blade")])
def test_shipped_presets_are_valid_recipes(preset, recipe):
    from diffusion_accel.train import recipe_class
    from diffusion_accel.train.options import build_options, load_config_file

    values = load_config_file(preset)
    options = build_options(recipe_class(recipe).options_class, {**values, "output_dir": "unused"})
    assert options.num_inference_steps == 4 and options.adam_beta1 == 0.0
    assert (options.sparse_attention is not None) == (recipe == "blade")
