"""Device memory of one training step: estimated without a GPU, measured with one, and planned.

    estimate_step_memory(spec) -> MemoryEstimate   one full step on fake CPU tensors (FakeTensorMode: shapes,
                                                   dtypes and strides, no data), every storage tracked by
                                                   torch.distributed._tools.mem_tracker.MemTracker; the peak
                                                   and its breakdown by category.
    measure_cuda_peak(spec) -> int                 the same step on CUDA: torch.cuda.max_memory_allocated.
    choose_micro_batch(config, budget) -> int      the largest micro-batch dividing the batch whose estimated
                                                   peak fits the budget (gradient accumulation keeps the batch).
    parse_bytes("6.8GB") -> 6_800_000_000

The step is the trainer's (dream/train.py, Trainer.train_step), run by `training_step` below: draw t and
noise for the batch; zero the gradients (set to None); per micro-batch, under autocast, the objective with
`backward=` (each term backpropagated as soon as it is formed, so one forward graph is alive at a time);
unscale, clip the gradient norm, fused AdamW step, EMA update. The state that lives across steps is
present from the start, as in a steady-state step: parameters, AdamW's exp_avg and exp_avg_sq (and its
step counters), the EMA weights, the diffusion tables, and optionally the uint8 dataset that DeviceBatches
keeps on the device. With accumulation the loop stops after the second micro-batch: from the second on,
every micro-batch starts from the same state (all gradients allocated), so later ones repeat its peak.

Categories (MemTracker's): parameters, buffers, gradients, optimizer (AdamW state), activations (forward
tensors and their recomputation under activation checkpointing), temporaries (backward tensors, such as
activation gradients), other (tensors given from outside: the EMA weights and the resident dataset).

What the estimate is for: a CUDA device. On fake CPU tensors, CPU autocast differs from CUDA autocast
for a few ops, and CPU dropout saves a float noise tensor where CUDA saves a 1-byte mask. With
target="cuda" (the default) `CudaAutocastPolicy` makes the CPU run follow the CUDA rules for the ops a
training step uses: group_norm, layer_norm, exp, log and pow run in fp32; softmax and log_softmax produce
fp32; dropout goes through native_dropout (bool mask). Attention through SDPA takes CPU's flash kernel,
which, like CUDA's flash and efficient kernels, keeps only the output and the logsumexp. What it does
not see: cuDNN/cuBLAS workspaces, the caching allocator's 512-byte rounding, DDP's gradient buckets, and
torch.compile (the eager model is traced). Compare with `measure_cuda_peak` on a GPU.
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace

import torch

from dream.diffusion import GaussianDiffusion
from dream.ema import EMA, conditional_step
from dream.errors import DreamError
from dream.math_flags import MathFlags, use_fast_math
from dream.model import (BACKENDS, CHECKPOINT_POLICIES, PRECISIONS, UNet, autocast_for, check_policy_backend,
                         make_config, policies_for_backend, to_channels_last)
from dream.objectives import ObjectiveConfig, get_objective

TARGETS = ("cuda", "cpu")
CATEGORIES = ("parameters", "buffers", "gradients", "optimizer", "activations", "temporaries", "other")
# MemTracker's reference-type values -> our category names
_CATEGORY_OF = {"Parameter": "parameters", "Buffer": "buffers", "Gradient": "gradients", "Optstate": "optimizer",
                "Activation": "activations", "Temp": "temporaries", "Other": "other"}


# ----------------------------------------------------------------------------------------------
# What is measured
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepSpec:
    """One training step, as far as memory is concerned.

    model_overrides / objective_config: dicts, (key, value) pairs, or a UNetConfig / ObjectiveConfig.
    micro_batch None (or == batch_size): no accumulation; otherwise it must divide batch_size.
    epoch None: an epoch in the DREAM phase of the objective (the larger step of `seed`).
    early_backward True: the trainer's form (objective(..., backward=...)); False: the loss keeps its graph
    and is backpropagated once at the end (both DREAM forwards' graphs alive together).
    data_images: images of the uint8 dataset kept on the device by DeviceBatches (0: not counted).
    """
    preset: str = "seed"
    model_overrides: tuple = ()  # UNetConfig fields, as a dict or (key, value) pairs
    batch_size: int = 128
    micro_batch: int | None = None
    precision: str = "bf16"
    objective: str = "seed"
    objective_config: tuple = ()  # ObjectiveConfig fields, as a dict or (key, value) pairs
    early_backward: bool = True
    backend: str = "eager"
    checkpointing: str = "none"
    schedule: str = "cosine"
    num_timesteps: int = 1000
    grad_clip: float = 1.0
    epoch: int | None = None
    data_images: int = 0
    target: str = "cuda"
    channels_last: bool | None = None  # the model's memory format; None: channels_last on a CUDA target, as the trainer
    cuda_graphs: bool = False  # the trainer's --cuda-graphs: the step graph's input buffers beside the batch

    def __post_init__(self):
        for name in ("model_overrides", "objective_config"):
            value = getattr(self, name)
            if is_dataclass(value):  # a UNetConfig (all its fields) or an ObjectiveConfig
                value = asdict(value)
            items = value.items() if isinstance(value, dict) else value
            object.__setattr__(self, name, tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                                        for k, v in items)))
        self.validate()

    def validate(self) -> None:
        def positive_int(name, value):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        positive_int("batch size", self.batch_size)
        if self.micro_batch is not None:
            positive_int("micro batch", self.micro_batch)
            if self.batch_size % self.micro_batch:
                raise ValueError(f"micro batch {self.micro_batch} must divide the batch size {self.batch_size}")
        choices = {"precision": (self.precision, PRECISIONS), "backend": (self.backend, BACKENDS),
                   "checkpointing": (self.checkpointing, CHECKPOINT_POLICIES), "target": (self.target, TARGETS)}
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose one of {allowed}")
        check_policy_backend(self.checkpointing, self.backend)
        get_objective(self.objective)
        if isinstance(self.data_images, bool) or not isinstance(self.data_images, int) or self.data_images < 0:
            raise ValueError(f"data_images must be a non-negative integer, got {self.data_images!r}")
        if self.channels_last not in (None, True, False):
            raise ValueError(f"channels_last must be True, False or None, got {self.channels_last!r}")

    @property
    def uses_channels_last(self) -> bool:
        return self.target == "cuda" if self.channels_last is None else self.channels_last

    @property
    def micro(self) -> int:
        return self.micro_batch or self.batch_size

    def normalized(self) -> "StepSpec":
        """The same step with micro_batch spelled out (None and batch_size are the same step)."""
        return replace(self, micro_batch=self.micro)

    def model_config(self):
        return make_config(self.preset, **dict(self.model_overrides))

    def objective_settings(self) -> ObjectiveConfig:
        return ObjectiveConfig(**dict(self.objective_config))

    def dream_epoch(self) -> int:
        """The epoch the step is taken at: given, or the first with the objective's full DREAM weight."""
        if self.epoch is not None:
            return self.epoch
        settings = self.objective_settings()
        return int(max(settings.dream_start_epoch, math.ceil(settings.ramp_epochs)))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["model_overrides"] = dict(self.model_overrides)
        out["objective_config"] = dict(self.objective_config)
        return out

    @classmethod
    def from_config(cls, config, **overrides) -> "StepSpec":
        """A spec from any object with StepSpec-named attributes (e.g. dream.train.TrainConfig).

        "auto" precision/backend resolve as the trainer does on the device the step will run on:
        bf16 (fp32 without bf16 support) and triton on CUDA; fp32 and eager elsewhere."""
        values = {f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)}
        values.update(overrides)
        device = str(getattr(config, "device", "auto"))
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if values.get("precision") == "auto":
            values["precision"] = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
        if values.get("backend") == "auto":
            values["backend"] = "triton" if cuda else "eager"
        return cls(**values)


