"""kernels.group_norm_silu (fused GroupNorm + scale/shift + SiLU) against a float64 reference.

Every test draws fresh random x, gamma, beta, s, t and dy (never zeros or ones), runs the Triton
op, and compares y, mean, rstd and the gradients of x, weight, bias, scale and shift with
group_norm_silu_reference (plain torch) evaluated in float64 on the same rounded inputs.

Error metric: max|actual - expected| / max|expected| over the whole tensor.

| x dtype         | y, dx, dweight, dbias, dscale, dshift | mean, rstd | why                          |
| --------------- | ------------------------------------- | ---------- | ---------------------------- |
| float32         | 1e-5                                  | 1e-5       | fp32 math, fp32 outputs      |
| float16         | 2e-3                                  | 1e-5       | outputs rounded to fp16      |
|                 |                                       |            | (2^-11); stats stay fp32     |
| bfloat16 (GPU)  | 1.6e-2                                | 1e-5       | 8x the fp16 unit roundoff    |

Parameters may be fp32 while x is half; their gradients are then fp32 and held to the float32 row (each
gradient to the row of its own dtype). With dropout the reference applies the kernels' mask computed
independently (dropout_keep_mask: Philox in torch int64 arithmetic), so the same tolerances hold, and the kernel's
zeros must be exactly the mask's. bf16 runs only with CUDA: the Triton interpreter mishandles bf16. Every
buffer the launchers allocate (outputs and partial sums) is filled with NaN first, so an
unwritten element fails.
"""
import importlib
import zlib

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from conftest import DEVICE, ON_GPU, assert_fake_matches_real

from kernels.layout import memory_format_of  # noqa: E402
from kernels.group_norm_silu import (dropout_keep_mask, group_norm_silu,  # noqa: E402
                                     group_norm_silu_reference, new_dropout_seed)

# the module itself (the package attribute `kernels.group_norm_silu` is the function)
gns = importlib.import_module("kernels.group_norm_silu")

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
STATS_TOLERANCE = 1e-5
EPS = 1e-5

_needs_cuda = pytest.mark.skipif(not ON_GPU, reason="bf16 needs CUDA (the interpreter mishandles bf16)")
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=_needs_cuda)]

# (N, C, H, W, groups). On CPU each (sample, group) is one interpreted program (~10-40 ms), so
# the grids stay at tens of programs while covering: 12 and 6 channels per group (not powers
# of two), 7x5, 3x6 and 1x1 images, batch 1, 2 and 3. The GPU adds UNet sites and big batches.
CPU_SHAPES = [
    (3, 96, 7, 5, 8),
    (1, 96, 7, 5, 8),
    (3, 12, 1, 1, 2),
    (2, 18, 3, 6, 3),
]
GPU_SHAPES = [
    (128, 256, 16, 16, 8),
    (16, 128, 64, 64, 8),  # 128 groups < 2 per SM: each group's positions split over 2 programs
    (2, 512, 8, 8, 8),  # few groups, but one tile each: no split
    (1, 32, 96, 96, 8),  # the split path with a partial last split (9216 positions)
    (1024, 64, 8, 8, 8),
    (7, 1024, 9, 3, 8),
]
SHAPES = CPU_SHAPES + (GPU_SHAPES if ON_GPU else [])
# with dropout: the split path, a UNet site and odd sizes are enough on the GPU
DROPOUT_SHAPES = CPU_SHAPES + ([GPU_SHAPES[0], GPU_SHAPES[1], GPU_SHAPES[5]] if ON_GPU else [])


@pytest.fixture(autouse=True)
def _poison_new_buffers(monkeypatch):
    monkeypatch.setattr(gns, "_POISON_NEW_BUFFERS", True)


