"""DDPM forward and reverse processes (Ho et al. 2020) with a DDIM sampler (Song et al. 2021).

Notation: beta_t, alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s, t = 0 .. T-1.
  q(x_t | x_0)          = N(sqrt(abar_t) x_0, (1 - abar_t) I)
  x_0 from eps          = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps
  q(x_{t-1} | x_t, x_0) = N(c0_t x_0 + ct_t x_t, betatilde_t I), with abar_{-1} = 1,
      c0_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t),  ct_t = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t),
      betatilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
Tables are computed in float64 and stored in float32 as (non-persistent) buffers, so
`.to(device)` moves them and every lookup is a device-side gather (no host sync).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from tqdm.auto import tqdm

SCHEDULES = ("cosine", "linear")


def cosine_betas(num_timesteps: int, s: float = 0.008) -> torch.Tensor:
    """abar(x) = cos^2(((x/T) + s)/(1 + s) * pi/2), normalised by abar(0); beta_t = 1 - abar(t+1)/abar(t), clipped."""
    x = torch.linspace(0, num_timesteps, num_timesteps + 1, dtype=torch.float64)
    abar = torch.cos(((x / num_timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    abar = abar / abar[0]
    return torch.clip(1 - abar[1:] / abar[:-1], 1e-4, 0.9999)


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al.'s betas from beta_start to beta_end at T = 1000, both ends scaled by 1000/T for other T
    (Nichol & Dhariwal), so that abar_{T-1} stays near 4e-5 and x_{T-1} near N(0, I), which sampling starts
    from; clipped to 0.9999 like the cosine schedule (T < 20 would reach beta >= 1)."""
    scale = 1000 / num_timesteps
    betas = torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)
    return betas.clip(max=0.9999)


