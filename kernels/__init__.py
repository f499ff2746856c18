"""Triton kernels for the DREAM UNet, each with its eager reference beside it.

This package never imports `dream`. On a machine without a GPU, set
TRITON_INTERPRET=1 before anything imports triton (in the shell, or first thing in the program:
torch.compile imports triton) to run the kernels on CPU tensors.
Launch configurations come from heuristics, or, with autotuning on (set_autotune(True) or
DREAM_KERNEL_AUTOTUNE=1; kernels.autotune), from timing candidates on the GPU at first use.
Each op is a torch.library custom op; in plain eager mode a call runs its implementation directly,
without the dispatcher's per-call cost (kernels.dispatch).
"""
from kernels.device import check_interpreter_mode

check_interpreter_mode()

from kernels.group_norm_silu import (dropout_keep_mask, dropout_scale, group_norm_silu, group_norm_silu_reference,
                                     new_dropout_seed)
from kernels.attention import (SUPPORTED_HEAD_DIMS, attention, attention_qkv_nchw, attention_qkv_nchw_reference,
                               attention_reference)
from kernels.norm_conv import group_norm_silu_conv2d, group_norm_silu_conv2d_reference
from kernels.upsample_concat import upsample2x_concat, upsample2x_concat_reference
from kernels.bias_residual import add_bias_residual, add_bias_residual_reference
from kernels.autotune import set_autotune

__all__ = [
    "group_norm_silu",
    "group_norm_silu_reference",
    "dropout_keep_mask",
    "dropout_scale",
    "new_dropout_seed",
    "group_norm_silu_conv2d",
    "group_norm_silu_conv2d_reference",
    "attention",
    "attention_reference",
    "attention_qkv_nchw",
    "attention_qkv_nchw_reference",
    "SUPPORTED_HEAD_DIMS",
    "upsample2x_concat",
    "upsample2x_concat_reference",
    "add_bias_residual",
    "add_bias_residual_reference",
    "set_autotune",
]
