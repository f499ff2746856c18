"""The decoder's skip concatenation at the seed UNet's three stages: ours (kernels.upsample2x_concat,
one pass: h plus its transposed convolution's bias, and the skip upsampled 2x) vs the eager model's own
path (the bias added to h, as PyTorch adds a cuDNN convolution's bias; the skip copied to fp32
channels_last, F.interpolate, cast back, torch.cat) and torch.compile of that path.

Full size (GPU): batch 128, bf16, channels_last (the trainer's layout on CUDA; the 64x64 stage in NCHW
too). Memory-bound: the floor is the fewest bytes / copy bandwidth; forward reads h and skip and writes
the concatenation; backward (h's gradient is a view of dout's, as torch.cat's) reads dout (the bias's
gradient sums its h part) and writes the skip's gradient. Reference: the same math in float64 on the
same inputs.
"""
import pytest
import torch

from bench.harness import DEVICE, ON_GPU, SETTINGS, Case, CaseState, fused_op_variants, input_set_count, run_variant

CL, NCHW = "channels_last", "nchw"
#        name          N    Ch   Cs   H   W  (skip's size; h is 2H x 2W)  layout
FULL_SITES = [
    ("skip64", 128, 128, 128, 32, 32, CL),
    ("skip64_nchw", 128, 128, 128, 32, 32, NCHW),
    ("skip32", 128, 256, 256, 16, 16, CL),
    ("skip16", 128, 512, 512, 8, 8, CL),
]
SMALL_SITES = [("c6_7x5", 3, 5, 6, 7, 5, NCHW), ("c16_4x4_cl", 2, 8, 16, 4, 4, CL)]
SITES = FULL_SITES if SETTINGS.full else SMALL_SITES
DTYPE = torch.bfloat16 if ON_GPU else torch.float32  # the interpreter rounds fp32 -> bf16 by truncation


def make_setup(site, direction):
    name, n, ch, cs, height, width, layout = site
    memory_format = torch.channels_last if layout == CL else torch.contiguous_format
    big = 4 * height * width  # output positions

    def bytes_moved(dtype):
        forward = n * (ch * big + cs * height * width + (ch + cs) * big)
        backward = n * ((ch + cs) * big + cs * height * width)
        return (forward + (backward if direction != "fwd" else 0)) * torch.empty((), dtype=dtype).element_size()

    def setup():
        from kernels import upsample2x_concat_reference

        sets = []
        for s in range(input_set_count(bytes_moved(DTYPE))):
            g = torch.Generator().manual_seed(3000 + s)
            tensors = {"h": torch.randn(n, ch, 2 * height, 2 * width, generator=g),
                       "skip": torch.randn(n, cs, height, width, generator=g) * 2 + 0.5,
                       "dout": torch.randn(n, ch + cs, 2 * height, 2 * width, generator=g)}
            inputs = {k: v.to(DEVICE, DTYPE).contiguous(memory_format=memory_format) for k, v in tensors.items()}
            inputs["bias"] = (torch.randn(ch, generator=g) * 0.5).to(DEVICE)  # fp32, a parameter under autocast
            sets.append(inputs)
        first = sets[0]
        leaves = [first[k].to(torch.float64).requires_grad_(direction != "fwd") for k in ("h", "skip", "bias")]
        out = upsample2x_concat_reference(*leaves)
        reference, names = (out.detach(),), ("out",)
        if direction != "fwd":
            reference += tuple(g.detach() for g in torch.autograd.grad(out, leaves, first["dout"].double()))
            names += ("dh", "dskip", "dbias")
        return CaseState(input_sets=sets, reference=reference, outputs=names, bytes=bytes_moved,
                         info={"h": f"{n}x{ch}x{2 * height}x{2 * width}", "skip": f"{n}x{cs}x{height}x{width}",
                               "layout": layout, "dtype": str(DTYPE).replace("torch.", ""), "input_sets": len(sets)})

    return setup


def eager_concat(h, skip, bias):
    """The eager model's decoder stage after its transposed convolution: the bias pass, then the resize
    and concatenation of dream.model.concat_skip."""
    from dream.model import resize_skip

    h = h + bias.view(1, -1, 1, 1).to(h.dtype)
    return torch.cat([h, resize_skip(skip, h)], dim=1)


def load_ours():
    from kernels import upsample2x_concat

    return upsample2x_concat


def variants(direction):
    return fused_op_variants(direction, ("h", "skip", "bias"), load_ours, eager_concat,
                             "the eager model's path: bias pass, fp32 channels_last copy, F.interpolate, cast, "
                             "torch.cat", DTYPE)


CASES = []
for _site in SITES:
    for _direction in ("fwd", "fwd+bwd"):
        CASES.append(Case("upsample_concat", _site[0], _direction, make_setup(_site, _direction), variants(_direction),
                          level="kernel", describe=f"h {_site[1]}x{_site[2]}x{2 * _site[4]}x{2 * _site[5]}, "
                                                   f"skip {_site[1]}x{_site[3]}x{_site[4]}x{_site[5]}, {_site[6]}"))

PARAMS = [pytest.param(case, variant, id=f"{case.name}-{case.direction}-{variant.name}")
          for case in CASES for variant in case.variants]


@pytest.mark.parametrize("case,variant", PARAMS)
def test_upsample_concat(benchmark, case, variant):
    run_variant(benchmark, case, variant)
