"""The kernels' public API around the math: function transforms, the interpreter's mode, numpy scalars,
meta tensors, and errors that name the op that was called. Tiny shapes: the values are checked at length
in each op's own test file."""
import importlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as forward_ad

import kernels
from conftest import DEVICE, ON_GPU, ROOT, assert_close, run_without_interpreter

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


def _gn_inputs():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 2, device=DEVICE)
    weight, bias = torch.randn(4, device=DEVICE), torch.randn(4, device=DEVICE)
    return x, weight, bias


def _op_call(op):
    """(input, function of that input calling op) for one small problem."""
    x, weight, bias = _gn_inputs()
    if op == "attention":
        return torch.randn(1, 2, 5, 16, device=DEVICE), lambda q: kernels.attention(q, q, q)
    return x, {
        "group_norm_silu": lambda t: kernels.group_norm_silu(t, weight, bias, 2),
        "add_bias_residual": lambda t: kernels.add_bias_residual(t, t, weight),
        "upsample2x_concat": lambda t: kernels.upsample2x_concat(t.repeat(1, 1, 2, 2), t),
        "group_norm_silu_conv2d": lambda t: kernels.group_norm_silu_conv2d(t, weight, bias, 2, weight.view(1, 4, 1, 1)),
    }[op]


OPS = ["add_bias_residual", "attention", "group_norm_silu", "group_norm_silu_conv2d", "upsample2x_concat"]


@pytest.mark.parametrize("op", OPS)
def test_forward_mode_ad_is_refused_not_answered_with_zero_tangents(op):
    """torch.library custom ops have no forward-mode formula, and PyTorch then returns zero (or no)
    tangents silently: the ops refuse in one line instead."""
    x, call = _op_call(op)
    with pytest.raises(RuntimeError, match=rf"^{op}: torch\.func\.jvp/jacfwd is not supported"):
        torch.func.jvp(call, (x,), (torch.randn_like(x),))
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, torch.randn_like(x))
        with pytest.raises(RuntimeError, match=rf"^{op}: forward-mode AD \(dual tensors\) is not supported"):
            call(dual)
        call(x)  # plain tensors inside a dual level run


@pytest.mark.parametrize("op", OPS)
def test_func_grad_is_refused_in_one_line_and_vmap_works(op):
    x, call = _op_call(op)
    with pytest.raises(RuntimeError, match=rf"^{op}: torch\.func\.grad/vjp/jacrev is not supported"):
        torch.func.grad(lambda t: call(t).sum())(x)
    batched = torch.stack([x, x.flip(-1) * 0.5])
    out = torch.func.vmap(call)(batched)
    for i in range(2):
        assert torch.equal(out[i], call(batched[i]))


def test_reverse_mode_still_works_through_the_guard():
    x, w, b = _gn_inputs()
    x.requires_grad_()
    grads = torch.autograd.grad(kernels.group_norm_silu(x, w, b, 2).square().sum(), x)[0]
    ref_x = x.detach().double().requires_grad_()
    ref = torch.autograd.grad(kernels.group_norm_silu_reference(ref_x, w.double(), b.double(), 2).square().sum(),
                              ref_x)[0]
    assert_close("dx", grads, ref, 1e-5)


