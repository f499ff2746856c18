"""The ResBlock's residual sum with its convolution's bias at the seed UNet's sites: ours
(kernels.add_bias_residual: a + b + bias in one pass) vs the eager model's path (the bias added to the
convolution's output in a pass of its own, as PyTorch does for a cuDNN convolution, then the sum) and
torch.compile of that path.

Full size (GPU): batch 128, bf16 activations, an fp32 bias (the trainer's mixed precision), channels_last
(the trainer's layout on CUDA; the 64x64 site in NCHW too). Memory-bound: the floor is the fewest bytes /
copy bandwidth; forward reads a and b and writes the sum; backward (a's and b's gradients are dout
itself) reads dout once for the bias's gradient. Reference: the same math in float64 on the same inputs.
"""
import pytest
import torch

from bench.harness import DEVICE, ON_GPU, SETTINGS, Case, CaseState, fused_op_variants, input_set_count, run_variant

CL, NCHW = "channels_last", "nchw"
#        name           N    C    H   W  layout
FULL_SITES = [
    ("resid64", 128, 128, 64, 64, CL),
    ("resid64_nchw", 128, 128, 64, 64, NCHW),
    ("resid32", 128, 256, 32, 32, CL),
    ("resid16", 128, 512, 16, 16, CL),
]
SMALL_SITES = [("c5_7x5", 3, 5, 7, 5, NCHW), ("c16_4x4_cl", 2, 16, 4, 4, CL)]
SITES = FULL_SITES if SETTINGS.full else SMALL_SITES
DTYPE = torch.bfloat16 if ON_GPU else torch.float32  # the interpreter rounds fp32 -> bf16 by truncation


def make_setup(site, direction):
    name, n, c, height, width, layout = site
    memory_format = torch.channels_last if layout == CL else torch.contiguous_format

    def bytes_moved(dtype):
        tensors = 3 if direction == "fwd" else 4
        return tensors * n * c * height * width * torch.empty((), dtype=dtype).element_size()

    def setup():
        from kernels import add_bias_residual_reference

        sets = []
        for s in range(input_set_count(bytes_moved(DTYPE))):
            g = torch.Generator().manual_seed(4000 + s)
            tensors = {key: torch.randn(n, c, height, width, generator=g) for key in ("a", "b", "dout")}
            inputs = {k: v.to(DEVICE, DTYPE).contiguous(memory_format=memory_format) for k, v in tensors.items()}
            inputs["bias"] = (torch.randn(c, generator=g) * 0.5).to(DEVICE)  # fp32, a parameter under autocast
            sets.append(inputs)
        first = sets[0]
        leaves = [first[k].to(torch.float64).requires_grad_(direction != "fwd") for k in ("a", "b", "bias")]
        out = add_bias_residual_reference(*leaves)
        reference, names = (out.detach(),), ("out",)
        if direction != "fwd":
            reference += tuple(g.detach() for g in torch.autograd.grad(out, leaves, first["dout"].double()))
            names += ("da", "db", "dbias")
        return CaseState(input_sets=sets, reference=reference, outputs=names, bytes=bytes_moved,
                         info={"shape": f"{n}x{c}x{height}x{width}", "layout": layout,
                               "dtype": str(DTYPE).replace("torch.", ""), "input_sets": len(sets)})

    return setup


def eager_residual(a, b, bias):
    """The eager ResBlock's end: the convolution's bias pass over its output a, then the residual sum."""
    return (a + bias.view(1, -1, 1, 1).to(a.dtype)) + b


def load_ours():
    from kernels import add_bias_residual

    return add_bias_residual


def variants(direction):
    return fused_op_variants(direction, ("a", "b", "bias"), load_ours, eager_residual,
                             "the eager model's path: the convolution's bias pass, then the residual sum", DTYPE)


CASES = []
for _site in SITES:
    for _direction in ("fwd", "fwd+bwd"):
        CASES.append(Case("bias_residual", _site[0], _direction, make_setup(_site, _direction), variants(_direction),
                          level="kernel", describe=f"{'x'.join(map(str, _site[1:5]))}, {_site[5]}"))

PARAMS = [pytest.param(case, variant, id=f"{case.name}-{case.direction}-{variant.name}")
          for case in CASES for variant in case.variants]


@pytest.mark.parametrize("case,variant", PARAMS)
def test_bias_residual(benchmark, case, variant):
    run_variant(benchmark, case, variant)
