"""Where and how the kernels may run.

Triton launches a kernel on the current CUDA device (and that device's current stream), whatever
device its pointers live on. The launchers therefore make their tensors' device current first, so that
tensors on cuda:1 work while cuda:0 is current (one process driving several GPUs).

On CPU tensors the kernels run through the Triton interpreter, which Triton selects per function when
it is decorated (TRITON_INTERPRET=1 read at that moment): Triton's own library functions at Triton's
import, ours at the import of `kernels`. Both must agree (check_interpreter_mode).
"""
import functools
import numbers

import torch
import triton
import triton.language as tl

_SM_COUNT: dict = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached per device index)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def on_tensor_device(launcher):
    """Decorator: run launcher(tensor, ...) with tensor's CUDA device current (other devices: as is)."""

    @functools.wraps(launcher)
    def launch(tensor, *args, **kwargs):
        if tensor.device.type != "cuda":
            return launcher(tensor, *args, **kwargs)
        with torch.cuda.device(tensor.device):
            return launcher(tensor, *args, **kwargs)

    return launch


def is_interpreted(jit_function) -> bool:
    """Whether a @triton.jit function was decorated for the interpreter (TRITON_INTERPRET=1 then)."""
    return type(jit_function).__name__ == "InterpretedFunction"


@triton.jit
def _probe_kernel():
    pass


def interpreting() -> bool:
    """Whether the kernels run through the Triton interpreter (on CPU tensors) in this process."""
    return is_interpreted(_probe_kernel)


def check_interpreter_mode() -> None:
    """Raise a one-line ImportError when our kernels and Triton's library functions were decorated in
    different modes: TRITON_INTERPRET=1 set (or unset) after Triton was imported, e.g. by torch.compile.
    Every launch would then fail deep inside Triton."""
    ours, tritons = is_interpreted(_probe_kernel), is_interpreted(tl.standard.sigmoid)
    if ours != tritons:
        state = "set" if ours else "unset"
        raise ImportError(
            f"kernels: TRITON_INTERPRET=1 was {state} after triton had been imported (torch.compile and "
            f"torch._inductor import it), so Triton's own functions and the kernels disagree; set it before "
            f"anything imports triton, e.g. in the shell: TRITON_INTERPRET=1 python ...")


def check_interpreter_device(t, interpreted: bool, op: str, reference: str) -> None:
    """CPU tensors run only through the Triton interpreter: otherwise a one-line error naming the op
    and its eager reference, never a silent fallback."""
    if t.device.type == "cpu" and not interpreted:
        raise RuntimeError(
            f"{op}: got CPU tensors but the Triton kernels were not built for the interpreter; set "
            f"TRITON_INTERPRET=1 before triton is imported, use CUDA tensors, or call {reference}")


def reject_function_transforms(op: str, reference: str, *tensors) -> None:
    """The kernels define reverse-mode autograd only: under torch.func.grad/jacrev (whose custom-op
    support needs what torch.library does not provide) and forward-mode AD (torch.func.jvp, jacfwd,
    torch.autograd.forward_ad, which would get zero tangents) raise one line instead. vmap works
    (PyTorch loops over the batch)."""
    if torch.compiler.is_compiling():
        return
    if torch._C._functorch.peek_interpreter_stack() is not None:
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
        transforms = {interpreter.key() for interpreter in retrieve_all_functorch_interpreters()}
        for transform, name in ((TransformType.Jvp, "torch.func.jvp/jacfwd"),
                                (TransformType.Grad, "torch.func.grad/vjp/jacrev")):
            if transform in transforms:
                raise RuntimeError(
                    f"{op}: {name} is not supported (the kernels have reverse-mode autograd only); use "
                    f"loss.backward() or torch.autograd.grad, or {reference} under torch.func")
        return
    if torch.autograd.forward_ad._current_level >= 0:
        for t in tensors:
            if isinstance(t, torch.Tensor) and torch.autograd.forward_ad.unpack_dual(t).tangent is not None:
                raise RuntimeError(
                    f"{op}: forward-mode AD (dual tensors) is not supported (the kernels have reverse-mode "
                    f"autograd only); use {reference} for forward-mode derivatives")


def is_int(value) -> bool:
    """A Python or numpy integer, not a bool, or a symbolic one (torch.compile's dynamic shapes trace ints as
    torch.SymInt)."""
    if type(value) is int:  # the common case, without the abstract-class check
        return True
    return isinstance(value, (numbers.Integral, torch.SymInt)) and not isinstance(value, bool)


def is_bool(value) -> bool:
    """A Python or numpy bool."""
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"))


def is_real(value) -> bool:
    """A Python or numpy integer or float, not a bool, or a symbolic one (torch.SymInt, torch.SymFloat)."""
    if type(value) is float or type(value) is int:  # the common cases, without the abstract-class check
        return True
    return isinstance(value, (numbers.Real, torch.SymInt, torch.SymFloat)) and not isinstance(value, bool)
