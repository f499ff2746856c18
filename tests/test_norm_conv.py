"""kernels.group_norm_silu_conv2d: the fused norm, then a convolution, with the norm's output recomputed in
backward instead of saved.

Forward and the gradients of all seven inputs (x, gamma, beta, s, t, conv weight and bias) against a
float64 reference (group_norm_silu_conv2d_reference: the eager norm and F.conv2d), on fresh random
inputs, odd shapes (12 channels in 3 groups, 7x5 images, batch 1 and 3, 3x3 / 1x1 / strided / dilated /
grouped convolutions), both layouts, both modes with scale and shift, with dropout, and half x beside an fp32
convolution. Error metric and tolerances as in test_group_norm_silu.py: max|actual - expected| /
max|expected|, fp32 1e-5, fp16 2e-3, bf16 1.6e-2 (bf16 on a GPU only: the interpreter mishandles bf16).
Against the separate ops (group_norm_silu, then F.conv2d) everything is bitwise equal: the recomputed
norm output is the forward's, dropout mask included; and the saved tensors are exactly the norm's
output smaller.
"""
import importlib
import zlib

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, ON_GPU, RecordOps, assert_fake_matches_real

from kernels import group_norm_silu, group_norm_silu_conv2d, group_norm_silu_conv2d_reference  # noqa: E402

gns = importlib.import_module("kernels.group_norm_silu")
pytestmark = pytest.mark.usefixtures("exact_fp32")  # fp32 convolutions on a GPU without TF32 (1e-5 tolerance)

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
_needs_cuda = pytest.mark.skipif(not ON_GPU, reason="bf16 needs CUDA (the interpreter mishandles bf16)")
# fp16 runs on CPU too: the interpreter's fp16 is sound and PyTorch's CPU convolution takes fp16
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=_needs_cuda)]

# (N, C, H, W, groups, C_out, kernel, stride, padding)
SHAPES = [
    (3, 12, 7, 5, 3, 5, 3, 1, 1),
    (1, 24, 6, 6, 8, 7, 1, 1, 0),  # 3 channels per group; a 1x1 convolution (the attention block's qkv)
    (2, 8, 5, 3, 2, 6, 3, 2, 1),  # strided
]


@pytest.fixture(autouse=True)
def _poison_new_buffers(monkeypatch):
    monkeypatch.setattr(gns, "_POISON_NEW_BUFFERS", True)


def _rel_err(actual, expected):
    assert torch.isfinite(actual).all(), "non-finite values (an element left unwritten?)"
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def _inputs(shape, dtype, channels_last, has_scale_shift, conv_bias, seed):
    N, C, H, W, _, C_out, kernel, _, _ = shape
    gen = torch.Generator().manual_seed(seed)

    def randn(*size, std=1.0, mean=0.0):
        return (torch.randn(*size, generator=gen, dtype=torch.float64) * std + mean).to(DEVICE)

    x = randn(N, C, H, W, std=1.5, mean=0.4).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    leaves = dict(x=x, weight=randn(C, std=0.5, mean=1.0).float(), bias=randn(C, std=0.4).float(),
                  scale=randn(N, C, std=0.4).to(dtype) if has_scale_shift else None,
                  shift=randn(N, C, std=0.5).to(dtype) if has_scale_shift else None,
                  conv_weight=randn(C_out, C, kernel, kernel, std=(C * kernel * kernel) ** -0.5).to(dtype),
                  conv_bias=randn(C_out, std=0.3).to(dtype) if conv_bias else None)
    H_out = (H + 2 * shape[8] - kernel) // shape[7] + 1
    W_out = (W + 2 * shape[8] - kernel) // shape[7] + 1
    dout = randn(N, C_out, H_out, W_out).to(dtype)
    return leaves, dout