@dataclass
class MemoryEstimate:
    peak_bytes: int
    breakdown: dict  # category -> bytes at the peak (sums to peak_bytes)
    snapshots: dict  # "start", "before_optimizer", "end" -> {category: bytes, "total": bytes}
    spec: StepSpec
    method: str = "fake CPU tensors + MemTracker"
    cuda_peak_bytes: int | None = None
    extras: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        inputs = {**self.spec.to_dict(), "channels_last": self.spec.uses_channels_last}  # as resolved
        out = {"peak_bytes": self.peak_bytes, "peak_gb": self.peak_bytes / 1e9, "peak_gib": self.peak_bytes / 2**30,
               "breakdown": dict(self.breakdown), "snapshots": {k: dict(v) for k, v in self.snapshots.items()},
               "inputs": inputs, "method": self.method}
        if self.cuda_peak_bytes is not None:
            out["cuda_peak_bytes"] = self.cuda_peak_bytes
        out.update(self.extras)
        return out


# ----------------------------------------------------------------------------------------------
# The step (mirror of Trainer.train_step; keep the two alike)
# ----------------------------------------------------------------------------------------------
def training_step(forward, model, optimizer, ema, scaler, diffusion, x0, spec: StepSpec,
                  max_micro_batches: int | None = None, on_before_optimizer=None) -> None:
    """One optimizer step over x0 as the trainer takes it (see the module docstring).

    forward: what the objective calls (the model, or a wrapper of it). max_micro_batches: stop the
    accumulation loop early (the estimator's shortcut). on_before_optimizer(): called after clipping.
    Runs on real tensors and on fake ones: nothing here reads a tensor's value (with fp16, GradScaler.step's
    inf check and the trainer's finiteness test are host reads, so the optimizer is stepped directly; without,
    the skip is decided on the device, as in the trainer)."""
    objective = get_objective(spec.objective)
    settings = spec.objective_settings()
    epoch = spec.dream_epoch()
    batch = x0.shape[0]
    t = torch.randint(0, diffusion.num_timesteps, (batch,), device=x0.device)
    noise = torch.randn_like(x0)
    drawn = (x0, t, noise)  # with a step graph, copied into its static input buffers and kept alive beside them
    if spec.cuda_graphs:
        x0, t, noise = (value.clone() for value in drawn)
    optimizer.zero_grad(set_to_none=True)
    micro = spec.micro
    weight = micro / batch
    starts = list(range(0, batch, micro))[:max_micro_batches]

    def backward(loss):
        scaler.scale(loss * weight).backward()

    for start in starts:
        part = slice(start, start + micro)
        with autocast_for(spec.precision, x0.device.type):
            loss, _ = objective(forward, diffusion, x0[part], epoch, settings, t=t[part], noise=noise[part],
                                backward=backward if spec.early_backward else None)
        if not spec.early_backward:
            backward(loss)
        del loss
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
    if on_before_optimizer is not None:
        on_before_optimizer()
    if scaler.is_enabled():
        optimizer.step()
        ema.update(model)
        return
    conditional_step(optimizer, ema, model, grad_norm.isfinite())


