"""kernels.attention (flash-style Triton attention) against float64 softmax attention.

Error metric: max|actual − expected| / max|expected| over the whole tensor (absolute error
when the expected tensor is all zeros, e.g. dq and dk at N = 1), expected in float64
from the same (rounded) inputs.

| dtype            | O, dq, dk, dv | logits ×30 | why the ×30 column is wider                         |
| ---------------- | ------------- | ---------- | --------------------------------------------------- |
| float32          | 1e-5          | 5e-5       | fp32 logits of size ~100-200 carry ~1e-5 rounding,  |
|                  |               |            | and backward recomputes them (rounding differently  |
|                  |               |            | from the forward's logsumexp); peaked rows amplify  |
|                  |               |            | it in dq, dk. Measured (interpreter): up to 2.3e-5, |
|                  |               |            | as eager fp32 attention itself (2.3e-5): 1e-5 is    |
|                  |               |            | out of reach for any fp32 attention here            |
| float16          | 2e-3          | 2e-3       | logits and softmax stay fp32 (fp16 dots accumulate  |
|                  |               |            | in fp32); measured up to 1.5e-3 (eager fp16: ~5e-2) |
| bfloat16 (GPU)   | 1.6e-2        | 8e-2       | 8× the fp16 unit roundoff                           |

bf16 runs only with CUDA: the Triton interpreter computes bf16 dots wrongly.
"""
import importlib
import zlib

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import (DEVICE, ON_GPU, NanEmptyTorch, assert_fake_matches_real, qkv_attention_with_float64,
                      run_without_interpreter)

from kernels.attention import (  # noqa: E402  (conftest sets TRITON_INTERPRET first)
    BackwardConfig,
    ForwardConfig,
    _attention_backward_into,
    _attention_forward_into,
    attention,
    attention_qkv_nchw,
    attention_qkv_nchw_reference,
    attention_reference,
)

attention_module = importlib.import_module("kernels.attention")  # the package binds `attention` to the function
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LARGE_LOGIT_TOLERANCE = {torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 8e-2}

_needs_cuda = pytest.mark.skipif(not ON_GPU, reason="bf16 needs CUDA (the interpreter's bf16 dots are wrong)")
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=_needs_cuda),
]

# (B, H, N, D): every N in {1, 17, 64, 100, 256}, D in {32, 64}, B·H in {1, 3, 8}; D = 128
# for the remaining supported width. The GPU adds the model's sizes and long sequences.
CPU_SHAPES = [
    (1, 1, 1, 32),
    (3, 1, 1, 64),
    (1, 1, 17, 32),
    (1, 3, 17, 64),
    (2, 4, 17, 32),
    (1, 1, 64, 64),
    (3, 1, 64, 32),
    (1, 8, 64, 64),
    (1, 1, 100, 32),
    (3, 1, 100, 64),
    (2, 4, 100, 32),
    (1, 1, 256, 64),
    (1, 3, 256, 32),
    (1, 2, 64, 128),
    (1, 1, 100, 128),
    (2, 2, 16, 16),   # head dim 16: the tiny preset's 128 channels over 8 heads
    (1, 1, 100, 16),
]
GPU_SHAPES = [
    (8, 8, 256, 64),
    (8, 8, 64, 64),
    (2, 8, 256, 128),
    (1, 2, 1000, 64),
    (1, 1, 4096, 32),
]
SHAPES = CPU_SHAPES + (GPU_SHAPES if ON_GPU else [])


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    denom = expected.abs().max().item()
    err = (actual.double() - expected).abs().max().item()
    return err / denom if denom > 0 else err