def test_numpy_scalars_are_accepted_like_python_numbers():
    x, w, b = _gn_inputs()
    expected = kernels.group_norm_silu(x, w, b, 2, eps=1e-5)
    assert torch.equal(kernels.group_norm_silu(x, w, b, np.int64(2), eps=np.float32(1e-5).item()), expected)
    assert torch.equal(kernels.group_norm_silu(x, w, b, np.int32(2), eps=np.float64(1e-5)), expected)
    q = torch.randn(1, 2, 5, 16, device=DEVICE)
    assert torch.equal(kernels.attention(q, q, q, scale=np.float32(0.25)), kernels.attention(q, q, q, scale=0.25))
    qkv = torch.randn(1, 48, 2, 2, device=DEVICE)
    assert torch.equal(kernels.attention_qkv_nchw(qkv, np.int64(1)), kernels.attention_qkv_nchw(qkv, 1))
    conv = torch.randn(3, 4, 3, 3, device=DEVICE)
    assert torch.equal(kernels.group_norm_silu_conv2d(x, w, b, np.int64(2), conv, padding=np.int64(1)),
                       kernels.group_norm_silu_conv2d(x, w, b, 2, conv, padding=1))
    with pytest.raises(ValueError, match="num_groups must be a positive int, got True"):
        kernels.group_norm_silu(x, w, b, True)
    assert torch.equal(kernels.group_norm_silu(x, w, b, 2, silu=np.bool_(True)), expected)
    assert torch.equal(kernels.group_norm_silu_conv2d(x, w, b, 2, conv, padding=1, silu=np.bool_(False)),
                       kernels.group_norm_silu_conv2d(x, w, b, 2, conv, padding=1, silu=False))


def test_errors_name_the_op_that_was_called():
    x, w, b = _gn_inputs()
    conv = torch.randn(3, 4, 1, 1, device=DEVICE)
    with pytest.raises(ValueError, match=r"^group_norm_silu_conv2d: channels C=4 are not divisible by num_groups=3"):
        kernels.group_norm_silu_conv2d(x, w, b, 3, conv)
    with pytest.raises(ValueError, match=r"^attention_qkv_nchw: head dim D=8 is not supported"):
        kernels.attention_qkv_nchw(torch.randn(1, 48, 2, 2, device=DEVICE), 2)
    with pytest.raises(TypeError, match=r"^attention_qkv_nchw: dtype torch.int64 is not supported"):
        kernels.attention_qkv_nchw(torch.ones(1, 48, 2, 2, dtype=torch.int64, device=DEVICE), 1)
    with pytest.raises(TypeError, match=r"^attention_qkv_nchw: scale must be a float or None"):
        kernels.attention_qkv_nchw(torch.randn(1, 48, 2, 2, device=DEVICE), 1, scale="0.1")


def test_the_public_custom_ops_check_shapes_themselves_also_on_meta_tensors():
    """torch.ops.dream_kernels.* can be called without the wrappers: a mismatched shape is a one-line
    ValueError from the op (and from its fake, under tracing), never a kernel reading past an input."""
    ops = torch.ops.dream_kernels
    for device in (DEVICE, "meta"):
        q = torch.randn(1, 1, 8, 16, device=device)
        x, bias = torch.randn(2, 4, 8, 8, device=device), torch.randn(4, device=device)
        calls = [
            (lambda: ops.attention_forward(q, q[:, :, :4], q[:, :, :4], 0.25),
             "^attention: q, k, v must have the same shape"),
            (lambda: ops.attention_forward(q, q, q, 1e-39), r"^attention: scale must lie in \[1.18e-38, "),
            (lambda: ops.attention_backward(q, q, q, q, torch.zeros(1, 1, 4, device=device), q, 0.25),
             r"^attention_backward: lse must be a float32 tensor of shape \(1, 1, 8\)"),
            (lambda: ops.attention_qkv_nchw_forward(torch.randn(1, 48, 2, 2, device=device), 1, 3e38),
             "^attention_qkv_nchw: scale must lie in"),
            (lambda: ops.add_bias_residual(x, x[:1], bias), r"^add_bias_residual: b must have a's shape"),
            (lambda: ops.add_bias_residual(x, x, bias[:1]), r"^add_bias_residual: bias must have shape \(4,\)"),
            (lambda: ops.upsample2x_concat(x, x, None), "^upsample2x_concat: skip's size .* must be half of h's"),
            (lambda: ops.upsample2x_bilinear_backward(x[:, :, :3], x.dtype, False),
             "^upsample2x_bilinear_backward: grad_up must be a non-empty"),
        ]
        for call, message in calls:
            with pytest.raises(ValueError, match=message):
                call()
        for dtype in (torch.int32, torch.float64):  # the gradient's dtype is an argument of this op
            with pytest.raises(TypeError, match=r"^upsample2x_bilinear_backward: dtype \(the skip's\) must be "
                                                rf"float32, float16 or bfloat16, got {dtype}$"):
                ops.upsample2x_bilinear_backward(x, dtype, False)