def _call(fn, leaves, shape, mode, silu, dropout_p, seed):
    _, _, _, _, groups, _, _, stride, padding = shape
    return fn(leaves["x"], leaves["weight"], leaves["bias"], groups, leaves["conv_weight"], leaves["conv_bias"],
              stride=stride, padding=padding, scale=leaves["scale"], shift=leaves["shift"], mode=mode, silu=silu,
              dropout_p=dropout_p, seed=seed)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("variant", [
    dict(mode="pre", silu=True, scale_shift=True, conv_bias=True, dropout_p=0.0),
    dict(mode="pre", silu=True, scale_shift=True, conv_bias=False, dropout_p=0.3),
    dict(mode="post", silu=False, scale_shift=False, conv_bias=True, dropout_p=0.0),
    dict(mode="post", silu=True, scale_shift=True, conv_bias=True, dropout_p=0.0),  # ds, dt of the post mode
], ids=["pre-ss-bias", "pre-ss-dropout", "post-plain-norm", "post-ss-bias"])
def test_matches_float64(shape, dtype, channels_last, variant):
    test_seed = zlib.crc32(repr((shape, dtype, channels_last, variant)).encode())
    leaves, dout = _inputs(shape, dtype, channels_last, variant["scale_shift"], variant["conv_bias"], test_seed)
    seed = torch.tensor([test_seed * 7919 + 1], device=DEVICE) if variant["dropout_p"] else None
    names = [name for name, leaf in leaves.items() if leaf is not None]
    for name in names:
        leaves[name].requires_grad_()
    args = (shape, variant["mode"], variant["silu"], variant["dropout_p"], seed)
    out = _call(group_norm_silu_conv2d, leaves, *args)
    grads = torch.autograd.grad(out, [leaves[name] for name in names], dout)

    leaves64 = {name: leaf.detach().double().requires_grad_() if leaf is not None else None
                for name, leaf in leaves.items()}
    out64 = _call(group_norm_silu_conv2d_reference, leaves64, *args)
    grads64 = torch.autograd.grad(out64, [leaves64[name] for name in names], dout.double())

    assert out.dtype == dtype
    _assert_matches_float64(out, out64, dict(zip(names, grads)), dict(zip(names, grads64)), leaves, TOLERANCE[dtype])


