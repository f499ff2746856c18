"""Generate images from a checkpoint: PNGs written as they are made, resumable, and a grid.

Sampling runs through dream.sampling.SamplingEngine (CUDA graphs on a GPU). Batch b starts from noise
drawn with a generator seeded by (seed, b) and draws its step noise from the default generators seeded
by (seed, b), so a batch's images do not depend on which other batches were made in this call:
rerunning skips the batches already written. Step noise (ddpm, or ddim with eta > 0) comes from the
device's generator, whose CPU and CUDA streams differ: such a set continues on the same kind of device.
The settings that determine the images are recorded in <out>/sampling.json, and a rerun with other
settings into the same folder is refused. Each call that adds images appends what made them (record_run:
device, backend, graphs, versions), which change the images through rounding only.
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dream.checkpoint import code_version, load_model_for_sampling, weights_sha256
from dream.distributed import LAUNCHER_GONE, Distributed, StopFlag, agreed_setup, stop_reason
from dream.errors import DreamError, Stopped, out_of_memory
from dream.files import LOCK_FILE, atomic_file, atomic_write_text, folder_lock
from dream.model import resolve_channels_last
from dream.seeding import check_seed, mixed_seed
from dream.sampling import SAMPLERS, SamplingEngine, normalize_sampler
from dream.step_graph import CaptureFailed


def add_sampling_arguments(p, count: int, batch_size: int, backend: str, backends, count_help: str = "") -> None:
    """The flags `dream sample` and `dream eval` share: checkpoint, sampler settings, device and speed."""
    p.add_argument("checkpoint",
                   help="checkpoint file, a run folder (its newest valid checkpoint), or a .safetensors export")
    p.add_argument("--count", type=int, default=count, help=count_help or None)
    p.add_argument("--sampler", default="ddim", choices=list(SAMPLERS),
                   help="ddim (--steps, --eta) or ddpm (ancestral, all T steps)")
    p.add_argument("--steps", type=int, help="DDIM steps (default 50; the ddpm sampler always runs all T)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta in [0, 1] (1.0 = DDPM-like noise)")
    p.add_argument("--batch-size", type=int, default=batch_size, help="images per denoising batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the starting and step noise")
    p.add_argument("--device", default="auto", help="cuda, cuda:N or cpu; auto: cuda when present")
    p.add_argument("--backend", default=backend, choices=list(backends),
                   help="UNet kernels; auto: triton on CUDA, eager on CPU")
    p.add_argument("--bf16", action="store_true", help="sample under bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format for the model (default: on CUDA, where cuDNN runs NHWC)")
    p.add_argument("--graphs", default="auto", choices=["auto", "on", "off"], help="CUDA graphs (auto: on a GPU)")
    p.add_argument("--steps-per-graph", type=int, default=1, help="denoising steps captured per CUDA graph")
    p.add_argument("--no-ema", action="store_true", help="use the raw training weights instead of the EMA")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_graphs(value: str) -> bool | None:
    return {"auto": None, "on": True, "off": False}[value]


IMAGE_NAME = re.compile(r"\d{6,}\.png")  # image_name's


def image_name(index: int) -> str:
    return f"{index:06d}.png"


def image_path(out_dir: Path, index: int) -> Path:
    return out_dir / image_name(index)


PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk: length 0, type, CRC


def image_done(path: Path) -> bool:
    """A whole PNG is at path: it ends with the IEND chunk (a file cut short by a copy or a full disk does not,
    and is made again)."""
    try:
        with open(path, "rb") as f:
            if f.seek(0, os.SEEK_END) < len(PNG_END):
                return False
            f.seek(-len(PNG_END), os.SEEK_END)
            return f.read() == PNG_END
    except OSError:
        return False


def to_pixels(images: torch.Tensor):
    """images in [-1, 1], (B, 3, H, W) -> uint8 numpy (B, H, W, 3)"""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def write_pngs(pixels, out_dir: Path, indices) -> None:
    """uint8 (B, H, W, 3) -> out_dir/<indices[i]>.png, each written atomically."""
    from PIL import Image

    for index, array in zip(indices, pixels):
        path = image_path(out_dir, index)
        try:
            with atomic_file(path, durable=False) as f:  # thousands: no fsync
                Image.fromarray(array).save(f, format="PNG")
        except OSError as error:  # a full disk, a quota, a folder gone: the images written so far are whole
            raise DreamError(f"cannot write {path} ({error.strerror or error}); the images written before it are "
                             f"kept: rerun the same command to go on") from None


def batch_noise(seed: int, batch_index: int, shape, device) -> torch.Tensor:
    """The starting noise x_T of batch `batch_index` (drawn on the CPU: the same on every device)."""
    generator = torch.Generator().manual_seed(mixed_seed(seed, batch_index, 0))
    return torch.randn(shape, generator=generator).to(device)


def batch_step_seed(seed: int, batch_index: int) -> int:
    """Seed of the default generators while batch `batch_index` is sampled (its per-step noise): a stream of
    its own, unrelated to any batch's starting noise."""
    return mixed_seed(seed, batch_index, 1)