def build_state(spec: StepSpec, device: torch.device):
    """Model, fused AdamW (state allocated, as after a first step), EMA, GradScaler and diffusion tables."""
    with torch.device(device):
        model = UNet(spec.model_config(), backend=spec.backend, checkpointing=spec.checkpointing)
        diffusion = GaussianDiffusion(spec.schedule, spec.num_timesteps)
    model.train()
    if spec.uses_channels_last:
        to_channels_last(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, fused=True)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # allocates exp_avg, exp_avg_sq and step: the steady state of every later step
    optimizer.zero_grad(set_to_none=True)
    ema = EMA(model)
    scaler = torch.amp.GradScaler(device.type, enabled=spec.precision == "fp16")
    return model, optimizer, ema, scaler, diffusion


def make_batch(spec: StepSpec, images: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """x0 as DeviceBatches.get makes it (uint8 gather, scale to [-1, 1], random flip), or N(0, I) without data,
    in the model's memory format (as the trainer's step converts it)."""
    config = spec.model_config()
    shape = (spec.batch_size, config.in_channels, config.image_size, config.image_size)
    if images is None:
        x = torch.randn(shape, device=device)
    else:
        index = torch.randint(0, images.shape[0], (spec.batch_size,), device=device)
        flip = torch.rand(spec.batch_size, device=device) < 0.5
        x = images[index].float() / 127.5 - 1
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x.contiguous(memory_format=torch.channels_last) if spec.uses_channels_last else x


# ----------------------------------------------------------------------------------------------
# CUDA rules on CPU
# ----------------------------------------------------------------------------------------------
_LOWER = (torch.float16, torch.bfloat16)


def _below_cpu_autocast():
    return torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU))


def _fp32_kernel(op):
    """CUDA autocast's fp32 policy: floating inputs in fp16/bf16 are cast to fp32, then the op runs."""
    def kernel(*args, **kwargs):
        def cast(a):
            return a.float() if isinstance(a, torch.Tensor) and a.dtype in _LOWER else a
        with _below_cpu_autocast():
            return op(*(cast(a) for a in args), **{k: cast(v) for k, v in kwargs.items()})
    return kernel


