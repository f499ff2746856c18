"""One optimizer step of the trainer (dream.train.Trainer.train_step: t and noise, objective with early
backward, unscale, clip, fused AdamW, EMA) for each objective: ours (backend triton, bf16, channels_last;
also captured as a CUDA graph (GPU only), with the norms recomputed in backward, with torch.compile, in NCHW,
and, on request, with its ops called through torch.library's dispatcher: triton_bf16_dispatcher, or with each
step's result read on the host as it returns: triton_bf16_step_sync) vs the eager model in fp32 and bf16,
torch.compile of the eager model, and, for the `seed` objective, the seed's own way (eager, fp16 autocast with
a GradScaler, a third forward for eps_hat, full activation checkpointing).

Full size (GPU): the seed preset, batch 128, DREAM fully on (epoch 30). FLOPs: counted by
FlopCounterMode over the reference step (the same count for every variant, so MFU compares times;
the seed's way recomputes more than it is credited for). Goals (issue 5, `seed` objective):
MFU >= 45 % (of the measured bf16 matmul ceiling), >= 2.5x the seed's way, >= 1.2x torch.compile
of the eager model. Checked in eval mode (dropout off) against the eager fp32 step (TF32 off):
the loss and every parameter gradient after clipping; timed in training mode.
"""
import contextlib

import pytest
import torch

from bench.harness import ON_GPU, SETTINGS, Case, CaseState, Goal, Runner, Variant, autotuned, run_variant
from dream.math_flags import exact_fp32
from bench.workloads import MODEL_OVERRIDES, OURS_PRECISION, PRECISION_DTYPE, PRESET, grad_names, param_grads

BATCH = 128 if SETTINGS.full else 1
OBJECTIVES = ("seed", "standard", "paper")


def trainer_for(objective, channels_last=False, **options):
    """A trainer for one variant: NCHW unless asked (the anchors are the eager model as written)."""
    from dream.profile import build_trainer

    if options.get("compile"):
        torch._dynamo.reset()  # no earlier variant's graphs count against the recompile limit

    return build_trainer(preset=PRESET, batch=BATCH, device=str("cuda" if ON_GPU else "cpu"), objective=objective,
                         model_overrides=MODEL_OVERRIDES, channels_last=channels_last, **options)


def checked_step(trainer, x0, initial):
    """One step from the case's initial weights at step 0 (same t and noise for every trainer), in eval
    mode; an fp16 step whose gradients overflowed is redone (the scaler has lowered its scale).
    Returns (loss, each parameter's gradient)."""
    trainer.model.load_state_dict(initial)
    trainer.model.eval()
    try:
        for _ in range(8):
            trainer.step = 0
            logs = trainer.train_step(x0)
            if not float(logs.get("skipped", 0)):
                break
    finally:
        trainer.model.train()
    return (logs["loss"].detach().float().reshape(1), *param_grads(list(trainer.model.parameters())))


def make_setup(objective):
    def setup():
        from torch.utils.flop_counter import FlopCounterMode

        from dream.profile import sample_batch

        trainer = trainer_for(objective, backend="eager", precision="fp32")  # turns TF32 on, on CUDA
        x0 = sample_batch(trainer)
        initial = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        with exact_fp32(), FlopCounterMode(display=False) as counter:
            reference = checked_step(trainer, x0, initial)
        flops = float(counter.get_total_flops())
        names = grad_names(trainer.model)
        del trainer
        return CaseState(input_sets=[x0], reference=reference, outputs=("loss", *names), flops=flops,
                         images=BATCH, extra={"initial": initial},
                         info={"preset": PRESET if SETTINGS.full else "tiny (cut down)", "batch": BATCH,
                               "objective": objective, "epoch": 30,
                               "gflop_per_image": round(flops / BATCH / 1e9, 3)})

    return setup


def step_variant(objective, through_dispatcher=False, read_each_step=False, **options):
    """through_dispatcher: the kernels' ops called through torch.ops, as before kernels.dispatch. read_each_step:
    each step's own result read on the host as it returns (the sync each step made before its skip was decided
    on the device), so that the next step is queued only once this one is done."""
    def build(state):
        from kernels import dispatch

        trainer = trainer_for(objective, **options)
        scope = dispatch.through_dispatcher if through_dispatcher else contextlib.nullcontext

        def run(x0):
            with scope():
                logs = trainer.train_step(x0)
            if read_each_step:
                logs["skipped"].item()
            return logs

        def check(x0):
            with scope():
                if trainer.step_graph is not None:  # warm-up steps of the checked (eval-mode) graph: the check is
                    for _ in range(trainer.step_graph.warmup_steps):  # then of its capture and first replay
                        checked_step(trainer, x0, state.extra["initial"])
                return checked_step(trainer, x0, state.extra["initial"])

        return Runner(run=run, check=check, keep=trainer)

    return build


