"""kernels.upsample2x_concat (the decoder's skip upsampled 2× bilinearly and concatenated behind h plus
its bias) against float64 F.interpolate + torch.cat.

Error metric: max|actual − expected| / max|expected| over the whole tensor, expected in float64 from
the same (rounded) inputs and output gradient.

| dtype           | out, dh, dskip | why                                                          |
| --------------- | -------------- | ------------------------------------------------------------ |
| float32         | 1e-6           | fp32 sums of 4 (forward) and 16 (backward) weighted terms    |
| float16         | 1e-3           | one rounding of the output to fp16 (unit roundoff 4.9e-4)    |
| bfloat16 (GPU)  | 8e-3           | one rounding to bf16 (unit roundoff 3.9e-3)                  |

dh is dout's slice, so it is exact in every dtype; dh_bias (fp32, a sum over N·2H·2W terms) is held
to 1e-5 in every dtype. bf16 runs only with CUDA: the Triton interpreter
rounds fp32 → bf16 by truncation.
"""
import zlib

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, ON_GPU, NanEmptyTorch, RecordOps, assert_close, run_without_interpreter

import kernels.upsample_concat as upsample_concat_module  # noqa: E402  (conftest sets TRITON_INTERPRET first)
from kernels.upsample_concat import (  # noqa: E402
    _upsample2x_backward_into,
    _upsample2x_concat_into,
    upsample2x_concat,
    upsample2x_concat_reference,
)

TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}

_needs_cuda = pytest.mark.skipif(not ON_GPU, reason="bf16 needs CUDA (the interpreter truncates fp32 → bf16)")
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=_needs_cuda)]

# (N, Ch, Cs, H, W) with skip (N, Cs, H, W) and h (N, Ch, 2H, 2W): odd and 1×1 sources, batch 1 and 3,
# channel counts that are not powers of two, tiles with tails along columns and channels.
CPU_SHAPES = [
    (1, 3, 5, 7, 5),
    (3, 8, 6, 1, 1),
    (2, 5, 12, 4, 3),
    (1, 2, 1, 2, 9),
    (1, 70, 33, 2, 40),    # 80 output columns: two column tiles; 70 channels: two channel tiles
]
GPU_SHAPES = [            # the seed UNet's three decoder stages at batch 8, and a large odd one
    (8, 512, 512, 8, 8),
    (8, 256, 256, 16, 16),
    (8, 128, 128, 32, 32),
    (5, 96, 160, 13, 21),
]
SHAPES = CPU_SHAPES + (GPU_SHAPES if ON_GPU else [])
LAYOUTS = {  # (h, skip) memory formats
    "nchw": (torch.contiguous_format, torch.contiguous_format),
    "channels_last": (torch.channels_last, torch.channels_last),
    "mixed": (torch.channels_last, torch.contiguous_format),
}


def _inputs(shape, h_dtype, skip_dtype, layout, seed):
    """h, skip, h_bias (fp32, as a model's parameter under autocast) and dout."""
    n, ch, cs, height, width = shape
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    h_format, skip_format = LAYOUTS[layout]
    h = torch.randn((n, ch, 2 * height, 2 * width), generator=gen, device=DEVICE).to(h_dtype, memory_format=h_format)
    skip = (torch.randn((n, cs, height, width), generator=gen, device=DEVICE) * 3 + 0.5).to(
        skip_dtype, memory_format=skip_format)
    h_bias = torch.randn((ch,), generator=gen, device=DEVICE) * 0.5 + 0.2
    dout = torch.randn((n, ch + cs, 2 * height, 2 * width), generator=gen, device=DEVICE).to(h_dtype)
    return h, skip, h_bias, dout


def _float64(h, skip, h_bias, dout):
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (h, skip, h_bias)]
    out = upsample2x_concat_reference(*leaves)
    out.backward(dout.double())
    return out.detach(), [None if t is None else t.grad for t in leaves]


