"""kernels.dispatch: the ops' direct calls in eager mode against their calls through torch.library.

Each public entry point runs its op's Python implementation directly in plain eager mode (under a
torch.autograd.Function made of the op's own setup_context and backward) and through torch.ops
otherwise. Both run the same kernels in the same order, so outputs and every gradient must be bitwise
equal; which path ran shows in the output's grad_fn. Inputs are random (weights, scales and shifts
too), at odd shapes (3 channels per group, 7×5 images, batch 3); outputs of both paths are fresh
buffers, so a path that wrote nothing could not match the other by chance.
"""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import DEVICE

import kernels  # noqa: E402  (conftest sets TRITON_INTERPRET first)
from kernels import dispatch


def _group_norm_silu(g):
    x = torch.randn(3, 6, 7, 5, generator=g)
    params = [torch.randn(6, generator=g), torch.randn(6, generator=g) * 0.3,
              torch.randn(3, 6, generator=g) * 0.4, torch.randn(3, 6, generator=g) * 0.4]
    seed = torch.tensor([1234], dtype=torch.int64)

    def call(x, weight, bias, scale, shift):
        return kernels.group_norm_silu(x, weight, bias, 2, scale=scale, shift=shift, dropout_p=0.25, seed=seed)

    return "group_norm_silu_fwd", call, [x, *params]


def _group_norm_silu_conv2d(g):
    x = torch.randn(3, 6, 7, 5, generator=g)
    params = [torch.randn(6, generator=g), torch.randn(6, generator=g) * 0.3, torch.randn(3, 6, generator=g) * 0.4,
              torch.randn(4, 6, 3, 3, generator=g) * 0.2, torch.randn(4, generator=g)]

    def call(x, weight, bias, scale, conv_weight, conv_bias):
        return kernels.group_norm_silu_conv2d(x, weight, bias, 3, conv_weight, conv_bias, padding=1, scale=scale)

    return "group_norm_silu_conv2d", call, [x, *params]


def _attention(g):
    q, k, v = (torch.randn(3, 2, 17, 16, generator=g) for _ in range(3))
    return "attention_forward", lambda q, k, v: kernels.attention(q, k, v, scale=0.3), [q, k, v]


def _attention_qkv_nchw(g):
    qkv = torch.randn(3, 96, 3, 5, generator=g)
    return "attention_qkv_nchw_forward", lambda qkv: kernels.attention_qkv_nchw(qkv, 2), [qkv]


def _add_bias_residual(g):
    tensors = [torch.randn(3, 5, 7, 5, generator=g), torch.randn(3, 5, 7, 5, generator=g), torch.randn(5, generator=g)]
    return "add_bias_residual", kernels.add_bias_residual, tensors


def _upsample2x_concat(g):
    tensors = [torch.randn(3, 5, 6, 10, generator=g), torch.randn(3, 3, 3, 5, generator=g),
               torch.randn(5, generator=g)]
    return "upsample2x_concat", kernels.upsample2x_concat, tensors


ENTRY_POINTS = [_group_norm_silu, _group_norm_silu_conv2d, _attention, _attention_qkv_nchw, _add_bias_residual,
                _upsample2x_concat]


def _run(call, tensors, grad_out=None):
    leaves = [t.to(DEVICE).requires_grad_() for t in tensors]
    out = call(*leaves)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    out.backward(grad_out)
    return out, [leaf.grad for leaf in leaves], grad_out


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda entry: entry.__name__.lstrip("_"))
def test_direct_and_dispatched_calls_agree_bitwise(entry):
    op_name, call, tensors = entry(torch.Generator().manual_seed(11))
    direct_out, direct_grads, grad_out = _run(call, tensors)
    with dispatch.through_dispatcher():
        op_out, op_grads, _ = _run(call, tensors, grad_out)
    assert direct_out.grad_fn.name() == f"dream_kernels::{op_name}Backward"
    assert op_out.grad_fn.name() == f"GeneratedBackwardFor_dream_kernels_{op_name}_defaultBackward"
    assert torch.equal(direct_out, op_out)
    assert direct_out.stride() == op_out.stride()
    for index, (direct_grad, op_grad) in enumerate(zip(direct_grads, op_grads)):
        assert direct_grad is not None and op_grad is not None, f"input {index}: no gradient"
        assert torch.equal(direct_grad, op_grad), f"input {index}: gradients differ"
    with torch.no_grad():
        leaves = [t.to(DEVICE) for t in tensors]
        assert torch.equal(call(*leaves), direct_out.detach())


