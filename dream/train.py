"""The training loop, top to bottom: data, model, EMA, optimizer, resume, steps, logs, checkpoints, samples.

Resume by rerunning the same command: the newest valid checkpoint in <run>/checkpoints is picked up and
training continues exactly where it stopped (same data order, same random numbers).
"""
from __future__ import annotations

import json
import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dream.checkpoint import CheckpointManager, code_version, load_checkpoint, rng_state, set_rng_state
from dream.data import DeviceBatches, load_images
from dream.diffusion import GaussianDiffusion
from dream.ema import EMA
from dream.errors import DreamError
from dream.model import UNet, make_config
from dream.objectives import ObjectiveConfig, get_objective

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    # model
    preset: str = "seed"
    model_overrides: dict = field(default_factory=dict)  # UNetConfig fields, e.g. {"dropout": 0.0}
    backend: str = "auto"  # eager | sdpa | triton | auto (triton on CUDA, eager elsewhere)
    checkpointing: str = "none"  # activation checkpointing: none | attention | resblocks | all
    compile: bool = False
    channels_last: bool = False
    # diffusion and objective
    schedule: str = "cosine"
    num_timesteps: int = 1000
    objective: str = "seed"
    objective_config: dict = field(default_factory=dict)  # ObjectiveConfig fields
    # data
    data: str = "synthetic"
    data_root: str | None = None
    data_split: str = "train"
    data_count: int = 4096  # synthetic images
    # optimisation
    batch_size: int = 128
    micro_batch: int | None = None  # None: the whole batch at once; else gradient accumulation
    epochs: int = 100
    max_steps: int | None = None  # stop after this many optimizer steps in total (None: run all epochs)
    lr: float = 2e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = False
    precision: str = "auto"  # fp32 | bf16 | fp16 | auto (bf16 on CUDA where supported, else fp32)
    max_bad_steps: int = 5  # consecutive non-finite steps before restoring the last good checkpoint
    # bookkeeping
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 500  # steps
    checkpoint_keep: int = 3
    sample_every: int = 1  # epochs; 0 disables the grid
    sample_count: int = 16
    sample_steps: int = 50  # DDIM steps for the progress grid
    progress: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DreamError(f"device {name!r} was asked for, but CUDA is not available on this machine")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    if name not in PRECISIONS + ("auto",):
        raise DreamError(f"unknown precision {name!r}; choose one of {PRECISIONS + ('auto',)}")
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return name