SETTINGS_FILE = "sampling.json"


def check_settings(out_dir: Path, settings: dict) -> None:
    """Record the settings that determine the images in out_dir/sampling.json; refuse to add images made
    with other settings to a folder that already holds some (a resumed run must continue the same set).
    A folder without images (a run stopped before its first batch was written) takes the new settings.
    A folder holding PNGs without a readable record, or whose record lacks one of `settings`, is refused: they
    may be anyone's files, or a set whose settings are lost, and would be overwritten or silently mixed."""
    path = out_dir / SETTINGS_FILE
    pngs = sorted(out_dir.glob("*.png"))
    if pngs:
        try:
            recorded = json.loads(path.read_text())
        except FileNotFoundError:
            recorded = "missing"
        except (OSError, ValueError):
            recorded = None
        if not isinstance(recorded, dict):
            record = f"no {SETTINGS_FILE}" if recorded == "missing" else f"an unreadable {SETTINGS_FILE}"
            raise DreamError(f"{out_dir} holds PNG files ({pngs[0].name}{', ...' if len(pngs) > 1 else ''}) and "
                             f"{record}, so they are not a set this command made and can continue; use another "
                             f"output folder")
        foreign = [p.name for p in pngs if p.name != "grid.png" and not IMAGE_NAME.fullmatch(p.name)]
        if foreign:
            raise DreamError(f"{out_dir} holds PNG files this command did not write ({', '.join(foreign[:3])}"
                             f"{', ...' if len(foreign) > 3 else ''}); use another output folder")
        if any(p.name[0].isdigit() for p in pngs):
            for key, value in settings.items():
                if key in recorded and recorded[key] != value:
                    raise DreamError(f"{out_dir} holds images made with {key}={recorded[key]!r}, this run has "
                                     f"{key}={value!r}; use another output folder (or delete that one)")
            unrecorded = [key for key in settings if key not in recorded]
            if unrecorded:  # e.g. weights_sha256, which older releases did not record: other weights, maybe
                raise DreamError(f"{out_dir} holds images whose {SETTINGS_FILE} does not record "
                                 f"{', '.join(unrecorded)} (written by an older dream, or by another caller), so "
                                 f"they cannot be checked against this run's; use another output folder")
            return
    atomic_write_text(path, json.dumps(settings, indent=1))


def sampling_run(model, device: torch.device, graphs: bool, steps_per_graph: int, processes: int,
                 images: int) -> dict:
    """What makes the images of one call beyond the settings check_settings compares: these change the images
    through rounding only (kernels, fused or compiled code, the GPU), so a set may be continued with others."""
    base = getattr(model, "_orig_mod", model)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001  - not installed, or broken: the eager backends run without it
        triton_version = None
    return {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "images_planned": images, "device": name,
            "processes": processes, "backend": base.backend, "compiled": base is not model,
            "channels_last": base.conv_in.weight.is_contiguous(memory_format=torch.channels_last),
            "graphs": graphs, "steps_per_graph": steps_per_graph if graphs else None, "dream": code_version(),
            "torch": torch.__version__, "triton": triton_version}


def record_run(out_dir: Path, run: dict | None = None, **done) -> None:
    """Append `run` (sampling_run) to the "runs" of out_dir/sampling.json, which check_settings has written or
    checked, or add `done` (images_made, seconds: once the call is done) to its last entry. A set continued on
    another machine, backend or version says so; an entry without images_made is a call that stopped early."""
    path = out_dir / SETTINGS_FILE
    record = json.loads(path.read_text())
    runs = record.setdefault("runs", [])
    runs.append(run) if run is not None else runs[-1].update(done)
    atomic_write_text(path, json.dumps(record, indent=1))


