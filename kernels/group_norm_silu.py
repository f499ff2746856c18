"""Fused GroupNorm + per-(sample, channel) scale/shift + SiLU in Triton, forward and backward.

Notation: x is (N, C, H, W); a group is Cg = C / num_groups channels times HW = H*W positions of
one sample, M = Cg*HW elements; gamma, beta are (C,); s, t are (N, C) (absent = 0).

    mode "pre":   u = x*(1+s) + t,  xh = (u - mu)*r,  h = gamma*xh + beta
    mode "post":  u = x,            xh = (u - mu)*r,  h = (gamma*xh + beta)*(1+s) + t
    y = silu(h) = h*sigmoid(h)      (y = h when silu=False)

mu and r = 1/sqrt(var + eps) are the mean and reciprocal (biased) standard deviation of u over
the group, computed in fp32 from sums shifted by a pilot mean K (the mean of the group's first
tile): S1 = sum (u - K), S2 = sum (u - K)^2, M2 = S2 - S1^2/n, which loses at most log2(n/m) bits
for a pilot over m of the n elements, never log2(mean^2/var) as E[u^2] - E[u]^2 does (see
_group_moments); splits are merged with Chan's parallel formula. Both modes share one form by
writing s_in, t_in (scale/shift applied before the norm: "pre") and s_out, t_out (after it: "post"):

    xh = x*p + q,        p = r*(1+s_in),  q = r*(t_in - mu)
    h  = a*x + b,        a = gamma*p*(1+s_out),  b = (gamma*q + beta)*(1+s_out) + t_out

so the output pass is one multiply-add and a SiLU per element.

Backward. dh = dy*sigmoid(h)*(1 + h*(1 - sigmoid(h))) (dh = dy without SiLU). Per (n, c):
A = sum_hw dh*xh, B = sum_hw dh; with k = gamma*(1+s_out) and g = dh*k (the gradient on gamma*xh):

    du     = r*(g - mean_group(g) - xh*mean_group(g*xh)),
             mean_group(g) = sum_c k*B / M,  mean_group(g*xh) = sum_c k*A / M
    dx     = du*(1+s_in)
    dgamma = sum_n (1+s_out)*A     dbeta = sum_n (1+s_out)*B
    ds_out = gamma*A + beta*B      dt_out = B
    ds_in  = sum_hw du*x           dt_in  = sum_hw du

Dropout (optional, training): y = act(h) * keep / P_keep, with keep ~ Bernoulli(P_keep) a pure
function of (seed, n, c, position) and x's memory format. One Philox4x32-10 call, keyed by the 64-bit
seed (a device tensor, so no host sync), gives four 32-bit words w0..w3, i.e. eight 16-bit halves
(low half of w0, high half of w0, low half of w1, ...), for an octet of 8 elements adjacent in memory:
    NCHW:          counter (n*C + c)*ceil(HW/8) + p//8, the element takes half p % 8;
    channels_last: counter (n*HW + p)*ceil(C/8) + c//8, the element takes half c % 8;
and keep = half >= t with t = round(p_drop * 2^16): P_keep = 1 - t/2^16, within 2^-17 of 1 - p_drop.
So a thread holding 8 contiguous elements draws their bits with one call and no exchange with other
threads (where a channels_last tile does not start on a multiple of 8 channels, i.e. channels per
group not a multiple of 8, each element draws its own octet's words: 8 times the Philox work). The
mask is regenerated in backward, never stored, and does not depend on the launch configuration;
there dh picks up the same factor keep / P_keep.

xh is recomputed from x in backward, never saved. Weight/scale gradients are deterministic: the
main kernels write per-(n, c[, split]) partial sums to a buffer, and a small kernel sums them in
a fixed order (no atomics).

Parallelism: one program per (sample, group). Where one tile holds the whole group (the launch's
tile covers its channels and positions, no split: "resident"), the program reads it once into
registers and computes the moments there in two exact passes (mean, then M2 = sum (u - mean)^2);
backward likewise reads x and dy once for both of its steps. Otherwise the program reads its group
twice (statistics, then output), so each element costs one DRAM read and one write forward (two
reads (x, dy) and one write backward) only when the second read hits L2, i.e. when the groups in
flight between their two passes fit there: 128 KB each at the 64x64 site in bf16, over 100 MB for
all the programs an H200 holds at full occupancy, against its 60 MB of L2. A launch may therefore
cap the grid (`programs`): each program then loops over blocks pid, pid + programs, ..., keeping
fewer groups in flight (the heuristics do not cap yet; bench/tune_kernels.py times capped grids and
whole-group tiles beside them). In channels_last with few channels per group (a power of two), one
program takes several adjacent groups instead, so that each row of its tile spans at least 32
contiguous channels; statistics and sums are then reduced per group inside the tile (a [groups, Cg]
view of the channel axis). When there are too few groups to fill the GPU, each group's positions
are split over several programs: a statistics kernel writes partial moments (forward) or partial
channel sums (backward) and the main kernel merges them.

Dtypes: x is fp32, fp16 or bf16 and y has x's dtype. weight, bias, scale, shift must each be in
x's dtype or in fp32 (fp32 master weights with half activations); they are read as fp32 and their
gradients are returned in their own dtypes. mean and rstd are fp32, shape (N, num_groups).
Layouts: x NCHW-contiguous or channels_last (handled through strides); y has x's memory format.
"""
import functools
import itertools
import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import autotune
from kernels.device import (check_interpreter_device, is_bool, is_int, is_interpreted, is_real, on_tensor_device,
                            reject_function_transforms)
from kernels.device import sm_count as _sm_count  # module global: tests and tools substitute it
from kernels.dispatch import OpCall
from kernels.layout import INT32_MAX, cdiv, memory_format_of, next_power_of_2

_MODES = ("pre", "post")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Test hooks (module globals, patched by tests only):
# - _POISON_NEW_BUFFERS: fill every buffer the launchers allocate (outputs and partial sums) with
#   NaN instead of leaving it uninitialised, so a test fails if a kernel skips an element.
# - _LAUNCH_OVERRIDE: dict with any of block_c, block_hw, split, num_warps, groups, programs (main
#   kernels), param_block_c, param_block_n (parameter-gradient kernel), forcing the launch configuration
#   (to exercise multi-tile loops, tails, the split path and capped grids on tiny shapes;
#   bench/tune_kernels.py).
# - _RESIDENT_TILES: False runs the looped path even where one tile holds the whole block.
_POISON_NEW_BUFFERS = False
_LAUNCH_OVERRIDE = None
_RESIDENT_TILES = True

# channels_last: the fewest contiguous channels a tile row should span (64 bytes in bf16: two whole
# 32-byte sectors), reached by giving a program several adjacent groups (see _launch_config)
_CONTIGUOUS_CHANNELS = 32


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _channel_coefficients(weight_ptr, bias_ptr, scale_ptr, shift_ptr, c_first, st_base, c0, Cp,
                          mean, rstd,
                          SCALE_IN: tl.constexpr, SHIFT_IN: tl.constexpr,
                          SCALE_OUT: tl.constexpr, SHIFT_OUT: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-channel fp32 vectors for channels c0 .. c0+BLOCK_C of the program's Cp channels (0
    beyond): gamma, beta, 1+s_in, 1+s_out, t_out, and p, q with xh = x*p + q
    (p = rstd*(1+s_in), q = rstd*(t_in - mean); mean, rstd are scalars or per-channel vectors;
    mean=0, rstd=1 give u = x*p + q)."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    cmask = offs_c < Cp
    gamma = tl.load(weight_ptr + c_first + offs_c, mask=cmask, other=0.0).to(tl.float32)
    beta = tl.load(bias_ptr + c_first + offs_c, mask=cmask, other=0.0).to(tl.float32)
    one_plus_s_in = tl.full([BLOCK_C], 1.0, tl.float32)
    one_plus_s_out = tl.full([BLOCK_C], 1.0, tl.float32)
    t_in = tl.zeros([BLOCK_C], tl.float32)
    t_out = tl.zeros([BLOCK_C], tl.float32)
    if SCALE_IN:
        one_plus_s_in += tl.load(scale_ptr + st_base + offs_c, mask=cmask, other=0.0).to(tl.float32)
    if SHIFT_IN:
        t_in += tl.load(shift_ptr + st_base + offs_c, mask=cmask, other=0.0).to(tl.float32)
    if SCALE_OUT:
        one_plus_s_out += tl.load(scale_ptr + st_base + offs_c, mask=cmask, other=0.0).to(tl.float32)
    if SHIFT_OUT:
        t_out += tl.load(shift_ptr + st_base + offs_c, mask=cmask, other=0.0).to(tl.float32)
    p = rstd * one_plus_s_in
    q = rstd * (t_in - mean)
    return offs_c, cmask, gamma, beta, one_plus_s_in, one_plus_s_out, t_out, p, q


@triton.jit
def _output_coefficients(gamma, beta, p, q, one_plus_s_out, t_out):
    """Per-channel (a, b) with h = a*x + b: a = gamma*p*(1+s_out), b = (gamma*q + beta)*(1+s_out) + t_out."""
    return gamma * p * one_plus_s_out, (gamma * q + beta) * one_plus_s_out + t_out


@triton.jit
def _sigmoid(h):
    """sigma(h) = 1/y with y = 1 + 2^(-h*log2(e)), the reciprocal taken as rsqrt(y*y): y >= 1, so
    this is one special-function instruction where 1/y is a full-range division. Error: a few ulp.
    y*y = inf (h < -44) gives 0, where sigma < 1e-19."""
    y = 1.0 + tl.exp2(h * -1.4426950408889634)
    return tl.math.rsqrt(y * y)


@triton.jit
def _block_origin(pid, C, G, Cg, GROUPS: tl.constexpr):
    """Block pid (GROUPS adjacent groups of one sample): its sample n, first channel c_first, channel
    count Cp = GROUPS*Cg, and the (n, c) index n*C + c_first of its scale/shift and sums."""
    blocks_per_sample = G // GROUPS
    n = pid // blocks_per_sample
    Cp = Cg * GROUPS
    c_first = (pid - n * blocks_per_sample) * Cp
    return n, c_first, Cp, n * C + c_first