def _assert_matches_float64(out, out64, grads, grads64, leaves, tol):
    """out and each gradient (named as its leaf; in the leaf's dtype and shape) within `tol` of float64."""
    assert out.shape == out64.shape
    errors = {"out": _rel_err(out, out64)}
    for name, grad in grads.items():
        assert grad.dtype == leaves[name].dtype and grad.shape == leaves[name].shape, name
        errors["d" + name] = _rel_err(grad, grads64[name])
    failed = {name: err for name, err in errors.items() if not err <= tol}
    assert not failed, f"errors above tolerance {tol}: {failed} (all: {errors})"


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("mode", ["pre", "post"])
def test_dilated_grouped_convolution_and_fp32_weights_beside_half_x(x_dtype, mode):
    """dilation 2 and 2 convolution groups (passed through to the convolution and its backward), with an fp32
    convolution beside x in x_dtype: y is cast up for the convolution and dy back down for the norm's
    backward; every gradient comes back in its input's dtype."""
    shape = (1, 12, 7, 5, 3, 4, 3, 1, 2)  # a 3x3 kernel dilated by 2, padding 2: a 7x5 output
    test_seed = zlib.crc32(repr((x_dtype, mode)).encode())
    leaves, _ = _inputs(shape, x_dtype, False, True, True, test_seed)
    gen = torch.Generator().manual_seed(test_seed)

    def randn(*size, std=1.0):
        return (torch.randn(*size, generator=gen, dtype=torch.float64) * std).to(DEVICE, torch.float32)

    leaves["conv_weight"] = randn(4, 6, 3, 3, std=54 ** -0.5)  # 6 input channels a convolution group
    leaves["conv_bias"] = randn(4, std=0.3)
    dout = randn(1, 4, 7, 5)
    names = list(leaves)
    for leaf in leaves.values():
        leaf.requires_grad_()

    def call(fn, leaves):
        return fn(leaves["x"], leaves["weight"], leaves["bias"], 3, leaves["conv_weight"], leaves["conv_bias"],
                  padding=2, dilation=2, groups=2, scale=leaves["scale"], shift=leaves["shift"], mode=mode)

    out = call(group_norm_silu_conv2d, leaves)
    grads = torch.autograd.grad(out, list(leaves.values()), dout)
    leaves64 = {name: leaf.detach().double().requires_grad_() for name, leaf in leaves.items()}
    out64 = call(group_norm_silu_conv2d_reference, leaves64)
    grads64 = torch.autograd.grad(out64, list(leaves64.values()), dout.double())
    assert out.dtype == torch.float32 and out.shape == (1, 4, 7, 5)
    _assert_matches_float64(out, out64, dict(zip(names, grads)), dict(zip(names, grads64)), leaves,
                            TOLERANCE[x_dtype])


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("mode", ["pre", "post"])
def test_rectangular_convolution_per_axis_arguments_and_eps(mode, channels_last):
    """A 3x2 kernel with stride (2, 1), padding (1, 0) and dilation (1, 2) (each axis its own value, passed
    through to the convolution and its backward), and eps = 0.3 (about these groups' variance: a norm that
    kept 1e-5, forward or in backward's recomputation, fails by ~10%)."""
    shape = (3, 12, 7, 5, 3, 5, 3, 1, 1)
    test_seed = zlib.crc32(repr(("rectangular", mode, channels_last)).encode())
    leaves, _ = _inputs(shape, torch.float32, channels_last, True, True, test_seed)
    gen = torch.Generator().manual_seed(test_seed)
    leaves["conv_weight"] = (torch.randn(5, 12, 3, 2, generator=gen, dtype=torch.float64) * 72 ** -0.5).to(
        DEVICE, torch.float32)
    dout = torch.randn(3, 5, 4, 3, generator=gen, dtype=torch.float64).to(DEVICE, torch.float32)
    names = list(leaves)
    for leaf in leaves.values():
        leaf.requires_grad_()

    def call(fn, leaves):
        return fn(leaves["x"], leaves["weight"], leaves["bias"], 3, leaves["conv_weight"], leaves["conv_bias"],
                  stride=(2, 1), padding=(1, 0), dilation=(1, 2), eps=0.3, scale=leaves["scale"],
                  shift=leaves["shift"], mode=mode)

    out = call(group_norm_silu_conv2d, leaves)
    grads = torch.autograd.grad(out, list(leaves.values()), dout)
    leaves64 = {name: leaf.detach().double().requires_grad_() for name, leaf in leaves.items()}
    out64 = call(group_norm_silu_conv2d_reference, leaves64)
    grads64 = torch.autograd.grad(out64, list(leaves64.values()), dout.double())
    assert out.shape == (3, 5, 4, 3)  # rows (7 + 2 - 3) // 2 + 1, columns 5 - (2 * (2 - 1) + 1) + 1
    _assert_matches_float64(out, out64, dict(zip(names, grads)), dict(zip(names, grads64)), leaves,
                            TOLERANCE[torch.float32])


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd saves while fn() runs."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    return result, sum(storages.values())


@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no_dropout", "dropout"])
def test_equals_the_separate_ops_and_saves_one_activation_less(dropout_p):
    shape = (2, 12, 6, 5, 3, 8, 3, 1, 1)
    leaves, dout = _inputs(shape, torch.float32, True, True, True, 17)
    names = list(leaves)
    for leaf in leaves.values():
        leaf.requires_grad_()
    seed = torch.tensor([987654321], device=DEVICE) if dropout_p else None

    def separate(x, weight, bias, groups, conv_weight, conv_bias, stride, padding, **norm):
        y = group_norm_silu(x, weight, bias, groups, **norm)
        return F.conv2d(y, conv_weight, conv_bias, stride, padding)

    fused, fused_bytes = _saved_bytes(lambda: _call(group_norm_silu_conv2d, leaves, shape, "pre", True, dropout_p,
                                                    seed))
    plain, plain_bytes = _saved_bytes(lambda: _call(separate, leaves, shape, "pre", True, dropout_p, seed))
    assert torch.equal(fused, plain)
    for name, grad, expected in zip(names, torch.autograd.grad(fused, list(leaves.values()), dout),
                                    torch.autograd.grad(plain, list(leaves.values()), dout)):
        assert torch.equal(grad, expected), name
    norm_output_bytes = leaves["x"].numel() * leaves["x"].element_size()
    assert fused_bytes == plain_bytes - norm_output_bytes


