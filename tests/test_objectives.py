"""Each objective against an independent float64 computation written here, on tiny tensors."""
import math

import pytest
import torch

from dream.diffusion import GaussianDiffusion
from dream.objectives import EPOCH_PHASES, OBJECTIVES, ObjectiveConfig, epoch_phase, get_objective

T = 1000


def abar_table():
    """The cosine schedule's abar, recomputed here in float64 from its definition."""
    f = lambda u: math.cos((u / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = [min(max(1 - f(i + 1) / f(i), 1e-4), 0.9999) for i in range(T)]
    return torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), 0)


class ToyEps(torch.nn.Module):
    """eps_theta(x, t): a 3x3 conv, a t-dependent shift and optional dropout; float64."""

    def __init__(self, dropout=0.0):
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1).double()
        self.time = torch.nn.Parameter(torch.randn(3, dtype=torch.float64) * 1e-3)
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, x, t):
        return self.dropout(torch.tanh(self.conv(x))) + self.time[None, :, None, None] * t.double()[:, None, None, None]


def inputs(batch=3):
    g = torch.Generator().manual_seed(11)
    x0 = torch.rand(batch, 3, 5, 7, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(batch, 3, 5, 7, generator=g, dtype=torch.float64)
    t = torch.tensor([5, 480, 999][:batch])
    return x0, noise, t


def expected_standard(model, x0, noise, t):
    a = abar_table()[t].reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return ((model(x_t, t) - noise) ** 2).mean()


def expected_seed(model, x0, noise, t, epoch, lambda_max=0.5, alpha=0.7, ramp=20.0, separate=False):
    a = abar_table()[t].reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    eps_pred = model(x_t, t)
    if separate:
        with torch.no_grad():
            eps_hat = model(x_t, t)
    else:
        eps_hat = eps_pred.detach()
    lam = (lambda_max * t.double() / T * min(epoch / ramp, 1)).reshape(-1, 1, 1, 1)
    x0_hat = ((x_t - (1 - a).sqrt() * eps_hat) / a.sqrt()).clamp(-1, 1)
    x_rect = a.sqrt() * (lam * x0_hat + (1 - lam) * x0) + (1 - a).sqrt() * noise
    return alpha * ((eps_pred - noise) ** 2).mean() + (1 - alpha) * ((model(x_rect, t) - noise) ** 2).mean()


def expected_paper(model, x0, noise, t, power=1.0, l1=False):
    a = abar_table()[t].reshape(-1, 1, 1, 1)
    sigma = (1 - a).sqrt()
    x_t = a.sqrt() * x0 + sigma * noise
    model.eval()
    with torch.no_grad():
        eps_hat = model(x_t, t)
    model.train()
    lam = sigma ** power
    delta = noise - eps_hat
    residual = noise + lam * delta - model(x_t + sigma * lam * delta, t)
    return residual.abs().mean() if l1 else (residual ** 2).mean()


def grads(model, loss):
    return torch.autograd.grad(loss, list(model.parameters()))


def check(loss, expected, model):
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=1e-8)  # float32 schedule tables
    for a, b in zip(grads(model, loss), grads(model, expected)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)


def test_registry():
    assert set(OBJECTIVES) == {"standard", "seed", "paper"} == set(EPOCH_PHASES)
    with pytest.raises(ValueError, match="objective"):
        get_objective("dreamier")


def test_standard():
    model, d = ToyEps(), GaussianDiffusion()
    x0, noise, t = inputs()
    loss, logs = OBJECTIVES["standard"](model, d, x0, 0, ObjectiveConfig(), t=t, noise=noise)
    check(loss, expected_standard(model, x0, noise, t), model)
    assert set(logs) >= {"loss", "loss_standard"}


@pytest.mark.parametrize("epoch", [0, 9])
def test_seed_is_standard_before_its_start_epoch(epoch):
    model, d = ToyEps(), GaussianDiffusion()
    x0, noise, t = inputs()
    loss, logs = OBJECTIVES["seed"](model, d, x0, epoch, ObjectiveConfig(), t=t, noise=noise)
    check(loss, expected_standard(model, x0, noise, t), model)
    assert logs["lambda_t_mean"].item() == 0.0


@pytest.mark.parametrize("epoch", [10, 15, 20, 40])  # the ramp min(epoch / 20, 1) below, at and past 20
@pytest.mark.parametrize("separate", [False, True])
def test_seed_dream(epoch, separate):
    model, d = ToyEps(), GaussianDiffusion()
    x0, noise, t = inputs()
    config = ObjectiveConfig(seed_separate_eps_forward=separate)
    loss, logs = OBJECTIVES["seed"](model, d, x0, epoch, config, t=t, noise=noise)
    check(loss, expected_seed(model, x0, noise, t, epoch), model)
    lam = 0.5 * t.double() / T * min(epoch / 20, 1)
    assert logs["lambda_t_mean"].item() == pytest.approx(lam.mean().item(), rel=1e-6)


