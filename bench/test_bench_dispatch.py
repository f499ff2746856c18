"""Host time of the ops the triton backend calls: direct calls (kernels.dispatch, the default in eager mode)
vs the same calls through torch.library's dispatcher, beside the eager PyTorch path of the same math.

A training step of the seed UNet calls these ops hundreds of times, forward and backward; whatever Python
and dispatch cost per call is time the GPU waits once the kernels are fast (the H200 profile of 2026-11-29
had the step's host side about as long as its kernels). Host time does not depend on the tensors' size, so
every case uses small shapes; the kernels' launches are replaced by no-ops while timing (the Triton
interpreter's run time would hide the host's on CPU, and on a GPU the launch itself is the same on both
paths), so the figures are the Python and dispatch time per call. Before timing, each variant runs once
with its kernels and is checked against float64.

Variants: `direct` (ours), `dispatcher` (ours through torch.ops: kernels.dispatch.through_dispatcher), and
`eager` (the kernels' eager references, computing for real: at these sizes mostly host time too).
"""
import contextlib

import pytest
import torch

from bench.harness import DEVICE, ON_GPU, Case, CaseState, Runner, Variant, named_inputs_runner, run_variant

DTYPE = torch.float16 if ON_GPU else torch.float32
CALLS = 20  # calls per timed run: figures are per run of CALLS calls


@contextlib.contextmanager
def stubbed_launches():
    """kernels.autotune.launch (every launcher's kernel[grid]) made a no-op: the host side runs alone."""
    from kernels import autotune

    launch = autotune.launch
    autotune.launch = lambda kernel, grid: (lambda *args, **kwargs: None)
    try:
        yield
    finally:
        autotune.launch = launch


def _inputs(seed, shapes):
    g = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(shape, generator=g) * scale + shift).to(DEVICE)
            for name, (shape, scale, shift) in shapes.items()}


def _group_norm_silu():
    import kernels

    shapes = {"x": ((3, 96, 8, 8), 1, 0), "weight": ((96,), 0.3, 1), "bias": ((96,), 0.3, 0),
              "scale": ((3, 96), 0.3, 0), "shift": ((3, 96), 0.3, 0)}

    def ours(x, weight, bias, scale, shift):
        return kernels.group_norm_silu(x, weight, bias, 32, scale=scale, shift=shift)

    def eager(x, weight, bias, scale, shift):
        return kernels.group_norm_silu_reference(x, weight, bias, 32, scale=scale, shift=shift)

    return shapes, ours, eager


def _attention_qkv_nchw():
    import kernels

    return ({"qkv": ((3, 3 * 64, 4, 4), 1, 0)}, lambda qkv: kernels.attention_qkv_nchw(qkv, 2),
            lambda qkv: kernels.attention_qkv_nchw_reference(qkv, 2))


def _group_norm_silu_conv2d():
    import kernels

    shapes = {"x": ((3, 96, 8, 8), 1, 0), "weight": ((96,), 0.3, 1), "bias": ((96,), 0.3, 0),
              "conv_weight": ((16, 96, 3, 3), 0.05, 0), "conv_bias": ((16,), 0.1, 0)}

    def ours(x, weight, bias, conv_weight, conv_bias):
        return kernels.group_norm_silu_conv2d(x, weight, bias, 32, conv_weight, conv_bias, padding=1)

    def eager(x, weight, bias, conv_weight, conv_bias):
        return kernels.group_norm_silu_conv2d_reference(x, weight, bias, 32, conv_weight, conv_bias, padding=1)

    return shapes, ours, eager


def _add_bias_residual():
    import kernels

    shapes = {"a": ((3, 96, 8, 8), 1, 0), "b": ((3, 96, 8, 8), 1, 0), "bias": ((96,), 0.3, 0)}
    return shapes, kernels.add_bias_residual, kernels.add_bias_residual_reference


def _upsample2x_concat():
    import kernels

    shapes = {"h": ((3, 64, 8, 8), 1, 0), "skip": ((3, 32, 4, 4), 1, 0), "h_bias": ((64,), 0.3, 0)}
    return shapes, kernels.upsample2x_concat, kernels.upsample2x_concat_reference