def _randn(shape, dtype, generator, scale=1.0):
    return (torch.randn(shape, generator=generator, device=DEVICE) * scale).to(dtype)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _float64_grads(q, k, v, grad_out, scale):
    """Output and (dq, dk, dv) of float64 softmax attention on the same values."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = attention_reference(*leaves, scale=scale)
    out.backward(grad_out.double())
    return out.detach(), [t.grad for t in leaves]


def _triton_grads(q, k, v, grad_out, scale):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, scale=scale)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


def _assert_close(name, actual, expected, tol):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = _rel_err(actual, expected)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("scale_kind", ["default", "custom"])
def test_forward_and_gradients_match_float64(shape, dtype, scale_kind):
    seed = zlib.crc32(repr((shape, dtype, scale_kind)).encode())
    gen = _generator(seed)
    q, k, v, grad_out = (_randn(shape, dtype, gen) for _ in range(4))
    scale = None if scale_kind == "default" else 0.05 + 0.3 * torch.rand((), generator=gen, device=DEVICE).item()
    out, grads = _triton_grads(q, k, v, grad_out, scale)
    ref_out, ref_grads = _float64_grads(q, k, v, grad_out, shape[-1] ** -0.5 if scale is None else scale)
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    _assert_close("O", out, ref_out, tol)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        _assert_close(name, g, r, tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 3, 17, 32), (2, 1, 100, 64), (1, 2, 256, 32)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("scale", [None, 0.3], ids=["default_scale", "custom_scale"])
def test_large_logits_stay_stable(shape, dtype, scale):
    """q ×30: logits of size ~100 (~200 with scale 0.3 at D = 64), rows close to one-hot (online softmax
    rescaling, exp overflow)."""
    gen = _generator(7 + shape[2])
    q = _randn(shape, dtype, gen, scale=30.0)
    k, v, grad_out = (_randn(shape, dtype, gen) for _ in range(3))
    out, grads = _triton_grads(q, k, v, grad_out, scale)
    ref_out, ref_grads = _float64_grads(q, k, v, grad_out, shape[-1] ** -0.5 if scale is None else scale)
    tol = LARGE_LOGIT_TOLERANCE[dtype]
    _assert_close("O", out, ref_out, tol)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        _assert_close(name, g, r, tol)


# Launch configurations forced onto the launchers: several query/key blocks with tails,
# and the general (multi-block) backward where the heuristic would pick the single tile.
FORCED = {
    "heuristic": (None, None),
    "small_blocks": (ForwardConfig(16, 16, 4, 1), BackwardConfig(False, 32, 16, 4, 1)),
    "general_backward": (ForwardConfig(32, 64, 4, 1), BackwardConfig(False, 16, 32, 4, 1)),
    # 2 programs (2 per SM, one SM: the interpreter's count, forced on a GPU) looping over the forward's tiles
    "persistent": (ForwardConfig(16, 32, 4, 1, programs_per_sm=2), BackwardConfig(False, 32, 16, 4, 1)),
    # q, k, v, o through tensor descriptors where their layout allows (contiguous here, not transposed)
    "tma": (ForwardConfig(16, 16, 4, 1, tma=True), BackwardConfig(False, 32, 16, 4, 1)),
    "tma_persistent": (ForwardConfig(16, 16, 4, 1, programs_per_sm=2, tma=True), BackwardConfig(False, 16, 16, 4, 1)),
}


def _poisoned(shape, dtype, layout):
    """NaN-filled buffer of logical shape (B, H, N, D); 'transposed' stores it as (B, H, D, N)."""
    b, h, n, d = shape
    if layout == "transposed":
        return torch.full((b, h, d, n), float("nan"), device=DEVICE, dtype=dtype).transpose(-1, -2)
    return torch.full(shape, float("nan"), device=DEVICE, dtype=dtype)


LAUNCHER_CASES = [
    ((1, 1, 1, 32), "contiguous", "heuristic"),
    ((1, 1, 1, 32), "transposed", "small_blocks"),
    ((1, 3, 17, 32), "transposed", "heuristic"),
    ((1, 3, 17, 32), "contiguous", "general_backward"),
    ((2, 1, 64, 64), "contiguous", "heuristic"),
    ((2, 1, 64, 64), "transposed", "general_backward"),
    ((1, 2, 100, 32), "transposed", "heuristic"),
    ((1, 2, 100, 32), "contiguous", "small_blocks"),
    ((1, 1, 100, 64), "transposed", "general_backward"),
    ((1, 1, 256, 64), "contiguous", "heuristic"),
    ((1, 1, 256, 32), "transposed", "heuristic"),
    ((1, 1, 1, 32), "contiguous", "persistent"),
    ((1, 3, 17, 32), "transposed", "persistent"),
    ((2, 1, 100, 64), "contiguous", "persistent"),
    # N = 48: a multiple of the 16-row query blocks, not of the 32-row key blocks (the key loop's tail masked
    # while the query blocks are whole; backward: 32 owned rows with a tail, 16 streamed without)
    ((1, 2, 48, 32), "transposed", "persistent"),
    ((1, 3, 17, 32), "contiguous", "tma"),
    ((1, 2, 100, 32), "transposed", "tma"),
    ((1, 3, 17, 32), "contiguous", "tma_persistent"),
    ((2, 1, 100, 64), "contiguous", "tma_persistent"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,layout,forced", LAUNCHER_CASES,
                         ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else x)
def test_launchers_write_every_element(shape, layout, forced, dtype, monkeypatch):
    """Outputs and lse start as NaN; every element must be written and correct."""
    monkeypatch.setattr(attention_module, "_sm_count", lambda device: 1)
    descriptors = []

    def counted_descriptor(*args, **kwargs):
        descriptors.append(args[0])
        return tensor_descriptor(*args, **kwargs)

    tensor_descriptor = attention_module.TensorDescriptor
    if tensor_descriptor is not None:  # (None: a Triton without host-side descriptors, where tma takes pointers)
        monkeypatch.setattr(attention_module, "TensorDescriptor", counted_descriptor)
    gen = _generator(11 + shape[2] + len(forced))
    q, k, v, grad_out = (_randn(shape, dtype, gen) for _ in range(4))
    scale = 0.21
    fwd_config, bwd_config = FORCED[forced]
    b, h, n, d = shape
    out = _poisoned(shape, dtype, layout)
    lse = torch.full((b, h, n), float("nan"), device=DEVICE, dtype=torch.float32)
    _attention_forward_into(q, k, v, scale, out, lse, fwd_config)
    # descriptors for all four tensors, or (a transposed output) none: the pointer path
    described = forced.startswith("tma") and layout == "contiguous" and tensor_descriptor is not None
    assert len(descriptors) == (4 if described else 0)
    dq, dk, dv = (_poisoned(shape, dtype, layout) for _ in range(3))
    _attention_backward_into(q, k, v, out, lse, grad_out, scale, dq, dk, dv, bwd_config)

    ref_out, ref_grads = _float64_grads(q, k, v, grad_out, scale)
    logits = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
    tol = TOLERANCE[dtype]
    _assert_close("O", out, ref_out, tol)
    _assert_close("lse", lse, torch.logsumexp(logits, dim=-1), 1e-6)
    for name, g, r in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads):
        _assert_close(name, g, r, tol)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2")  # interpreter: padded lanes, masked after
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul")  # ... and their products, not stored
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,forced", [((1, 2, 17, 32), "heuristic"), ((1, 2, 17, 32), "general_backward"),
                                          ((1, 1, 100, 32), "small_blocks")],
                         ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else x)
def test_padded_keys_stay_finite_when_every_logit_is_very_negative(shape, forced, dtype):
    """Every logit about -106 (a shift common to the row, so the softmax is an ordinary one): L ≈ -100
    and a padded key (k = v = 0, logit 0) would get P = exp(0 - L) > 2^128 = inf, and inf·0 = NaN in dq. The
    backward must mask padded keys, not rely on k = 0 (single tile, and the general kernel's key loop)."""
    gen = _generator(5 + shape[2] + len(forced))
    q, k, v, grad_out = (_randn(shape, dtype, gen) for _ in range(4))
    # q·k = q'·k' - 600, exactly, in dimension 0 (scale 32^-1/2: logits about -106)
    q[..., 0], k[..., 0] = -600.0, 1.0
    scale = shape[-1] ** -0.5
    _, bwd_config = FORCED[forced]
    out = torch.empty_like(q)
    lse = torch.empty(shape[:3], device=DEVICE, dtype=torch.float32)
    _attention_forward_into(q, k, v, scale, out, lse)
    assert lse.max().item() < -89  # exp(-L) overflows fp32
    dq, dk, dv = (torch.empty_like(q) for _ in range(3))
    _attention_backward_into(q, k, v, out, lse, grad_out, scale, dq, dk, dv, bwd_config)
    ref_out, ref_grads = _float64_grads(q, k, v, grad_out, scale)
    tol = LARGE_LOGIT_TOLERANCE[dtype]
    _assert_close("O", out, ref_out, tol)
    for name, g, r in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads):
        _assert_close(name, g, r, tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["tokens_heads", "channels_tokens"])
