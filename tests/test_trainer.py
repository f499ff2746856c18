"""The trainer's step: early backward of the seed objective, out-of-memory recovery, the memory-budget
hook, logs and sample grids, and (on a GPU) eager vs Triton loss trajectories.

Models: the tiny UNet at 8x8 with 16 base channels, batch 4 (the GPU-only backend test: 32x32, 32 base
channels, batch 16).

Tolerances (fp32 throughout):
  early backward vs one graph, gradients      rtol 1e-5, atol 1e-7   (only the summation order differs)
  micro-batches vs whole batch, weights       rtol 1e-4, atol 2e-5   (3 Adam steps: lr * m / sqrt(v) turns
                                                                      fp-level gradient differences in near-zero
                                                                      entries into up to ~2e-6 here)
  eager vs triton, loss per step (GPU)        rtol 2e-3               (different GroupNorm/attention kernels)
"""
import contextlib
import json
import sys
import types

import pytest
import torch

from dream.errors import DreamError
from dream.memory import plan_step
from dream.objectives import ObjectiveConfig, seed
from dream.train import TrainConfig, Trainer, TrainingAborted, divisor_at_most
from conftest import ON_GPU

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

GRAD_TOL = dict(rtol=1e-5, atol=1e-7)
ACCUMULATION_TOL = dict(rtol=1e-4, atol=2e-5)
BACKEND_LOSS_RTOL = 2e-3


def fake_memory(choose_micro_batch, format_size=lambda size: f"{size} bytes"):
    """dream.memory as the trainer's memory manager uses it, its estimator replaced by choose_micro_batch."""
    return types.SimpleNamespace(plan_step=plan_step, choose_micro_batch=choose_micro_batch, format_size=format_size)


def small_config(run_dir, **overrides) -> TrainConfig:
    config = dict(run_dir=str(run_dir), preset="tiny",
                  model_overrides={"image_size": 8, "base_channels": 16, "dropout": 0.0},
                  objective_config={"dream_start_epoch": 1, "ramp_epochs": 2}, data_count=8, batch_size=4,
                  epochs=2, sample_every=0, progress=False, log_every=1, checkpoint_every=0, device="cpu")
    config.update(overrides)
    return TrainConfig(**config)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def setup_records(trainer):
    """The log records a trainer made during its setup: written when its run starts (Trainer.start_log)."""
    return list(trainer.pending_records)


# ----------------------------------------------------------------------------------------------
# the seed objective's step: each term backpropagated as soon as it is built
def gradients(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def test_seed_objective_early_backward_gives_the_single_graph_gradients(tmp_path):
    trainer = Trainer(small_config(tmp_path, model_overrides={"image_size": 8, "base_channels": 16, "dropout": 0.1}))
    trainer.epoch = 2  # DREAM phase: lambda_t > 0, two forwards with gradients
    model, diffusion = trainer.model, trainer.diffusion
    with torch.no_grad():  # the zero-initialised output conv would stop every gradient before it
        model.conv_out.weight.normal_(0, 0.05)
    x0 = next(trainer.batches.epoch(0))
    t, noise = trainer.draw_inputs(x0)
    config = trainer.objective_config

    trainer.reseed()  # same dropout masks in both computations: backward draws no random numbers
    loss, logs = seed(model, diffusion, x0, trainer.epoch, config, t=t, noise=noise)
    assert loss.requires_grad and float(logs["lambda_t_mean"]) > 0
    model.zero_grad(set_to_none=True)
    loss.backward()
    one_graph = gradients(model)

    seen = []
    objective = trainer.objective

    def spy(*args, backward=None, **kwargs):
        seen.append(backward)
        return objective(*args, backward=backward, **kwargs)

    trainer.objective = spy
    trainer.reseed()
    logs_early = trainer.accumulate_gradients(x0, t, noise)
    assert len(seen) == 1 and callable(seen[0]), "the trainer must hand the objective a backward callable"
    assert torch.allclose(logs_early["loss"], loss.detach(), **GRAD_TOL)
    for name, (a, b) in zip([n for n, _ in model.named_parameters()], zip(gradients(model), one_graph)):
        assert torch.allclose(a, b, **GRAD_TOL), f"gradient of {name} differs"
    assert all(g.abs().max() > 0 for g in one_graph[:4]), "gradients must reach the first layers"


def test_seed_objective_frees_the_first_graph_before_the_second_forward():
    """With backward given, the standard term's saved activations are released before the rectified
    forward runs: at most one forward graph is alive."""
    torch.manual_seed(0)
    from dream.diffusion import GaussianDiffusion
    from dream.model import build_unet

    model = build_unet("tiny", image_size=8, base_channels=16, dropout=0.0)
    diffusion = GaussianDiffusion("cosine", 1000)
    x0 = torch.randn(3, 3, 8, 8)
    alive, peak = [0], [0]

    def pack(tensor):
        alive[0] += 1
        peak[0] = max(peak[0], alive[0])
        return _Released(tensor, alive)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor):
        single = [0]
        peak[0] = alive[0] = 0
        loss, _ = seed(model, diffusion, x0, 5, ObjectiveConfig(dream_start_epoch=0), t=torch.tensor([10, 500, 900]),
                       noise=torch.randn_like(x0))
        single[0] = peak[0]
        loss.backward()
        peak[0] = alive[0] = 0
        seed(model, diffusion, x0, 5, ObjectiveConfig(dream_start_epoch=0), t=torch.tensor([10, 500, 900]),
             noise=torch.randn_like(x0), backward=lambda term: term.backward())
        early = peak[0]
    assert early < 0.6 * single[0], (early, single[0])


class _Released:
    """A saved tensor that decrements the live count when autograd frees it."""

    def __init__(self, tensor, alive):
        self.tensor, self.alive = tensor, alive

    def __del__(self):
        self.alive[0] -= 1


# ----------------------------------------------------------------------------------------------
# CUDA out of memory inside a step
CPU_ALLOCATOR_ERROR = "[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: you " \
                      "tried to allocate 2147483648 bytes. Error code 12 (Cannot allocate memory)"


