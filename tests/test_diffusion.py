"""Schedules, forward process and samplers against formulas computed independently here."""
import math

import pytest
import torch

from dream.diffusion import GaussianDiffusion


def cosine_abar(t, T=1000, s=0.008):
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return f(t) / f(0)


@pytest.mark.parametrize("t", [0, 1, 250, 500, 998, 999])
def test_cosine_schedule_values(t):
    d = GaussianDiffusion("cosine", 1000)
    beta = min(max(1 - cosine_abar(t + 1) / cosine_abar(t), 1e-4), 0.9999)
    assert d.betas[t].item() == pytest.approx(beta, rel=1e-6)
    abar = math.prod(1 - min(max(1 - cosine_abar(s + 1) / cosine_abar(s), 1e-4), 0.9999) for s in range(t + 1))
    assert d.alphas_cumprod[t].item() == pytest.approx(abar, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("t", [0, 499, 999])
def test_linear_schedule_values(t):
    d = GaussianDiffusion("linear", 1000)
    assert d.betas[t].item() == pytest.approx(1e-4 + (0.02 - 1e-4) * t / 999, rel=1e-6)


@pytest.mark.parametrize("timesteps", [10, 50, 250, 4000])
def test_linear_schedule_ends_in_noise_at_any_length(timesteps):
    """Both ends scale by 1000/T: the last step's abar stays near T = 1000's 4.0e-5 (sampling starts from
    N(0, I)); the betas stay below 1 where the scaled end would pass it (T = 10: 0.2 ... 2.0)."""
    d = GaussianDiffusion("linear", timesteps)
    scale = 1000 / timesteps
    expected = [min(scale * (1e-4 + (0.02 - 1e-4) * t / (timesteps - 1)), 0.9999) for t in range(timesteps)]
    torch.testing.assert_close(d.betas.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    assert d.alphas_cumprod[-1].item() < (1e-4 if timesteps >= 50 else 1e-12)
    assert torch.isfinite(d.posterior_mean_coef_x0).all() and torch.isfinite(d.sqrt_recip_alphas_cumprod).all()


def test_tables_are_float32_buffers_that_move_with_the_module():
    d = GaussianDiffusion()
    assert d.alphas_cumprod.dtype == torch.float32
    assert "alphas_cumprod" in dict(d.named_buffers())
    assert d.state_dict() == {}  # derived tables are not persisted


def test_q_sample_moments():
    d = GaussianDiffusion()
    torch.manual_seed(0)
    t = torch.full((200_000,), 300)
    x0 = torch.full((200_000, 1), 0.7)
    x_t = d.q_sample(x0, t)
    abar = d.alphas_cumprod[300].item()
    assert x_t.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=0.01)
    assert x_t.var().item() == pytest.approx(1 - abar, rel=0.02)


def test_predict_start_inverts_q_sample():
    d = GaussianDiffusion()
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 990])
    x_t = d.q_sample(x0, t, noise)
    torch.testing.assert_close(d.predict_start_from_noise(x_t, t, noise), x0, rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("t", [0, 1, 400, 999])
def test_posterior_against_closed_form(t):
    d = GaussianDiffusion()
    betas = d.betas.double()
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = abar[t - 1].item() if t > 0 else 1.0
    beta, a = betas[t].item(), abar[t].item()
    x0, x_t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    tt = torch.full((2,), t)
    mean, var, log_var = d.q_posterior_mean_variance(x0, x_t, tt)
    expected_mean = (math.sqrt(abar_prev) * beta / (1 - a)) * x0 + (math.sqrt(1 - beta) * (1 - abar_prev) / (1 - a)) * x_t
    torch.testing.assert_close(mean, expected_mean, rtol=1e-4, atol=1e-5)  # tables are stored in float32
    expected_var = beta * (1 - abar_prev) / (1 - a)
    assert var.flatten()[0].item() == pytest.approx(expected_var, rel=1e-5, abs=1e-12)
    if t > 0:
        assert log_var.flatten()[0].item() == pytest.approx(math.log(expected_var), rel=1e-5, abs=1e-6)


class ToyDenoiser(torch.nn.Module):
    """A deterministic eps-predictor depending on x and t, for sampler identities."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, x, t):
        return self.scale * torch.tanh(x) + 1e-4 * t.float().reshape(-1, 1, 1, 1)


def test_ddim_with_eta_one_over_all_steps_is_the_ddpm_sampler():
    d = GaussianDiffusion()
    model = ToyDenoiser()
    steps = d.ddim_timesteps(1000, 1000)
    assert steps == list(range(999, -1, -1))
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 3, 4, 4, generator=g)
    noises = torch.randn(1000, 2, 3, 4, 4, generator=g)
    x_ddpm, x_ddim = x_T.clone(), x_T.clone()
    worst = 0.0
    for k, i in enumerate(steps):
        t = torch.full((2,), i)
        one_ddpm = d.p_sample(model, x_ddpm, t, noise=noises[k])
        one_ddim = d.ddim_step(model, x_ddpm, t, t - 1, eta=1.0, noise=noises[k])
        worst = max(worst, (one_ddpm - one_ddim).abs().max().item())
        x_ddpm = one_ddpm
        x_ddim = d.ddim_step(model, x_ddim, t, t - 1, eta=1.0, noise=noises[k])
    assert worst < 3e-5  # each step: the same x_t gives the same x_{t-1} (float32 tables, values of order 1)
    torch.testing.assert_close(x_ddim, x_ddpm, rtol=1e-3, atol=1e-3)


def test_ddim_eta_zero_is_deterministic_and_ends_clean():
    d = GaussianDiffusion()
    model = ToyDenoiser()
    x_T = torch.randn(2, 3, 4, 4)
    a = d.ddim_sample_loop(model, x_T.shape, steps=10, x_T=x_T, progress=False)
    b = d.ddim_sample_loop(model, x_T.shape, steps=10, x_T=x_T, progress=False)
    assert torch.equal(a, b)
    assert a.abs().max() <= 1.0 + 1e-6  # the last step returns the clamped x0 prediction


def test_ddim_timesteps_are_evenly_spaced_and_validated():
    assert GaussianDiffusion.ddim_timesteps(1000, 4) == [999, 666, 333, 0]
    # off the integers the grid is rounded to the nearest (999 - 999/49 = 978.6 -> 979), not truncated
    assert GaussianDiffusion.ddim_timesteps(1000, 50) == [round(999 * (49 - k) / 49) for k in range(50)]
    with pytest.raises(ValueError, match="DDIM steps"):
        GaussianDiffusion.ddim_timesteps(1000, 0)


def test_bad_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="schedule"):
        GaussianDiffusion("quadratic")
