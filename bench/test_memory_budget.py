"""The memory budget: one training step of the `seed` objective at batch 128 (seed preset, ours: triton
backend, bf16 autocast, DREAM fully on) must peak at <= 6.8 GB (6.8e9 bytes, torch.cuda.max_memory_allocated).

For each activation-checkpointing policy (none, attention, resblocks, all: less memory, more
recomputation) the CPU estimator's figure (dream.memory.estimate_step_memory: fake tensors, no GPU)
is printed beside the measured one (dream.memory.measure_cuda_peak, after a warm-up step, with nothing
else of this session on the device). On a GPU the step is also timed for the least-recomputation policy
that fits, and the test fails when no policy fits (or the one named by DREAM_BUDGET_POLICY does not).
On CPU only the estimate runs, for the trainer's default policy (DREAM_BENCH_SIZE=full: all four).
"""
import os
import time

import pytest
import torch

from bench.harness import ON_GPU, SESSION, SETTINGS, Case, Variant, free_memory, sync
from dream.math_flags import MathFlags

BUDGET_BYTES = 6.8e9
BATCH = 128
POLICIES = ("none", "norms", "attention", "resblocks", "all") if (ON_GPU or SETTINGS.size == "full") else ("none",)
PRECISION = "bf16"


def spec_for(policy):
    from dream.memory import StepSpec

    return StepSpec(preset="seed", batch_size=BATCH, precision=PRECISION, objective="seed", backend="triton",
                    checkpointing=policy)


def _case():
    return Case("memory", f"seed_b{BATCH}", "step", setup=lambda: None, variants=[], level="model",
                describe=f"`seed` objective step, batch {BATCH}, triton + bf16; budget {BUDGET_BYTES / 1e9:.1f} GB")


def _time_step(benchmark, policy):
    """The step time (ms) of the trainer with this policy, through pytest-benchmark."""
    from dream.profile import build_trainer, sample_batch

    with MathFlags():  # the trainer turns TF32 and cudnn.benchmark on: not for the rest of the session
        trainer = build_trainer(preset="seed", batch=BATCH, device="cuda", objective="seed", backend="triton",
                                precision=PRECISION, checkpointing=policy)
        x0 = sample_batch(trainer)
        for _ in range(3):  # warm-up: autotuning, cudnn.benchmark, allocator
            trainer.train_step(x0)
        sync()

        def one_step():
            trainer.train_step(x0)
            sync()

        if getattr(benchmark, "disabled", True):  # smoke run: one plain step
            tick = time.perf_counter()
            benchmark.pedantic(one_step) if hasattr(benchmark, "pedantic") else one_step()
            seconds = time.perf_counter() - tick
        else:
            benchmark.pedantic(one_step, rounds=5, iterations=1, warmup_rounds=0)
            seconds = benchmark.stats.stats.median
        trainer = None  # noqa: F841  (freed before the next policy is measured)
    free_memory()
    return seconds


def test_seed_step_memory_budget(benchmark):
    from dream.memory import estimate_step_memory, measure_cuda_peak

    SESSION.ensure_ceilings()
    SESSION.release()  # nothing of earlier cases stays on the device
    case = _case()
    rows = {}
    pinned = os.environ.get("DREAM_BUDGET_POLICY")
    chosen = None

    def record(policy):  # as soon as a row is known, so a stage time limit cannot lose it
        row = rows[policy]
        variant = Variant(f"triton_{PRECISION}_ckpt_{policy}", build=None, role="ours", dtype=torch.bfloat16)
        entry = {"status": "ok", "budget_bytes": BUDGET_BYTES, **row}
        if "time_s" in row:
            entry["images_per_s"] = BATCH / row["time_s"]
        if policy == chosen:
            entry["note"] = "pinned by DREAM_BUDGET_POLICY" if pinned else "least recomputation within the budget"
        SESSION.record(case, variant, **entry)

    for policy in POLICIES:
        tick = time.perf_counter()
        estimate = estimate_step_memory(spec_for(policy))
        row = {"policy": policy, "estimate_bytes": estimate.peak_bytes, "estimate_breakdown": estimate.breakdown,
               "estimate_s": time.perf_counter() - tick}
        if ON_GPU:
            free_memory()
            resident = torch.cuda.memory_allocated()
            row["measured_bytes"] = measure_cuda_peak(spec_for(policy)) - resident
            row["resident_before_bytes"] = resident
            row["fits"] = row["measured_bytes"] <= BUDGET_BYTES
        rows[policy] = row
        record(policy)

    if ON_GPU:
        fitting = [p for p in POLICIES if rows[p]["fits"]]
        chosen = pinned or (fitting[0] if fitting else None)
        if chosen is not None and chosen in rows:
            rows[chosen]["time_s"] = _time_step(benchmark, chosen)
            record(chosen)
    elif hasattr(benchmark, "pedantic"):
        benchmark.pedantic(lambda: None)  # the estimates are the result; nothing to time on CPU

    lines = [f"{'policy':<10} {'estimate GB':>12} {'measured GB':>12} {'fits 6.8 GB':>12}"]
    for policy, row in rows.items():
        measured = row.get("measured_bytes")
        lines.append(f"{policy:<10} {row['estimate_bytes'] / 1e9:>12.3f} "
                     f"{'' if measured is None else f'{measured / 1e9:.3f}':>12} "
                     f"{'' if measured is None else ('yes' if row['fits'] else 'NO'):>12}")
    print("\n" + "\n".join(lines))

    if not ON_GPU:
        pytest.skip("estimates recorded; the budget is checked against torch.cuda.max_memory_allocated on a GPU")
    if pinned:
        assert pinned in rows, f"DREAM_BUDGET_POLICY={pinned!r} is not one of {POLICIES}"
        assert rows[pinned]["fits"], (f"checkpointing={pinned}: the seed step peaks at "
                                      f"{rows[pinned]['measured_bytes'] / 1e9:.3f} GB > 6.8 GB\n" + "\n".join(lines))
    else:
        assert chosen is not None, "no checkpointing policy keeps the seed step within 6.8 GB\n" + "\n".join(lines)