def inject_out_of_memory(trainer, above: int, error=None):
    """The objective raises CUDA OOM (or `error`) in its first backward for micro-batches larger than `above`,
    after gradients were partly accumulated."""
    objective = trainer.objective
    calls = []

    def failing(model, diffusion, x0, epoch, config, t=None, noise=None, backward=None):
        calls.append(x0.shape[0])
        if x0.shape[0] <= above:
            return objective(model, diffusion, x0, epoch, config, t=t, noise=noise, backward=backward)

        def backward_then_fail(term):
            backward(term)
            raise error or torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

        return objective(model, diffusion, x0, epoch, config, t=t, noise=noise, backward=backward_then_fail)

    trainer.objective = failing
    return calls


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_step(tmp_path):
    steps = 3  # epoch 1 is in the DREAM phase
    reference = Trainer(small_config(tmp_path / "micro2", micro_batch=2, max_steps=steps))
    reference.run()
    whole = Trainer(small_config(tmp_path / "whole", max_steps=steps))
    whole.run()

    trainer = Trainer(small_config(tmp_path / "oom", max_steps=steps, checkpoint_every=1))
    calls = inject_out_of_memory(trainer, above=2)
    result = trainer.run()
    assert result["step"] == steps and result["micro_batch"] == 2 and trainer.skipped_steps == 0
    assert calls == [4, 2, 2] + [2, 2] * (steps - 1)
    events = [r for r in records(tmp_path / "oom") if r.get("event") == "out_of_memory"]
    assert len(events) == 1 and events[0]["micro_batch"] == 2 and events[0]["step"] == 0
    assert [r["micro_batch"] for r in records(tmp_path / "oom") if "loss" in r] == [2] * steps
    # the redone step is the step a micro-batch of 2 computes: same t, noise and data
    for (name, a), b in zip(trainer.model.state_dict().items(), reference.model.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs from the micro-batch-2 run"
    # and, to fp tolerance, the step of the whole batch at once
    for (name, a), b in zip(trainer.model.state_dict().items(), whole.model.state_dict().values()):
        assert torch.allclose(a, b, **ACCUMULATION_TOL), f"{name} differs from the whole-batch run"
    assert any(not torch.equal(a, b) for a, b in zip(trainer.model.parameters(), whole.model.parameters()))

    resumed = Trainer(small_config(tmp_path / "oom", max_steps=steps, checkpoint_every=1))
    resumed.resume()
    assert resumed.micro_batch == 2, "a lowered micro-batch must survive a resume of the same command"


@pytest.mark.parametrize("error", [RuntimeError(CPU_ALLOCATOR_ERROR), MemoryError()])
def test_the_hosts_out_of_memory_halves_the_micro_batch_too(tmp_path, error):
    """On a CPU device the allocator's failure (or Python's MemoryError) is an out-of-memory error like CUDA's: the
    micro-batch halves and the step is redone; at micro-batch 1 the run stops in one line, with an emergency
    checkpoint and a hint, its cause's traceback not shown. Any other RuntimeError is not taken for one."""
    trainer = Trainer(small_config(tmp_path / "halved", max_steps=2))
    calls = inject_out_of_memory(trainer, above=2, error=error)
    assert trainer.run()["micro_batch"] == 2 and calls == [4, 2, 2, 2, 2]
    event = next(r for r in records(tmp_path / "halved") if r.get("event") == "out_of_memory")
    assert event["reason"] == (CPU_ALLOCATOR_ERROR if isinstance(error, RuntimeError) else "MemoryError: out of memory")

    trainer = Trainer(small_config(tmp_path / "stopped", max_steps=2))
    inject_out_of_memory(trainer, above=0, error=error)
    with pytest.raises(TrainingAborted, match=r"^OutOfMemoryError at step 0 \(epoch 0\): .*; already at micro-batch "
                                              r"1 \(--checkpointing all recomputes activations instead of keeping "
                                              r"them\); emergency checkpoint .* saved\.") as caught:
        trainer.run()
    assert not caught.value.show_cause

    trainer = Trainer(small_config(tmp_path / "other", max_steps=2))
    inject_out_of_memory(trainer, above=0, error=RuntimeError("shape mismatch (injected)"))
    with pytest.raises(TrainingAborted, match=r"^RuntimeError at step 0 .*: shape mismatch") as caught:
        trainer.run()
    assert caught.value.show_cause


@pytest.mark.parametrize("checkpointing, graphs_with_dropout, hinted", [
    ("none", False, True),
    ("all", False, False),  # already recomputing everything
    ("none", True, False),  # a captured step with dropout cannot run "all" (graph_safe_policies)
])
def test_out_of_memory_at_micro_batch_one_names_checkpointing_only_where_it_can_run(tmp_path, checkpointing,
                                                                                   graphs_with_dropout, hinted):
    dropout = 0.1 if graphs_with_dropout else 0.0
    trainer = Trainer(small_config(tmp_path, micro_batch=1, checkpointing=checkpointing,
                                   model_overrides={"image_size": 8, "base_channels": 16, "dropout": dropout}))
    trainer.config.cuda_graphs = graphs_with_dropout  # (a CPU trainer refuses it; shrink_micro_batch reads it)
    with pytest.raises(torch.cuda.OutOfMemoryError) as raised:
        trainer.shrink_micro_batch("CUDA out of memory (injected)")
    assert str(raised.value) == "CUDA out of memory (injected); already at micro-batch 1" + (
        " (--checkpointing all recomputes activations instead of keeping them)" if hinted else "")


def test_an_optimizer_state_cut_short_by_out_of_memory_is_made_again_not_kept(tmp_path):
    """AdamW makes a parameter's state tensor by tensor in its first step: out of memory between two of them (a
    captured step's warm-up runs the optimizer inside the step) leaves a partial state. Shrinking the micro-batch
    drops it, so the redone step makes it whole (before: a KeyError there, or a checkpoint keeping it)."""
    trainer = Trainer(small_config(tmp_path, max_steps=1, micro_batch=4))
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    whole, partial = params[0], params[1]
    trainer.optimizer.state[whole] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(whole),
                                      "exp_avg_sq": torch.zeros_like(whole)}
    trainer.optimizer.state[partial] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(partial)}
    trainer.shrink_micro_batch("CUDA out of memory (injected)")
    assert trainer.micro_batch == 2
    assert set(trainer.optimizer.state[whole]) == {"step", "exp_avg", "exp_avg_sq"}
    assert partial not in trainer.optimizer.state
    trainer.run()  # the step makes the dropped state again
    assert set(trainer.optimizer.state[partial]) == {"step", "exp_avg", "exp_avg_sq"}