def extract(table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """table[t] shaped (B, 1, 1, ...) to broadcast against a rank-`ndim` batch."""
    return table.gather(0, t.long()).reshape(-1, *([1] * (ndim - 1)))


class GaussianDiffusion(nn.Module):
    def __init__(self, schedule: str = "cosine", num_timesteps: int = 1000):
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown beta schedule {schedule!r}; choose one of {SCHEDULES}")
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps must be at least 2, got {num_timesteps}")
        self.schedule = schedule
        self.num_timesteps = num_timesteps
        betas = cosine_betas(num_timesteps) if schedule == "cosine" else linear_betas(num_timesteps)
        alphas = 1 - betas
        abar = torch.cumprod(alphas, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        posterior_variance = betas * (1 - abar_prev) / (1 - abar)
        tables = {
            "betas": betas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": abar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - abar).sqrt(),
            "sqrt_recip_alphas_cumprod": (1 / abar).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1 / abar - 1).sqrt(),
            "posterior_variance": posterior_variance,
            # betatilde_0 = 0: log-variance clipped to betatilde_1 at t = 0 (Ho et al.)
            "posterior_log_variance_clipped": torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            "posterior_mean_coef_x0": betas * abar_prev.sqrt() / (1 - abar),
            "posterior_mean_coef_xt": (1 - abar_prev) * alphas.sqrt() / (1 - abar),
        }
        for name, value in tables.items():
            self.register_buffer(name, value.float(), persistent=False)

    # forward process ---------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:
            noise = torch.randn_like(x0)
        return (extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
                - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)

    def predict_noise_from_start(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return ((extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0)
                / extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        mean = (extract(self.posterior_mean_coef_x0, t, x_t.ndim) * x0
                + extract(self.posterior_mean_coef_xt, t, x_t.ndim) * x_t)
        return (mean, extract(self.posterior_variance, t, x_t.ndim),
                extract(self.posterior_log_variance_clipped, t, x_t.ndim))

    # reverse process ---------------------------------------------------------------------------
    def predict_x0(self, model, x_t: torch.Tensor, t: torch.Tensor, clip: bool = True) -> torch.Tensor:
        x0 = self.predict_start_from_noise(x_t, t, model(x_t, t).to(x_t.dtype))
        return x0.clamp(-1, 1) if clip else x0

    @torch.no_grad()
    def p_sample(self, model, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                 temperature: float = 1.0) -> torch.Tensor:
        """One ancestral step x_t -> x_{t-1}: posterior mean at the clamped x0 prediction, plus noise for t > 0."""
        x0 = self.predict_x0(model, x_t, t)
        mean, _, log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        if noise is None:
            noise = torch.randn_like(x_t)
        nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        return mean + nonzero * torch.exp(0.5 * log_variance) * noise * temperature

    @torch.no_grad()
    def ddim_step(self, model, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, eta: float = 0.0,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t -> x_{t_prev} (t_prev = -1 means the clean image):
        x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
        sigma = eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev), eps re-derived from the clamped x0.
        With eta = 1 and t_prev = t - 1 this is exactly the DDPM posterior step."""
        x0 = self.predict_x0(model, x_t, t)
        eps = self.predict_noise_from_start(x_t, t, x0)
        abar = extract(self.alphas_cumprod, t, x_t.ndim)
        first = t_prev < 0
        abar_prev = extract(self.alphas_cumprod, t_prev.clamp(min=0), x_t.ndim)
        abar_prev = torch.where(first.reshape(abar_prev.shape), torch.ones_like(abar_prev), abar_prev)
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).clamp(min=0).sqrt()
        direction = (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt()
        x_prev = abar_prev.sqrt() * x0 + direction * eps
        if eta == 0:
            return x_prev
        return x_prev + sigma * (torch.randn_like(x_t) if noise is None else noise)

    @staticmethod
    def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
        """`steps` evenly spaced timesteps from T-1 down to 0 (both included when steps > 1)."""
        if not 1 <= steps <= num_timesteps:
            raise ValueError(f"DDIM steps must be in [1, {num_timesteps}], got {steps}")
        grid = torch.linspace(num_timesteps - 1, 0, steps).round().long().tolist()
        return grid

    @torch.no_grad()
    def p_sample_loop(self, model, shape, generator: torch.Generator | None = None, device=None,
                      progress: bool = True, x_T: torch.Tensor | None = None) -> torch.Tensor:
        """The 1000-step ancestral sampler from x_T ~ N(0, I)."""
        device = device or next(model.parameters()).device
        x = x_T if x_T is not None else torch.randn(shape, generator=generator, device=device)
        steps = range(self.num_timesteps - 1, -1, -1)
        for i in tqdm(steps, desc="DDPM", disable=not progress, leave=False):
            t = torch.full((x.shape[0],), i, device=device, dtype=torch.long)
            noise = torch.randn(x.shape, generator=generator, device=device)
            x = self.p_sample(model, x, t, noise=noise)
        return x

    @torch.no_grad()
    def ddim_sample_loop(self, model, shape, steps: int = 50, eta: float = 0.0,
                         generator: torch.Generator | None = None, device=None, progress: bool = True,
                         x_T: torch.Tensor | None = None, on_step=None) -> torch.Tensor:
        """DDIM from x_T (or fresh noise) in `steps` steps; on_step() after each (an exception it raises stops
        the loop)."""
        device = device or next(model.parameters()).device
        x = x_T if x_T is not None else torch.randn(shape, generator=generator, device=device)
        times = self.ddim_timesteps(self.num_timesteps, steps)
        prevs = times[1:] + [-1]
        for i, j in tqdm(list(zip(times, prevs)), desc=f"DDIM{steps}", disable=not progress, leave=False):
            t = torch.full((x.shape[0],), i, device=device, dtype=torch.long)
            t_prev = torch.full((x.shape[0],), j, device=device, dtype=torch.long)
            noise = torch.randn(x.shape, generator=generator, device=device) if eta > 0 else None
            x = self.ddim_step(model, x, t, t_prev, eta=eta, noise=noise)
            if on_step is not None:
                on_step()
        return x