def _fp32_output_kernel(op):
    """CUDA autocast's fp32_set_opt_dtype policy: softmax(x, dim) of a floating x computes and returns fp32."""
    def kernel(input, dim, dtype=None):
        with _below_cpu_autocast():
            if dtype is None and input.is_floating_point():
                dtype = torch.float32
            return op(input, dim, dtype)
    return kernel


def _native_dropout(input, p, train):
    """dropout as CUDA runs it: native_dropout, whose backward keeps a bool mask (CPU's composite keeps a
    noise tensor of the input's dtype)."""
    if not train or p == 0.0:
        return input
    return torch.native_dropout(input, p, train)[0]


class CudaAutocastPolicy:
    """While active, CPU runs follow CUDA's rules for the ops of a training step that the two devices treat
    differently (registered with the dispatcher, so activation-checkpoint recomputation follows them too):

      under CPU autocast (the AutocastCPU dispatch key), CUDA's fp32 list: group_norm, layer_norm, exp, log,
      pow and upsample_bilinear2d cast fp16/bf16 inputs to fp32; CUDA's fp32_set_opt_dtype list: softmax
      and log_softmax without a dtype compute and return fp32;
      always (the AutogradCPU key): dropout runs as native_dropout (a bool mask saved for backward).

    CPU autocast already agrees with CUDA on convolutions, linear layers, matmuls, attention and losses.
    The registrations are process-wide while active: do not run real CPU training in another thread then."""

    FP32 = ("group_norm", "layer_norm", "exp", "log", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar",
            "upsample_bilinear2d")
    FP32_OUTPUT = ("softmax.int", "log_softmax.int")

    def __enter__(self):
        import warnings

        self.library = torch.library.Library("aten", "IMPL")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel", if a build has one
            for name in self.FP32:
                self.library.impl(name, _fp32_kernel(_aten_op(name)), "AutocastCPU")
            for name in self.FP32_OUTPUT:
                self.library.impl(name, _fp32_output_kernel(_aten_op(name)), "AutocastCPU")
            self.library.impl("dropout", _native_dropout, "AutogradCPU")
        return self

    def __exit__(self, *exc):
        self.library._destroy()  # removes the kernels: the previous ones apply again
        return False


def _aten_op(name: str):
    op, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, op), overload or "default")


# ----------------------------------------------------------------------------------------------
# Estimation on fake tensors
# ----------------------------------------------------------------------------------------------
def _mem_tracker_class():
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

    class StepMemTracker(MemTracker):
        """MemTracker keeping only the global peak.

        MemTracker also keeps per-module peaks, walking every tracked module after every operator; that
        walk is most of its run time and the per-module figures are not used here. The global-peak update
        is MemTracker's own; the override falls back to it if its attributes change."""

        def _update_peak_stats(self, peak_state) -> None:
            if not all(hasattr(self, a) for a in ("_curr_mem_snap", "_peak_mem", "_peak_mem_snap")):
                return super()._update_peak_stats(peak_state)
            for dev, snap in self._curr_mem_snap.items():
                total = snap[_TOTAL_KEY]
                if self._peak_mem.get(dev, 0) < total:
                    self._peak_mem[dev] = total
                    self._peak_mem_snap[dev] = dict(snap)

    return StepMemTracker


class _FreshModuleRecords:
    """The model for the objective, clearing MemTracker's per-module records before each forward.

    MemTracker takes a second forward of the root module for a new iteration and refuses it; DREAM
    objectives run two or three forwards per step. Storage tracking is not affected. Behaves like the
    model for what the objectives use (call, .training, .train(), .eval())."""

    def __init__(self, model, tracker):
        self.model, self.tracker = model, tracker

    @property
    def training(self) -> bool:
        return self.model.training

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def __call__(self, *args, **kwargs):
        self.tracker.reset_mod_stats()
        return self.model(*args, **kwargs)


def _categories(snapshot: dict) -> dict:
    """MemTracker's {device: {reftype: bytes, "Total": bytes}} -> {category: bytes, "total": bytes}."""
    out = dict.fromkeys(CATEGORIES, 0)
    for per_device in snapshot.values():
        for key, value in per_device.items():
            name = _CATEGORY_OF.get(getattr(key, "value", key))
            if name is not None:
                out[name] += int(value)
    out["total"] = sum(out[c] for c in CATEGORIES)
    return out