def test_strided_views_and_broadcast_grad(layout, dtype):
    """q, k, v as views of one qkv tensor (no copies) and a stride-0 output gradient."""
    b, h, n, d = 2, 2, 35, 32
    gen = _generator(23)
    if layout == "tokens_heads":  # (B, N, 3, H, D) as produced by a linear qkv projection
        qkv = _randn((b, n, 3, h, d), dtype, gen).permute(2, 0, 3, 1, 4)
    else:  # (B, 3, H, D, N) as produced by the UNet's 1x1 qkv convolution
        qkv = _randn((b, 3, h, d, n), dtype, gen).permute(1, 0, 2, 4, 3)
    q, k, v = qkv.unbind(0)
    assert not q.is_contiguous()
    weight = _randn((b, h, d), dtype, gen)
    # loss = Σ_b,h,d w·Σ_n O: dL/dO = w broadcast over tokens, a stride-0 gradient.
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves)
    grad_strides = []
    out.register_hook(lambda grad: grad_strides.append(grad.stride()))
    (out.sum(dim=2) * weight).sum().backward()
    assert grad_strides and grad_strides[0][2] == 0
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out = attention_reference(*ref_leaves)
    (ref_out.sum(dim=2) * weight.double()).sum().backward()
    tol = TOLERANCE[dtype]
    _assert_close("O", out.detach(), ref_out.detach(), tol)
    for name, leaf, ref in zip(("dq", "dk", "dv"), leaves, ref_leaves):
        _assert_close(name, leaf.grad, ref.grad, tol)


