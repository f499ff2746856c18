"""The training loop, top to bottom: data, model, EMA, optimizer, resume, steps, logs, checkpoints, samples.

Never losing work:
  * Resume by rerunning the same command: the newest checkpoint of <run>/checkpoints that verifies is
    picked up and training continues exactly where it stopped. Every random number of step s (t, noise,
    dropout) is drawn from generators seeded by (seed, step, rank) and the data order is a function of
    (seed, epoch), so on CPU the continuation is bitwise what an uninterrupted run computes.
  * SIGINT / SIGTERM finish the current step (with several processes, the next one too: the ranks agree
    on a stop a step later, without waiting), save, and stop with `Interrupted` (a second Ctrl-C drops
    the step). Any other exception saves an emergency checkpoint when the state is sane and raises
    `TrainingAborted`. Both messages end with how to resume.
  * Non-finite loss or gradients: the step is skipped (no optimizer or EMA update) and counted;
    after `max_bad_steps` in a row the last good checkpoint is restored and `Diverged` is raised. With
    fp16 an overflow only lowers the loss scale, until the scale is below 1: from there it counts too.
    Without fp16 the skip is decided on the device and the host counts each step a step later, so a step
    makes no host sync (the host queues step s + 1 while the device runs step s).
  * CUDA out of memory inside a step: the micro-batch is halved (gradient accumulation keeps the
    batch), and the step is redone with the same t and noise, drawn for the whole batch beforehand.

Multi-GPU (torchrun; see dream/distributed.py): DistributedDataParallel, rank r takes samples r,
r + W, r + 2W, ... of each global batch and the same slices of its t and noise, so W processes compute
the step of one process with the same global batch. Rank 0 alone writes files.
"""
from __future__ import annotations

import errno
import json
import math
import os
import signal
import sys
import time
import warnings
from collections import deque
from contextlib import closing, contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dream import distributed
from dream.checkpoint import (CheckpointManager, check_training_state, code_version, load_checkpoint,
                              require_checkpoint, rng_state, set_rng_state)
from dream.data import DeviceBatches, images_digest, import_torchvision, load_images
from dream.diffusion import GaussianDiffusion
from dream.distributed import LAUNCHER_GONE, StopFlag, local_processes, stop_reason
from dream.ema import EMA, conditional_step
from dream.errors import DreamError, option_error, out_of_memory
from dream.files import LOCK_FILE, atomic_file, atomic_write_text, folder_lock, folder_problem
from dream.math_flags import use_fast_math
from dream.model import (CHECKPOINT_POLICIES, DROPOUT_RECOMPUTING_POLICIES, PRECISION_DTYPES, PRECISIONS, UNet,
                         autocast_for, check_backend_device, make_config, policies_for_backend, resolve_channels_last)
from dream.objectives import OBJECTIVE_SETTINGS, ObjectiveConfig, epoch_phase, get_objective
from dream.sample import image_done
from dream.seeding import check_seed, mixed_seed
from dream.step_graph import CaptureFailed, StepGraph


# the command-line flag of each config field a resume must keep (the others are "--" + the field's name)
FLAGS = {"num_timesteps": "--timesteps"}
MODEL_FLAGS = {"image_size": "--image-size", "base_channels": "--base-channels", "dropout": "--dropout"}
DATA_PLACES = ("auto", "device", "host")  # --data-on
MAX_TIMESTEPS = 1_000_000  # the schedule's tables are ~14 float64 vectors of this length


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    # model
    preset: str = "seed"
    model_overrides: dict = field(default_factory=dict)  # UNetConfig fields, e.g. {"dropout": 0.0}
    backend: str = "auto"  # eager | sdpa | triton | auto (triton on CUDA, eager elsewhere)
    checkpointing: str = "none"  # activation checkpointing: none | attention | resblocks | all | auto
    # (auto: with a memory budget, the least recomputation whose whole-batch step fits; else none)
    compile: bool = False
    cuda_graphs: bool = False  # the device side of each step captured once (per objective phase), replayed
    channels_last: bool | None = None  # None: on CUDA
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
    data_on: str = "auto"  # where the images are kept: device | host | auto (the device, unless keeping them
    # there makes the memory manager pick a smaller micro-batch or more recomputation)
    # optimisation
    batch_size: int = 128  # the global batch, over all processes
    micro_batch: int | None = None  # per process; None: the whole per-process batch at once
    # bytes per device for dream.memory to fit the micro-batch in (None: on CUDA, the free memory)
    memory_budget: int | None = None
    epochs: int = 100
    max_steps: int | None = None  # stop after this many optimizer steps in total (None: run all epochs)
    lr: float = 2e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0: no clipping
    ema_decay: float = 0.9999
    ema_warmup: bool = False
    precision: str = "auto"  # fp32 | bf16 | fp16 | auto (bf16 on CUDA where supported, else fp32)
    max_bad_steps: int = 5  # consecutive non-finite steps before restoring the last good checkpoint
    # bookkeeping
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 500  # steps; 0: only at the end of the run and on a stop
    checkpoint_keep: int = 3
    sample_every: int = 1  # epochs; 0 disables the grid
    sample_count: int = 16
    sample_steps: int = 50  # DDIM steps for the progress grid (at most num_timesteps)
    progress: bool = True

    def check(self) -> None:
        """One-line DreamError for a value that would crash or silently misbehave later (a zero log interval
        divides by zero mid-run, a negative clip norm turns clipping off); it names the `dream train` flag."""
        def positive_int(value):
            return isinstance(value, int) and value >= 1

        def non_negative_int(value):
            return isinstance(value, int) and value >= 0

        rules = [
            ("batch_size", positive_int(self.batch_size), "a positive integer"),
            ("micro_batch", self.micro_batch is None or positive_int(self.micro_batch), "a positive integer"),
            ("epochs", positive_int(self.epochs), "a positive integer"),
            ("max_steps", self.max_steps is None or non_negative_int(self.max_steps), "a non-negative integer"),
            ("memory_budget", self.memory_budget is None or self.memory_budget > 0, "positive"),
            ("lr", math.isfinite(self.lr) and self.lr > 0, "a positive number"),
            ("weight_decay", math.isfinite(self.weight_decay) and self.weight_decay >= 0, "non-negative"),
            ("grad_clip", math.isfinite(self.grad_clip) and self.grad_clip >= 0, "non-negative (0: no clipping)"),
            ("ema_decay", 0 <= self.ema_decay <= 1, "in [0, 1]"),
            ("max_bad_steps", positive_int(self.max_bad_steps), "a positive integer"),
            ("log_every", positive_int(self.log_every), "a positive integer"),
            ("checkpoint_every", non_negative_int(self.checkpoint_every),
             "a non-negative integer (0: only at the end and on a stop)"),
            ("checkpoint_keep", positive_int(self.checkpoint_keep), "a positive integer"),
            ("sample_every", non_negative_int(self.sample_every), "a non-negative integer (0: no grids)"),
            ("sample_count", positive_int(self.sample_count), "a positive integer"),
            ("sample_steps", positive_int(self.sample_steps), "a positive integer"),
            ("data_on", self.data_on in DATA_PLACES, f"one of {', '.join(DATA_PLACES)}"),
            ("num_timesteps", isinstance(self.num_timesteps, int) and 2 <= self.num_timesteps <= MAX_TIMESTEPS,
             f"in [2, {MAX_TIMESTEPS}]"),
            ("data_count", self.data_count is None or positive_int(self.data_count), "a positive integer"),
        ]
        for name, ok, wanted in rules:
            if not ok:
                raise option_error(name, wanted, getattr(self, name), FLAGS.get(name))
        if self.data_root and self.data == "synthetic":
            raise DreamError("--data-root names CelebA's root or a folder of images, which --data synthetic (the "
                             "built-in faces) does not read: pass --data celeba or --data folder too",
                             same_on_every_rank=True)
        if self.data_split != "train" and self.data in ("synthetic", "folder"):
            raise DreamError(f"--data-split picks a CelebA split, which --data {self.data} does not have: pass "
                             f"--data celeba, or leave --data-split out", same_on_every_rank=True)
        check_seed(self.seed)
        ObjectiveConfig(**self.objective_config)

    def to_dict(self) -> dict:
        return asdict(self)


class Interrupted(DreamError):
    """Training stopped by SIGINT or SIGTERM, after saving a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class TrainingAborted(DreamError):
    """An exception stopped training; the cause is chained, the message says what was saved. show_cause: the
    cause's traceback helps (a bug's; not a full disk's, an out-of-memory's or another rank's stop)."""

    def __init__(self, message: str, show_cause: bool = True):
        super().__init__(message)
        self.show_cause = show_cause


