"""Calls of the kernels' custom ops: straight to their Python implementation where nothing needs
torch.library's dispatcher, through the op everywhere else.

Each kernel is a torch.library custom op, so that torch.compile traces it (no graph break),
FakeTensorMode and the memory estimator see it, and torch.export keeps it. In plain eager PyTorch that
dispatch (schema binding, defaults filled in, the autograd wrapper, output-alias checks) adds host time
to every call: group_norm_silu's forward and backward take 244 µs of Python a call
through the op and 148 µs called as below, through a torch.autograd.Function (CPU, 2 cores,
torch 2.14.1, launches stubbed: bench/test_bench_dispatch.py). Host time is GPU idle time once the
kernels are fast, and a training step of the seed UNet makes 186 calls.

OpCall(name, impl, setup_context, backward)(*args) therefore runs
  - impl(*args) directly (under a torch.autograd.Function built from the op's own setup_context and
    backward when autograd records the call) when the call is plain eager: no torch.compile or export
    tracing, no TorchDispatchMode (FakeTensorMode, a memory tracker, an op recorder), no functorch
    transform, and every tensor argument a plain tensor or Parameter, not on the meta device;
  - torch.ops.<name>(*args), the dispatcher, otherwise, or inside `through_dispatcher()`.
Both run the same implementation: the same values, gradients and saved tensors. The profiler records a
direct call under the op's name. Second-order gradients (a backward run with create_graph=True) are those of
the dispatcher too: the backward is recorded by autograd on both paths, and an op without an autograd
formula (the kernels' backward ops) called on tensors that require grad in grad mode goes through torch.ops,
whose backward node raises "no autograd formula" when differentiated, never a silently missing gradient.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
# > 0 inside through_dispatcher(): process-wide, not per thread, since CUDA runs backward in the autograd
# engine's own threads
_dispatcher_forced = 0


@contextlib.contextmanager
def through_dispatcher():
    """Within it, every OpCall in the process goes through torch.ops (as under torch.compile), backward
    included: to compare the two paths."""
    global _dispatcher_forced
    _dispatcher_forced += 1
    try:
        yield
    finally:
        _dispatcher_forced -= 1


def direct_call_allowed(args) -> bool:
    """Whether a call with these arguments may skip the dispatcher (see the module docstring)."""
    if _dispatcher_forced or torch.compiler.is_compiling():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    # meta tensors take the op's fake implementation
    return all(type(a) in _PLAIN_TYPES and not a.is_meta for a in args if isinstance(a, torch.Tensor))


class OpCall:
    """A custom op `namespace::name` called as the module docstring says. impl takes the op's arguments
    (all of them, positionally); setup_context and backward are the functions given to the op's
    register_autograd (None for an op without autograd, e.g. a backward op)."""

    def __init__(self, name: str, impl: Callable, setup_context: Optional[Callable] = None,
                 backward: Optional[Callable] = None):
        self.name = name
        self.impl = impl
        namespace, op_name = name.split("::")
        self.op = getattr(getattr(torch.ops, namespace), op_name).default  # registered before this is made
        self._function = None
        if backward is not None:
            # forward(ctx, ...) calls setup_context itself: a separate setup_context staticmethod would make
            # apply bind the arguments to forward's signature (inspect.signature) at every call
            def forward(ctx, *args):
                output = impl(*args)
                setup_context(ctx, args, output)
                return output

            # the class is named after the op, so the profiler shows the forward under the op's name; backward
            # is not once_differentiable: with create_graph=True it is recorded as the dispatcher path's is
            self._function = type(name, (torch.autograd.Function,), {
                "forward": staticmethod(forward),
                "backward": staticmethod(backward),
            })

    def __call__(self, *args):
        if not direct_call_allowed(args):
            return self.op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            if self._function is None:
                return self.op(*args)  # no autograd formula: the op's autograd node says so if differentiated
            return self._function.apply(*args)  # the profiler records it under the class's (the op's) name
        if torch._C._autograd._profiler_enabled():
            with torch.autograd.profiler.record_function(self.name):
                return self.impl(*args)
        return self.impl(*args)
