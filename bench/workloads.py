"""Model-level workloads shared by the UNet, training-step, sampling and memory suites.

Full size (GPU): the seed preset (54.85M parameters, 64x64). Small (CPU): the tiny preset cut down
so the Triton interpreter (~10 ms per program instance) gets through a forward in seconds: 8x8
images, two levels, one ResBlock per level, 2 GroupNorm groups, attention at the 4x4 level with 2
heads of 32 dims (the kernel needs D in {32, 64, 128}), batch 1.
Every model gets random GroupNorm affines and a random output head (dream.profile.randomize_parameters):
nothing is timed or checked on zeros.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from bench.harness import DEVICE, ON_GPU, SETTINGS

SMALL_MODEL = {"image_size": 8, "channel_mults": (1, 2), "num_res_blocks": 1, "attention_levels": (1,),
               "num_heads": 2, "num_groups": 2}
PRESET = "seed" if SETTINGS.full else "tiny"
MODEL_OVERRIDES = {} if SETTINGS.full else dict(SMALL_MODEL)
OURS_PRECISION = "bf16" if ON_GPU else "fp32"  # the interpreter mishandles bf16
PRECISION_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_model(backend: str = "eager", seed: int = 0, **overrides) -> torch.nn.Module:
    from dream.model import build_unet
    from dream.profile import randomize_parameters

    torch.manual_seed(seed)
    model = build_unet(PRESET, backend=backend, **{**MODEL_OVERRIDES, **overrides})
    return randomize_parameters(model, seed).to(DEVICE)


def autocast(precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(DEVICE.type, dtype=PRECISION_DTYPE[precision])


def clone_model(reference: torch.nn.Module, backend: str, channels_last: bool = False) -> torch.nn.Module:
    """A new UNet with the reference's weights and the given backend."""
    from dream.model import UNet

    model = UNet(reference.config, backend=backend).to(DEVICE)
    model.load_state_dict(reference.state_dict())
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def model_inputs(batch: int, config, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, config.in_channels, config.image_size, config.image_size)
    return {"x": torch.randn(shape, generator=g).to(DEVICE),
            "t": torch.randint(0, 1000, (batch,), generator=g).to(DEVICE),
            "grad": torch.randn(shape, generator=g).to(DEVICE)}


def param_grads(params, grads=None) -> tuple[torch.Tensor, ...]:
    """Each parameter's gradient as an fp32 vector (`grads`, else each p.grad; a missing one counts as zeros).
    Checked one parameter at a time: in one concatenated vector a small parameter's gradient (a norm's
    affine, an attention block's qkv: a few % of the whole norm) could be entirely wrong within a
    model-level tolerance."""
    params = list(params)  # (model.parameters() is a generator: read once for the grads, once for zip)
    grads = [p.grad for p in params] if grads is None else list(grads)
    if len(grads) != len(params):
        raise ValueError(f"{len(grads)} gradients for {len(params)} parameters")
    return tuple((g if g is not None else torch.zeros_like(p)).detach().float().flatten()
                 for g, p in zip(grads, params))


def grad_names(model: torch.nn.Module) -> tuple[str, ...]:
    """The output names of param_grads(model.parameters()): 'grad <parameter name>'."""
    return tuple(f"grad {name}" for name, _ in model.named_parameters())