def test_backward_is_deterministic():
    shape = (2, 2, 100, 64) if not ON_GPU else (16, 8, 256, 64)
    gen = _generator(31)
    dtype = torch.float16
    q, k, v, grad_out = (_randn(shape, dtype, gen) for _ in range(4))
    first = _triton_grads(q, k, v, grad_out, None)
    second = _triton_grads(q, k, v, grad_out, None)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# qkv read in place from the (B, 3C, H, W) conv output
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,channels,heads,height,width", [
    (2, 64, 2, 7, 5),     # head dim 32, N = 35 (tail blocks)
    (1, 128, 2, 8, 8),    # head dim 64, N = 64 (single-tile backward)
    (1, 64, 2, 16, 16),   # head dim 32, N = 256
    (1, 64, 4, 4, 4),     # head dim 16, N = 16 (the tiny preset at 16x16 images)
    (1, 96, 3, 1, 1),     # head dim 32, N = 1 (a 1x1 map), B·H = 3
] + ([(8, 512, 8, 16, 16)] if ON_GPU else []))
def test_qkv_nchw_matches_float64(batch, channels, heads, height, width, dtype):
    gen = _generator(41 + channels + height)
    qkv = _randn((batch, 3 * channels, height, width), dtype, gen)
    grad_out = _randn((batch, channels, height, width), dtype, gen)
    out, dqkv, ref_out, ref_dqkv = qkv_attention_with_float64(qkv, grad_out, heads)
    tol = TOLERANCE[dtype]
    assert out.shape == (batch, channels, height, width) and out.is_contiguous()
    _assert_close("out", out, ref_out, tol)
    _assert_close("dqkv", dqkv, ref_dqkv, tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,channels,heads,height,width", [(2, 64, 2, 7, 5), (1, 128, 2, 8, 8)])
def test_qkv_channels_last_matches_float64_and_keeps_the_layout(batch, channels, heads, height, width, dtype):
    """A channels_last model's qkv conv output: read in place, the output and dqkv are channels_last too
    (the fake implementation says the same, for torch.compile and the memory estimator)."""
    gen = _generator(7 + channels + width)
    qkv = _randn((batch, 3 * channels, height, width), dtype, gen).contiguous(memory_format=torch.channels_last)
    grad_out = _randn((batch, channels, height, width), dtype, gen)
    out, dqkv, ref_out, ref_dqkv = qkv_attention_with_float64(
        qkv, grad_out.contiguous(memory_format=torch.channels_last), heads)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert dqkv.is_contiguous(memory_format=torch.channels_last) and not dqkv.is_contiguous()
    _assert_close("out", out, ref_out, TOLERANCE[dtype])
    _assert_close("dqkv", dqkv, ref_dqkv, TOLERANCE[dtype])
    with FakeTensorMode() as mode:
        fake_out = attention_qkv_nchw(mode.from_tensor(qkv), heads)
    assert fake_out.stride() == out.stride()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,channels,heads,height,width,memory_format", [
    (2, 64, 2, 7, 5, torch.contiguous_format),  # N = 35: tails in the single forward block and backward tile
    (1, 64, 1, 16, 16, torch.channels_last),  # N = 256: several query/key blocks, the general backward
    (3, 32, 1, 1, 1, torch.contiguous_format),  # N = 1 (a 1x1 map), B·H = 3
], ids=["7x5", "16x16-channels_last", "1x1"])
def test_public_ops_write_every_element(monkeypatch, batch, channels, heads, height, width, memory_format, dtype):
    """attention_qkv_nchw's out and dqkv (views over which the launchers write q's, k's and v's parts) and
    attention's o, dq, dk, dv as the ops allocate them, filled with NaN first: every element must be written
    and match float64."""
    poisoned = NanEmptyTorch()
    monkeypatch.setattr(attention_module, "torch", poisoned)
    gen = _generator(47 + channels + height)
    qkv = _randn((batch, 3 * channels, height, width), dtype, gen).contiguous(memory_format=memory_format)
    grad_out = _randn((batch, channels, height, width), dtype, gen).contiguous(memory_format=memory_format)
    out, dqkv, ref_out, ref_dqkv = qkv_attention_with_float64(qkv, grad_out, heads)
    assert poisoned.allocated >= 3  # out, lse, dqkv (and delta beyond one tile)
    tol = TOLERANCE[dtype]
    _assert_close("out", out, ref_out, tol)
    _assert_close("dqkv", dqkv, ref_dqkv, tol)
    q, k, v = (t.contiguous() for t in attention_module._qkv_nchw_views(qkv, heads))  # (B, heads, N, D)
    allocated = poisoned.allocated
    out, grads = _triton_grads(q, k, v, attention_module._nchw_as_heads(grad_out, heads), 0.3)
    ref_out, ref_grads = _float64_grads(q, k, v, attention_module._nchw_as_heads(grad_out, heads), 0.3)
    assert poisoned.allocated >= allocated + 5  # o, lse, dq, dk, dv
    _assert_close("O", out, ref_out, tol)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        _assert_close(name, g, r, tol)


