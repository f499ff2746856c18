"""Sampling: one ancestral step, and a DDIM loop, on the eval-mode model without gradients.

step: x_t -> x_{t-1} at t = T/2 (GaussianDiffusion.p_sample, and the sampler engine's table-driven
      dream.sampling.denoise_step) with fixed x_t and noise. The img/s column is what a 1000-step
      DDPM run at this step time makes (batch / (1000 x step time)). At t = T/2 the model moves
      x_{t-1} by ~0.1 % of its norm, so besides x_{t-1} the check compares x_{t-1} - x_{t-1}|eps=0 (the
      model's share of the step: a step that ignores its model is off by ~100 % there) and eps.
loop: DDIM (eta 0, deterministic) from a fixed x_T: GaussianDiffusion.ddim_sample_loop (a Python loop),
      and dream.sampling.SamplingEngine plain and with CUDA graphs (one capture reused by every call),
      on the eager, triton and compiled models.

Full size (GPU): seed preset, batch 256, DDIM-50 (DREAM_BENCH_DDIM_STEPS changes it). FLOPs: counted
forward FLOPs x steps. Goals (issue 6): with graphs >= 2x eager bf16 and >= 50 % MFU. Reference:
the eager model in fp32 (TF32 off); loops compare the final images (looser "loop" tolerance).
"""
import importlib
import os

import pytest
import torch

from bench.harness import ON_GPU, SETTINGS, Case, CaseState, Goal, Runner, Variant, autotuned, \
    compile_fn, count_flops, run_variant
from bench.workloads import OURS_PRECISION, PRECISION_DTYPE, autocast, build_model, clone_model

BATCH = 256 if SETTINGS.full else 1
DDIM_STEPS = int(os.environ.get("DREAM_BENCH_DDIM_STEPS", "50" if SETTINGS.full else "3"))
T_STEP = 500


def diffusion_on_device():
    from dream.diffusion import GaussianDiffusion

    return GaussianDiffusion("cosine", 1000).to("cuda" if ON_GPU else "cpu")


def engine_module():
    return importlib.import_module("dream.sampling")  # the project's own: an import error fails the case


def make_setup(kind):
    def setup():
        model = build_model("eager").eval()
        diffusion = diffusion_on_device()
        config = model.config
        g = torch.Generator().manual_seed(3)
        shape = (BATCH, config.in_channels, config.image_size, config.image_size)
        device = next(model.parameters()).device
        inputs = {"x": torch.randn(shape, generator=g).to(device), "noise": torch.randn(shape, generator=g).to(device),
                  "t": torch.full((BATCH,), T_STEP, dtype=torch.long, device=device)}
        with torch.no_grad():
            forward_flops = count_flops(lambda: model(inputs["x"], inputs["t"]))
            if kind == "step":  # x_{t-1} hardly depends on the model in one step: its model share is checked
                model_free = diffusion.p_sample(lambda x, t: torch.zeros_like(x), inputs["x"], inputs["t"],
                                                noise=inputs["noise"])
                x_next = diffusion.p_sample(model, inputs["x"], inputs["t"], noise=inputs["noise"])
                reference = (x_next, x_next - model_free, model(inputs["x"], inputs["t"]))
            else:
                reference = (diffusion.ddim_sample_loop(model, shape, steps=DDIM_STEPS, x_T=inputs["x"],
                                                        progress=False),)
        steps = 1 if kind == "step" else DDIM_STEPS
        outputs = ("x_next", "x_next - x_next|eps=0", "eps") if kind == "step" else ("x_0",)
        return CaseState(input_sets=[inputs], reference=reference, outputs=outputs,
                         flops=forward_flops * steps, images=BATCH / 1000 if kind == "step" else BATCH,
                         extra={"model": model, "diffusion": diffusion,
                                "model_free": model_free if kind == "step" else None},
                         info={"batch": BATCH, "steps": steps, "t": T_STEP if kind == "step" else "DDIM",
                               "gflop_per_image_forward": round(forward_flops / BATCH / 1e9, 3)})

    return setup


def model_for(state, backend, compile_mode=None, channels_last=False):
    model = clone_model(state.extra["model"], backend, channels_last).eval()
    return model, (compile_fn(model, compile_mode) if compile_mode else model)


def checked_step(run, forward, precision, model_free):
    """The check of a step variant: its output x_next, x_next - model_free (the step without the model,
    eps = 0), and the model output eps on the same input."""

    def check(inputs):
        with torch.no_grad(), autocast(precision):
            eps = forward(inputs["x"], inputs["t"])
        x_next = run(inputs)[0]
        return (x_next, x_next - model_free, eps)

    return check


def step_variant(backend, precision, compile_mode=None, channels_last=False):
    def build(state):
        model, forward = model_for(state, backend, compile_mode, channels_last)
        diffusion = state.extra["diffusion"]

        def run(inputs):
            with torch.no_grad(), autocast(precision):
                return (diffusion.p_sample(forward, inputs["x"], inputs["t"], noise=inputs["noise"]),)

        check = checked_step(run, forward, precision, state.extra["model_free"])
        return Runner(run=run, check=check, keep=model, warm_after_check=False)

    return build


def engine_step_variant(backend, precision, channels_last=False):
    def build(state):
        sampling = engine_module()
        model, forward = model_for(state, backend, channels_last=channels_last)
        diffusion = state.extra["diffusion"]
        device = next(model.parameters()).device
        plan = sampling.build_plan(diffusion, "ddpm", device=device)
        index = int((plan.timesteps == T_STEP).nonzero()[0, 0])  # the row of t = T_STEP
        counter = torch.zeros(1, dtype=torch.long, device=device)
        dtype = PRECISION_DTYPE[precision]

        def run(inputs):
            counter.fill_(index)
            with torch.no_grad():
                return (sampling.denoise_step(forward, inputs["x"], counter, plan, inputs["noise"], dtype),)

        check = checked_step(run, forward, precision, state.extra["model_free"])
        return Runner(run=run, check=check, keep=model, warm_after_check=False)

    return build