def estimate_step_memory(spec: StepSpec | None = None, **fields_) -> MemoryEstimate:
    """Peak memory of one training step (see the module docstring), measured on fake CPU tensors.

    Give a StepSpec, or its fields as keywords (estimate_step_memory(preset="tiny", batch_size=8)), or both
    (the keywords replace the spec's fields)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    spec = _spec(spec, fields_)
    if spec.backend == "triton":
        import kernels  # noqa: F401  (its custom ops must be registered, with their fake implementations)
    device = torch.device("cpu")
    policy = CudaAutocastPolicy() if spec.target == "cuda" else nullcontext()
    snapshots = {}
    with _too_large_is_one_line(spec), FakeTensorMode(), policy, _deterministic_algorithms_off():
        model, optimizer, ema, scaler, diffusion = build_state(spec, device)
        images = None
        if spec.data_images:
            config = spec.model_config()
            images = torch.empty(spec.data_images, config.in_channels, config.image_size, config.image_size,
                                 dtype=torch.uint8)
        tracker = _mem_tracker_class()()
        tracker.track_external(model, optimizer, diffusion, *ema.shadow, ema.updates,
                               *([images] if images is not None else []))
        with tracker:
            snapshots["start"] = _categories(tracker.get_tracker_snapshot("current"))
            x0 = make_batch(spec, images, device)
            training_step(_FreshModuleRecords(model, tracker), model, optimizer, ema, scaler, diffusion, x0, spec,
                          max_micro_batches=2,
                          on_before_optimizer=lambda: snapshots.__setitem__(
                              "before_optimizer", _categories(tracker.get_tracker_snapshot("current"))))
            del x0
            snapshots["end"] = _categories(tracker.get_tracker_snapshot("current"))
        peak = _categories(tracker.get_tracker_snapshot("peak"))
        extras = {"parameter_count": sum(p.numel() for p in model.parameters()),
                  "parameter_tensors": sum(1 for _ in model.parameters()),
                  "ema_bytes": sum(s.numel() * s.element_size() for s in (*ema.shadow, ema.updates)),
                  "data_bytes": 0 if images is None else images.numel() * images.element_size()}
    peak_bytes = peak.pop("total")
    return MemoryEstimate(peak_bytes=peak_bytes, breakdown=peak, snapshots=snapshots, spec=spec,
                          method=f"fake CPU tensors + MemTracker ({spec.target} autocast policy)", extras=extras)


def _batch_of(spec: StepSpec) -> str:
    """"batch size 128 of 64×64 images": either may be what is too large."""
    size = spec.model_config().image_size
    return f"batch size {spec.batch_size} of {size}×{size} images"


@contextmanager
def _too_large_is_one_line(spec: StepSpec):
    """A step whose tensors would hold 2^63 bytes or more, or a batch past what 32-bit offsets address (the Triton
    kernels' (sample, channel) pairs, the eager skip resize's parts): a one-line ValueError, without the
    fake-tensor machinery's error log of the failed shape computation."""
    import logging

    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    except ValueError as error:
        if "32-bit offsets" not in str(error):
            raise
        raise ValueError(f"{_batch_of(spec)} is too large for the {spec.backend} backend "
                         f"({str(error).split('; use ')[0]})") from None
    except (RuntimeError, TypeError, OverflowError) as error:
        if "overflow" not in str(error).lower():
            raise
        raise ValueError(f"{_batch_of(spec)} is too large to estimate: the step's tensor sizes "
                         f"overflow 64-bit integers") from None
    finally:
        log.setLevel(level)


@contextmanager
def _deterministic_algorithms_off():
    """Fake tensors allocate nothing, so deterministic-mode fills of new tensors are moot; keep them out."""
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=warn_only)


def sweep_checkpointing(spec: StepSpec | None = None, policies=None, **fields_) -> list:
    """estimate_step_memory for each activation-checkpointing policy (default: every one the backend has)."""
    spec = _spec(spec, fields_)
    policies = policies_for_backend(spec.backend) if policies is None else policies
    return [estimate_step_memory(replace(spec, checkpointing=policy)) for policy in policies]


def _spec(spec, fields_) -> StepSpec:
    if spec is None:
        return StepSpec(**fields_)
    if not isinstance(spec, StepSpec):
        raise TypeError(f"spec must be a StepSpec, got {type(spec).__name__}")
    return replace(spec, **fields_) if fields_ else spec


# ----------------------------------------------------------------------------------------------
# Measurement on CUDA
# ----------------------------------------------------------------------------------------------
def require_cuda() -> None:
    """Raises DreamError (one line) unless a CUDA device is available for measure_cuda_peak."""
    if not torch.cuda.is_available():
        raise DreamError("measuring the allocator's peak (--cuda) needs a CUDA device, and none is available")


