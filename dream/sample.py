"""Generate images from a checkpoint: PNGs written as they are made, resumable, and a grid.

Batch b starts from noise drawn with a generator seeded by (seed, b), so a batch's images do not
depend on which other batches were made in this call: rerunning skips the batches already written.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dream.checkpoint import load_model_for_sampling
from dream.errors import DreamError

SAMPLERS = ("ddpm", "ddim")


def image_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"{index:06d}.png"


def save_images(images: torch.Tensor, out_dir: Path, first_index: int) -> None:
    """images in [-1, 1], (B, 3, H, W) -> out_dir/<index>.png"""
    from PIL import Image

    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i, array in enumerate(pixels):
        path = image_path(out_dir, first_index + i)
        tmp = path.with_name(f".{path.name}.tmp")
        Image.fromarray(array).save(tmp, format="PNG")
        tmp.replace(path)


def batch_noise(seed: int, batch_index: int, shape, device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + batch_index)
    return torch.randn(shape, generator=generator).to(device)


def sample_images(model, diffusion, count: int, out_dir: str | Path, sampler: str = "ddim", steps: int = 50,
                  eta: float = 0.0, batch_size: int = 64, seed: int = 0, dtype: torch.dtype = torch.float32,
                  progress: bool = True) -> dict:
    if sampler not in SAMPLERS:
        raise DreamError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if count < 1 or batch_size < 1:
        raise DreamError("--count and --batch-size must be positive")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    config = model.config
    shape = (batch_size, config.in_channels, config.image_size, config.image_size)
    made, start = 0, time.perf_counter()
    batches = math.ceil(count / batch_size)
    bar = tqdm(total=count, desc=f"sampling ({sampler})", disable=not progress, unit="img")
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else torch.autocast(
        device.type, enabled=False)
    for b in range(batches):
        first = b * batch_size
        n = min(batch_size, count - first)
        if all(image_path(out_dir, first + i).exists() for i in range(n)):
            bar.update(n)
            continue
        x_T = batch_noise(seed, b, shape, device)
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + b + 1)
        with autocast:
            if sampler == "ddpm":
                x = diffusion.p_sample_loop(model, shape, generator=generator, x_T=x_T, progress=False)
            else:
                x = diffusion.ddim_sample_loop(model, shape, steps=steps, eta=eta, generator=generator, x_T=x_T,
                                               progress=False)
        save_images(x[:n], out_dir, first)
        made += n
        bar.update(n)
        bar.set_postfix(img_s=f"{made / (time.perf_counter() - start):.2f}")
    bar.close()
    return {"count": count, "made": made, "out_dir": str(out_dir), "sampler": sampler,
            "steps": diffusion.num_timesteps if sampler == "ddpm" else steps, "eta": eta, "seed": seed}


def save_grid(out_dir: str | Path, count: int, path: str | Path, nrow: int | None = None) -> Path:
    import torchvision
    from torchvision.io import ImageReadMode, read_image

    out_dir = Path(out_dir)
    images = [read_image(str(image_path(out_dir, i)), ImageReadMode.RGB) for i in range(count)]
    grid = torchvision.utils.make_grid(torch.stack(images).float() / 255, nrow=nrow or int(math.ceil(count ** 0.5)))
    torchvision.utils.save_image(grid, path)
    return Path(path)


def sample_from_checkpoint(checkpoint: str, out_dir: str, count: int = 64, sampler: str = "ddim", steps: int = 50,
                           eta: float = 0.0, batch_size: int = 64, seed: int = 0, device: str = "cpu",
                           use_ema: bool = True, backend: str = "eager", dtype: torch.dtype = torch.float32,
                           grid: bool = True, progress: bool = True) -> dict:
    model, diffusion, state = load_model_for_sampling(checkpoint, device=device, use_ema=use_ema, backend=backend)
    report = sample_images(model, diffusion, count, out_dir, sampler, steps, eta, batch_size, seed, dtype, progress)
    report.update(checkpoint=state.get("_path", str(checkpoint)), step=state.get("step"), ema=use_ema)
    if grid:
        report["grid"] = str(save_grid(out_dir, min(count, 64), Path(out_dir) / "grid.png"))
    return report