def resolve_backend(name: str, device: torch.device) -> str:
    if name == "auto":
        return "triton" if device.type == "cuda" else "eager"
    return name


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.device = device = resolve_device(config.device)
        self.precision = resolve_precision(config.precision, device)
        torch.manual_seed(config.seed)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True

        self.run_dir = Path(config.run_dir)
        self.model_config = make_config(config.preset, **config.model_overrides)
        self.objective = get_objective(config.objective)
        self.objective_config = ObjectiveConfig(**config.objective_config)
        self.diffusion = GaussianDiffusion(config.schedule, config.num_timesteps).to(device)

        images = load_images(config.data, config.data_root, config.data_split, self.model_config.image_size,
                             count=config.data_count, seed=config.seed)
        self.batches = DeviceBatches(images, config.batch_size, device, seed=config.seed)

        self.model = UNet(self.model_config, backend=resolve_backend(config.backend, device),
                          checkpointing=config.checkpointing).to(device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if config.compile else self.model
        self.ema = EMA(self.model, config.ema_decay, warmup=config.ema_warmup)
        fused = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                           fused=fused or None)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.micro_batch = config.micro_batch or config.batch_size
        if config.batch_size % self.micro_batch:
            raise DreamError(f"micro batch {self.micro_batch} must divide the batch size {config.batch_size}")
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", keep=config.checkpoint_keep)
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.bad_steps = 0
        self.sample_noise = torch.randn(config.sample_count, self.model_config.in_channels,
                                        self.model_config.image_size, self.model_config.image_size,
                                        generator=torch.Generator().manual_seed(config.seed + 1))

    # ------------------------------------------------------------------------------------------
    def autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def train_step(self, x0: torch.Tensor) -> dict:
        """One optimizer step over the batch x0, in micro-batches; returns the logged tensors."""
        config = self.config
        t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=self.device)
        noise = torch.randn_like(x0)
        if config.channels_last:
            x0, noise = x0.contiguous(memory_format=torch.channels_last), noise.contiguous(memory_format=torch.channels_last)
        self.optimizer.zero_grad(set_to_none=True)
        weight = self.micro_batch / x0.shape[0]
        totals: dict[str, torch.Tensor] = {}
        for start in range(0, x0.shape[0], self.micro_batch):
            part = slice(start, start + self.micro_batch)
            with self.autocast():
                _, logs = self.objective(self.forward, self.diffusion, x0[part], self.epoch, self.objective_config,
                                         t=t[part], noise=noise[part],
                                         backward=lambda loss: self.scaler.scale(loss * weight).backward())
            for key, value in logs.items():
                totals[key] = totals.get(key, 0) + value.detach().float() * weight
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        finite = bool(torch.isfinite(grad_norm) & torch.isfinite(totals["loss"]))
        if finite or self.precision == "fp16":  # GradScaler skips non-finite fp16 steps and lowers its scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if finite:
            self.ema.update(self.model)
            self.bad_steps = 0
        else:
            self.bad_steps += 1
        totals["grad_norm"] = grad_norm.detach().float()
        totals["finite"] = torch.tensor(float(finite))
        return totals

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "step": self.step,
            "rng": rng_state(),
            "config": {**self.config.to_dict(), "model": self.model_config.to_dict()},
            "code_version": code_version(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch_in_epoch"], state["step"]
        set_rng_state(state["rng"])

    def save_checkpoint(self) -> Path:
        return self.checkpoints.save(self.state_dict(), self.step)

    def resume(self, path: str | None = None) -> bool:
        state = load_checkpoint(path) if path else self.checkpoints.latest()
        if state is None:
            return False
        saved = state["config"]
        for key in ("preset", "batch_size", "objective", "schedule", "num_timesteps", "seed", "data"):
            if saved.get(key) != getattr(self.config, key):
                raise DreamError(f"checkpoint {state.get('_path', path)} was made with {key}={saved.get(key)!r}, "
                                 f"this run has {key}={getattr(self.config, key)!r}; use another --run-dir")
        self.load_state_dict(state)
        return True

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def save_sample_grid(self) -> Path:
        import torchvision

        path = self.run_dir / "samples" / f"grid-{self.step:09d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        was_training = self.model.training
        self.model.eval()
        with self.ema.applied(self.model), self.autocast():
            x = self.diffusion.ddim_sample_loop(self.model, self.sample_noise.shape, steps=self.config.sample_steps,
                                                x_T=self.sample_noise.to(self.device), progress=False)
        self.model.train(was_training)
        grid = torchvision.utils.make_grid((x.float().clamp(-1, 1) + 1) / 2, nrow=int(math.ceil(len(x) ** 0.5)))
        torchvision.utils.save_image(grid, path)
        return path

    def log(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def run(self, resume: str | None = None) -> dict:
        config = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.resume(resume):
            print(f"resumed from step {self.step} (epoch {self.epoch})", file=sys.stderr)
        (self.run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
        stop = StopFlag()
        self.model.train()
        last = {}
        with stop.installed():
            while self.epoch < config.epochs and not self.finished():
                bar = tqdm(total=len(self.batches), initial=self.batch_in_epoch, desc=f"epoch {self.epoch}",
                           disable=not config.progress, leave=False)
                tick, tick_images = time.perf_counter(), 0
                for x0 in self.batches.epoch(self.epoch, self.batch_in_epoch):
                    logs = self.train_step(x0)
                    self.step += 1
                    self.batch_in_epoch += 1
                    tick_images += x0.shape[0]
                    bar.update(1)
                    if self.bad_steps >= config.max_bad_steps:
                        self.restore_after_divergence()
                    if self.step % config.log_every == 0 or self.batch_in_epoch == len(self.batches):
                        elapsed = time.perf_counter() - tick
                        last = {k: float(v) for k, v in logs.items()}
                        last.update(step=self.step, epoch=self.epoch, images_per_s=tick_images / max(elapsed, 1e-9))
                        if self.device.type == "cuda":
                            last["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                        self.log(last)
                        bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last['images_per_s']:.1f}")
                        tick, tick_images = time.perf_counter(), 0
                    if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                        self.save_checkpoint()
                    if stop.requested:
                        break
                    if self.finished():
                        break
                bar.close()
                if stop.requested:
                    path = self.save_checkpoint()
                    raise Interrupted(f"stopped by signal {stop.signal_name} at step {self.step}; checkpoint "
                                      f"{path} saved. Rerun the same command to resume.")
                if self.batch_in_epoch == len(self.batches):
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    if config.sample_every and self.epoch % config.sample_every == 0:
                        self.save_sample_grid()
            self.save_checkpoint()
        grid = self.run_dir / "samples" / f"grid-{self.step:09d}.png"
        if config.sample_every and not grid.exists():
            self.save_sample_grid()
        return {"step": self.step, "epoch": self.epoch, "last": last, "grid": str(grid) if grid.exists() else None,
                "checkpoint_dir": str(self.checkpoints.folder)}

    def finished(self) -> bool:
        return self.config.max_steps is not None and self.step >= self.config.max_steps

    def restore_after_divergence(self) -> None:
        state = self.checkpoints.latest()
        message = f"{self.bad_steps} non-finite steps in a row at step {self.step}"
        if state is not None:
            self.load_state_dict(state)
            self.save_checkpoint()
            message += f"; restored and re-saved the last good checkpoint (step {self.step})"
        raise DreamError(message + "; lower --lr or check the data, then rerun to resume")


class Interrupted(DreamError):
    """Training stopped by a signal after saving a checkpoint."""


class StopFlag:
    """SIGINT and SIGTERM set a flag; the loop finishes its step, saves, and exits."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""

    def handle(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def installed(self):
        import contextlib

        @contextlib.contextmanager
        def scope():
            previous = {}
            try:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    previous[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not the main thread: no signal handling
                pass
            try:
                yield self
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        return scope()


def train(config: TrainConfig, resume: str | None = None) -> dict:
    return Trainer(config).run(resume)
