"""Model facts: parameters and forward FLOPs per image, overall and per block."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from dream.model import build_unet, count_parameters, make_config


def blocks_of(module: torch.nn.Module, prefix: str = ""):
    """(name, module) of the UNet's blocks, in order: containers (ModuleList, stage) are opened up."""
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if type(child) in (torch.nn.ModuleList, torch.nn.Module):
            yield from blocks_of(child, full + ".")
        else:
            yield full, child


def model_info(preset: str = "seed", **overrides) -> dict:
    """On the meta device: shapes, parameters and FLOPs without allocating (any image size, at once). An image
    size whose tensors would hold 2^63 bytes or more is a one-line ValueError."""
    try:
        with torch.device("meta"):
            return _model_info(preset, **overrides)
    except (RuntimeError, TypeError, OverflowError) as error:
        if "overflow" not in str(error).lower():
            raise
        size = overrides.get("image_size") or make_config(preset).image_size
        raise ValueError(f"image size {size} is too large to describe: the model's tensor sizes overflow 64-bit "
                         f"integers") from None


def _model_info(preset: str, **overrides) -> dict:
    model = build_unet(preset, **overrides).eval()
    size = model.config.image_size
    x = torch.zeros(1, model.config.in_channels, size, size)
    t = torch.zeros(1, dtype=torch.long)
    shapes = {}

    def record_shape(name):
        def hook(module, args, output):
            shapes[name] = "x".join(map(str, output.shape[1:]))
        return hook

    hooks = [block.register_forward_hook(record_shape(name)) for name, block in blocks_of(model)]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t)
    for hook in hooks:
        hook.remove()
    per_module = counter.get_flop_counts()
    blocks = []
    for name, block in blocks_of(model):
        flops = sum(per_module.get(f"UNet.{name}", {}).values())
        blocks.append({"block": name, "type": type(block).__name__, "shape": shapes.get(name, ""),
                       "parameters": count_parameters(block), "gflops": flops / 1e9})
    return {
        "preset": preset,
        "config": model.config.to_dict(),
        "parameters": count_parameters(model),
        "gflops_forward_per_image": counter.get_total_flops() / 1e9,
        "blocks": blocks,
    }


def format_info(info: dict) -> str:
    lines = [f"preset {info['preset']}: {info['parameters']:,} parameters, "
             f"{info['gflops_forward_per_image']:.2f} GFLOP forward per {info['config']['image_size']}px image",
             "", f"{'block':<22} {'type':<16} {'output':<12} {'parameters':>12} {'GFLOP':>8}"]
    for b in info["blocks"]:
        lines.append(f"{b['block']:<22} {b['type']:<16} {b['shape']:<12} {b['parameters']:>12,} {b['gflops']:>8.3f}")
    return "\n".join(lines)
