"""kernels.add_bias_residual (a + b + bias[c] in one pass) against float64 eager PyTorch.

Error metric: max|actual − expected| / max|expected| over the whole tensor, expected in float64 from
the same (rounded) inputs and output gradient.

| dtype           | out    | da, db | dbias | why                                                        |
| --------------- | ------ | ------ | ----- | ---------------------------------------------------------- |
| float32         | 1e-6   | exact  | 1e-5  | fp32 sum of 3 terms; dbias an fp32 sum over N·H·W terms    |
| float16         | 1e-3   | exact  | 1e-5  | one rounding of the output to fp16 (unit roundoff 4.9e-4)  |
| bfloat16 (GPU)  | 8e-3   | exact  | 1e-5  | one rounding to bf16 (unit roundoff 3.9e-3)                |

da and db are dout itself (cast to a's and b's dtypes). bf16 runs only with CUDA: the Triton interpreter
rounds fp32 → bf16 by truncation.
"""
import zlib

import pytest
import torch

from conftest import DEVICE, ON_GPU, NanEmptyTorch, RecordOps, assert_close

import kernels.bias_residual as bias_residual_module  # noqa: E402  (conftest sets TRITON_INTERPRET first)
from kernels.bias_residual import (  # noqa: E402
    _add_bias_residual_into,
    add_bias_residual,
    add_bias_residual_reference,
)

TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
BIAS_GRAD_TOLERANCE = 1e-5

_needs_cuda = pytest.mark.skipif(not ON_GPU, reason="bf16 needs CUDA (the interpreter truncates fp32 → bf16)")
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=_needs_cuda)]

# (N, C, H, W): odd images, 1×1, batch 1 and 3, channel counts that are not powers of two, and tiles with
# tails (300 channels: two column tiles in channels_last; 20×20 = 400 positions: two in NCHW)
CPU_SHAPES = [(1, 3, 7, 5), (3, 96, 1, 1), (2, 5, 4, 9), (1, 300, 3, 3), (2, 7, 20, 20), (2, 2, 3, 3)]
GPU_SHAPES = [(128, 128, 64, 64), (128, 512, 8, 8), (5, 96, 13, 21)]
SHAPES = CPU_SHAPES + (GPU_SHAPES if ON_GPU else [])
LAYOUTS = {  # (a, b) memory formats
    "nchw": (torch.contiguous_format, torch.contiguous_format),
    "channels_last": (torch.channels_last, torch.channels_last),
    "mixed": (torch.channels_last, torch.contiguous_format),
    "mixed_b_channels_last": (torch.contiguous_format, torch.channels_last),  # b copied to a's NCHW
}


def _inputs(shape, a_dtype, b_dtype, bias_dtype, layout, seed):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    a_format, b_format = LAYOUTS[layout]
    a = torch.randn(shape, generator=gen, device=DEVICE).to(a_dtype, memory_format=a_format)
    b = (torch.randn(shape, generator=gen, device=DEVICE) * 2 - 0.3).to(b_dtype, memory_format=b_format)
    bias = (torch.randn(shape[1], generator=gen, device=DEVICE) * 0.7 + 0.2).to(bias_dtype)
    dout = torch.randn(shape, generator=gen, device=DEVICE).to(torch.promote_types(a_dtype, b_dtype))
    return a, b, bias, dout