def loop_variant(backend, precision, compile_mode=None, channels_last=False):
    def build(state):
        model, forward = model_for(state, backend, compile_mode, channels_last)
        diffusion = state.extra["diffusion"]

        def run(inputs):
            with torch.no_grad(), autocast(precision):
                return (diffusion.ddim_sample_loop(forward, inputs["x"].shape, steps=DDIM_STEPS, x_T=inputs["x"],
                                                   progress=False),)

        return run

    return build


def engine_loop_variant(backend, precision, graphs, compile_mode=None, channels_last=False):
    def build(state):
        sampling = engine_module()
        model, forward = model_for(state, backend, compile_mode, channels_last)
        engine = sampling.SamplingEngine(forward, state.extra["diffusion"], graphs=graphs)
        dtype = PRECISION_DTYPE[precision]

        def run(inputs):
            return (engine.sample(inputs["x"], "ddim", DDIM_STEPS, 0.0, dtype=dtype, graphs=graphs),)

        return run

    return build


CL = ON_GPU  # ours run channels_last on CUDA, as `dream sample` does by default; the eager anchors run NCHW


def step_variants():
    ours, dtype = OURS_PRECISION, PRECISION_DTYPE[OURS_PRECISION]
    return [
        Variant(f"triton_{ours}", step_variant("triton", ours, channels_last=CL), role="ours", dtype=dtype),
        Variant(f"engine_triton_{ours}", engine_step_variant("triton", ours, channels_last=CL), role="ours",
                dtype=dtype, note="dream.sampling.denoise_step (device-side tables)"),
        Variant(f"triton_{ours}_compile", step_variant("triton", ours, "default", channels_last=CL), role="ours",
                dtype=dtype, cpu=False),
        Variant("eager_fp32", step_variant("eager", "fp32"), dtype=torch.float32),
        Variant("eager_bf16", step_variant("eager", "bf16"), dtype=torch.bfloat16),
        Variant("sdpa_bf16", step_variant("sdpa", "bf16"), dtype=torch.bfloat16, cpu=False),
        Variant("compile_bf16", step_variant("eager", "bf16", "default"), dtype=torch.bfloat16, cpu=False),
    ]


def loop_variants():
    ours, dtype = OURS_PRECISION, PRECISION_DTYPE[OURS_PRECISION]
    return [
        Variant(f"engine_triton_{ours}_graphs", engine_loop_variant("triton", ours, True, channels_last=CL),
                role="ours", dtype=dtype, gpu_only=True,
                note="SamplingEngine, CUDA graphs (capture in the first call)"),
        Variant(f"engine_triton_{ours}_compile_graphs",
                engine_loop_variant("triton", ours, True, "default", channels_last=CL),
                role="ours", dtype=dtype, gpu_only=True),
        Variant(f"engine_triton_{ours}_graphs_autotuned",
                autotuned(engine_loop_variant("triton", ours, True, channels_last=CL)),
                role="ours", dtype=dtype, gpu_only=True, explicit=True,
                note="--autotune-kernels: tuned in the warm-up steps before the capture"),
        Variant(f"engine_triton_{ours}", engine_loop_variant("triton", ours, False, channels_last=CL), role="ours",
                dtype=dtype, note="SamplingEngine, plain loop"),
        Variant(f"triton_{ours}", loop_variant("triton", ours, channels_last=CL), role="ours", dtype=dtype, cpu=False,
                note="GaussianDiffusion.ddim_sample_loop"),
        Variant("eager_bf16", loop_variant("eager", "bf16"), dtype=torch.bfloat16),
        Variant("eager_bf16_graphs", engine_loop_variant("eager", "bf16", True), dtype=torch.bfloat16, gpu_only=True,
                own_code=True, note="the eager model in the engine's CUDA graphs"),
        Variant("compile_bf16", loop_variant("eager", "bf16", "default"), dtype=torch.bfloat16, cpu=False),
        Variant("eager_fp32", loop_variant("eager", "fp32"), dtype=torch.float32, explicit=SETTINGS.full,
                note="slow at full size: runs only when selected"),
    ]


OURS_GRAPHED = tuple(f"engine_triton_{OURS_PRECISION}{s}" for s in ("_graphs", "_compile_graphs", "_graphs_autotuned"))
CASES = [
    Case("sampling", "ddpm_step", "step", make_setup("step"), step_variants(), level="model",
         describe=f"one ancestral step at t={T_STEP}, batch {BATCH}; img/s = a 1000-step DDPM run at this step time"),
    Case("sampling", f"ddim{DDIM_STEPS}", "loop", make_setup("loop"), loop_variants(), level="loop",
         describe=f"DDIM-{DDIM_STEPS} eta 0, batch {BATCH}",
         goals=[Goal("with graphs >= 2x eager bf16", "speedup", OURS_GRAPHED, 2.0, ("eager_bf16",)),
                Goal("with graphs >= 50 % MFU", "pct_ceiling", OURS_GRAPHED, 50.0)]),
]

PARAMS = [pytest.param(case, variant, id=f"{case.name}-{variant.name}") for case in CASES for variant in case.variants]


@pytest.mark.parametrize("case,variant", PARAMS)
def test_sampling(benchmark, case, variant):
    run_variant(benchmark, case, variant)