def test_qkv_nchw_agrees_with_attention_on_views():
    gen = _generator(43)
    b, c, heads, hh, ww = 2, 64, 2, 5, 7
    qkv = _randn((b, 3 * c, hh, ww), torch.float32, gen)
    q, k, v = qkv.reshape(b, 3, heads, c // heads, hh * ww).transpose(-1, -2).unbind(1)
    via_views = attention(q, k, v, scale=0.3).transpose(-1, -2).reshape(b, c, hh, ww)
    assert torch.allclose(attention_qkv_nchw(qkv, heads, scale=0.3), via_views, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------
# torch.compile, FakeTensorMode, the eager reference
# ---------------------------------------------------------------------------------------
def test_torch_compile_fullgraph_forward_and_backward():
    gen = _generator(53)
    dtype = torch.float32
    shape = (1, 2, 17, 32)
    q, k, v = (_randn(shape, dtype, gen) for _ in range(3))
    qkv_map = _randn((1, 3 * 64, 4, 5), dtype, gen)
    weight = _randn(shape, dtype, gen)

    def loss_fn(q, k, v, qkv_map):
        o = attention(q * 1.5, k, v, scale=0.2)
        o2 = attention_qkv_nchw(qkv_map, 2)
        return (o * weight).sum() + (o2 * o2).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    inputs = [t.detach().requires_grad_() for t in (q, k, v, qkv_map)]
    loss = compiled(*inputs)
    loss.backward()
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v, qkv_map)]
    ref_o = attention_reference(ref_inputs[0] * 1.5, ref_inputs[1], ref_inputs[2], scale=0.2)
    ref_o2 = attention_qkv_nchw_reference(ref_inputs[3], 2)
    ref_loss = (ref_o * weight.double()).sum() + (ref_o2 * ref_o2).sum()
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(1.0, abs(ref_loss.item()))
    for name, a, r in zip(("dq", "dk", "dv", "dqkv"), inputs, ref_inputs):
        _assert_close(name, a.grad, r.grad, TOLERANCE[dtype])


