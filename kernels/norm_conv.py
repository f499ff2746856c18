"""GroupNorm + scale/shift + SiLU (+ dropout) followed by a convolution, without saving the norm's output.

    y   = group_norm_silu(x, gamma, beta, num_groups, eps, s, t, mode, silu, dropout_p, seed)
    out = conv2d(y, w, b, stride, padding, dilation, groups)

Separately, autograd keeps x and mean, rstd for the norm's backward, and y for the convolution's
weight gradient: two activations per site. This op keeps x only. Its backward runs the fused norm
again (one forward kernel: the same deterministic launch, so bitwise the same y, dropout mask included,
as the mask is a function of the seed), then the convolution's backward (cuDNN on a GPU), then the
norm's backward:

    y = recompute;  dy, dw, db = convolution_backward(dout, y, w);  dx, dgamma, dbeta, ds, dt = gn_backward(dy)

which costs one norm forward per site and frees one activation per site from the saved set: in the
UNet, every ResBlock's two norms, every attention block's norm and the output head.

The convolution runs in w's dtype: y is cast to it (under autocast, the wrapper casts w and b to the
autocast dtype first, as autocast does for F.conv2d) and dy is cast back to y's dtype.
"""
import functools
import importlib
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from kernels.device import is_int, reject_function_transforms
from kernels.dispatch import OpCall

# the module itself (the package attribute `kernels.group_norm_silu` is the function)
_gn = importlib.import_module("kernels.group_norm_silu")
_OP = "group_norm_silu_conv2d"


def _check_conv(x, conv_weight, conv_bias, stride, padding, dilation, groups):
    """Raise a one-line TypeError/ValueError naming the first bad convolution argument."""
    if not isinstance(conv_weight, torch.Tensor) or conv_weight.dim() != 4:
        shape = tuple(conv_weight.shape) if isinstance(conv_weight, torch.Tensor) else type(conv_weight).__name__
        raise ValueError(f"group_norm_silu_conv2d: conv_weight must be a 4-D tensor (C_out, C_in/groups, kH, kW), "
                         f"got {shape}")
    if conv_weight.device != x.device:
        raise ValueError(f"group_norm_silu_conv2d: conv_weight is on {conv_weight.device} but x is on {x.device}")
    if not conv_weight.dtype.is_floating_point:
        raise TypeError(f"group_norm_silu_conv2d: conv_weight must be floating point, got {conv_weight.dtype}")
    if not is_int(groups) or groups <= 0:
        raise ValueError(f"group_norm_silu_conv2d: groups must be a positive int, got {groups!r}")
    if conv_weight.shape[1] * groups != x.shape[1]:
        raise ValueError(f"group_norm_silu_conv2d: conv_weight {tuple(conv_weight.shape)} with groups={groups} "
                         f"expects {conv_weight.shape[1] * groups} input channels, x has {x.shape[1]}")
    if conv_bias is not None:
        if not isinstance(conv_bias, torch.Tensor) or tuple(conv_bias.shape) != (conv_weight.shape[0],):
            shape = tuple(conv_bias.shape) if isinstance(conv_bias, torch.Tensor) else type(conv_bias).__name__
            raise ValueError(f"group_norm_silu_conv2d: conv_bias must have shape ({conv_weight.shape[0]},), "
                             f"got {shape}")
        if conv_bias.device != x.device or conv_bias.dtype != conv_weight.dtype:
            raise TypeError(f"group_norm_silu_conv2d: conv_bias ({conv_bias.dtype} on {conv_bias.device}) must "
                            f"match conv_weight ({conv_weight.dtype} on {conv_weight.device})")
    for name, value in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if len(value) != 2 or not all(is_int(v) for v in value):
            raise ValueError(f"group_norm_silu_conv2d: {name} must be two ints, got {value!r}")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"group_norm_silu_conv2d: stride and dilation must be >= 1 and padding >= 0, got "
                         f"stride={stride}, padding={padding}, dilation={dilation}")


