"""Training objectives, by name: `standard`, `seed` (the seed's conservative DREAM) and `paper` (DREAM as published).

Every objective has the signature

    loss, logs = OBJECTIVES[name](model, diffusion, x0, epoch, config, t=None, noise=None, backward=None)

t (B,) and noise (like x0) may be given for reproducibility; otherwise t ~ U{0..T-1}, noise ~ N(0, I).
`logs` holds detached scalar tensors (no host sync here; the trainer reads them when it logs).
When `backward` is None the returned loss carries its autograd graph. When `backward` is a callable
(e.g. `lambda l: scaler.scale(l).backward()`), the objective calls it on terms that sum to the loss,
as early as possible, so that at most one forward graph is alive at a time; the loss is then returned
detached. Both give the same gradients.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from dream.diffusion import GaussianDiffusion, extract
from dream.errors import option_error


@dataclass
class ObjectiveConfig:
    # seed: lambda_t = lambda_max * (t / T) * min(epoch / ramp_epochs, 1), active from dream_start_epoch;
    #       loss = alpha * MSE(eps_theta(x_t), eps) + (1 - alpha) * MSE(eps_theta(x_t'), eps)
    dream_start_epoch: int = 10
    lambda_max: float = 0.5
    alpha: float = 0.7
    ramp_epochs: float = 20.0
    # The seed spends a separate no-grad forward on eps_hat (three forwards a step). By default the detached
    # output of the standard term's own forward is reused (two forwards; only the dropout mask differs).
    seed_separate_eps_forward: bool = False
    # paper: lambda_t = sqrt(1 - abar_t) ** paper_power; MSE (diffusers' port) or L1 (the paper's SR3 setting)
    paper_power: float = 1.0
    paper_loss: str = "mse"

    def __post_init__(self):
        """Values outside these ranges make the objective meaningless (or divide by zero); the message names
        the field as its `dream train` flag (--lambda-max for lambda_max)."""
        checks = [("dream_start_epoch", isinstance(self.dream_start_epoch, int) and self.dream_start_epoch >= 0,
                   "a non-negative integer"),
                  ("lambda_max", 0 <= self.lambda_max <= 1, "in [0, 1] (x0' mixes x0_hat and x0)"),
                  ("alpha", 0 <= self.alpha <= 1, "in [0, 1] (it weighs the two terms)"),
                  ("ramp_epochs", self.ramp_epochs > 0, "positive"),
                  ("paper_power", self.paper_power >= 0, "non-negative"),
                  ("paper_loss", self.paper_loss in ("mse", "l1"), "mse or l1")]
        for name, ok, wanted in checks:
            if not ok:
                raise option_error(name, wanted, getattr(self, name))

    def to_dict(self) -> dict:
        return asdict(self)


def sample_inputs(diffusion: GaussianDiffusion, x0: torch.Tensor, t, noise):
    if t is None:
        t = torch.randint(0, diffusion.num_timesteps, (x0.shape[0],), device=x0.device)
    if noise is None:
        noise = torch.randn_like(x0)
    return t, noise


def mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(prediction.float(), target.float())


def finish(loss: torch.Tensor, backward) -> torch.Tensor:
    """Backpropagate now when the caller asked us to; return what the caller keeps."""
    if backward is None:
        return loss
    backward(loss)
    return loss.detach()


@contextmanager
def eval_mode(model):
    """Dropout off for a no-grad estimate, the training mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def standard(model, diffusion, x0, epoch, config, t=None, noise=None, backward=None):
    """MSE(eps_theta(x_t, t), eps)."""
    t, noise = sample_inputs(diffusion, x0, t, noise)
    loss = mse(model(diffusion.q_sample(x0, t, noise), t), noise)
    loss = finish(loss, backward)
    return loss, {"loss": loss.detach(), "loss_standard": loss.detach()}


def seed_ramp(epoch: float, config: ObjectiveConfig) -> float:
    """min(epoch / ramp_epochs, 1): how far the seed objective's lambda_t has ramped up at this epoch."""
    return min(epoch / config.ramp_epochs, 1.0)


def seed_lambda(t: torch.Tensor, epoch: float, config: ObjectiveConfig, num_timesteps: int) -> torch.Tensor:
    """lambda_t = lambda_max * (t / T) * min(epoch / ramp_epochs, 1)   (lambda_min = 0)."""
    return config.lambda_max * (t.float() / num_timesteps) * seed_ramp(epoch, config)