def test_autocast_casts_the_convolution_as_f_conv2d_does():
    """Under autocast the convolution runs in the autocast dtype and its weight gradients come back in
    fp32, exactly as for F.conv2d; the norm (fp32 x here: the interpreter has no bf16) stays fp32."""
    shape = (2, 12, 5, 4, 3, 6, 3, 1, 1)
    leaves, _ = _inputs(shape, torch.float32, False, True, True, 29)
    for leaf in leaves.values():
        leaf.requires_grad_()
    dtype = torch.bfloat16 if DEVICE == "cpu" else torch.float16

    def separate(x, weight, bias, groups, conv_weight, conv_bias, stride, padding, **norm):
        return F.conv2d(group_norm_silu(x, weight, bias, groups, **norm), conv_weight, conv_bias, stride, padding)

    with torch.autocast(DEVICE, dtype=dtype):
        fused = _call(group_norm_silu_conv2d, leaves, shape, "pre", True, 0.0, None)
        plain = _call(separate, leaves, shape, "pre", True, 0.0, None)
    assert fused.dtype == plain.dtype == dtype and torch.equal(fused, plain)
    dout = torch.randn(fused.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    for name, grad, expected in zip(leaves, torch.autograd.grad(fused, list(leaves.values()), dout),
                                    torch.autograd.grad(plain, list(leaves.values()), dout)):
        assert grad.dtype == leaves[name].dtype and torch.equal(grad, expected), name


def test_backward_computes_only_the_gradients_asked_for():
    """A frozen convolution (weight and bias without requires_grad) costs no weight gradient, and frozen norm
    inputs no norm backward; the gradients that are asked for stay those of the reference."""
    shape = SHAPES[0]
    leaves, dout = _inputs(shape, torch.float32, False, True, True, 23)
    _, _, _, _, groups, _, _, stride, padding = shape
    for frozen in (("conv_weight", "conv_bias"), ("x", "weight", "bias", "scale", "shift")):
        inputs = {name: leaf.detach().requires_grad_(name not in frozen) for name, leaf in leaves.items()}
        out = group_norm_silu_conv2d(inputs["x"], inputs["weight"], inputs["bias"], groups, inputs["conv_weight"],
                                     inputs["conv_bias"], stride, padding, scale=inputs["scale"],
                                     shift=inputs["shift"])
        with RecordOps() as record:
            out.backward(dout)
        masks = [args[-1] for func, args in record.calls if func is torch.ops.aten.convolution_backward.default]
        norm_backward = torch.ops.dream_kernels.group_norm_silu_bwd.default
        norm_backwards = [func for func, _ in record.calls if func is norm_backward]
        assert masks == ([[True, False, False]] if "conv_weight" in frozen else [[False, True, True]]), masks
        assert len(norm_backwards) == (0 if "x" in frozen else 1)
        reference = {name: leaf.detach().double().requires_grad_(name not in frozen) for name, leaf in leaves.items()}
        group_norm_silu_conv2d_reference(reference["x"], reference["weight"], reference["bias"], groups,
                                         reference["conv_weight"], reference["conv_bias"], stride, padding,
                                         scale=reference["scale"], shift=reference["shift"]).backward(dout.double())
        for name, leaf in inputs.items():
            assert (leaf.grad is None) == (name in frozen), name
            if leaf.grad is not None:
                assert _rel_err(leaf.grad, reference[name].grad) <= TOLERANCE[torch.float32], name


@pytest.mark.parametrize("trained", ["weight", "scale", "shift", "conv_bias"])
def test_a_single_trainable_input_gets_its_gradient(trained):
    """Each input's gradient on its own: with only the norm's gamma (or s, or t) requiring grad the norm backward
    still runs (x frozen), and with only the convolution's bias the bias gradient is still computed (conv_weight
    frozen); it matches the reference."""
    shape = SHAPES[0]
    leaves, dout = _inputs(shape, torch.float32, False, True, True, 31)
    inputs = {name: leaf.detach().requires_grad_(name == trained) for name, leaf in leaves.items()}
    out = _call(group_norm_silu_conv2d, inputs, shape, "pre", True, 0.0, None)
    (grad,) = torch.autograd.grad(out, [inputs[trained]], dout)
    reference = {name: leaf.detach().double().requires_grad_(name == trained) for name, leaf in leaves.items()}
    out64 = _call(group_norm_silu_conv2d_reference, reference, shape, "pre", True, 0.0, None)
    (grad64,) = torch.autograd.grad(out64, [reference[trained]], dout.double())
    assert _rel_err(grad, grad64) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["no_dropout", "dropout"])
