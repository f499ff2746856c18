"""Triton launches a kernel on the current CUDA device (and that device's current stream), whatever
device its pointers live on. The launchers therefore make their tensors' device current first, so that
tensors on cuda:1 work while cuda:0 is current (one process driving several GPUs)."""
import functools

import torch


def on_tensor_device(launcher):
    """Decorator: run launcher(tensor, ...) with tensor's CUDA device current (other devices: as is)."""

    @functools.wraps(launcher)
    def launch(tensor, *args, **kwargs):
        if tensor.device.type != "cuda":
            return launcher(tensor, *args, **kwargs)
        with torch.cuda.device(tensor.device):
            return launcher(tensor, *args, **kwargs)

    return launch