def test_out_of_memory_at_micro_batch_one_stops_with_an_emergency_checkpoint(tmp_path):
    trainer = Trainer(small_config(tmp_path, max_steps=2))
    calls = inject_out_of_memory(trainer, above=0)
    with pytest.raises(TrainingAborted, match=r"OutOfMemoryError at step 0 .*already at micro-batch 1.*"
                                              r"emergency checkpoint .*ckpt-000000000\.pt saved"):
        trainer.run()
    assert calls == [4, 2, 1]


@pytest.mark.parametrize("micro,expected", [(4, "rerun with --micro-batch 2"), (1, "already at micro-batch 1")])
def test_out_of_memory_under_torchrun_names_a_smaller_micro_batch_or_says_there_is_none(tmp_path, micro, expected):
    trainer = Trainer(small_config(tmp_path, micro_batch=micro))
    trainer.dist = types.SimpleNamespace(enabled=True, world_size=2)  # what shrink_micro_batch reads of it
    with pytest.raises(torch.cuda.OutOfMemoryError, match=expected) as raised:
        trainer.shrink_micro_batch("CUDA out of memory (injected)")
    assert "--micro-batch 1" not in str(raised.value) and trainer.micro_batch == micro


@pytest.mark.parametrize("n,limit,expected", [(4, 3, 2), (12, 5, 4), (7, 6, 1), (8, 8, 8), (6, 0, 1)])
def test_divisor_at_most(n, limit, expected):
    assert divisor_at_most(n, limit) == expected


def test_one_step_is_the_recipe_written_out(tmp_path):
    """One trainer step in the seed objective's DREAM phase against the same step written out from the
    seed's formulas: lambda_t = lambda_max (t/T) min(epoch/ramp, 1), x0_hat = clamp(predict_x0(x_t,
    stop_grad(eps_hat)), -1, 1), x_t' = q_sample(lambda x0_hat + (1 - lambda) x0, t, the same noise),
    loss = alpha MSE + (1 - alpha) MSE'; gradients clipped to norm 1 (and clipping active); AdamW's first
    step p (1 - lr wd) - lr g / (|g| + eps); then EMA s d + p (1 - d)."""
    import copy

    import torch.nn.functional as F

    config = small_config(tmp_path, model_overrides={"image_size": 8, "base_channels": 16, "dropout": 0.0},
                          objective_config={"dream_start_epoch": 1, "ramp_epochs": 4}, lr=1e-3, weight_decay=0.05,
                          ema_decay=0.99)
    trainer = Trainer(config)
    trainer.epoch = 3  # lambda ramp at 3/4
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # off the zero-initialised head, and an EMA that differs from the weights
        for param in trainer.model.parameters():
            param.add_(torch.randn(param.shape, generator=g) * 0.1)
        trainer.ema.shadow = [s + torch.randn(s.shape, generator=g) * 0.01 for s in trainer.ema.shadow]
    x0 = next(trainer.batches.epoch(trainer.epoch))
    t, noise = trainer.draw_inputs(x0)  # the step's own t and noise (drawn from (seed, step))

    model, diffusion, objective = copy.deepcopy(trainer.model), trainer.diffusion, trainer.objective_config
    x_t = diffusion.q_sample(x0, t, noise)
    eps = model(x_t, t)
    lam = (objective.lambda_max * (t.float() / diffusion.num_timesteps) * min(3 / 4, 1)).view(-1, 1, 1, 1)
    x0_hat = diffusion.predict_start_from_noise(x_t, t, eps.detach()).clamp(-1, 1)
    x_t_rect = diffusion.q_sample(lam * x0_hat + (1 - lam) * x0, t, noise)
    loss = objective.alpha * F.mse_loss(eps, noise) + (1 - objective.alpha) * F.mse_loss(model(x_t_rect, t), noise)
    loss.backward()
    norm = torch.cat([q.grad.flatten().double() for q in model.parameters()]).norm().float()  # (fp32 norm() of
    # 860k elements is off by ~4e-5 on the CPU; clip_grad_norm_ takes a norm per tensor, then of the norms)
    assert norm > 1.5, "the test needs clipping to be active"
    clipped = [q.grad / (norm + 1e-6) for q in model.parameters()]
    before = [q.detach().clone() for q in trainer.model.parameters()]
    shadow_before = [s.clone() for s in trainer.ema.shadow]

    logs = trainer.train_step(x0)
    assert logs["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
    assert logs["grad_norm"].item() == pytest.approx(norm.item(), rel=1e-5)
    for param, expected in zip(trainer.model.parameters(), clipped):
        torch.testing.assert_close(param.grad, expected, **GRAD_TOL)
    for param, old, shadow_old in zip(trainer.model.parameters(), before, shadow_before):
        grad = param.grad
        expected = old * (1 - config.lr * config.weight_decay) - config.lr * grad / (grad.abs() + 1e-8)
        torch.testing.assert_close(param.detach(), expected, rtol=1e-6, atol=1e-7)
    for shadow, shadow_old, param in zip(trainer.ema.shadow, shadow_before, trainer.model.parameters()):
        torch.testing.assert_close(shadow, shadow_old * 0.99 + param.detach() * 0.01, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------


def test_cli_memory_budget_flag(capsys):
    from dream.cli import build_parser

    args = build_parser().parse_args(["train", "--memory-budget", "6.8GB", "--max-bad-steps", "7"])
    assert args.memory_budget == 6_800_000_000 and args.max_bad_steps == 7
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--memory-budget", "lots"])
    assert "memory size 'lots'" in capsys.readouterr().err


def test_memory_budget_asks_dream_memory_for_the_micro_batch(tmp_path, monkeypatch):
    asked = {}

    def choose_micro_batch(config, budget_bytes, **fields):
        asked.update(fields, config=config, budget_bytes=budget_bytes)
        return 3

    monkeypatch.setitem(sys.modules, "dream.memory", fake_memory(choose_micro_batch))
    trainer = Trainer(small_config(tmp_path, memory_budget=6_800_000_000))
    assert trainer.micro_batch == 2  # the largest divisor of the batch not above the answer
    assert asked["budget_bytes"] == 6_800_000_000 and asked["batch_size"] == 4 and asked["precision"] == "fp32"
    assert asked["model_overrides"] == trainer.model_config and asked["data_images"] == 8
    assert trainer.config.micro_batch is None


def test_an_explicit_memory_budget_caps_the_device_for_the_whole_run(tmp_path, monkeypatch):
    import dream.memory

    held = []

    @contextlib.contextmanager
    def cuda_memory_cap(budget_bytes, device):
        held.append((budget_bytes, torch.device(device)))
        yield 0.05
        held.append("released")

    monkeypatch.setattr(dream.memory, "cuda_memory_cap", cuda_memory_cap)
    monkeypatch.setattr(Trainer, "train_epochs", lambda self, resume: held.append(("training", resume)) or {})
    trainer = Trainer(small_config(tmp_path, memory_budget=10**12))
    trainer.run("ckpt.pt")
    assert held == [(10**12, torch.device("cpu")), ("training", "ckpt.pt"), "released"]
    assert [r["event"] for r in setup_records(trainer)] == ["memory_budget", "memory_cap"]


def test_memory_budget_with_the_real_estimator(tmp_path):
    trainer = Trainer(small_config(tmp_path, memory_budget=10**12))
    assert trainer.micro_batch == 4
    assert [r["event"] for r in setup_records(trainer)] == ["memory_budget"]


def test_a_budget_nothing_fits_is_refused_alike_on_every_rank(tmp_path):
    """The estimate of one step against an explicit budget is the same on every rank: rank 0 alone says so."""
    with pytest.raises(DreamError, match="even a micro-batch of 1 needs .* the last that auto tries; use a smaller "
                                         "model") as refusal:
        Trainer(small_config(tmp_path, memory_budget=1000, checkpointing="auto"))
    assert refusal.value.same_on_every_rank


def test_setup_notes_of_a_resumed_run_carry_the_step_it_resumes_at(tmp_path):
    """A note made while the run is set up (the memory budget's) is logged where the run starts: after a resume,
    at the checkpoint's step, so the log's steps never go back."""
    Trainer(small_config(tmp_path, memory_budget=10**12, max_steps=2, checkpoint_every=1)).run()
    Trainer(small_config(tmp_path, memory_budget=10**12, max_steps=3, checkpoint_every=1)).run()
    steps = [r["step"] for r in records(tmp_path)]
    assert steps == sorted(steps) and steps[-1] == 3, steps
    assert [r["step"] for r in records(tmp_path) if r.get("event") == "memory_budget"] == [0, 2]


def test_an_explicit_micro_batch_is_kept_and_checked_against_the_budget(tmp_path, capsys):
    """--micro-batch wins over --memory-budget; the estimate of its step is reported, with a warning when
    over the budget."""
    from dream.memory import StepSpec, estimate_step_memory

    trainer = Trainer(small_config(tmp_path / "a", memory_budget=10**12, micro_batch=2))
    assert trainer.micro_batch == 2
    [within] = setup_records(trainer)
    spec = StepSpec.from_config(trainer.config, **trainer.step_spec_fields("none"), micro_batch=2)
    assert within["estimated_peak_bytes"] == estimate_step_memory(spec).peak_bytes
    assert within["over_budget"] is False and "within --memory-budget" in capsys.readouterr().err

    over = Trainer(small_config(tmp_path / "b", memory_budget=within["estimated_peak_bytes"] - 1, micro_batch=2))
    assert over.micro_batch == 2
    [record] = setup_records(over)
    assert record["over_budget"] is True and record["estimated_peak_bytes"] == within["estimated_peak_bytes"]
    assert "warning: --micro-batch 2: the step is estimated at" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# progress: JSONL log every N steps, a sample grid every M epochs
def test_log_every_n_steps_and_a_grid_every_m_epochs(tmp_path):
    from PIL import Image

    trainer = Trainer(small_config(tmp_path, data_count=12, epochs=3, log_every=2, sample_every=2, sample_count=4,
                                   sample_steps=2))
    ema_before = [s.clone() for s in trainer.ema.shadow]
    result = trainer.run()
    logged = [r for r in records(tmp_path) if "loss" in r]
    assert [r["step"] for r in logged] == [2, 3, 4, 6, 8, 9]  # every 2 steps and at each epoch's end (3 steps)
    for record in logged:
        assert {"loss", "grad_norm", "images_per_s", "micro_batch", "skipped_steps", "epoch"} <= set(record)
        assert record["images_per_s"] > 0
    grids = sorted(p.name for p in (tmp_path / "samples").glob("*.png"))
    assert grids == ["grid-000000006.png", "grid-000000009.png"]  # after epoch 2, and at the end
    assert Image.open(tmp_path / "samples" / grids[0]).size == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)
    assert result["grid"].endswith("grid-000000009.png")
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, trainer.ema.shadow))