class BatchDropped(Exception):
    """A stop was asked while a batch was denoised: the batch is dropped (a rerun makes it)."""


def check_counts(count: int, batch_size: int, steps_per_graph: int = 1) -> None:
    for flag, value in (("--count", count), ("--batch-size", batch_size), ("--steps-per-graph", steps_per_graph)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DreamError(f"{flag} must be a positive integer, got {value!r}")


def check_out_dir(out_dir: str | Path) -> Path:
    """The output folder if it can be used (an existing, writable folder, or one that can be made under
    the nearest existing folder), else a one-line DreamError; nothing is created."""
    if not str(out_dir).strip():
        raise DreamError("--out is empty; name the output folder")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DreamError(f"--out {out_dir} is a file; it must be a folder (new or holding earlier images)")
    existing = next(p for p in (out_dir, *out_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise DreamError(f"--out {out_dir} cannot be made (Not a directory: {existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DreamError(f"--out {out_dir} is not writable" if existing == out_dir else
                         f"--out {out_dir} cannot be made ({existing} is not writable)")
    return out_dir


def prepare_out_dir(out_dir: str | Path) -> Path:
    """The output folder, checked, then made if needed."""
    out_dir = check_out_dir(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DreamError(f"--out {out_dir} cannot be made ({error.strerror or error})") from None
    return out_dir


def _rng_devices(device: torch.device) -> list:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def checked_sampler(diffusion, sampler: str, steps: int | None, eta: float) -> tuple[str, int, float]:
    """normalize_sampler, its complaint as a one-line DreamError."""
    try:
        return normalize_sampler(diffusion, sampler, steps, eta)
    except ValueError as error:
        raise DreamError(str(error)) from None


def read_text_or_none(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


SHARED_FOLDER_WAIT_S = 60.0  # a network filesystem may show another machine's new folder or file this late


def check_same_job(out_dir: Path, lock_text: str | None, settings: dict, main_settings: dict) -> None:
    """On a rank other than 0: refuse to sample unless this process loaded rank 0's weights (`settings`: what
    identifies them) and sees rank 0's output folder (its lock file holds `lock_text`; a network filesystem is
    given up to SHARED_FOLDER_WAIT_S to show it)."""
    differ = [key for key, value in main_settings.items() if settings.get(key) != value]
    if differ:
        key = "checkpoint_step" if "checkpoint_step" in differ else differ[0]  # (a step says more than a hash)
        raise DreamError(f"this process loaded other weights than rank 0 ({key} {settings.get(key)!r}, rank 0's "
                         f"{main_settings[key]!r}): a checkpoint was saved or deleted between their loads, or the "
                         f"machines hold different copies; pass one checkpoint file that every machine sees")
    deadline, pause = time.monotonic() + SHARED_FOLDER_WAIT_S, 0.1
    while read_text_or_none(out_dir / LOCK_FILE) != lock_text:
        if time.monotonic() > deadline:
            raise DreamError(f"{out_dir} is not the folder rank 0 writes into (its {LOCK_FILE} does not name rank "
                             f"0's process): under torchrun on several machines, --out must be on a filesystem "
                             f"they all share")
        time.sleep(pause)
        pause = min(2 * pause, 5.0)


CHECK_BAR_FROM = 50_000  # images already in the folder from which checking them shows a progress bar (~20 s/million)


def unfinished_batches(out_dir: Path, count: int, batch_size: int,
                       progress: bool = False) -> list[tuple[int, list[int] | range]]:
    """(b, the offsets in batch b of its images not yet whole in out_dir: a list, or a range when none is there)
    for each batch of images 0 .. count-1 that has any. The folder is listed once: only the images it holds are
    opened (image_done), and a batch without any is planned whole at once."""
    with os.scandir(out_dir) as entries:
        present = {entry.name for entry in entries}
    held = sorted(int(name[:-4]) for name in present if IMAGE_NAME.fullmatch(name))  # indices with a file
    batches, batch_count = [], math.ceil(count / batch_size)
    for b in tqdm(range(batch_count), desc="checking the images already written", unit="batch", leave=False,
                  disable=not progress or len(held) < CHECK_BAR_FROM):
        first, size = b * batch_size, min(batch_size, count - b * batch_size)
        at = bisect.bisect_left(held, first)
        if at == len(held) or held[at] >= first + size:
            batches.append((b, range(size)))
            continue
        missing = [i for i in range(size)
                   if image_name(first + i) not in present or not image_done(image_path(out_dir, first + i))]
        if missing:
            batches.append((b, missing))
    return batches


def sample_images(model, diffusion, count: int, out_dir: str | Path, sampler: str = "ddim", steps: int | None = None,
                  eta: float = 0.0, batch_size: int = 64, seed: int = 0, dtype: torch.dtype = torch.float32,
                  progress: bool = True, graphs: bool | None = None, steps_per_graph: int = 1,
                  engine: SamplingEngine | None = None, settings: dict | None = None,
                  dist: Distributed | None = None) -> dict:
    """Write images 0 .. count-1 as out_dir/<index>.png, batch by batch, skipping batches already written.

    Batch b starts from batch_noise(seed, b) and draws its step noise from the default generators seeded
    with batch_step_seed(seed, b) (the caller's RNG state is restored afterwards), so its images depend on
    (seed, b, batch_size, sampler settings) only. `steps`: DDIM steps (None: 50); the ddpm sampler runs all T
    and refuses any other number. `graphs`: None = CUDA graphs on a CUDA device.
    PNGs are encoded on a writer thread while the next batch is sampled. The folder is locked meanwhile (flock on
    out_dir/.lock): another process sampling into it is refused.

    Under torchrun (`dist`; each rank passes the model on its own device) rank 0 makes the folder, holds its lock
    until every rank is done, checks its record and lists the unfinished batches; every other rank checks that it
    loaded rank 0's weights and sees rank 0's folder (check_same_job); rank r makes entries r, r + world_size, ...
    of that list, so a resumed set is shared out evenly too, and the images are those one process makes. The
    report counts the images every rank made; the progress bar is rank 0's share."""
    dist = dist or Distributed()
    out_dir = Path(out_dir)
    device = next(model.parameters()).device
    config = getattr(model, "_orig_mod", model).config
    shape = (batch_size, config.in_channels, config.image_size, config.image_size)
    settings = settings or {}
    with contextlib.ExitStack() as held:
        shared = None
        with agreed_setup(dist):
            check_counts(count, batch_size, steps_per_graph)
            check_seed(seed)
            sampler, steps, eta = checked_sampler(diffusion, sampler, steps, eta)
            try:
                engine = engine or SamplingEngine(model, diffusion, graphs=graphs, steps_per_graph=steps_per_graph)
                use_graphs = engine.use_graphs(device, graphs)
            except ValueError as error:
                raise DreamError(str(error)) from None
            if dist.is_main:
                out_dir = prepare_out_dir(out_dir)
                # one job at a time: two writing one set with different settings would mix them under one record
                holder = held.enter_context(folder_lock(out_dir, command="dream sample"))
                if holder is not None:
                    raise DreamError(f"{out_dir} is in use by another process ({holder}); let it finish or stop "
                                     f"it, then rerun (or use another output folder)")
                # the step noise of ddpm and of ddim with eta > 0 comes from the device's generator (CPU and CUDA
                # streams differ)
                stochastic = {"noise_device": device.type} if sampler == "ddpm" or eta > 0 else {}
                check_settings(out_dir, {"sampler": sampler, "steps": steps, "eta": eta, "seed": seed,
                                         "batch_size": batch_size, "dtype": str(dtype).removeprefix("torch."),
                                         "image_size": config.image_size, **stochastic, **settings})
                plan = unfinished_batches(out_dir, count, batch_size, progress)
                if plan:
                    record_run(out_dir, sampling_run(model, device, use_graphs, steps_per_graph, dist.world_size,
                                                     sum(len(missing) for _, missing in plan)))
                shared = (plan, read_text_or_none(out_dir / LOCK_FILE), settings)
        plan, lock_text, main_settings = dist.share(shared)
        with agreed_setup(dist):
            if not dist.is_main:
                check_same_job(out_dir, lock_text, settings, main_settings)
        mine = plan[dist.rank::dist.world_size]
        made, start = 0, time.perf_counter()
        if dist.enabled:
            bar = tqdm(total=sum(len(missing) for _, missing in mine), unit="img",
                       desc=f"sampling ({sampler}), rank 0's share of {dist.world_size}",
                       disable=not progress or not dist.is_main)
        else:
            bar = tqdm(total=count, initial=count - sum(len(missing) for _, missing in plan), unit="img",
                       desc=f"sampling ({sampler})", disable=not progress)
        # the plain loop (no graphs) also shows the steps of the batch under way: a batch can take minutes
        step_bar = tqdm(total=steps, desc="denoising steps", unit="step", leave=False,
                        disable=not progress or not dist.is_main or use_graphs)
        # under torchrun a stop (a signal, or torchrun gone) drops the batch under way at its next step; the ranks
        # vote after each round of batches and stop together, and rank 0 says it
        stop, stopped = StopFlag(), 0
        rounds = -(-len(plan) // dist.world_size)  # (a rank with one batch fewer votes in the last round too)

        def on_step():
            if stop.requested:
                raise BatchDropped
            step_bar.update()

        writer, pending = ThreadPoolExecutor(max_workers=1), None
        try:
            with torch.random.fork_rng(devices=_rng_devices(device)), \
                    (stop.installed() if dist.enabled else contextlib.nullcontext()):
                for round_index in range(rounds):
                    if round_index < len(mine):
                        b, missing = mine[round_index]
                        step_bar.reset()
                        try:
                            x_T = batch_noise(seed, b, shape, device)
                            torch.manual_seed(batch_step_seed(seed, b))
                            x = engine.sample(x_T, sampler, steps, eta, dtype, graphs=use_graphs, on_step=on_step)
                        except BatchDropped:
                            x = None
                        except CaptureFailed as error:
                            raise DreamError(f"the sampling loop could not be captured as a CUDA graph ({error}); "
                                             f"rerun with --graphs off (the plain loop: the same images up to "
                                             f"rounding)") from None
                        except RuntimeError as error:  # torch.OutOfMemoryError is one
                            if not out_of_memory(error):
                                raise
                            raise DreamError(f"out of memory denoising a batch of {batch_size} images on {device}: "
                                             f"pass a smaller --batch-size (it changes the images: use another "
                                             f"output folder)" + (", or --graphs off" if use_graphs else "")) from None
                        if x is not None:
                            pixels = to_pixels(x[missing])  # waits for the batch
                            if pending is not None:
                                pending.result()
                            pending = writer.submit(write_pngs, pixels, out_dir,
                                                    [b * batch_size + i for i in missing])
                            made += len(missing)
                            bar.update(len(missing))
                            bar.set_postfix(img_s=f"{made / (time.perf_counter() - start):.2f}")
                    if dist.enabled:
                        if dist.launcher_gone() and not stop.signum:
                            stop.signum = LAUNCHER_GONE  # torchrun was killed and cannot stop us
                        stopped = dist.max(stop.signum, device)
                        if stopped:
                            break
                if dist.enabled and not stopped:  # once more: a signal that came while this rank waited in the
                    stopped = dist.max(stop.signum, device)  # last vote is handled only as that vote returns
            late = 0 if stopped else stop.signum  # one that came during this vote: this rank's alone
            if pending is not None:
                pending.result()
        finally:
            writer.shutdown(wait=True)
            step_bar.close()
            bar.close()
        made = dist.sum(made, device)  # (every rank is done before rank 0 lets the folder go)
        if stopped or late:  # (the record's entry keeps no images_made: a call that stopped early)
            raise Stopped(stopped or late, stop_reason(stopped or late), same_on_every_rank=bool(stopped))
        if dist.is_main and plan:
            record_run(out_dir, images_made=made, seconds=round(time.perf_counter() - start, 1))
        return {"count": count, "made": made, "out_dir": str(out_dir), "sampler": sampler, "steps": steps,
                "eta": eta, "seed": seed, "batch_size": batch_size, "dtype": str(dtype).removeprefix("torch."),
                "graphs": use_graphs, "processes": dist.world_size, "seconds": time.perf_counter() - start}


def read_sample(path: str | Path, size: int | None = None) -> torch.Tensor:
    """uint8 (3, H, W) of a PNG of a sample folder, decoded by Pillow (torchvision's decoder kills the process
    on some damaged files). A file that does not decode, or is not size × size, is a one-line DreamError."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        why = (str(error).splitlines() or [type(error).__name__])[0]
        raise DreamError(f"{path} cannot be read as an image ({why}); delete it and rerun to make it again") from None
    if size is not None and pixels.shape[:2] != (size, size):
        raise DreamError(f"{path} is {pixels.shape[1]}×{pixels.shape[0]} pixels, not the set's {size}×{size}; "
                         f"delete it and rerun to make it again")
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def save_grid(out_dir: str | Path, count: int, path: str | Path, nrow: int | None = None,
              size: int | None = None) -> Path:
    """The first `count` images of out_dir in a grid (all size × size; None: the first image's size)."""
    from dream.data import import_torchvision

    torchvision = import_torchvision("the sample grid")

    out_dir = Path(out_dir)
    images = []
    for i in range(count):
        images.append(read_sample(image_path(out_dir, i), size))
        size = images[0].shape[-1] if size is None else size
    grid = torchvision.utils.make_grid(torch.stack(images).float() / 255, nrow=nrow or int(math.ceil(count ** 0.5)))
    with atomic_file(path, durable=False) as f:
        torchvision.utils.save_image(grid, f, format="png")
    return Path(path)


def load_sampler_model(checkpoint: str, device="cpu", use_ema: bool = True, backend: str = "eager",
                       compile: bool = False, dtype: torch.dtype = torch.float32, channels_last: bool | None = None):
    """(model or torch.compile(model), diffusion, checkpoint state with "_path" resolved, settings identifying
    the weights: their SHA-256 (the same for a checkpoint and its export), step, and EMA or raw).
    dtype: the sampling autocast dtype (float32: none), checked against the backend and device first;
    channels_last: the model's memory format (None: channels_last on CUDA)."""
    model, diffusion, state = load_model_for_sampling(checkpoint, device=device, use_ema=use_ema, backend=backend,
                                                      autocast_dtype=dtype)
    if resolve_channels_last(channels_last, device):
        model = model.to(memory_format=torch.channels_last)
    state["_path"] = str(Path(state.get("_path", checkpoint)).resolve())
    identity = {"ema": state["sampled_weights"] == "ema", "weights_sha256": weights_sha256(model),
                "checkpoint_step": state.get("step")}  # (in the order a refusal names the first difference)
    if compile:
        model = torch.compile(model)
    return model, diffusion, state, identity


def sample_from_checkpoint(checkpoint: str, out_dir: str, count: int = 64, sampler: str = "ddim",
                           steps: int | None = None, eta: float = 0.0, batch_size: int = 64, seed: int = 0,
                           device: str = "cpu",
                           use_ema: bool = True, backend: str = "eager", dtype: torch.dtype = torch.float32,
                           grid: bool = True, progress: bool = True, graphs: bool | None = None,
                           steps_per_graph: int = 1, compile: bool = False,
                           channels_last: bool | None = None, dist: Distributed | None = None) -> dict:
    """sample_images from a checkpoint's weights, then (rank 0) a grid of the first 64 as out_dir/grid.png."""
    dist = dist or Distributed()
    with agreed_setup(dist):
        check_counts(count, batch_size, steps_per_graph)  # the cheap checks before loading the model
        check_seed(seed)
        check_out_dir(out_dir)
        if grid:
            from dream.data import import_torchvision

            import_torchvision("the sample grid")  # now, not after all the sampling
        model, diffusion, state, identity = load_sampler_model(checkpoint, device, use_ema, backend, compile, dtype,
                                                               channels_last)
    report = sample_images(model, diffusion, count, out_dir, sampler, steps, eta, batch_size, seed, dtype, progress,
                           graphs=graphs, steps_per_graph=steps_per_graph, settings=identity, dist=dist)
    report.update(checkpoint=state["_path"], step=state.get("step"), ema=identity["ema"], grid=None)
    if grid and dist.is_main:
        size = getattr(model, "_orig_mod", model).config.image_size
        report["grid"] = str(save_grid(out_dir, min(count, 64), Path(out_dir) / "grid.png", size=size))
    return report