def test_torch_compile_dynamic_shapes_trace_heads_and_scale_as_symbolic_numbers():
    """torch.compile(dynamic=True) traces sizes, ints and floats as torch.SymInt / torch.SymFloat: the checks take
    a symbolic num_heads and scale (no math.isfinite on them), and a second call at other sizes reuses the first's
    graphs (the ops' int and float arguments specialize num_heads and scale: other values recompile)."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor" if ON_GPU else "aot_eager")

    def both(q, k, v, scale, qkv, num_heads):
        return attention(q, k, v, scale=scale), attention_qkv_nchw(qkv, num_heads, scale=scale)

    compiled = torch.compile(both, backend=counter, dynamic=True, fullgraph=True)
    gen = _generator(59)
    heads, scale = 3, 0.15
    frames = []
    for batch, tokens, image in ((2, 20, (4, 5)), (3, 42, (6, 7))):  # no two sizes equal (duck sizing)
        inputs = [_randn((batch, heads, tokens, 32), torch.float32, gen) for _ in range(3)]
        inputs.append(_randn((batch, 3 * 32 * heads, *image), torch.float32, gen))
        leaves = [t.requires_grad_() for t in inputs]
        outs = compiled(*leaves[:3], scale, leaves[3], heads)
        grad_outs = [_randn(o.shape, torch.float32, gen) for o in outs]
        torch.autograd.backward(outs, grad_outs)
        refs = [t.detach().double().requires_grad_() for t in inputs]
        ref_outs = (attention_reference(*refs[:3], scale=scale), attention_qkv_nchw_reference(refs[3], heads, scale))
        torch.autograd.backward(ref_outs, [g.double() for g in grad_outs])
        for name, out, ref in zip(("o", "o_qkv"), outs, ref_outs):
            _assert_close(name, out, ref, TOLERANCE[torch.float32])
        for name, leaf, ref in zip(("dq", "dk", "dv", "dqkv"), leaves, refs):
            _assert_close(name, leaf.grad, ref.grad, TOLERANCE[torch.float32])
        frames.append(counter.frame_count)
    assert frames[0] == frames[1], "the second call recompiled"


def test_fake_tensor_mode_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(4, 8, 256, 64, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
        o = attention(q, q, q)
        o.sum().backward()
        assert o.shape == q.shape and o.dtype == q.dtype
        assert q.grad.shape == q.shape
        qkv = torch.empty(4, 3 * 512, 16, 16, dtype=torch.float16, device=DEVICE)
        assert attention_qkv_nchw(qkv, 8).shape == (4, 512, 16, 16)
        o, lse = torch.ops.dream_kernels.attention_forward(q, q, q, 0.125)
        assert lse.shape == (4, 8, 256) and lse.dtype == torch.float32


@pytest.mark.parametrize("layout", ["strided_heads", "channels_last_qkv"])
def test_fake_outputs_have_the_real_outputs_shapes_dtypes_and_strides(layout):
    """Each public op's fake gives its outputs the shape, dtype and strides of the real op's (a compiled graph
    lays out what follows by them): lse fp32 beside fp16 q; the (B, H, N, D) outputs contiguous whatever q's
    strides; the qkv ops' out and dqkv in qkv's memory format."""
    ops = torch.ops.dream_kernels
    gen = _generator(71)
    if layout == "strided_heads":
        q, k, v = (_randn((1, 6, 2, 16), torch.float16, gen).transpose(1, 2) for _ in range(3))  # (B, N, H, D) data
        o, lse = ops.attention_forward(q, k, v, 0.25)
        calls = [(ops.attention_forward, (q, k, v, 0.25)),
                 (ops.attention_backward, (q, k, v, o, lse, _randn(q.shape, torch.float16, gen), 0.25))]
    else:
        qkv = _randn((1, 96, 2, 3), torch.float16, gen).to(memory_format=torch.channels_last)
        out, lse = ops.attention_qkv_nchw_forward(qkv, 2, 0.25)
        dout = _randn(out.shape, torch.float16, gen).to(memory_format=torch.channels_last)
        calls = [(ops.attention_qkv_nchw_forward, (qkv, 2, 0.25)),
                 (ops.attention_qkv_nchw_backward, (qkv, out, lse, dout, 2, 0.25))]
    for op, args in calls:
        assert_fake_matches_real(op, *args)


@pytest.mark.parametrize("device", [DEVICE, "meta"])
def test_the_backward_ops_refuse_operands_of_another_dtype(device):
    """The public backward ops read do (dout) in q's (qkv's) dtype and lse in fp32: an operand of another dtype is
    a one-line ValueError naming it, from the op and from its fake (meta tensors), never a kernel reading its
    bytes as another type."""
    ops = torch.ops.dream_kernels
    q = torch.randn(1, 1, 8, 16, device=device)
    lse = torch.zeros(1, 1, 8, device=device)
    with pytest.raises(ValueError, match=r"^attention_backward: do must be a torch.float32 tensor of q's shape"):
        ops.attention_backward(q, q, q, q, lse, q.half(), 0.25)
    qkv = torch.randn(1, 48, 2, 4, device=device)
    out = torch.randn(1, 16, 2, 4, device=device)
    with pytest.raises(ValueError, match=r"^attention_qkv_nchw_backward: dout must be a torch.float32 tensor"):
        ops.attention_qkv_nchw_backward(qkv, out, lse, out.half(), 1, 0.25)
    with pytest.raises(ValueError, match=r"^attention_qkv_nchw_backward: lse must be a float32 tensor"):
        ops.attention_qkv_nchw_backward(qkv, out, lse.half(), out, 1, 0.25)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [32, 128])
def test_backward_takes_one_tile_up_to_64_tokens(head_dim, dtype):
    """In half precision the backward computes a (batch, head) in one program for N <= 64 (its whole sequence in
    one tile) and streams blocks beyond: the boundary is N = 64 itself."""
    for seq_len in (1, 17, 64):
        config = attention_module.backward_config(seq_len, head_dim, dtype)
        assert config.single_tile and config.block_own >= seq_len, seq_len
    assert not attention_module.backward_config(65, head_dim, dtype).single_tile


@pytest.mark.skipif(attention_module.TensorDescriptor is None, reason="this Triton has no tensor descriptors")
def test_descriptor_boxes_need_aligned_rows_within_the_sequence():
    """A (B, H, N, D) tensor is read through a descriptor only in boxes of at most N rows, with D contiguous, 16-byte
    strides and base: a box taller than the sequence, a transposed or 8-byte-strided tensor, an offset base fall back
    to pointer loads."""
    ready = attention_module._descriptor_ready
    t = torch.randn(2, 3, 40, 16)  # (fp32: a row is 64 bytes)
    assert ready(t, 16) and ready(t, 40) and not ready(t, 41) and not ready(t, 64)
    assert not ready(t.transpose(2, 3), 8)  # D not contiguous
    assert not ready(torch.randn(2, 3, 40, 18)[..., :16], 16)  # rows 72 bytes apart
    assert not ready(torch.randn(2 * 3 * 40 * 16 + 1)[1:].view(2, 3, 40, 16), 16)  # base 4 bytes past alignment


def test_reference_matches_sdpa_in_float64():
    gen = _generator(61)
    q, k, v = (_randn((2, 3, 19, 32), torch.float64, gen) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.4)
    assert torch.allclose(attention_reference(q, k, v, scale=0.4), expected, rtol=1e-12, atol=1e-12)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(attention_reference(q, k, v), expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------
def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


@pytest.mark.parametrize("args,kwargs,error,match", [
    ((_t(2, 17, 32), _t(2, 17, 32), _t(2, 17, 32)), {}, ValueError, "shape"),
    ((_t(1, 2, 17, 32), _t(1, 2, 16, 32), _t(1, 2, 17, 32)), {}, ValueError, "same shape"),
    ((_t(1, 2, 17, 48), _t(1, 2, 17, 48), _t(1, 2, 17, 48)), {}, ValueError, "head dim D=48"),
    ((_t(1, 2, 17, 8), _t(1, 2, 17, 8), _t(1, 2, 17, 8)), {}, ValueError, "head dim D=8"),
    ((_t(1, 2, 17, 256), _t(1, 2, 17, 256), _t(1, 2, 17, 256)), {}, ValueError, "head dim D=256"),
    ((_t(1, 2, 0, 32), _t(1, 2, 0, 32), _t(1, 2, 0, 32)), {}, ValueError, "N=0"),
    ((_t(1, 1, 4097, 32), _t(1, 1, 4097, 32), _t(1, 1, 4097, 32)), {}, ValueError, "N=4097"),
    ((_t(0, 2, 8, 32), _t(0, 2, 8, 32), _t(0, 2, 8, 32)), {}, ValueError, "positive"),
    ((_t(1, 0, 8, 32), _t(1, 0, 8, 32), _t(1, 0, 8, 32)), {}, ValueError, "positive, got B=1, H=0"),
    ((_t(1, 2, 8, 32, dtype=torch.float64),) * 3, {}, TypeError, "float64"),
    ((torch.ones(1, 2, 8, 32, dtype=torch.int32, device=DEVICE),) * 3, {}, TypeError, "int32"),
    ((_t(1, 2, 8, 32), _t(1, 2, 8, 32, dtype=torch.float16), _t(1, 2, 8, 32)), {}, TypeError, "same dtype"),
    (([[1.0]], _t(1, 2, 8, 32), _t(1, 2, 8, 32)), {}, TypeError, "torch.Tensor"),
    ((_t(1, 2, 8, 32),) * 3, {"scale": -0.5}, ValueError, "scale"),
    ((_t(1, 2, 8, 32),) * 3, {"scale": float("nan")}, ValueError, "scale"),
    ((_t(1, 2, 8, 32),) * 3, {"scale": "0.1"}, TypeError, "scale"),
])
def test_bad_inputs_raise_clear_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        attention(*args, **kwargs)


def test_the_longest_supported_sequence_is_accepted():
    """N = 4096 is the last length accepted (4097 is refused above), in attention and in attention_qkv_nchw (64 × 64
    tokens). On meta tensors: the checks and shapes, nothing is computed."""
    q = torch.empty(1, 2, 4096, 32, device="meta")
    assert attention(q, q, q).shape == q.shape
    qkv = torch.empty(1, 3 * 32, 64, 64, device="meta")
    assert attention_qkv_nchw(qkv, 1).shape == (1, 32, 64, 64)


@pytest.mark.skipif(not ON_GPU, reason="needs a second device type")
def test_mixed_devices_raise():
    with pytest.raises(ValueError, match="one device"):
        attention(_t(1, 2, 8, 32), _t(1, 2, 8, 32).cpu(), _t(1, 2, 8, 32))


@pytest.mark.parametrize("qkv_shape,heads,match", [
    ((1, 3 * 64, 4, 4), 5, "divisible"),
    ((1, 100, 4, 4), 2, "divisible"),
    ((1, 3 * 96, 4, 4), 2, "head dim"),
    ((3 * 64, 4, 4), 2, "shape"),
    ((1, 3 * 64, 4, 4), 0, "num_heads"),
])
def test_qkv_nchw_bad_inputs(qkv_shape, heads, match):
    with pytest.raises(ValueError, match=match):
        attention_qkv_nchw(_t(*qkv_shape), heads)


@pytest.mark.skipif(ON_GPU, reason="the interpreter refuses bf16 only on CPU")
def test_bf16_refused_by_interpreter():
    with pytest.raises(TypeError, match="bfloat16"):
        attention(*(_t(1, 1, 8, 32, dtype=torch.bfloat16),) * 3)


def test_cpu_tensors_without_interpreter_raise():
    """No silent eager fallback: CPU tensors without TRITON_INTERPRET=1 are an error."""
    code = (
        "import torch\n"
        "from kernels.attention import attention\n"
        "x = torch.randn(1, 1, 8, 32)\n"
        "try:\n"
        "    attention(x, x, x)\n"
        "except RuntimeError as e:\n"
        "    print('RAISED', e)\n"
    )
    result = run_without_interpreter(code)
    assert "RAISED" in result.stdout and "TRITON_INTERPRET" in result.stdout, result.stdout + result.stderr