def test_peak_cuda_memory_is_logged_in_gb_as_the_memory_budget(monkeypatch):
    """gpu_mem_gb is in GB (10^9 bytes), the unit of --memory-budget and dream memory."""
    logged = []
    stub = types.SimpleNamespace(step=1, epoch=0, micro_batch=2, skipped_steps=0, device=torch.device("cuda"),
                                 log=logged.append)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 6_800_000_000)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    bar = types.SimpleNamespace(set_postfix=lambda postfix: None)
    Trainer.report(stub, {"loss": torch.tensor(1.0), "skipped": 0, "logged_steps": 1}, 2, 1.0, bar)
    assert logged[0]["gpu_mem_gb"] == pytest.approx(6.8)


def test_the_last_step_of_a_max_steps_run_is_logged(tmp_path):
    Trainer(small_config(tmp_path, data_count=12, epochs=3, log_every=5, max_steps=4)).run()
    assert [r["step"] for r in records(tmp_path) if "loss" in r] == [3, 4]  # epoch 0's end, then the last step


# ----------------------------------------------------------------------------------------------
# no host sync per step: the device decides a skip, the host reads each step's flags a step later
def steady_steps(trainer, steps):
    """The loop's per-step work (next batch, train_step, the log window) for `steps` steps after two warm-up
    steps; a generator that yields before the steady steps start, then their log window."""
    from dream.train import LogWindow

    batches, window = trainer.batches.epoch(0), LogWindow()
    trainer.epoch = 2  # the DREAM phase: two forwards a step
    for _ in range(2):
        window.add(trainer.train_step(next(batches)))
    yield
    for _ in range(steps):
        window.add(trainer.train_step(next(batches)))
    yield window


class ScalarReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operators that read a tensor's value on the host (item(), float(), bool())."""
    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
             torch.ops.aten.item.default}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.reads.append(func)
        return func(*args, **(kwargs or {}))