def test_attention_scales_beyond_fp32_are_refused_not_answered_wrongly():
    q = torch.randn(1, 1, 3, 16, device=DEVICE)
    for scale in (1e-39, 3e38):  # 1/scale, or scale·log2(e), is not a finite normal fp32 number
        with pytest.raises(ValueError, match="^attention: scale must lie in"):
            kernels.attention(q, q, q, scale=scale)
    assert kernels.attention(q, q, q, scale=1e-37).isfinite().all()


def test_every_op_gives_shapes_on_meta_tensors():
    meta = dict(device="meta")
    x, w = torch.empty(2, 8, 4, 4, **meta), torch.empty(8, **meta)
    assert kernels.group_norm_silu(x, w, w, 4).shape == (2, 8, 4, 4)
    conv = torch.empty(3, 8, 3, 3, **meta)
    assert kernels.group_norm_silu_conv2d(x, w, w, 4, conv, padding=1).shape == (2, 3, 4, 4)
    assert kernels.add_bias_residual(x, x, w).shape == (2, 8, 4, 4)
    assert kernels.upsample2x_concat(x, torch.empty(2, 3, 2, 2, **meta)).shape == (2, 11, 4, 4)
    assert kernels.attention_qkv_nchw(torch.empty(2, 48, 2, 2, **meta), 1).shape == (2, 16, 2, 2)


