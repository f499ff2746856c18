"""A residual sum that carries a convolution's bias, in one pass:

    out = a + b + bias[c]        a, b: (N, C, H, W); bias: (C,)

PyTorch adds a cuDNN convolution's bias as a pass of its own over the convolution's output (aten's
_convolution: output.add_(bias), a broadcasting elementwise kernel), and the residual sum that follows
is another pass. Run without its bias, the convolution's output goes straight into this op: one pass
(read a and b, write out) instead of two. Summed in fp32, rounded once to the output dtype.

Backward: da = db = dout (the same tensor, as for torch.add), dbias = Σ_{n,h,w} dout, summed in fp32 by
torch.sum (deterministic) and returned in bias's dtype.

Layout: a, b and out are dense and share a's memory format (b is copied to it if it differs), so the
kernel walks one 2-D view of memory, rows × columns, with the bias index along one of them:
    channels_last: rows = N·H·W positions, columns = C channels, bias index = column;
    NCHW:          rows = N·C planes,      columns = H·W positions, bias index = row mod C.
Dtypes: a and b fp32, fp16 or bf16 (out takes their promoted dtype), bias any of those.
"""
import torch
import triton
import triton.language as tl

from kernels import autotune
from kernels.device import check_interpreter_device, is_interpreted, on_tensor_device, reject_function_transforms
from kernels.dispatch import OpCall
from kernels.layout import cdiv, memory_format_of, next_power_of_2

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _bias_residual_kernel(
    a_ptr, b_ptr, bias_ptr, out_ptr,
    ROWS, COLS, C,
    BIAS_ON_COLS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """One program: a BLOCK_ROWS × BLOCK_COLS tile of the rows × columns view of memory, tiles numbered
    along the columns first (a 1-D grid: CUDA caps a grid's second axis at 65535 blocks)."""
    col_blocks = tl.cdiv(COLS, BLOCK_COLS)
    row_block = tl.program_id(0) // col_blocks
    rows = row_block.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = (tl.program_id(0) - row_block * col_blocks) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (rows < ROWS)[:, None] & (cols < COLS)[None, :]
    offsets = rows[:, None] * COLS + cols[None, :]
    if BIAS_ON_COLS:
        bias = tl.load(bias_ptr + cols, mask=cols < COLS).to(tl.float32)[None, :]
    else:
        bias = tl.load(bias_ptr + rows % C, mask=rows < ROWS).to(tl.float32)[:, None]
    a = tl.load(a_ptr + offsets, mask=mask).to(tl.float32)
    b = tl.load(b_ptr + offsets, mask=mask).to(tl.float32)
    tl.store(out_ptr + offsets, (a + b + bias).to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Host side: validation, launch configuration, launcher
# --------------------------------------------------------------------------------------------
_INTERPRETED = is_interpreted(_bias_residual_kernel)
# Elements per program: on a GPU 8 per thread (16-byte accesses in half precision); the interpreter,
# ~10 ms a program whatever its size, gets 4096.
_TILE = 4096 if _INTERPRETED else 2048


def _check_device(t: torch.Tensor) -> None:
    check_interpreter_device(t, _INTERPRETED, "add_bias_residual", "add_bias_residual_reference")


def _check_inputs(a, b, bias) -> None:
    """Raise a one-line TypeError/ValueError naming the first bad argument."""
    for name, t in (("a", a), ("b", b), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"add_bias_residual: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"add_bias_residual: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if a.dim() != 4:
        raise ValueError(f"add_bias_residual: a must be 4-D (N, C, H, W), got shape {tuple(a.shape)}")
    if a.numel() == 0:
        raise ValueError(f"add_bias_residual: a must be non-empty, got shape {tuple(a.shape)}")
    if b.shape != a.shape:
        raise ValueError(f"add_bias_residual: b must have a's shape {tuple(a.shape)}, got {tuple(b.shape)}")
    if tuple(bias.shape) != (a.shape[1],):
        raise ValueError(f"add_bias_residual: bias must have shape ({a.shape[1]},) for a of shape {tuple(a.shape)}, "
                         f"got {tuple(bias.shape)}")
    for name, t in (("b", b), ("bias", bias)):
        if t.device != a.device:
            raise ValueError(f"add_bias_residual: {name} is on {t.device} but a is on {a.device}")


def _dense(t: torch.Tensor, memory_format) -> torch.Tensor:
    return t if t.is_contiguous(memory_format=memory_format) else t.contiguous(memory_format=memory_format)


@on_tensor_device
def _add_bias_residual_into(a, b, bias, out, blocks=None):
    """out = a + b + bias[c] for a, b, out dense in one memory format (walked as channels_last when out's
    channel stride is 1, which with one position per image is NCHW's memory too); blocks: (BLOCK_ROWS,
    BLOCK_COLS, num_warps) instead of the heuristic's."""
    n, c, height, width = out.shape
    channels_last = out.stride(1) == 1
    rows, cols = (n * height * width, c) if channels_last else (n * c, height * width)
    if blocks is None:
        block_cols = min(next_power_of_2(cols), 256)
        block_rows = min(next_power_of_2(rows), max(1, _TILE // block_cols))
        blocks = (block_rows, block_cols, max(1, min(8, block_rows * block_cols // 256)))
    block_rows, block_cols, num_warps = blocks
    grid = (cdiv(rows, block_rows) * cdiv(cols, block_cols),)
    autotune.launch(_bias_residual_kernel, grid)(a, b, bias, out, rows, cols, c, BIAS_ON_COLS=channels_last,
                                                 BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=num_warps)
    return out


def _output_like(a, b):
    return torch.empty(a.shape, device=a.device, dtype=torch.promote_types(a.dtype, b.dtype),
                       memory_format=memory_format_of(a))


# --------------------------------------------------------------------------------------------
# Custom op and autograd
# --------------------------------------------------------------------------------------------
def _add_bias_residual_impl(a, b, bias):
    # The op is public too (torch.ops.dream_kernels): shapes are checked here and in the fake as well as in
    # the wrapper (whose early check names the op before any tracing). The device check is here only, so
    # that fake tensors (FakeTensorMode, torch.compile tracing) pass.
    _check_inputs(a, b, bias)
    _check_device(a)
    memory_format = memory_format_of(a)
    return _add_bias_residual_into(_dense(a, memory_format), _dense(b, memory_format), bias.contiguous(),
                                   _output_like(a, b))


@torch.library.custom_op("dream_kernels::add_bias_residual", mutates_args=())
def _add_bias_residual_op(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _add_bias_residual_impl(a, b, bias)


@_add_bias_residual_op.register_fake
def _(a, b, bias):
    _check_inputs(a, b, bias)
    return _output_like(a, b)


def _setup_context(ctx, inputs, output):
    a, b, bias = inputs
    ctx.dtypes = (a.dtype, b.dtype, bias.dtype)


def _autograd_backward(ctx, grad_out):
    a_dtype, b_dtype, bias_dtype = ctx.dtypes
    grad_bias = None  # a pass over grad_out: only when bias needs it
    if ctx.needs_input_grad[2]:
        grad_bias = grad_out.sum(dim=(0, 2, 3), dtype=torch.float32).to(bias_dtype)
    return grad_out.to(a_dtype), grad_out.to(b_dtype), grad_bias


_add_bias_residual_op.register_autograd(_autograd_backward, setup_context=_setup_context)
_add_bias_residual_call = OpCall("dream_kernels::add_bias_residual", _add_bias_residual_impl, _setup_context,
                                 _autograd_backward)

# The op's Python implementation, for bench/compile_report.py (which replays it on meta tensors)
OP_IMPLEMENTATIONS = {"dream_kernels::add_bias_residual": _add_bias_residual_impl}


def add_bias_residual(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """a + b + bias[None, :, None, None] in one pass, summed in fp32.

    a, b: (N, C, H, W), fp32/fp16/bf16, NCHW or channels_last (out takes a's memory format and the
    promoted dtype of a and b); bias: (C,). Differentiable in all three. CPU tensors run only through
    the Triton interpreter."""
    _check_inputs(a, b, bias)
    reject_function_transforms("add_bias_residual", "add_bias_residual_reference", a, b, bias)
    return _add_bias_residual_call(a, b, bias)


def add_bias_residual_reference(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Eager PyTorch: a + b + bias broadcast over (N, H, W), in the promoted dtype of a and b."""
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    return (a + b + bias.view(1, -1, 1, 1).to(out_dtype)).to(out_dtype)
