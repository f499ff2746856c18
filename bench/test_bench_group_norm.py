"""GroupNorm (+ time scale/shift) (+ SiLU) (+ dropout) at the seed UNet's sites: ours
(kernels.group_norm_silu) vs eager PyTorch (bf16, bf16 under autocast, fp32) and torch.compile of the
same math.

Dropout sites (the ResBlock's second norm in training, p = 0.1): ours fuses the dropout (its mask
regenerated in backward, never stored), the anchors follow the norm with F.dropout as the eager
model does. Checked with a fixed mask (the kernels' own, dropout_keep_mask) on both sides, timed
with a fresh mask per call.

Full size (GPU): batch 128, bf16 activations, fp32 affine weights (the trainer's mixed precision),
channels_last (the trainer's layout on CUDA; the 64x64 dropout site in NCHW too).
Memory-bound: the floor is the fewest bytes / copy bandwidth; forward moves x in and y out,
forward+backward adds x and dy in and dx out (5 tensors of x's size; per-channel vectors ignored).
Goals (issue 3): forward >= 80 % of copy bandwidth; forward+backward >= 1.3x torch.compile and
>= 3x eager. Reference: the same math in float64 on the same inputs.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

from bench.harness import DEVICE, ON_GPU, SETTINGS, Case, CaseState, Goal, Runner, Variant, autotuned, \
    compile_fn, input_set_count, run_variant

CL, NCHW = "channels_last", "nchw"
#        name                N    C    H   W   scale/shift  silu  dropout  layout
FULL_SITES = [
    ("res64_pre_ss", 128, 128, 64, 64, True, True, 0.0, CL),   # ResBlock norm2 at 64x64 (time scale/shift, "pre")
    ("res64_pre_ss_drop", 128, 128, 64, 64, True, True, 0.1, CL),  # the same in training: dropout fused
    ("res64_pre_ss_drop_nchw", 128, 128, 64, 64, True, True, 0.1, NCHW),  # --no-channels-last
    ("up64_cat", 128, 256, 64, 64, False, True, 0.0, CL),      # first up ResBlock norm1 after the skip concat
    ("res32_pre_ss", 128, 256, 32, 32, True, True, 0.0, CL),
    ("res16_pre_ss", 128, 512, 16, 16, True, True, 0.0, CL),
    ("mid8_pre_ss", 128, 512, 8, 8, True, True, 0.0, CL),
    ("attn16_norm", 128, 512, 16, 16, False, False, 0.0, CL),  # attention block's plain GroupNorm
]
SMALL_SITES = [
    ("c48_7x5_pre_ss", 2, 48, 7, 5, True, True, 0.0, NCHW),      # 6 channels per group, odd H x W
    ("c48_7x5_pre_ss_drop", 2, 48, 7, 5, True, True, 0.2, NCHW),
    ("c64_7x5_pre_ss_drop_cl", 2, 64, 7, 5, True, True, 0.2, CL),  # dropout octets of 8 channels
    ("c64_4x4_norm", 1, 64, 4, 4, False, False, 0.0, NCHW),
]
DROPOUT_SEED = 0x0DD5_EED5_1234  # the fixed mask of the numerical check
GROUPS = 8
EPS = 1e-5
SITES = FULL_SITES if SETTINGS.full else SMALL_SITES
DTYPE = torch.bfloat16 if ON_GPU else torch.float32  # the interpreter mishandles bf16


def element_size(dtype):
    return torch.empty((), dtype=dtype).element_size()


def make_setup(site, direction):
    name, n, c, h, w, has_ss, silu, dropout_p, layout = site
    memory_format = torch.channels_last if layout == CL else torch.contiguous_format

    def bytes_moved(dtype):
        tensor = n * c * h * w * element_size(dtype)
        vectors = (2 * n * c if has_ss else 0) * element_size(dtype) + 2 * c * 4
        return (2 if direction == "fwd" else 5) * tensor + (1 if direction == "fwd" else 2) * vectors

    def setup():
        from kernels import dropout_keep_mask, dropout_scale, group_norm_silu_reference

        per_set = bytes_moved(DTYPE)
        sets = []
        for s in range(input_set_count(per_set)):
            g = torch.Generator().manual_seed(1000 + s)
            inputs = {
                "x": (torch.randn(n, c, h, w, generator=g) * 1.5 + 0.3),
                "weight": 1 + 0.2 * torch.randn(c, generator=g),
                "bias": 0.2 * torch.randn(c, generator=g),
                "scale": 0.3 * torch.randn(n, c, generator=g) if has_ss else None,
                "shift": 0.3 * torch.randn(n, c, generator=g) if has_ss else None,
                "dy": torch.randn(n, c, h, w, generator=g),
            }
            dtypes = {"x": DTYPE, "scale": DTYPE, "shift": DTYPE, "dy": DTYPE, "weight": torch.float32,
                      "bias": torch.float32}
            sets.append({k: None if v is None else v.to(DEVICE, dtypes[k]).contiguous(
                memory_format=memory_format if v.dim() == 4 else torch.contiguous_format) for k, v in inputs.items()})
        first = sets[0]
        leaves64 = {k: None if first[k] is None else first[k].to(torch.float64).requires_grad_(direction != "fwd")
                    for k in ("x", "weight", "bias", "scale", "shift")}
        seed = torch.tensor([DROPOUT_SEED], device=DEVICE)
        y = group_norm_silu_reference(leaves64["x"], leaves64["weight"], leaves64["bias"], GROUPS, EPS,
                                      scale=leaves64["scale"], shift=leaves64["shift"], mode="pre", silu=silu,
                                      dropout_p=dropout_p, seed=seed)
        extra = {}
        if dropout_p:
            # the kernels' keep * scale for the fixed seed, for the anchors' checked runs
            keep = dropout_keep_mask(seed, (n, c, h, w), dropout_p, layout == CL).to(DEVICE)
            extra = {"seed": seed, "keep_scaled": keep * dropout_scale(dropout_p)}
        names = ("y",)
        reference = (y.detach(),)
        if direction != "fwd":
            present = [k for k in ("x", "weight", "bias", "scale", "shift") if leaves64[k] is not None]
            grads = torch.autograd.grad(y, [leaves64[k] for k in present], first["dy"].to(torch.float64))
            reference += tuple(g.detach() for g in grads)
            names += tuple(f"d{k}" for k in present)
        return CaseState(input_sets=sets, reference=reference, outputs=names, bytes=bytes_moved, extra=extra,
                         info={"shape": f"{n}x{c}x{h}x{w}", "groups": GROUPS, "scale_shift": has_ss, "silu": silu,
                               "dropout": dropout_p, "layout": layout, "x_dtype": str(DTYPE).replace("torch.", ""),
                               "input_sets": len(sets)})

    return setup


def op_runner(op, direction, silu, cast=None, autocast=False):
    """A callable(inputs) running `op` forward, or forward and backward (torch.autograd.grad with
    the case's dy) returning (y, dx, dweight, dbias[, dscale, dshift])."""

    def run(inputs):
        if cast is not None:
            inputs = cast(inputs)
        names = [k for k in ("x", "weight", "bias", "scale", "shift") if inputs[k] is not None]
        leaves = {k: inputs[k] if direction == "fwd" else inputs[k].detach().requires_grad_() for k in names}
        context = torch.autocast(DEVICE.type, dtype=torch.bfloat16) if autocast else torch.enable_grad()
        with context:
            y = op(leaves["x"], leaves["weight"], leaves["bias"], GROUPS, EPS, scale=leaves.get("scale"),
                   shift=leaves.get("shift"), mode="pre", silu=silu)
        if direction == "fwd":
            return (y,)
        grads = torch.autograd.grad(y, [leaves[k] for k in names], dy_as(inputs["dy"], y.dtype))
        return (y, *grads)

    converted = {}

    def dy_as(dy, dtype):  # made once per input set (autocast's fp32 output wants an fp32 dy)
        if dy.dtype == dtype:
            return dy
        key = (id(dy), dtype)
        if key not in converted:
            converted[key] = dy.to(dtype)
        return converted[key]

    if direction == "fwd":
        def run_no_grad(inputs):
            with torch.no_grad():
                return run(inputs)

        return run_no_grad
    return run


def then_dropout(op, dropout_p, keep_scaled=None):
    """op followed by dropout: F.dropout (a fresh mask, timed) or y * keep_scaled (checked)."""
    def op_and_dropout(*args, **kwargs):
        y = op(*args, **kwargs)
        return F.dropout(y, dropout_p, training=True) if keep_scaled is None else y * keep_scaled.to(y.dtype)

    return op_and_dropout


def variants(site, direction):
    silu, dropout_p = site[6], site[7]

    def runner(state, make_op, wrap=lambda op: op, **options):
        """Runner of an op; with dropout, timed with a fresh mask and checked with the fixed one.
        make_op(dropout_p, seed, keep_scaled) builds the op (seed and keep_scaled None: a fresh
        mask); wrap (e.g. torch.compile) is applied to each op built."""
        if not dropout_p:
            return op_runner(wrap(make_op(0.0, None, None)), direction, silu, **options)
        check = op_runner(wrap(make_op(dropout_p, state.extra["seed"], state.extra["keep_scaled"])),
                          direction, silu, **options)
        return Runner(run=op_runner(wrap(make_op(dropout_p, None, None)), direction, silu, **options), check=check)

    def fused(p, seed, _keep_scaled):  # ours: dropout inside the kernel
        from kernels import group_norm_silu

        return functools.partial(group_norm_silu, dropout_p=p, seed=seed) if p else group_norm_silu

    def separate(p, _seed, keep_scaled):  # anchors: the norm, then dropout as its own op
        from kernels import group_norm_silu_reference

        return then_dropout(group_norm_silu_reference, p, keep_scaled) if p else group_norm_silu_reference

    def ours(state):
        return runner(state, fused)

    def eager(state):
        return runner(state, separate)

    def eager_autocast(state):
        return runner(state, separate, autocast=True)

    def eager_fp32(state):
        copies = {id(s): {k: None if v is None else v.float() for k, v in s.items()} for s in state.input_sets}
        return runner(state, separate, cast=lambda inputs: copies[id(inputs)])

    def compiled(mode):
        def build(state):
            return runner(state, separate, wrap=lambda op: compile_fn(op, mode))

        return build

    def compiled_ours(state):
        return runner(state, fused, wrap=lambda op: compile_fn(op, fullgraph=True))

    out = [
        Variant("triton", ours, role="ours", dtype=DTYPE),
        Variant("triton_compile", compiled_ours, role="ours", dtype=DTYPE, cpu=False,
                note="torch.compile(fullgraph) around the custom op"),
        Variant("triton_autotuned", autotuned(ours), role="ours", dtype=DTYPE, gpu_only=True, explicit=True,
                note="launch configurations timed on first use (kernels.autotune)"),
        Variant("eager", eager, dtype=DTYPE, note="group_norm_silu_reference in x's dtype"
                + (", then F.dropout" if dropout_p else "")),
        Variant("eager_autocast", eager_autocast, dtype=DTYPE,  # (on CPU the inputs are fp32: so is autocast)
                note="bf16 autocast: GroupNorm runs in fp32, as in the eager model"),
        Variant("compile", compiled("default"), dtype=DTYPE, cpu=False),
        Variant("compile_max_autotune", compiled("max-autotune"), dtype=DTYPE, gpu_only=True, graph=False,
                note="max-autotune replays its own CUDA graphs (cudagraph trees): timed as plain calls"),
    ]
    if DTYPE != torch.float32:
        out.insert(4, Variant("eager_fp32", eager_fp32, dtype=torch.float32, note="fp32 copies of the inputs"))
    return out


OURS = ("triton", "triton_autotuned")  # a goal counts the faster of the two that ran


def goals(direction):
    if direction == "fwd":
        return [Goal("forward >= 80% of copy bandwidth", "pct_ceiling", OURS, 80.0)]
    return [Goal("forward+backward >= 1.3x torch.compile", "speedup", OURS, 1.3, ("compile",)),
            Goal("forward+backward >= 3x eager", "speedup", OURS, 3.0, ("eager", "eager_autocast"))]


CASES = []
for _site in SITES:
    for _direction in ("fwd", "fwd+bwd"):
        CASES.append(Case("group_norm", _site[0], _direction, make_setup(_site, _direction),
                          variants(_site, _direction), level="kernel", goals=goals(_direction),
                          describe=f"{'x'.join(map(str, _site[1:5]))}, {GROUPS} groups"
                                   f"{', scale/shift' if _site[5] else ''}{', SiLU' if _site[6] else ''}"
                                   f"{f', dropout {_site[7]}' if _site[7] else ''}, {_site[8]}"))

PARAMS = [pytest.param(case, variant, id=f"{case.name}-{case.direction}-{variant.name}")
          for case in CASES for variant in case.variants]


@pytest.mark.parametrize("case,variant", PARAMS)
def test_group_norm(benchmark, case, variant):
    run_variant(benchmark, case, variant)