def test_opcheck(dropout_p):
    """The fake implementation against the real op (shapes, dtypes, strides), autograd registration."""
    shape = (2, 8, 4, 3, 2, 6, 3, 1, 1)
    leaves, _ = _inputs(shape, torch.float32, True, True, True, 41)
    for leaf in leaves.values():
        leaf.requires_grad_()
    seed = torch.tensor([24680], device=DEVICE) if dropout_p else None
    args = (leaves["x"], leaves["weight"], leaves["bias"], leaves["scale"], leaves["shift"], 2, 1e-5, "pre", True,
            dropout_p, seed, leaves["conv_weight"], leaves["conv_bias"], [1, 1], [1, 1], [1, 1], 1)
    torch.library.opcheck(torch.ops.dream_kernels.group_norm_silu_conv2d.default, args)


@pytest.mark.parametrize("layout", ["channels_last", "transposed_hw"])
def test_fake_outputs_have_the_real_outputs_shapes_dtypes_and_strides(layout):
    """The op's fake gives (out, mean, rstd) the shape, dtype and strides of the real op's (a compiled graph lays
    out what follows by them): mean and rstd fp32 of shape (N, num_groups) beside fp16 x (N != num_groups), out
    laid out as the convolution lays out the norm's output, which is in x's memory format (channels_last), or
    NCHW for x dense in neither layout (H and W transposed)."""
    leaves, _ = _inputs((3, 8, 5, 4, 2, 6, 3, 1, 1), torch.float16, layout == "channels_last", True, True, 43)
    if layout == "transposed_hw":
        leaves["x"] = leaves["x"].transpose(2, 3).contiguous().transpose(2, 3)
    args = (leaves["x"], leaves["weight"], leaves["bias"], leaves["scale"], leaves["shift"], 2, 1e-5, "pre", True,
            0.0, None, leaves["conv_weight"], leaves["conv_bias"], [1, 1], [1, 1], [1, 1], 1)
    assert_fake_matches_real(torch.ops.dream_kernels.group_norm_silu_conv2d.default, *args)


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    shape = (2, 12, 4, 3, 3, 5, 3, 1, 1)
    leaves, dout = _inputs(shape, torch.float32, False, True, True, 53)
    for leaf in leaves.values():
        leaf.requires_grad_()
    seed = torch.tensor([13579], device=DEVICE)

    def block(leaves):
        return _call(group_norm_silu_conv2d, leaves, shape, "pre", True, 0.2, seed) * 2.0

    eager = block(leaves)
    eager_grads = torch.autograd.grad(eager, list(leaves.values()), dout)
    # as in test_group_norm_silu.py: Inductor on a GPU, the tracing alone (aot_eager) on CPU
    compiled = torch.compile(block, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    out = compiled(leaves)
    grads = torch.autograd.grad(out, list(leaves.values()), dout)
    assert _rel_err(out, eager) <= 1e-5
    for grad, eager_grad in zip(grads, eager_grads):
        assert _rel_err(grad, eager_grad) <= 1e-5


def test_torch_compile_dynamic_shapes_take_symbolic_int_arguments():
    """torch.compile(dynamic=True) traces num_groups, stride and padding as torch.SymInt: the checks accept them,
    and the results match the float64 reference at two shapes (no two sizes equal, so duck sizing ties none)."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda leaves, shape: _call(group_norm_silu_conv2d, leaves, shape, "pre", True, 0.0, None),
                             dynamic=True, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    for shape in ((2, 12, 7, 5, 3, 4, 3, 1, 1), (3, 20, 9, 6, 4, 5, 3, 2, 1)):
        leaves, dout = _inputs(shape, torch.float32, False, True, True, zlib.crc32(repr(shape).encode()))
        for leaf in leaves.values():
            leaf.requires_grad_()
        out = compiled(leaves, shape)
        grads = torch.autograd.grad(out, list(leaves.values()), dout)
        ref_leaves = {name: leaf.detach().double().requires_grad_() for name, leaf in leaves.items()}
        ref = _call(group_norm_silu_conv2d_reference, ref_leaves, shape, "pre", True, 0.0, None)
        ref_grads = torch.autograd.grad(ref, list(ref_leaves.values()), dout.double())
        assert _rel_err(out, ref) <= TOLERANCE[torch.float32]
        for name, grad, ref_grad in zip(leaves, grads, ref_grads):
            assert _rel_err(grad, ref_grad) <= TOLERANCE[torch.float32], name


@pytest.mark.parametrize("change,error,message", [
    (dict(conv_weight=torch.randn(5, 7, 3, 3)), ValueError, r"expects 7 input channels, x has 12"),
    (dict(conv_weight=torch.randn(5, 12, 3)), ValueError, r"conv_weight must be a 4-D tensor"),
    (dict(conv_bias=torch.randn(4)), ValueError, r"conv_bias must have shape \(5,\)"),
    (dict(conv_bias=torch.randn(5, dtype=torch.float64)), TypeError, r"conv_bias .* must match conv_weight"),
    (dict(stride=(1, 1, 1)), ValueError, r"stride must be two ints"),
    (dict(padding=-1), ValueError, r"padding >= 0"),
    (dict(stride=0), ValueError, r"stride and dilation must be >= 1 and padding >= 0, got stride=\[0, 0\]"),
    (dict(dilation=(1, 0)), ValueError, r"stride and dilation must be >= 1 and padding >= 0, got .*dilation=\[1, 0\]"),
    (dict(groups=5), ValueError, r"expects 60 input channels"),
    (dict(num_groups=5), ValueError, r"not divisible by num_groups=5"),
])
def test_clear_errors(change, error, message):
    gen = torch.Generator().manual_seed(0)
    args = dict(x=torch.randn(2, 12, 4, 4, generator=gen), weight=torch.rand(12, generator=gen) + 0.5,
                bias=torch.randn(12, generator=gen), num_groups=3, conv_weight=torch.randn(5, 12, 3, 3, generator=gen),
                conv_bias=torch.randn(5, generator=gen), stride=1, padding=1)
    args.update(change)
    args = {name: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for name, value in args.items()}
    with pytest.raises(error, match=message):
        group_norm_silu_conv2d(**args)


def test_a_convolution_bias_on_another_device_is_refused():
    """conv_bias on another device than x (a meta tensor here, on any machine) is a one-line error naming it,
    before anything runs."""
    x = torch.randn(2, 12, 4, 4, device=DEVICE)
    weight, bias = torch.ones(12, device=DEVICE), torch.zeros(12, device=DEVICE)
    conv_weight = torch.randn(5, 12, 3, 3, device=DEVICE)
    with pytest.raises(TypeError, match=r"^group_norm_silu_conv2d: conv_bias \(torch.float32 on meta\) must match "
                                        r"conv_weight"):
        group_norm_silu_conv2d(x, weight, bias, 3, conv_weight, torch.zeros(5, device="meta"), padding=1)


@pytest.mark.parametrize("device", [DEVICE, "meta"])
def test_the_public_op_checks_the_convolution_itself_also_on_meta_tensors(device):
    """torch.ops.dream_kernels.group_norm_silu_conv2d called without the wrapper refuses a convolution weight that
    does not fit x in a one-line ValueError naming the op, from the op and from its fake (meta tensors, tracing)."""
    x = torch.randn(2, 12, 4, 4, device=device)
    weight, bias = torch.ones(12, device=device), torch.zeros(12, device=device)
    conv_weight = torch.randn(5, 6, 3, 3, device=device)  # 6 input channels, x has 12
    with pytest.raises(ValueError, match=r"^group_norm_silu_conv2d: conv_weight \(5, 6, 3, 3\) with groups=1 "
                                         r"expects 6 input channels, x has 12$"):
        torch.ops.dream_kernels.group_norm_silu_conv2d(x, weight, bias, None, None, 3, 1e-5, "pre", True, 0.0, None,
                                                       conv_weight, None, [1, 1], [1, 1], [1, 1], 1)