def seed(model, diffusion, x0, epoch, config, t=None, noise=None, backward=None):
    """The seed's conservative DREAM; `standard` before config.dream_start_epoch.

    x0_hat = clamp(predict_start_from_noise(x_t, t, stop_grad(eps_hat)), -1, 1)
    x0'    = lambda_t x0_hat + (1 - lambda_t) x0;   x_t' = q_sample(x0', t, same eps)
    loss   = alpha MSE(eps_theta(x_t, t), eps) + (1 - alpha) MSE(eps_theta(x_t', t), eps)
    """
    if epoch < config.dream_start_epoch:
        loss, logs = standard(model, diffusion, x0, epoch, config, t, noise, backward)
        zero = torch.zeros((), device=x0.device)
        return loss, {**logs, "loss_rect": zero, "lambda_t_mean": zero}
    t, noise = sample_inputs(diffusion, x0, t, noise)
    x_t = diffusion.q_sample(x0, t, noise)
    eps_pred = model(x_t, t)
    loss_standard = mse(eps_pred, noise)
    if config.seed_separate_eps_forward:
        with torch.no_grad():
            eps_hat = model(x_t, t)
    else:
        eps_hat = eps_pred.detach()
    standard_term = finish(config.alpha * loss_standard, backward)  # frees the first graph when backward is given
    with torch.no_grad():
        x0_hat = diffusion.predict_start_from_noise(x_t, t, eps_hat.to(x_t.dtype)).clamp(-1, 1)
        lam = seed_lambda(t, epoch, config, diffusion.num_timesteps).reshape(-1, *([1] * (x0.ndim - 1)))
        x_t_rect = diffusion.q_sample(lam * x0_hat + (1 - lam) * x0, t, noise)
    loss_rect = mse(model(x_t_rect, t), noise)
    rect_term = finish((1 - config.alpha) * loss_rect, backward)
    loss = standard_term + rect_term
    return loss, {"loss": loss.detach(), "loss_standard": loss_standard.detach(),
                  "loss_rect": loss_rect.detach(), "lambda_t_mean": lam.mean()}


def paper(model, diffusion, x0, epoch, config, t=None, noise=None, backward=None):
    """DREAM (Zhou et al., CVPR 2024, Algorithm 3), eps-prediction:

    eps_hat = stop_grad(eps_theta(x_t, t)) with dropout off;  d = eps - eps_hat
    x_bar   = x_t + sqrt(1 - abar_t) lambda_t d;   lambda_t = sqrt(1 - abar_t) ** p
    loss    = || eps + lambda_t d - eps_theta(x_bar, t) ||   (MSE, or L1)
    """
    t, noise = sample_inputs(diffusion, x0, t, noise)
    x_t = diffusion.q_sample(x0, t, noise)
    with torch.no_grad(), eval_mode(model):
        eps_hat = model(x_t, t).to(x_t.dtype)
    sigma = extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
    lam = sigma ** config.paper_power
    delta = noise - eps_hat
    prediction = model(x_t + sigma * lam * delta, t)
    target = noise + lam * delta
    if config.paper_loss == "l1":
        loss = F.l1_loss(prediction.float(), target.float())
    else:
        loss = mse(prediction, target)
    loss = finish(loss, backward)
    return loss, {"loss": loss.detach(), "lambda_t_mean": lam.mean()}


OBJECTIVES = {"standard": standard, "seed": seed, "paper": paper}
# the ObjectiveConfig fields each objective reads (a resumed run compares only these)
OBJECTIVE_SETTINGS = {"standard": (),
                      "seed": ("dream_start_epoch", "lambda_max", "alpha", "ramp_epochs", "seed_separate_eps_forward"),
                      "paper": ("paper_power", "paper_loss")}


# What each objective computes from the epoch, as a hashable phase: two epochs with equal phases run the same
# computation on the same inputs (a training step captured as a CUDA graph in one epoch is replayed in the other).
EPOCH_PHASES = {"standard": lambda epoch, config: (),
                "seed": lambda epoch, config: (("standard",) if epoch < config.dream_start_epoch
                                               else ("dream", seed_ramp(epoch, config))),
                "paper": lambda epoch, config: ()}


def epoch_phase(name: str, epoch: int, config: ObjectiveConfig) -> tuple:
    """The phase of objective `name` at this epoch (EPOCH_PHASES): the seed objective's changes at its DREAM start
    and at each epoch of its ramp, then stays; the others' never change."""
    return EPOCH_PHASES[name](epoch, config)


def get_objective(name: str):
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]