def test_a_steady_training_step_reads_no_tensor_value_on_the_host(tmp_path):
    """CPU: past the warm-up, a step with its batch and log window calls no item()/float()/bool() on a tensor
    (each would be a host sync on a GPU). The flags the host reads a step later come from a copy, read whole."""
    trainer = Trainer(small_config(tmp_path, data_count=24, precision="fp32"))
    run = steady_steps(trainer, steps=3)
    next(run)
    with ScalarReads() as mode:
        window = next(run)
    assert mode.reads == []
    assert window.values()["logged_steps"] == 5
    assert trainer.counted_step == trainer.step - 1 and len(trainer.pending_steps) == 1


@pytest.mark.skipif(not ON_GPU, reason="CUDA's sync debug mode needs a GPU")
@pytest.mark.parametrize("data_on", ["device", "host"])
def test_steady_training_steps_make_no_host_sync_on_cuda(tmp_path, data_on):
    """CUDA, the default settings (triton backend, bf16, channels_last): past the warm-up, the steps raise no
    synchronizing call under torch.cuda.set_sync_debug_mode("error"): the host queues step s + 1 while the
    device runs step s."""
    trainer = Trainer(small_config(tmp_path, data_count=24, device="cuda", data_on=data_on))
    run = steady_steps(trainer, steps=3)
    next(run)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        window = next(run)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert window.values()["logged_steps"] == 5 and trainer.images_on_host is (data_on == "host")


# ----------------------------------------------------------------------------------------------
# eager vs Triton kernels in the trainer (on a CPU through the Triton interpreter, at a tiny size)
def test_eager_and_triton_trainers_follow_the_same_loss_trajectory(tmp_path, exact_fp32, monkeypatch):
    monkeypatch.setattr("dream.train.use_fast_math", lambda: None)  # TF32 would blur the comparison on a GPU
    if ON_GPU:
        overrides, size = {"image_size": 32, "dropout": 0.0}, dict(data_count=64, batch_size=16, epochs=3)
        steps, device = 12, "cuda"
    else:  # 8x8 images keep the interpreter's program count small; one batch an epoch: step 2 is a DREAM step
        overrides, size = {"image_size": 8, "dropout": 0.0}, dict(data_count=2, batch_size=2, max_steps=2)
        steps, device = 2, "cpu"
    losses = {}
    for backend in ("eager", "triton"):
        trainer = Trainer(small_config(tmp_path / backend, model_overrides=overrides, backend=backend,
                                       precision="fp32", device=device, **size))
        trainer.run()
        losses[backend] = [r["loss"] for r in records(tmp_path / backend) if "loss" in r]
    assert len(losses["eager"]) == steps
    assert losses["eager"] == pytest.approx(losses["triton"], rel=BACKEND_LOSS_RTOL)


@pytest.mark.parametrize("backend", ["eager"] + (["triton"] if ON_GPU else []))  # CPU: the kernels' own tests
def test_channels_last_trainer_step_gives_the_nchw_loss_and_gradients(tmp_path, exact_fp32, backend, monkeypatch):
    """channels_last (the default on CUDA) changes the layout only: a DREAM step's loss and gradients match NCHW."""
    monkeypatch.setattr("dream.train.use_fast_math", lambda: None)  # TF32 would blur the comparison on a GPU
    results = {}
    for channels_last in (False, True):
        trainer = Trainer(small_config(tmp_path / str(channels_last), backend=backend, precision="fp32",
                                       device="cuda" if ON_GPU else "cpu", channels_last=channels_last))
        assert trainer.channels_last is channels_last
        assert trainer.model.conv_in.weight.is_contiguous(memory_format=torch.channels_last) is channels_last
        trainer.epoch = 2  # DREAM phase: two forwards with gradients
        with torch.no_grad():  # the zero-initialised output conv would stop every gradient before it
            trainer.model.conv_out.weight.copy_(torch.randn(trainer.model.conv_out.weight.shape,
                                                            generator=torch.Generator().manual_seed(3)) * 0.05)
        x0 = next(trainer.batches.epoch(0))
        t, noise = trainer.draw_inputs(x0)
        if channels_last:
            x0, noise = (v.contiguous(memory_format=torch.channels_last) for v in (x0, noise))
        trainer.reseed()
        logs = trainer.accumulate_gradients(x0, t, noise)
        results[channels_last] = float(logs["loss"]), gradients(trainer.model)
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    for a, b in zip(results[True][1], results[False][1]):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-9
    assert all(g.abs().max() > 0 for g in results[False][1][:4]), "gradients must reach the first layers"