def test_gradients_reach_every_input_that_asks_for_them_on_both_paths():
    """Only some inputs require gradients (a frozen input, trainable norm weights or scale and shift): the direct
    call records the op for autograd whichever of its arguments asks for it, with the dispatcher's gradients."""
    _, call, tensors = _group_norm_silu(torch.Generator().manual_seed(12))
    for trainable in ((1,), (1, 2), (3, 4)):  # weight; weight and bias; scale and shift
        grads = []
        for forced in (False, True):
            leaves = [t.to(DEVICE).requires_grad_(i in trainable) for i, t in enumerate(tensors)]
            with dispatch.through_dispatcher() if forced else contextlib.nullcontext():
                call(*leaves).square().sum().backward()
            grads.append([leaves[i].grad for i in trainable])
        for index, direct, dispatched in zip(trainable, *grads):
            assert direct is not None and torch.equal(direct, dispatched), f"input {index}"


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_dispatch_mode_sees_the_ops_forward_and_backward():
    """Under a TorchDispatchMode (FakeTensorMode, the memory tracker, an op recorder) the calls go through
    torch.ops, so the mode sees them, backward included."""
    _, call, tensors = _group_norm_silu(torch.Generator().manual_seed(3))
    leaves = [t.to(DEVICE).requires_grad_() for t in tensors]
    with _OpRecorder() as recorder:
        call(*leaves).sum().backward()
    assert "dream_kernels.group_norm_silu_fwd.default" in recorder.ops
    assert "dream_kernels.group_norm_silu_bwd.default" in recorder.ops


def test_fake_tensors_take_the_op_and_its_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.randn(3, 6, 7, 5, device=DEVICE, requires_grad=True)
        weight, bias = torch.randn(6, device=DEVICE), torch.randn(6, device=DEVICE)
        y = kernels.group_norm_silu(x, weight, bias, 2)
        y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape


def test_direct_call_allowed_only_for_plain_tensors():
    class Tagged(torch.Tensor):
        pass

    plain = torch.randn(2)
    assert dispatch.direct_call_allowed((plain, torch.nn.Parameter(torch.randn(2)), None, 3, "pre"))
    assert not dispatch.direct_call_allowed((plain, plain.as_subclass(Tagged)))
    with dispatch.through_dispatcher():
        assert not dispatch.direct_call_allowed((plain,))
    assert dispatch.direct_call_allowed((plain,))


def test_vmap_takes_the_op():
    """vmap is a functorch transform: the op path, where PyTorch loops over the batch for the custom op."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 1, 5, 16, generator=g).to(DEVICE) for _ in range(3))
    out = torch.vmap(kernels.attention)(q, k, v)
    expected = torch.stack([kernels.attention_reference(q[i], k[i], v[i]) for i in range(2)])
    assert (out - expected).abs().max().item() < 1e-5


def _second_order(call, tensors):
    """The gradients of Σ (∂L/∂input)² over the inputs, L = Σ r · out² (r fixed random; squared, so that the
    first-order gradients depend on the inputs even where the op is linear): what a gradient penalty computes.
    Returns them, or the first line of the error raised."""
    leaves = [t.to(DEVICE).requires_grad_() for t in tensors]
    out = call(*leaves)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    try:
        first = torch.autograd.grad((out.pow(2) * weights).sum(), leaves, create_graph=True)
        penalty = sum(grad.pow(2).sum() for grad in first)
        return torch.autograd.grad(penalty, leaves, allow_unused=True)
    except RuntimeError as error:
        return str(error).splitlines()[0]


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda entry: entry.__name__.lstrip("_"))
def test_second_order_gradients_are_the_same_on_both_paths(entry):
    """Differentiating a gradient either raises on both paths (the kernels' backward ops have no autograd
    formula) or gives the same gradients on both (add_bias_residual's backward is made of torch ops), never a
    gradient silently missing on one of them."""
    _, call, tensors = entry(torch.Generator().manual_seed(9))
    direct = _second_order(call, tensors)
    with dispatch.through_dispatcher():
        dispatched = _second_order(call, tensors)
    if isinstance(dispatched, str):
        assert "no autograd formula" in dispatched
        assert direct == dispatched
        return
    assert not isinstance(direct, str), direct
    for index, (direct_grad, op_grad) in enumerate(zip(direct, dispatched)):
        assert (direct_grad is None) == (op_grad is None), f"input {index}: a gradient on one path only"
        assert direct_grad is None or torch.equal(direct_grad, op_grad), f"input {index}: gradients differ"


def test_second_order_gradients_of_the_residual_sum_match_float64():
    """add_bias_residual's backward is made of torch ops, so it is differentiable: the penalty's gradients
    against float64."""
    _, call, tensors = _add_bias_residual(torch.Generator().manual_seed(10))
    got = _second_order(call, tensors)
    expected = _second_order(kernels.add_bias_residual_reference, [t.double() for t in tensors])
    for index, (value, reference) in enumerate(zip(got, expected)):
        assert (value is None) == (reference is None), f"input {index}"
        if value is not None:  # fp32: the error relative to the largest entry (sums of products cancel)
            error = (value.double() - reference).abs().max() / reference.abs().max()
            assert error < 1e-5, f"input {index}: relative error {error:.2e}"


def test_profiler_records_direct_calls_under_the_ops_names():
    _, call, tensors = _group_norm_silu(torch.Generator().manual_seed(4))
    leaves = [t.to(DEVICE).requires_grad_() for t in tensors]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        call(*leaves).sum().backward()
        with torch.no_grad():
            kernels.add_bias_residual(*(t.to(DEVICE) for t in _add_bias_residual(torch.Generator())[2]))
    names = {event.key for event in profiler.key_averages()}
    assert {"dream_kernels::group_norm_silu_fwd", "dream_kernels::group_norm_silu_bwd",
            "dream_kernels::add_bias_residual"} <= names, sorted(names)