def _kernel(h, skip, h_bias, dout):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (h, skip, h_bias)]
    out = upsample2x_concat(*leaves)
    out.backward(dout)
    return out.detach(), [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_bias", [True, False], ids=["h_bias", "no_bias"])
def test_forward_and_gradients_match_float64(monkeypatch, shape, layout, dtype, with_bias):
    poisoned = NanEmptyTorch()  # out and dskip start as NaN: the default tiling must write every element
    monkeypatch.setattr(upsample_concat_module, "torch", poisoned)
    h, skip, h_bias, dout = _inputs(shape, dtype, dtype, layout, zlib.crc32(repr((shape, layout, dtype)).encode()))
    h_bias = h_bias if with_bias else None
    out, (dh, dskip, dbias) = _kernel(h, skip, h_bias, dout)
    ref_out, (ref_dh, ref_dskip, ref_dbias) = _float64(h, skip, h_bias, dout)
    tol = TOLERANCE[dtype]
    assert poisoned.allocated >= 2  # out, dskip
    assert out.dtype == dh.dtype == dskip.dtype == dtype
    assert out.is_contiguous(memory_format=LAYOUTS[layout][0])
    assert dskip.is_contiguous(memory_format=LAYOUTS[layout][1])
    assert_close("out", out, ref_out, tol)
    assert torch.equal(dh, dout[:, :shape[1]]), "dh must be dout's h part"
    assert_close("dskip", dskip, ref_dskip, tol)
    if with_bias:
        assert dbias.dtype == torch.float32
        assert_close("dh_bias", dbias, ref_dbias, 1e-5)


@pytest.mark.parametrize("h_dtype,skip_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float16)])
def test_mixed_dtypes_compute_in_fp32(h_dtype, skip_dtype):
    """out takes h's dtype (the upsampling rounded once), dskip skip's dtype; each is held to its own dtype's
    tolerance (fp32 math throughout: an fp32 result rounded through fp16 on the way fails)."""
    shape = (2, 4, 6, 3, 5)
    h, skip, h_bias, dout = _inputs(shape, h_dtype, skip_dtype, "nchw", 5)
    out, (dh, dskip, dbias) = _kernel(h, skip, h_bias, dout)
    ref_out, (_, ref_dskip, ref_dbias) = _float64(h, skip, h_bias, dout)
    assert out.dtype == dh.dtype == h_dtype and dskip.dtype == skip_dtype
    assert_close("out", out, ref_out, TOLERANCE[h_dtype])
    assert torch.equal(dh, dout[:, :shape[1]]), "dh must be dout's h part"
    assert_close("dskip", dskip, ref_dskip, TOLERANCE[skip_dtype])
    assert_close("dh_bias", dbias, ref_dbias, 1e-5)


# (block_x, block_c, num_warps) forced onto the launchers: several tiles with tails along both axes
FORCED_BLOCKS = [None, (2, 4, 1), (4, 2, 2)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocks", FORCED_BLOCKS, ids=lambda b: "heuristic" if b is None else "x".join(map(str, b)))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_launchers_write_every_element(layout, blocks, dtype):
    """Outputs start as NaN, inside larger buffers (strided views): every element must be written and
    correct, and nothing outside the view touched. The buffers, dout included, are in the layout's memory
    order, so channels_last runs the launchers' channels-first tiles (they pick them from the strides)."""
    shape = (2, 3, 5, 3, 5)
    n, ch, cs, height, width = shape
    memory_format = LAYOUTS[layout][0]
    h, skip, h_bias, dout = _inputs(shape, dtype, dtype, layout, 17)
    dout = dout.contiguous(memory_format=memory_format)
    ref_out, (_, ref_dskip, _) = _float64(h, skip, h_bias, dout)
    out_buffer = torch.full((n, ch + cs + 2, 2 * height, 2 * width + 1), float("nan"), device=DEVICE,
                            dtype=dtype).contiguous(memory_format=memory_format)
    out = out_buffer[:, 1:-1, :, :-1]
    assert (out.stride(1) == 1) == (layout == "channels_last")
    _upsample2x_concat_into(h, skip, h_bias, out, blocks)
    assert_close("out", out, ref_out, TOLERANCE[dtype])
    assert out_buffer[:, [0, -1]].isnan().all() and out_buffer[..., -1].isnan().all()
    grad_buffer = torch.full((n, cs, height, width + 3), float("nan"), device=DEVICE,
                             dtype=dtype).contiguous(memory_format=memory_format)
    grad_skip = grad_buffer[..., 3:]
    grad_up = dout[:, ch:]
    assert (grad_up.stride(1) == 1) == (grad_skip.stride(1) == 1) == (layout == "channels_last")
    _upsample2x_backward_into(grad_up, grad_skip, blocks)
    assert_close("dskip", grad_skip, ref_dskip, TOLERANCE[dtype])
    assert grad_buffer[..., :3].isnan().all()


# (N, Ch, Cs, H, W) for the channels_last gradient: Cs = 70 and 33 against the heuristic's 64-channel tiles of
# the backward (two tiles with a tail, one with a tail), 80 output columns (two forward column tiles)
CHANNELS_LAST_GRAD_SHAPES = [(1, 3, 70, 2, 3), (1, 70, 33, 2, 40)]
GRAD_LAYOUTS = {  # h, skip, dout memory formats
    "channels_last": (torch.channels_last,) * 3,  # a channels_last model: its gradients are channels_last
    "skip_channels_last": (torch.contiguous_format, torch.channels_last, torch.contiguous_format),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(GRAD_LAYOUTS))
@pytest.mark.parametrize("shape", CHANNELS_LAST_GRAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_channels_last_gradients_match_float64(shape, layout, dtype):
    """The backward launcher takes channels-first tiles when dout is channels_last, and writes dskip in skip's
    format whatever dout's: both against float64, with all three gradients (h, skip, h_bias)."""
    h_format, skip_format, dout_format = GRAD_LAYOUTS[layout]
    h, skip, h_bias, dout = _inputs(shape, dtype, dtype, "nchw", zlib.crc32(repr((shape, layout, dtype)).encode()))
    h, skip = h.contiguous(memory_format=h_format), skip.contiguous(memory_format=skip_format)
    dout = dout.contiguous(memory_format=dout_format)
    assert (dout[:, shape[1]:].stride(1) == 1) == (layout == "channels_last")
    out, (dh, dskip, dbias) = _kernel(h, skip, h_bias, dout)
    ref_out, (_, ref_dskip, ref_dbias) = _float64(h, skip, h_bias, dout)
    tol = TOLERANCE[dtype]
    assert out.is_contiguous(memory_format=h_format) and dskip.is_contiguous(memory_format=skip_format)
    assert_close("out", out, ref_out, tol)
    assert torch.equal(dh, dout[:, :shape[1]]), "dh must be dout's h part"
    assert_close("dskip", dskip, ref_dskip, tol)
    assert_close("dh_bias", dbias, ref_dbias, 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_half_precision_bias_gradient(dtype):
    """h_bias in h's dtype (not fp32): its gradient, an fp32 sum rounded once, comes back in that dtype."""
    h, skip, h_bias, dout = _inputs((2, 5, 4, 3, 5), dtype, dtype, "nchw", 43)
    out, (_, dskip, dbias) = _kernel(h, skip, h_bias.to(dtype), dout)
    ref_out, (_, ref_dskip, ref_dbias) = _float64(h, skip, h_bias.to(dtype), dout)
    assert dbias.dtype == dtype
    assert_close("out", out, ref_out, TOLERANCE[dtype])
    assert_close("dskip", dskip, ref_dskip, TOLERANCE[dtype])
    assert_close("dh_bias", dbias, ref_dbias, TOLERANCE[dtype])


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_non_dense_inputs_and_output_gradient_match_float64(monkeypatch, layout):
    """h a channel slice of a wider tensor, skip every other channel, dout a column slice: the kernels read
    them through their strides (or a dense copy), and the op's output, written over NaN, and every gradient
    match float64."""
    memory_format = LAYOUTS[layout][0]
    n, ch, cs, height, width = 3, 5, 6, 7, 5
    gen = torch.Generator(device=DEVICE).manual_seed(zlib.crc32(layout.encode()))

    def randn(*size):
        return torch.randn(size, generator=gen, device=DEVICE).contiguous(memory_format=memory_format)

    h = randn(n, ch + 3, 2 * height, 2 * width)[:, 2:2 + ch]
    skip = (randn(n, 2 * cs, height, width) * 3 + 0.5)[:, ::2]
    h_bias = (torch.randn(2 * ch, generator=gen, device=DEVICE) * 0.5 + 0.2)[::2]
    dout = randn(n, ch + cs, 2 * height, 2 * width + 3)[..., 1:1 + 2 * width]
    assert not (h.is_contiguous(memory_format=memory_format) or skip.is_contiguous(memory_format=memory_format)
                or dout.is_contiguous(memory_format=memory_format) or h_bias.is_contiguous())
    poisoned = NanEmptyTorch()
    monkeypatch.setattr(upsample_concat_module, "torch", poisoned)
    out, (dh, dskip, dbias) = _kernel(h, skip, h_bias, dout)
    ref_out, (ref_dh, ref_dskip, ref_dbias) = _float64(h, skip, h_bias, dout)
    assert poisoned.allocated >= 2  # out, dskip
    assert_close("out", out, ref_out, TOLERANCE[torch.float32])
    assert torch.equal(dh, dout[:, :ch]), "dh must be dout's h part"
    assert_close("dskip", dskip, ref_dskip, TOLERANCE[torch.float32])
    assert_close("dh_bias", dbias, ref_dbias, 1e-5)
    # _kernel's leaves are clones, which are dense: the views themselves, a strided h_bias included, give out too
    assert_close("out of the views", upsample2x_concat(h, skip, h_bias), ref_out, TOLERANCE[torch.float32])


def test_upsampling_is_pytorch_bilinear():
    """The stencil is F.interpolate's bilinear 2× (align_corners=False) and its transpose: checked in
    float64 against the formulas written out, on a skip whose rows and columns are all distinct."""
    skip = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    up = F.interpolate(skip, scale_factor=2, mode="bilinear", align_corners=False)
    rows = torch.tensor([[1, 0, 0], [.75, .25, 0], [.25, .75, 0], [0, .75, .25], [0, .25, .75], [0, 0, 1]],
                        dtype=torch.float64)
    cols = torch.tensor([[1, 0, 0, 0], [.75, .25, 0, 0], [.25, .75, 0, 0], [0, .75, .25, 0], [0, .25, .75, 0],
                         [0, 0, .75, .25], [0, 0, .25, .75], [0, 0, 0, 1]], dtype=torch.float64)
    assert torch.allclose(up[0, 0], rows @ skip[0, 0] @ cols.T, rtol=0, atol=1e-12)
    h = torch.randn(1, 2, 6, 8)
    out = upsample2x_concat(h, skip.float())
    assert torch.allclose(out[0, 2].double(), up[0, 0], rtol=0, atol=1e-6)


def test_backward_is_deterministic():
    shape = (2, 6, 10, 5, 7) if not ON_GPU else (64, 128, 128, 32, 32)
    h, skip, h_bias, dout = _inputs(shape, torch.float32, torch.float32, "channels_last", 29)
    first = _kernel(h, skip, h_bias, dout)
    second = _kernel(h, skip, h_bias, dout)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


def test_a_frozen_h_bias_costs_no_gradient_pass():
    """Without h_bias.requires_grad, backward does not sum dout's h part for a gradient nobody asked for; h and skip
    still get theirs, those of the reference."""
    h, skip, h_bias, dout = _inputs((2, 3, 4, 2, 3), torch.float32, torch.float32, "nchw", 43)
    h, skip = h.requires_grad_(), skip.requires_grad_()
    out = upsample2x_concat(h, skip, h_bias)
    with RecordOps() as record:
        out.backward(dout)
    assert h_bias.grad is None
    assert not [func for func, _ in record.calls if func.overloadpacket is torch.ops.aten.sum], record.calls
    _, (ref_dh, ref_dskip, _) = _float64(h, skip, h_bias, dout)
    assert_close("dh", h.grad, ref_dh, TOLERANCE[torch.float32])
    assert_close("dskip", skip.grad, ref_dskip, TOLERANCE[torch.float32])


def test_samples_beyond_32_bit_offsets_are_refused():
    """The kernels address one sample's elements with int32 offsets (a sample's own offset is int64): an output
    sample of more than 2^31 elements, or an input view spanning that many, is a one-line error, not wrapped-around
    addresses. On meta tensors: nothing is allocated."""
    def meta(*shape):
        return torch.empty(*shape, device="meta", dtype=torch.float16)

    assert upsample2x_concat(meta(1, 63, 8192, 4096), meta(1, 1, 4096, 2048)).shape == (1, 64, 8192, 4096)
    with pytest.raises(ValueError, match="upsample2x_concat: the output spans 2181038080 elements per sample"):
        upsample2x_concat(meta(1, 64, 8192, 4096), meta(1, 1, 4096, 2048))
    skip_view = torch.empty_strided((1, 2, 2, 2), (1, 2 ** 31, 2, 1), device="meta")  # channels 2^31 apart
    with pytest.raises(ValueError, match="upsample2x_concat: skip spans 2147483652 elements per sample"):
        upsample2x_concat(meta(1, 3, 4, 4).float(), skip_view)


def test_a_grid_beyond_cudas_limits_is_a_one_line_error_before_any_launch():
    """64K column tiles along the grid's y axis (65535 at most on CUDA): refused in one line, in the interpreter
    too, before anything runs."""
    h, skip = torch.randn(1, 1, 2, 131072, device=DEVICE), torch.randn(1, 1, 1, 65536, device=DEVICE)
    out = torch.full((1, 2, 2, 131072), float("nan"), device=DEVICE)
    with pytest.raises(ValueError, match=r"^_upsample2x_concat_kernel: a launch grid of \(2, 131072, 2\) blocks "
                                         r"exceeds CUDA's limits \(2147483647 along x, 65535 along y and z\)"):
        _upsample2x_concat_into(h, skip, None, out, (1, 1, 1))
    assert out.isnan().all()


def test_a_gradient_view_beyond_int32_offsets_is_copied_and_an_oversized_sample_refused(monkeypatch):
    """The backward reads grad_up with 32-bit offsets within a sample: a view reaching further is copied first,
    a sample with more elements than those offsets address is a one-line error. The limit is lowered to
    300 elements here, so that a small strided view crosses it."""
    import kernels.upsample_concat as module

    grad_up = torch.randn(2, 3, 8, 24, device=DEVICE)[..., ::2]  # (2, 3, 8, 12): spans 574 elements a sample
    ops = torch.ops.dream_kernels
    expected = ops.upsample2x_bilinear_backward(grad_up.contiguous(), torch.float32, False)
    launched_spans = []

    def launcher(grad, *args, **kwargs):
        launched_spans.append(module.span(grad))
        return launch(grad, *args, **kwargs)

    launch = module._upsample2x_backward_into
    monkeypatch.setattr(module, "_upsample2x_backward_into", launcher)
    monkeypatch.setattr(module, "INT32_MAX", 300)
    assert torch.equal(ops.upsample2x_bilinear_backward(grad_up, torch.float32, False), expected)
    assert launched_spans == [287]  # the kernel read a dense copy
    monkeypatch.setattr(module, "INT32_MAX", 200)  # 288 elements a sample
    with pytest.raises(ValueError, match=r"^upsample2x_bilinear_backward: grad_up has 288 elements per sample"):
        ops.upsample2x_bilinear_backward(grad_up, torch.float32, False)


def test_opcheck():
    """The fake implementations against the real ops (shapes, dtypes, strides), autograd registration."""
    for layout, with_bias in (("nchw", True), ("mixed", False)):
        h, skip, h_bias, _ = _inputs((2, 3, 5, 2, 3), torch.float32, torch.float32, layout, 37)
        torch.library.opcheck(torch.ops.dream_kernels.upsample2x_concat.default,
                              (h.requires_grad_(), skip.requires_grad_(),
                               h_bias.requires_grad_() if with_bias else None))
    grad_up = torch.randn(2, 5, 4, 6, device=DEVICE)
    torch.library.opcheck(torch.ops.dream_kernels.upsample2x_bilinear_backward.default,
                          (grad_up, torch.float16, True))


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    h, skip, h_bias, dout = _inputs((2, 4, 6, 3, 4), torch.float32, torch.float32, "channels_last", 41)

    def block(h, skip, h_bias):
        return upsample2x_concat(h * 2.0, skip, h_bias) * 1.5

    leaves = [t.detach().requires_grad_() for t in (h, skip, h_bias)]
    compiled = torch.compile(block, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    out = compiled(*leaves)
    out.backward(dout)
    ref_leaves = [t.detach().double().requires_grad_() for t in (h, skip, h_bias)]
    ref = upsample2x_concat_reference(ref_leaves[0] * 2.0, ref_leaves[1], ref_leaves[2]) * 1.5
    ref.backward(dout.double())
    assert_close("out", out.detach(), ref.detach(), TOLERANCE[torch.float32])
    for name, leaf, ref_leaf in zip(("dh", "dskip", "dh_bias"), leaves, ref_leaves):
        assert_close(name, leaf.grad, ref_leaf.grad, TOLERANCE[torch.float32])


def test_fake_tensor_mode_shapes_and_layouts():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        h = torch.empty(128, 512, 16, 16, dtype=torch.bfloat16, device=DEVICE).to(memory_format=torch.channels_last)
        skip = torch.empty(128, 512, 8, 8, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
        out = upsample2x_concat(h, skip.to(memory_format=torch.channels_last))
        assert out.shape == (128, 1024, 16, 16) and out.dtype == torch.bfloat16
        assert out.is_contiguous(memory_format=torch.channels_last)
        out.sum().backward()
        assert skip.grad.shape == skip.shape


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


@pytest.mark.parametrize("h,skip,error,match", [
    (_t(1, 2, 4, 4), _t(1, 3, 2, 3), ValueError, r"skip's size \(2, 3\) must be half of h's \(4, 4\)"),
    (_t(1, 2, 4, 4), _t(1, 3, 4, 4), ValueError, "exact 2× upsampling"),
    (_t(2, 2, 4, 4), _t(1, 3, 2, 2), ValueError, "same batch"),
    (_t(2, 4, 4), _t(1, 3, 2, 2), ValueError, "h must be 4-D"),
    (_t(1, 2, 4, 4), _t(1, 0, 2, 2), ValueError, "skip must be non-empty"),
    (_t(1, 2, 4, 4, dtype=torch.float64), _t(1, 3, 2, 2), TypeError, "h must be float32, float16 or bfloat16"),
    (_t(1, 2, 4, 4), torch.ones(1, 3, 2, 2, dtype=torch.int64, device=DEVICE), TypeError, "skip must be float32"),
    ([[1.0]], _t(1, 3, 2, 2), TypeError, "h must be a torch.Tensor"),
])
def test_bad_inputs_raise_clear_errors(h, skip, error, match):
    with pytest.raises(error, match=match):
        upsample2x_concat(h, skip)


@pytest.mark.parametrize("h_bias,error,match", [
    (_t(3), ValueError, r"h_bias must have shape \(2,\) for h of shape \(1, 2, 4, 4\), got \(3,\)"),
    (_t(2, dtype=torch.float64), TypeError, "h_bias must be float32, float16 or bfloat16, got torch.float64"),
    ([0.0, 1.0], TypeError, "h_bias must be a torch.Tensor or None, got list"),
])
def test_bad_bias_raises_clear_errors(h_bias, error, match):
    with pytest.raises(error, match=match):
        upsample2x_concat(_t(1, 2, 4, 4), _t(1, 3, 2, 2), h_bias)


@pytest.mark.skipif(not ON_GPU, reason="needs a second device type")
def test_mixed_devices_raise():
    with pytest.raises(ValueError, match="skip is on cpu"):
        upsample2x_concat(_t(1, 2, 4, 4), _t(1, 3, 2, 2).cpu())


def test_cpu_tensors_without_interpreter_raise():
    """No silent eager fallback: CPU tensors without TRITON_INTERPRET=1 are a one-line error, for this op
    and for add_bias_residual (which shares the check)."""
    code = (
        "import torch\n"
        "from kernels import add_bias_residual, upsample2x_concat\n"
        "x = torch.randn(1, 2, 4, 4)\n"
        "for call in (lambda: upsample2x_concat(x, torch.randn(1, 3, 2, 2)),\n"
        "             lambda: add_bias_residual(x, x, x[0, :, 0, 0])):\n"
        "    try:\n"
        "        call()\n"
        "    except RuntimeError as e:\n"
        "        print('RAISED', e)\n"
    )
    result = run_without_interpreter(code)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RAISED")]
    assert len(lines) == 2, result.stdout + result.stderr
    assert "upsample2x_concat: got CPU tensors" in lines[0] and "add_bias_residual: got CPU tensors" in lines[1]
    assert all("TRITON_INTERPRET=1" in line for line in lines)