def _run(fn, inputs, dout, cast=lambda t: t.detach().clone()):
    leaves = [cast(t).requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias_dtype", ["fp32", "same"])
def test_forward_and_gradients_match_float64(monkeypatch, shape, layout, dtype, bias_dtype):
    poisoned = NanEmptyTorch()  # the op's output starts as NaN: the default tiling must write every element
    monkeypatch.setattr(bias_residual_module, "torch", poisoned)
    bias_dtype = torch.float32 if bias_dtype == "fp32" else dtype
    a, b, bias, dout = _inputs(shape, dtype, dtype, bias_dtype, layout,
                               zlib.crc32(repr((shape, layout, dtype, bias_dtype)).encode()))
    out, (da, db, dbias) = _run(add_bias_residual, (a, b, bias), dout)
    ref_out, (_, _, ref_dbias) = _run(add_bias_residual_reference, (a, b, bias), dout.double(),
                                      cast=lambda t: t.detach().double())
    assert poisoned.allocated and out.dtype == dtype and out.is_contiguous(memory_format=LAYOUTS[layout][0])
    assert_close("out", out, ref_out, TOLERANCE[dtype])
    assert da.dtype == db.dtype == dtype and torch.equal(da, dout) and torch.equal(db, dout)
    assert dbias.dtype == bias_dtype
    assert_close("dbias", dbias, ref_dbias, BIAS_GRAD_TOLERANCE if bias_dtype == torch.float32 else TOLERANCE[dtype])


def test_mixed_dtypes_promote():
    """fp16 + fp32: out in fp32, each gradient in its input's dtype (dbias an fp32 sum rounded once to fp16)."""
    a, b, bias, dout = _inputs((2, 6, 3, 5), torch.float16, torch.float32, torch.float16, "nchw", 3)
    out, (da, db, dbias) = _run(add_bias_residual, (a, b, bias), dout)
    ref_out, (_, _, ref_dbias) = _run(add_bias_residual_reference, (a, b, bias), dout.double(),
                                      cast=lambda t: t.detach().double())
    assert out.dtype == torch.float32 and (da.dtype, db.dtype, dbias.dtype) == (torch.float16, torch.float32,
                                                                                torch.float16)
    assert_close("out", out, ref_out, TOLERANCE[torch.float32])
    assert torch.equal(da, dout.half()) and torch.equal(db, dout)
    assert_close("dbias", dbias, ref_dbias, TOLERANCE[torch.float16])


# (BLOCK_ROWS, BLOCK_COLS, num_warps) forced onto the launcher: several tiles with tails along both axes
FORCED_BLOCKS = [None, (2, 4, 1), (8, 2, 2)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocks", FORCED_BLOCKS, ids=lambda b: "heuristic" if b is None else "x".join(map(str, b)))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_launcher_writes_every_element(layout, blocks, dtype):
    """out starts as NaN: every element must be written and correct."""
    shape = (3, 5, 3, 7)
    a, b, bias, _ = _inputs(shape, dtype, dtype, torch.float32, layout, 19)
    out = torch.full(shape, float("nan"), device=DEVICE, dtype=dtype).contiguous(memory_format=LAYOUTS[layout][0])
    _add_bias_residual_into(a, b, bias, out, blocks)
    expected = add_bias_residual_reference(a.double(), b.double(), bias.double())
    assert_close("out", out, expected, TOLERANCE[dtype])


@pytest.mark.parametrize("shape,layout", [((1, 1, 1, 1), "nchw"), ((2, 2, 3, 3), "nchw"),
                                          ((2, 3, 1, 2), "channels_last"), (CPU_SHAPES[0], "channels_last")],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_heuristic_launches_whole_warps_within_the_tile(monkeypatch, shape, layout):
    """The heuristic's launch has 1 to 8 warps (a power of two) and a tile of at most _TILE elements, also for a
    tensor smaller than a warp's share of a tile: the interpreter ignores num_warps, a GPU refuses 0."""
    launches = []
    launch = bias_residual_module.autotune.launch

    def recording_launch(kernel, grid):
        run = launch(kernel, grid)

        def call(*args, **kwargs):
            launches.append(kwargs)
            return run(*args, **kwargs)
        return call

    monkeypatch.setattr(bias_residual_module.autotune, "launch", recording_launch)
    a, b, bias, _ = _inputs(shape, torch.float32, torch.float32, torch.float32, layout, 47)
    out = add_bias_residual(a, b, bias)
    assert_close("out", out, add_bias_residual_reference(a.double(), b.double(), bias.double()),
                 TOLERANCE[torch.float32])
    (kwargs,) = launches
    warps = kwargs["num_warps"]
    assert 1 <= warps <= 8 and warps & (warps - 1) == 0, kwargs
    assert kwargs["BLOCK_ROWS"] * kwargs["BLOCK_COLS"] <= bias_residual_module._TILE, kwargs


@pytest.mark.skipif(not ON_GPU, reason="CUDA's grid limits; 65552 programs are too many for the interpreter")
def test_a_plane_of_more_tiles_than_a_grid_axis_holds():
    """NCHW, one plane of 4097 × 4096 positions: 65552 column tiles of 256, more than the 65535 blocks CUDA allows
    along a grid's second axis (the grid is 1-D)."""
    shape = (1, 1, 4097, 4096)
    a, b, bias, _ = _inputs(shape, torch.float16, torch.float16, torch.float32, "nchw", 29)
    out = torch.full(shape, float("nan"), device=DEVICE, dtype=torch.float16)
    _add_bias_residual_into(a, b, bias, out)
    expected = add_bias_residual_reference(a.double(), b.double(), bias.double())
    assert_close("out", out, expected, TOLERANCE[torch.float16])


def test_strided_inputs_are_made_dense():
    """A view (every other channel) and an expanded tensor work, as torch's a + b + bias would."""
    gen = torch.Generator(device=DEVICE).manual_seed(23)
    a = torch.randn(2, 10, 4, 5, generator=gen, device=DEVICE)[:, ::2]
    b = torch.randn(1, 5, 4, 5, generator=gen, device=DEVICE).expand(2, 5, 4, 5)
    bias = torch.randn(10, generator=gen, device=DEVICE)[::2]
    expected = add_bias_residual_reference(a.double(), b.double(), bias.double())
    assert_close("out", add_bias_residual(a, b, bias), expected, TOLERANCE[torch.float32])


def test_a_frozen_bias_costs_no_gradient_pass():
    """Without bias.requires_grad, backward does not sum dout for a gradient nobody asked for."""
    a, b, bias, dout = _inputs((2, 3, 4, 5), torch.float32, torch.float32, torch.float32, "nchw", 41)
    a, b = a.requires_grad_(), b.requires_grad_()
    out = add_bias_residual(a, b, bias)
    with RecordOps() as record:
        out.backward(dout)
    assert torch.equal(a.grad, dout) and torch.equal(b.grad, dout) and bias.grad is None
    assert not [func for func, _ in record.calls if func.overloadpacket is torch.ops.aten.sum], record.calls


def test_opcheck():
    """The fake implementation against the real op (shapes, dtypes, strides), autograd registration."""
    for layout in ("nchw", "mixed"):
        a, b, bias, _ = _inputs((2, 3, 4, 5), torch.float32, torch.float32, torch.float32, layout, 31)
        torch.library.opcheck(torch.ops.dream_kernels.add_bias_residual.default,
                              (a.requires_grad_(), b.requires_grad_(), bias.requires_grad_()))


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    a, b, bias, dout = _inputs((2, 6, 3, 4), torch.float32, torch.float32, torch.float32, "channels_last", 37)

    def block(a, b, bias):
        return add_bias_residual(a * 2.0, b, bias) * 1.5

    compiled = torch.compile(block, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    out, grads = _run(compiled, (a, b, bias), dout)
    ref_out, ref_grads = _run(lambda a, b, bias: add_bias_residual_reference(a * 2.0, b, bias) * 1.5, (a, b, bias),
                              dout.double(), cast=lambda t: t.detach().double())
    assert_close("out", out, ref_out, TOLERANCE[torch.float32])
    for name, grad, ref in zip(("da", "db", "dbias"), grads, ref_grads):
        assert_close(name, grad, ref, BIAS_GRAD_TOLERANCE)


def test_fake_tensor_mode_shapes_and_layouts():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a = torch.empty(128, 128, 64, 64, dtype=torch.bfloat16, device=DEVICE).to(memory_format=torch.channels_last)
        bias = torch.empty(128, device=DEVICE, requires_grad=True)
        out = add_bias_residual(a, a, bias)
        assert out.shape == a.shape and out.dtype == torch.bfloat16
        assert out.is_contiguous(memory_format=torch.channels_last)
        out.float().sum().backward()
        assert bias.grad.shape == (128,) and bias.grad.dtype == torch.float32


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


@pytest.mark.parametrize("a,b,bias,error,match", [
    (_t(1, 2, 3, 3), _t(1, 2, 3, 4), _t(2), ValueError, r"b must have a's shape \(1, 2, 3, 3\), got \(1, 2, 3, 4\)"),
    (_t(1, 2, 3, 3), _t(1, 2, 3, 3), _t(3), ValueError, r"bias must have shape \(2,\) for a of shape"),
    (_t(2, 3, 3), _t(2, 3, 3), _t(2), ValueError, "a must be 4-D"),
    (_t(1, 0, 3, 3), _t(1, 0, 3, 3), _t(0), ValueError, "a must be non-empty"),
    (_t(1, 2, 3, 3, dtype=torch.float64), _t(1, 2, 3, 3), _t(2), TypeError, "a must be float32, float16 or bfloat16"),
    (_t(1, 2, 3, 3), _t(1, 2, 3, 3), torch.ones(2, dtype=torch.int64, device=DEVICE), TypeError, "bias must be float"),
    (_t(1, 2, 3, 3), 1.0, _t(2), TypeError, "b must be a torch.Tensor, got float"),
])
def test_bad_inputs_raise_clear_errors(a, b, bias, error, match):
    with pytest.raises(error, match=match):
        add_bias_residual(a, b, bias)


@pytest.mark.skipif(not ON_GPU, reason="needs a second device type")
def test_mixed_devices_raise():
    with pytest.raises(ValueError, match="b is on cpu"):
        add_bias_residual(_t(1, 2, 3, 3), _t(1, 2, 3, 3).cpu(), _t(2))