def _convolution(y, conv_weight, conv_bias, stride, padding, dilation, groups):
    return torch.ops.aten.convolution(y.to(conv_weight.dtype), conv_weight, conv_bias, stride, padding, dilation,
                                      False, [0, 0], groups)


def _forward(x, weight, bias, scale, shift, num_groups, eps, mode, silu, dropout_p, seed,
             conv_weight, conv_bias, stride, padding, dilation, groups, checked=False):
    """Launch the fused norm, then the convolution; returns (out, mean, rstd). checked: the arguments were
    validated already (the public wrapper's direct call)."""
    _gn._check_device(x, _OP)
    if not checked:
        _check_conv(x, conv_weight, conv_bias, stride, padding, dilation, groups)
    y, mean, rstd = _gn._forward(x, weight, bias, scale, shift, num_groups, eps, mode, silu, dropout_p, seed,
                                 checked=checked)
    return _convolution(y, conv_weight, conv_bias, stride, padding, dilation, groups), mean, rstd


# --------------------------------------------------------------------------------------------
# torch.library custom op and autograd
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("dream_kernels::group_norm_silu_conv2d", mutates_args=())
def _group_norm_silu_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                            num_groups: int, eps: float, mode: str, silu: bool, dropout_p: float,
                            seed: Optional[torch.Tensor], conv_weight: torch.Tensor,
                            conv_bias: Optional[torch.Tensor], stride: List[int], padding: List[int],
                            dilation: List[int], groups: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, mean, rstd): out = conv2d(group_norm_silu(x, ...), conv_weight, conv_bias, ...)."""
    return _forward(x, weight, bias, scale, shift, num_groups, eps, mode, silu, dropout_p, seed,
                    conv_weight, conv_bias, stride, padding, dilation, groups)


@_group_norm_silu_conv2d.register_fake
def _group_norm_silu_conv2d_fake(x, weight, bias, scale, shift, num_groups, eps, mode, silu, dropout_p, seed,
                                 conv_weight, conv_bias, stride, padding, dilation, groups):
    _gn._check_inputs(x, weight, bias, num_groups, eps, scale, shift, mode, silu, dropout_p, seed, op=_OP)
    _check_conv(x, conv_weight, conv_bias, stride, padding, dilation, groups)
    y = torch.empty_like(x, memory_format=_gn.memory_format_of(x))
    stats_shape = (x.shape[0], num_groups)
    return (_convolution(y, conv_weight, conv_bias, stride, padding, dilation, groups),
            x.new_empty(stats_shape, dtype=torch.float32), x.new_empty(stats_shape, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    (x, weight, bias, scale, shift, num_groups, eps, mode, silu, dropout_p, seed,
     conv_weight, conv_bias, stride, padding, dilation, groups) = inputs
    _, mean, rstd = output
    # not the norm's output: backward recomputes it from x (and the dropout mask from the seed)
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd, seed, conv_weight)
    ctx.norm = (num_groups, eps, mode, silu, dropout_p)
    ctx.conv = (stride, padding, dilation, groups)
    ctx.has_conv_bias = conv_bias is not None
    ctx.mark_non_differentiable(mean, rstd)


def _autograd_backward(ctx, dout, _dmean, _drstd):
    x, weight, bias, scale, shift, mean, rstd, seed, conv_weight = ctx.saved_tensors
    num_groups, eps, mode, silu, dropout_p = ctx.norm
    stride, padding, dilation, groups = ctx.conv
    y, _, _ = _gn.group_norm_silu_fwd_call(x, weight, bias, scale, shift, num_groups, eps, mode, silu, dropout_p,
                                           seed)
    # only the gradients autograd asks for: a frozen convolution costs no weight gradient, frozen norm inputs
    # (x, weight, bias, scale, shift) no norm backward
    norm_grads = any(ctx.needs_input_grad[:5])
    dy, dconv_weight, dconv_bias = torch.ops.aten.convolution_backward(
        dout, y.to(conv_weight.dtype), conv_weight, [conv_weight.shape[0]] if ctx.has_conv_bias else None,
        stride, padding, dilation, False, [0, 0], groups,
        [norm_grads, ctx.needs_input_grad[11], ctx.has_conv_bias and ctx.needs_input_grad[12]])
    del y
    dx = dweight = dbias = dscale = dshift = None
    if norm_grads:
        dx, dweight, dbias, dscale, dshift = _gn.group_norm_silu_bwd_call(
            dy.to(x.dtype), x, weight, bias, scale, shift, mean, rstd, num_groups, eps, mode, silu, dropout_p, seed)
    return (dx, dweight, dbias,
            dscale if scale is not None else None,
            dshift if shift is not None else None,
            None, None, None, None, None, None,
            dconv_weight, dconv_bias if ctx.has_conv_bias else None,
            None, None, None, None)


_group_norm_silu_conv2d.register_autograd(_autograd_backward, setup_context=_setup_context)
# the op as the wrapper calls it: straight to _forward in plain eager mode (kernels.dispatch), without checking
# again what the wrapper checked
_group_norm_silu_conv2d_call = OpCall(f"dream_kernels::{_OP}", functools.partial(_forward, checked=True),
                                      _setup_context, _autograd_backward)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def _pair(value, name):
    if is_int(value):
        return [int(value), int(value)]
    if isinstance(value, (tuple, list)):
        return [int(v) if is_int(v) else v for v in value]
    raise ValueError(f"group_norm_silu_conv2d: {name} must be an int or two ints, got {value!r}")


def group_norm_silu_conv2d(x, weight, bias, num_groups, conv_weight, conv_bias=None, stride=1, padding=0,
                           dilation=1, groups=1, eps=1e-5, scale=None, shift=None, mode="pre", silu=True,
                           dropout_p=0.0, seed=None):
    """conv2d(group_norm_silu(x, weight, bias, num_groups, eps, scale, shift, mode, silu, dropout_p, seed),
    conv_weight, conv_bias, stride, padding, dilation, groups), saving x but not the norm's output for
    backward (which recomputes it: see the module docstring).

    Arguments as for kernels.group_norm_silu and F.conv2d. Under autocast on x's device, conv_weight and
    conv_bias are cast to the autocast dtype (gradients flow back to the originals in their dtypes), as
    autocast does for F.conv2d. Returns the convolution's output in conv_weight's (cast) dtype.
    """
    seed = _gn._seed_or_new(x, dropout_p, seed)
    _gn._check_inputs(x, weight, bias, num_groups, eps, scale, shift, mode, silu, dropout_p, seed, op=_OP)
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    _check_conv(x, conv_weight, conv_bias, stride, padding, dilation, groups)
    reject_function_transforms(_OP, f"{_OP}_reference", x, weight, bias, scale, shift, conv_weight, conv_bias)
    device_type = x.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        conv_weight = conv_weight.to(dtype)
        conv_bias = conv_bias.to(dtype) if conv_bias is not None else None
    out, _, _ = _group_norm_silu_conv2d_call(
        x, weight, bias, scale, shift, int(num_groups), float(eps), mode, bool(silu), float(dropout_p),
        seed if dropout_p > 0 else None, conv_weight, conv_bias, stride, padding, dilation, int(groups))
    return out


def group_norm_silu_conv2d_reference(x, weight, bias, num_groups, conv_weight, conv_bias=None, stride=1,
                                     padding=0, dilation=1, groups=1, eps=1e-5, scale=None, shift=None, mode="pre",
                                     silu=True, dropout_p=0.0, seed=None):
    """Eager PyTorch version (plain autograd, which saves the norm's output): group_norm_silu_reference,
    cast to conv_weight's dtype, then F.conv2d."""
    y = _gn.group_norm_silu_reference(x, weight, bias, num_groups, eps, scale, shift, mode, silu, dropout_p, seed)
    return F.conv2d(y.to(conv_weight.dtype), conv_weight, conv_bias, stride, padding, dilation, groups)


OP_IMPLEMENTATIONS = {"dream_kernels::group_norm_silu_conv2d": _forward}