@pytest.mark.skipif(ON_GPU, reason="the interpreter's mode is a CPU matter")
def test_setting_the_interpreter_after_triton_was_imported_is_one_line_at_import():
    code = ("import os, triton\nos.environ['TRITON_INTERPRET'] = '1'\n"
            "try:\n    import kernels\nexcept ImportError as error:\n    print('ERROR', error)\n")
    result = run_without_interpreter(code, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    line = result.stdout.strip()
    assert line.startswith("ERROR kernels: TRITON_INTERPRET=1 was set after triton had been imported"), line
    assert "\n" not in line


@pytest.mark.skipif(ON_GPU, reason="the interpreter's mode is a CPU matter")
def test_any_value_triton_reads_as_true_selects_the_interpreter_for_every_op():
    env = dict(os.environ, TRITON_INTERPRET="true", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = ("import torch, kernels\nq = torch.randn(1, 1, 3, 16)\nx = torch.randn(1, 4, 2, 2)\n"
            "print(kernels.attention(q, q, q).shape,\n"
            "      kernels.group_norm_silu(x, x[0, :, 0, 0], x[0, :, 1, 0], 2).shape)\n"
            "from dream.model import check_backend_device\ncheck_backend_device('triton', 'cpu')\nprint('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["torch.Size([1,", "1,", "3,", "16])", "torch.Size([1,", "4,", "2,", "2])", "ok"]


def test_torch_export_of_a_module_using_the_ops_runs_them_at_other_batch_sizes():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(16) * 0.5 + 1)
            self.bias = torch.nn.Parameter(torch.randn(16) * 0.5)
            self.qkv = torch.nn.Parameter(torch.randn(48, 16, 1, 1) * 0.2)

        def forward(self, x, scale):
            h = kernels.group_norm_silu_conv2d(x, self.weight, self.bias, 4, self.qkv, scale=scale)
            return kernels.add_bias_residual(kernels.attention_qkv_nchw(h, 1), x, self.bias)

    torch.manual_seed(2)
    block = Block().to(DEVICE)
    batch = torch.export.Dim("batch", min=1, max=64)  # (traced at batch 2: batch 1 would specialize)
    example = (torch.randn(2, 16, 3, 3, device=DEVICE), torch.randn(2, 16, device=DEVICE))
    program = torch.export.export(block, example, dynamic_shapes=({0: batch}, {0: batch}))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert {"dream_kernels.group_norm_silu_conv2d.default", "dream_kernels.attention_qkv_nchw_forward.default",
            "dream_kernels.add_bias_residual.default"} <= targets, targets
    for size in (1, 2, 3, 5):
        x, scale = torch.randn(size, 16, 3, 3, device=DEVICE), torch.randn(size, 16, device=DEVICE)
        assert torch.equal(program.module()(x, scale), block(x, scale))


def test_bools_are_refused_where_numbers_are_expected():
    x, w, b = _gn_inputs()
    with pytest.raises(ValueError, match=r"^group_norm_silu: eps must be a positive float, got True"):
        kernels.group_norm_silu(x, w, b, 2, eps=True)
    q = torch.randn(1, 1, 3, 16, device=DEVICE)
    with pytest.raises(TypeError, match=r"^attention: scale must be a float or None, got bool"):
        kernels.attention(q, q, q, scale=True)
    conv = torch.randn(3, 4, 1, 1, device=DEVICE)
    for groups in (0, True):
        with pytest.raises(ValueError, match=rf"^group_norm_silu_conv2d: groups must be a positive int, got {groups}"):
            kernels.group_norm_silu_conv2d(x, w, b, 2, conv, groups=groups)


def test_operands_on_another_device_are_refused_naming_the_operand():
    """Checked before anything runs, so a meta tensor beside real ones shows it on any machine."""
    x, w, b = _gn_inputs()
    meta = dict(device="meta")
    conv = torch.randn(3, 4, 1, 1, device=DEVICE)
    calls = [
        (lambda: kernels.add_bias_residual(x, x.to(**meta), w), "^add_bias_residual: b is on meta but a is on"),
        (lambda: kernels.add_bias_residual(x, x, w.to(**meta)), "^add_bias_residual: bias is on meta but a is on"),
        (lambda: kernels.upsample2x_concat(x.repeat(1, 1, 2, 2), x.to(**meta)),
         "^upsample2x_concat: skip is on meta but h is on"),
        (lambda: kernels.upsample2x_concat(x.repeat(1, 1, 2, 2), x, w.to(**meta)),
         "^upsample2x_concat: h_bias is on meta but h is on"),
        (lambda: kernels.group_norm_silu_conv2d(x, w, b, 2, conv.to(**meta)),
         "^group_norm_silu_conv2d: conv_weight is on meta but x is on"),
        (lambda: kernels.attention(*(torch.randn(1, 1, 3, 16, device=device) for device in (DEVICE, DEVICE, "meta"))),
         "^attention: q, k, v must be on one device"),
    ]
    for call, message in calls:
        with pytest.raises(ValueError, match=message):
            call()


def test_32_bit_offsets_are_refused_from_the_first_one_beyond_2_to_the_31():
    """Within one sample the kernels index with int32: the largest offset a view reaches may be 2^31 - 1,
    not 2^31 (meta tensors: nothing is allocated)."""
    h = torch.empty(1, 3, 4, 4, device="meta")
    for channel_stride, allowed in ((2 ** 31 - 4, True), (2 ** 31 - 3, False)):
        skip = torch.empty_strided((1, 2, 2, 2), (1, channel_stride, 2, 1), device="meta")  # reaches stride + 3
        if allowed:
            assert kernels.upsample2x_concat(h, skip).shape == (1, 5, 4, 4)
        else:
            with pytest.raises(ValueError, match=rf"^upsample2x_concat: skip spans {channel_stride + 4} elements per"):
                kernels.upsample2x_concat(h, skip)


def test_attention_operands_are_copied_only_where_32_bit_offsets_overflow():
    """attention reads each (batch, head) with int32 offsets: a view reaching past 2^31 - 1 within one is copied."""
    attention_module = importlib.import_module("kernels.attention")
    for row_stride, copied in ((2 ** 31 - 16, False), (2 ** 31 - 15, True)):
        view = torch.empty_strided((1, 1, 2, 16), (32, 32, row_stride, 1), device="meta")  # reaches stride + 15
        dense = attention_module._addressable(view)
        assert (dense is not view) == copied and dense.shape == view.shape
        assert not copied or dense.is_contiguous()


def test_attention_scale_must_be_finite_and_positive():
    q = torch.randn(1, 1, 3, 16, device=DEVICE)
    for scale in (0.0, -0.25, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"^attention: scale must be finite and positive"):
            kernels.attention(q, q, q, scale=scale)


def test_the_attention_backward_op_refuses_statistics_of_another_dtype():
    ops = torch.ops.dream_kernels
    q = torch.randn(1, 1, 8, 16, device="meta")
    for dtype in (torch.float16, torch.float64):
        lse = torch.empty(1, 1, 8, device="meta", dtype=dtype)
        with pytest.raises(ValueError, match=r"^attention_backward: lse must be a float32 tensor of shape \(1, 1, 8\)"):
            ops.attention_backward(q, q, q, q, lse, q, 0.25)


def test_grid_arithmetic_rounds_up_to_the_next_block_and_power_of_two():
    """kernels.layout.cdiv is ceil(a / b), with no extra block at exact multiples, and next_power_of_2 the smallest
    power of two >= n (n itself when it is one): the launchers size their grids and tiles with them."""
    from kernels.layout import cdiv, next_power_of_2

    for a in range(0, 70):
        for b in (1, 2, 3, 8, 64):
            assert cdiv(a, b) == math.ceil(a / b), (a, b)
    for n in range(0, 130):
        assert next_power_of_2(n) == min(2 ** k for k in range(9) if 2 ** k >= n), n
    assert cdiv(2 ** 40 + 1, 2 ** 20) == 2 ** 20 + 1  # plain integers, no float rounding


def test_a_tensor_dense_in_both_layouts_counts_as_nchw():
    """memory_format_of gives channels_last only for a tensor laid out that way and not also NCHW-contiguous: with
    one channel, or one position per image, both layouts are the same memory and the ops keep NCHW (whose dropout
    mask layout, say, follows it)."""
    from kernels.layout import memory_format_of

    for shape in ((2, 3, 1, 1), (2, 1, 4, 5)):
        both = torch.empty(shape, device="meta").contiguous(memory_format=torch.channels_last)
        assert both.is_contiguous() and memory_format_of(both) == torch.contiguous_format, shape
    channels_last = torch.empty(2, 3, 4, 5, device="meta").contiguous(memory_format=torch.channels_last)
    assert memory_format_of(channels_last) == torch.channels_last
    assert memory_format_of(torch.empty(2, 3, 4, device="meta")) == torch.contiguous_format


def test_the_attention_backward_op_reads_a_strided_lse():
    """The backward kernels index lse as dense (B·H, N): the public op given lse as a strided view (here stored
    (N, B, H) and transposed, and once as every other element of a longer row) returns the gradients of the dense
    one, bitwise."""
    ops = torch.ops.dream_kernels
    gen = torch.Generator().manual_seed(29)
    q, k, v, do = (torch.randn(2, 3, 17, 16, generator=gen).to(DEVICE) for _ in range(4))
    o, lse = ops.attention_forward(q, k, v, 0.25)
    expected = ops.attention_backward(q, k, v, o, lse, do, 0.25)
    transposed = lse.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    every_other = torch.stack([lse, torch.full_like(lse, float("nan"))], dim=-1).flatten(-2)[..., ::2]
    for view in (transposed, every_other):
        assert torch.equal(view, lse) and not view.is_contiguous()
        for got, want in zip(ops.attention_backward(q, k, v, o, view, do, 0.25), expected):
            assert torch.equal(got, want)
