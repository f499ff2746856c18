"""Memory formats of the kernels' outputs, the reach of their 32-bit offsets, and the integer arithmetic
of their launch grids."""
import torch

# the kernels address the elements within one sample (attention: one (batch, head)) with 32-bit offsets
INT32_MAX = 2**31 - 1


def span(t: torch.Tensor, first_dim: int = 1) -> int:
    """The largest offset, in elements, from the first element of t[i, ...] (t[i, j, ...] for first_dim 2) to
    any other: sum over the dimensions from first_dim of (size - 1)·|stride|. The kernels can address t
    with 32-bit offsets within such a slice when it is at most INT32_MAX."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape[first_dim:], t.stride()[first_dim:]))


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor laid out that way (and not also NCHW-contiguous), else contiguous:
    an op's output takes its input's layout, so a channels_last model stays channels_last."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


# Host-side grid arithmetic in plain Python: Triton's triton.cdiv and triton.next_power_of_2 are
# constexpr-function objects, about 2 µs a call, and a launcher makes several calls per launch.
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1