def measure_cuda_peak(spec: StepSpec | None = None, device="cuda", **fields_) -> int:
    """torch.cuda.max_memory_allocated over one training step on CUDA, after one warm-up step.

    The same step as estimate_step_memory (all micro-batches), with the trainer's CUDA settings (TF32,
    cudnn.benchmark). Uses real kernels, so cuDNN/cuBLAS workspaces are included."""
    spec = _spec(spec, fields_)
    require_cuda()
    if spec.target != "cuda":
        spec = replace(spec, target="cuda")
    device = torch.device(device)
    if spec.backend == "triton":
        import kernels  # noqa: F401
    with MathFlags():
        use_fast_math()
        model, optimizer, ema, scaler, diffusion = build_state(spec, device)
        images = None
        if spec.data_images:
            config = spec.model_config()
            images = torch.zeros(spec.data_images, config.in_channels, config.image_size, config.image_size,
                                 dtype=torch.uint8, device=device)
        for measured in (False, True):
            if measured:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            x0 = make_batch(spec, images, device)
            training_step(model, model, optimizer, ema, scaler, diffusion, x0, spec)
            scaler.update()
            del x0
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    del model, optimizer, ema, scaler, diffusion, images
    torch.cuda.empty_cache()
    return int(peak)


# ----------------------------------------------------------------------------------------------
# Budgets and micro-batches
# ----------------------------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def format_size(size: int) -> str:
    """Bytes in GB (10^9), or in MB below 0.1 GB."""
    return f"{size / 1e9:.3f} GB" if size >= 10**8 else f"{size / 1e6:.3f} MB"


def parse_bytes(text) -> int:
    """'6.8GB' -> 6_800_000_000. Units: B, KB, MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB (of 1024);
    case-insensitive; a bare number is bytes. Integers are returned as they are. Must be positive."""
    if isinstance(text, bool):
        raise TypeError(f"memory size must be a string like '6.8GB' or a number of bytes, got {text!r}")
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    elif isinstance(text, str):
        match = _SIZE.match(text)
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"memory size {text!r} not understood; use a number with an optional unit "
                             f"B, KB, MB, GB, TB, KiB, MiB, GiB or TiB, e.g. '6.8GB'")
        value, unit = float(match.group(1)), match.group(2).lower()
    else:
        raise TypeError(f"memory size must be a string like '6.8GB' or a number of bytes, got {type(text).__name__}")
    size = value * _UNITS[unit]
    if not math.isfinite(size):
        raise ValueError(f"memory size {text!r} must be finite")
    if size < 1:
        raise ValueError(f"memory size {text!r} must be at least one byte")
    return int(round(size))


def default_budget_bytes(device=None) -> int:
    """Memory this process can use on the CUDA device: free memory (cudaMemGetInfo) plus what its caching
    allocator already reserves, since the estimate counts the model, optimizer and EMA even if the
    trainer has already placed them there."""
    if not torch.cuda.is_available():
        raise DreamError("no memory budget given and no CUDA device to read free memory from; "
                         "pass a budget such as '6.8GB'")
    device = torch.device("cuda") if device is None else torch.device(device)
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device))


@contextmanager
def cuda_memory_cap(budget_bytes: int | None, device):
    """Within the block, this process's CUDA caching allocator on `device` holds at most `budget_bytes`
    (torch.cuda.set_per_process_memory_fraction(budget / total memory)): an allocation past it raises
    torch.cuda.OutOfMemoryError, as on a device of that size, so a budget the estimate misjudged (it does
    not see cuDNN/cuBLAS workspaces) is still kept. The previous fraction comes back on exit. Yields the
    fraction set, or None: no budget, or not a CUDA device."""
    device = torch.device(device)
    if budget_bytes is None or device.type != "cuda":
        yield None
        return
    if device.index is None:  # the fraction functions need an index: "cuda" is the current device
        device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, budget_bytes / total)
    previous = torch.cuda.get_per_process_memory_fraction(device)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    try:
        yield fraction
    finally:
        torch.cuda.set_per_process_memory_fraction(previous, device)


def divisors_descending(n: int) -> list:
    return [d for d in range(n, 0, -1) if n % d == 0]


