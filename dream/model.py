"""The seed's UNet for 64x64 images, with interchangeable GroupNorm and attention backends.

Topology (see shared/notes/seed-model.md), channels for the `seed` preset:

    conv_in 3->128
    down  64x64: Res 128->128, Res 128->128,              conv s2 -> 32x32   skip h1
    down  32x32: Res 128->256, Res 256->256,              conv s2 -> 16x16   skip h2
    down  16x16: Res 256->512, Res 512->512, Attn,        conv s2 ->  8x8    skip h3
    mid    8x8:  Res 512->512, Attn, Res 512->512
    up    16x16: convT 512->512, cat[h, resize(h3)], Res 1024->512, Res 512->512, Attn
    up    32x32: convT 512->256, cat[h, resize(h2)], Res  512->256, Res 256->256
    up    64x64: convT 256->128, cat[h, resize(h1)], Res  256->128, Res 128->128
    out: GN, SiLU, conv 128->3 (zero-initialised)

ResBlock (the seed's order): h = conv1(SiLU(GN(x))); h = h*(1+s)+t; h = conv2(drop(SiLU(GN(h)))); h + skip(x).

Backends change how the GroupNorm(+scale/shift)(+SiLU) sites and the attention core are
computed, never the parameters: every backend has the same state_dict.
  eager  - plain PyTorch (nn.GroupNorm, F.silu, einsum softmax attention), the reference;
  sdpa   - eager GroupNorm, attention through F.scaled_dot_product_attention;
  triton - kernels.group_norm_silu at every GroupNorm site (the ResBlock's dropout fused into
           its second one, and conv1's bias folded into that norm's shift), kernels.attention for
           attention, and every ResBlock's time projection in one matmul (UNet.time_projections).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as activation_checkpoint

BACKENDS = ("eager", "sdpa", "triton")
PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtype (None: none)
PRECISIONS = tuple(PRECISION_DTYPES)
# activation checkpointing, least recomputation first. "norms" (triton backend): every norm that feeds a
# convolution is recomputed in backward instead of its output saved (one fused norm kernel per site)
CHECKPOINT_POLICIES = ("none", "norms", "attention", "resblocks", "all")
# those that recompute the ResBlocks' dropout in backward under torch.utils.checkpoint, which restores the random
# generator's state for it: outside a CUDA graph capture only (inside one, the recomputation draws anew)
DROPOUT_RECOMPUTING_POLICIES = ("resblocks", "all")


def policies_for_backend(backend: str) -> tuple:
    """The checkpointing policies a backend supports ("norms" recomputes the fused Triton norm)."""
    return CHECKPOINT_POLICIES if backend == "triton" else tuple(p for p in CHECKPOINT_POLICIES if p != "norms")


def check_policy_backend(policy: str, backend: str) -> None:
    """One-line ValueError when the backend lacks the checkpointing policy."""
    if policy not in policies_for_backend(backend):
        raise ValueError(f"checkpointing {policy!r} recomputes the fused Triton norm: it needs backend 'triton', "
                         f"not {backend!r}")


@dataclass(frozen=True)
class UNetConfig:
    image_size: int = 64
    in_channels: int = 3
    base_channels: int = 128
    channel_mults: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (2,)  # encoder/decoder levels (0 = full resolution) with attention
    num_groups: int = 8
    num_heads: int = 8
    dropout: float = 0.1
    norm_eps: float = 1e-5

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.base_channels

    @property
    def sinusoidal_dim(self) -> int:
        return self.base_channels

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    "seed": UNetConfig(),
    "tiny": UNetConfig(base_channels=32),
}


def make_config(preset: str = "seed", **overrides) -> UNetConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    for key in ("channel_mults", "attention_levels"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    config = replace(PRESETS[preset], **overrides)
    validate_config(config)
    return config


def validate_config(config: UNetConfig) -> None:
    for name in ("image_size", "in_channels", "base_channels", "num_res_blocks", "num_groups", "num_heads"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not config.channel_mults or any(isinstance(m, bool) or not isinstance(m, int) or m < 1
                                       for m in config.channel_mults):
        raise ValueError(f"channel_mults must be positive integers, got {config.channel_mults!r}")
    if not config.norm_eps > 0:
        raise ValueError(f"norm_eps must be positive, got {config.norm_eps!r}")
    widths = [config.base_channels * m for m in config.channel_mults]
    for width in widths:
        if width % config.num_groups:
            raise ValueError(f"channel width {width} is not divisible by num_groups={config.num_groups}")
        if width % config.num_heads:
            raise ValueError(f"channel width {width} is not divisible by num_heads={config.num_heads}")
    if config.image_size % (2 ** len(widths)):
        raise ValueError(f"image_size {config.image_size} must be divisible by {2 ** len(widths)}")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {config.dropout}")
    for level in config.attention_levels:
        if not 0 <= level < len(widths):
            raise ValueError(f"attention level {level} out of range for {len(widths)} levels")


def autocast_for(precision: str, device_type: str):
    """torch.autocast for a precision name ("fp32": no autocast)."""
    dtype = PRECISION_DTYPES[precision]
    return nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def import_kernels():
    """The `kernels` package, or a one-line ValueError when it cannot be imported (triton missing, or
    TRITON_INTERPRET set after triton was imported)."""
    try:
        import kernels
        import kernels.device
    except ImportError as error:
        raise ValueError(f"backend 'triton' needs the Triton kernels, which do not import: {error} "
                         f"(pip install triton, or use --backend eager or sdpa)") from None
    return kernels


def check_backend_device(backend: str, device, autocast_dtype: torch.dtype | None = None) -> None:
    """The triton backend on a CPU device only runs through the Triton interpreter, which gets bf16 wrong:
    say so, in one line, rather than fail inside a kernel launch (and never fall back to eager silently)."""
    if backend != "triton" or torch.device(device).type != "cpu":
        return
    if not import_kernels().device.interpreting():
        raise ValueError("backend 'triton' runs its kernels on a CUDA GPU; on a CPU set TRITON_INTERPRET=1 before "
                         "starting (very slow, for tests) or use --backend eager")
    if autocast_dtype == torch.bfloat16:
        raise ValueError("backend 'triton' on a CPU runs through the Triton interpreter, whose bf16 is wrong; use "
                         "fp32 or fp16 there, or --backend eager")


def resolve_channels_last(value: bool | None, device) -> bool:
    """The model's memory format: channels_last when asked, or by default (None) on CUDA, where cuDNN's
    convolutions run NHWC and an NCHW model pays a layout conversion around each of them (on an H200, 15 %
    of a training step's kernel time at batch 128)."""
    return torch.device(device).type == "cuda" if value is None else bool(value)


def to_channels_last(model: nn.Module) -> nn.Module:
    """model.to(memory_format=torch.channels_last) in place, parameter by parameter (its 4-D ones), which
    also works on fake tensors (FakeTensorMode), whose parameters refuse Module.to."""
    for param in model.parameters():
        if param.dim() == 4:
            param.data = param.data.contiguous(memory_format=torch.channels_last)
    return model


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """emb = [sin(t f), cos(t f)] with f_i = exp(-i ln(10000) / (dim/2 - 1)), i = 0 .. dim/2 - 1."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def norm_act(norm: nn.GroupNorm, x: torch.Tensor, backend: str, scale=None, shift=None, silu: bool = True,
             dropout: nn.Dropout | None = None):
    """dropout(act(GN(x * (1 + scale) + shift))) with GN's affine; scale, shift are (N, C) or None.
    The triton backend fuses all of it into one kernel (its dropout mask is regenerated in backward,
    never stored); the others run dropout as a module."""
    if backend == "triton":
        from kernels import group_norm_silu

        dropout_p = dropout.p if dropout is not None and dropout.training else 0.0
        return group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps,
                               scale=scale, shift=shift, mode="pre", silu=silu, dropout_p=dropout_p)
    if scale is not None:
        x = x * (1 + scale[:, :, None, None])
    if shift is not None:
        x = x + shift[:, :, None, None]
    x = norm(x)
    x = F.silu(x) if silu else x
    return dropout(x) if dropout is not None else x


def norm_act_conv(norm: nn.GroupNorm, conv: nn.Conv2d, x: torch.Tensor, backend: str, recompute_norm: bool = False,
                  scale=None, shift=None, silu: bool = True, dropout: nn.Dropout | None = None,
                  conv_bias: bool = True) -> torch.Tensor:
    """conv(norm_act(norm, x, ...)), with conv's bias unless conv_bias is False. recompute_norm (triton
    backend): the norm's output is recomputed in backward rather than saved, one activation less per site
    (kernels.group_norm_silu_conv2d; the same values and gradients)."""
    bias = conv.bias if conv_bias else None
    if recompute_norm:
        from kernels import group_norm_silu_conv2d

        dropout_p = dropout.p if dropout is not None and dropout.training else 0.0
        return group_norm_silu_conv2d(x, norm.weight, norm.bias, norm.num_groups, conv.weight, bias, conv.stride,
                                      conv.padding, conv.dilation, conv.groups, norm.eps, scale=scale, shift=shift,
                                      mode="pre", silu=silu, dropout_p=dropout_p)
    h = norm_act(norm, x, backend, scale=scale, shift=shift, silu=silu, dropout=dropout)
    if conv_bias:
        return conv(h)  # the module itself: hooks (dream info's per-block FLOPs) see it
    return F.conv2d(h, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor laid out that way (and not also NCHW-contiguous), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


RESIZE_MAX_ELEMENTS = 2**31 - 2  # CUDA's channels_last bilinear kernel needs output.numel() < INT_MAX
RESIZE_MAX_PARTS = 2**16  # 2^47 elements: beyond any device


def resize_skip(skip: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of a skip to like's height and width, computed in fp32 or wider
    (fp32 for half skips, as CUDA autocast computes it) and returned in like's dtype and memory format (so
    that the concatenation, and the first ResBlock of the stage with its saved activations, stay in like's
    dtype under autocast).

    The resize runs on a channels_last copy: CUDA's NCHW bilinear kernel gives each thread one output
    position and loops over all N*C planes inside it (on an H200, batch 128: 39 % of a training step's
    kernel time, 64 % of a sampling step's); its channels_last kernel gives each thread one element, with
    32-bit indices (fewer than RESIZE_MAX_ELEMENTS outputs a call), so a very large batch goes in parts."""
    x = skip.to(torch.promote_types(skip.dtype, torch.float32), memory_format=torch.channels_last)
    size = like.shape[-2:]
    per_image = x.shape[1] * size[0] * size[1]
    part = max(1, RESIZE_MAX_ELEMENTS // per_image)
    if x.shape[0] > part * RESIZE_MAX_PARTS:  # (no device holds such a batch; the list of parts would fill the host)
        raise ValueError(f"resize_skip: {x.shape[0]} images of {per_image} elements take more than {RESIZE_MAX_PARTS} "
                         f"parts within 32-bit offsets")
    if x.shape[0] <= part:
        y = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    else:
        y = torch.cat([F.interpolate(p, size=size, mode="bilinear", align_corners=False) for p in x.split(part)])
    return y.to(like.dtype, memory_format=memory_format_of(like))


def concat_skip(x: torch.Tensor, skip: torch.Tensor, upsample: nn.ConvTranspose2d, backend: str) -> torch.Tensor:
    """cat([h, skip resized to h's size], dim=1) with h = upsample(x), in h's dtype and memory format. The
    triton backend runs the transposed convolution without its bias and adds the bias, resizes and
    concatenates in one kernel (kernels.upsample2x_concat) when skip is exactly half of h, as at every
    decoder stage of a model run at an image size divisible by 2^levels; other sizes take resize_skip and
    torch.cat."""
    if backend == "triton":
        h = F.conv_transpose2d(x, upsample.weight, None, upsample.stride, upsample.padding, upsample.output_padding,
                               upsample.groups, upsample.dilation)
        if (2 * skip.shape[-2], 2 * skip.shape[-1]) == tuple(h.shape[-2:]):
            from kernels import upsample2x_concat

            return upsample2x_concat(h, skip, upsample.bias)
        h = h + upsample.bias.view(1, -1, 1, 1).to(h.dtype)
    else:
        h = upsample(x)
    return torch.cat([h, resize_skip(skip, h)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, time_dim: int, num_groups: int, dropout: float, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * out_channels))
        self.norm2 = nn.GroupNorm(num_groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.backend = "eager"
        self.recompute_norms = False  # set by UNet.set_checkpointing("norms")

    def forward(self, x: torch.Tensor, temb: torch.Tensor, time_proj: torch.Tensor | None = None) -> torch.Tensor:
        """time_proj: this block's time_mlp(temb) when the caller computed it (UNet.time_projections);
        None computes it here."""
        if time_proj is None:
            time_proj = self.time_mlp(temb)
        scale, shift = time_proj.chunk(2, dim=1)
        recompute = self.recompute_norms and self.training and torch.is_grad_enabled()
        # triton: conv1's bias b goes into the fused norm's shift: (h + b)(1 + s) + t = h(1 + s) + (t + b(1 + s)),
        # an (N, C) sum instead of a pass over h (and, in backward, a reduction over it for b's gradient)
        fold_bias = self.backend == "triton"
        h = norm_act_conv(self.norm1, self.conv1, x, self.backend, recompute, conv_bias=not fold_bias)
        if fold_bias:
            shift = torch.addcmul(shift, 1 + scale, self.conv1.bias)
        h = norm_act_conv(self.norm2, self.conv2, h, self.backend, recompute, scale=scale, shift=shift,
                          dropout=self.dropout, conv_bias=not fold_bias)
        if not fold_bias:
            return h + self.skip(x)
        # triton: conv2's bias (and the 1x1 skip convolution's) goes into the residual sum, one pass
        # instead of a bias pass per convolution and the sum
        from kernels import add_bias_residual

        if isinstance(self.skip, nn.Conv2d):
            return add_bias_residual(h, F.conv2d(x, self.skip.weight), self.conv2.bias + self.skip.bias)
        return add_bias_residual(h, x, self.conv2.bias)


class Attention(nn.Module):
    """x + proj(softmax(q k^T / sqrt(d)) v) over the H*W tokens, heads split from channels."""

    def __init__(self, channels: int, num_heads: int, num_groups: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(num_groups, channels, eps=eps)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.backend = "eager"
        self.recompute_norms = False  # set by UNet.set_checkpointing("norms")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        heads, head_dim = self.num_heads, c // self.num_heads
        recompute = self.recompute_norms and self.training and torch.is_grad_enabled()
        qkv = norm_act_conv(self.norm, self.qkv, x, self.backend, recompute, silu=False)
        if self.backend == "triton":
            from kernels import add_bias_residual, attention_qkv_nchw

            # reads q, k, v in place from the (b, 3c, h, w) conv output and writes (b, c, h, w); the
            # projection's bias goes into the residual sum
            out = F.conv2d(attention_qkv_nchw(qkv, heads), self.proj_out.weight)
            return add_bias_residual(out, x, self.proj_out.bias)
        # channels split as (3, heads, head_dim); tokens n = y * width + x
        q, k, v = qkv.reshape(b, 3, heads, head_dim, height * width).unbind(1)
        if self.backend == "eager":
            scores = torch.einsum("bhcn,bhcm->bhnm", q, k) * head_dim ** -0.5
            out = torch.einsum("bhnm,bhcm->bhcn", scores.softmax(dim=-1), v)
        else:
            q, k, v = (t.transpose(-1, -2) for t in (q, k, v))  # (b, heads, tokens, head_dim)
            out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2)
        return x + self.proj_out(out.reshape(b, c, height, width))


class UNet(nn.Module):
    def __init__(self, config: UNetConfig | None = None, backend: str = "eager", checkpointing: str = "none"):
        super().__init__()
        self.config = config = config or UNetConfig()
        validate_config(config)
        time_dim = config.time_embed_dim
        widths = [config.base_channels * m for m in config.channel_mults]
        res = dict(time_dim=time_dim, num_groups=config.num_groups, dropout=config.dropout, eps=config.norm_eps)
        attn = dict(num_heads=config.num_heads, num_groups=config.num_groups, eps=config.norm_eps)

        self.time_mlp = nn.Sequential(
            nn.Linear(config.sinusoidal_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
        )
        self.conv_in = nn.Conv2d(config.in_channels, config.base_channels, 3, padding=1)

        self.down = nn.ModuleList()
        channels = config.base_channels
        for level, width in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock(channels, width, **res))
                channels = width
            if level in config.attention_levels:
                blocks.append(Attention(width, **attn))
            stage = nn.Module()
            stage.blocks = blocks
            stage.downsample = nn.Conv2d(width, width, 3, stride=2, padding=1)
            self.down.append(stage)

        self.mid = nn.ModuleList([ResBlock(channels, channels, **res), Attention(channels, **attn),
                                  ResBlock(channels, channels, **res)])

        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            width = widths[level]
            stage = nn.Module()
            stage.upsample = nn.ConvTranspose2d(channels, width, 4, stride=2, padding=1)
            blocks = nn.ModuleList([ResBlock(2 * width, width, **res)])
            blocks.extend(ResBlock(width, width, **res) for _ in range(config.num_res_blocks - 1))
            if level in config.attention_levels:
                blocks.append(Attention(width, **attn))
            stage.blocks = blocks
            self.up.append(stage)
            channels = width

        self.norm_out = nn.GroupNorm(config.num_groups, channels, eps=config.norm_eps)
        self.conv_out = nn.Conv2d(channels, config.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

        self.backend = "eager"
        self.checkpointing = "none"
        self.recompute_norms = False
        self.set_backend(backend)
        self.set_checkpointing(checkpointing)

    def set_backend(self, backend: str) -> "UNet":
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        check_policy_backend(self.checkpointing, backend)
        if backend == "triton":
            supported_head_dims = import_kernels().SUPPORTED_HEAD_DIMS  # one clear line if triton is unusable
            for module in self.modules():
                if isinstance(module, Attention):
                    channels = module.norm.num_channels
                    head_dim = channels // module.num_heads
                    if head_dim not in supported_head_dims:
                        raise ValueError(
                            f"backend 'triton': attention head dim {head_dim} ({channels} channels / "
                            f"{module.num_heads} heads) is not one the attention kernel supports "
                            f"{supported_head_dims}; change the base channels or heads, or use backend 'sdpa'")
        self.backend = backend
        for module in self.modules():
            if isinstance(module, (ResBlock, Attention)):
                module.backend = backend
        return self

    def set_checkpointing(self, policy: str) -> "UNet":
        if policy not in CHECKPOINT_POLICIES:
            raise ValueError(f"unknown checkpoint policy {policy!r}; choose one of {CHECKPOINT_POLICIES}")
        check_policy_backend(policy, self.backend)
        self.checkpointing = policy
        for module in self.modules():
            if isinstance(module, (UNet, ResBlock, Attention)):
                module.recompute_norms = policy == "norms"
        return self

    def resblocks(self) -> list[ResBlock]:
        """The ResBlocks in the order forward calls them."""
        blocks = [block for stage in self.down for block in stage.blocks] + list(self.mid)
        blocks += [block for stage in self.up for block in stage.blocks]
        return [block for block in blocks if isinstance(block, ResBlock)]

    def time_projections(self, temb: torch.Tensor) -> list[torch.Tensor]:
        """Every ResBlock's time_mlp(temb) = Linear(SiLU(temb)), in resblocks() order, from one SiLU and one
        matmul over the blocks' Linear weights concatenated (views of one (N, sum of 2C) result): a handful of
        operators instead of a SiLU, a matmul and their casts per block, forward and backward. The same math;
        only the matmul's summation order may differ."""
        linears = [block.time_mlp[1] for block in self.resblocks()]
        weight = torch.cat([linear.weight for linear in linears])
        bias = torch.cat([linear.bias for linear in linears])
        projected = F.linear(F.silu(temb), weight, bias)
        return list(projected.split([linear.out_features for linear in linears], dim=1))

    def _run(self, block: nn.Module, h: torch.Tensor, temb: torch.Tensor, time_projs=None) -> torch.Tensor:
        """block(h) or block(h, temb, its time projection: the next of the iterator time_projs, if given)."""
        is_attention = isinstance(block, Attention)
        args = (h,) if is_attention else (h, temb, None if time_projs is None else next(time_projs))
        policy = self.checkpointing
        wanted = (policy == "all" or (policy == "attention" and is_attention)
                  or (policy == "resblocks" and not is_attention))
        if wanted and self.training and torch.is_grad_enabled():
            return activation_checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(timestep_embedding(t, self.config.sinusoidal_dim).to(x.dtype))
        # triton: the ResBlocks' time projections in one matmul (the other backends: each block its own)
        time_projs = iter(self.time_projections(temb)) if self.backend == "triton" else None
        h = self.conv_in(x)
        skips = []
        for stage in self.down:
            for block in stage.blocks:
                h = self._run(block, h, temb, time_projs)
            h = stage.downsample(h)
            skips.append(h)
        for block in self.mid:
            h = self._run(block, h, temb, time_projs)
        for stage in self.up:
            h = concat_skip(h, skips.pop(), stage.upsample, self.backend)
            for block in stage.blocks:
                h = self._run(block, h, temb, time_projs)
        recompute = self.recompute_norms and self.training and torch.is_grad_enabled()
        return norm_act_conv(self.norm_out, self.conv_out, h, self.backend, recompute)


def build_unet(preset: str = "seed", backend: str = "eager", checkpointing: str = "none", **overrides) -> UNet:
    return UNet(make_config(preset, **overrides), backend=backend, checkpointing=checkpointing)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
