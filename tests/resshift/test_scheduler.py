"""ResShiftScheduler: the paper's schedule, the forward marginal, the exact posterior, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusion_accel.pipelines.resshift.scheduler import ResShiftScheduler

# algos_B.md §1.4: values of the released code's exponential schedule (zsyOAOA/ResShift @ 3ce1d81)
T4_SQRT_ETAS = [0.1, 0.5201, 0.76138, 0.99]
T4_POSTERIOR_VAR = [0.0, 0.03852, 0.57712, 0.9473]
T15_SQRT_ETAS = [0.02, 0.11717, 0.1763, 0.23363, 0.29157, 0.35101, 0.41236, 0.47586, 0.54167, 0.60991, 0.68066,
                 0.75399, 0.82995, 0.90861, 0.99]
T15_POSTERIOR_VAR = [0, 0.00155, 0.03066, 0.05353, 0.07816, 0.10541, 0.13573, 0.16942, 0.20673, 0.24793, 0.29324,
                     0.34293, 0.39722, 0.45639, 0.52067]


def test_set_timesteps_4_gives_the_papers_journal_schedule():
    s = ResShiftScheduler()  # defaults = the journal config: T=4, κ=2, p=0.3, min_noise_level 0.2
    s.set_timesteps(4)
    assert s.timesteps.tolist() == [3, 2, 1, 0]
    np.testing.assert_allclose(s.sqrt_etas.numpy(), T4_SQRT_ETAS, atol=6e-5)
    np.testing.assert_allclose(s.posterior_variance.numpy(), T4_POSTERIOR_VAR, atol=6e-5)
    assert s.etas[0].item() == pytest.approx(0.01) and s.etas[-1].item() == pytest.approx(0.9801)
    assert s.init_noise_sigma == pytest.approx(1.98)


def test_conference_schedule_t15():
    s = ResShiftScheduler(num_train_timesteps=15, min_noise_level=0.04)
    s.set_timesteps(15)
    assert s.timesteps.tolist() == list(range(14, -1, -1))
    np.testing.assert_allclose(s.sqrt_etas.numpy(), T15_SQRT_ETAS, atol=6e-5)
    np.testing.assert_allclose(s.posterior_variance.numpy(), T15_POSTERIOR_VAR, atol=6e-5)
    assert s.etas[0].item() == pytest.approx(min((0.04 / 2.0) ** 2, 0.001))  # the paper's η_1 formula
    assert (s.etas[1:] > s.etas[:-1]).all()


@pytest.mark.parametrize("steps", [3, 5, 50])
def test_a_step_count_the_schedule_cannot_give_is_refused(steps):
    with pytest.raises(ValueError, match="num_inference_steps=4"):
        ResShiftScheduler().set_timesteps(steps)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="prediction_type"):
        ResShiftScheduler(prediction_type="v_prediction")
    with pytest.raises(ValueError, match="min_noise_level < etas_end"):
        ResShiftScheduler(min_noise_level=0.995)


def test_forward_marginal_matches_the_closed_form_monte_carlo():
    """Composing the one-step transitions q(x_t | x_{t−1}) = N(x_{t−1} + α_t e0, κ² α_t) from x0 gives, at every t,
    the marginal mean x0 + η_t e0 and variance κ² η_t; ``add_noise`` draws that marginal."""
    s = ResShiftScheduler(num_train_timesteps=15, min_noise_level=0.04)
    g = torch.Generator().manual_seed(0)
    n = 50_000
    x0, y0 = torch.full((n,), 0.7, dtype=torch.float64), torch.full((n,), -1.3, dtype=torch.float64)
    e0, kappa = y0 - x0, s.config.kappa
    x = x0.clone()
    for t in range(15):
        alpha = s.alphas[t].double()
        x = x + alpha * e0 + kappa * alpha.sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
        marginal = s.add_noise(x0, torch.randn(n, generator=g, dtype=torch.float64), torch.full((n,), t), y0)
        eta = s.etas[t].double()
        for draw in (x, marginal):
            se = (kappa**2 * eta / n).sqrt()
            assert abs(draw.mean() - (x0[0] + eta * e0[0])) < 5 * se
            assert draw.var().item() == pytest.approx(kappa**2 * eta.item(), rel=0.03)


@pytest.mark.parametrize("t", [1, 2, 3])
def test_posterior_equals_gaussian_conditioning(t):
    """step() with x̂0 = x0 draws q(x_{t−1} | x_t, x0): compare with conditioning the joint Gaussian of
    (x_{t−1}, x_t) given x0 numerically (2x2 covariance)."""
    s = ResShiftScheduler()
    kappa, x0, y0, xt = 2.0, 0.4, -0.9, 1.1
    eta_prev, eta = s.etas[t - 1].double().item(), s.etas[t].double().item()
    m_prev, m_t = x0 + eta_prev * (y0 - x0), x0 + eta * (y0 - x0)
    cov = np.array([[kappa**2 * eta_prev, kappa**2 * eta_prev], [kappa**2 * eta_prev, kappa**2 * eta]])
    cond_mean = m_prev + cov[0, 1] / cov[1, 1] * (xt - m_t)
    cond_var = cov[0, 0] - cov[0, 1] ** 2 / cov[1, 1]
    sample = torch.tensor([[xt]], dtype=torch.float64)
    out0 = s.step(torch.tensor([[x0]], dtype=torch.float64), t, sample, noise=torch.zeros(1, 1, dtype=torch.float64))
    out1 = s.step(torch.tensor([[x0]], dtype=torch.float64), t, sample, noise=torch.ones(1, 1, dtype=torch.float64))
    assert out0.prev_sample.item() == pytest.approx(cond_mean, abs=1e-5)
    assert (out1.prev_sample - out0.prev_sample).item() ** 2 == pytest.approx(cond_var, abs=1e-5)


def test_posterior_at_eta_zero_returns_x0_and_an_oracle_chain_ends_on_x0():
    """η_0 = 0: the last step's mean is x̂0 and its variance 0, so whatever the noise, the sample is x0; a whole
    chain driven by an oracle that returns the true x0 ends exactly on x0 (algos_B §1.10)."""
    s = ResShiftScheduler()
    g = torch.Generator().manual_seed(1)
    x0, y0 = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    out = s.step(x0, 0, torch.randn(2, 4, 8, 8, generator=g) * 5, generator=g).prev_sample
    assert torch.equal(out, x0)
    s.set_timesteps(4)
    x = s.prior_sample(y0, torch.randn(2, 4, 8, 8, generator=g))
    for t in s.timesteps:
        x = s.step(x0, t, x, low_res_latents=y0, generator=g).prev_sample
    assert torch.equal(x, x0)


def test_other_prediction_types_recover_x0():
    g = torch.Generator().manual_seed(2)
    x0, y0, eps = (torch.randn(1, 4, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([2])
    for kind, output in (("residual", y0 - x0), ("epsilon", eps)):
        s = ResShiftScheduler(prediction_type=kind)
        xt = s.add_noise(x0, eps, t, y0)
        torch.testing.assert_close(s.predicted_x0(output, t, xt, y0), x0, atol=1e-5, rtol=1e-5)


def test_scheduler_round_trips_through_save_pretrained(tmp_path):
    s = ResShiftScheduler(num_train_timesteps=15, kappa=1.5, power=0.4, min_noise_level=0.04)
    s.save_pretrained(tmp_path)
    r = ResShiftScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(r.config) == public(s.config)
    for name in ("etas", "sqrt_etas", "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2"):
        assert torch.equal(getattr(r, name), getattr(s, name)), name
    assert not torch.equal(r.etas, ResShiftScheduler(num_train_timesteps=15, min_noise_level=0.04).etas)