# What a CUDA step's estimate is short of, as a share of the budget it must fit: on an H200 the allocator
# peaked 0.17-0.22 GB (3-6 %) above the estimate of the seed step at batch 128, for every checkpointing
# policy (cuDNN/cuBLAS workspaces among it; profiles/nvidia-h200/2026-11-29-bench-memory.md).
CUDA_ESTIMATE_MARGIN = 0.06


def choose_micro_batch(config=None, budget_bytes=None, *, margin: float | None = None, estimate=None, device=None,
                       model_config=None, compile=None, **fields_) -> int:
    """The largest micro-batch, a divisor of the batch size, whose estimated step peak fits the budget.

    The step is described by `config` (a StepSpec, or any object with StepSpec's field names, such as
    dream.train.TrainConfig, whose "auto" precision/backend are resolved) and/or keywords, which win:
    StepSpec fields (batch_size, precision, objective, objective_config, backend, checkpointing, preset,
    model_overrides, data_images=len(dataset) to count a dataset kept on the device, ...), and
    model_config=<UNetConfig> for the model. compile is accepted and ignored: the eager model is traced
    (torch.compile's step usually needs less). Any micro_batch in config is ignored.
    budget_bytes: bytes, or a string for parse_bytes ('6.8GB'); None: default_budget_bytes(device).
    margin: the estimate must fit budget * (1 - margin); None: CUDA_ESTIMATE_MARGIN for a CUDA target, else
    0. estimate: the estimator (default
    estimate_step_memory), called with a StepSpec, returning an object with .peak_bytes.

    Divisors keep every micro-batch the same size (equal loss weights, constant shapes for compiled code);
    the effective batch is kept by accumulating the gradients of batch_size / micro-batch micro-batches.
    The peak is taken as non-decreasing in the micro-batch: the full batch is tried first, then a binary
    search over the divisors (about log2(number of divisors) estimates). Raises DreamError if even 1 does
    not fit."""
    if model_config is not None:
        fields_["model_overrides"] = model_config
    fields_["micro_batch"] = None  # the config's is ignored (checking it against the batch size would refuse it)
    if config is None:
        spec = StepSpec(**fields_)
    elif isinstance(config, StepSpec):
        spec = replace(config, **fields_)
    else:
        spec = StepSpec.from_config(config, **fields_)
    budget = default_budget_bytes(device) if budget_bytes is None else parse_bytes(budget_bytes)
    if margin is None:
        margin = CUDA_ESTIMATE_MARGIN if spec.target == "cuda" else 0.0
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    limit = budget * (1.0 - margin)
    estimate = estimate or estimate_step_memory
    peaks: dict[int, int] = {}

    def fits(micro: int) -> bool:
        if micro not in peaks:
            peaks[micro] = int(estimate(replace(spec, micro_batch=micro)).peak_bytes)
        return peaks[micro] <= limit

    candidates = divisors_descending(spec.batch_size)  # largest first
    if fits(candidates[0]):
        return candidates[0]
    low, high = 1, len(candidates) - 1  # candidates[0] does not fit; find the first index that fits
    if not fits(candidates[high]):
        kept = f" less the {margin:.0%} kept for what the estimate does not see" if margin else ""
        raise DreamError(f"even a micro-batch of 1 needs an estimated {format_size(peaks[1])}, over the memory "
                         f"budget of {format_size(budget)}{kept}; use activation checkpointing, a smaller model or "
                         f"more memory")
    while low < high:
        middle = (low + high) // 2
        if fits(candidates[middle]):
            high = middle
        else:
            low = middle + 1
    return candidates[high]


def plan_step(policies, batch_size: int, micro_batch_for, *, images_on_host: bool = False,
              place_images: bool = False) -> tuple:
    """The memory manager's choice under a budget, as (micro_batch, policy, images_on_host): dream train's
    --checkpointing auto (policies: the candidates, least recomputation first; one policy: that one) and
    --data-on auto (place_images: the images may move to the host).

    micro_batch_for(policy, images_on_host) -> the largest micro-batch that fits (choose_micro_batch), raising
    DreamError when not even 1 does. The policy: the first whose whole batch fits, else the one with the
    largest micro-batch, the first such (an equal micro-batch is not worth more recomputation). The images
    stay where images_on_host says unless place_images and keeping them on the host gives a larger
    micro-batch or less recomputation (a batch copied over costs far less than either). Raises the
    DreamError of the last policy tried when nothing fits (without the images, where they may move)."""
    policies = tuple(policies)

    def rank(choice):  # (micro, policy): larger micro-batch first, then less recomputation
        return choice[0], -policies.index(choice[1])

    def best_for(on_host: bool):
        best = None  # (micro, policy)
        for policy in policies:
            try:
                micro = micro_batch_for(policy, on_host)
            except DreamError:  # not even a micro-batch of 1 fits: recompute more, unless this was the last
                if policy == policies[-1] and best is None:
                    raise
                continue
            if best is None or rank((micro, policy)) > rank(best):
                best = (micro, policy)
            if micro >= batch_size:
                break
        return best

    place_images = place_images and not images_on_host
    try:
        try:
            best = best_for(images_on_host)
        except DreamError:
            if not place_images:
                raise
            best = None
        if place_images and best != (batch_size, policies[0]):
            host = best_for(True)  # (nothing fits even without the images: that error is the one to give)
            if best is None or rank(host) > rank(best):
                return (*host, True)
    except DreamError as error:
        if len(policies) == 1:
            raise
        raise DreamError(str(error).replace("; use activation checkpointing, ", f" with --checkpointing "
                                            f"{policies[-1]}, the last that auto tries; use ")) from None
    return (*best, images_on_host)


