"""Memory formats of the kernels' outputs."""
import torch


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor laid out that way (and not also NCHW-contiguous), else contiguous:
    an op's output takes its input's layout, so a channels_last model stays channels_last."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