def variants(objective):
    """Ours first (the speed-ups' reference) and ours captured as a CUDA graph, then what a short GPU budget should
    time first: the step_sync diagnostic and the goals' anchors (the seed's way, eager bf16), then the rest."""
    ours, dtype = OURS_PRECISION, PRECISION_DTYPE[OURS_PRECISION]
    ours_on_cpu = objective == "standard"  # the interpreter is slow: one objective smoke-runs it on CPU
    out = [
        Variant(f"triton_{ours}", step_variant(objective, backend="triton", precision=ours, channels_last=ON_GPU),
                role="ours", dtype=dtype, cpu=ours_on_cpu, note="the trainer's defaults on CUDA (channels_last)"),
        Variant(f"triton_{ours}_graphs", step_variant(objective, backend="triton", precision=ours,
                                                       channels_last=ON_GPU, cuda_graphs=True),
                role="ours", dtype=dtype, gpu_only=True,
                note="--cuda-graphs: the step's device work captured once and replayed (one launch a step)"),
        Variant(f"triton_{ours}_step_sync", step_variant(objective, read_each_step=True, backend="triton",
                                                          precision=ours, channels_last=ON_GPU),
                dtype=dtype, cpu=ours_on_cpu, explicit=True, own_code=True,
                note="ours with each step's result read on the host as it returns: the overlap of step s + 1's "
                     "host work with step s that the device-side skip allows"),
    ]
    if objective == "seed":
        out.append(Variant("seed_way_fp16", step_variant(
            objective, backend="eager", precision="fp16", checkpointing="all",
            objective_config={"seed_separate_eps_forward": True}), dtype=torch.float16,
            note="the seed's recipe: fp16 + GradScaler, third forward for eps_hat, full checkpointing"))
    out += [
        Variant("eager_bf16", step_variant(objective, backend="eager", precision="bf16"), dtype=torch.bfloat16,
                cpu=False),  # CPU bf16 convolutions are slow and say nothing
        Variant("compile_eager_bf16", step_variant(objective, backend="eager", precision="bf16", compile=True),
                dtype=torch.bfloat16, cpu=False, note="torch.compile of the eager model"),
        Variant(f"triton_{ours}_norms", step_variant(objective, backend="triton", precision=ours, channels_last=ON_GPU,
                                                      checkpointing="norms"),
                role="ours", dtype=dtype, cpu=False,
                note="--checkpointing norms: the norms feeding convolutions recomputed in backward"),
        Variant("eager_fp32", step_variant(objective, backend="eager", precision="fp32"), dtype=torch.float32),
        Variant(f"triton_{ours}_nchw", step_variant(objective, backend="triton", precision=ours, channels_last=False),
                role="ours", dtype=dtype, cpu=False, note="--no-channels-last"),
        Variant(f"triton_{ours}_compile", step_variant(objective, backend="triton", precision=ours, compile=True,
                                                        channels_last=ON_GPU),
                role="ours", dtype=dtype, cpu=False),
        Variant(f"triton_{ours}_dispatcher", step_variant(objective, through_dispatcher=True, backend="triton",
                                                           precision=ours, channels_last=ON_GPU),
                dtype=dtype, explicit=True, own_code=True,
                note="ours with the kernels' ops called through torch.library's dispatcher (kernels.dispatch): "
                     "the host time the direct calls save"),
        Variant(f"triton_{ours}_autotuned", autotuned(step_variant(objective, backend="triton", precision=ours,
                                                                   channels_last=ON_GPU)),
                role="ours", dtype=dtype, gpu_only=True, explicit=True,
                note="--autotune-kernels: kernel launch configurations timed on first use"),
    ]
    return out


def goals(objective):
    if objective != "seed":
        return []
    ours = tuple(v.name for v in variants(objective) if v.role == "ours")
    return [Goal("MFU >= 45 % (counted FLOPs / time / measured bf16 matmul rate)", "pct_ceiling", ours, 45.0),
            Goal(">= 2.5x the seed's way", "speedup", ours, 2.5, ("seed_way_fp16",)),
            Goal(">= 1.2x torch.compile of the eager model", "speedup", ours, 1.2, ("compile_eager_bf16",))]


CASES = [Case("train_step", objective, "step", make_setup(objective), variants(objective), level="model",
              goals=goals(objective), describe=f"`{objective}` objective, batch {BATCH}")
         for objective in OBJECTIVES]

PARAMS = [pytest.param(case, variant, id=f"{case.name}-{variant.name}")
          for case in CASES for variant in case.variants]


@pytest.mark.parametrize("case,variant", PARAMS)
def test_train_step(benchmark, case, variant):
    run_variant(benchmark, case, variant)