@triton.jit
def _sum_per_group(v, GROUPS: tl.constexpr, BLOCK_C: tl.constexpr):
    """[GROUPS] totals of a [BLOCK_C] per-channel vector whose channels are GROUPS whole groups of
    BLOCK_C // GROUPS channels each (GROUPS = 1: the total of the whole vector)."""
    return tl.sum(tl.reshape(v, [GROUPS, BLOCK_C // GROUPS]), axis=1)


@triton.jit
def _per_channel(v, GROUPS: tl.constexpr, BLOCK_C: tl.constexpr):
    """The [BLOCK_C] per-channel vector holding each channel's group value from a [GROUPS] vector."""
    return tl.reshape(tl.broadcast_to(v[:, None], [GROUPS, BLOCK_C // GROUPS]), [BLOCK_C])


@triton.jit
def _dropout_seed(seed_ptr, DROPOUT: tl.constexpr):
    """The dropout seed, loaded once per program: a load inside a loop is issued again every trip
    (the loop's stores may alias it). 0 without dropout, where seed_ptr is only a placeholder."""
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)
    return seed


@triton.jit
def _dropout_keep(seed, n, c_tile, p0, C, HW, threshold, OCTETS: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """keep[i, j] for channel c_tile + i and position p0 + j of sample n, with octets (see the module
    docstring) along positions (OCTETS 1, p0 % 8 == 0) or along channels (OCTETS 2, c_tile % 8 == 0;
    OCTETS 3: any c_tile, each element drawing its own octet's words, 8 times the work).
    keep = half >= t. `threshold` is t*2^16, compared as uint32: low half >= t <=> (w << 16) >= t*2^16,
    high half >= t <=> w >= t*2^16, whatever w's low bits."""
    t = threshold.to(tl.uint32)
    if OCTETS == 3:
        c = c_tile + tl.arange(0, BLOCK_C)
        p = p0 + tl.arange(0, BLOCK_HW)
        counters = (n.to(tl.int64) * HW + p[None, :]) * tl.cdiv(C, 8) + (c // 8)[:, None]
        w0, w1, w2, w3 = tl.randint4x(seed, counters)
        k = (c % 8)[:, None]
        w = tl.where(k < 4, tl.where(k < 2, w0, w1), tl.where(k < 6, w2, w3))
        keep = tl.where(k % 2 == 0, w << 16, w) >= t
    else:  # (one branch per constexpr value: Triton compiles the code after a return in an if, too)
        if OCTETS == 1:
            rows = n * C + c_tile + tl.arange(0, BLOCK_C)
            octets = p0 // 8 + tl.arange(0, BLOCK_HW // 8)
            counters = rows.to(tl.int64)[:, None] * tl.cdiv(HW, 8) + octets[None, :]
        else:
            octets = c_tile // 8 + tl.arange(0, BLOCK_C // 8)
            p = p0 + tl.arange(0, BLOCK_HW)
            counters = (n.to(tl.int64) * HW + p[None, :]) * tl.cdiv(C, 8) + octets[:, None]
        w0, w1, w2, w3 = tl.randint4x(seed, counters)
        # join adds a last axis: join(join(A, B), join(C, D))[..., i, j] = (A, B, C, D)[2j + i], so
        # with (A, B, C, D) = (w0, w2, w1, w3) element [..., i, j] comes from w_{2i+j}; joining lows and
        # highs last puts half h of w_{2i+j} at [..., i, j, h]: index 4i + 2j + h is its place in the octet
        lows = tl.join(tl.join(w0 << 16, w2 << 16), tl.join(w1 << 16, w3 << 16))
        highs = tl.join(tl.join(w0, w2), tl.join(w1, w3))
        halves = tl.join(lows, highs)  # [BLOCK_C, BLOCK_HW // 8, 2, 2, 2] or [BLOCK_C // 8, BLOCK_HW, 2, 2, 2]
        if OCTETS == 2:
            halves = tl.permute(halves, (0, 2, 3, 4, 1))  # the octet next to its channel axis
        keep = tl.reshape(halves, [BLOCK_C, BLOCK_HW]) >= t
    return keep


@triton.jit
def _group_moments(x_ptr, x_base, weight_ptr, bias_ptr, scale_ptr, shift_ptr, c_first, st_base, Cp,
                   p_start, p_end, stride_c, stride_p,
                   SCALE_IN: tl.constexpr, SHIFT_IN: tl.constexpr, GROUPS: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """[GROUPS] vectors (count, mean, M2) of u = x*(1+s_in) + t_in over positions [p_start, p_end)
    of each of the program's groups (its Cp channels; GROUPS > 1 only when BLOCK_C = Cp).

    Shifted sums: K is a pilot mean of each group, its mean over the first tile (m of the group's
    n elements). Each tile lane sums d = u - K and d^2; then mean = K + S1/n, M2 = S2 - S1^2/n.
    The subtraction cancels S1^2/n = n*(mean - K)^2, and a subset's mean is never far from the
    whole's: (mean - K)^2 <= var*(n/m - 1). So S2 <= M2*n/m, and M2's relative error (the fp32
    rounding of S2's sums, then the cancellation) is at most n/m times that of a sum of squares of
    centred data: log2(n/m) bits at worst, whatever the data's offset (E[u^2] - E[u]^2 loses
    log2(1 + mean^2/var)). Typically the pilot is close to the mean and nothing is lost; in the worst
    case, tested, at n/m = 36 the error stays within 1e-5.
    """
    # pilot: the first tile (the loop reads it again, from L1/L2)
    offs_c, cmask, _, _, _, _, _, one_plus_s, shift = _channel_coefficients(
        weight_ptr, bias_ptr, scale_ptr, shift_ptr, c_first, st_base, 0, Cp, 0.0, 1.0,
        SCALE_IN, SHIFT_IN, False, False, BLOCK_C)
    offs_p = p_start + tl.arange(0, BLOCK_HW)
    mask = cmask[:, None] & (offs_p < p_end)[None, :]
    x = tl.load(x_ptr + x_base + offs_c[:, None] * stride_c + offs_p[None, :] * stride_p,
                mask=mask, other=0.0).to(tl.float32)
    u = tl.where(mask, x * one_plus_s[:, None] + shift[:, None], 0.0)
    pilot_count = _sum_per_group(tl.sum(mask.to(tl.float32), axis=1), GROUPS, BLOCK_C)
    pilot = _sum_per_group(tl.sum(u, axis=1), GROUPS, BLOCK_C) / pilot_count  # [GROUPS]
    pilot_per_channel = _per_channel(pilot, GROUPS, BLOCK_C)

    sum_d = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
    sum_d2 = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
    for c0 in range(0, Cp, BLOCK_C):
        offs_c, cmask, _, _, _, _, _, one_plus_s, shift = _channel_coefficients(
            weight_ptr, bias_ptr, scale_ptr, shift_ptr, c_first, st_base, c0, Cp, 0.0, 1.0,
            SCALE_IN, SHIFT_IN, False, False, BLOCK_C)
        shift -= pilot_per_channel  # d = x*(1+s_in) + (t_in - K)
        for p0 in range(p_start, p_end, BLOCK_HW):
            offs_p = p0 + tl.arange(0, BLOCK_HW)
            mask = cmask[:, None] & (offs_p < p_end)[None, :]
            x = tl.load(x_ptr + x_base + offs_c[:, None] * stride_c + offs_p[None, :] * stride_p,
                        mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, x * one_plus_s[:, None] + shift[:, None], 0.0)
            sum_d += d
            sum_d2 += d * d
    count = tl.zeros([GROUPS], tl.float32) + ((Cp // GROUPS) * (p_end - p_start)).to(tl.float32)
    s1 = _sum_per_group(tl.sum(sum_d, axis=1), GROUPS, BLOCK_C)
    s2 = _sum_per_group(tl.sum(sum_d2, axis=1), GROUPS, BLOCK_C)
    mean = pilot + s1 / count
    m2 = tl.maximum(s2 - s1 * (s1 / count), 0.0)
    return count, mean, m2


@triton.jit
def _gn_fwd_moments_kernel(
    x_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, moments_ptr,
    C, HW, G, Cg, hw_per_split, num_splits,
    stride_xn, stride_xc, stride_xp,
    SCALE_IN: tl.constexpr, SHIFT_IN: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Split path, grid (N*G, num_splits): partial (count, mean, M2) of one group's slice of
    positions, stored at moments[n*G + g, split, 0:3]."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n = pid // G
    c_first = (pid - n * G) * Cg
    x_base = n.to(tl.int64) * stride_xn + c_first * stride_xc
    p_start = split * hw_per_split
    p_end = tl.minimum(p_start + hw_per_split, HW)
    count, mean, m2 = _group_moments(x_ptr, x_base, weight_ptr, bias_ptr, scale_ptr, shift_ptr,
                                     c_first, n * C + c_first, Cg, p_start, p_end,
                                     stride_xc, stride_xp, SCALE_IN, SHIFT_IN, 1, BLOCK_C, BLOCK_HW)
    out = moments_ptr + (pid * num_splits + split) * 3
    tl.store(out, tl.sum(count, axis=0))
    tl.store(out + 1, tl.sum(mean, axis=0))
    tl.store(out + 2, tl.sum(m2, axis=0))


@triton.jit
def _gn_fwd_kernel(
    x_ptr, y_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, moments_ptr, seed_ptr,
    C, HW, G, Cg, hw_per_split, num_splits, num_blocks, eps, drop_threshold, drop_scale,
    stride_xn, stride_xc, stride_xp, stride_yn, stride_yc, stride_yp,
    SCALE_IN: tl.constexpr, SHIFT_IN: tl.constexpr, SCALE_OUT: tl.constexpr, SHIFT_OUT: tl.constexpr,
    SILU: tl.constexpr, DROPOUT: tl.constexpr, FUSED_STATS: tl.constexpr, SPLITS_P2: tl.constexpr,
    GROUPS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, RESIDENT: tl.constexpr,
):
    """Grid (N*G/GROUPS, num_splits): y = act(a*x + b) on GROUPS adjacent groups' slice of
    positions (GROUPS > 1: channels_last, whole groups in one BLOCK_C = GROUPS*Cg channel tile, so a
    tile row spans GROUPS*Cg contiguous channels; only with FUSED_STATS).

    FUSED_STATS (num_splits == 1): the program first computes its groups' moments itself; with
    RESIDENT (one tile holds the whole block) from x read once and kept in registers (_resident_forward).
    Without FUSED_STATS it merges the num_splits partial moments written by _gn_fwd_moments_kernel:
    n = sum n_i, mean = sum n_i*mean_i / n, M2 = sum (M2_i + n_i*(mean_i - mean)^2).
    The split-0 program stores mean and rstd = 1/sqrt(M2/n + eps).
    DROPOUT (0: off, else _dropout_keep's OCTETS): y = where(keep, y*drop_scale, 0).
    Each program takes blocks pid, pid + programs, ... of the num_blocks = N*G/GROUPS (one each, unless
    the launcher caps the grid: fewer groups in flight between their two passes, so that the second
    pass finds them in L2).
    """
    split = tl.program_id(1)
    seed = _dropout_seed(seed_ptr, DROPOUT)
    for pid in range(tl.program_id(0), num_blocks, tl.num_programs(0)):
        n, c_first, Cp, st_base = _block_origin(pid, C, G, Cg, GROUPS)
        x_base = n.to(tl.int64) * stride_xn + c_first * stride_xc
        y_base = n.to(tl.int64) * stride_yn + c_first * stride_yc
        p_start = split * hw_per_split
        p_end = tl.minimum(p_start + hw_per_split, HW)

        if RESIDENT:
            _resident_forward(x_ptr, y_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, seed,
                              pid, n, c_first, Cp, st_base, x_base, y_base, C, HW, eps, drop_threshold, drop_scale,
                              stride_xc, stride_xp, stride_yc, stride_yp,
                              SCALE_IN, SHIFT_IN, SCALE_OUT, SHIFT_OUT, SILU, DROPOUT, GROUPS, BLOCK_C, BLOCK_HW)
        else:
            _looped_forward(x_ptr, y_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,
                            moments_ptr, seed, pid, split, n, c_first, Cp, st_base, x_base, y_base, p_start, p_end,
                            C, HW, num_splits, eps, drop_threshold, drop_scale,
                            stride_xc, stride_xp, stride_yc, stride_yp,
                            SCALE_IN, SHIFT_IN, SCALE_OUT, SHIFT_OUT, SILU, DROPOUT, FUSED_STATS, SPLITS_P2,
                            GROUPS, BLOCK_C, BLOCK_HW)


@triton.jit
def _activate_and_store(h, y_ptr, y_base, offs_c, offs_p, mask, stride_yc, stride_yp, seed, n, c_tile, p0, C, HW,
                        drop_threshold, drop_scale, SILU: tl.constexpr, DROPOUT: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """y = act(h), times keep/P_keep with dropout, stored in y's dtype on the tile (c_tile + offs_c, offs_p)."""
    if SILU:
        h = h * _sigmoid(h)
    if DROPOUT:
        keep = _dropout_keep(seed, n, c_tile, p0, C, HW, drop_threshold, DROPOUT, BLOCK_C, BLOCK_HW)
        h = tl.where(keep, h * drop_scale, 0.0)
    tl.store(y_ptr + y_base + offs_c[:, None] * stride_yc + offs_p[None, :] * stride_yp,
             h.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _resident_forward(x_ptr, y_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, seed,
                      pid, n, c_first, Cp, st_base, x_base, y_base, C, HW, eps, drop_threshold, drop_scale,
                      stride_xc, stride_xp, stride_yc, stride_yp,
                      SCALE_IN: tl.constexpr, SHIFT_IN: tl.constexpr, SCALE_OUT: tl.constexpr,
                      SHIFT_OUT: tl.constexpr, SILU: tl.constexpr, DROPOUT: tl.constexpr, GROUPS: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """The block (GROUPS groups: Cp <= BLOCK_C channels, HW <= BLOCK_HW positions) as one tile: x is read
    once (one DRAM read and one write per element, whatever the cache holds) and the moments are
    exact two-pass sums over registers: mean = sum u / n, M2 = sum d^2 with d = u - mean; then
    h = gamma*d*r*(1+s_out) + beta*(1+s_out) + t_out."""
    # mean = 0, rstd = 1: p = 1+s_in and q = t_in, so u = x*p + q
    offs_c, cmask, gamma, beta, _, one_plus_s_out, t_out, p, q = _channel_coefficients(
        weight_ptr, bias_ptr, scale_ptr, shift_ptr, c_first, st_base, 0, Cp, 0.0, 1.0,
        SCALE_IN, SHIFT_IN, SCALE_OUT, SHIFT_OUT, BLOCK_C)
    offs_p = tl.arange(0, BLOCK_HW)
    mask = cmask[:, None] & (offs_p < HW)[None, :]
    x = tl.load(x_ptr + x_base + offs_c[:, None] * stride_xc + offs_p[None, :] * stride_xp,
                mask=mask, other=0.0).to(tl.float32)
    u = tl.where(mask, x * p[:, None] + q[:, None], 0.0)
    count = tl.zeros([GROUPS], tl.float32) + (Cp // GROUPS) * HW
    mean = _sum_per_group(tl.sum(u, axis=1), GROUPS, BLOCK_C) / count  # [GROUPS]
    d = tl.where(mask, u - _per_channel(mean, GROUPS, BLOCK_C)[:, None], 0.0)
    rstd = tl.rsqrt(_sum_per_group(tl.sum(d * d, axis=1), GROUPS, BLOCK_C) / count + eps)
    offs_g = pid * GROUPS + tl.arange(0, GROUPS)  # = n*G + the program's first group + g
    tl.store(mean_ptr + offs_g, mean)
    tl.store(rstd_ptr + offs_g, rstd)
    a = gamma * _per_channel(rstd, GROUPS, BLOCK_C) * one_plus_s_out
    b = beta * one_plus_s_out + t_out
    _activate_and_store(d * a[:, None] + b[:, None], y_ptr, y_base, offs_c, offs_p, mask, stride_yc, stride_yp,
                        seed, n, c_first, 0, C, HW, drop_threshold, drop_scale, SILU, DROPOUT, BLOCK_C, BLOCK_HW)


@triton.jit
def _looped_forward(x_ptr, y_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, moments_ptr, seed,
                    pid, split, n, c_first, Cp, st_base, x_base, y_base, p_start, p_end, C, HW, num_splits, eps,
                    drop_threshold, drop_scale, stride_xc, stride_xp, stride_yc, stride_yp,
                    SCALE_IN: tl.constexpr, SHIFT_IN: tl.constexpr, SCALE_OUT: tl.constexpr,
                    SHIFT_OUT: tl.constexpr, SILU: tl.constexpr, DROPOUT: tl.constexpr,
                    FUSED_STATS: tl.constexpr, SPLITS_P2: tl.constexpr, GROUPS: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """The block's positions [p_start, p_end) tile by tile: moments (its own, or merged from the split
    path's partial moments), then the output pass, which reads x again."""
    if FUSED_STATS:
        count, mean, m2 = _group_moments(x_ptr, x_base, weight_ptr, bias_ptr, scale_ptr, shift_ptr,
                                         c_first, st_base, Cp, 0, HW, stride_xc, stride_xp,
                                         SCALE_IN, SHIFT_IN, GROUPS, BLOCK_C, BLOCK_HW)
    else:  # GROUPS == 1
        offs_s = tl.arange(0, SPLITS_P2)
        smask = offs_s < num_splits
        partial = moments_ptr + (pid * num_splits + offs_s) * 3
        counts = tl.load(partial, mask=smask, other=0.0)
        means = tl.load(partial + 1, mask=smask, other=0.0)
        m2s = tl.load(partial + 2, mask=smask, other=0.0)
        count_total = tl.sum(counts, axis=0)
        mean_total = tl.sum(counts * means, axis=0) / count_total
        deviation = means - mean_total
        count = tl.zeros([GROUPS], tl.float32) + count_total
        mean = tl.zeros([GROUPS], tl.float32) + mean_total
        m2 = tl.zeros([GROUPS], tl.float32) + tl.sum(m2s + counts * deviation * deviation, axis=0)
    rstd = tl.rsqrt(m2 / count + eps)
    if split == 0:
        offs_g = pid * GROUPS + tl.arange(0, GROUPS)  # = n*G + the program's first group + g
        tl.store(mean_ptr + offs_g, mean)
        tl.store(rstd_ptr + offs_g, rstd)
    mean = _per_channel(mean, GROUPS, BLOCK_C)
    rstd = _per_channel(rstd, GROUPS, BLOCK_C)

    for c0 in range(0, Cp, BLOCK_C):
        offs_c, cmask, gamma, beta, _, one_plus_s_out, t_out, p, q = _channel_coefficients(
            weight_ptr, bias_ptr, scale_ptr, shift_ptr, c_first, st_base, c0, Cp, mean, rstd,
            SCALE_IN, SHIFT_IN, SCALE_OUT, SHIFT_OUT, BLOCK_C)
        a, b = _output_coefficients(gamma, beta, p, q, one_plus_s_out, t_out)
        for p0 in range(p_start, p_end, BLOCK_HW):
            offs_p = p0 + tl.arange(0, BLOCK_HW)
            mask = cmask[:, None] & (offs_p < p_end)[None, :]
            x = tl.load(x_ptr + x_base + offs_c[:, None] * stride_xc + offs_p[None, :] * stride_xp,
                        mask=mask, other=0.0).to(tl.float32)
            _activate_and_store(x * a[:, None] + b[:, None], y_ptr, y_base, offs_c, offs_p, mask,
                                stride_yc, stride_yp, seed, n, c_first + c0, p0, C, HW, drop_threshold,
                                drop_scale, SILU, DROPOUT, BLOCK_C, BLOCK_HW)


@triton.jit
def _load_x_dh(x_ptr, dy_ptr, x_base, dy_base, offs_c, cmask, p0, p_end,
               stride_xc, stride_xp, stride_dyc, stride_dyp, a, b,
               seed, n, c_tile, C, HW, drop_threshold, drop_scale,
               SILU: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """The (channels offs_c x positions p0 .. p0+BLOCK_HW) tile: x and dh = dL/dh, where h = a*x + b
    (per channel, as in the forward) and dh = dy'*sigma(h)*(1 + h*(1 - sigma(h))) with SiLU, else dy';
    dy' = where(keep, dy*drop_scale, 0) with dropout (the forward's mask, regenerated), else dy.
    Returns x, dh, the positions and the mask (channel in cmask, position < p_end); masked lanes load
    x = dy = 0, so dh = 0 there."""
    offs_p = p0 + tl.arange(0, BLOCK_HW)
    mask = cmask[:, None] & (offs_p < p_end)[None, :]
    x = tl.load(x_ptr + x_base + offs_c[:, None] * stride_xc + offs_p[None, :] * stride_xp,
                mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dy_ptr + dy_base + offs_c[:, None] * stride_dyc + offs_p[None, :] * stride_dyp,
                 mask=mask, other=0.0).to(tl.float32)
    if DROPOUT:
        keep = _dropout_keep(seed, n, c_tile, p0, C, HW, drop_threshold, DROPOUT, BLOCK_C, BLOCK_HW)
        dh = tl.where(keep, dh * drop_scale, 0.0)
    if SILU:
        h = x * a[:, None] + b[:, None]
        sig = _sigmoid(h)
        dh = dh * sig * (1.0 + h * (1.0 - sig))
    return x, dh, offs_p, mask


@triton.jit
def _channel_sums(
    x_ptr, dy_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, sums_ptr, seed,
    x_base, dy_base, st_base, sums_base, n, c_first, Cp, C, HW, p_start, p_end, num_splits, mean, rstd,
    drop_threshold, drop_scale, stride_xc, stride_xp, stride_dyc, stride_dyp,
    SCALE_IN: tl.constexpr, SHIFT_IN: tl.constexpr, SCALE_OUT: tl.constexpr, SHIFT_OUT: tl.constexpr,
    SILU: tl.constexpr, DROPOUT: tl.constexpr, GROUPS: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """Per channel c of the program's Cp channels, over positions [p_start, p_end): A_c = sum dh*xh
    and B_c = sum dh, stored at sums[sums_base + c*num_splits*2 + (0, 1)].
    Returns [GROUPS] group totals (sum_c k_c*A_c, sum_c k_c*B_c), k = gamma*(1+s_out)."""
    total_ka = tl.zeros([GROUPS], tl.float32)
    total_kb = tl.zeros([GROUPS], tl.float32)
    for c0 in range(0, Cp, BLOCK_C):
        offs_c, cmask, gamma, beta, one_plus_s_in, one_plus_s_out, t_out, p, q = _channel_coefficients(
            weight_ptr, bias_ptr, scale_ptr, shift_ptr, c_first, st_base, c0, Cp, mean, rstd,
            SCALE_IN, SHIFT_IN, SCALE_OUT, SHIFT_OUT, BLOCK_C)
        a, b = _output_coefficients(gamma, beta, p, q, one_plus_s_out, t_out)
        acc_dh_xh = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
        acc_dh = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
        for p0 in range(p_start, p_end, BLOCK_HW):
            x, dh, _, _ = _load_x_dh(x_ptr, dy_ptr, x_base, dy_base, offs_c, cmask, p0, p_end,
                                     stride_xc, stride_xp, stride_dyc, stride_dyp, a, b,
                                     seed, n, c_first + c0, C, HW, drop_threshold, drop_scale,
                                     SILU, DROPOUT, BLOCK_C, BLOCK_HW)
            # masked lanes: dy = 0 there, so dh = 0 and they add nothing
            acc_dh_xh += dh * (x * p[:, None] + q[:, None])
            acc_dh += dh
        sum_dh_xh = tl.sum(acc_dh_xh, axis=1)
        sum_dh = tl.sum(acc_dh, axis=1)
        out = sums_ptr + sums_base + offs_c * (num_splits * 2)
        tl.store(out, sum_dh_xh, mask=cmask)
        tl.store(out + 1, sum_dh, mask=cmask)
        k = gamma * one_plus_s_out  # 0 on masked channels
        total_ka += _sum_per_group(k * sum_dh_xh, GROUPS, BLOCK_C)
        total_kb += _sum_per_group(k * sum_dh, GROUPS, BLOCK_C)
    return total_ka, total_kb


@triton.jit
def _gn_bwd_sums_kernel(
    x_ptr, dy_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, sums_ptr, seed_ptr,
    C, HW, G, Cg, hw_per_split, num_splits, drop_threshold, drop_scale,
    stride_xn, stride_xc, stride_xp, stride_dyn, stride_dyc, stride_dyp,
    SCALE_IN: tl.constexpr, SHIFT_IN: tl.constexpr, SCALE_OUT: tl.constexpr, SHIFT_OUT: tl.constexpr,
    SILU: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Split path, grid (N*G, num_splits): partial A, B of one group's slice of positions,
    stored at sums[n, c, split, 0:2]."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n = pid // G
    c_first = (pid - n * G) * Cg
    p_start = split * hw_per_split
    _channel_sums(x_ptr, dy_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, sums_ptr,
                  _dropout_seed(seed_ptr, DROPOUT), n.to(tl.int64) * stride_xn + c_first * stride_xc,
                  n.to(tl.int64) * stride_dyn + c_first * stride_dyc,
                  n * C + c_first, ((n * C + c_first) * num_splits + split) * 2,
                  n, c_first, Cg, C, HW, p_start, tl.minimum(p_start + hw_per_split, HW), num_splits,
                  tl.load(mean_ptr + pid), tl.load(rstd_ptr + pid), drop_threshold, drop_scale,
                  stride_xc, stride_xp, stride_dyc, stride_dyp,
                  SCALE_IN, SHIFT_IN, SCALE_OUT, SHIFT_OUT, SILU, DROPOUT, 1, BLOCK_C, BLOCK_HW)


@triton.jit
def _gn_bwd_kernel(
    x_ptr, dy_ptr, dx_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,
    sums_ptr, sums_in_ptr, seed_ptr,
    C, HW, G, Cg, hw_per_split, num_splits, num_blocks, inv_group_size, drop_threshold, drop_scale,
    stride_xn, stride_xc, stride_xp, stride_dyn, stride_dyc, stride_dyp,
    stride_dxn, stride_dxc, stride_dxp,
    SCALE_IN: tl.constexpr, SHIFT_IN: tl.constexpr, SCALE_OUT: tl.constexpr, SHIFT_OUT: tl.constexpr,
    SILU: tl.constexpr, DROPOUT: tl.constexpr, FUSED_SUMS: tl.constexpr, SPLITS_P2: tl.constexpr,
    GROUPS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, RESIDENT: tl.constexpr,
):
    """Grid (N*G/GROUPS, num_splits): dx on GROUPS adjacent groups' slice of positions (GROUPS > 1
    as in _gn_fwd_kernel), and (when s_in or t_in is present) sums_in[n, c, split, 0:2] =
    (sum du*x, sum du) over that slice.

    FUSED_SUMS (num_splits == 1): the program first computes A, B itself (and stores them);
    otherwise it reads the partial A, B written by _gn_bwd_sums_kernel.
    RESIDENT (FUSED_SUMS, one tile holds the whole block): x and dy are read once, see _resident_backward.
    Programs loop over the num_blocks blocks as in _gn_fwd_kernel.
    """
    split = tl.program_id(1)
    seed = _dropout_seed(seed_ptr, DROPOUT)
    for pid in range(tl.program_id(0), num_blocks, tl.num_programs(0)):
        n, c_first, Cp, st_base = _block_origin(pid, C, G, Cg, GROUPS)
        x_base = n.to(tl.int64) * stride_xn + c_first * stride_xc
        dy_base = n.to(tl.int64) * stride_dyn + c_first * stride_dyc
        dx_base = n.to(tl.int64) * stride_dxn + c_first * stride_dxc
        p_start = split * hw_per_split
        p_end = tl.minimum(p_start + hw_per_split, HW)
        offs_g = pid * GROUPS + tl.arange(0, GROUPS)  # = n*G + the program's first group + g
        mean = _per_channel(tl.load(mean_ptr + offs_g), GROUPS, BLOCK_C)
        rstd = _per_channel(tl.load(rstd_ptr + offs_g), GROUPS, BLOCK_C)
        if RESIDENT:
            _resident_backward(x_ptr, dy_ptr, dx_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, sums_ptr,
                               sums_in_ptr, seed, n, c_first, Cp, st_base, x_base, dy_base, dx_base, C, HW,
                               mean, rstd, inv_group_size, drop_threshold, drop_scale,
                               stride_xc, stride_xp, stride_dyc, stride_dyp, stride_dxc, stride_dxp,
                               SCALE_IN, SHIFT_IN, SCALE_OUT, SHIFT_OUT, SILU, DROPOUT, GROUPS, BLOCK_C, BLOCK_HW)
        else:
            _looped_backward(x_ptr, dy_ptr, dx_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, sums_ptr,
                             sums_in_ptr, seed, split, n, c_first, Cp, st_base, x_base, dy_base, dx_base,
                             p_start, p_end, C, HW, num_splits, mean, rstd, inv_group_size, drop_threshold,
                             drop_scale, stride_xc, stride_xp, stride_dyc, stride_dyp, stride_dxc, stride_dxp,
                             SCALE_IN, SHIFT_IN, SCALE_OUT, SHIFT_OUT, SILU, DROPOUT, FUSED_SUMS, SPLITS_P2,
                             GROUPS, BLOCK_C, BLOCK_HW)


@triton.jit
def _du_coefficients(rstd, gamma, one_plus_s_out, p, q, mean_g, mean_gxh):
    """Per channel (du_dh, du_dx, du_0) with du = dh*du_dh + x*du_dx + du_0, from
    du = r*(dh*k - mean_g - xh*mean_gxh), xh = x*p + q, k = gamma*(1+s_out)."""
    return rstd * gamma * one_plus_s_out, -rstd * mean_gxh * p, -rstd * (mean_g + q * mean_gxh)


@triton.jit
def _store_dx(x, dh, du_dh, du_dx, du_0, one_plus_s_in, dx_ptr, dx_base, offs_c, offs_p, mask,
              stride_dxc, stride_dxp):
    """du on the tile, stored as dx = du*(1+s_in) in dx's dtype; returns du (du_0 on masked lanes)."""
    du = dh * du_dh[:, None] + (x * du_dx[:, None] + du_0[:, None])
    tl.store(dx_ptr + dx_base + offs_c[:, None] * stride_dxc + offs_p[None, :] * stride_dxp,
             (du * one_plus_s_in[:, None]).to(dx_ptr.dtype.element_ty), mask=mask)
    return du


@triton.jit
def _resident_backward(x_ptr, dy_ptr, dx_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, sums_ptr, sums_in_ptr,
                       seed, n, c_first, Cp, st_base, x_base, dy_base, dx_base, C, HW, mean, rstd, inv_group_size,
                       drop_threshold, drop_scale, stride_xc, stride_xp, stride_dyc, stride_dyp,
                       stride_dxc, stride_dxp,
                       SCALE_IN: tl.constexpr, SHIFT_IN: tl.constexpr, SCALE_OUT: tl.constexpr,
                       SHIFT_OUT: tl.constexpr, SILU: tl.constexpr, DROPOUT: tl.constexpr, GROUPS: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """The block as one tile (as in _resident_forward): x and dy read once and kept in registers for
    both steps, the channel sums A, B (stored, and their group totals) and then dx (and sums_in)."""
    offs_c, cmask, gamma, beta, one_plus_s_in, one_plus_s_out, t_out, p, q = _channel_coefficients(
        weight_ptr, bias_ptr, scale_ptr, shift_ptr, c_first, st_base, 0, Cp, mean, rstd,
        SCALE_IN, SHIFT_IN, SCALE_OUT, SHIFT_OUT, BLOCK_C)
    a, b = _output_coefficients(gamma, beta, p, q, one_plus_s_out, t_out)
    x, dh, offs_p, mask = _load_x_dh(x_ptr, dy_ptr, x_base, dy_base, offs_c, cmask, 0, HW,
                                     stride_xc, stride_xp, stride_dyc, stride_dyp, a, b,
                                     seed, n, c_first, C, HW, drop_threshold, drop_scale,
                                     SILU, DROPOUT, BLOCK_C, BLOCK_HW)
    sum_dh_xh = tl.sum(dh * (x * p[:, None] + q[:, None]), axis=1)  # dh = 0 on masked lanes
    sum_dh = tl.sum(dh, axis=1)
    out = sums_ptr + (st_base + offs_c) * 2  # sums[n, c, 0, 0:2]: one split
    tl.store(out, sum_dh_xh, mask=cmask)
    tl.store(out + 1, sum_dh, mask=cmask)
    k = gamma * one_plus_s_out  # 0 on masked channels
    mean_g = _per_channel(_sum_per_group(k * sum_dh, GROUPS, BLOCK_C) * inv_group_size, GROUPS, BLOCK_C)
    mean_gxh = _per_channel(_sum_per_group(k * sum_dh_xh, GROUPS, BLOCK_C) * inv_group_size, GROUPS, BLOCK_C)
    du_dh, du_dx, du_0 = _du_coefficients(rstd, gamma, one_plus_s_out, p, q, mean_g, mean_gxh)
    du = _store_dx(x, dh, du_dh, du_dx, du_0, one_plus_s_in, dx_ptr, dx_base, offs_c, offs_p, mask,
                   stride_dxc, stride_dxp)
    if SCALE_IN or SHIFT_IN:
        out = sums_in_ptr + (st_base + offs_c) * 2
        tl.store(out, tl.sum(du * x, axis=1), mask=cmask)  # x = 0 on masked lanes
        tl.store(out + 1, tl.sum(tl.where(mask, du, 0.0), axis=1), mask=cmask)


@triton.jit
def _looped_backward(x_ptr, dy_ptr, dx_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, sums_ptr, sums_in_ptr,
                     seed, split, n, c_first, Cp, st_base, x_base, dy_base, dx_base, p_start, p_end, C, HW,
                     num_splits, mean, rstd, inv_group_size, drop_threshold, drop_scale,
                     stride_xc, stride_xp, stride_dyc, stride_dyp, stride_dxc, stride_dxp,
                     SCALE_IN: tl.constexpr, SHIFT_IN: tl.constexpr, SCALE_OUT: tl.constexpr,
                     SHIFT_OUT: tl.constexpr, SILU: tl.constexpr, DROPOUT: tl.constexpr,
                     FUSED_SUMS: tl.constexpr, SPLITS_P2: tl.constexpr, GROUPS: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """The block's positions [p_start, p_end) tile by tile: the channel sums (its own pass over x and
    dy, or the split path's partial sums), then dx, which reads x and dy again."""
    if FUSED_SUMS:
        total_ka, total_kb = _channel_sums(
            x_ptr, dy_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, sums_ptr, seed,
            x_base, dy_base, st_base, st_base * 2, n, c_first, Cp, C, HW, 0, HW, 1, mean, rstd,
            drop_threshold, drop_scale, stride_xc, stride_xp, stride_dyc, stride_dyp,
            SCALE_IN, SHIFT_IN, SCALE_OUT, SHIFT_OUT, SILU, DROPOUT, GROUPS, BLOCK_C, BLOCK_HW)
    else:  # GROUPS == 1
        total_ka = tl.zeros([GROUPS], tl.float32)
        total_kb = tl.zeros([GROUPS], tl.float32)
        offs_s = tl.arange(0, SPLITS_P2)
        for c0 in range(0, Cp, BLOCK_C):
            offs_c, cmask, gamma, _, _, one_plus_s_out, _, _, _ = _channel_coefficients(
                weight_ptr, bias_ptr, scale_ptr, shift_ptr, c_first, st_base, c0, Cp, mean, rstd,
                False, False, SCALE_OUT, False, BLOCK_C)
            mask = cmask[:, None] & (offs_s < num_splits)[None, :]
            partial = sums_ptr + ((st_base + offs_c)[:, None] * num_splits + offs_s[None, :]) * 2
            sum_dh_xh = tl.sum(tl.load(partial, mask=mask, other=0.0), axis=1)
            sum_dh = tl.sum(tl.load(partial + 1, mask=mask, other=0.0), axis=1)
            k = gamma * one_plus_s_out
            total_ka += _sum_per_group(k * sum_dh_xh, GROUPS, BLOCK_C)
            total_kb += _sum_per_group(k * sum_dh, GROUPS, BLOCK_C)
    mean_g = _per_channel(total_kb * inv_group_size, GROUPS, BLOCK_C)  # mean_group(g), per channel
    mean_gxh = _per_channel(total_ka * inv_group_size, GROUPS, BLOCK_C)  # mean_group(g*xh)

    for c0 in range(0, Cp, BLOCK_C):
        offs_c, cmask, gamma, beta, one_plus_s_in, one_plus_s_out, t_out, p, q = _channel_coefficients(
            weight_ptr, bias_ptr, scale_ptr, shift_ptr, c_first, st_base, c0, Cp, mean, rstd,
            SCALE_IN, SHIFT_IN, SCALE_OUT, SHIFT_OUT, BLOCK_C)
        a, b = _output_coefficients(gamma, beta, p, q, one_plus_s_out, t_out)
        du_dh, du_dx, du_0 = _du_coefficients(rstd, gamma, one_plus_s_out, p, q, mean_g, mean_gxh)
        acc_du_x = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
        acc_du = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
        for p0 in range(p_start, p_end, BLOCK_HW):
            x, dh, offs_p, mask = _load_x_dh(x_ptr, dy_ptr, x_base, dy_base, offs_c, cmask, p0, p_end,
                                             stride_xc, stride_xp, stride_dyc, stride_dyp, a, b,
                                             seed, n, c_first + c0, C, HW, drop_threshold, drop_scale,
                                             SILU, DROPOUT, BLOCK_C, BLOCK_HW)
            du = _store_dx(x, dh, du_dh, du_dx, du_0, one_plus_s_in, dx_ptr, dx_base, offs_c, offs_p, mask,
                           stride_dxc, stride_dxp)
            if SCALE_IN:
                acc_du_x += du * x  # x = 0 on masked lanes
            if SHIFT_IN:
                acc_du += tl.where(mask, du, 0.0)
        if SCALE_IN or SHIFT_IN:
            out = sums_in_ptr + ((st_base + offs_c) * num_splits + split) * 2
            tl.store(out, tl.sum(acc_du_x, axis=1), mask=cmask)
            tl.store(out + 1, tl.sum(acc_du, axis=1), mask=cmask)


@triton.jit
def _gn_param_grads_kernel(
    sums_ptr, sums_in_ptr, weight_ptr, bias_ptr, scale_ptr,
    dweight_ptr, dbias_ptr, dscale_ptr, dshift_ptr,
    N, C, num_splits,
    SCALE_IN: tl.constexpr, SHIFT_IN: tl.constexpr, SCALE_OUT: tl.constexpr, SHIFT_OUT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid (cdiv(C, BLOCK_C),): parameter gradients from the per-(n, c, split) sums, summed in
    a fixed order (deterministic). With A, B = sum over splits of sums[n, c, :, 0:2]:
    dweight = sum_n (1+s_out)*A, dbias = sum_n (1+s_out)*B; post: dscale = gamma*A + beta*B,
    dshift = B; pre: dscale, dshift = sum over splits of sums_in[n, c, :, 0:2]."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    gamma = tl.load(weight_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
    beta = tl.load(bias_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
    acc_dweight = tl.zeros([BLOCK_C], tl.float32)
    acc_dbias = tl.zeros([BLOCK_C], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = (offs_n < N)[:, None] & cmask[None, :]
        nc = offs_n[:, None] * C + offs_c[None, :]
        sum_dh_xh = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        sum_dh = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        for split in range(0, num_splits):
            sum_dh_xh += tl.load(sums_ptr + (nc * num_splits + split) * 2, mask=mask, other=0.0)
            sum_dh += tl.load(sums_ptr + (nc * num_splits + split) * 2 + 1, mask=mask, other=0.0)
        if SCALE_OUT:
            one_plus_s = 1.0 + tl.load(scale_ptr + nc, mask=mask, other=0.0).to(tl.float32)
            acc_dweight += tl.sum(one_plus_s * sum_dh_xh, axis=0)
            acc_dbias += tl.sum(one_plus_s * sum_dh, axis=0)
            dscale = gamma[None, :] * sum_dh_xh + beta[None, :] * sum_dh
            tl.store(dscale_ptr + nc, dscale.to(dscale_ptr.dtype.element_ty), mask=mask)
        else:
            acc_dweight += tl.sum(sum_dh_xh, axis=0)
            acc_dbias += tl.sum(sum_dh, axis=0)
        if SHIFT_OUT:
            tl.store(dshift_ptr + nc, sum_dh.to(dshift_ptr.dtype.element_ty), mask=mask)
        if SCALE_IN or SHIFT_IN:
            sum_du_x = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
            sum_du = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
            for split in range(0, num_splits):
                sum_du_x += tl.load(sums_in_ptr + (nc * num_splits + split) * 2, mask=mask, other=0.0)
                sum_du += tl.load(sums_in_ptr + (nc * num_splits + split) * 2 + 1, mask=mask, other=0.0)
            if SCALE_IN:
                tl.store(dscale_ptr + nc, sum_du_x.to(dscale_ptr.dtype.element_ty), mask=mask)
            if SHIFT_IN:
                tl.store(dshift_ptr + nc, sum_du.to(dshift_ptr.dtype.element_ty), mask=mask)
    tl.store(dweight_ptr + offs_c, acc_dweight.to(dweight_ptr.dtype.element_ty), mask=cmask)
    tl.store(dbias_ptr + offs_c, acc_dbias.to(dbias_ptr.dtype.element_ty), mask=cmask)


# --------------------------------------------------------------------------------------------
# Host side: validation, launch configuration, launchers
# --------------------------------------------------------------------------------------------
_INTERPRETED = is_interpreted(_gn_fwd_kernel)


def _check_inputs(x, weight, bias, num_groups, eps, scale, shift, mode, silu, dropout_p=0.0, seed=None,
                  *, reference=False, op="group_norm_silu"):
    """Raise a one-line TypeError/ValueError naming `op` and the first bad argument."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point or (not reference and x.dtype not in _KERNEL_DTYPES):
        allowed = "a floating dtype" if reference else "float32, float16 or bfloat16"
        raise TypeError(f"{op}: x must be {allowed}, got {x.dtype}")
    N, C, H, W = x.shape
    if x.numel() == 0:
        raise ValueError(f"{op}: x must be non-empty, got shape {tuple(x.shape)}")
    if not reference and C * H * W > INT32_MAX:  # (a group's element count is a 32-bit integer too)
        raise ValueError(f"{op}: x has C*H*W = {C * H * W} elements per sample, more than the kernels' 32-bit "
                         f"offsets address (2^31 - 1); use {op}_reference at this size")
    if not reference and N * C > INT32_MAX:  # (scale, shift and the per-(n, c) sums are indexed by n*C + c)
        raise ValueError(f"{op}: x has N*C = {N * C} (sample, channel) pairs, more than the kernels' 32-bit "
                         f"offsets address (2^31 - 1); use {op}_reference at this size")
    if not is_int(num_groups) or num_groups <= 0:
        raise ValueError(f"{op}: num_groups must be a positive int, got {num_groups!r}")
    if C % num_groups != 0:
        raise ValueError(f"{op}: channels C={C} are not divisible by num_groups={num_groups}")
    if not is_real(eps) or not eps > 0:
        raise ValueError(f"{op}: eps must be a positive float, got {eps!r}")
    if mode not in _MODES:
        raise ValueError(f"{op}: mode must be 'pre' or 'post', got {mode!r}")
    if not is_bool(silu):
        raise TypeError(f"{op}: silu must be a bool, got {type(silu).__name__}")
    for name, tensor, shape in (("weight", weight, (C,)), ("bias", bias, (C,)),
                                ("scale", scale, (N, C)), ("shift", shift, (N, C))):
        if tensor is None:
            if name in ("weight", "bias"):
                raise TypeError(f"{op}: {name} is required (a tensor of shape {shape})")
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {shape} for x of shape "
                             f"{tuple(x.shape)}, got {tuple(tensor.shape)}")
        if tensor.device != x.device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but x is on {x.device}")
        if tensor.dtype not in (x.dtype, torch.float32):
            allowed = " or ".join(dict.fromkeys(str(dtype) for dtype in (x.dtype, torch.float32)))
            raise TypeError(f"{op}: mixed dtypes: {name} is {tensor.dtype} but x is "
                            f"{x.dtype} ({name} must be {allowed})")
    if not is_real(dropout_p) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    threshold = _dropout_constants(dropout_p)[0]
    if threshold >= 2 ** 16:
        raise ValueError(f"{op}: dropout_p {dropout_p!r} is within 2^-17 of 1, where the 16-bit keep "
                         f"threshold drops every element")
    if dropout_p > 0 and threshold == 0:
        raise ValueError(f"{op}: dropout_p {dropout_p!r} is below 2^-17, where the 16-bit keep "
                         f"threshold keeps every element (use 0 for no dropout)")
    if dropout_p > 0:
        if seed is None:
            raise TypeError(f"{op}: dropout needs a seed (an int64 tensor of one element)")
        if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
            what = f"{seed.dtype} tensor of {seed.numel()} elements" if isinstance(seed, torch.Tensor) \
                else type(seed).__name__
            raise TypeError(f"{op}: seed must be an int64 tensor of one element, got {what}")
        if not reference and seed.device != x.device:
            raise ValueError(f"{op}: seed is on {seed.device} but x is on {x.device}")


def _check_backward_inputs(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, eps, mode, silu,
                           dropout_p=0.0, seed=None):
    """_check_inputs, then dy like x, and mean, rstd as the forward saves them: fp32 (N, num_groups) on x's device
    (the backward op is public: torch.ops.dream_kernels.group_norm_silu_bwd)."""
    op = "group_norm_silu backward"
    _check_inputs(x, weight, bias, num_groups, eps, scale, shift, mode, silu, dropout_p, seed)
    if not isinstance(dy, torch.Tensor) or dy.shape != x.shape or dy.device != x.device:
        got = f"{tuple(dy.shape)} on {dy.device}" if isinstance(dy, torch.Tensor) else type(dy).__name__
        raise ValueError(f"{op}: dy has shape {got}, expected {tuple(x.shape)} on {x.device}")
    stats_shape = (x.shape[0], num_groups)
    for name, stat in (("mean", mean), ("rstd", rstd)):
        if (not isinstance(stat, torch.Tensor) or tuple(stat.shape) != stats_shape or stat.dtype != torch.float32
                or stat.device != x.device):
            got = f"{stat.dtype} {tuple(stat.shape)} on {stat.device}" if isinstance(stat, torch.Tensor) \
                else type(stat).__name__
            raise ValueError(f"{op}: {name} must be the forward's float32 tensor of shape {stats_shape} on "
                             f"{x.device}, got {got}")


def _dropout_constants(dropout_p):
    """(t, scale): keep = half >= t for 16-bit random halves keeps with probability
    P_keep = 1 - t/2^16 (t = round(dropout_p * 2^16): within 2^-17 of 1 - dropout_p), and
    scale = 1/P_keep; scale is inf when t = 2^16 (dropout_p within 2^-17 of 1, refused by
    _check_inputs)."""
    threshold = round(dropout_p * 2.0 ** 16)
    return threshold, 2.0 ** 16 / (2.0 ** 16 - threshold) if threshold < 2 ** 16 else math.inf


def _dropout_axis(dropout_p, memory_format):
    """The axis of the dropout mask's octets for x in memory_format (None without dropout)."""
    if dropout_p == 0:
        return None
    return "channels" if memory_format == torch.channels_last else "positions"


def _kernel_dropout_args(dropout_p):
    """(t*2^16, scale): the threshold in the form _dropout_keep compares against 32-bit words."""
    threshold, scale = _dropout_constants(dropout_p)
    return threshold << 16, scale


_LOW32 = 0xFFFFFFFF


def _mul_hi_lo(a, b):
    """(high, low) 32-bit words of a*b for an int64 tensor a < 2^32 and an int b < 2^32, exactly in
    int64: with a*b = high_part*2^16 + low_part, both parts < 2^48."""
    high_part, low_part = a * (b >> 16), a * (b & 0xFFFF)
    return (high_part + (low_part >> 16)) >> 16, (((high_part & 0xFFFF) << 16) + low_part) & _LOW32


def _philox4x32_10(seed, counters):
    """Philox4x32-10 as tl.randint4x computes it, in torch int64 arithmetic: key (seed_lo, seed_hi),
    counter (counter_lo, counter_hi, 0, 0) for non-negative int64 counters; returns the four 32-bit
    words (as int64 tensors shaped like counters)."""
    c0, c1 = counters & _LOW32, counters >> 32
    c2 = c3 = torch.zeros_like(c0)
    k0, k1 = seed & _LOW32, (seed >> 32) & _LOW32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(c2, 0xCD9E8D57)
        hi_a, lo_a = _mul_hi_lo(c0, 0xD2511F53)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & _LOW32, (k1 + 0xBB67AE85) & _LOW32
    return c0, c1, c2, c3


def dropout_keep_mask(seed, shape, dropout_p, channels_last=False):
    """The kernels' dropout mask for an (N, C, H, W) tensor, NCHW or channels_last (as
    kernels.layout.memory_format_of tells), as a bool tensor on the seed's device (CPU for an int
    seed), computed independently of Triton: Philox4x32-10(seed) at counter (n*C + c)*ceil(HW/8) + p//8,
    16-bit half p % 8 of its four words (low half first); channels_last: counter
    (n*HW + p)*ceil(C/8) + c//8, half c % 8 (see the module docstring)."""
    N, C, H, W = shape
    HW = H * W
    rows, length = (N * HW, C) if channels_last else (N * C, HW)  # octets run along `length`
    octets = -(-length // 8)
    device = seed.device if isinstance(seed, torch.Tensor) else torch.device("cpu")
    seed = int(seed.item()) if isinstance(seed, torch.Tensor) else int(seed)
    counters = (torch.arange(rows, dtype=torch.int64, device=device)[:, None] * octets
                + torch.arange(octets, dtype=torch.int64, device=device)[None, :])
    words = torch.stack(_philox4x32_10(seed, counters), dim=-1)  # (rows, octets, 4)
    halves = torch.stack([words & 0xFFFF, words >> 16], dim=-1).reshape(rows, octets * 8)[:, :length]
    threshold, _ = _dropout_constants(dropout_p)
    keep = halves >= threshold
    if channels_last:
        return keep.reshape(N, H, W, C).permute(0, 3, 1, 2)
    return keep.reshape(N, C, H, W)


def dropout_scale(dropout_p):
    """The factor 1/P_keep the kernels give the kept elements: P_keep = 1 - round(dropout_p*2^16)/2^16,
    within 2^-17 of 1 - dropout_p (1 without dropout)."""
    return _dropout_constants(dropout_p)[1]


def new_dropout_seed(device):
    """A fresh seed for the kernels' dropout, drawn on the device from torch's default generator
    (reproducible under torch.manual_seed, safe in CUDA graphs and torch.compile)."""
    return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=device)


def _flat_strides(t):
    """(stride_n, stride_c, stride_p) with p = h*W + w, or None when t is neither
    NCHW-contiguous nor channels_last (then it is copied into one of those)."""
    if not (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
        return None
    _, _, H, W = t.shape
    stride_n, stride_c, stride_h, stride_w = t.stride()
    if W == 1:
        stride_p = stride_h
    elif H == 1 or stride_h == W * stride_w:
        stride_p = stride_w
    else:
        return None
    return stride_n, stride_c, stride_p


def _dense(t, memory_format):
    strides = _flat_strides(t)
    if strides is None:
        t = t.contiguous(memory_format=memory_format)
        strides = _flat_strides(t)
    return t, strides


def _new_buffer(shape, dtype, device):
    if _POISON_NEW_BUFFERS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _new_buffer_like(t, memory_format):
    if _POISON_NEW_BUFFERS:
        return torch.full_like(t, float("nan"), memory_format=memory_format)
    return torch.empty_like(t, memory_format=memory_format)


def _check_device(x, op="group_norm_silu"):
    check_interpreter_device(x, _INTERPRETED, op, f"{op}_reference")


class _LaunchConfig(NamedTuple):
    block_c: int
    block_hw: int
    num_splits: int
    hw_per_split: int
    num_warps: int
    groups: int = 1     # adjacent groups per program (channels_last: block_c = groups * Cg)
    programs: int = 0   # cap on the main kernel's programs (each loops over blocks); 0: one per block
    octets: int = 0     # dropout mask octets: 0 no dropout, else _dropout_keep's OCTETS
    resident: bool = False  # one tile holds each block (no split): read once, kept in registers


def _launch_config(N, C, HW, num_groups, stride_c, device, backward, dropout=None, override=None):
    """Tile shape, split and warps by heuristic, or as `override` gives them (a tuned pick, see
    launch_candidates; keys block_c, block_hw, num_warps, groups, programs_per_sm; without it the test
    hook _LAUNCH_OVERRIDE).

    GPU: a tile holds 2048 elements forward and 1024 backward (which keeps about twice as many
    values live), 8 per thread (ptxas for sm_90: ~50-120 registers, no spills, so two or more
    programs fit per SM). The tile runs along the contiguous axis first: positions for NCHW,
    the group's channels for channels_last. Each (sample, group) is one program unless there
    are fewer than two groups per SM; then its positions are split so that the grid has about
    four programs per SM. The interpreter gets 4096-element tiles and no split: it costs
    ~10-30 ms per program and per loop step, whatever the tile size.
    A tile that holds the program's whole block (no split) runs the resident path (`resident`; where
    the block fits the tile budget, i.e. at small sites, or with a tuned whole-block tile).
    dropout: None, or the axis of the mask's octets, "positions" (NCHW) or "channels" (channels_last).
    Octets of positions need tiles spanning at least 8 positions; octets of channels are drawn a
    whole octet at a time when every tile starts on a multiple of 8 channels, else element by element.

    channels_last with few channels per group (GroupNorm(32) over 128 channels: 4 channels, 8 bytes
    in bf16) would give each tile row a sliver of a 32-byte memory sector, the rest of which belongs
    to the neighbouring groups' programs. So there one program takes `groups` adjacent groups (Cg a
    power of two) and its tile rows span groups*Cg >= _CONTIGUOUS_CHANNELS contiguous channels, as
    long as the grid keeps at least two programs per SM without splitting positions.
    """
    Cg = C // num_groups
    on_gpu = not _INTERPRETED  # compiled kernels only ever launch on the GPU (see _check_device)
    tile = (1024 if backward else 2048) if on_gpu else 4096
    min_hw = 8 if dropout == "positions" else 1
    if override is None:
        override = _LAUNCH_OVERRIDE or {}
    channels_last = stride_c == 1 and C > 1
    groups = 1
    if channels_last and Cg & (Cg - 1) == 0:
        groups = math.gcd(num_groups, max(1, _CONTIGUOUS_CHANNELS // Cg))  # both powers of two
        while on_gpu and groups > 1 and N * num_groups // groups < 2 * _sm_count(device):
            groups //= 2
    groups = override.get("groups", groups)
    channels_per_program = groups * Cg
    if channels_last and channels_per_program > 1:  # the program's channels are contiguous
        block_c = channels_per_program if groups > 1 else min(next_power_of_2(Cg), tile // min_hw)
        block_hw = max(min_hw, min(next_power_of_2(HW), max(1, tile // block_c)))
    else:
        block_hw = max(min_hw, min(next_power_of_2(HW), tile))
        block_c = min(next_power_of_2(Cg), max(1, tile // block_hw))
    num_splits = 1
    if on_gpu and groups == 1:
        programs = N * num_groups
        sms = _sm_count(device)
        if programs < 2 * sms:
            num_splits = min(cdiv(4 * sms, programs), cdiv(HW, block_hw))
    block_c = override.get("block_c", block_c)
    block_hw = override.get("block_hw", block_hw)
    if block_hw < min_hw:
        raise ValueError(f"group_norm_silu: with dropout a tile spans at least {min_hw} positions, "
                         f"got block_hw={block_hw}")
    split = override.get("split", 1)
    if groups > 1 and (not channels_last or num_groups % groups or Cg & (Cg - 1)
                       or block_c != channels_per_program or split != 1):
        raise ValueError(f"group_norm_silu: {groups} groups per program need channels_last, a power-of-two "
                         f"number of channels per group, num_groups divisible by it, block_c = "
                         f"{channels_per_program} and no split; got C={C}, num_groups={num_groups}, "
                         f"block_c={block_c}, split={split}")
    num_splits = override.get("split", num_splits)
    hw_per_split = cdiv(cdiv(HW, num_splits), block_hw) * block_hw
    num_splits = cdiv(HW, hw_per_split)  # no empty splits
    octets = 0
    if dropout == "positions":
        octets = 1
    elif dropout == "channels":  # tiles start at c_first + c0: multiples of 8 when both steps are
        octets = 2 if channels_per_program % 8 == 0 and block_c % 8 == 0 else 3
    # backward regenerating the mask element by element in both of its passes: 4 elements a thread
    per_thread = 4 if octets == 3 and backward else 8
    num_warps = override.get("num_warps", min(8, max(1, block_c * block_hw // (32 * per_thread))))
    # a capped grid (programs loop over blocks) only where each group is one program's (no split)
    cap = override.get("programs", 0) or override.get("programs_per_sm", 0) * (_sm_count(device) if on_gpu else 1)
    if cap and num_splits != 1:
        raise ValueError(f"group_norm_silu: a capped grid ({cap} programs) needs whole groups per program, "
                         f"got {num_splits} splits")
    resident = _RESIDENT_TILES and num_splits == 1 and block_c >= channels_per_program and block_hw >= HW
    return _LaunchConfig(block_c, block_hw, num_splits, hw_per_split, num_warps, groups, cap, octets, resident)


def _config_of(cfg: _LaunchConfig, device) -> dict:
    """A launch configuration as a tunable pick (the keys launch_candidates gives)."""
    sms = _sm_count(device) if not _INTERPRETED else 1
    return {"block_c": cfg.block_c, "block_hw": cfg.block_hw, "num_warps": cfg.num_warps, "groups": cfg.groups,
            "programs_per_sm": cfg.programs // sms if cfg.programs else 0}


def launch_candidates(channels_per_group, num_groups, hw, contiguous_channels, heuristic: dict, grid="quick",
                      min_hw=1, backward=False) -> list:
    """Launch configurations to try beside `heuristic` (bench/tune_kernels.py, autotuning): tiles of
    several sizes and warp counts, laid out as _launch_config lays them (min_hw: the fewest positions a
    tile may span, 8 with dropout in NCHW); in channels_last with a power-of-two number of channels per
    group, also several groups per program (one tile row spanning them all); and grids capped at 1, 2 or 4
    programs per SM (programs loop over blocks: fewer groups in flight between the two passes over each,
    so that the second finds them in L2), with the heuristic's tiles and with the largest 8-warp tiles;
    and whole blocks in one tile (the resident path: each element read once) at 4 to 32 elements a thread
    forward, 4 to 16 backward (backward keeps both x and dy in registers).
    grid: "quick" (one to two dozen), "full" (about a hundred) or "minimal" (two, for the interpreter: a small
    tile that loops with tails, and a capped grid). Dicts with keys block_c, block_hw, num_warps, groups,
    programs_per_sm; the heuristic first."""
    if grid not in ("quick", "full", "minimal"):
        raise ValueError(f"launch_candidates: grid must be quick, full or minimal, got {grid!r}")
    tiles = {"quick": (1024, 2048, 4096), "full": (512, 1024, 2048, 4096, 8192), "minimal": (64,)}[grid]
    warps = (2, 4, 8, 16) if grid == "full" else (4, 8)
    groupings = [1]
    if contiguous_channels and channels_per_group & (channels_per_group - 1) == 0:
        groupings += [g for g in (2, 4, 8) if num_groups % g == 0 and g * channels_per_group <= 128]
        if grid != "full":
            groupings = sorted({1, heuristic["groups"]})
    cg, p = next_power_of_2(channels_per_group), next_power_of_2(hw)
    configs = []
    for tile, num_warps, groups in itertools.product(tiles, warps, groupings):
        if groups > 1:
            block_c = groups * channels_per_group
            block_hw = max(min_hw, min(p, max(1, tile // block_c)))
        elif contiguous_channels:
            block_c = min(cg, tile)
            block_hw = min(p, max(1, tile // block_c))
        else:
            block_hw = min(p, tile)
            block_c = min(cg, max(1, tile // block_hw))
        if block_hw >= min_hw:
            configs.append({"block_c": block_c, "block_hw": block_hw, "num_warps": num_warps, "groups": groups,
                            "programs_per_sm": 0})
    largest = max((c["block_c"] * c["block_hw"] for c in configs), default=0)
    widest = [c for c in configs if c["num_warps"] == 8 and c["block_c"] * c["block_hw"] == largest]
    capped = [{**c, "programs_per_sm": cap} for c in [heuristic] + widest for cap in (1, 2, 4)]
    whole = []
    for groups, num_warps in itertools.product(groupings, warps + ((16,) if grid == "quick" else ())):
        block_c = groups * channels_per_group if groups > 1 else cg
        block_hw = max(min_hw, p)
        if 4 <= block_c * block_hw // (32 * num_warps) <= (16 if backward else 32):
            whole.append({"block_c": block_c, "block_hw": block_hw, "num_warps": num_warps, "groups": groups,
                          "programs_per_sm": 0})
    if grid == "minimal":
        configs, capped, whole = [c for c in configs if c != heuristic][:1], capped[:1], []
    unique = []
    for config in [heuristic] + configs + capped + whole:  # tiles larger than the group collapse to one config
        if config not in unique:
            unique.append(config)
    return unique


def _in_out_flags(scale, shift, mode):
    pre = mode == "pre"
    return dict(SCALE_IN=pre and scale is not None, SHIFT_IN=pre and shift is not None,
                SCALE_OUT=not pre and scale is not None, SHIFT_OUT=not pre and shift is not None)


def _tuned_override(direction, x, num_groups, scale, shift, mode, silu, dropout_p, run):
    """The autotuned launch configuration of this problem (kernels.autotune; None: autotuning is off,
    or it is a graph capture with no earlier pick, and the heuristic runs). run(config) launches with it."""
    if not autotune.autotune_enabled():
        return None
    N, C, H, W = x.shape
    G, HW = num_groups, H * W
    memory_format = memory_format_of(x)
    channels_last = memory_format == torch.channels_last and C > 1
    dropout = _dropout_axis(dropout_p, memory_format)

    def candidates():
        stride_c = _dense(x, memory_format)[1][1]  # as the launch sees it
        heuristic = _config_of(_launch_config(N, C, HW, G, stride_c, x.device, direction == "bwd", dropout,
                                              override={}), x.device)
        return heuristic, launch_candidates(C // G, G, HW, stride_c == 1 and C // G > 1, heuristic,
                                            grid=autotune.candidate_grid(_INTERPRETED),
                                            min_hw=8 if dropout == "positions" else 1, backward=direction == "bwd")

    key = (N, C, H, W, G, str(x.dtype).removeprefix("torch."), "cl" if channels_last else "nchw", mode,
           "scale" if scale is not None else "-", "shift" if shift is not None else "-", "silu" if silu else "id",
           dropout or "-")
    return autotune.choose(f"group_norm_silu_{direction}", key, x.device, candidates, run, interpreted=_INTERPRETED)


@on_tensor_device
def _forward(x, weight, bias, scale, shift, num_groups, eps, mode, silu, dropout_p=0.0, seed=None, override=None,
             checked=False):
    """Launch the forward kernels; returns (y, mean, rstd). override: a launch configuration
    (launch_candidates' keys) instead of the heuristic's or the autotuned one. checked: the arguments were
    validated already (the public wrapper's direct call)."""
    if not checked:
        _check_inputs(x, weight, bias, num_groups, eps, scale, shift, mode, silu, dropout_p, seed)
    _check_device(x)
    if override is None:
        override = _tuned_override("fwd", x, num_groups, scale, shift, mode, silu, dropout_p, lambda config: _forward(
            x, weight, bias, scale, shift, num_groups, eps, mode, silu, dropout_p, seed, override=config))
    N, C, H, W = x.shape
    HW = H * W
    G = num_groups
    memory_format = memory_format_of(x)
    x, (sxn, sxc, sxp) = _dense(x, memory_format)
    y = _new_buffer_like(x, memory_format)
    syn, syc, syp = _flat_strides(y)
    weight, bias = weight.contiguous(), bias.contiguous()
    scale = scale.contiguous() if scale is not None else None
    shift = shift.contiguous() if shift is not None else None
    mean = _new_buffer((N, G), torch.float32, x.device)
    rstd = _new_buffer((N, G), torch.float32, x.device)
    cfg = _launch_config(N, C, HW, G, sxc, x.device, backward=False, dropout=_dropout_axis(dropout_p, memory_format),
                         override=override)
    dropout = dropout_p > 0
    flags = _in_out_flags(scale, shift, mode)
    drop_threshold, drop_scale = _kernel_dropout_args(dropout_p)
    # an absent scale/shift is never read (its constexpr flag is off): pass x as a placeholder
    scale_arg = scale if scale is not None else x
    shift_arg = shift if shift is not None else x
    fused = cfg.num_splits == 1
    moments = mean
    if not fused:
        moments = _new_buffer((N * G, cfg.num_splits, 3), torch.float32, x.device)
        autotune.launch(_gn_fwd_moments_kernel, (N * G, cfg.num_splits))(
            x, weight, bias, scale_arg, shift_arg, moments,
            C, HW, G, C // G, cfg.hw_per_split, cfg.num_splits,
            sxn, sxc, sxp,
            SCALE_IN=flags["SCALE_IN"], SHIFT_IN=flags["SHIFT_IN"],
            BLOCK_C=cfg.block_c, BLOCK_HW=cfg.block_hw, num_warps=cfg.num_warps)
    num_blocks = N * G // cfg.groups
    autotune.launch(_gn_fwd_kernel, (min(num_blocks, cfg.programs or num_blocks), cfg.num_splits))(
        x, y, weight, bias, scale_arg, shift_arg, mean, rstd, moments, seed if dropout else mean,
        C, HW, G, C // G, cfg.hw_per_split, cfg.num_splits, num_blocks, float(eps), drop_threshold, drop_scale,
        sxn, sxc, sxp, syn, syc, syp,
        **flags, SILU=silu, DROPOUT=cfg.octets, FUSED_STATS=fused,
        SPLITS_P2=next_power_of_2(cfg.num_splits), GROUPS=cfg.groups,
        BLOCK_C=cfg.block_c, BLOCK_HW=cfg.block_hw, RESIDENT=cfg.resident, num_warps=cfg.num_warps)
    return y, mean, rstd


@on_tensor_device
def _backward(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, eps, mode, silu,
              dropout_p=0.0, seed=None, override=None, checked=False):
    """Launch the backward kernels; returns (dx, dweight, dbias, dscale, dshift), with empty
    tensors for dscale/dshift where scale/shift are None. override, checked: as for _forward."""
    if not checked:
        _check_backward_inputs(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, eps, mode, silu, dropout_p,
                               seed)
    _check_device(x)
    if override is None:
        override = _tuned_override("bwd", x, num_groups, scale, shift, mode, silu, dropout_p, lambda config: _backward(
            dy, x, weight, bias, scale, shift, mean, rstd, num_groups, eps, mode, silu, dropout_p, seed,
            override=config))
    N, C, H, W = x.shape
    HW = H * W
    G = num_groups
    memory_format = memory_format_of(x)
    x, (sxn, sxc, sxp) = _dense(x, memory_format)
    dy, (sdyn, sdyc, sdyp) = _dense(dy, memory_format)
    mean, rstd = mean.contiguous(), rstd.contiguous()  # indexed as n*G + g
    dx = _new_buffer_like(x, memory_format)
    sdxn, sdxc, sdxp = _flat_strides(dx)
    weight_c, bias_c = weight.contiguous(), bias.contiguous()
    scale_c = scale.contiguous() if scale is not None else None
    shift_c = shift.contiguous() if shift is not None else None
    cfg = _launch_config(N, C, HW, G, sxc, x.device, backward=True, dropout=_dropout_axis(dropout_p, memory_format),
                         override=override)
    dropout = dropout_p > 0
    flags = _in_out_flags(scale, shift, mode)
    drop_threshold, drop_scale = _kernel_dropout_args(dropout_p)
    seed_arg = seed if dropout else mean
    scale_arg = scale_c if scale_c is not None else x
    shift_arg = shift_c if shift_c is not None else x
    fused = cfg.num_splits == 1
    # sums[n, c, split] = (A, B); sums_in[n, c, split] = (sum du*x, sum du)
    sums = _new_buffer((N, C, cfg.num_splits, 2), torch.float32, x.device)
    need_in = flags["SCALE_IN"] or flags["SHIFT_IN"]
    sums_in = _new_buffer((N, C, cfg.num_splits, 2), torch.float32, x.device) if need_in else sums
    common = dict(SCALE_IN=flags["SCALE_IN"], SHIFT_IN=flags["SHIFT_IN"],
                  SCALE_OUT=flags["SCALE_OUT"], SHIFT_OUT=flags["SHIFT_OUT"], SILU=silu, DROPOUT=cfg.octets,
                  BLOCK_C=cfg.block_c, BLOCK_HW=cfg.block_hw, num_warps=cfg.num_warps)
    if not fused:
        autotune.launch(_gn_bwd_sums_kernel, (N * G, cfg.num_splits))(
            x, dy, weight_c, bias_c, scale_arg, shift_arg, mean, rstd, sums, seed_arg,
            C, HW, G, C // G, cfg.hw_per_split, cfg.num_splits, drop_threshold, drop_scale,
            sxn, sxc, sxp, sdyn, sdyc, sdyp, **common)
    num_blocks = N * G // cfg.groups
    autotune.launch(_gn_bwd_kernel, (min(num_blocks, cfg.programs or num_blocks), cfg.num_splits))(
        x, dy, dx, weight_c, bias_c, scale_arg, shift_arg, mean, rstd, sums, sums_in, seed_arg,
        C, HW, G, C // G, cfg.hw_per_split, cfg.num_splits, num_blocks, 1.0 / ((C // G) * HW), drop_threshold,
        drop_scale,
        sxn, sxc, sxp, sdyn, sdyc, sdyp, sdxn, sdxc, sdxp,
        FUSED_SUMS=fused, SPLITS_P2=next_power_of_2(cfg.num_splits), GROUPS=cfg.groups,
        RESIDENT=cfg.resident, **common)

    dweight = _new_buffer((C,), weight.dtype, x.device)
    dbias = _new_buffer((C,), bias.dtype, x.device)
    dscale = _new_buffer((N, C), scale.dtype, x.device) if scale is not None else x.new_empty(0)
    dshift = _new_buffer((N, C), shift.dtype, x.device) if shift is not None else x.new_empty(0)
    on_gpu = not _INTERPRETED
    param_override = _LAUNCH_OVERRIDE or {}
    block_c = param_override.get("param_block_c", min(next_power_of_2(C), 64 if on_gpu else 1024))
    block_n = param_override.get("param_block_n", min(next_power_of_2(N), 32 if on_gpu else 64))
    autotune.launch(_gn_param_grads_kernel, (cdiv(C, block_c),))(
        sums, sums_in, weight_c, bias_c, scale_arg,
        dweight, dbias, dscale if scale is not None else dweight, dshift if shift is not None else dweight,
        N, C, cfg.num_splits,
        SCALE_IN=flags["SCALE_IN"], SHIFT_IN=flags["SHIFT_IN"],
        SCALE_OUT=flags["SCALE_OUT"], SHIFT_OUT=flags["SHIFT_OUT"],
        BLOCK_N=block_n, BLOCK_C=block_c, num_warps=4)
    return dx, dweight, dbias, dscale, dshift


# --------------------------------------------------------------------------------------------
# torch.library custom ops and autograd
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("dream_kernels::group_norm_silu_fwd", mutates_args=())
def _group_norm_silu_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                         num_groups: int, eps: float, mode: str, silu: bool,
                         dropout_p: float = 0.0, seed: Optional[torch.Tensor] = None
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd); mean and rstd are fp32 of shape (N, num_groups)."""
    return _forward(x, weight, bias, scale, shift, num_groups, eps, mode, silu, dropout_p, seed)


@_group_norm_silu_fwd.register_fake
def _group_norm_silu_fwd_fake(x, weight, bias, scale, shift, num_groups, eps, mode, silu, dropout_p=0.0,
                              seed=None):
    _check_inputs(x, weight, bias, num_groups, eps, scale, shift, mode, silu, dropout_p, seed)
    stats_shape = (x.shape[0], num_groups)
    return (torch.empty_like(x, memory_format=memory_format_of(x)),
            x.new_empty(stats_shape, dtype=torch.float32),
            x.new_empty(stats_shape, dtype=torch.float32))


@torch.library.custom_op("dream_kernels::group_norm_silu_bwd", mutates_args=())
def _group_norm_silu_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                         mean: torch.Tensor, rstd: torch.Tensor,
                         num_groups: int, eps: float, mode: str, silu: bool,
                         dropout_p: float = 0.0, seed: Optional[torch.Tensor] = None
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias, dscale, dshift); dscale/dshift are empty when scale/shift are None."""
    return _backward(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, eps, mode, silu,
                     dropout_p, seed)


@_group_norm_silu_bwd.register_fake
def _group_norm_silu_bwd_fake(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, eps, mode, silu,
                              dropout_p=0.0, seed=None):
    _check_backward_inputs(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, eps, mode, silu, dropout_p, seed)
    return (torch.empty_like(x, memory_format=memory_format_of(x)),
            torch.empty_like(weight), torch.empty_like(bias),
            scale.new_empty(scale.shape) if scale is not None else x.new_empty(0),  # contiguous, as _backward
            shift.new_empty(shift.shape) if shift is not None else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, num_groups, eps, mode, silu, dropout_p, seed = inputs
    _, mean, rstd = output
    # the dropout mask is not saved: backward regenerates it from the (one-element) seed
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd, seed)
    ctx.hyper = (num_groups, eps, mode, silu, dropout_p)
    ctx.mark_non_differentiable(mean, rstd)


def _autograd_backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, scale, shift, mean, rstd, seed = ctx.saved_tensors
    dx, dweight, dbias, dscale, dshift = group_norm_silu_bwd_call(
        dy, x, weight, bias, scale, shift, mean, rstd, *ctx.hyper, seed)
    return (dx, dweight, dbias,
            dscale if scale is not None else None,
            dshift if shift is not None else None,
            None, None, None, None, None, None)


_group_norm_silu_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)
# the ops as the wrappers call them: straight to _forward / _backward in plain eager mode (kernels.dispatch),
# without checking again what the wrapper checked (backward: what the checked forward saved, and autograd's dy)
group_norm_silu_fwd_call = OpCall("dream_kernels::group_norm_silu_fwd", functools.partial(_forward, checked=True),
                                  _setup_context, _autograd_backward)
group_norm_silu_bwd_call = OpCall("dream_kernels::group_norm_silu_bwd", functools.partial(_backward, checked=True))


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def _seed_or_new(x, dropout_p, seed):
    """seed, or with dropout and no seed given, a new one drawn from torch's generator (new_dropout_seed)."""
    if seed is None and is_real(dropout_p) and dropout_p > 0 and isinstance(x, torch.Tensor):
        return new_dropout_seed(x.device)
    return seed


def group_norm_silu(x, weight, bias, num_groups, eps=1e-5, scale=None, shift=None, mode="pre", silu=True,
                    dropout_p=0.0, seed=None):
    """Fused act(GroupNorm with per-(n, c) scale/shift), then dropout, with Triton kernels (see
    the module docstring).

    x: (N, C, H, W) fp32/fp16/bf16, NCHW-contiguous or channels_last (others are copied);
    weight, bias: (C,); scale, shift: (N, C) or None; each in x's dtype or fp32, on x's device.
    mode "pre": y = act(gamma*GN(x*(1+s)+t) + beta); "post": y = act((gamma*GN(x)+beta)*(1+s)+t);
    act = SiLU when silu else identity. dropout_p > 0: y = y*keep*dropout_scale(dropout_p) with the mask a
    function of seed (an int64 tensor of one element on x's device; None draws one with
    new_dropout_seed) regenerated in backward; it is dropout_keep_mask(seed, x.shape, dropout_p,
    channels_last), channels_last when kernels.layout.memory_format_of(x) is torch.channels_last.
    Returns y in x's dtype and memory format.
    CPU tensors run only through the Triton interpreter (TRITON_INTERPRET=1 at import).
    """
    seed = _seed_or_new(x, dropout_p, seed)
    _check_inputs(x, weight, bias, num_groups, eps, scale, shift, mode, silu, dropout_p, seed)
    reject_function_transforms("group_norm_silu", "group_norm_silu_reference", x, weight, bias, scale, shift)
    y, _, _ = group_norm_silu_fwd_call(
        x, weight, bias, scale, shift, int(num_groups), float(eps), mode, bool(silu), float(dropout_p),
        seed if dropout_p > 0 else None)
    return y


def group_norm_silu_reference(x, weight, bias, num_groups, eps=1e-5, scale=None, shift=None,
                              mode="pre", silu=True, dropout_p=0.0, seed=None):
    """Eager PyTorch version of group_norm_silu, in x's dtype (any floating dtype, float64 too);
    weight, bias, scale, shift are cast to x's dtype. With dropout_p > 0 it applies the kernels'
    own mask, dropout_keep_mask for x's memory format, so it matches group_norm_silu exactly."""
    _check_inputs(x, weight, bias, num_groups, eps, scale, shift, mode, silu, dropout_p, seed, reference=True)

    def per_channel(v):
        return v.to(x.dtype)[:, :, None, None]

    weight, bias = weight.to(x.dtype), bias.to(x.dtype)
    if mode == "pre":
        u = x
        if scale is not None:
            u = u * (1 + per_channel(scale))
        if shift is not None:
            u = u + per_channel(shift)
        h = F.group_norm(u, num_groups, weight, bias, eps)
    else:
        h = F.group_norm(x, num_groups, weight, bias, eps)
        if scale is not None:
            h = h * (1 + per_channel(scale))
        if shift is not None:
            h = h + per_channel(shift)
    y = F.silu(h) if silu else h
    if dropout_p > 0:
        keep = dropout_keep_mask(seed, x.shape, dropout_p, memory_format_of(x) == torch.channels_last)
        y = y * (keep.to(x.device, x.dtype) * dropout_scale(dropout_p))
    return y


# The Python implementation behind each custom op (what a launch of the op runs), for tools
# that replay recorded op calls without the dispatcher (bench/compile_report.py).
OP_IMPLEMENTATIONS = {
    "dream_kernels::group_norm_silu_fwd": _forward,
    "dream_kernels::group_norm_silu_bwd": _backward,
}