@pytest.mark.parametrize("lambda_max, alpha, ramp", [(0.9, 0.4, 20.0), (0.8, 0.7, 4.0)])
def test_seed_custom_parameters(lambda_max, alpha, ramp):
    """lambda_t = lambda_max (t / T) min(epoch / ramp_epochs, 1) and the alpha weighting follow the settings
    (at epoch 3: 3/20 of the way up the default ramp, 3/4 of the way up a 4-epoch one)."""
    model, d = ToyEps(), GaussianDiffusion()
    x0, noise, t = inputs()
    config = ObjectiveConfig(dream_start_epoch=1, lambda_max=lambda_max, alpha=alpha, ramp_epochs=ramp)
    loss, logs = OBJECTIVES["seed"](model, d, x0, 3, config, t=t, noise=noise)
    check(loss, expected_seed(model, x0, noise, t, 3, lambda_max=lambda_max, alpha=alpha, ramp=ramp), model)
    lam = lambda_max * t.double() / T * min(3 / ramp, 1)
    assert logs["lambda_t_mean"].item() == pytest.approx(lam.mean().item(), rel=1e-6)


@pytest.mark.parametrize("power,l1", [(1.0, False), (0.0, False), (2.0, False), (1.0, True)])
def test_paper_dream(power, l1):
    model, d = ToyEps(dropout=0.3), GaussianDiffusion()
    x0, noise, t = inputs()
    config = ObjectiveConfig(paper_power=power, paper_loss="l1" if l1 else "mse")
    torch.manual_seed(5)
    loss, logs = OBJECTIVES["paper"](model, d, x0, 0, config, t=t, noise=noise)
    assert model.training  # the estimate's eval mode is undone
    lam = (1 - abar_table()[t]).sqrt() ** power
    assert logs["lambda_t_mean"].item() == pytest.approx(lam.mean().item(), rel=1e-5)
    torch.manual_seed(5)  # same dropout mask for the trained forward (the no-grad one runs without dropout)
    expected = expected_paper(model, x0, noise, t, power, l1)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=1e-8)
    for a, b in zip(grads(model, loss), grads(model, expected)):  # no gradient through the estimate eps_hat
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("name,epoch", [("standard", 0), ("seed", 12), ("paper", 0)])
def test_early_backward_gives_the_same_gradients(name, epoch):
    model, d = ToyEps(), GaussianDiffusion()
    x0, noise, t = inputs()
    objective = OBJECTIVES[name]
    loss, _ = objective(model, d, x0, epoch, ObjectiveConfig(), t=t, noise=noise)
    reference = grads(model, loss)
    calls = []
    loss_early, _ = objective(model, d, x0, epoch, ObjectiveConfig(), t=t, noise=noise,
                              backward=lambda term: (calls.append(1), term.backward()))
    assert not loss_early.requires_grad
    assert len(calls) == (2 if name == "seed" else 1)
    torch.testing.assert_close(loss_early, loss.detach())
    for p, g in zip(model.parameters(), reference):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_epochs_of_one_phase_compute_the_same_and_phases_differ(name):
    """epoch_phase is all an objective takes from the epoch (a CUDA graph captured in one epoch is replayed in the
    others of its phase): epochs of one phase give bitwise the same loss, logs and gradients; epochs of the seed
    objective's different phases give different losses. The start epoch and ramp are not the defaults."""
    config = ObjectiveConfig(dream_start_epoch=3, ramp_epochs=2.5, lambda_max=0.9)
    model, d = ToyEps(), GaussianDiffusion()
    x0, noise, t = inputs()
    by_phase = {}
    for epoch in range(9):
        loss, logs = OBJECTIVES[name](model, d, x0, epoch, config, t=t, noise=noise)
        result = [loss.detach(), *(logs[k] for k in sorted(logs)), *grads(model, loss)]
        by_phase.setdefault(epoch_phase(name, epoch, config), []).append(result)
    for results in by_phase.values():
        for other in results[1:]:
            for a, b in zip(other, results[0]):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    if name == "seed":  # standard (0-2), ramp 3/2.5 capped at 1 from epoch 3 on: two phases
        assert list(by_phase) == [("standard",), ("dream", 1.0)]
        config = ObjectiveConfig(dream_start_epoch=1, ramp_epochs=4.0)
        phases = [epoch_phase(name, epoch, config) for epoch in range(7)]
        assert phases == [("standard",), ("dream", 0.25), ("dream", 0.5), ("dream", 0.75)] + [("dream", 1.0)] * 3
        losses = {phase: OBJECTIVES[name](model, d, x0, epoch, config, t=t, noise=noise)[0].item()
                  for epoch, phase in enumerate(phases)}
        assert len(set(losses.values())) == 5
    else:
        assert list(by_phase) == [()]