# op -> (its inputs' shapes with scale and shift of their random values, ours, the eager reference), built
# when a case runs (kernels is imported then), and what the case is
OPS = {"group_norm_silu": _group_norm_silu, "group_norm_silu_conv2d": _group_norm_silu_conv2d,
       "attention_qkv_nchw": _attention_qkv_nchw,
       "add_bias_residual": _add_bias_residual, "upsample2x_concat": _upsample2x_concat}
DESCRIPTIONS = {"group_norm_silu": "ResBlock norm2 (scale, shift, SiLU), 3x96x8x8",
                "group_norm_silu_conv2d": "norm1 + SiLU + 3x3 conv, the norm recomputed in backward (--checkpointing "
                                          "norms), 3x96x8x8 -> 16 channels",
                "attention_qkv_nchw": "attention on the qkv conv output, 2 heads of 32, 3x192x4x4",
                "add_bias_residual": "residual sum with bias, 3x96x8x8",
                "upsample2x_concat": "skip concatenation, 3x64x8x8 + 3x32x4x4"}


def make_setup(op, direction):
    def setup():
        shapes, _, eager = OPS[op]()
        names = tuple(shapes)
        inputs = {name: t.to(DTYPE) if name in ("x", "qkv", "a", "b", "h", "skip", "conv_weight", "conv_bias") else t
                  for name, t in _inputs(7, shapes).items()}
        exact = {name: t.double() for name, t in inputs.items()}
        with torch.no_grad():
            out_shape = eager(*(exact[name] for name in names)).shape
        inputs["dout"] = torch.randn(out_shape, generator=torch.Generator().manual_seed(8)).to(DEVICE, DTYPE)
        exact["dout"] = inputs["dout"].double()
        reference = named_inputs_runner(eager, direction, names)(exact)
        outputs = ("out",) + (tuple(f"d{name}" for name in names) if direction != "fwd" else ())
        return CaseState(input_sets=[inputs], reference=tuple(r.detach() for r in reference), outputs=outputs,
                         info={"calls_per_run": CALLS, "launches": "stubbed while timing (host time only)",
                               "dtype": str(DTYPE).replace("torch.", "")},
                         extra={"names": names})

    return setup


def variant(op, path, direction):
    def build(state):
        from kernels import dispatch

        _, ours, eager = OPS[op]()
        names = state.extra["names"]
        fn = eager if path == "eager" else ours
        scope = dispatch.through_dispatcher if path == "dispatcher" else contextlib.nullcontext
        stub = contextlib.nullcontext if path == "eager" else stubbed_launches

        call_once = named_inputs_runner(fn, direction, names)

        def check(inputs):
            with scope():
                return call_once(inputs)

        def run(inputs):
            with scope(), stub():
                for _ in range(CALLS):
                    call_once(inputs)

        return Runner(run=run, check=check)

    notes = {"direct": "ours: the op's implementation called directly (kernels.dispatch)",
             "dispatcher": "ours through torch.ops (torch.library's dispatcher and autograd wrapper)",
             "eager": "the eager reference, kernels run for real"}
    return Variant(path, build, role="ours" if path == "direct" else "anchor", own_code=path == "dispatcher",
                   dtype=DTYPE, graph=False,
                   note=notes[path])


CASES = [Case("dispatch", op, direction, make_setup(op, direction),
              [variant(op, path, direction) for path in ("direct", "dispatcher", "eager")],
              level="kernel", describe=f"{DESCRIPTIONS[op]}, {CALLS} calls per run")
         for op in OPS for direction in ("fwd", "fwd+bwd")]

PARAMS = [pytest.param(case, v, id=f"{case.name}-{case.direction}-{v.name}") for case in CASES for v in case.variants]


@pytest.mark.parametrize("case,variant", PARAMS)
def test_dispatch(benchmark, case, variant):
    run_variant(benchmark, case, variant)