def test_a_run_resumed_in_the_other_layout_continues(tmp_path):
    """A run checkpointed in NCHW and resumed in channels_last (the default on CUDA since): the AdamW moments
    take the parameters' strides, and the run continues as it would have in NCHW."""
    common = dict(model_overrides={"image_size": 8, "dropout": 0.0}, data_count=4, batch_size=2, epochs=2)
    Trainer(small_config(tmp_path / "resumed", max_steps=2, channels_last=False, **common)).run()
    resumed = Trainer(small_config(tmp_path / "resumed", max_steps=4, channels_last=True, **common))
    resumed.run()
    for param, state in resumed.optimizer.state.items():
        assert state["exp_avg"].stride() == param.stride() and state["exp_avg_sq"].stride() == param.stride()
    assert resumed.model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    recorded = json.loads((tmp_path / "resumed" / "config.json").read_text())  # what ran, "auto"s resolved
    assert (recorded["channels_last"], recorded["backend"], recorded["precision"]) == (True, "eager", "fp32")
    Trainer(small_config(tmp_path / "straight", max_steps=4, channels_last=False, **common)).run()
    losses = [[r["loss"] for r in records(tmp_path / name) if "loss" in r] for name in ("resumed", "straight")]
    assert len(losses[1]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_channels_last_by_default_on_cuda_only():
    from dream.model import resolve_channels_last

    assert resolve_channels_last(None, "cuda:0") and not resolve_channels_last(None, "cpu")
    assert resolve_channels_last(True, "cpu") and not resolve_channels_last(False, "cuda")


def test_auto_checkpointing_picks_the_least_recomputation_that_fits(tmp_path, monkeypatch):
    asked = []

    def choose_micro_batch(config, budget_bytes, **fields):  # the whole batch (4) fits from "resblocks" on
        asked.append(fields["checkpointing"])
        return 4 if fields["checkpointing"] in ("resblocks", "all") else 2

    monkeypatch.setitem(sys.modules, "dream.memory", fake_memory(choose_micro_batch))
    trainer = Trainer(small_config(tmp_path, memory_budget=6_800_000_000, checkpointing="auto"))
    assert asked == ["none", "attention", "resblocks"]
    assert trainer.micro_batch == 4 and trainer.model.checkpointing == "resblocks"
    assert trainer.resolved_config()["checkpointing"] == "resblocks"  # config.json: the policy, not "auto"
    fixed = Trainer(small_config(tmp_path / "fixed", memory_budget=6_800_000_000, checkpointing="attention"))
    assert asked[3:] == ["attention"] and fixed.micro_batch == 2 and fixed.model.checkpointing == "attention"
    plain = Trainer(small_config(tmp_path / "plain", checkpointing="auto"))  # CPU, no budget: no estimate
    assert len(asked) == 4 and plain.model.checkpointing == "none"
    assert plain.resolved_config()["checkpointing"] == "none"
    assert setup_records(plain)[-1] == {"event": "memory_budget", "step": 0, "epoch": 0, "checkpointing": "none"}


def test_auto_checkpointing_tries_recomputed_norms_with_the_triton_backend_only(tmp_path, monkeypatch):
    from dream.errors import DreamError

    asked = []

    def choose_micro_batch(config, budget_bytes, **fields):  # the whole batch (4) fits from "norms" on
        asked.append((fields["backend"], fields["checkpointing"]))
        return 4 if fields["checkpointing"] != "none" else 2

    monkeypatch.setitem(sys.modules, "dream.memory", fake_memory(choose_micro_batch))
    overrides = {"image_size": 8, "base_channels": 16, "dropout": 0.0, "num_heads": 2}
    trainer = Trainer(small_config(tmp_path, memory_budget=6_800_000_000, checkpointing="auto", backend="triton",
                                   model_overrides=overrides))
    assert asked == [("triton", "none"), ("triton", "norms")] and trainer.model.checkpointing == "norms"
    assert trainer.model.down[0].blocks[0].recompute_norms
    with pytest.raises(DreamError, match="--checkpointing norms recomputes the fused Triton norm: it needs --backend "
                                         "triton, not eager"):
        Trainer(small_config(tmp_path / "eager", checkpointing="norms"))


def test_auto_checkpointing_goes_on_past_a_policy_where_nothing_fits(tmp_path, monkeypatch):
    """Under "none" not even a micro-batch of 1 fits the budget: auto tries the policies that recompute
    more instead of giving up (it used to stop with the "use activation checkpointing" error)."""
    from dream.errors import DreamError

    asked = []

    def choose_micro_batch(config, budget_bytes, **fields):
        asked.append(fields["checkpointing"])
        if fields["checkpointing"] in ("none", "attention"):
            raise DreamError("even a micro-batch of 1 needs an estimated ... use activation checkpointing")
        return 2

    monkeypatch.setitem(sys.modules, "dream.memory", fake_memory(choose_micro_batch))
    trainer = Trainer(small_config(tmp_path, memory_budget=20_000_000, checkpointing="auto"))
    assert asked == ["none", "attention", "resblocks", "all"]  # nothing fits the whole batch: the largest micro-batch
    assert trainer.micro_batch == 2 and trainer.model.checkpointing == "resblocks"  # ("all" recomputes more for it)

    def nothing_fits(config, budget_bytes, **fields):
        raise DreamError("even a micro-batch of 1 needs an estimated ... use activation checkpointing")

    monkeypatch.setitem(sys.modules, "dream.memory", fake_memory(nothing_fits, str))
    with pytest.raises(DreamError, match="even a micro-batch of 1"):  # nothing fits at all: it says so
        Trainer(small_config(tmp_path / "none", memory_budget=20_000_000, checkpointing="auto"))


@pytest.mark.parametrize("micro_of,expected", [
    ({"none": 1, "attention": 2, "resblocks": 2, "all": 2}, (2, "attention")),  # equal micro-batch: less recomputed
    ({"none": 1, "attention": 1, "resblocks": 1, "all": 2}, (2, "all")),  # a larger micro-batch wins
])
def test_auto_checkpointing_without_a_whole_batch_fit_picks_the_largest_micro_batch_first_in_order(
        tmp_path, monkeypatch, micro_of, expected):
    """No policy fits the whole batch (4): the largest micro-batch, and of the policies that reach it the one
    that recomputes least (the first in the order none, attention, resblocks, all)."""
    def choose_micro_batch(config, budget_bytes, **fields):
        return micro_of[fields["checkpointing"]]

    monkeypatch.setitem(sys.modules, "dream.memory", fake_memory(choose_micro_batch))
    trainer = Trainer(small_config(tmp_path, memory_budget=20_000_000, checkpointing="auto"))
    assert (trainer.micro_batch, trainer.model.checkpointing) == expected
    assert setup_records(trainer)[-1]["checkpointing"] == expected[1]


def _placing_trainer(data_on="auto"):
    """What Trainer.micro_batch_for_budget reads, for a trainer on a CUDA device with 10 images (rank batch 4)."""
    notes = []
    stub = types.SimpleNamespace(
        config=types.SimpleNamespace(data_on=data_on, checkpointing="auto", memory_budget=1000, cuda_graphs=False),
        device=torch.device("cuda"), backend="eager", checkpointing="none", rank_batch=4, precision="fp32",
        images_on_host=data_on == "host", model_config=None, objective_config=None, notes=notes,
        batches=types.SimpleNamespace(images=torch.zeros(10, 3, 2, 2, dtype=torch.uint8)),
        model=types.SimpleNamespace(set_checkpointing=lambda policy: None),
        note=lambda text, **fields: notes.append((text, fields)))
    stub.step_spec_fields = types.MethodType(Trainer.step_spec_fields, stub)
    return stub


@pytest.mark.parametrize("with_images,without,expected", [
    # (micro-batch per policy with the 10 images on the device, without them) -> (micro, policy, on the host)
    ({"none": 4}, {}, (4, "none", False)),  # the best there is with them: not searched without
    ({"none": 2, "attention": 2, "resblocks": 4}, {"none": 4}, (4, "none", True)),  # less recomputation
    ({"none": 2, "attention": 2, "resblocks": 2, "all": 2}, {"none": 4}, (4, "none", True)),  # larger micro-batch
    ({"none": 2, "attention": 4}, {"none": 2, "attention": 4}, (4, "attention", False)),  # as good: the device
    ({"all": 1}, {"resblocks": 1}, (1, "resblocks", True)),
    ({}, {"all": 2}, (2, "all", True)),  # nothing fits with them
])
def test_data_on_auto_keeps_the_images_on_the_host_only_where_that_fits_more(monkeypatch, with_images, without,
                                                                            expected):
    asked = []

    def choose_micro_batch(config, budget_bytes, **fields):
        asked.append(fields["data_images"])
        micro = (with_images if fields["data_images"] else without).get(fields["checkpointing"])
        if micro is None:
            raise DreamError("even a micro-batch of 1 needs an estimated ... use activation checkpointing")
        return micro

    monkeypatch.setitem(sys.modules, "dream.memory", fake_memory(choose_micro_batch))
    trainer = _placing_trainer()
    micro = Trainer.micro_batch_for_budget(trainer, 1000)
    assert (micro, trainer.checkpointing, trainer.images_on_host) == expected
    assert set(asked) == ({10} if expected == (4, "none", False) else {10, 0})
    text, fields = trainer.notes[-1]
    assert fields["data_on"] == ("host" if expected[2] else "device")
    assert ("10 images stay in host memory" in text) == expected[2]


@pytest.mark.parametrize("data_on", ["host", "device"])
def test_data_on_host_or_device_is_not_searched(monkeypatch, data_on):
    """--data-on host or device: the images count (or not) as placed, and stay there."""
    asked = []

    def choose_micro_batch(config, budget_bytes, **fields):
        asked.append(fields["data_images"])
        return 2

    monkeypatch.setitem(sys.modules, "dream.memory", fake_memory(choose_micro_batch))
    trainer = _placing_trainer(data_on)
    assert Trainer.micro_batch_for_budget(trainer, 1000) == 2
    assert set(asked) == {0 if data_on == "host" else 10} and trainer.images_on_host == (data_on == "host")
    with pytest.raises(DreamError, match="nothing fits"):
        def nothing_fits(config, budget_bytes, **fields):
            raise DreamError("nothing fits")
        monkeypatch.setitem(sys.modules, "dream.memory", fake_memory(nothing_fits, str))
        Trainer.micro_batch_for_budget(_placing_trainer(data_on), 1000)


@pytest.mark.parametrize("data_on,device,expected", [
    ("auto", "cuda", ("host", False)),  # over the budget only with the images: they stay on the host
    ("device", "cuda", ("device", True)), ("auto", "cpu", ("device", True)),
])
def test_an_explicit_micro_batch_over_the_budget_only_with_the_images_keeps_them_on_the_host(
        monkeypatch, data_on, device, expected):
    """--micro-batch with --memory-budget: --data-on auto keeps the images off the device where the step would
    pass the budget with them and fit without (else the allocator's cap would halve the user's micro-batch)."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Spec:
        data_images: int
        micro_batch: int
        target: str

        @classmethod
        def from_config(cls, config, **fields):
            return cls(fields["data_images"], fields["micro_batch"], fields["target"])

    peaks = {10: 900, 0: 700}  # bytes with the 10 images on the device, without them; the budget is 800

    monkeypatch.setitem(sys.modules, "dream.memory", types.SimpleNamespace(
        CUDA_ESTIMATE_MARGIN=0.0, StepSpec=Spec, format_size=lambda size: f"{size} bytes",
        estimate_step_memory=lambda spec: types.SimpleNamespace(peak_bytes=peaks[spec.data_images])))
    trainer = _placing_trainer(data_on)
    trainer.device, trainer.micro_batch = torch.device(device), 2
    Trainer.check_micro_batch_budget(trainer, 800)
    text, fields = trainer.notes[-1]
    assert (fields["data_on"], fields["over_budget"]) == expected
    assert trainer.images_on_host == (expected[0] == "host")
    assert ("10 images stay in host memory" in text) == (expected[0] == "host")


def test_training_with_the_images_on_the_host_takes_the_same_steps(tmp_path):
    """On the CPU host and device are one memory: --data-on host trains exactly as the default."""
    runs = [Trainer(small_config(tmp_path / data_on, data_on=data_on, max_steps=3)) for data_on in ("host", "auto")]
    for trainer in runs:
        trainer.run()
    recorded = [json.loads((tmp_path / name / "config.json").read_text())["data_on"] for name in ("host", "auto")]
    assert recorded == ["device", "device"]  # as resolved: on the CPU the host is the device
    assert [r["loss"] for r in records(tmp_path / "host") if "loss" in r] == \
        [r["loss"] for r in records(tmp_path / "auto") if "loss" in r]
    assert all(torch.equal(a, b) for a, b in zip(runs[0].model.state_dict().values(),
                                                 runs[1].model.state_dict().values()))
    with pytest.raises(DreamError, match="--data-on must be one of auto, device, host, got 'gpu'"):
        small_config(tmp_path / "bad", data_on="gpu").check()


@pytest.mark.parametrize("field_name,value,flag", [
    ("batch_size", 0, "--batch-size"), ("micro_batch", 0, "--micro-batch"), ("epochs", 0, "--epochs"),
    ("max_steps", -1, "--max-steps"), ("memory_budget", 0, "--memory-budget"), ("lr", 0.0, "--lr"),
    ("lr", float("inf"), "--lr"), ("weight_decay", -1e-3, "--weight-decay"), ("grad_clip", -1.0, "--grad-clip"),
    ("ema_decay", 1.5, "--ema-decay"), ("max_bad_steps", 0, "--max-bad-steps"), ("log_every", 0, "--log-every"),
    ("checkpoint_every", -1, "--checkpoint-every"), ("checkpoint_keep", 0, "--checkpoint-keep"),
    ("sample_every", -1, "--sample-every"), ("sample_count", 0, "--sample-count"),
    ("sample_steps", 0, "--sample-steps"), ("batch_size", 2.5, "--batch-size"),
])
def test_config_rejects_values_that_would_fail_later(field_name, value, flag):
    """Each bad value is named at once (a zero log interval used to divide by zero after the first step)."""
    from dream.errors import DreamError

    TrainConfig().check()  # the defaults pass
    with pytest.raises(DreamError, match=f"^{flag} must be .*, got {value!r}$"):
        TrainConfig(**{field_name: value}).check()


@pytest.mark.parametrize("field_name,value", [
    ("dream_start_epoch", -1), ("dream_start_epoch", 1.5), ("lambda_max", 1.2), ("lambda_max", -0.1),
    ("alpha", -0.5), ("alpha", 2.0), ("ramp_epochs", 0.0), ("paper_power", -1.0), ("paper_loss", "huber"),
])
def test_objective_config_rejects_values_outside_its_ranges(field_name, value):
    from dream.errors import DreamError

    flag = "--" + field_name.replace("_", "-")
    with pytest.raises(DreamError, match=f"^{flag} must be .*, got {value!r}$"):
        ObjectiveConfig(**{field_name: value})
    with pytest.raises(DreamError, match=f"^{flag} must be"):
        TrainConfig(objective_config={field_name: value}).check()
    ObjectiveConfig(lambda_max=0.0, alpha=1.0, dream_start_epoch=0, paper_power=0.0)  # the edges are allowed


# ----------------------------------------------------------------------------------------------
# accumulation, clipping, the out-of-memory redo with dropout
def perturbed_trainer(run_dir, **overrides):
    """A trainer whose weights are off the zero-initialised head, so that the gradient norm is well above 1."""
    trainer = Trainer(small_config(run_dir, **overrides))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in trainer.model.parameters():
            param.add_(torch.randn(param.shape, generator=g) * 0.1)
    return trainer


def grad_norm_of(model):
    return torch.cat([p.grad.flatten().double() for p in model.parameters()]).norm().item()


def test_micro_batches_give_the_whole_batch_step_its_loss_and_gradient_norm(tmp_path):
    """Each micro-batch's loss is weighed by its share of the batch: the step of 2 micro-batches logs the loss and
    gradient norm of the whole batch at once (not their sum) and leaves the same clipped gradients."""
    runs = {}
    for micro in (4, 2, 1):
        trainer = perturbed_trainer(tmp_path / str(micro), micro_batch=micro, grad_clip=0)
        x0 = next(trainer.batches.epoch(0))
        logs = trainer.train_step(x0)
        runs[micro] = (logs, gradients(trainer.model))
    whole_logs, whole_grads = runs[4]
    for micro in (2, 1):
        logs, grads = runs[micro]
        for key in ("loss", "grad_norm", "mse_standard"):
            if key in whole_logs:
                assert float(logs[key]) == pytest.approx(float(whole_logs[key]), rel=1e-4), (micro, key)
        for a, b in zip(grads, whole_grads):
            torch.testing.assert_close(a, b, **ACCUMULATION_TOL)


@pytest.mark.parametrize("precision, grad_clip", [("fp32", 0.5), ("fp32", 0.0), ("fp16", 1.0)])
def test_gradients_are_clipped_to_the_flags_norm_after_unscaling(tmp_path, precision, grad_clip):
    """--grad-clip is the norm the (unscaled) gradients are clipped to (0: not clipped); with fp16 the loss scale
    is taken out before clipping, so the logged norm is the gradients' own, not 2^16 times it."""
    trainer = perturbed_trainer(tmp_path / precision, precision=precision, grad_clip=grad_clip)
    if precision == "fp16":  # a scale the perturbed model's first step does not overflow at (still far from 1)
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    reference = perturbed_trainer(tmp_path / "reference", precision="fp32", grad_clip=0)
    x0 = next(trainer.batches.epoch(0))
    expected_norm = float(reference.train_step(x0)["grad_norm"])
    assert expected_norm > 1.2, "the test needs clipping to be active"
    logs = trainer.train_step(x0)
    assert float(logs["skipped"]) == 0
    rel = 5e-2 if precision == "fp16" else 1e-5
    assert float(logs["grad_norm"]) == pytest.approx(expected_norm, rel=rel)
    clipped_to = grad_clip if grad_clip else expected_norm
    assert grad_norm_of(trainer.model) == pytest.approx(clipped_to, rel=rel)


def test_a_step_redone_after_out_of_memory_draws_the_dropout_of_that_step(tmp_path):
    """Dropout on: the step redone at the halved micro-batch reseeds its dropout from (seed, step), so it is
    bitwise the step of a run at that micro-batch from the start (a resume of it redoes the same step)."""
    overrides = {"image_size": 8, "base_channels": 16, "dropout": 0.1}
    reference = Trainer(small_config(tmp_path / "micro2", micro_batch=2, max_steps=2, model_overrides=overrides))
    reference.run()
    trainer = Trainer(small_config(tmp_path / "oom", max_steps=2, model_overrides=overrides))
    calls = inject_out_of_memory(trainer, above=2)
    assert trainer.run()["micro_batch"] == 2 and calls == [4, 2, 2, 2, 2]
    for (name, a), b in zip(trainer.model.state_dict().items(), reference.model.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs from the micro-batch-2 run"


def test_out_of_memory_halves_the_micro_batch_to_a_divisor_of_the_batch(tmp_path):
    trainer = Trainer(small_config(tmp_path, data_count=12, batch_size=12, micro_batch=6))
    trainer.shrink_micro_batch("CUDA out of memory (injected)")
    assert trainer.micro_batch == 3  # half of 6 (not merely the next divisor of 12 below it, 4)
    trainer.shrink_micro_batch("CUDA out of memory (injected)")
    assert trainer.micro_batch == 1


def test_log_window_means_leave_out_skipped_steps():
    """A record over a skipped step and kept steps holds the kept steps' means (a non-finite loss of the skipped
    step left out), the skipped count, and all the steps it covers."""
    from dream.train import LogWindow

    window = LogWindow()
    for loss, skipped in ((1.0, 0), (float("nan"), 1), (3.0, 0)):
        window.add({"loss": torch.tensor(loss), "grad_norm": torch.tensor(loss * 10), "skipped": torch.tensor(
            float(skipped))})
    values = window.values()
    assert float(values["loss"]) == 2.0 and float(values["grad_norm"]) == 20.0
    assert (values["skipped"], values["logged_steps"]) == (1, 3)


def test_a_resume_with_another_micro_batch_flag_takes_the_flag(tmp_path):
    """The micro-batch out-of-memory recovery lowered is kept by a rerun of the same command only: a rerun that
    asks for another --micro-batch gets it."""
    trainer = Trainer(small_config(tmp_path, max_steps=1, checkpoint_every=1))
    inject_out_of_memory(trainer, above=2)
    assert trainer.run()["micro_batch"] == 2
    resumed = Trainer(small_config(tmp_path, max_steps=2, checkpoint_every=1, micro_batch=4))
    assert resumed.resume() and resumed.micro_batch == 4