@pytest.mark.parametrize("name,separate,expected", [
    ("seed", False, [(True, True), (True, True)]), ("seed", True, [(True, True), (False, True), (True, True)]),
    ("paper", False, [(False, False), (True, True)])])
def test_estimate_forwards_build_no_graph(name, separate, expected):
    """The forwards that only estimate eps_hat (the seed's separate one, the paper's dropout-off one) run
    under no_grad: no graph of theirs stays alive beside the trained forwards'. (grad enabled, training)
    for each forward, in order, with early backward as the trainer runs it."""
    model, d = ToyEps(dropout=0.1), GaussianDiffusion()
    x0, noise, t = inputs()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append((torch.is_grad_enabled(), module.training)))
    config = ObjectiveConfig(seed_separate_eps_forward=separate)
    OBJECTIVES[name](model, d, x0, 12, config, t=t, noise=noise, backward=lambda term: term.backward())
    assert seen == expected


def test_random_t_and_noise_when_not_given():
    model, d = ToyEps(), GaussianDiffusion()
    x0, _, _ = inputs()
    torch.manual_seed(0)
    a, _ = OBJECTIVES["standard"](model, d, x0, 0, ObjectiveConfig())
    torch.manual_seed(0)
    b, _ = OBJECTIVES["standard"](model, d, x0, 0, ObjectiveConfig())
    torch.manual_seed(1)
    c, _ = OBJECTIVES["standard"](model, d, x0, 0, ObjectiveConfig())
    assert a.item() == b.item() != c.item()


def test_seed_separate_estimate_is_its_own_dropout_forward():
    """With seed_separate_eps_forward, eps_hat comes from a second (no-grad, training-mode) forward with its own
    dropout mask, not from the trained forward's output."""
    model, d = ToyEps(dropout=0.3), GaussianDiffusion()
    x0, noise, t = inputs()
    config = ObjectiveConfig(seed_separate_eps_forward=True)
    torch.manual_seed(8)
    loss, _ = OBJECTIVES["seed"](model, d, x0, 20, config, t=t, noise=noise)
    torch.manual_seed(8)  # the same three dropout masks, in the same order
    expected = expected_seed(model, x0, noise, t, 20, separate=True)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=1e-8)


def test_objective_config_accepts_the_ends_of_its_ranges():
    config = ObjectiveConfig(lambda_max=1.0, alpha=0.0, ramp_epochs=1e-3, paper_power=0.0, paper_loss="l1")
    assert config.lambda_max == 1.0 and config.alpha == 0.0


def test_random_t_covers_every_timestep():
    """t ~ U{0 .. T-1}: with T = 2 and 64 draws both values occur (all equal has probability 2^-63)."""
    model, d = ToyEps(), GaussianDiffusion("cosine", 2)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    torch.manual_seed(0)
    OBJECTIVES["standard"](model, d, torch.rand(64, 3, 5, 7, dtype=torch.float64) * 2 - 1, 0, ObjectiveConfig())
    assert set(seen[0].tolist()) == {0, 1}


def test_paper_estimate_leaves_a_model_in_eval_mode_in_eval_mode():
    model, d = ToyEps(dropout=0.3), GaussianDiffusion()
    x0, noise, t = inputs()
    model.eval()
    OBJECTIVES["paper"](model, d, x0, 0, ObjectiveConfig(), t=t, noise=noise)
    assert not model.training


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_noise_when_not_given_is_a_standard_normal_draw(name):
    """noise ~ N(0, I) drawn as torch.randn_like(x0): the same loss as with that draw passed in."""
    model, d = ToyEps(), GaussianDiffusion()
    x0, _, t = inputs()
    torch.manual_seed(6)
    drawn, _ = OBJECTIVES[name](model, d, x0, 12, ObjectiveConfig(), t=t)
    torch.manual_seed(6)
    given, _ = OBJECTIVES[name](model, d, x0, 12, ObjectiveConfig(), t=t, noise=torch.randn_like(x0))
    assert drawn.item() == given.item()
