"""The kernels launch on their tensors' device, not on whichever CUDA device is current.

Triton launches on the current device; the launchers make the tensors' device current first
(kernels.device.on_tensor_device). Checked on the CPU with fake CUDA tensors (the device made current is
recorded), and on a machine with two GPUs with real tensors on cuda:1 while cuda:0 is current
(fp32: the kernels against their eager references, max abs error <= 1e-4 at these unit-scale sizes).
"""
import contextlib
import importlib
import inspect
import re

import pytest
import torch

import kernels
from kernels.device import on_tensor_device


def test_the_tensors_device_is_made_current(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def record_device(device):
        entered.append(torch.device(device))
        yield

    monkeypatch.setattr(torch.cuda, "device", record_device)
    launcher = on_tensor_device(lambda tensor, offset: (tensor.device, offset))
    assert launcher(torch.zeros(2), offset=3) == (torch.device("cpu"), 3) and entered == []

    if not torch.backends.cuda.is_built():
        pytest.skip("fake CUDA tensors need a CUDA build of torch")
    from torch._subclasses.fake_tensor import FakeTensorMode

    # cuda:1 (not the default device); a machine with one real GPU refuses even a fake tensor there
    device = torch.device("cuda", 0 if torch.cuda.device_count() == 1 else 1)
    with FakeTensorMode():
        on_gpu = torch.empty(2, device=device)
    assert launcher(on_gpu, 5) == (device, 5)
    assert entered == [device]


def test_every_function_that_launches_a_kernel_is_guarded():
    launchers = {}
    for module in ("group_norm_silu", "attention", "upsample_concat", "bias_residual"):
        for name, function in vars(importlib.import_module(f"kernels.{module}")).items():
            source = inspect.getsource(inspect.unwrap(function)) if inspect.isfunction(function) else ""
            if re.search(r"_kernel\[|autotune\.launch\(_\w+_kernel\b", source):  # kernel[grid] or launch(kernel, grid)
                launchers[name] = hasattr(function, "__wrapped__")
    assert set(launchers) == {"_forward", "_backward", "_attention_forward_into", "_attention_backward_into",
                              "_upsample2x_concat_into", "_upsample2x_backward_into", "_add_bias_residual_into"}
    assert all(launchers.values()), launchers


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_on_a_device_that_is_not_current():
    torch.cuda.set_device(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 24, 7, 5, generator=g).to("cuda:1").requires_grad_()
    weight = (1 + 0.3 * torch.randn(24, generator=g)).to("cuda:1").requires_grad_()
    bias = (0.2 * torch.randn(24, generator=g)).to("cuda:1").requires_grad_()
    y = kernels.group_norm_silu(x, weight, bias, 8)
    grads = torch.autograd.grad(y.square().sum(), [x, weight, bias])
    y_ref = kernels.group_norm_silu_reference(x, weight, bias, 8)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x, weight, bias])
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=0)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)

    q, k, v = (torch.randn(2, 3, 17, 32, generator=g).to("cuda:1").requires_grad_() for _ in range(3))
    o = kernels.attention(q, k, v)
    grads = torch.autograd.grad(o.square().sum(), [q, k, v])
    o_ref = kernels.attention_reference(q, k, v)
    grads_ref = torch.autograd.grad(o_ref.square().sum(), [q, k, v])
    torch.testing.assert_close(o, o_ref, atol=1e-4, rtol=0)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert torch.cuda.current_device() == 0