@pytest.fixture
def launches(monkeypatch):
    """The launch configurations (_LaunchConfig) the op runs with during the test, in order."""
    seen = []
    launch_config = gns._launch_config

    def recording(*args, **kwargs):
        seen.append(launch_config(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(gns, "_launch_config", recording)
    return seen


@pytest.fixture(params=[True, False], ids=["resident", "looped"])
def resident(request, monkeypatch, launches):
    """Both kernel paths: where one tile holds a whole block, the resident one (x, dy read once) or,
    with gns._RESIDENT_TILES off, the looped one. Checks after the test that the path ran: on CPU
    (4096-element tiles) every test shape is resident by heuristic; GPU sizes may not be."""
    monkeypatch.setattr(gns, "_RESIDENT_TILES", request.param)
    yield request.param
    assert launches, "no launch recorded"
    if not request.param:
        assert not any(cfg.resident for cfg in launches)
    elif not ON_GPU:
        assert all(cfg.resident for cfg in launches)


def _seed(*params):
    return zlib.crc32(repr(params).encode())


def _make_inputs(shape, dtype, param_dtype, has_scale, has_shift, channels_last, seed):
    """Random x (with a nonzero mean), gamma, beta, s, t and dy on DEVICE."""
    N, C, H, W, _ = shape
    gen = torch.Generator().manual_seed(seed)

    def randn(*size, std=1.0, mean=0.0):
        return torch.randn(*size, generator=gen, dtype=torch.float64) * std + mean

    x = randn(N, C, H, W, std=1.7, mean=0.6).to(device=DEVICE, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = randn(C, std=0.5, mean=1.0).to(device=DEVICE, dtype=param_dtype)
    bias = randn(C, std=0.4).to(device=DEVICE, dtype=param_dtype)
    scale = randn(N, C, std=0.4).to(device=DEVICE, dtype=param_dtype) if has_scale else None
    shift = randn(N, C, std=0.5).to(device=DEVICE, dtype=param_dtype) if has_shift else None
    dy = randn(N, C, H, W).to(device=DEVICE, dtype=dtype)
    return x, weight, bias, scale, shift, dy


def _rel_err(actual, expected):
    assert torch.isfinite(actual).all(), "non-finite values (an element left unwritten?)"
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def _float64_stats(x, scale, shift, num_groups, mode, eps=EPS):
    u = x.double()
    if mode == "pre":
        if scale is not None:
            u = u * (1 + scale.double()[:, :, None, None])
        if shift is not None:
            u = u + shift.double()[:, :, None, None]
    u = u.reshape(u.shape[0], num_groups, -1)
    mean = u.mean(dim=2)
    rstd = (u.var(dim=2, unbiased=False) + eps).rsqrt()
    return mean, rstd


def _check_against_float64(shape, dtype, mode, silu, has_scale, has_shift, channels_last,
                            param_dtype=None, seed_extra=(), dropout_p=0.0, eps=EPS):
    param_dtype = param_dtype or dtype
    num_groups = shape[4]
    test_seed = _seed(shape, dtype, mode, silu, has_scale, has_shift, channels_last, param_dtype, seed_extra,
                      dropout_p, eps)
    x, weight, bias, scale, shift, dy = _make_inputs(
        shape, dtype, param_dtype, has_scale, has_shift, channels_last, test_seed)
    names = ["x", "weight", "bias", "scale", "shift"]
    leaves = [x, weight, bias, scale, shift]
    wanted = [(name, leaf.requires_grad_()) for name, leaf in zip(names, leaves) if leaf is not None]
    # a 64-bit dropout seed with both 32-bit halves nonzero
    seed = (torch.tensor([(test_seed & 0x7FFFFFFF) << 32 | (test_seed ^ 0x5A5A5A5A)], device=DEVICE)
            if dropout_p else None)

    y, mean, rstd = torch.ops.dream_kernels.group_norm_silu_fwd(
        x, weight, bias, scale, shift, num_groups, eps, mode, silu, dropout_p, seed)
    grads = torch.autograd.grad(y, [leaf for _, leaf in wanted], dy)

    leaves64 = [leaf.detach().double().requires_grad_() if leaf is not None else None for leaf in leaves]
    y64 = group_norm_silu_reference(*leaves64[:3], num_groups, eps, *leaves64[3:], mode=mode, silu=silu,
                                    dropout_p=dropout_p, seed=seed)
    if dropout_p:
        keep = dropout_keep_mask(seed, x.shape, dropout_p, memory_format_of(x) == torch.channels_last).to(DEVICE)
        assert not y[~keep].any(), "the kernel kept an element dropout_keep_mask drops"
        clear = y64.detach().abs() > 1e-6  # kept, where the output cannot round to 0
        assert y[clear].all(), "the kernel dropped an element dropout_keep_mask keeps"
    grads64 = torch.autograd.grad(y64, [leaf for leaf in leaves64 if leaf is not None], dy.double())
    mean64, rstd64 = _float64_stats(x, scale, shift, num_groups, mode, eps)

    tol = TOLERANCE[dtype]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    assert y.dtype == dtype and y.is_contiguous(memory_format=memory_format)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (shape[0], num_groups)
    errors = {"y": _rel_err(y, y64), "mean": _rel_err(mean, mean64), "rstd": _rel_err(rstd, rstd64)}
    limits = {"y": tol, "mean": STATS_TOLERANCE, "rstd": STATS_TOLERANCE}
    for (name, leaf), grad, grad64 in zip(wanted, grads, grads64):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape, name
        errors["d" + name] = _rel_err(grad, grad64)
        limits["d" + name] = TOLERANCE[leaf.dtype]  # an fp32 parameter's gradient is fp32 math beside half x
    assert grads[0].is_contiguous(memory_format=memory_format)
    failed = {name: (err, limits[name]) for name, err in errors.items() if not err <= limits[name]}
    assert not failed, f"errors above tolerance (error, tolerance): {failed} (all: {errors})"


# ----------------------------------------------------------------------------------------------
# Forward and all gradients against float64
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("mode", ["pre", "post"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_scale_shift_silu_matches_float64(shape, dtype, mode, channels_last, resident):
    # fp32 parameters with half activations (the UNet under autocast); same dtype for fp32
    _check_against_float64(shape, dtype, mode, True, True, True, channels_last,
                           param_dtype=torch.float32, seed_extra=(resident,))


@pytest.mark.parametrize("has_scale,has_shift", [(False, False), (True, False), (False, True)],
                         ids=["plain", "scale_only", "shift_only"])
@pytest.mark.parametrize("silu", [True, False], ids=["silu", "no_act"])
@pytest.mark.parametrize("mode", ["pre", "post"])
def test_optional_scale_shift_and_activation(mode, silu, has_scale, has_shift, resident):
    # the looped backward sums du*x only with a scale and du only with a shift: each alone on both paths
    _check_against_float64((1, 96, 7, 5, 8), torch.float32, mode, silu, has_scale, has_shift,
                           channels_last=silu, seed_extra=(resident,))


@pytest.mark.parametrize("has_scale,has_shift", [(True, False), (False, True)], ids=["scale_only", "shift_only"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_optional_scale_or_shift_with_split_positions(monkeypatch, launches, channels_last, has_scale, has_shift):
    # each group's positions split over programs: the partial sums of du*x and du merged across them
    monkeypatch.setattr(gns, "_LAUNCH_OVERRIDE", dict(block_c=8, block_hw=16, split=2))
    _check_against_float64((1, 24, 7, 5, 2), torch.float32, "pre", True, has_scale, has_shift, channels_last)
    assert launches and all(cfg.num_splits == 2 for cfg in launches)


@pytest.mark.parametrize("eps", [0.3, 1e-3])
@pytest.mark.parametrize("mode", ["pre", "post"])
def test_eps_other_than_the_default(mode, eps, resident):
    # eps reaches the forward's rstd = (var + eps)^-1/2 and the backward's recomputation on both paths
    # (0.3 is of the order of these groups' variance, so a kernel that used 1e-5 instead fails by ~10%)
    _check_against_float64((3, 12, 7, 5, 2), torch.float32, mode, True, True, True, mode == "pre",
                           seed_extra=(resident,), eps=eps)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["pre", "post"])
def test_half_parameters(dtype, mode):
    # weight/bias/scale/shift in x's dtype: their gradients come back in that dtype
    _check_against_float64((1, 96, 7, 5, 8), dtype, mode, True, True, True, channels_last=False)


@pytest.mark.parametrize("fp32_parameters", [("weight", "shift"), ("bias", "scale")], ids="+".join)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["pre", "post"])
def test_parameters_each_in_its_own_dtype(dtype, mode, fp32_parameters):
    # two of gamma, beta, s, t fp32, the other two in x's dtype (each may be either): each is read as fp32 and the
    # backward op returns each gradient in its own dtype (checked on the op's outputs: autograd would cast a
    # gradient of the wrong dtype to its input's silently), all against float64
    shape = (3, 12, 7, 5, 2)
    x, weight, bias, scale, shift, dy = _make_inputs(shape, dtype, torch.float32, True, True, False,
                                                     _seed("own dtypes", dtype, mode, *fp32_parameters))
    parameters = dict(weight=weight, bias=bias, scale=scale, shift=shift)
    leaves = [x] + [value if name in fp32_parameters else value.to(dtype) for name, value in parameters.items()]
    y, mean, rstd = torch.ops.dream_kernels.group_norm_silu_fwd(*leaves[:3], *leaves[3:], shape[4], EPS, mode, True)
    grads = torch.ops.dream_kernels.group_norm_silu_bwd(dy, *leaves, mean, rstd, shape[4], EPS, mode, True)
    leaves64 = [leaf.detach().double().requires_grad_() for leaf in leaves]
    y64 = group_norm_silu_reference(*leaves64[:3], shape[4], EPS, *leaves64[3:], mode=mode)
    grads64 = torch.autograd.grad(y64, leaves64, dy.double())
    errors = {"y": _rel_err(y, y64)}
    for name, leaf, grad, grad64 in zip(["x", "weight", "bias", "scale", "shift"], leaves, grads, grads64):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape, name
        errors["d" + name] = _rel_err(grad, grad64)
    limits = {"y": TOLERANCE[dtype], **{"d" + name: TOLERANCE[leaf.dtype]
                                        for name, leaf in zip(["x", "weight", "bias", "scale", "shift"], leaves)}}
    failed = {name: (err, limits[name]) for name, err in errors.items() if not err <= limits[name]}
    assert not failed, f"errors above tolerance (error, tolerance): {failed} (all: {errors})"


# Forced launch configurations: channel blocks smaller than a group (12 = 8 + a tail of 4),
# position tiles with a tail (35 = 2*16 + 3), each group's positions split over programs
# (the statistics / channel-sum kernels plus the merge in the main kernels), and a grid capped below
# the number of groups (programs loop over them).
FORCED_CONFIGS = [
    dict(block_c=8, block_hw=16),
    dict(block_c=8, block_hw=16, split=2),
    dict(block_c=4, block_hw=8, split=3),
    dict(block_c=8, block_hw=16, programs=1),  # a capped grid: one program loops over both groups
    dict(block_c=16, block_hw=64, programs=1),  # ... over both groups, each resident in one tile
]


@pytest.mark.parametrize("config", FORCED_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("mode,channels_last", [("pre", True), ("post", False)])
def test_forced_tiles_tails_and_splits(monkeypatch, launches, config, mode, channels_last):
    monkeypatch.setattr(gns, "_LAUNCH_OVERRIDE", config)
    _check_against_float64((1, 24, 7, 5, 2), torch.float32, mode, True, True, True, channels_last,
                           seed_extra=tuple(config.items()))
    assert all(cfg.resident == (config["block_c"] >= 12 and config["block_hw"] >= 35) for cfg in launches)


# The seed UNet's 8x8 and 16x16 sites (64 channels a group) with whole-block tiles, the tuner's
# resident candidates, up to 16 warps and 32 elements a thread (batch cut down for the interpreter)
WHOLE_BLOCK_SITES = [((2, 512, 8, 8, 8), dict(block_c=64, block_hw=64, num_warps=8)),
                     ((1, 512, 16, 16, 8), dict(block_c=64, block_hw=256, num_warps=16))]


@pytest.mark.parametrize("shape,config", WHOLE_BLOCK_SITES, ids=["8x8", "16x16"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_whole_block_tiles_at_unet_sites(monkeypatch, launches, shape, config, dtype, channels_last):
    monkeypatch.setattr(gns, "_LAUNCH_OVERRIDE", config)
    _check_against_float64(shape, dtype, "pre", True, True, True, channels_last, param_dtype=torch.float32,
                           dropout_p=0.1)
    assert launches and all(cfg.resident for cfg in launches)


# Several adjacent groups per program (channels_last with a power-of-two number of channels per
# group: a tile row spans groups*Cg contiguous channels; statistics and sums reduced per group).
@pytest.mark.parametrize("groups,programs", [(2, 0), (4, 0), (2, 5)], ids=["2groups", "4groups", "2groups-5programs"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["pre", "post"])
def test_several_groups_per_program(monkeypatch, groups, programs, dtype, mode, resident):
    # 5 programs: a capped grid looping over the 12 two-group blocks (2 or 3 each)
    monkeypatch.setattr(gns, "_LAUNCH_OVERRIDE", dict(groups=groups, programs=programs))
    _check_against_float64((3, 32, 7, 5, 8), dtype, mode, True, True, True, True,
                           seed_extra=(groups, programs, resident))


@pytest.mark.parametrize("shape,groups", [((1, 64, 3, 3, 16), 8), ((2, 16, 1, 1, 4), 4), ((3, 32, 7, 5, 8), 8),
                                          ((2, 16, 3, 3, 8), 8)], ids=str)
def test_several_groups_per_program_by_heuristic(shape, groups):
    # the interpreter's heuristic: 32 contiguous channels (8 groups of 4), or all C of them
    N, C, H, W, num_groups = shape
    config = gns._launch_config(N, C, H * W, num_groups, 1, torch.device(DEVICE), backward=False)
    assert ON_GPU or config.groups == groups
    _check_against_float64(shape, torch.float32, "pre", True, True, True, True)
    _check_against_float64(shape, torch.float32, "post", False, False, True, True, seed_extra=("post",))


@pytest.mark.parametrize("groups", [2, 8])
def test_several_groups_per_program_with_dropout(monkeypatch, groups):
    monkeypatch.setattr(gns, "_LAUNCH_OVERRIDE", dict(groups=groups))
    _check_against_float64((3, 32, 7, 5, 8), torch.float32, "pre", True, True, True, True,
                           seed_extra=(groups,), dropout_p=0.2)


def test_groups_per_program_heuristic_on_an_h100(monkeypatch):
    """_launch_config as on a 132-SM GPU: 32 contiguous channels in channels_last while the grid keeps
    two programs per SM, else one group per program (and the split path for small batches)."""
    monkeypatch.setattr(gns, "_INTERPRETED", False)
    monkeypatch.setattr(gns, "_sm_count", lambda device: 132)

    def config(n, c, hw, groups=32, channels_last=True, backward=False, dropout=False):
        stride_c = 1 if channels_last else hw
        return gns._launch_config(n, c, hw, groups, stride_c, None, backward,
                                  ("channels" if channels_last else "positions") if dropout else None)

    res64 = config(128, 128, 64 * 64)  # the seed's 64x64 site: 4 channels per group
    assert (res64.groups, res64.block_c, res64.block_hw, res64.num_splits) == (8, 32, 64, 1)
    assert config(128, 128, 64 * 64, backward=True, dropout=True)[:2] == (32, 32)
    assert config(128, 256, 32 * 32).groups == 4 and config(128, 512, 16 * 16).groups == 2
    assert config(128, 1024, 8 * 8).groups == 1  # 32 channels per group: already 64 bytes
    assert config(128, 96, 64, groups=8).groups == 1  # 12 channels per group: not a power of two
    assert config(128, 128, 64 * 64, channels_last=False).groups == 1
    small = config(2, 128, 64 * 64)  # 64 groups < 2 per SM: one group a program, positions split
    assert small.groups == 1 and small.num_splits > 1
    assert config(32, 128, 64 * 64).groups == 2  # 32*32/8 and /4 programs < 264, /2 = 512 not


def test_whole_block_candidates_run_resident(monkeypatch):
    """launch_candidates offers tiles holding a whole block (besides its usual tiles, which may: 4 to 32
    elements a thread forward, 4 to 16 backward) where a block is that small, and _launch_config runs
    them on the resident path. Pairs: (elements a thread, groups a program)."""
    monkeypatch.setattr(gns, "_INTERPRETED", False)
    monkeypatch.setattr(gns, "_sm_count", lambda device: 132)

    def whole(cg, hw, backward, contiguous=False):
        heuristic = gns._config_of(gns._launch_config(128, 8 * cg, hw, 8, 1 if contiguous else hw, None, backward),
                                   None)
        candidates = gns.launch_candidates(cg, 8, hw, contiguous, heuristic, "quick", backward=backward)
        picked = [c for c in candidates
                  if gns._launch_config(128, 8 * cg, hw, 8, 1 if contiguous else hw, None, backward,
                                        override=c).resident]
        return {(c["block_c"] * c["block_hw"] // (32 * c["num_warps"]), c["groups"]) for c in picked}

    assert whole(64, 64, False) >= {(32, 1), (16, 1), (8, 1)}  # the seed's 8x8 site: 4096 elements a group
    assert whole(64, 64, True) >= {(16, 1), (8, 1)}
    assert whole(64, 256, False) == {(32, 1)}  # 16x16: 16384 elements, only on 16 warps
    assert whole(64, 256, True) == set()
    assert whole(16, 4096, False) == set()  # 64x64: 65536 elements
    assert (4, 2) in whole(4, 64, False, contiguous=True)  # channels_last, 2 groups of 4 channels a program
    monkeypatch.setattr(gns, "_RESIDENT_TILES", False)
    assert whole(64, 64, False) == set()


@pytest.mark.parametrize("override,message", [
    (dict(groups=3), "num_groups divisible"),
    (dict(groups=2, split=2), "no split"),
    (dict(groups=2, block_c=4), "block_c = 8"),
    (dict(groups=1, block_hw=4, split=2, programs=2),
     r"a capped grid \(2 programs\) needs whole groups per program, got 2 splits"),
])
def test_bad_groups_per_program_is_refused(monkeypatch, override, message):
    monkeypatch.setattr(gns, "_LAUNCH_OVERRIDE", override)
    x, weight, bias, _, _, _ = _make_inputs((1, 16, 3, 3, 4), torch.float32, torch.float32, False, False, True, 1)
    with pytest.raises(ValueError, match=message):
        group_norm_silu(x, weight, bias, 4)


@pytest.mark.parametrize("mode", ["pre", "post"])
def test_forced_parameter_gradient_blocks(monkeypatch, mode):
    # the (n, c) -> dweight, dbias, dscale, dshift reduction over several n and c blocks with tails
    monkeypatch.setattr(gns, "_LAUNCH_OVERRIDE", dict(param_block_n=2, param_block_c=8))
    _check_against_float64((3, 12, 2, 3, 2), torch.float32, mode, True, True, True, False)


def test_forced_split_half_precision(monkeypatch):
    monkeypatch.setattr(gns, "_LAUNCH_OVERRIDE", dict(block_c=8, block_hw=16, split=2))
    _check_against_float64((1, 24, 7, 5, 2), torch.float16, "post", False, True, True, False)


def _check_statistics(x64, num_groups, channels_last, gen):
    """The op's fp32 mean and rstd of x64 (rounded to fp32) against float64, random gamma/beta."""
    x = x64.to(device=DEVICE, dtype=torch.float32)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.rand(x.shape[1], generator=gen).to(DEVICE) + 0.5
    bias = torch.randn(x.shape[1], generator=gen).to(DEVICE)
    _, mean, rstd = torch.ops.dream_kernels.group_norm_silu_fwd(x, weight, bias, None, None, num_groups, EPS,
                                                                "post", True)
    mean64, rstd64 = _float64_stats(x, None, None, num_groups, "post")
    assert _rel_err(mean, mean64) <= STATS_TOLERANCE
    assert _rel_err(rstd, rstd64) <= STATS_TOLERANCE


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # interpreter, masked lanes
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_statistics_are_sound_with_large_mean(channels_last, resident):
    # mean/std = 5000: fp32 E[u^2] - E[u]^2 is off by ~600% here (sums shifted by a pilot mean, or the
    # resident path's two passes over registers: ~1e-7); channels_last takes all 4 groups in one program
    # (per-group pilots and sums)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 16, 6, 6, generator=gen, dtype=torch.float64) * 0.2 + 1000.0
    _check_statistics(x, 4, channels_last, gen)


@pytest.mark.parametrize("layout,override", [
    ("nchw", dict(block_c=4, block_hw=1, split=1)),
    ("nchw", dict(block_c=4, block_hw=1, split=3)),
    ("channels_last", dict(block_c=4, block_hw=1, split=3, groups=1)),
    ("channels_last", dict(block_c=8, block_hw=1, split=1, groups=2)),
], ids=["nchw", "nchw-split3", "channels_last-split3", "channels_last-2groups"])
def test_statistics_are_sound_when_the_pilot_tile_is_an_outlier(monkeypatch, layout, override):
    # The kernels sum d = u - K, K the mean of the first tile of each group's slice of positions
    # (m of its n elements). Worst case for K: that tile alone far from the rest. Here each slice
    # (36 or 12 positions) starts with a position offset by +40 on a mean of 1000 and std 0.2, with
    # one-position tiles: (mean - K)^2 = (n/m - 1)*var, the bound, so about log2(n/m) = 5 of fp32's
    # 24 bits cancel (E[u^2] - E[u]^2 would lose ~15), within the 1e-5 tolerance.
    monkeypatch.setattr(gns, "_LAUNCH_OVERRIDE", override)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 8, 6, 6, generator=gen, dtype=torch.float64) * 0.2 + 1000.0
    slice_starts = range(0, 36, 36 // override["split"])
    x.view(2, 8, 36)[:, :, list(slice_starts)] += 40.0
    _check_statistics(x, 2, layout == "channels_last", gen)


# ----------------------------------------------------------------------------------------------
# Fused dropout: mask regenerated in backward from the seed, identical to dropout_keep_mask
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DROPOUT_SHAPES, ids=str)
def test_dropout_matches_float64(shape, dtype, channels_last, resident):
    _check_against_float64(shape, dtype, "pre", True, True, True, channels_last,
                           param_dtype=torch.float32, dropout_p=0.3, seed_extra=(resident,))


@pytest.mark.parametrize("dropout_p", [0.1, 0.75])
@pytest.mark.parametrize("mode,silu", [("post", True), ("pre", False)])
def test_dropout_other_modes_and_rates(mode, silu, dropout_p):
    _check_against_float64((2, 18, 3, 6, 3), torch.float32, mode, silu, True, False, False,
                           dropout_p=dropout_p)


# the mask must not depend on the launch configuration: 8-position tiles, tails, splits
DROPOUT_CONFIGS = [dict(block_c=8, block_hw=8), dict(block_c=4, block_hw=8, split=3),
                   dict(block_c=8, block_hw=16, split=2), dict(block_c=2, block_hw=32, split=2),
                   dict(block_c=8, block_hw=8, programs=1)]


@pytest.mark.parametrize("config", DROPOUT_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_dropout_forced_tiles_and_splits(monkeypatch, config, channels_last):
    monkeypatch.setattr(gns, "_LAUNCH_OVERRIDE", config)
    _check_against_float64((1, 24, 7, 5, 2), torch.float32, "pre", True, True, True, channels_last,
                           seed_extra=tuple(config.items()), dropout_p=0.2)


# channels_last, 16 channels per group: every tile starts on a multiple of 8 channels, so the kernels draw
# whole octets of channels at once (OCTETS 2); one group a program, in several channel tiles, split, or
# in a capped grid (several groups a program: test_several_groups_per_program_with_dropout)
ALIGNED_OCTET_CONFIGS = [dict(groups=1, block_c=8, block_hw=4), dict(groups=1, block_c=16, block_hw=8, split=2),
                         dict(groups=1, block_c=8, block_hw=2, programs=1)]


@pytest.mark.parametrize("config", ALIGNED_OCTET_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_dropout_whole_channel_octets(monkeypatch, config):
    monkeypatch.setattr(gns, "_LAUNCH_OVERRIDE", config)
    _check_against_float64((2, 32, 7, 5, 2), torch.float32, "pre", True, True, True, True,
                           seed_extra=tuple(config.items()), dropout_p=0.2)


def test_dropout_octets_follow_the_layout_and_the_tiles():
    def octets(shape, groups, memory_format, backward=False):
        x = torch.empty(shape).contiguous(memory_format=memory_format)
        axis = gns._dropout_axis(0.1, memory_format_of(x))
        cfg = gns._launch_config(shape[0], shape[1], shape[2] * shape[3], groups, x.stride(1), None, backward, axis)
        return cfg.octets, cfg.block_hw

    assert octets((2, 32, 7, 5), 2, torch.contiguous_format) == (1, 64)  # positions: 8-aligned tiles
    assert octets((2, 32, 7, 5), 2, torch.channels_last)[0] == 2  # 16 channels a group
    assert octets((2, 24, 7, 5), 2, torch.channels_last)[0] == 3  # 12: tiles start at channel 12
    assert octets((2, 24, 1, 1), 2, torch.channels_last) == (1, 8)  # 1x1: NCHW-contiguous too
    assert gns._dropout_axis(0.0, torch.channels_last) is None
    assert gns._launch_config(2, 24, 35, 2, 1, None, True).octets == 0


def _threshold_dropout_p(seed, shape, channels_last, clear):
    """(p, boundary): a rate p = t/2^16 and the elements of `clear` whose 16-bit draw is exactly t
    (kept at threshold t, dropped at t + 1), searched upward from t = 0.2*2^16."""
    for t in range(13107, 13107 + 4096):
        kept_at_t = dropout_keep_mask(seed, shape, t / 2 ** 16, channels_last)
        kept_above = dropout_keep_mask(seed, shape, (t + 1) / 2 ** 16, channels_last)
        boundary = kept_at_t & ~kept_above & clear
        if boundary.any():
            return t / 2 ** 16, boundary
    raise AssertionError("no draw equal to a threshold in the searched range")


@pytest.mark.parametrize("shape,channels_last,octets", [((1, 24, 7, 5, 2), False, 1), ((1, 32, 7, 5, 2), True, 2),
                                                         ((1, 24, 7, 5, 2), True, 3)],
                         ids=["nchw", "channels_last-whole_octets", "channels_last-per_element"])
def test_dropout_keeps_a_draw_equal_to_the_threshold(shape, channels_last, octets, launches):
    """keep = half >= t (P_keep = 1 - t/2^16 counts half == t as kept). A random rate puts a draw exactly on
    t with probability 2^-16 an element, so the rate is chosen where some element's draw equals t; one case for
    each of the kernel's three comparisons (octets along positions, whole channel octets, per element)."""
    x, weight, bias, scale, shift, dy = _make_inputs(shape, torch.float32, torch.float32, True, True, channels_last,
                                                     _seed("threshold", shape, channels_last))
    num_groups = shape[4]
    seed = torch.tensor([0x1357_9BDF_2468], device=DEVICE)
    params64 = [t.double() for t in (weight, bias)]
    undropped64 = group_norm_silu_reference(x.double(), *params64, num_groups, EPS, scale.double(), shift.double())
    dropout_p, boundary = _threshold_dropout_p(seed, x.shape, channels_last, undropped64.abs() > 1e-3)
    x.requires_grad_()
    y = group_norm_silu(x, weight, bias, num_groups, EPS, scale, shift, dropout_p=dropout_p, seed=seed)
    (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_()
    y64 = group_norm_silu_reference(x64, *params64, num_groups, EPS, scale.double(), shift.double(),
                                    dropout_p=dropout_p, seed=seed)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    assert launches and all(cfg.octets == octets for cfg in launches)
    assert (y[boundary] != 0).all(), "an element whose draw equals the threshold was dropped (keep is half >= t)"
    assert _rel_err(y, y64) <= TOLERANCE[torch.float32]
    assert _rel_err(dx, dx64) <= TOLERANCE[torch.float32]


def test_dropout_tiles_narrower_than_eight_positions_are_refused(monkeypatch):
    monkeypatch.setattr(gns, "_LAUNCH_OVERRIDE", dict(block_hw=4))
    x, weight, bias, _, _, _ = _make_inputs((1, 8, 3, 3, 2), torch.float32, torch.float32, False, False, False, 1)
    with pytest.raises(ValueError, match="at least 8 positions"):
        group_norm_silu(x, weight, bias, 2, dropout_p=0.5)


@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_dropout_mask_statistics(dropout_p):
    # 2^20 Bernoulli draws: the keep rate within 6 sigma of 1 - p, in each of the eight 16-bit
    # halves of a Philox call (positions p % 8) too; two seeds, and two halves of one call, agree where
    # independent draws would
    shape, seeds = (8, 64, 32, 64), (0x1234_5678_9ABC, 0x1234_5678_9ABD)
    keeps = [dropout_keep_mask(torch.tensor([seed]), shape, dropout_p).flatten(2).double() for seed in seeds]
    n = keeps[0].numel()
    sigma = (dropout_p * (1 - dropout_p) / n) ** 0.5
    assert abs(keeps[0].mean().item() - (1 - dropout_p)) < 6 * sigma
    for half in range(8):
        assert abs(keeps[0][..., half::8].mean().item() - (1 - dropout_p)) < 12 * sigma
    expected = dropout_p ** 2 + (1 - dropout_p) ** 2  # P(two independent draws agree)
    agree = (keeps[0] == keeps[1]).double().mean().item()
    assert abs(agree - expected) < 6 * (expected * (1 - expected) / n) ** 0.5
    for a, b in ((0, 1), (1, 2), (0, 7)):  # the two halves of one word, neighbouring words, one call's ends
        agree = (keeps[0][..., a::8] == keeps[0][..., b::8]).double().mean().item()
        assert abs(agree - expected) < 6 * (expected * (1 - expected) / (n / 8)) ** 0.5
    # channels_last: the octets run along channels, so the classes are c % 8
    keep_cl = dropout_keep_mask(torch.tensor([seeds[0]]), shape, dropout_p, channels_last=True).double()
    for half in range(8):
        assert abs(keep_cl[:, half::8].mean().item() - (1 - dropout_p)) < 12 * sigma
    agree = (keep_cl[:, 0::8] == keep_cl[:, 1::8]).double().mean().item()
    assert abs(agree - expected) < 6 * (expected * (1 - expected) / (n / 8)) ** 0.5


def test_dropout_seed_is_drawn_from_torch_generator():
    x, weight, bias, scale, shift, _ = _make_inputs((2, 12, 3, 5, 3), torch.float32, torch.float32,
                                                    True, True, False, 21)
    outputs = []
    for manual_seed in (5, 5, 6):
        torch.manual_seed(manual_seed)
        outputs.append(group_norm_silu(x, weight, bias, 3, scale=scale, shift=shift, dropout_p=0.4))
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0] != 0, outputs[2] != 0)
    torch.manual_seed(5)
    seed = new_dropout_seed(DEVICE)
    expected = group_norm_silu_reference(x, weight, bias, 3, scale=scale, shift=shift, dropout_p=0.4, seed=seed)
    assert _rel_err(outputs[0], expected.double()) <= TOLERANCE[torch.float32]
    assert torch.equal(group_norm_silu(x, weight, bias, 3, scale=scale, shift=shift, dropout_p=0.0),
                       group_norm_silu(x, weight, bias, 3, scale=scale, shift=shift))
    torch.manual_seed(5)  # a numpy float rate (nn.Dropout keeps the type it was given) draws its seed too
    assert torch.equal(group_norm_silu(x, weight, bias, 3, scale=scale, shift=shift, dropout_p=np.float64(0.4)),
                       outputs[0])


def test_without_dropout_no_seed_is_drawn_from_torch_generator():
    """A seed is drawn only for dropout: without it (dropout_p 0, given as a float or an int) the op leaves torch's
    generator where it was, so the random numbers drawn around it stay the same."""
    x, weight, bias, scale, shift, _ = _make_inputs((2, 12, 3, 5, 3), torch.float32, torch.float32,
                                                    True, True, False, 23)
    torch.manual_seed(7)
    expected = torch.rand(4, device=DEVICE)
    for dropout_p in (0.0, 0):
        torch.manual_seed(7)
        group_norm_silu(x, weight, bias, 3, scale=scale, shift=shift, dropout_p=dropout_p)
        assert torch.equal(torch.rand(4, device=DEVICE), expected), dropout_p


def test_dropout_under_activation_checkpointing_recomputes_the_same_mask():
    from torch.utils.checkpoint import checkpoint

    x, weight, bias, scale, shift, dy = _make_inputs((2, 12, 3, 5, 3), torch.float32, torch.float32,
                                                     True, True, True, 22)
    leaves = [v.requires_grad_() for v in (x, weight, bias, scale, shift)]

    def block(*args):  # dropout seed drawn inside: the recompute must draw the same one
        return group_norm_silu(args[0] * 1.5, *args[1:3], 3, scale=args[3], shift=args[4], dropout_p=0.3)

    torch.manual_seed(9)
    plain = block(*leaves)
    plain_grads = torch.autograd.grad(plain, leaves, dy)
    torch.manual_seed(9)
    recomputed = checkpoint(block, *leaves, use_reentrant=False)
    recomputed_grads = torch.autograd.grad(recomputed, leaves, dy)
    assert torch.equal(plain, recomputed)
    for grad, expected in zip(recomputed_grads, plain_grads):
        assert torch.equal(grad, expected)


# ----------------------------------------------------------------------------------------------
# Layouts, poisoning, public API
# ----------------------------------------------------------------------------------------------
def test_poisoning_is_active():
    assert torch.isnan(gns._new_buffer((3,), torch.float32, torch.device(DEVICE))).all()
    assert torch.isnan(gns._new_buffer_like(torch.zeros(2, 3, 4, 5), torch.channels_last)).all()


def _random_affine(gen, N, C):
    """weight in [0.5, 1.5), bias, scale (0.3 N(0, 1)) and shift: (C,), (C,), (N, C), (N, C) on DEVICE."""
    return ((torch.rand(C, generator=gen) + 0.5).to(DEVICE), torch.randn(C, generator=gen).to(DEVICE),
            (0.3 * torch.randn(N, C, generator=gen)).to(DEVICE), torch.randn(N, C, generator=gen).to(DEVICE))


def test_non_dense_x_and_dy_in_other_layouts():
    N, C, H, W, G = 2, 12, 5, 3, 3
    gen = torch.Generator().manual_seed(11)
    wide = torch.randn(N, C, H, W + 4, generator=gen).to(DEVICE)
    x = wide[..., 2:2 + W]  # neither NCHW-contiguous nor channels_last
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    leaves = [v.requires_grad_() for v in (x, *_random_affine(gen, N, C))]
    leaves64 = [v.detach().double().requires_grad_() for v in leaves]
    y64 = group_norm_silu_reference(*leaves64[:3], G, EPS, *leaves64[3:])
    dys = [
        torch.randn(N, C, 1, 1, generator=gen).expand(N, C, H, W),  # stride 0: not dense
        torch.randn(N, C, H, W, generator=gen).to(memory_format=torch.channels_last),
    ]
    for dy in dys:
        dy = dy.to(DEVICE)
        y = group_norm_silu(*leaves[:3], G, EPS, *leaves[3:])
        assert y.is_contiguous()
        grads = torch.autograd.grad(y, leaves, dy)
        grads64 = torch.autograd.grad(y64, leaves64, dy.double(), retain_graph=True)
        assert _rel_err(y, y64) <= TOLERANCE[torch.float32]
        for grad, grad64 in zip(grads, grads64):
            assert _rel_err(grad, grad64) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("mode", ["pre", "post"])
def test_strided_parameters_scale_and_shift_match_float64(mode):
    """weight and bias as every other element of a longer vector, scale and shift as transposed (C, N) storage:
    the kernels index them as dense (C,) and (N, C), so the op must read the views' values, and the gradients
    come back in the views' shapes."""
    N, C, H, W, G = 3, 12, 5, 3, 4
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(N, C, H, W, generator=gen).to(DEVICE)
    weight = (torch.rand(2 * C, generator=gen) + 0.5).to(DEVICE)[::2]
    bias = torch.randn(2 * C, generator=gen).to(DEVICE)[1::2]
    scale = (0.3 * torch.randn(C, N, generator=gen)).to(DEVICE).t()
    shift = torch.randn(C, N, generator=gen).to(DEVICE).t()
    assert not any(v.is_contiguous() for v in (weight, bias, scale, shift))
    leaves = [v.requires_grad_() for v in (x, weight, bias, scale, shift)]
    leaves64 = [v.detach().double().requires_grad_() for v in leaves]
    dy = torch.randn(N, C, H, W, generator=gen).to(DEVICE)
    y = group_norm_silu(*leaves[:3], G, EPS, *leaves[3:], mode=mode)
    y64 = group_norm_silu_reference(*leaves64[:3], G, EPS, *leaves64[3:], mode=mode)
    assert _rel_err(y, y64) <= TOLERANCE[torch.float32]
    grads = torch.autograd.grad(y, leaves, dy)
    grads64 = torch.autograd.grad(y64, leaves64, dy.double())
    for name, grad, grad64 in zip(["x", "weight", "bias", "scale", "shift"], grads, grads64):
        assert grad.shape == grad64.shape and _rel_err(grad, grad64) <= TOLERANCE[torch.float32], name


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_one_column_views_whose_column_stride_is_not_the_row_stride(channels_last):
    # (N, C, 1, L) transposed to (N, C, L, 1): dense in its layout (the stride of a size-1 dimension is free),
    # with column stride L (NCHW) or L*C (channels_last), so position p = h*W + w must step by the row stride
    N, C, L, G = 2, 12, 5, 3
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(13)

    def one_column(t):
        return t.to(DEVICE).contiguous(memory_format=memory_format).transpose(2, 3)

    x = one_column(torch.randn(N, C, 1, L, generator=gen) * 1.7 + 0.6)
    dy = one_column(torch.randn(N, C, 1, L, generator=gen))
    assert x.is_contiguous(memory_format=memory_format) and x.stride(3) != x.stride(2)
    leaves = [v.requires_grad_() for v in (x, *_random_affine(gen, N, C))]
    leaves64 = [v.detach().double().requires_grad_() for v in leaves]
    y = group_norm_silu(*leaves[:3], G, EPS, *leaves[3:])
    y64 = group_norm_silu_reference(*leaves64[:3], G, EPS, *leaves64[3:])
    grads = torch.autograd.grad(y, leaves, dy)
    grads64 = torch.autograd.grad(y64, leaves64, dy.double())
    assert _rel_err(y, y64) <= TOLERANCE[torch.float32]
    for name, grad, grad64 in zip(["x", "weight", "bias", "scale", "shift"], grads, grads64):
        assert _rel_err(grad, grad64) <= TOLERANCE[torch.float32], name


def test_public_function_matches_op_and_reference():
    N, C, H, W, G = 2, 16, 3, 4, 4
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(N, C, H, W, generator=gen).to(DEVICE).to(memory_format=torch.channels_last)
    weight, bias = torch.randn(C, generator=gen).to(DEVICE), torch.randn(C, generator=gen).to(DEVICE)
    scale, shift = torch.randn(N, C, generator=gen).to(DEVICE), torch.randn(N, C, generator=gen).to(DEVICE)
    y = group_norm_silu(x, weight, bias, G, scale=scale, shift=shift, mode="post")
    y_op, _, _ = torch.ops.dream_kernels.group_norm_silu_fwd(x, weight, bias, scale, shift, G, 1e-5, "post", True)
    assert torch.equal(y, y_op) and y.is_contiguous(memory_format=torch.channels_last)
    y_ref = group_norm_silu_reference(x, weight, bias, G, scale=scale, shift=shift, mode="post")
    assert _rel_err(y, y_ref.double()) <= 1e-5


def test_fake_tensor_mode_shapes_and_backward():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 64, 8, 8, device=DEVICE, dtype=torch.float16,
                        requires_grad=True).to(memory_format=torch.channels_last)
        weight = torch.empty(64, device=DEVICE, requires_grad=True)
        bias = torch.empty(64, device=DEVICE, requires_grad=True)
        scale = torch.empty(4, 64, device=DEVICE, dtype=torch.float16, requires_grad=True)
        y = group_norm_silu(x, weight, bias, 8, scale=scale)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert y.is_contiguous(memory_format=torch.channels_last)
        dx, dweight, dscale = torch.autograd.grad(y.sum(), [x, weight, scale])
        assert dx.shape == x.shape and dweight.shape == (64,) and dscale.shape == (4, 64)
        assert dscale.dtype == torch.float16 and dweight.dtype == torch.float32


@pytest.mark.parametrize("scale_layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("op_name", ["group_norm_silu_fwd", "group_norm_silu_bwd"])
def test_opcheck(op_name, dropout_p, scale_layout):
    """The fake implementations against the real ops (shapes, dtypes, strides), autograd registration.
    A transposed (dense, permuted) scale: the real backward returns contiguous dscale/dshift, and so
    must the fake, or Inductor's stride asserts fail in a compiled backward."""
    N, C, H, W, G = 2, 8, 3, 2, 2
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(N, C, H, W, generator=gen).to(DEVICE)
    weight, bias = torch.randn(C, generator=gen).to(DEVICE), torch.randn(C, generator=gen).to(DEVICE)
    scale, shift = (torch.randn(N, C, generator=gen).to(DEVICE) if scale_layout == "contiguous"
                    else torch.randn(C, N, generator=gen).to(DEVICE).t() for _ in range(2))
    seed = torch.tensor([123456789], device=DEVICE) if dropout_p else None
    if op_name == "group_norm_silu_fwd":
        for v in (x, weight, bias, scale, shift):
            v.requires_grad_()
        args = (x, weight, bias, scale, shift, G, EPS, "pre", True, dropout_p, seed)
    else:
        _, mean, rstd = torch.ops.dream_kernels.group_norm_silu_fwd(x, weight, bias, scale, None, G, EPS, "post", True)
        args = (torch.randn_like(x), x, weight, bias, scale, None, mean, rstd, G, EPS, "post", True, dropout_p, seed)
    torch.library.opcheck(getattr(torch.ops.dream_kernels, op_name).default, args)


@pytest.mark.parametrize("layout", ["channels_last", "transposed_hw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fake_outputs_have_the_real_outputs_shapes_dtypes_and_strides(dtype, layout):
    """The ops' fakes give their outputs the shape, dtype and strides of the real ops' (a compiled graph lays out
    what follows by them): mean and rstd fp32 of shape (N, num_groups) (N != num_groups) whatever x's dtype, y and
    dx in x's memory format (channels_last), or NCHW for x dense in neither layout (H and W transposed)."""
    N, C, H, W, G = 3, 8, 5, 4, 2
    x, weight, bias, scale, shift, dy = _make_inputs((N, C, H, W, G), dtype, torch.float32, True, True,
                                                     layout == "channels_last", 13)
    if layout == "transposed_hw":
        x, dy = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in (x, dy))
    ops = torch.ops.dream_kernels
    y, mean, rstd = ops.group_norm_silu_fwd(x, weight, bias, scale, shift, G, EPS, "pre", True)
    calls = [(ops.group_norm_silu_fwd.default, (x, weight, bias, scale, shift, G, EPS, "pre", True)),
             (ops.group_norm_silu_bwd.default, (dy, x, weight, bias, scale, shift, mean, rstd, G, EPS, "pre", True))]
    for op, args in calls:
        assert_fake_matches_real(op, *args)


def test_backward_op_refuses_dy_on_another_device():
    """The public backward op checks dy's device as well as its shape: dy on another device than x (a meta tensor
    here, on any machine) is a one-line error naming dy, not a gradient computed from nothing."""
    N, C, H, W, G = 2, 8, 2, 3, 4
    x, weight, bias, _, _, dy = _make_inputs((N, C, H, W, G), torch.float32, torch.float32, False, False, False, 19)
    _, mean, rstd = torch.ops.dream_kernels.group_norm_silu_fwd(x, weight, bias, None, None, G, EPS, "pre", True)
    with pytest.raises(ValueError, match=r"^group_norm_silu backward: dy has shape \(2, 8, 2, 3\) on meta, expected"):
        torch.ops.dream_kernels.group_norm_silu_bwd(dy.to("meta"), x, weight, bias, None, None, mean, rstd, G, EPS,
                                                    "pre", True)


def test_backward_op_reads_strided_statistics_and_refuses_wrong_ones():
    """The public backward op indexes mean and rstd as dense (N, num_groups) fp32: a strided view holding the
    forward's values gives the same gradients, a wrong shape or dtype a one-line error naming it (also on meta)."""
    N, C, H, W, G = 3, 8, 2, 3, 4
    x, weight, bias, scale, _, dy = _make_inputs((N, C, H, W, G), torch.float32, torch.float32, True, False, False, 11)
    _, mean, rstd = torch.ops.dream_kernels.group_norm_silu_fwd(x, weight, bias, scale, None, G, EPS, "pre", True)
    expected = torch.ops.dream_kernels.group_norm_silu_bwd(dy, x, weight, bias, scale, None, mean, rstd, G, EPS,
                                                           "pre", True)
    strided_mean, strided_rstd = (stat.t().contiguous().t() for stat in (mean, rstd))  # strides (1, N)
    got = torch.ops.dream_kernels.group_norm_silu_bwd(dy, x, weight, bias, scale, None, strided_mean, strided_rstd,
                                                      G, EPS, "pre", True)
    for name, actual, wanted in zip(("dx", "dweight", "dbias", "dscale"), got, expected):
        assert torch.equal(actual, wanted), name
    bad_stats = [("mean", torch.zeros(N, G + 1, device=DEVICE), rstd), ("rstd", mean, rstd.half()),
                 ("mean", mean.reshape(-1), rstd)]
    for name, bad_mean, bad_rstd in bad_stats:
        for device in (DEVICE, "meta"):
            args = [t.to(device) for t in (dy, x, weight, bias, scale, bad_mean, bad_rstd)]
            with pytest.raises(ValueError, match=f"group_norm_silu backward: {name} must be the forward's float32"):
                torch.ops.dream_kernels.group_norm_silu_bwd(*args[:5], None, *args[5:], G, EPS, "pre", True)


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()

    class TimeConditionedNorm(torch.nn.Module):
        def __init__(self, channels, emb_dim, groups):
            super().__init__()
            self.groups = groups
            self.weight = torch.nn.Parameter(1 + 0.3 * torch.randn(channels))
            self.bias = torch.nn.Parameter(0.3 * torch.randn(channels))
            self.to_scale_shift = torch.nn.Linear(emb_dim, 2 * channels)

        def forward(self, x, emb, seed):
            scale, shift = self.to_scale_shift(emb).chunk(2, dim=1)
            h = group_norm_silu(x, self.weight, self.bias, self.groups, scale=scale, shift=shift,
                                dropout_p=0.2, seed=seed)
            return group_norm_silu(h * 2.0, self.weight, self.bias, self.groups, silu=False)

    torch.manual_seed(0)
    module = TimeConditionedNorm(12, 5, 3).to(DEVICE)
    x = torch.randn(2, 12, 4, 3, device=DEVICE, requires_grad=True)
    emb = torch.randn(2, 5, device=DEVICE)
    seed = torch.tensor([0x5EED_5EED_5EED], device=DEVICE)
    eager_out = module(x, emb, seed)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), [x, *module.parameters()])
    # Inductor codegen costs ~a minute of CPU compilation; without a GPU check the tracing
    # (Dynamo + fake impls + AOT autograd) with aot_eager instead.
    compiled = torch.compile(module, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    out = compiled(x, emb, seed)
    grads = torch.autograd.grad(out.square().sum(), [x, *module.parameters()])
    assert _rel_err(out, eager_out.double()) <= 1e-5
    for grad, eager_grad in zip(grads, eager_grads):
        assert _rel_err(grad, eager_grad.double()) <= 1e-5


def test_torch_compile_dynamic_shapes_trace_num_groups_as_a_symbolic_int():
    """torch.compile(dynamic=True) traces sizes and int arguments as torch.SymInt: the op's checks and fake
    implementation take a symbolic num_groups, and the second call reuses the first's graphs (batch, channels,
    image size and num_groups all differ)."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor" if ON_GPU else "aot_eager")

    def norm(x, weight, bias, num_groups, scale, shift):
        return group_norm_silu(x, weight, bias, num_groups, scale=scale, shift=shift)

    compiled = torch.compile(norm, backend=counter, dynamic=True, fullgraph=True)
    frames = []
    for shape in ((2, 12, 3, 4, 3), (3, 20, 5, 2, 4)):
        x, weight, bias, scale, shift, dy = _make_inputs(shape, torch.float32, torch.float32, True, True, False,
                                                         _seed(shape, "dynamic"))
        leaves = [t.requires_grad_() for t in (x, weight, bias, scale, shift)]
        y = compiled(leaves[0], *leaves[1:3], shape[4], *leaves[3:])
        grads = torch.autograd.grad(y, leaves, dy)
        ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
        y64 = group_norm_silu_reference(ref_leaves[0], *ref_leaves[1:3], shape[4], scale=ref_leaves[3],
                                        shift=ref_leaves[4])
        grads64 = torch.autograd.grad(y64, ref_leaves, dy.double())
        assert _rel_err(y, y64) <= TOLERANCE[torch.float32]
        for name, grad, grad64 in zip(("dx", "dweight", "dbias", "dscale", "dshift"), grads, grads64):
            assert _rel_err(grad, grad64) <= TOLERANCE[torch.float32], name
        frames.append(counter.frame_count)
    assert frames[0] == frames[1], "the second call recompiled"


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
def _valid_args():
    N, C, H, W = 2, 8, 3, 3
    return dict(x=torch.randn(N, C, H, W, device=DEVICE), weight=torch.ones(C, device=DEVICE),
                bias=torch.zeros(C, device=DEVICE), num_groups=4,
                scale=torch.zeros(N, C, device=DEVICE), shift=torch.zeros(N, C, device=DEVICE))


# (id, argument changes, error type, message, whether the reference raises it too)
BAD_CALLS = [
    ("groups", dict(num_groups=3), ValueError, "not divisible by num_groups=3", True),
    ("zero_groups", dict(num_groups=0), ValueError, "num_groups must be a positive int", True),
    ("3d_x", dict(x=torch.randn(2, 8, 9)), ValueError, "x must be 4-D", True),
    ("empty_x", dict(x=torch.randn(0, 8, 3, 3)), ValueError, "x must be non-empty", True),
    ("int_x", dict(x=torch.ones(2, 8, 3, 3, dtype=torch.int32)), TypeError,
     "x must be float32, float16 or bfloat16", False),
    ("double_x", dict(x=torch.randn(2, 8, 3, 3, dtype=torch.float64)), TypeError,
     "x must be float32, float16 or bfloat16", False),
    ("weight_shape", dict(weight=torch.ones(4)), ValueError, r"weight must have shape \(8,\)", True),
    ("bias_shape", dict(bias=torch.ones(8, 1)), ValueError, r"bias must have shape \(8,\)", True),
    ("scale_shape", dict(scale=torch.zeros(8)), ValueError, r"scale must have shape \(2, 8\)", True),
    ("shift_shape", dict(shift=torch.zeros(1, 8)), ValueError, r"shift must have shape \(2, 8\)", True),
    ("missing_weight", dict(weight=None), TypeError, "weight is required", True),
    ("mixed_dtype", dict(weight=torch.ones(8, dtype=torch.float64)), TypeError,
     r"mixed dtypes: weight is torch.float64 but x is torch.float32 \(weight must be torch.float32\)$", True),
    ("mixed_half_dtypes", dict(x=torch.randn(2, 8, 3, 3).half(), scale=torch.zeros(2, 8).bfloat16()),
     TypeError, "mixed dtypes: scale", True),
    ("mode", dict(mode="middle"), ValueError, "mode must be 'pre' or 'post'", True),
    ("eps", dict(eps=0.0), ValueError, "eps must be a positive float", True),
    ("dropout_one", dict(dropout_p=1.0), ValueError, r"dropout_p must be a float in \[0, 1\)", True),
    ("dropout_negative", dict(dropout_p=-0.1), ValueError, r"dropout_p must be a float in \[0, 1\)", True),
    ("dropout_nearly_one", dict(dropout_p=1 - 1e-6), ValueError, r"within 2\^-17 of 1", True),
    ("dropout_tiny", dict(dropout_p=1e-6), ValueError, r"below 2\^-17", True),
    ("seed_dtype", dict(dropout_p=0.1, seed=torch.tensor([1.0])), TypeError, "seed must be an int64 tensor", True),
    ("seed_size", dict(dropout_p=0.1, seed=torch.tensor([1, 2])), TypeError, "seed must be an int64 tensor", True),
    ("seed_int", dict(dropout_p=0.1, seed=7), TypeError, "seed must be an int64 tensor of one element, got int", True),
]


@pytest.mark.parametrize("change,error,message,reference_too", [c[1:] for c in BAD_CALLS],
                         ids=[c[0] for c in BAD_CALLS])
def test_clear_errors(change, error, message, reference_too):
    args = _valid_args()
    for key, value in change.items():
        args[key] = value.to(DEVICE) if isinstance(value, torch.Tensor) else value
    for fn in (group_norm_silu, group_norm_silu_reference) if reference_too else (group_norm_silu,):
        with pytest.raises(error, match=message):
            fn(**args)


def test_samples_beyond_32_bit_offsets_are_refused():
    """The kernels address one sample's C*H*W elements with int32 offsets (a sample's own offset is int64): a
    sample of 2^31 elements would wrap around to negative addresses, so it is a one-line error instead, in
    group_norm_silu_conv2d too. On meta tensors: nothing is allocated."""
    from kernels import group_norm_silu_conv2d

    def args(channels):
        x = torch.empty(2, channels, 4096, 4096, device="meta", dtype=torch.float16)
        return x, torch.empty(channels, device="meta"), torch.empty(channels, device="meta"), 1

    assert group_norm_silu(*args(127)).shape == (2, 127, 4096, 4096)  # 127 * 2^24 < 2^31
    with pytest.raises(ValueError, match=r"group_norm_silu: x has C\*H\*W = 2147483648 elements per sample"):
        group_norm_silu(*args(128))
    conv_weight = torch.empty(4, 128, 1, 1, device="meta", dtype=torch.float16)
    with pytest.raises(ValueError, match=r"group_norm_silu_conv2d: x has C\*H\*W = 2147483648 elements"):
        group_norm_silu_conv2d(*args(128), conv_weight)


@pytest.mark.parametrize("shape", [(1, 1, 1, 2**31 - 1), (2**31 - 1, 1, 1, 1)], ids=["C*H*W", "N*C"])
def test_counts_of_exactly_2_to_the_31_minus_1_are_accepted(shape):
    """The largest int32 offset, 2^31 - 1, is still addressable: a sample of that many elements, or that many
    (sample, channel) pairs, runs (the refusals start at 2^31). On meta tensors: nothing is allocated."""
    x = torch.empty(shape, device="meta", dtype=torch.float16)
    weight = torch.empty(shape[1], device="meta")
    assert group_norm_silu(x, weight, weight, 1).shape == shape


def test_more_sample_channel_pairs_than_int32_offsets_reach_is_an_error():
    """scale, shift and the per-(n, c) partial sums are indexed by n*C + c in int32: N*C must stay below 2^31
    (batch 1024 with 2^21 channels of 1×1 is 2^31). On meta tensors: nothing is allocated."""
    def args(batch):
        channels = 2**21
        x = torch.empty(batch, channels, 1, 1, device="meta", dtype=torch.float16)
        return x, torch.empty(channels, device="meta"), torch.empty(channels, device="meta"), 1

    assert group_norm_silu(*args(1023)).shape == (1023, 2**21, 1, 1)
    with pytest.raises(ValueError, match=r"^group_norm_silu: x has N\*C = 2147483648 \(sample, channel\) pairs"):
        group_norm_silu(*args(1024))


def test_reference_accepts_float64_and_rejects_integers():
    args = _valid_args()
    args = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    assert group_norm_silu_reference(**args).dtype == torch.float64
    args["x"] = args["x"].long()
    with pytest.raises(TypeError, match="x must be a floating dtype"):
        group_norm_silu_reference(**args)


@pytest.mark.skipif(not ON_GPU, reason="needs a second device")
def test_mixed_devices_error():
    args = _valid_args()
    args["shift"] = args["shift"].cpu()
    with pytest.raises(ValueError, match="shift is on cpu but x is on cuda"):
        group_norm_silu(**args)


def test_mixed_devices_error_on_meta():
    args = _valid_args()
    args["scale"] = args["scale"].to("meta")
    with pytest.raises(ValueError, match="scale is on meta but x is on"):
        group_norm_silu(**args)
    args = _valid_args()
    with pytest.raises(ValueError, match="seed is on meta but x is on"):
        group_norm_silu(**args, dropout_p=0.1, seed=torch.tensor([1], device="meta"))


def test_reference_dropout_needs_a_seed():
    with pytest.raises(TypeError, match="dropout needs a seed"):
        group_norm_silu_reference(**_valid_args(), dropout_p=0.1)


def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setattr(gns, "_INTERPRETED", False)
    args = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in _valid_args().items()}
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        group_norm_silu(**args)
