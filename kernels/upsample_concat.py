"""A UNet decoder's skip, upsampled 2× bilinearly and concatenated behind its activation, in one pass.

    out = cat([h + h_bias, up(skip)], dim=1)
    up = interpolate(skip, size=(2H, 2W), mode="bilinear", align_corners=False)

h is (N, Ch, 2H, 2W), skip is (N, Cs, H, W). At an exact 2× ratio with align_corners=False, output row
2i+a (a ∈ {0, 1}) reads source row i with weight 3/4 and its neighbour i' = clamp(i - 1 + 2a, 0, H-1)
with weight 1/4, and likewise for columns:

    up[2i+a, 2j+b] = 3/4·(3/4·s[i, j] + 1/4·s[i, j']) + 1/4·(3/4·s[i', j] + 1/4·s[i', j'])

(the clamp at the borders is PyTorch's source index clamped to [0, H-1]: up[0, 0] = s[0, 0]).
The values are computed in fp32 and rounded once to h's dtype.

Backward, gathered per source element (no atomics, deterministic): source row i is read by output
rows 2i-1, 2i, 2i+1, 2i+2 with weights 1/4, 3/4, 3/4, 1/4, where rows clamped into [0, 2H-1] add
up (row 0 gives s[0] its weight 3/4 + 1/4), likewise for columns, so with g = dout[:, Ch:]

    ds[i, j] = Σ_r Σ_c w_r·w_c·g[r, c],  r ∈ clamp({2i-1, 2i, 2i+1, 2i+2}), c ∈ clamp({2j-1, ..., 2j+2})

and dh = dout[:, :Ch] (a view, as torch.cat's backward gives), dh_bias = Σ_{n,y,x} dout[:, :Ch] (torch.sum in fp32).

h_bias (optional, (Ch,)) is the bias of the convolution that made h (the decoder's transposed convolution),
run without it: PyTorch would add it in a pass of its own over h.

Eager PyTorch (the reference, `upsample2x_concat_reference`) makes five passes at half precision under
autocast (six with h's bias): skip to fp32, the resize, the result back to h's dtype, and the
concatenation reading both parts; its backward resizes with atomic adds into a zeroed fp32 buffer. This
op reads skip and h once and writes out once; its backward reads dout's skip part once and writes ds once
(and sums dout's h part for h_bias's gradient, as eager does).

Layouts: h and skip NCHW-contiguous or channels_last, any strides (handled through strides); out has
h's memory format and dtype, ds skip's. Dtypes fp32, fp16, bf16 (h and skip may differ).
"""
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import autotune
from kernels.device import check_interpreter_device, is_interpreted, on_tensor_device, reject_function_transforms
from kernels.dispatch import OpCall
from kernels.layout import INT32_MAX, cdiv, memory_format_of, next_power_of_2, span

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _upsample2x_concat_kernel(
    h_ptr, skip_ptr, h_bias_ptr, out_ptr,
    H, W, CH, CS,                       # skip rows and columns; h's and skip's channels
    h_sn, h_sc, h_sh, h_sw,
    s_sn, s_sc, s_sh, s_sw,
    o_sn, o_sc, o_sh, o_sw,
    H_CHANNEL_BLOCKS,                   # programs along axis 2 below this copy h; the rest upsample skip
    HAS_BIAS: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program: output row y of sample n, BLOCK_X columns × BLOCK_C channels of either part."""
    row = tl.program_id(0)                       # n·2H + y
    n = (row // (2 * H)).to(tl.int64)
    y = row % (2 * H)
    x = tl.program_id(1) * BLOCK_X + tl.arange(0, BLOCK_X)
    x_in = x < 2 * W
    channel_block = tl.program_id(2)
    if channel_block < H_CHANNEL_BLOCKS:
        c = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = x_in[:, None] & (c < CH)[None, :]
        value = tl.load(h_ptr + n * h_sn + y * h_sh + x[:, None] * h_sw + c[None, :] * h_sc, mask=mask).to(tl.float32)
        if HAS_BIAS:
            value += tl.load(h_bias_ptr + c, mask=c < CH).to(tl.float32)[None, :]
        out_c = c
    else:
        c = (channel_block - H_CHANNEL_BLOCKS) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = x_in[:, None] & (c < CS)[None, :]
        i = y // 2                                           # source row, and its neighbour i2
        i2 = tl.minimum(tl.maximum(i - 1 + 2 * (y % 2), 0), H - 1)
        j = x // 2                                           # source columns, and their neighbours j2
        j2 = tl.minimum(tl.maximum(j - 1 + 2 * (x % 2), 0), W - 1)
        base = skip_ptr + n * s_sn + c[None, :] * s_sc
        col = j[:, None] * s_sw
        col2 = j2[:, None] * s_sw
        s00 = tl.load(base + i * s_sh + col, mask=mask).to(tl.float32)
        s01 = tl.load(base + i * s_sh + col2, mask=mask).to(tl.float32)
        s10 = tl.load(base + i2 * s_sh + col, mask=mask).to(tl.float32)
        s11 = tl.load(base + i2 * s_sh + col2, mask=mask).to(tl.float32)
        value = 0.75 * (0.75 * s00 + 0.25 * s01) + 0.25 * (0.75 * s10 + 0.25 * s11)
        out_c = CH + c
    out = out_ptr + n * o_sn + y * o_sh + x[:, None] * o_sw + out_c[None, :] * o_sc
    tl.store(out, value.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gather_row(g_row, c0, c1, c2, c3, mask):
    """1/4·g[c0] + 3/4·(g[c1] + g[c2]) + 1/4·g[c3] along one output row, in fp32."""
    outer = tl.load(g_row + c0, mask=mask).to(tl.float32) + tl.load(g_row + c3, mask=mask).to(tl.float32)
    inner = tl.load(g_row + c1, mask=mask).to(tl.float32) + tl.load(g_row + c2, mask=mask).to(tl.float32)
    return 0.25 * outer + 0.75 * inner


@triton.jit
def _upsample2x_backward_kernel(
    g_ptr, ds_ptr,
    H, W, CS,
    g_sn, g_sc, g_sh, g_sw,
    d_sn, d_sc, d_sh, d_sw,
    BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program: source row i of sample n, BLOCK_X columns × BLOCK_C channels of ds."""
    row = tl.program_id(0)                       # n·H + i
    n = (row // H).to(tl.int64)
    i = row % H
    j = tl.program_id(1) * BLOCK_X + tl.arange(0, BLOCK_X)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (j < W)[:, None] & (c < CS)[None, :]
    # output rows 2i-1 .. 2i+2 and columns 2j-1 .. 2j+2, clamped into the output
    r0 = tl.maximum(2 * i - 1, 0)
    r3 = tl.minimum(2 * i + 2, 2 * H - 1)
    c0 = tl.maximum(2 * j - 1, 0)[:, None] * g_sw
    c1 = (2 * j)[:, None] * g_sw
    c2 = (2 * j + 1)[:, None] * g_sw
    c3 = tl.minimum(2 * j + 2, 2 * W - 1)[:, None] * g_sw
    base = g_ptr + n * g_sn + c[None, :] * g_sc
    outer = _gather_row(base + r0 * g_sh, c0, c1, c2, c3, mask) + _gather_row(base + r3 * g_sh, c0, c1, c2, c3, mask)
    inner = (_gather_row(base + (2 * i) * g_sh, c0, c1, c2, c3, mask)
             + _gather_row(base + (2 * i + 1) * g_sh, c0, c1, c2, c3, mask))
    ds = 0.25 * outer + 0.75 * inner
    out = ds_ptr + n * d_sn + i * d_sh + j[:, None] * d_sw + c[None, :] * d_sc
    tl.store(out, ds.to(ds_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Host side: validation, launch configuration, launchers
# --------------------------------------------------------------------------------------------
_INTERPRETED = is_interpreted(_upsample2x_concat_kernel)
# Elements per program: on a GPU 8 per thread (one 16-byte access per load in half precision along a
# contiguous axis), a tile of 2048 forward and 1024 backward, whose 16 gathers per element keep more values
# live (at 2048, sm_90 needs 255 registers for NCHW and spills). In NCHW the backward's gathers along the
# contiguous axis are scalar loads, 16 an element: 4 elements a thread there (at 8, ptxas spills in fp16).
# The interpreter, ~10 ms a program whatever its size, gets 4096.
_TILE_FORWARD = 4096 if _INTERPRETED else 2048
_TILE_BACKWARD = 4096 if _INTERPRETED else 1024
_TILE_BACKWARD_NCHW = 4096 if _INTERPRETED else 512


def _check_device(t: torch.Tensor) -> None:
    check_interpreter_device(t, _INTERPRETED, "upsample2x_concat", "upsample2x_concat_reference")


def _check_inputs(h, skip, h_bias=None) -> None:
    """Raise a one-line TypeError/ValueError naming the first bad argument."""
    for name, t in (("h", h), ("skip", skip)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"upsample2x_concat: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"upsample2x_concat: {name} must be 4-D (N, C, H, W), got shape {tuple(t.shape)}")
        if t.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"upsample2x_concat: {name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.numel() == 0:
            raise ValueError(f"upsample2x_concat: {name} must be non-empty, got shape {tuple(t.shape)}")
    if skip.device != h.device:
        raise ValueError(f"upsample2x_concat: skip is on {skip.device} but h is on {h.device}")
    out_per_sample = (h.shape[1] + skip.shape[1]) * h.shape[2] * h.shape[3]
    for name, extent in (("the output", out_per_sample - 1), ("h", span(h)), ("skip", span(skip))):
        if extent > INT32_MAX:  # (a sample's own offset is 64-bit)
            raise ValueError(f"upsample2x_concat: {name} spans {extent + 1} elements per sample, more than the "
                             f"kernels' 32-bit offsets address (2^31); use upsample2x_concat_reference")
    if skip.shape[0] != h.shape[0]:
        raise ValueError(f"upsample2x_concat: h and skip must have the same batch, "
                         f"got {h.shape[0]} and {skip.shape[0]}")
    if (2 * skip.shape[2], 2 * skip.shape[3]) != tuple(h.shape[2:]):
        raise ValueError(f"upsample2x_concat: skip's size {tuple(skip.shape[2:])} must be half of h's "
                         f"{tuple(h.shape[2:])} (an exact 2× upsampling)")
    if h_bias is not None:
        if not isinstance(h_bias, torch.Tensor):
            raise TypeError(f"upsample2x_concat: h_bias must be a torch.Tensor or None, got {type(h_bias).__name__}")
        if tuple(h_bias.shape) != (h.shape[1],):
            raise ValueError(f"upsample2x_concat: h_bias must have shape ({h.shape[1]},) for h of shape "
                             f"{tuple(h.shape)}, got {tuple(h_bias.shape)}")
        if h_bias.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"upsample2x_concat: h_bias must be float32, float16 or bfloat16, got {h_bias.dtype}")
        if h_bias.device != h.device:
            raise ValueError(f"upsample2x_concat: h_bias is on {h_bias.device} but h is on {h.device}")


def _blocks(columns: int, channels: int, tile: int, channels_last: bool, per_thread: int = 8):
    """(BLOCK_X, BLOCK_C, num_warps): the contiguous axis (channels in channels_last, columns in NCHW) first,
    up to 64 (128 contiguous bytes in half precision), then the other up to a `tile`-element tile;
    `per_thread` elements a thread."""
    if channels_last:
        block_c = min(next_power_of_2(channels), 64)
        block_x = min(next_power_of_2(columns), max(1, tile // block_c))
    else:
        block_x = min(next_power_of_2(columns), 64)
        block_c = min(next_power_of_2(channels), max(1, tile // block_x))
    return block_x, block_c, max(1, min(8, block_x * block_c // (32 * per_thread)))


@on_tensor_device
def _upsample2x_concat_into(h, skip, h_bias, out, blocks=None):
    """Write cat([h + h_bias, up(skip)], 1) into out (N, Ch + Cs, 2H, 2W), any strides (h_bias: a contiguous
    (Ch,) tensor or None); blocks: (BLOCK_X, BLOCK_C, num_warps) instead of the heuristic's."""
    batch, ch, height, width = h.shape
    cs = skip.shape[1]
    block_x, block_c, num_warps = blocks or _blocks(width, max(ch, cs), _TILE_FORWARD, out.stride(1) == 1)
    h_blocks = cdiv(ch, block_c)
    grid = (batch * height, cdiv(width, block_x), h_blocks + cdiv(cs, block_c))
    autotune.launch(_upsample2x_concat_kernel, grid)(
        h, skip, h if h_bias is None else h_bias, out, skip.shape[2], skip.shape[3], ch, cs,
        *h.stride(), *skip.stride(), *out.stride(), h_blocks,
        HAS_BIAS=h_bias is not None, BLOCK_X=block_x, BLOCK_C=block_c, num_warps=num_warps)
    return out


@on_tensor_device
def _upsample2x_backward_into(grad_up, grad_skip, blocks=None):
    """Write the skip's gradient (N, Cs, H, W) from the upsampled part's gradient grad_up (N, Cs, 2H, 2W)."""
    batch, cs, height, width = grad_skip.shape
    channels_last = grad_up.stride(1) == 1
    block_x, block_c, num_warps = blocks or (_blocks(width, cs, _TILE_BACKWARD, True) if channels_last else
                                             _blocks(width, cs, _TILE_BACKWARD_NCHW, False, per_thread=4))
    grid = (batch * height, cdiv(width, block_x), cdiv(cs, block_c))
    autotune.launch(_upsample2x_backward_kernel, grid)(
        grad_up, grad_skip, height, width, cs, *grad_up.stride(), *grad_skip.stride(),
        BLOCK_X=block_x, BLOCK_C=block_c, num_warps=num_warps)
    return grad_skip


def _output_like(h, channels):
    batch, _, height, width = h.shape
    return torch.empty((batch, channels, height, width), device=h.device, dtype=h.dtype,
                       memory_format=memory_format_of(h))


# --------------------------------------------------------------------------------------------
# Custom ops and autograd
# --------------------------------------------------------------------------------------------
def _upsample2x_concat_impl(h, skip, h_bias):
    # The op is public too (torch.ops.dream_kernels): shapes are checked here and in the fake as well as in
    # the wrapper. The device check is here only, so that fake tensors (torch.compile tracing) pass.
    _check_inputs(h, skip, h_bias)
    _check_device(h)
    return _upsample2x_concat_into(h, skip, None if h_bias is None else h_bias.contiguous(),
                                   _output_like(h, h.shape[1] + skip.shape[1]))


@torch.library.custom_op("dream_kernels::upsample2x_concat", mutates_args=())
def _upsample2x_concat_op(h: torch.Tensor, skip: torch.Tensor, h_bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _upsample2x_concat_impl(h, skip, h_bias)


@_upsample2x_concat_op.register_fake
def _(h, skip, h_bias):
    _check_inputs(h, skip, h_bias)
    return _output_like(h, h.shape[1] + skip.shape[1])


def _skip_gradient_like(grad_up, dtype, channels_last):
    batch, channels, height, width = grad_up.shape
    return torch.empty((batch, channels, height // 2, width // 2), device=grad_up.device, dtype=dtype,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _check_backward_inputs(grad_up, dtype) -> None:
    if grad_up.dim() != 4 or grad_up.shape[2] % 2 or grad_up.shape[3] % 2 or grad_up.numel() == 0:
        raise ValueError(f"upsample2x_bilinear_backward: grad_up must be a non-empty (N, C, 2H, 2W) tensor, got "
                         f"shape {tuple(grad_up.shape)}")
    if grad_up.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"upsample2x_bilinear_backward: grad_up must be float32, float16 or bfloat16, got "
                        f"{grad_up.dtype}")
    if dtype not in _KERNEL_DTYPES:
        raise TypeError(f"upsample2x_bilinear_backward: dtype (the skip's) must be float32, float16 or bfloat16, "
                        f"got {dtype}")
    if grad_up[0].numel() > INT32_MAX:  # (a gradient's view spanning more within a sample is copied)
        raise ValueError(f"upsample2x_bilinear_backward: grad_up has {grad_up[0].numel()} elements per sample, more "
                         f"than the kernels' 32-bit offsets address (2^31 - 1)")


def _upsample2x_backward_impl(grad_up, dtype, channels_last):
    _check_backward_inputs(grad_up, dtype)
    _check_device(grad_up)
    if span(grad_up) > INT32_MAX:
        grad_up = grad_up.contiguous(memory_format=memory_format_of(grad_up))
    return _upsample2x_backward_into(grad_up, _skip_gradient_like(grad_up, dtype, channels_last))


@torch.library.custom_op("dream_kernels::upsample2x_bilinear_backward", mutates_args=())
def _upsample2x_backward_op(grad_up: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    return _upsample2x_backward_impl(grad_up, dtype, channels_last)


@_upsample2x_backward_op.register_fake
def _(grad_up, dtype, channels_last):
    _check_backward_inputs(grad_up, dtype)
    return _skip_gradient_like(grad_up, dtype, channels_last)


def _setup_context(ctx, inputs, output):
    h, skip, h_bias = inputs
    ctx.h_channels = h.shape[1]
    ctx.skip_dtype = skip.dtype
    ctx.skip_channels_last = memory_format_of(skip) == torch.channels_last
    ctx.h_bias_dtype = None if h_bias is None else h_bias.dtype


def _autograd_backward(ctx, grad_out):
    grad_h = grad_out[:, :ctx.h_channels]
    grad_skip = _upsample2x_backward_call(grad_out[:, ctx.h_channels:], ctx.skip_dtype, ctx.skip_channels_last)
    grad_h_bias = None
    if ctx.h_bias_dtype is not None and ctx.needs_input_grad[2]:
        grad_h_bias = grad_h.sum(dim=(0, 2, 3), dtype=torch.float32).to(ctx.h_bias_dtype)
    return grad_h, grad_skip, grad_h_bias


_upsample2x_concat_op.register_autograd(_autograd_backward, setup_context=_setup_context)
_upsample2x_concat_call = OpCall("dream_kernels::upsample2x_concat", _upsample2x_concat_impl, _setup_context,
                                 _autograd_backward)
_upsample2x_backward_call = OpCall("dream_kernels::upsample2x_bilinear_backward", _upsample2x_backward_impl)


# The ops' Python implementations, for bench/compile_report.py (which replays them on meta tensors)
OP_IMPLEMENTATIONS = {
    "dream_kernels::upsample2x_concat": _upsample2x_concat_impl,
    "dream_kernels::upsample2x_bilinear_backward": _upsample2x_backward_impl,
}


def upsample2x_concat(h: torch.Tensor, skip: torch.Tensor, h_bias: torch.Tensor | None = None) -> torch.Tensor:
    """cat([h + h_bias, bilinear 2× upsampling of skip (align_corners=False)], dim=1) in one pass.

    h: (N, Ch, 2H, 2W), skip: (N, Cs, H, W); fp32, fp16 or bf16 each, NCHW or channels_last; h_bias: (Ch,)
    or None. The result has h's dtype and memory format (computed in fp32, rounded once). Differentiable
    in all three (deterministic backward). CPU tensors run only through the Triton interpreter."""
    _check_inputs(h, skip, h_bias)
    reject_function_transforms("upsample2x_concat", "upsample2x_concat_reference", h, skip, h_bias)
    return _upsample2x_concat_call(h, skip, h_bias)


def upsample2x_concat_reference(h: torch.Tensor, skip: torch.Tensor,
                                h_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Eager PyTorch: h plus its bias, and the skip resized in fp32 (or wider) by F.interpolate and cast to h's
    dtype, concatenated."""
    if h_bias is not None:
        h = h + h_bias.view(1, -1, 1, 1).to(h.dtype)
    up = F.interpolate(skip.to(torch.promote_types(skip.dtype, torch.float32)), size=h.shape[-2:],
                       mode="bilinear", align_corners=False)
    return torch.cat([h, up.to(h.dtype)], dim=1)
