"""The UNet forward (eval, no grad: the sampling pass) and forward+backward (training pass):
ours (backend="triton", bf16 autocast; also channels_last and torch.compile(fullgraph)) vs the eager
model in fp32 and bf16 autocast, the SDPA backend, and torch.compile of the eager model.

Full size (GPU): the seed preset at batch 128, 64x64 (38.70 GFLOP forward per image, 116.06
forward+backward). FLOPs are counted by FlopCounterMode on the reference. Forward+backward is
checked in eval mode (dropout off, so every variant computes the same function) and timed in
training mode (dropout 0.1, as in training). Reference: the eager model in fp32 with TF32 off.
"""
import pytest
import torch

from bench.harness import ON_GPU, SETTINGS, Case, CaseState, Runner, Variant, autotuned, compile_fn, count_flops, \
    run_variant
from bench.workloads import OURS_PRECISION, PRECISION_DTYPE, autocast, build_model, clone_model, grad_names, \
    model_inputs, param_grads

BATCH = 128 if SETTINGS.full else 1


def make_setup(direction):
    def setup():
        model = build_model("eager").eval()
        inputs = model_inputs(BATCH, model.config)
        params = list(model.parameters())
        if direction == "fwd":
            with torch.no_grad():
                reference = (model(inputs["x"], inputs["t"]),)
                flops = count_flops(lambda: model(inputs["x"], inputs["t"]))
            names = ("out",)
        else:
            def forward_backward():
                out = model(inputs["x"], inputs["t"])
                grads = torch.autograd.grad(out, params, inputs["grad"])
                return (out.detach(), *param_grads(params, grads))

            reference = forward_backward()
            flops = count_flops(forward_backward)
            names = ("out", *grad_names(model))
        return CaseState(input_sets=[inputs], reference=reference, outputs=names, flops=flops, images=BATCH,
                         info={"preset": "seed" if SETTINGS.full else "tiny (cut down)",
                               "batch": BATCH, "image": model.config.image_size,
                               "gflop_per_image": round(flops / BATCH / 1e9, 3)},
                         extra={"model": model})

    return setup


def unet_variant(direction, backend, precision, compile_mode=None, channels_last=False, fullgraph=False):
    def build(state):
        model = clone_model(state.extra["model"], backend, channels_last)
        forward = compile_fn(model, compile_mode, fullgraph=fullgraph) if compile_mode else model
        params = list(model.parameters())
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        xs = {id(s): s["x"].contiguous(memory_format=memory_format) for s in state.input_sets}

        def forward_only(inputs):
            model.eval()
            with torch.no_grad(), autocast(precision):
                return (forward(xs[id(inputs)], inputs["t"]),)

        def forward_backward(inputs, training):
            model.train(training)
            with autocast(precision):
                out = forward(xs[id(inputs)], inputs["t"])
            grads = torch.autograd.grad(out, params, inputs["grad"].to(out.dtype), allow_unused=True)
            return (out, *param_grads(params, grads))

        if direction == "fwd":
            return Runner(run=forward_only, keep=model)
        return Runner(run=lambda inputs: forward_backward(inputs, True),
                      check=lambda inputs: forward_backward(inputs, False), keep=model)

    return build


def variants(direction):
    ours = OURS_PRECISION
    ours_dtype = PRECISION_DTYPE[ours]
    return [
        Variant(f"triton_{ours}", unet_variant(direction, "triton", ours, channels_last=ON_GPU), role="ours",
                dtype=ours_dtype, note="channels_last on CUDA (the default there)"),
        Variant(f"triton_{ours}_nchw", unet_variant(direction, "triton", ours), role="ours", dtype=ours_dtype,
                cpu=False),
        Variant(f"triton_{ours}_autotuned", autotuned(unet_variant(direction, "triton", ours, channels_last=ON_GPU)),
                role="ours", dtype=ours_dtype, gpu_only=True, explicit=True,
                note="kernel launch configurations timed on first use (kernels.autotune)"),
        Variant(f"triton_{ours}_compile", unet_variant(direction, "triton", ours, "default", channels_last=ON_GPU,
                                                       fullgraph=True),
                role="ours", dtype=ours_dtype, cpu=False),
        Variant("eager_fp32", unet_variant(direction, "eager", "fp32"), dtype=torch.float32),
        Variant("eager_bf16", unet_variant(direction, "eager", "bf16"), dtype=torch.bfloat16),
        Variant("sdpa_bf16", unet_variant(direction, "sdpa", "bf16"), dtype=torch.bfloat16),
        Variant("compile_bf16", unet_variant(direction, "eager", "bf16", "default"), dtype=torch.bfloat16,
                cpu=False, note="torch.compile of the eager model"),
        Variant("compile_max_autotune_bf16", unet_variant(direction, "eager", "bf16", "max-autotune"),
                dtype=torch.bfloat16, gpu_only=True, explicit=True, note="minutes to compile: runs only when selected"),
    ]


CASES = [Case("unet", "seed" if SETTINGS.full else "tiny_small", direction, make_setup(direction), variants(direction),
              level="model",
              describe=f"batch {BATCH}, {'eval, no grad' if direction == 'fwd' else 'grads of all parameters'}")
         for direction in ("fwd", "fwd+bwd")]

PARAMS = [pytest.param(case, variant, id=f"{case.direction}-{variant.name}")
          for case in CASES for variant in case.variants]


@pytest.mark.parametrize("case,variant", PARAMS)
def test_unet(benchmark, case, variant):
    run_variant(benchmark, case, variant)
