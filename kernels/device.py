"""Triton launches a kernel on the current CUDA device (and that device's current stream), whatever
device its pointers live on. The launchers therefore make their tensors' device current first, so that
tensors on cuda:1 work while cuda:0 is current (one process driving several GPUs)."""
import functools

import torch

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


def check_interpreter_device(t, interpreted: bool, op: str, reference: str) -> None:
    """CPU tensors run only through the Triton interpreter (TRITON_INTERPRET=1 when the kernels were
    decorated): otherwise a one-line error naming the op and its eager reference, never a silent fallback."""
    if t.device.type == "cpu" and not interpreted:
        raise RuntimeError(
            f"{op}: got CPU tensors but the Triton kernels were not built for the interpreter; set "
            f"TRITON_INTERPRET=1 before importing kernels, use CUDA tensors, or call {reference}")
