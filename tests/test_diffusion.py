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
    expected_mean = ((math.sqrt(abar_prev) * beta / (1 - a)) * x0
                     + (math.sqrt(1 - beta) * (1 - abar_prev) / (1 - a)) * x_t)
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
    with pytest.raises(ValueError, match="DDIM steps"):
        GaussianDiffusion.ddim_timesteps(1000, 1001)  # more steps than timesteps would repeat some


def test_bad_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="schedule"):
        GaussianDiffusion("quadratic")


def closed_form_tables(d):
    """float64 abar_t, abar_{t-1} (abar_{-1} = 1) and beta_t from the module's betas (checked above)."""
    betas = d.betas.double()
    abar = torch.cumprod(1 - betas, 0)
    return abar, torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]]), betas


def clamped_x0(d, model, x_t, t):
    """clamp(x_t / sqrt(abar_t) - sqrt(1/abar_t - 1) eps_theta(x_t, t), -1, 1) in float64."""
    abar = closed_form_tables(d)[0][t].reshape(-1, 1, 1, 1)
    eps = model(x_t, t).double()
    return ((x_t.double() - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1), eps


def test_timesteps_below_two_are_refused():
    with pytest.raises(ValueError, match="num_timesteps"):
        GaussianDiffusion("cosine", 1)
    assert GaussianDiffusion("cosine", 2).num_timesteps == 2


def test_posterior_log_variance_at_t0_is_clipped_to_that_of_t1():
    """betatilde_0 = 0, so the stored log-variance at t = 0 is log(betatilde_1) (finite)."""
    d = GaussianDiffusion()
    abar, abar_prev, betas = closed_form_tables(d)
    betatilde_1 = (betas[1] * (1 - abar_prev[1]) / (1 - abar[1])).item()
    _, var, log_var = d.q_posterior_mean_variance(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4),
                                                  torch.zeros(2, dtype=torch.long))
    assert var.flatten()[0].item() == 0.0
    assert log_var.flatten()[0].item() == pytest.approx(math.log(betatilde_1), rel=1e-5)


@pytest.mark.parametrize("t", [0, 1, 500])
def test_p_sample_against_closed_form(t):
    """x_{t-1} = c0_t x0_hat + ct_t x_t + [t > 0] temperature sqrt(betatilde_t) z, x0_hat clamped to [-1, 1]."""
    d = GaussianDiffusion()
    model = ToyDenoiser()
    abar, abar_prev, betas = closed_form_tables(d)
    x_t, noise = torch.randn(2, 3, 4, 4) * 1.5, torch.randn(2, 3, 4, 4)
    tt = torch.full((2,), t)
    x0_hat, _ = clamped_x0(d, model, x_t, tt)
    a, a_prev, beta = abar[t].item(), abar_prev[t].item(), betas[t].item()
    mean = (beta * math.sqrt(a_prev) / (1 - a)) * x0_hat + ((1 - a_prev) * math.sqrt(1 - beta) / (1 - a)) * x_t.double()
    std = math.sqrt(beta * (1 - a_prev) / (1 - a))
    expected = mean + (0.6 * std * noise.double() if t > 0 else 0)
    got = d.p_sample(model, x_t, tt, noise=noise, temperature=0.6)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("t,t_prev", [(600, 350), (999, 0), (40, -1)])
def test_ddim_step_with_partial_eta_against_closed_form(t, t_prev):
    """sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev) at eta = 0.5, over a
    skip of several steps; abar_prev = 1 for t_prev = -1."""
    d = GaussianDiffusion()
    model = ToyDenoiser()
    abar = closed_form_tables(d)[0]
    x_t, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    tt = torch.full((2,), t)
    x0_hat, _ = clamped_x0(d, model, x_t, tt)
    a = abar[t].item()
    a_prev = abar[t_prev].item() if t_prev >= 0 else 1.0
    eps = (x_t.double() / math.sqrt(a) - x0_hat) / math.sqrt(1 / a - 1)  # re-derived from the clamped x0
    sigma = 0.5 * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
    expected = math.sqrt(a_prev) * x0_hat + math.sqrt(1 - a_prev - sigma ** 2) * eps + sigma * noise.double()
    got = d.ddim_step(model, x_t, tt, torch.full((2,), t_prev), eta=0.5, noise=noise)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


def test_one_step_ddim_returns_the_clamped_x0_prediction():
    """With steps = 1 the only step goes from T-1 to the clean image (abar_prev = 1): x0_hat itself."""
    d = GaussianDiffusion("cosine", 50)
    model = ToyDenoiser()
    x_T = torch.randn(2, 3, 4, 4) * 2
    expected, _ = clamped_x0(d, model, x_T, torch.full((2,), 49))
    got = d.ddim_sample_loop(model, x_T.shape, steps=1, x_T=x_T, progress=False)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_ancestral_loop_visits_every_timestep_down_to_zero_and_draws_from_its_generator():
    d = GaussianDiffusion("cosine", 6)
    model = ToyDenoiser()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[1].tolist()))
    runs = []
    for global_seed in (1, 2):  # the global RNG's state must not matter
        torch.manual_seed(global_seed)
        runs.append(d.p_sample_loop(model, (2, 3, 4, 4), generator=torch.Generator().manual_seed(7), progress=False))
    assert seen[:6] == [[t, t] for t in range(5, -1, -1)] and len(seen) == 12
    assert torch.equal(runs[0], runs[1])


def test_reference_samplers_default_noise_is_the_standard_normal_draw():
    """Without `noise`, p_sample and ddim_step (eta > 0) draw torch.randn_like(x_t) from the global generator,
    and the loops without x_T start from torch.randn(shape, generator=generator): the same results as with those
    draws passed in."""
    d = GaussianDiffusion("cosine", 6)
    model = ToyDenoiser()
    x_t, t = torch.randn(2, 3, 4, 4), torch.full((2,), 3)
    for step in (lambda **kw: d.p_sample(model, x_t, t, **kw),
                 lambda **kw: d.ddim_step(model, x_t, t, t - 2, eta=0.5, **kw)):
        torch.manual_seed(21)
        drawn = step()
        torch.manual_seed(21)
        assert torch.equal(drawn, step(noise=torch.randn_like(x_t)))
    shape = (2, 3, 4, 4)
    for loop in (lambda g, **kw: d.p_sample_loop(model, shape, generator=g, progress=False, **kw),
                 lambda g, **kw: d.ddim_sample_loop(model, shape, steps=3, eta=0.5, generator=g, progress=False, **kw)):
        drawn = loop(torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(5)
        assert torch.equal(drawn, loop(g, x_T=torch.randn(shape, generator=g)))