# ----------------------------------------------------------------------------------------------
# Tables for the CLI
# ----------------------------------------------------------------------------------------------
def describe(spec: StepSpec) -> str:
    form = "early backward" if spec.early_backward else "single graph"
    micro = f" (micro-batch {spec.micro})" if spec.micro != spec.batch_size else ""
    overrides = "".join(f", {k}={v}" for k, v in spec.model_overrides)
    return (f"preset {spec.preset}{overrides}, batch {spec.batch_size}{micro}, {spec.precision}, objective "
            f"{spec.objective} ({form}), backend {spec.backend}, checkpointing {spec.checkpointing}, "
            f"{'channels_last' if spec.uses_channels_last else 'NCHW'}"
            + (f", {spec.data_images} images on the device" if spec.data_images else "")
            + (", CUDA graph" if spec.cuda_graphs else ""))


def format_estimate(estimate: MemoryEstimate) -> str:
    lines = [f"one training step, estimated on fake CPU tensors ({estimate.spec.target} autocast policy; "
             f"not a GPU measurement)", describe(estimate.spec), "",
             f"{'category':<14} {'bytes':>16} {'GB':>9} {'GiB':>9}"]
    for name in CATEGORIES:
        value = estimate.breakdown.get(name, 0)
        lines.append(f"{name:<14} {value:>16,} {value / 1e9:>9.3f} {value / 2**30:>9.3f}")
    lines.append(f"{'peak':<14} {estimate.peak_bytes:>16,} {estimate.peak_bytes / 1e9:>9.3f} "
                 f"{estimate.peak_bytes / 2**30:>9.3f}")
    if estimate.cuda_peak_bytes is not None:
        c = estimate.cuda_peak_bytes
        lines.append(f"{'cuda measured':<14} {c:>16,} {c / 1e9:>9.3f} {c / 2**30:>9.3f}   "
                     f"(torch.cuda.max_memory_allocated; estimate/measured = {estimate.peak_bytes / c:.3f})")
    lines.append("(other: EMA weights and the resident dataset; categories at the moment of the peak)")
    return "\n".join(lines)


def format_sweep(estimates: list) -> str:
    first = estimates[0].spec
    lines = [f"one training step per checkpointing policy, estimated on fake CPU tensors ({first.target} "
             f"autocast policy; not a GPU measurement)", describe(replace(first, checkpointing="none"))
             .replace(", checkpointing none", ""), "",
             f"{'checkpointing':<14} {'peak GB':>9} {'peak GiB':>9} {'activ. GB':>10} {'temp. GB':>9} "
             f"{'state GB':>9}" + (f" {'cuda GB':>9}" if any(e.cuda_peak_bytes for e in estimates) else "")]
    for e in estimates:
        b = e.breakdown
        state = e.peak_bytes - b["activations"] - b["temporaries"]
        row = (f"{e.spec.checkpointing:<14} {e.peak_bytes / 1e9:>9.3f} {e.peak_bytes / 2**30:>9.3f} "
               f"{b['activations'] / 1e9:>10.3f} {b['temporaries'] / 1e9:>9.3f} {state / 1e9:>9.3f}")
        if e.cuda_peak_bytes:
            row += f" {e.cuda_peak_bytes / 1e9:>9.3f}"
        lines.append(row)
    lines.append("(state: parameters, gradients, optimizer, buffers and other at the moment of the peak)")
    return "\n".join(lines)
