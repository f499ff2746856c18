"""Triton kernels for the DREAM UNet, each with its eager reference beside it.

This package never imports `dream`. On a machine without a GPU, set
TRITON_INTERPRET=1 before importing it to run the kernels on CPU tensors.
"""
from kernels.group_norm_silu import (dropout_keep_mask, dropout_scale, group_norm_silu, group_norm_silu_reference,
                                     new_dropout_seed)
from kernels.attention import (SUPPORTED_HEAD_DIMS, attention, attention_qkv_nchw, attention_qkv_nchw_reference,
                               attention_reference)
from kernels.norm_conv import group_norm_silu_conv2d, group_norm_silu_conv2d_reference
from kernels.upsample_concat import upsample2x_concat, upsample2x_concat_reference
from kernels.bias_residual import add_bias_residual, add_bias_residual_reference

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
]
