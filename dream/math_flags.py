"""The process-wide math switches of a CUDA run: TF32 for fp32 matmuls and convolutions, cuDNN autotuning.

The trainer turns them on (`use_fast_math`). Code that must leave the process as it found it (memory
measurement, benchmarks, tests) snapshots and restores them (`MathFlags`); fp32 references are computed
with TF32 off (`exact_fp32`).
"""
import torch


class MathFlags:
    """Context manager: the switches (and the fp32 matmul precision they imply) are restored on exit."""

    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                      torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision())
        return self

    def __exit__(self, *exc):
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark, precision) = self.saved
        torch.set_float32_matmul_precision(precision)
        return False


class exact_fp32(MathFlags):
    """TF32 off inside: fp32 matmuls and convolutions in true fp32 (references)."""

    def __enter__(self):
        super().__enter__()
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        return self


def use_fast_math() -> None:
    """The trainer's settings on CUDA: TF32 matmuls and convolutions, cuDNN autotuning."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