class Diverged(DreamError):
    """Too many non-finite steps in a row; the last good checkpoint was restored."""


# ----------------------------------------------------------------------------------------------
def resolve_device(name: str, dist: distributed.Distributed | None = None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DreamError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise DreamError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DreamError(f"device {name!r} was asked for, but CUDA is not available on this machine")
    if device.type == "cuda" and dist is not None and dist.enabled:
        return torch.device("cuda", dist.local_rank)  # (checked against the device count by torchrun's setup)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise DreamError(f"device {name!r} was asked for, but this machine has {count} CUDA device"
                         f"{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    if name not in PRECISIONS + ("auto",):
        raise DreamError(f"unknown precision {name!r}; choose one of {PRECISIONS + ('auto',)}")
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return name


def resolve_backend(name: str, device: torch.device, autocast_dtype: torch.dtype | None = None) -> str:
    if name == "auto":
        return "triton" if device.type == "cuda" else "eager"
    check_backend_device(name, device, autocast_dtype)
    return name


def match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each optimizer state tensor its parameter's strides. A run resumed in the other memory format
    (channels_last or NCHW) loads moments laid out the old way: fused AdamW needs every tensor of a
    parameter in one layout, and the foreach path would fall back to slow per-tensor kernels."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def check_cuda_graphs(device: torch.device, precision: str, dist: distributed.Distributed) -> None:
    """--cuda-graphs captures the whole device side of a step, which needs it to make no host sync and no
    collective: CUDA, no loss scaler (fp16's skip is decided on the host), one process."""
    if device.type != "cuda":
        raise DreamError(f"--cuda-graphs needs a CUDA device; this run is on {device}", same_on_every_rank=True)
    check_graph_precision(precision)
    if dist.enabled:
        raise DreamError(f"--cuda-graphs works in one process; this job has {dist.world_size} (DDP's gradient "
                         f"all-reduce is not captured)", same_on_every_rank=True)


def check_graph_precision(precision: str) -> None:
    """--cuda-graphs runs bf16 or fp32 steps (dream train and dream memory refuse fp16 alike)."""
    if precision == "fp16":
        raise DreamError("--cuda-graphs does not work with --precision fp16: its loss scaler decides each step on "
                         "the host; use bf16 or fp32", same_on_every_rank=True)


def check_graph_policy(policy: str, dropout: float) -> None:
    """--cuda-graphs runs the checkpointing policies graph_safe_policies allows (dream train and dream memory
    refuse the others alike)."""
    if policy not in graph_safe_policies(CHECKPOINT_POLICIES, True, dropout):
        raise DreamError(f"--cuda-graphs with --checkpointing {policy} and dropout {dropout}: backward recomputes "
                         f"the ResBlocks' dropout by restoring the random generator, which a CUDA graph capture "
                         f"cannot, so its mask would differ from the forward's; use --checkpointing none, norms or "
                         f"attention, or --dropout 0", same_on_every_rank=True)


def graph_safe_policies(policies, cuda_graphs: bool, dropout: float) -> tuple:
    """The checkpointing policies a captured step can run: with dropout, not those whose recomputation relies on
    restoring the random generator (a capture cannot rewind it: backward would draw another dropout mask)."""
    if not cuda_graphs or not dropout:
        return tuple(policies)
    return tuple(policy for policy in policies if policy not in DROPOUT_RECOMPUTING_POLICIES)


def step_seed(seed: int, step: int, stream: int) -> int:
    """A well-mixed 63-bit seed for random stream `stream` of optimizer step `step`."""
    return mixed_seed(seed, step, stream)


def divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of n that is <= limit (>= 1)."""
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


class Trainer:
    def __init__(self, config: TrainConfig, dist: distributed.Distributed | None = None,
                 new_run_dir: bool | None = None):
        """`new_run_dir`: whether the run folder is this command's to remove if it is refused (None: whether it
        does not exist yet; under torchrun the caller looks before the ranks meet, since any rank makes it)."""
        self.config = config
        self.dist = dist = dist or distributed.Distributed()
        self.made_run_dir = not Path(config.run_dir).expanduser().exists() if new_run_dir is None else new_run_dir
        failure = None
        try:  # what follows from the command line, the machine and the data: agree_on_setup tells which ranks share
            # an error (so no raise here marks itself shared)
            config.check()
            self.device = device = resolve_device(config.device, dist)
            self.precision = resolve_precision(config.precision, device)
            if config.cuda_graphs:
                check_cuda_graphs(device, self.precision, dist)
            if device.type == "cuda":
                use_fast_math()
                if device.index is not None:  # streams, events and graphs made without a device go to this one
                    torch.cuda.set_device(device)

            self.run_dir = Path(config.run_dir).expanduser()
            if self.run_dir.exists() and not self.run_dir.is_dir():
                raise DreamError(f"--run-dir {self.run_dir} is a file; it must be a folder (new, or a run's)")
            foreign = foreign_run_files(self.run_dir)
            if foreign:
                raise DreamError(f"--run-dir {self.run_dir} holds {' and '.join(foreign)} that training did not write "
                                 f"and would overwrite; use a new or empty folder, or a run's")
            problem = folder_problem(self.run_dir)  # before the slow setup; makes the folder
            if problem:
                raise DreamError(f"--run-dir: {problem}")
            try:
                self.model_config = make_config(config.preset, **config.model_overrides)
            except ValueError as error:  # "image_size 30 must be ...": named as the flag that set it
                text = str(error)
                for key, flag in MODEL_FLAGS.items():
                    if key in config.model_overrides and text.startswith(key + " "):
                        text = flag + text[len(key):]
                raise DreamError(text, same_on_every_rank=True) from None
            self.objective = get_objective(config.objective)
            self.objective_config = ObjectiveConfig(**config.objective_config)
            self.diffusion = GaussianDiffusion(config.schedule, config.num_timesteps).to(device)

            # data: each rank takes every world_size-th sample of each global batch
            if config.batch_size % dist.world_size:
                raise DreamError(f"batch size {config.batch_size} must be divisible by the number of processes "
                                 f"({dist.world_size})")
            self.rank_batch = config.batch_size // dist.world_size
            if config.sample_every:  # checked now, not at the first epoch's end
                import_torchvision("the sample grids (--sample-every 0: none)")
            with warnings.catch_warnings():
                if not dist.is_main:  # skipped files are reported once, by rank 0
                    warnings.simplefilter("ignore")
                images = load_images(config.data, config.data_root, config.data_split, self.model_config.image_size,
                                     count=config.data_count, seed=config.seed, exclude=[self.run_dir],
                                     processes=local_processes())
            if images.shape[0] < config.batch_size:
                raise DreamError(f"--batch-size {config.batch_size} needs at least {config.batch_size} images; the "
                                 f"data has {images.shape[0]}")
            self.data_digest = images_digest(images)  # a resume notices images replaced by others
            # on the host until the memory manager has decided where they go (--data-on auto)
            self.batches = DeviceBatches(images, self.rank_batch, device, seed=config.seed,
                                         rank=dist.rank, world_size=dist.world_size, on_device=False)

            # model, its DDP wrapper and compiled forward, EMA, optimizer, loss scaler
            self.backend = resolve_backend(config.backend, device, PRECISION_DTYPES[self.precision])
            self.checkpointing = "none" if config.checkpointing == "auto" else config.checkpointing
            if self.checkpointing not in policies_for_backend(self.backend):
                raise DreamError(f"--checkpointing {self.checkpointing} recomputes the fused Triton norm: it needs "
                                 f"--backend triton, not {self.backend}")
            if config.cuda_graphs:
                check_graph_policy(self.checkpointing, self.model_config.dropout)
        except distributed.SETUP_ERRORS as error:
            failure = error
        distributed.agree_on_setup(dist, failure)
        try:  # every rank trains on the same images (a multi-machine job may read different copies)
            dist.check_identical([torch.tensor(int(self.data_digest[:15], 16), device=device)], "the training images")
        except RuntimeError as error:
            if "differ between ranks" not in str(error):
                raise
            raise DreamError(f"the training images differ between the processes of this job (SHA-1 of rank "
                             f"{dist.rank}'s: {self.data_digest[:12]}); every process must read the same data "
                             f"(a folder copied differently to each machine?)", same_on_every_rank=True) from None
        # seeded right here: the initial weights are the same on every rank, and do not depend on whether
        # loading the data drew random numbers (decoding a folder's images the first time does)
        torch.manual_seed(config.seed)
        self.model = UNet(self.model_config, backend=self.backend, checkpointing=self.checkpointing).to(device)
        self.channels_last = resolve_channels_last(config.channels_last, device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ddp = None
        if dist.enabled:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        network = self.ddp or self.model
        self.forward = torch.compile(network) if config.compile else network
        self.ema = EMA(self.model, config.ema_decay, warmup=config.ema_warmup)
        # fused AdamW (CPU and CUDA) skips a step on the device where its found_inf flag is set
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                           fused=True, capturable=config.cuda_graphs)
        # (capturable: the step graph's warm-up steps run uncaptured by design, and torch.optim would warn once)
        self.optimizer._warned_capturable_if_run_uncaptured = config.cuda_graphs
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")

        # progress counters and bookkeeping
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.skipped_steps = 0  # non-finite steps skipped, in total
        self.bad_in_a_row = 0
        self.skipped_in_a_row = 0  # any skipped steps, fp16 overflows too: no periodic checkpoint after one
        self.pending_steps: deque[tuple[int, HostCopy]] = deque()  # (step, its finiteness flags), not yet counted
        self.counted_step = 0  # the counters above cover the steps up to this one
        self.stop_vote: HostCopy | None = None  # with several processes: the stop signal vote of the last step
        self.updating = False  # True while the optimizer, EMA and counters are being advanced
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", keep=config.checkpoint_keep)
        self.last_checkpoint: Path | None = None
        self.last_checkpoint_position = (-1, -1, -1)
        self.resume_hint = "rerun the same command"
        self.pending_records: list[dict] | None = []  # log records made before the run starts (see start_log)
        if config.data != "synthetic":  # (the synthetic set's size is its flag's)
            source = f"CelebA {config.data_split} images" if config.data == "celeba" else "images"
            self.note(f"data: {images.shape[0]} {source} under {config.data_root}", event="data",
                      images=int(images.shape[0]))

        # micro-batch: the flag, else the memory manager's choice under --memory-budget (on CUDA by default
        # the device's free memory), else the whole batch
        self.micro_batch = config.micro_batch or self.rank_batch
        self.images_on_host = config.data_on == "host" and device.type != "cpu"
        if config.micro_batch is None and (config.memory_budget is not None or device.type == "cuda"):
            self.micro_batch = self.micro_batch_for_budget(config.memory_budget)  # (--data-on auto: it places
            # the images too)
        else:
            if config.memory_budget is not None and self.rank_batch % self.micro_batch == 0:
                self.check_micro_batch_budget(config.memory_budget)
            if config.checkpointing == "auto":
                self.note("--checkpointing auto searches under the memory budget, and none was searched (an "
                          "explicit --micro-batch, or a CPU without --memory-budget): no activation checkpointing",
                          event="memory_budget", checkpointing="none")
        if self.micro_batch < 1 or self.rank_batch % self.micro_batch:
            raise DreamError(f"micro batch {self.micro_batch} must divide the per-process batch {self.rank_batch}",
                             same_on_every_rank=True)
        if not self.images_on_host:
            self.batches.move_to_device()

        self.input_generator = torch.Generator(device=device)
        self.step_graph = StepGraph(self.graphed_step_body, device) if config.cuda_graphs else None
        self.sample_noise = torch.randn(config.sample_count, self.model_config.in_channels,
                                        self.model_config.image_size, self.model_config.image_size,
                                        generator=torch.Generator().manual_seed(config.seed + 1))

    def step_spec_fields(self, checkpointing: str, images_on_host: bool | None = None) -> dict:
        """What dream.memory's StepSpec needs of this run, beyond the config's own fields; the images count
        where they are kept on the device (images_on_host None: where this run keeps them)."""
        on_host = self.images_on_host if images_on_host is None else images_on_host
        return dict(batch_size=self.rank_batch, precision=self.precision, backend=self.backend,
                    checkpointing=checkpointing, model_overrides=self.model_config,
                    objective_config=self.objective_config,
                    data_images=0 if on_host else len(self.batches.images),
                    target="cuda" if self.device.type == "cuda" else "cpu")

    def check_micro_batch_budget(self, budget_bytes: int) -> None:
        """An explicit --micro-batch is kept even under --memory-budget; a line says when the estimator puts
        its step over the budget (on CUDA, out-of-memory recovery then halves it when it must). --data-on auto
        (not on a CPU): the images stay on the host when the step fits the budget only without them."""
        from dataclasses import replace

        from dream.memory import CUDA_ESTIMATE_MARGIN, StepSpec, estimate_step_memory, format_size

        spec = StepSpec.from_config(self.config, **self.step_spec_fields(self.checkpointing),
                                    micro_batch=self.micro_batch)
        try:
            peak = estimate_step_memory(spec).peak_bytes
        except Exception as error:  # noqa: BLE001  - the estimate only informs
            self.note(f"memory estimate failed ({type(error).__name__}: {error}); --micro-batch {self.micro_batch} "
                      f"not checked against --memory-budget", event="memory_budget", micro_batch=self.micro_batch)
            return
        limit = budget_bytes * (1 - (CUDA_ESTIMATE_MARGIN if spec.target == "cuda" else 0.0))
        over = peak > limit
        where = ""
        if over and spec.data_images and self.config.data_on == "auto" and self.device.type != "cpu":
            try:
                without = estimate_step_memory(replace(spec, data_images=0)).peak_bytes
            except Exception:  # noqa: BLE001  - the estimate only informs
                without = None
            if without is not None and without <= limit:
                self.images_on_host, peak, over = True, without, False
                where = (f"; the {spec.data_images} images stay in host memory (on the device the step would not "
                         f"fit)")
        self.note(f"{'warning: ' if over else ''}--micro-batch {self.micro_batch}: the step is estimated at "
                  f"{format_size(peak)}, {'over' if over else 'within'} --memory-budget {format_size(budget_bytes)}"
                  + (" (a smaller --micro-batch, or leave it out to have one chosen)" if over else "") + where,
                  event="memory_budget", micro_batch=self.micro_batch, budget_bytes=budget_bytes,
                  estimated_peak_bytes=int(peak), over_budget=over,
                  data_on="host" if self.images_on_host else "device")

    def micro_batch_for_budget(self, budget_bytes: int | None) -> int:
        """The largest micro-batch whose training step fits in `budget_bytes` (None: the device's free
        memory), by dream.memory's estimator. Without an explicit budget an estimator failure is only a
        warning: the whole batch is tried, and out-of-memory recovery halves it if needed."""
        from dream.memory import choose_micro_batch, format_size, plan_step

        if budget_bytes is None:
            from dream.memory import default_budget_bytes

            budget_bytes = default_budget_bytes(self.device)
        # --checkpointing auto: plan_step searches the backend's policies (least recomputation first);
        # --data-on auto (not on a CPU): it may keep the images on the host
        policies = policies_for_backend(self.backend) if self.config.checkpointing == "auto" else (self.checkpointing,)
        if self.config.checkpointing == "auto" and self.config.cuda_graphs:
            policies = graph_safe_policies(policies, True, self.model_config.dropout)
        place = self.config.data_on == "auto" and self.device.type != "cpu"

        def micro_batch_for(policy, images_on_host):
            return choose_micro_batch(self.config, budget_bytes, **self.step_spec_fields(policy, images_on_host))

        try:
            micro, policy, self.images_on_host = plan_step(policies, self.rank_batch, micro_batch_for,
                                                           images_on_host=self.images_on_host, place_images=place)
        except Exception as error:  # noqa: BLE001
            if self.config.memory_budget is not None and isinstance(error, DreamError):
                # the estimate of the same step against the same budget: every rank refuses alike
                raise DreamError(str(error), same_on_every_rank=True) from None
            if self.config.memory_budget is not None:
                raise
            self.note(f"memory estimate failed ({type(error).__name__}: {error}); using the whole batch",
                      event="memory_budget", micro_batch=self.rank_batch, budget_bytes=budget_bytes)
            return self.rank_batch
        if policy != self.checkpointing:
            self.checkpointing = policy
            self.model.set_checkpointing(policy)
        where = (f"; the {len(self.batches.images)} images stay in host memory (on the device they would leave "
                 f"less)" if self.images_on_host and place else "")
        self.note(f"memory budget {format_size(budget_bytes)}: micro-batch {micro} of {self.rank_batch}, "
                  f"activation checkpointing {policy}{where}", event="memory_budget", micro_batch=int(micro),
                  checkpointing=policy, budget_bytes=budget_bytes,
                  data_on="host" if self.images_on_host else "device")
        return divisor_at_most(self.rank_batch, int(micro))

    # ------------------------------------------------------------------------------------------
    # one optimizer step
    def autocast(self):
        return autocast_for(self.precision, self.device.type)

    def reseed(self) -> None:
        """Dropout of this step on this rank draws from the default generators seeded by (seed, step, rank)."""
        torch.manual_seed(step_seed(self.config.seed, self.step, 1 + self.dist.rank))

    def draw_inputs(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t and noise for the whole global batch, from (seed, step) alone; this rank's samples of them."""
        self.input_generator.manual_seed(step_seed(self.config.seed, self.step, 0))
        n, w = self.config.batch_size, self.dist.world_size
        t = torch.randint(0, self.diffusion.num_timesteps, (n,), device=self.device, generator=self.input_generator)
        noise = torch.randn((n, *x0.shape[1:]), device=self.device, generator=self.input_generator)
        return t[self.dist.rank::w], noise[self.dist.rank::w]

    def train_step(self, x0: torch.Tensor) -> dict:
        """One optimizer step over this rank's batch x0; returns the logged scalars (tensors)."""
        t, noise = self.draw_inputs(x0)
        if self.channels_last:
            x0, noise = (v.contiguous(memory_format=torch.channels_last) for v in (x0, noise))
        while True:
            self.reseed()
            try:
                if self.step_graph is None:
                    logs = self.accumulate_gradients(x0, t, noise)
                    break
                key = self.graph_key()
                self.updating = self.step_graph.will_replay(key)  # a replay steps the optimizer and the EMA (an
                captures = self.step_graph.captures              # uncaptured body says so itself)
                try:
                    logs = self.step_graph(key, x0, t, noise)
                except CaptureFailed as error:  # nothing ran: the state is the last step's
                    self.updating = False
                    raise DreamError(f"--cuda-graphs: the training step could not be captured as a CUDA graph "
                                     f"({error}); train without --cuda-graphs") from error
                if self.step_graph.captures > captures:
                    self.noted_capture()
                return self.end_step(logs, logs.pop("finite"))
            except (RuntimeError, MemoryError) as error:  # (in a capture nothing ran; in a warm-up step, before
                if not out_of_memory(error):                 # the optimizer: the state is the last step's)
                    raise
                self.updating = False
                reason = str(error).splitlines()[0] if str(error) else f"{type(error).__name__}: out of memory"
            self.shrink_micro_batch(reason)  # outside the except block: the failed step's tensors are freed
        return self.apply_update(logs)

    def noted_capture(self) -> None:
        """The first capture is said on stderr; each one is logged."""
        graph = self.step_graph
        fields = dict(event="cuda_graph", captures=graph.captures, capture_s=round(graph.last_capture_seconds, 3))
        if graph.captures == 1:
            changes = len({epoch_phase(self.config.objective, epoch, self.objective_config)
                           for epoch in range(self.epoch, self.config.epochs)}) - 1
            again = (f" (again, after {graph.warmup_steps} plain warm-up steps, at each of the {changes} later "
                     f"epochs where the objective changes)" if changes else "")
            self.note(f"training step captured as a CUDA graph in {graph.last_capture_seconds:.1f} s{again}", **fields)
        elif self.dist.is_main:
            self.log({**fields, "step": self.step, "epoch": self.epoch})

    def graph_key(self) -> tuple:
        """What the captured step depends on besides its inputs' values: the objective's phase (what it computes
        from the epoch: the seed objective's DREAM start and ramp), the micro-batches, dropout on or off."""
        return epoch_phase(self.config.objective, self.epoch, self.objective_config), self.micro_batch, \
            self.model.training

    def graphed_step_body(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> dict:
        """The device side of a step, all of it capturable: gradients, clipping, the optimizer and EMA step decided
        on the device; returns the logs and the step's finiteness flags."""
        logs, finite, ok = self.reduce_and_clip(self.accumulate_gradients(x0, t, noise))
        self.updating = True  # (captured: from here the replays step; warm-up: as apply_update)
        conditional_step(self.optimizer, self.ema, self.model, ok)
        return {**logs, "finite": finite}

    def accumulate_gradients(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> dict:
        """Gradients of the mean loss over x0, by micro-batches; DDP averages them over ranks in the last."""
        self.optimizer.zero_grad(set_to_none=True)
        weight = self.micro_batch / x0.shape[0]

        def backward(loss):  # the objective backpropagates each term as soon as it is built
            self.scaler.scale(loss * weight).backward()

        totals: dict[str, torch.Tensor] = {}
        for start in range(0, x0.shape[0], self.micro_batch):
            part = slice(start, start + self.micro_batch)
            last = start + self.micro_batch >= x0.shape[0]
            with (self.ddp.no_sync() if self.ddp is not None and not last else nullcontext()), self.autocast():
                _, logs = self.objective(self.forward, self.diffusion, x0[part], self.epoch, self.objective_config,
                                         t=t[part], noise=noise[part], backward=backward)
            for key, value in logs.items():
                totals[key] = totals.get(key, 0) + value.detach().float() * weight
        return totals

    def shrink_micro_batch(self, reason: str) -> None:
        if self.step_graph is not None:
            self.step_graph.reset()  # its memory goes back before the smaller micro-batch is tried
        self.optimizer.zero_grad(set_to_none=True)
        drop_partial_optimizer_state(self.optimizer)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.micro_batch == 1:
            allowed = graph_safe_policies(policies_for_backend(self.backend), self.config.cuda_graphs,
                                          self.model_config.dropout)
            hint = (" (--checkpointing all recomputes activations instead of keeping them)"
                    if self.checkpointing != "all" and "all" in allowed else "")
            raise torch.cuda.OutOfMemoryError(f"{reason}; already at micro-batch 1{hint}")
        smaller = divisor_at_most(self.rank_batch, self.micro_batch // 2)
        if self.dist.enabled:
            raise torch.cuda.OutOfMemoryError(
                f"{reason}; with {self.dist.world_size} processes the micro-batch cannot be lowered during a step "
                f"(the ranks would fall out of step): rerun with --micro-batch {smaller}")
        self.note(f"out of memory at micro-batch {self.micro_batch} (step {self.step}): redoing the step with "
                  f"micro-batch {smaller}", event="out_of_memory", micro_batch=smaller, reason=reason)
        self.micro_batch = smaller

    def apply_update(self, logs: dict) -> dict:
        """Average the logs over ranks, clip, step and update the EMA unless the loss or the gradients are not
        finite, advance the counters. Without a loss scaler that decision is made on the device (fused AdamW's
        found_inf, the EMA's `applied`) and the host reads the step's flags when the next step has been queued:
        no host sync per step."""
        logs, finite, ok = self.reduce_and_clip(logs)
        self.updating = True  # until the counters move, a checkpoint would mix two steps
        if self.scaler.is_enabled():
            self.update_on_host(finite)
        else:
            conditional_step(self.optimizer, self.ema, self.model, ok)
        return self.end_step(logs, finite)

    def reduce_and_clip(self, logs: dict) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """The logs averaged over ranks, with the gradient norm and "skipped"; the gradients unscaled and clipped.
        Returns (logs, finite: [loss finite, gradients finite], ok: both)."""
        keys = sorted(logs)
        logs = dict(zip(keys, self.dist.mean(torch.stack([logs[k] for k in keys])).unbind()))
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip or math.inf)
        finite = torch.stack([logs["loss"].isfinite(), grad_norm.isfinite()])
        ok = finite.all()
        return {**logs, "grad_norm": grad_norm.detach().float(), "skipped": (~ok).float()}, finite, ok

    def end_step(self, logs: dict, finite: torch.Tensor) -> dict:
        """The host's side of a step whose update has been queued (or, fp16, done): its flags kept to be read when
        the next step has been queued, the counters advanced."""
        if not self.scaler.is_enabled():
            self.pending_steps.append((self.step + 1, HostCopy(finite)))
        self.step += 1
        self.batch_in_epoch += 1
        self.count_steps(keep_last=True)
        self.updating = False
        return logs

    def update_on_host(self, finite: torch.Tensor) -> None:
        """The step decided on the host (a sync), with fp16: the loss scaler has its own say."""
        loss_ok, grads_ok = finite.tolist()
        if loss_ok and (grads_ok or self.scaler.is_enabled()):
            self.scaler.step(self.optimizer)  # with fp16 the scaler skips a step whose gradients overflowed
        self.scaler.update()
        stepped = loss_ok and grads_ok
        if stepped:
            self.ema.update(self.model)
        # fp16: an overflow is the scaler's business (it lowers the loss scale and the step is skipped) until
        # the scale has fallen below 1, where the gradients are not finite even unscaled
        bad = not loss_ok or not (grads_ok or (self.scaler.is_enabled() and self.scaler.get_scale() >= 1.0))
        self.count_step(self.step + 1, stepped, bad)

    def count_steps(self, keep_last: bool = False) -> None:
        """Count the outcome of the steps decided on the device; keep_last leaves the newest one pending (its
        flags are read once the next step has been queued, when reading them does not drain the queue)."""
        while len(self.pending_steps) > keep_last:
            step, flags = self.pending_steps.popleft()
            loss_ok, grads_ok = flags.read()
            stepped = loss_ok and grads_ok
            self.count_step(step, stepped, bad=not stepped)

    def count_step(self, step: int, stepped: bool, bad: bool) -> None:
        self.skipped_steps += not stepped
        self.bad_in_a_row = self.bad_in_a_row + 1 if bad else 0
        self.skipped_in_a_row = 0 if stepped else self.skipped_in_a_row + 1
        self.counted_step = step

    # ------------------------------------------------------------------------------------------
    # state, checkpoints, resume
    def state_dict(self) -> dict:
        self.count_steps()  # the counters saved cover every step taken
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,  # with (seed, epoch): the position in the data order
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "bad_in_a_row": self.bad_in_a_row,  # a streak of non-finite steps goes on counting after a resume
            "micro_batch": self.micro_batch,
            "world_size": self.dist.world_size,
            "data_images": self.batches.images.shape[0],
            "data_sha1": self.data_digest,
            "rng": rng_state(),
            "config": {**self.resolved_config(), "model": self.model_config.to_dict()},
            "code_version": code_version(),
        }

    def resolved_config(self) -> dict:
        """The config as given, with the "auto"/None choices as this run resolved them on its device, and its
        folders as absolute paths (sample and eval find the training data from anywhere)."""
        folders = {key: str(Path(value).expanduser().resolve()) for key in ("run_dir", "data_root")
                   if (value := getattr(self.config, key))}
        return {**self.config.to_dict(), **folders, "backend": self.backend, "precision": self.precision,
                "checkpointing": self.checkpointing, "channels_last": self.channels_last,
                "data_on": "host" if self.images_on_host else "device"}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        # the optimizer's state with this run's implementation flags (fused), not those of the run that saved it
        own = {key: self.optimizer.defaults[key] for key in ("fused", "foreach", "capturable")}
        groups = [{**group, **own} for group in state["optimizer"]["param_groups"]]
        self.optimizer.load_state_dict({**state["optimizer"], "param_groups": groups})
        match_parameter_layouts(self.optimizer)
        if state["scaler"] or not self.scaler.is_enabled():  # an fp32/bf16 run saved a disabled (empty) scaler:
            self.scaler.load_state_dict(state["scaler"])    # an fp16 resume starts a fresh one
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch_in_epoch"], state["step"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self.bad_in_a_row = state.get("bad_in_a_row", 0)
        self.pending_steps.clear()
        self.counted_step = self.step
        if self.step_graph is not None:  # the optimizer's state tensors are new ones: capture again
            self.step_graph.reset()
        set_rng_state(state["rng"])
        saved = state["config"]
        same_request = (saved.get("micro_batch") == self.config.micro_batch
                        and saved.get("memory_budget") == self.config.memory_budget
                        and state.get("world_size", 1) == self.dist.world_size)
        lowered = state.get("micro_batch", self.micro_batch)
        if same_request and lowered < self.micro_batch and self.rank_batch % lowered == 0:
            self.micro_batch = lowered  # keep a micro-batch that out-of-memory recovery lowered

    def position(self) -> tuple[int, int, int]:
        """(step, epoch, batch_in_epoch): a step that ends an epoch is saved again once the epoch has advanced."""
        return self.step, self.epoch, self.batch_in_epoch

    def save_checkpoint(self, check_ranks: bool = True) -> Path | None:
        """Rank 0 writes ckpt-<step>.pt; with check_ranks (a collective) first confirm all ranks agree."""
        if check_ranks:
            self.dist.check_identical([*self.model.parameters(), *self.ema.shadow], "model and EMA weights")
        if self.dist.is_main and self.last_checkpoint_position != self.position():
            self.last_checkpoint = self.checkpoints.save(self.state_dict(), self.step)
            self.last_checkpoint_position = self.position()
        return self.last_checkpoint

    def course_keys(self) -> list[str]:
        """The settings that fix a run's course: a checkpoint continues only under the same."""
        keys = ["preset", "batch_size", "objective", "schedule", "num_timesteps", "seed", "data"]
        return keys + {"synthetic": ["data_count"], "celeba": ["data_root", "data_split"]}.get(self.config.data,
                                                                                               ["data_root"])

    def check_folder_takes_branch(self, state: dict, path: str) -> None:
        """--resume FILE into a run folder that holds another run (its config.json fixes another course than FILE's
        run, and it holds checkpoints or logged steps) is refused: going on there would list FILE's checkpoints
        beside that run's and keep that run's log up to FILE's step."""
        try:
            folder_config = json.loads((self.run_dir / "config.json").read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return  # no run here yet (a config.json that is not a run's is refused before this)
        if not isinstance(folder_config, dict) or not (self.checkpoints.listed() or logged_steps(self.run_dir)):
            return
        for key in (key for key in self.course_keys() if key in folder_config):
            if key == "data_root" and folder_config[key] and not Path(folder_config[key]).expanduser().is_absolute():
                continue  # (written relative by an older version: relative to a folder not known now)
            theirs, file_run = comparable(key, folder_config[key]), comparable(key, state["config"].get(key))
            if theirs != file_run:
                flag = FLAGS.get(key, "--" + key.replace("_", "-"))
                raise DreamError(f"{self.run_dir} holds another run (made with {flag} {theirs}; {path} was made with "
                                 f"{flag} {file_run}): going on from {path} there would mix their checkpoints and "
                                 f"logs; pass another --run-dir to branch off from it", same_on_every_rank=True)

    def check_ranks_start_alike(self) -> None:
        """Every rank goes on from the same step and weights (each finds its checkpoint on its own: a run folder
        that is not shared, or changed between their loads, would have them train apart and hang in a collective
        later)."""
        position = torch.tensor(self.position(), dtype=torch.long, device=self.device)
        try:
            self.dist.check_identical([position, *self.model.parameters(), *self.ema.shadow],
                                      "the resumed step and weights")
        except RuntimeError as error:
            if "differ between ranks" not in str(error):
                raise
            raise DreamError(f"the processes of this job go on from different checkpoints (rank {self.dist.rank}: "
                             f"step {self.step}, {self.last_checkpoint or 'no checkpoint'}): every process must see "
                             f"the same --run-dir (a filesystem they share) or --resume FILE",
                             same_on_every_rank=True) from None

    def resume(self, path: str | None = None) -> bool:
        """Continue from `path` or the run folder's newest valid checkpoint; False (and a log trimmed to
        step 0) when there is none. What fixes the run's course (model, batch, objective, seed, data) must
        match; the optimizer and EMA settings are this command's (so "lower --lr and rerun" works)."""
        with warnings.catch_warnings():
            if not self.dist.is_main:  # a damaged checkpoint is reported once, by rank 0
                warnings.simplefilter("ignore")
            hint = ": pass --resume FILE, or move them away to start this run over"
            if path:
                with distributed.agreed_setup(self.dist):  # a file no rank can load is said once
                    state = load_checkpoint(path, hint=hint)
            else:
                state = self.checkpoints.latest(hint)
        if state is None:
            if self.dist.is_main:
                kept = ""
                if logged_steps(self.run_dir):  # the log of steps no checkpoint holds (gone, or moved away): kept
                    stem, n = f"metrics-before-{time.strftime('%Y%m%d-%H%M%S')}", 1
                    old_log = self.run_dir / f"{stem}.jsonl"
                    while old_log.exists():  # (never over another kept log)
                        n += 1
                        old_log = self.run_dir / f"{stem}-{n}.jsonl"
                    os.replace(self.run_dir / "metrics.jsonl", old_log)
                    kept = f" (the log of its steps is kept as {old_log.name})"
                if self.checkpoints.listed():
                    warnings.warn(f"the checkpoints listed in {self.checkpoints.folder} are gone; starting from "
                                  f"step 0{kept}", stacklevel=2)
                elif kept:
                    warnings.warn(f"{self.run_dir} holds a log of training steps but no checkpoint (moved away, or "
                                  f"killed before its first); starting from step 0{kept}", stacklevel=2)
                trim_log(self.run_dir / "metrics.jsonl", 0)  # (the notes logged before a step)
            return False
        if path:
            check_training_state(state)
            self.check_folder_takes_branch(state, path)
            newest = self.checkpoints.newest_step()
            if newest is not None and newest > state["step"]:
                raise DreamError(
                    f"--resume {path} is at step {state['step']}, but {self.checkpoints.folder} holds newer "
                    f"checkpoints (up to step {newest}) that going on from it would delete: rerun without --resume "
                    f"to continue from step {newest}, or use another --run-dir to branch off at step {state['step']}",
                    same_on_every_rank=True)
        # a refusal names the flag and says what to change: the flag, or the run (with --resume FILE, the file)
        instead = "or resume another checkpoint" if path else "or use another --run-dir"
        saved = state["config"]
        for key in self.course_keys():
            old, new = comparable(key, saved.get(key)), comparable(key, getattr(self.config, key))
            if old != new:
                flag = FLAGS.get(key, "--" + key.replace("_", "-"))
                raise DreamError(f"checkpoint {state['_path']} was made with {flag} {old}, this command has {flag} "
                                 f"{new}: pass {flag} {old} to go on, {instead}", same_on_every_rank=True)
        old_objective, new_objective = (ObjectiveConfig(**(config or {})) for config in
                                        (saved.get("objective_config"), self.config.objective_config))
        changed = [name for name in OBJECTIVE_SETTINGS.get(self.config.objective, ())  # those this objective reads
                   if getattr(old_objective, name) != getattr(new_objective, name)]
        if changed:
            text = ", ".join(f"--{name.replace('_', '-')} {getattr(old_objective, name)!r} "
                             f"(this command: {getattr(new_objective, name)!r})" for name in changed)
            raise DreamError(f"checkpoint {state['_path']} was made with {text}: pass the same to go on, "
                             f"{instead}", same_on_every_rank=True)
        images = self.batches.images.shape[0]
        if state.get("data_images", images) != images:
            raise DreamError(f"checkpoint {state['_path']} was made on {state['data_images']} images, this run's "
                             f"data has {images}: its data order cannot continue; use the same images, {instead}",
                             same_on_every_rank=True)
        for key, value in self.model_config.to_dict().items():
            old = saved["model"].get(key)
            if (tuple(old) if isinstance(old, list) else old) != value:
                flag = MODEL_FLAGS.get(key)
                what = f"{flag} {old}, this command has {flag} {value}" if flag else \
                    f"a model with {key}={old!r}, this command's has {key}={value!r} (--preset)"
                raise DreamError(f"checkpoint {state['_path']} was made with {what}: pass the same to go on, "
                                 f"{instead}", same_on_every_rank=True)
        self.load_state_dict(state)
        self.last_checkpoint = Path(state["_path"])
        # a checkpoint of another folder (a branch: --resume FILE --run-dir NEW) is saved into this one at the next
        # save, even at this position: NEW's own checkpoint is what a rerun without --resume goes on from
        in_this_run = self.checkpoints.entry_for(self.last_checkpoint) is not None
        self.last_checkpoint_position = self.position() if in_this_run else (-1, -1, -1)
        if self.dist.is_main:
            trim_log(self.run_dir / "metrics.jsonl", self.step)
        self.note(f"resumed from {state['_path']} at step {self.step} (epoch {self.epoch})", event="resume")
        if state.get("data_sha1", self.data_digest) != self.data_digest:
            self.note(f"warning: the data's images changed since that checkpoint (the same {images} images by "
                      f"count, not by content); training goes on over this run's images", event="data_changed",
                      old=state["data_sha1"], new=self.data_digest)
        changes = self.apply_hyperparameters()
        changes += [(flag, saved.get(key), now) for flag, key, now in
                    (("--grad-clip", "grad_clip", self.config.grad_clip), ("--precision", "precision", self.precision))
                    if key in saved and saved[key] != now]
        for flag, old, new in changes:
            self.note(f"{flag} {new!r} from this command (the checkpoint's run had {old!r})",
                      event="hyperparameter", flag=flag, old=old, new=new)
        # how the step runs may change too (speed and memory, not the course: the same batches, gradients
        # equal up to rounding); noted, since config.json now holds this command's
        data_on = "host" if self.images_on_host else "device"
        for flag, key, now in (("--backend", "backend", self.backend), ("--compile", "compile", self.config.compile),
                               ("--cuda-graphs", "cuda_graphs", self.config.cuda_graphs),
                               ("--checkpointing", "checkpointing", self.checkpointing),
                               ("--channels-last", "channels_last", self.channels_last),
                               ("--data-on", "data_on", data_on)):
            old = saved.get(key)
            if old is not None and old != "auto" and old != now:
                self.note(f"{flag} {now!r} in this command (the checkpoint's run had {old!r})", event="setting",
                          flag=flag, old=old, new=now)
        return True

    def apply_hyperparameters(self) -> list[tuple[str, object, object]]:
        """Set the optimizer's lr and weight decay and the EMA's decay and warmup from this run's config
        (a loaded checkpoint brings back its own); returns (flag, old, new) for each that changed."""
        config, group = self.config, self.optimizer.param_groups[0]
        before = {"--lr": group["lr"], "--weight-decay": group["weight_decay"], "--ema-decay": self.ema.decay,
                  "--ema-warmup": self.ema.warmup}
        for group in self.optimizer.param_groups:
            group["lr"], group["weight_decay"] = config.lr, config.weight_decay
        self.ema.decay, self.ema.warmup = config.ema_decay, config.ema_warmup
        if self.step_graph is not None:  # a captured step holds the old values
            self.step_graph.reset()
        after = {"--lr": config.lr, "--weight-decay": config.weight_decay, "--ema-decay": config.ema_decay,
                 "--ema-warmup": config.ema_warmup}
        return [(flag, before[flag], after[flag]) for flag in before if before[flag] != after[flag]]

    # ------------------------------------------------------------------------------------------
    # reporting (rank 0)
    @torch.no_grad()
    def save_sample_grid(self, stop: "StopFlag | None" = None) -> Path | None:
        """Rank 0 writes samples/grid-<step>.png from the fixed noise with the EMA weights; a stop asked meanwhile
        (`stop`) drops it after the current denoising step (GridStopped): torchrun kills its workers 30 s after
        its SIGTERM, and the checkpoint comes first."""
        if not self.dist.is_main:
            return None
        torchvision = import_torchvision("the sample grid")

        def stop_asked():
            if stop is not None and stop.requested:
                raise GridStopped

        path = self.run_dir / "samples" / f"grid-{self.step:09d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        was_training = self.model.training
        self.model.eval()
        try:
            with self.ema.applied(self.model), self.autocast():
                steps = min(self.config.sample_steps, self.diffusion.num_timesteps)
                x = self.diffusion.ddim_sample_loop(self.model, self.sample_noise.shape, steps=steps,
                                                    x_T=self.sample_noise.to(self.device), progress=False,
                                                    on_step=stop_asked)
        finally:
            self.model.train(was_training)
        grid = torchvision.utils.make_grid((x.float().clamp(-1, 1) + 1) / 2, nrow=int(math.ceil(len(x) ** 0.5)))
        with atomic_file(path, durable=False) as f:  # a kill mid-write leaves no torn grid that a rerun keeps
            torchvision.utils.save_image(grid, f, format="png")
        return path

    def log(self, record: dict) -> None:
        """One JSON line in metrics.jsonl; a non-finite number (the loss of a skipped step) is written as null,
        so that every line is standard JSON. Before the run starts (setup, resume) records wait in
        pending_records: a refused command leaves the run's log as it was."""
        if self.dist.is_main:
            record = {key: None if isinstance(value, float) and not math.isfinite(value) else value
                      for key, value in record.items()}
            if self.pending_records is not None:
                self.pending_records.append(record)
                return
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")

    def note(self, message: str, event: str, **fields) -> None:
        """An event worth a line on stderr and a record in the log."""
        if self.dist.is_main:
            tqdm.write(f"dream train: {message}", file=sys.stderr)
            self.log({"event": event, "step": self.step, "epoch": self.epoch, **fields})

    def report(self, logs: dict, images: int, seconds: float, bar) -> dict:
        """One metrics.jsonl record of the means since the previous one (LogWindow), and the bar's postfix."""
        record = {key: int(value) if key in ("skipped", "logged_steps") else float(value)
                  for key, value in logs.items()}
        record.update(step=self.step, epoch=self.epoch, images_per_s=images / max(seconds, 1e-9),
                      micro_batch=self.micro_batch, skipped_steps=self.skipped_steps)
        postfix = {"loss": f"{record['loss']:.4f}", "img/s": f"{record['images_per_s']:.1f}"}
        if self.device.type == "cuda":  # peak allocated since the previous report, in GB (10^9) as --memory-budget
            record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
            torch.cuda.reset_peak_memory_stats(self.device)
            postfix["mem"] = f"{record['gpu_mem_gb']:.2f}G"
        self.log(record)
        bar.set_postfix(postfix)
        return record

    # ------------------------------------------------------------------------------------------
    # the loop
    def run(self, resume: str | None = None) -> dict:
        """Train to the end (or --max-steps), holding the run folder's lock (a second job there is refused).
        With an explicit --memory-budget on CUDA the allocator is held to it for the whole run, so a step that
        would pass it runs out of memory and is redone with a smaller micro-batch instead of silently using
        more."""
        with folder_lock(self.run_dir, command="dream train") if self.dist.is_main else nullcontext() as holder:
            if self.dist.max(int(holder is not None), self.device):  # every rank stops, rank 0 says why
                self.dist.barrier()  # (a rank leaving while another still tears down its group can abort it)
                raise DreamError(f"--run-dir {self.run_dir} is in use by another process ({holder}); let it "
                                 f"finish or stop it, then rerun", same_on_every_rank=True)
            try:
                return self.run_locked(resume)
            except BaseException:
                if self.made_run_dir and self.dist.is_main:  # a run refused before it started leaves no folder
                    with suppress(OSError):
                        if [path.name for path in self.run_dir.iterdir()] == [LOCK_FILE]:
                            (self.run_dir / LOCK_FILE).unlink()  # (ours: we hold it)
                        self.run_dir.rmdir()
                raise

    def run_locked(self, resume: str | None) -> dict:
        from dream.memory import cuda_memory_cap

        with cuda_memory_cap(self.config.memory_budget, self.device) as fraction:
            if fraction is not None:
                self.note(f"CUDA allocator capped at {self.config.memory_budget / 1e9:.2f} GB "
                          f"({fraction:.1%} of the device) by the memory budget", event="memory_cap",
                          budget_bytes=self.config.memory_budget, fraction=fraction)
            return self.train_epochs(resume)

    def start_log(self) -> None:
        """The run is on: write its config and the records made during setup and resume."""
        if self.dist.is_main:
            atomic_write_text(self.run_dir / "config.json", json.dumps(self.resolved_config(), indent=1))
            pending, self.pending_records = self.pending_records, None
            for record in pending or ():  # setup's notes belong where the run starts (after a resume, its step)
                self.log({**record, "step": self.step, "epoch": self.epoch} if "event" in record else record)

    def train_epochs(self, resume: str | None) -> dict:
        config = self.config
        self.resume(resume)
        self.check_ranks_start_alike()
        # with --resume FILE, the checkpoints this run saves are the run folder's newest: a plain rerun finds them
        self.resume_hint = "rerun the same command" + (" without --resume" if resume else "")
        self.start_log()
        self.model.train()
        last = {}
        window = LogWindow()
        stop = StopFlag()
        with stop.installed(), self.emergency_checkpoint():
            self.end_epoch_if_done(stop)  # a run stopped after an epoch's last step resumes past that epoch
            while self.epoch < config.epochs and not self.finished():
                bar = tqdm(total=len(self.batches), initial=self.batch_in_epoch, desc=f"epoch {self.epoch}",
                           disable=not (config.progress and self.dist.is_main), leave=False)
                with closing(bar):  # closed before any stop or error message is printed
                    tick, images = time.perf_counter(), 0
                    for x0 in self.batches.epoch(self.epoch, self.batch_in_epoch):
                        window.add(self.train_step(x0))
                        images += config.batch_size
                        bar.update(1)
                        if self.bad_in_a_row >= config.max_bad_steps:  # counted up to the previous step
                            self.restore_after_divergence()
                        if (self.step % config.log_every == 0 or self.batch_in_epoch == len(self.batches)
                                or self.finished()):
                            self.count_steps()
                            last = self.report(window.values(), images, time.perf_counter() - tick, bar)
                            window, tick, images = LogWindow(), time.perf_counter(), 0
                        if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                            self.count_steps()
                            if not self.skipped_in_a_row:
                                self.save_checkpoint()
                        if self.dist.launcher_gone() and not stop.signum:
                            stop.signum = LAUNCHER_GONE  # torchrun was killed and cannot stop us: stop, and save
                        signum = self.agreed_stop(stop.signum)
                        if signum:
                            self.stop_for_signal(signum)
                        if self.finished():
                            break
                self.end_epoch_if_done(stop)
            self.count_steps()
            if self.bad_in_a_row:  # the run ends inside a streak of non-finite steps: not a success, nothing saved
                raise Diverged(f"training ended with {self.bad_in_a_row} non-finite step(s) in a row (steps "
                               f"{self.step - self.bad_in_a_row + 1}-{self.step}); no checkpoint was written after "
                               f"them, the last is {self.last_checkpoint}. Lower --lr or check the data, then "
                               f"{self.resume_hint} to go on from it.", same_on_every_rank=True)
            self.save_checkpoint()
            grid = self.run_dir / "samples" / f"grid-{self.step:09d}.png"
            if config.sample_every:
                dropped = 0
                if not image_done(grid):  # missing, or cut short (a full disk, a kill)
                    try:
                        self.save_sample_grid(stop)
                    except GridStopped:  # the checkpoint is saved: the rerun makes the grid
                        dropped = stop.signum
                signum = self.dist.max(dropped, self.device)  # (rank 0 alone makes the grid: every rank stops)
                if signum:
                    self.stop_for_signal(signum)
        self.dist.barrier()
        return {"step": self.step, "epoch": self.epoch, "last": last, "grid": str(grid) if grid.exists() else None,
                "checkpoint_dir": str(self.checkpoints.folder), "skipped_steps": self.skipped_steps,
                "micro_batch": self.micro_batch}

    def end_epoch_if_done(self, stop: "StopFlag") -> None:
        """After an epoch's last batch: the next epoch begins, with a sample grid every --sample-every epochs."""
        if self.batch_in_epoch != len(self.batches):
            return
        self.updating = True  # (a checkpoint between these two lines would skip an epoch)
        self.epoch += 1
        self.batch_in_epoch = 0
        self.updating = False
        if self.config.sample_every and self.epoch % self.config.sample_every == 0:
            with suppress(GridStopped):  # (that grid is dropped)
                self.save_sample_grid(stop)
            signum = self.dist.max(stop.signum, self.device)  # a stop asked during the grid: now, not after
            if signum:  # another step
                self.stop_for_signal(signum)

    def agreed_stop(self, signum: int) -> int:
        """The largest stop signal any rank has seen (0: none), the same on every rank. With several processes the
        vote taken after step s is read after step s + 1, by every rank at the same step: the all-reduce is not
        waited for, and a signal stops the job one step later."""
        if not self.dist.enabled:
            return signum
        vote, self.stop_vote = self.stop_vote, HostCopy(self.dist.max_tensor(signum, self.device))
        return vote.read()[0] if vote is not None else 0

    def finished(self) -> bool:
        return self.config.max_steps is not None and self.step >= self.config.max_steps

    def diverged(self) -> bool:
        """A streak of --max-bad-steps non-finite steps, counted up to the last step taken: the run has diverged
        (the loop acts on it after the next step; a stop or an error before then must not save it as a checkpoint,
        which every rerun would take, restore and diverge on again)."""
        self.count_steps()
        return self.bad_in_a_row >= self.config.max_bad_steps

    def stop_for_signal(self, signum: int) -> None:
        if self.diverged():  # what the next step's check would have done: restore the last good checkpoint, stop
            self.restore_after_divergence()
        path = self.save_checkpoint()
        self.dist.barrier()  # nobody exits (and gets the group torn down by torchrun) before rank 0 has saved
        gone = signum == LAUNCHER_GONE
        why = stop_reason(signum) if gone else f"stopped by {signal.Signals(signum).name}"
        raise Interrupted(f"{why} at step {self.step} (epoch {self.epoch}); checkpoint {path} saved. "
                          f"To resume, {self.resume_hint}.", signal.SIGTERM if gone else signum)

    def restore_after_divergence(self) -> None:
        message = (f"training diverged: {self.bad_in_a_row} steps in a row had a non-finite loss or gradients "
                   f"(steps {self.counted_step - self.bad_in_a_row + 1}-{self.counted_step})")
        try:
            state = self.checkpoints.latest()
        except DreamError as error:  # every checkpoint damaged: say so beside the divergence, delete nothing
            raise Diverged(f"{message}; and {error}: pass --resume FILE with a good copy, or move them away and "
                           f"start again with a lower --lr", same_on_every_rank=True) from None
        if state is None:
            raise Diverged(message + "; no checkpoint to restore. Lower --lr or check the data, then start again.",
                           same_on_every_rank=True)
        self.load_state_dict(state)
        self.last_checkpoint, self.last_checkpoint_position = Path(state["_path"]), self.position()
        raise Diverged(message + f"; restored the last good checkpoint {state['_path']} (step {self.step}). "
                       f"Lower --lr or check the data, then {self.resume_hint} to resume from it.",
                       same_on_every_rank=True)

    def state_is_sane(self) -> bool:
        """Between two steps and finite: safe to save as a checkpoint."""
        if self.updating or self.ema.in_use:
            return False
        tensors = [p.detach() for p in self.model.parameters()] + list(self.ema.shadow)
        return bool(torch.stack([t.isfinite().all() for t in tensors]).all())

    @contextmanager
    def emergency_checkpoint(self):
        """On an exception in the loop, rank 0 saves the state if it is sane, then reports how to resume."""
        try:
            yield
        except DreamError:
            raise
        except BaseException as error:
            if isinstance(error, (SystemExit, GeneratorExit)) or (
                    isinstance(error, KeyboardInterrupt) and not self.dist.is_main):
                raise
            where = f"at step {self.step} (epoch {self.epoch})"
            text = str(error).splitlines()[0] if str(error) else ""
            lost = self.dist.enabled and distributed.peer_lost(error)
            what = f"another process of this job stopped {where} ({distributed.peer_lost_summary(error)})" if lost \
                else f"{type(error).__name__} {where}: {text}"
            show_cause = not (lost or isinstance(error, OSError) or out_of_memory(error))
            if not self.dist.is_main:  # rank 0 saves, and names the checkpoint
                raise TrainingAborted(f"{what}; rank 0, if it still runs, saves an emergency checkpoint. To "
                                      f"resume, {self.resume_hint}.", show_cause) from error
            try:
                apart = "differ between ranks" in str(error)  # (check_identical): no state is this run's
                why_not = ("not the same on every rank" if apart else "mid-update or not finite"
                           if not self.state_is_sane() else
                           f"diverged ({self.bad_in_a_row} non-finite steps in a row)" if self.diverged() else None)
                path = self.save_checkpoint(check_ranks=False) if why_not is None else None
                saved = (f"emergency checkpoint {path} saved" if path else
                         f"the state was {why_not}, so it was not saved; the last checkpoint is {self.last_checkpoint}")
            except Exception as save_error:  # noqa: BLE001  - report both failures
                saved = f"the emergency checkpoint failed too ({type(save_error).__name__}: {save_error})"
            if isinstance(error, KeyboardInterrupt):
                raise Interrupted(f"interrupted {where}, dropping the step; {saved}. To resume, "
                                  f"{self.resume_hint}.", signal.SIGINT) from error
            if isinstance(error, OSError) and error.errno == errno.ENOSPC:
                keep = ", or lower --checkpoint-keep" if self.config.checkpoint_keep > 1 else ""
                what += f" (free space where {self.run_dir} is{keep})"
            raise TrainingAborted(f"{what}; {saved}. To resume, {self.resume_hint}.", show_cause) from error


def trim_log(path: Path, step: int) -> None:
    """Drop log records past `step` (and a torn last line): they belong to work a resume redoes."""
    if not path.exists():
        return
    text = path.read_text()
    kept = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    trimmed = "".join(line + "\n" for line in kept)
    if trimmed != text:  # (a finished run's rerun writes nothing)
        atomic_write_text(path, trimmed)


def comparable(key: str, value):
    """A course setting as compared between runs: a data root as the folder it resolves to."""
    if key == "data_root" and value:
        return str(Path(value).expanduser().resolve())
    return value


def logged_steps(run_dir: Path) -> bool:
    """Whether run_dir's metrics.jsonl records a training step (a line with a loss)."""
    try:
        with open(run_dir / "metrics.jsonl") as log:
            return any('"loss"' in line for line in log)
    except (OSError, UnicodeDecodeError):
        return False


def foreign_run_files(run_dir: Path) -> list[str]:
    """The files of `run_dir` that training writes or rewrites (config.json, metrics.jsonl) but which hold
    something else: a run's config names its preset and objective; every line of its log but a torn last
    one is a JSON record with a step or an event, and a torn one is the start of a record ("{...") followed by
    any number of NUL bytes, or NULs alone (appends a crash left unwritten read back as zeros)."""
    foreign = []
    config = run_dir / "config.json"
    if config.is_file():
        try:
            ours = {"preset", "objective", "batch_size"} <= set(json.loads(config.read_text()))
        except (ValueError, TypeError, OSError, UnicodeDecodeError):
            ours = False
        if not ours:
            foreign.append(config.name)
    log = run_dir / "metrics.jsonl"
    if log.is_file():
        try:
            lines = log.read_text().splitlines()
        except (OSError, UnicodeDecodeError):  # not text
            lines = None
        if lines is None or not all(_is_record(line) for line in lines[:-1]) or (
                lines and lines[-1].strip("\x00") and not lines[-1].lstrip().startswith("{")):
            foreign.append(log.name)
    return foreign


def _is_record(line: str) -> bool:
    """A line of a run's metrics.jsonl: a JSON object with a step or an event."""
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and bool({"step", "event"} & set(record))


class LogWindow:
    """The logged scalars of the steps since the last record: their means over the steps not skipped (a skipped
    step's values, maybe not finite, left out; a window of skipped steps only gives its last step's) and, as
    "skipped", how many were skipped. Sums and counts stay on the device until values(): no host sync per step."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.kept: torch.Tensor | int = 0  # steps not skipped
        self.steps = 0
        self.last: dict = {}

    def add(self, logs: dict) -> None:
        self.last = logs
        self.steps += 1
        kept = logs["skipped"] == 0
        self.kept = self.kept + kept
        for key, value in logs.items():
            if key != "skipped":
                self.sums[key] = self.sums.get(key, 0) + torch.where(kept, value, 0.0)

    def values(self) -> dict:
        kept = int(self.kept)
        means = {key: total / kept for key, total in self.sums.items()} if kept else dict(self.last)
        return {**means, "skipped": self.steps - kept, "logged_steps": self.steps}


def drop_partial_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """AdamW makes a parameter's state in its first step, one tensor after another (step, exp_avg, exp_avg_sq),
    before it updates anything: running out of memory in between leaves a state that the next step would take for
    whole (a KeyError) and a checkpoint would keep. Such states are dropped; the next step makes them again."""
    for group in optimizer.param_groups:
        needed = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if group.get("amsgrad") else set())
        for param in group["params"]:
            state = optimizer.state.get(param)
            if state and not needed <= state.keys():
                del optimizer.state[param]


class HostCopy:
    """A device tensor's value, copied to pinned host memory without waiting; read() waits for that copy alone,
    not for the work queued after it (read a step later, it has long been done)."""

    def __init__(self, tensor: torch.Tensor):
        self.done = None
        self.value = tensor
        if tensor.device.type == "cuda":
            self.value = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.value.copy_(tensor, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record(torch.cuda.current_stream(tensor.device))  # the copy's stream, whatever device is current

    def read(self) -> list:
        if self.done is not None:
            self.done.synchronize()
        return self.value.tolist()


class GridStopped(Exception):
    """A stop was asked while a sample grid was made: the grid is dropped."""


def train(config: TrainConfig, resume: str | None = None) -> dict:
    """Train in this process, or as one rank of a torchrun job (the environment says which). A command
    refused or stopped before its run starts leaves no new run folder behind."""
    run_dir = Path(config.run_dir).expanduser()
    made_run_dir = not run_dir.exists()  # looked at before the ranks meet: every rank's Trainer makes the folder
    with distributed.session(config.device) as dist:
        # rank 0's look, taken before any rank got past this collective to make the folder (joining the group
        # is no barrier: NCCL connects lazily)
        made_run_dir = dist.gather_flags(made_run_dir)[0]
        if resume:
            with distributed.agreed_setup(dist):  # before the slow setup; a file no rank has is said once
                require_checkpoint(resume, what="--resume")
        try:
            return Trainer(config, dist, new_run_dir=made_run_dir).run(resume)
        except BaseException:
            if made_run_dir and dist.is_main:
                with suppress(OSError):  # only an empty folder goes (not one holding another job's lock file)
                    run_dir.rmdir()
            raise
