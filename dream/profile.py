"""`dream profile`: torch.profiler over a training step and a sampling step.

For each workload (`train`: one optimizer step of the trainer; `sample`: one ancestral denoising
step, or with --sampler engine|graphs a DDIM loop through dream.sampling.SamplingEngine, plain or
replaying CUDA graphs) it runs the step once unprofiled (compilation, autotuning, graph capture),
then --warmup and --steps steps under the profiler, and writes <out>/<device>/<date>-profile-<what>.md
(+ .json; the name adds the settings that differ from the defaults, and -2, -3, ... when taken) and the
Chrome trace beside it (<date>-profile-<what>.trace.json.gz, open it in https://ui.perfetto.dev or
chrome://tracing):

    step time        median wall time of the profiled steps (each ends with a device sync)
    top kernels      GPU kernels by total time (on CPU: operators by self CPU time)
    kernels/launches per step; GPU busy fraction = union of kernel, memcpy and memset intervals
                     / the profiled window; launch gaps = 1 - busy fraction
    host waits       per step, the calls and time of each CUDA call in which the host can wait for the
                     device (copies, stream/event/device synchronizations): a training step that reads
                     its own result shows it in cudaMemcpyAsync

<device> is `cpu` or the GPU's name as a slug (`nvidia-h200`); CPU reports say CPU in their title
and are never mixed with GPU ones. Without a GPU the tiny preset is the default.

The helpers here (environment description, output paths, benchmark workloads with random weights)
are shared with the benchmarks in bench/.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gzip
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch

DEFAULT_OUT = "profiles"
PROFILE_WHATS = ("train", "sample")


# ------------------------------------------------------------------------------------------------
# Environment and output paths
# ------------------------------------------------------------------------------------------------
def _driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001  - pynvml missing or NVML unusable: try nvidia-smi
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return out.strip().splitlines()[0] if out.strip() else None
    except Exception:  # noqa: BLE001
        return None


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        return None


def environment_info(device: torch.device | str | None = None) -> dict:
    """What a reader needs to compare figures: device, driver, versions, date."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    now = _dt.datetime.now().astimezone()
    info = {
        "date": now.strftime("%Y-%m-%d"),
        "time": now.isoformat(timespec="seconds"),
        "device_type": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "git_commit": _git_commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(
            device_name=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            l2_cache_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None,
            driver=_driver_version(),
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        info.update(device_name=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                    driver=None)
    return info


def device_slug(info: dict) -> str:
    """`cpu`, or the GPU name as a folder name: 'NVIDIA H200' -> 'nvidia-h200'."""
    if info.get("device_type") != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", str(info.get("device_name", "gpu")).lower()).strip("-") or "gpu"


def check_out_root(out_root: str | os.PathLike, info: dict, option: str = "--out") -> None:
    """Raises DreamError (one line naming `option`) unless <out_root>/<device slug> is a writable folder
    (created here): run before any long work, so a report is never lost at the end."""
    from dream.errors import DreamError

    if str(out_root).strip() == "":
        raise DreamError(f"{option} is empty; give a folder")
    from dream.files import folder_problem

    problem = folder_problem(Path(out_root) / device_slug(info))
    if problem:
        raise DreamError(f"{option} {out_root}: {problem}; choose another {option}")


def report_stem(out_root: str | os.PathLike, info: dict, what: str, option: str = "--out") -> Path:
    """<out_root>/<device slug>/<date>-<what> (no suffix); the folder is created."""
    folder = Path(out_root) / device_slug(info)
    for parent in (Path(out_root), folder):
        if parent.exists() and not parent.is_dir():
            from dream.errors import DreamError

            raise DreamError(f"output folder {parent} exists and is not a folder; choose another {option}")
    folder.mkdir(parents=True, exist_ok=True)
    what = re.sub(r"[^A-Za-z0-9_.-]+", "-", what).strip("-") or "report"
    return folder / f"{info['date']}-{what}"


def unique_stem(stem: Path, suffixes: tuple[str, ...]) -> Path:
    """`stem`, or stem-2, stem-3, ...: the first for which no stem + suffix exists (nothing is overwritten)."""
    candidate, n = stem, 1
    while any(candidate.with_name(candidate.name + suffix).exists() for suffix in suffixes):
        n += 1
        candidate = stem.with_name(f"{stem.name}-{n}")
    return candidate


def significant(value: float, digits: int = 3) -> str:
    """`value` to `digits` significant figures, without exponent for ordinary magnitudes (0.000412, 12.3, 1,234)."""
    if value == 0 or not value == value or abs(value) == float("inf"):
        return f"{value:g}"
    if abs(value) >= 10 ** digits:
        return f"{value:,.0f}"
    if abs(value) < 1e-6:
        return f"{value:.{digits}g}"
    places = max(digits - 1 - int(f"{abs(value):e}".split("e")[1]), 0)
    return f"{value:.{places}f}"


def device_label(info: dict) -> str:
    """The heading label: the GPU's name, or 'CPU' (CPU figures are never GPU figures)."""
    return info["device_name"] if info.get("device_type") == "cuda" else "CPU"


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(value):
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def environment_markdown(info: dict) -> str:
    keys = ["device_name", "driver", "compute_capability", "multiprocessors", "memory_gib", "l2_cache_mib",
            "torch", "triton", "triton_interpret", "cuda_runtime", "cudnn", "python", "cpu_count", "platform",
            "git_commit", "time"]
    return markdown_table(["", ""], [[k, info[k]] for k in keys if info.get(k) not in (None, "")])


# ------------------------------------------------------------------------------------------------
# Workloads: a trainer step and a sampling step with random (never zero) weights
# ------------------------------------------------------------------------------------------------
def randomize_parameters(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the parameters that start as constants random values, so no benchmark or check runs on
    zeros: GroupNorm weight = 1 + 0.1 z, bias = 0.1 z; conv_out (zero-initialised) ~ U(-b, b) with
    b = 1/sqrt(fan_in), PyTorch's default bound. Deterministic for a seed, on any device."""
    generator = torch.Generator().manual_seed(seed)

    def fill(param, values):
        with torch.no_grad():
            param.copy_(values.to(param.dtype))

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.GroupNorm) and module.affine:
            fill(module.weight, 1 + 0.1 * torch.randn(module.weight.shape, generator=generator))
            fill(module.bias, 0.1 * torch.randn(module.bias.shape, generator=generator))
    conv_out = getattr(model, "conv_out", None)
    if conv_out is not None:
        fan_in = conv_out.weight[0].numel()
        bound = fan_in ** -0.5
        fill(conv_out.weight, (torch.rand(conv_out.weight.shape, generator=generator) * 2 - 1) * bound)
        if conv_out.bias is not None:
            fill(conv_out.bias, (torch.rand(conv_out.bias.shape, generator=generator) * 2 - 1) * bound)
    return model


def default_preset(device: torch.device) -> str:
    return "seed" if device.type == "cuda" else "tiny"


def train_config_fields() -> set[str]:
    from dream.train import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)}


def build_trainer(*, preset: str, batch: int, device: str = "auto", backend: str = "auto", precision: str = "auto",
                  objective: str = "seed", compile: bool = False, channels_last: bool | None = None,
                  checkpointing: str = "none", model_overrides: dict | None = None, objective_config=None,
                  epoch: int = 30, seed: int = 0, run_dir: str | None = None, **extra):
    """A Trainer for timing single steps: synthetic data of one batch, no samples, no progress bar,
    the whole batch in one micro-batch (no memory-budget planning), epoch set so that the DREAM
    objectives are fully on (seed: from epoch 10 with a 20-epoch ramp).
    Keys of `extra` that this version of TrainConfig does not have are dropped."""
    from dream.train import TrainConfig, Trainer

    fields = train_config_fields()
    scratch = None
    if run_dir is None:
        run_dir = scratch = tempfile.mkdtemp(prefix="dream-bench-")
    values = dict(run_dir=run_dir, preset=preset,
                  model_overrides=dict(model_overrides or {}), backend=backend, checkpointing=checkpointing,
                  compile=compile, channels_last=channels_last, objective=objective,
                  objective_config=dict(objective_config or {}), data="synthetic", data_count=batch,
                  batch_size=batch, micro_batch=batch, precision=precision, seed=seed, device=device, sample_every=0,
                  progress=False, checkpoint_every=0)
    values.update(extra)
    trainer = Trainer(TrainConfig(**{k: v for k, v in values.items() if k in fields}))
    if scratch is not None:  # the trainer's (empty) run folder goes with it
        weakref.finalize(trainer, shutil.rmtree, scratch, True)
    trainer.epoch = epoch
    randomize_parameters(trainer.model, seed)  # the EMA shadow keeps the initial values: it does not affect timing
    return trainer


def sample_batch(trainer, seed: int = 0) -> torch.Tensor:
    """A fixed batch of random images in [-1, 1] on the trainer's device."""
    config = trainer.model_config
    g = torch.Generator().manual_seed(seed + 7)
    shape = (trainer.config.batch_size, config.in_channels, config.image_size, config.image_size)
    return (torch.rand(shape, generator=g) * 2 - 1).to(trainer.device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------
# Trace analysis (Chrome trace JSON from torch.profiler)
# ------------------------------------------------------------------------------------------------
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_PATTERN = re.compile(r"(cudaLaunchKernel|cuLaunchKernel|cudaLaunchCooperativeKernel|cuLaunchCooperativeKernel)")
GRAPH_LAUNCH_PATTERN = re.compile(r"(cudaGraphLaunch|cuGraphLaunch)")
# runtime/driver calls in which the host can wait for the device: copies (a device-to-host copy into pageable
# memory returns only once the queue before it has run) and synchronizations
HOST_WAIT_PATTERN = re.compile(r"^(cudaMemcpy|cudaMemcpyAsync|cuMemcpyDtoH\w*|cuMemcpyAsync|cuMemcpy|"
                               r"cudaStreamSynchronize|cuStreamSynchronize|cudaEventSynchronize|cuEventSynchronize|"
                               r"cudaDeviceSynchronize|cuCtxSynchronize)$")


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


NO_GPU_EVENTS = ("the trace holds no GPU kernel, copy or memset in the profiled window (CUPTI did not record "
                 "them, e.g. kernels replayed inside CUDA graphs on some driver/torch versions): the busy fraction "
                 "and kernel table are unknown, not zero")


def in_window(launch_ts: float | None, ts: float, start: float, stop: float) -> bool:
    """Whether a GPU event belongs to the steps start..stop: its launch call's start is inside them, or, with no
    launch call known, the event itself starts at or after start."""
    return start <= launch_ts <= stop if launch_ts is not None else ts >= start


def summarize_trace(trace: dict, top: int = 20) -> dict:
    """Numbers from a torch.profiler Chrome trace (times in microseconds), over the profiled window:
    steps (ProfilerStep spans), window = first step start .. max(last step end, last GPU event end),
    busy_fraction = |union of GPU event intervals within the window| / window,
    kernels and launches (runtime/driver launch calls; graph launches counted apart), top kernels, and
    host_waits: the calls and time of each runtime/driver call in which the host can wait for the device.
    Host events count when they start inside the steps; GPU events when the runtime/driver call that launched them
    (matched by args.correlation) does, or, without a match, when they start at or after the first step.
    A trace without steps is counted whole."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    steps = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events
                   if str(e.get("name", "")).startswith("ProfilerStep#") and e.get("cat") != "gpu_user_annotation")
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    host = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    if steps:
        launched_at = {e["args"]["correlation"]: float(e["ts"]) for e in host if "correlation" in e.get("args", {})}
        host = [e for e in host if steps[0][0] <= float(e["ts"]) <= steps[-1][1]]
        gpu = [e for e in gpu if in_window(launched_at.get(e.get("args", {}).get("correlation")), float(e["ts"]),
                                           steps[0][0], steps[-1][1])]
    kernels = [e for e in gpu if e.get("cat") == "kernel"]
    launches = sum(1 for e in host if LAUNCH_PATTERN.search(str(e.get("name", ""))))
    graph_launches = sum(1 for e in host if GRAPH_LAUNCH_PATTERN.search(str(e.get("name", ""))))
    waits: dict[str, dict] = {}
    for e in host:
        if HOST_WAIT_PATTERN.match(str(e.get("name", ""))):
            entry = waits.setdefault(str(e["name"]), {"calls": 0, "total_us": 0.0})
            entry["calls"] += 1
            entry["total_us"] += float(e["dur"])
    result = {"steps": len(steps), "kernels": len(kernels), "launches": launches, "graph_launches": graph_launches,
              "gpu_events": len(gpu), "host_waits": dict(sorted(waits.items(), key=lambda kv: -kv[1]["total_us"]))}
    if steps:
        start = steps[0][0]
        end = max([steps[-1][1]] + [float(e["ts"]) + float(e["dur"]) for e in gpu])
        window = end - start or 1e-9
        busy = _union_length([(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in gpu])
        result.update(window_us=window, busy_us=busy, busy_fraction=busy / window if gpu else None,
                      step_us=[b - a for a, b in steps])
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(str(e.get("name", "?")), []).append(float(e["dur"]))
    kernel_total = sum(sum(v) for v in by_name.values())
    ranked = sorted(by_name.items(), key=lambda item: -sum(item[1]))
    result["kernel_time_us"] = kernel_total
    result["top_kernels"] = [{"name": name, "calls": len(d), "total_us": sum(d),
                              "share": sum(d) / kernel_total if kernel_total else None}
                             for name, d in ranked[:top]]
    return result


def op_label(key: str) -> str:
    """A profiler event's name as the report shows it. torch.library names the autograd node of a custom op
    GeneratedBackwardFor_<namespace>_<op>_<overload>, and the op's forward runs (and is timed) inside it:
    shown as `dream_kernels::<op> (forward, in its autograd wrapper)`, not as something backward."""
    match = re.fullmatch(r"GeneratedBackwardFor_dream_kernels_(\w+)_default", str(key))
    return f"dream_kernels::{match.group(1)} (forward, in its autograd wrapper)" if match else str(key)


def top_cpu_ops(key_averages, top: int = 20) -> list[dict]:
    rows = sorted(key_averages, key=lambda e: -e.self_cpu_time_total)
    rows = [e for e in rows if not str(e.key).startswith("ProfilerStep")]
    total = sum(e.self_cpu_time_total for e in rows) or 1.0
    return [{"name": op_label(e.key), "calls": e.count, "total_us": float(e.self_cpu_time_total),
             "share": e.self_cpu_time_total / total} for e in rows[:top]]


# ------------------------------------------------------------------------------------------------
# Profiling
# ------------------------------------------------------------------------------------------------
def profile_steps(step, device: torch.device, *, warmup: int, active: int, trace_path: Path, top: int = 20) -> dict:
    """Run `step` once, then (warmup + active times) under torch.profiler; each call ends with a device sync.
    Writes the gzipped Chrome trace to trace_path and returns summarize_trace's numbers."""
    from torch.profiler import ProfilerActivity, profile, schedule

    if device.type != "cuda":  # libkineto's own stderr lines (levels: ..., 4 error, 5 USDT) are noise without a GPU,
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # such as "gpuGetDeviceCount failed"; read at its first use
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    captured = {}
    step()  # outside the profiler: compilation, autotuning and CUDA-graph capture happen here
    synchronize(device)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"

        def ready(prof):
            prof.export_chrome_trace(str(raw))
            captured["key_averages"] = prof.key_averages()

        wall = []
        with profile(activities=activities, schedule=schedule(wait=0, warmup=warmup, active=active, repeat=1),
                     on_trace_ready=ready) as prof:
            for i in range(warmup + active):
                synchronize(device)
                tick = time.perf_counter()
                step()
                synchronize(device)
                if i >= warmup:
                    wall.append(time.perf_counter() - tick)
                prof.step()
        if not raw.exists():
            raise RuntimeError("torch.profiler produced no trace")
        trace = json.loads(raw.read_text())
        trace_path.parent.mkdir(parents=True, exist_ok=True)
        with open(raw, "rb") as src, gzip.open(trace_path, "wb") as dst:
            shutil.copyfileobj(src, dst)
    summary = summarize_trace(trace, top=top)
    summary["wall_ms"] = [w * 1e3 for w in wall]
    summary["step_ms"] = statistics.median(wall) * 1e3
    if device.type != "cuda":
        summary["top_ops"] = top_cpu_ops(captured.get("key_averages", []), top=top)
    return summary


def training_workload(args, device: torch.device):
    trainer = build_trainer(preset=args.preset, batch=args.batch, device=str(device), backend=args.backend,
                            precision=args.precision, objective=args.objective, compile=args.compile,
                            channels_last=args.channels_last, checkpointing=args.checkpointing,
                            model_overrides=model_overrides_from(args), seed=args.seed,
                            cuda_graphs=args.cuda_graphs)
    trainer.model.train()
    x0 = sample_batch(trainer, args.seed)
    if trainer.step_graph is not None:  # warmed up and captured before anything is recorded: replays alone
        for _ in range(trainer.step_graph.warmup_steps + 1):
            trainer.train_step(x0)
    config = {"preset": args.preset, "batch": args.batch, "objective": args.objective,
              "backend": trainer.model.backend, "precision": trainer.precision, "compile": args.compile,
              "cuda_graphs": args.cuda_graphs, "channels_last": trainer.channels_last,
              "checkpointing": args.checkpointing, "image_size": trainer.model_config.image_size}
    return (lambda: trainer.train_step(x0)), config, trainer


def sampling_workload(args, device: torch.device):
    """One ancestral step x_t -> x_{t-1} at t = T/2 with the eval-mode model (fixed x_t and noise)."""
    from dream.diffusion import GaussianDiffusion
    from dream.model import autocast_for, build_unet, resolve_channels_last
    from dream.train import resolve_backend, resolve_precision

    backend = resolve_backend(args.backend, device)
    precision = resolve_precision(args.precision, device)
    model = build_unet(args.preset, backend=backend, **model_overrides_from(args))
    model = randomize_parameters(model, args.seed).to(device).eval()
    channels_last = resolve_channels_last(args.channels_last, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if args.compile else model
    diffusion = GaussianDiffusion(num_timesteps=1000).to(device)
    g = torch.Generator().manual_seed(args.seed)
    size = model.config.image_size
    shape = (args.batch, model.config.in_channels, size, size)
    x_t = torch.randn(shape, generator=g).to(device)
    noise = torch.randn(shape, generator=g).to(device)
    t = torch.full((args.batch,), diffusion.num_timesteps // 2, device=device, dtype=torch.long)

    config = {"preset": args.preset, "batch": args.batch, "backend": backend, "precision": precision,
              "compile": args.compile, "channels_last": channels_last, "image_size": size}
    if args.sampler == "step":
        def step():
            with torch.no_grad(), autocast_for(precision, device.type):
                return diffusion.p_sample(forward, x_t, t, noise=noise)

        config["sampler"] = "one ddpm ancestral step (t = T/2), GaussianDiffusion.p_sample"
        return step, config, model
    from dream.errors import DreamError
    from dream.sampling import SamplingEngine

    graphs = args.sampler == "graphs"
    if graphs and device.type != "cuda":
        raise DreamError("--sampler graphs needs a CUDA device; use --sampler engine or step on CPU")
    engine = SamplingEngine(forward, diffusion, graphs=graphs)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def loop():
        return engine.sample(x_t, "ddim", args.sample_steps, 0.0, dtype=dtype, graphs=graphs)

    config["sampler"] = (f"DDIM-{args.sample_steps} loop (one profiled step = the whole loop), "
                         f"dream.sampling.SamplingEngine, {'CUDA graphs' if graphs else 'plain'}")
    return loop, config, (model, engine)


def model_overrides_from(args) -> dict:
    return {k: v for k, v in {"image_size": getattr(args, "image_size", None),
                              "base_channels": getattr(args, "base_channels", None),
                              "num_heads": getattr(args, "num_heads", None)}.items() if v is not None}


def format_report(what: str, info: dict, config: dict, summary: dict, trace_name: str, top: int) -> str:
    label = device_label(info)
    title = {"train": "training step", "sample": "sampling"}.get(what, what)
    on_gpu = info.get("device_type") == "cuda"
    steps = max(summary.get("steps") or len(summary.get("wall_ms", [])), 1)
    lines = [f"# Profile: {title} — {label}", ""]
    if not on_gpu:
        lines += ["**CPU figures** (not comparable with GPU figures; for checking the tooling).", ""]
    command = " ".join(["dream"] + sys.argv[1:]) if sys.argv[1:2] == ["profile"] else " ".join(sys.argv)
    lines += [f"Command: `{command}`", "", "## Setup", "",
              markdown_table(["", ""], [[k, v] for k, v in config.items()]), "", "## Environment", "",
              environment_markdown(info), "", "## Summary", ""]
    rows = [["step time (median of profiled steps, wall, under the profiler)", f"{summary['step_ms']:.3f} ms"],
            ["profiled steps", len(summary.get("wall_ms", []))]]
    if "images_per_s" in summary:
        label_ips = ("images/s of a 1000-step DDPM run at this step time" if config.get("sampler", "").startswith("one")
                     else "images/s (under the profiler)")
        rows.append([label_ips, significant(summary["images_per_s"])])
    if on_gpu:
        busy = summary.get("busy_fraction")
        rows += [["GPU kernels per step", f"{summary['kernels'] / steps:.0f}"],
                 ["kernel launches per step (runtime + driver API)", f"{summary['launches'] / steps:.0f}"],
                 ["CUDA graph launches per step", f"{summary['graph_launches'] / steps:.0f}"],
                 ["GPU busy fraction (kernels, copies, memsets / window)",
                  "n/a" if busy is None else f"{100 * busy:.1f} %"],
                 ["launch gaps (1 - busy)", "n/a" if busy is None else f"{100 * (1 - busy):.1f} %"],
                 ["GPU kernel time per step", f"{summary['kernel_time_us'] / steps / 1e3:.3f} ms"]]
        for name, wait in summary.get("host_waits", {}).items():
            own = " (the profiling loop's own, at each step's end)" if name == "cudaDeviceSynchronize" else ""
            rows.append([f"host waits per step in {name}{own}",
                         f"{wait['calls'] / steps:.0f} calls, {wait['total_us'] / steps / 1e3:.3f} ms"])
    else:
        rows += [["GPU kernels / launches / busy fraction", "n/a (CPU)"]]
    lines += [markdown_table(["metric", "value"], rows), ""]
    if on_gpu and not summary.get("gpu_events"):
        lines += [f"> {NO_GPU_EVENTS}", ""]
    if on_gpu:
        lines += [f"## Top {top} kernels by GPU time", ""]
        table = [[i + 1, k["name"][:120], f"{k['calls'] / steps:.0f}", f"{k['total_us'] / steps / 1e3:.3f}",
                  f"{100 * k['share']:.1f} %" if k["share"] is not None else ""]
                 for i, k in enumerate(summary["top_kernels"])]
        lines += [markdown_table(["#", "kernel", "calls/step", "ms/step", "share of kernel time"], table)]
    else:
        lines += [f"## Top {top} operators by self CPU time", ""]
        table = [[i + 1, k["name"][:120], f"{k['calls'] / steps:.0f}", f"{k['total_us'] / steps / 1e3:.3f}",
                  f"{100 * k['share']:.1f} %"] for i, k in enumerate(summary.get("top_ops", []))]
        lines += [markdown_table(["#", "operator", "calls/step", "ms/step", "share of CPU time"], table)]
    lines += ["", f"Chrome trace: `{trace_name}` (open in https://ui.perfetto.dev or chrome://tracing).", ""]
    return "\n".join(lines)


PROFILE_SUFFIXES = (".md", ".json", ".trace.json.gz")


SAMPLE_STEPS = 10  # DDIM steps of the engine/graphs sampling profile


def profile_name(what: str, args, config: dict, device: torch.device) -> str:
    """profile-<what>, then each setting that differs from the device's default: sampler, layout,
    checkpointing, backend, precision, compile, objective, preset, batch (model size overrides and the seed
    are not named; run_profile gives a taken name -2, -3, ...)."""
    from dream.model import resolve_channels_last
    from dream.train import resolve_backend, resolve_precision

    name = f"profile-{what}" + (f"-{args.sampler}" if what == "sample" and args.sampler != "step" else "")
    if what == "sample" and args.sampler != "step" and args.sample_steps != SAMPLE_STEPS:
        name += f"-ddim{args.sample_steps}"
    if config["channels_last"] != resolve_channels_last(None, device):
        name += "-channels-last" if config["channels_last"] else "-nchw"
    if what == "train" and args.checkpointing != "none":
        name += f"-checkpointing-{args.checkpointing}"
    if config["backend"] != resolve_backend("auto", device):
        name += f"-{config['backend']}"
    if config["precision"] != resolve_precision("auto", device):
        name += f"-{config['precision']}"
    if config["compile"]:
        name += "-compile"
    if what == "train" and config.get("cuda_graphs"):
        name += "-graphs"
    if what == "train" and config["objective"] != "seed":
        name += f"-{config['objective']}"
    if args.preset != default_preset(device):
        name += f"-{args.preset}"
    if args.batch != (128 if device.type == "cuda" else 2):
        name += f"-batch{args.batch}"
    return name


def run_profile(args) -> list[Path]:
    from dream.errors import DreamError
    from dream.errors import out_of_memory
    from dream.train import resolve_device

    device = resolve_device(args.device)
    if args.preset is None:
        args.preset = default_preset(device)
    on_gpu = device.type == "cuda"
    if args.batch is None:
        args.batch = 128 if on_gpu else 2
    if args.image_size is None and not on_gpu and args.preset == "tiny":
        args.image_size = 32  # keeps the CPU run to about a minute
    if args.warmup is None:
        args.warmup = 2 if on_gpu else 1
    if args.steps is None:
        args.steps = 3 if on_gpu else 1
    for flag, value, least in (("--batch", args.batch, 1), ("--steps", args.steps, 1), ("--top", args.top, 1),
                               ("--warmup", args.warmup, 0), ("--sample-steps", args.sample_steps, 1)):
        if value < least:
            raise DreamError(f"{flag} must be at least {least}, got {value}")
    whats = PROFILE_WHATS if args.what == "both" else (args.what,)
    info = environment_info(device)
    check_out_root(args.out, info, "--out")
    written = []
    for what in whats:
        torch.manual_seed(args.seed)
        try:
            step, config, _keep = (training_workload if what == "train" else sampling_workload)(args, device)
            stem = unique_stem(report_stem(args.out, info, profile_name(what, args, config, device)),
                               PROFILE_SUFFIXES)
            trace_path = stem.with_name(stem.name + ".trace.json.gz")
            summary = profile_steps(step, device, warmup=args.warmup, active=args.steps, trace_path=trace_path,
                                    top=args.top)
        except RuntimeError as error:  # torch.OutOfMemoryError is one
            if not out_of_memory(error):
                raise
            raise DreamError(f"out of memory in the {what} workload at --batch {args.batch} on {device}: pass a "
                             f"smaller --batch") from None
        summary["images_per_s"] = args.batch / (summary["step_ms"] / 1e3)
        if what == "sample" and args.sampler == "step":
            summary["images_per_s"] /= 1000  # a 1000-step DDPM run at this step time
        report = format_report(what, info, config, summary, trace_path.name, args.top)
        md_path = stem.with_suffix(".md")
        md_path.write_text(report)
        json_path = stem.with_suffix(".json")
        json_path.write_text(json.dumps({"what": what, "environment": info, "config": config,
                                         "summary": summary}, indent=1, default=str))
        written += [md_path, json_path, trace_path]
        print(f"{what}: step {summary['step_ms']:.2f} ms"
              + (f", busy {100 * summary['busy_fraction']:.1f} %, {summary['kernels'] / max(summary['steps'], 1):.0f}"
                 f" kernels/step" if summary.get("busy_fraction") is not None else "")
              + f" -> {md_path}")
        if on_gpu and not summary.get("gpu_events"):
            print(f"warning: {what}: {NO_GPU_EVENTS}", file=sys.stderr)
        del step, _keep
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return written


def add_profile_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--what", default="both", choices=["both", *PROFILE_WHATS],
                   help="train: one optimizer step; sample: one ancestral denoising step; both (default)")
    p.add_argument("--preset", default=None, help="model preset (default: seed on a GPU, tiny on CPU)")
    p.add_argument("--image-size", type=int, help="override the preset's image size (tiny on CPU: 32 by default)")
    p.add_argument("--base-channels", type=int, help="override the preset's base channel count")
    p.add_argument("--num-heads", type=int, help="override the preset's attention heads")
    p.add_argument("--batch", type=int, help="batch size (default: 128 on a GPU, 2 on CPU)")
    p.add_argument("--backend", default="auto", choices=["auto", "eager", "sdpa", "triton"],
                   help="auto: triton on CUDA, eager on CPU")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on CUDA where supported, else fp32")
    p.add_argument("--objective", default="seed", choices=["standard", "seed", "paper"],
                   help="training objective of the profiled step")
    p.add_argument("--sampler", default="step", choices=["step", "engine", "graphs"],
                   help="sample workload: one p_sample step (default), or a DDIM loop through "
                        "dream.sampling.SamplingEngine, plain or with CUDA graphs")
    p.add_argument("--sample-steps", type=int, default=SAMPLE_STEPS, help="DDIM steps of the engine/graphs loop")
    p.add_argument("--checkpointing", default="none", choices=["none", "norms", "attention", "resblocks", "all"],
                   help="activation (gradient) checkpointing policy (norms: triton backend only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="train workload: the step captured as a CUDA graph (warmed up and captured before the "
                        "profiler starts)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format for the model (default: on CUDA, where cuDNN runs NHWC)")
    p.add_argument("--warmup", type=int, help="steps run under the profiler before recording (GPU 2, CPU 1)")
    p.add_argument("--steps", type=int, help="steps recorded (GPU 3, CPU 1)")
    p.add_argument("--top", type=int, default=20, help="rows in the top-kernels table")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs")
    p.add_argument("--device", default="auto", help="cuda, cuda:N or cpu; auto: cuda when present")
    p.add_argument("--out", default=os.environ.get("DREAM_PROFILE_OUT", DEFAULT_OUT),
                   help="output root (env DREAM_PROFILE_OUT; default profiles/): files go to <out>/<device>/")


def run_profile_command(args) -> int:
    for path in run_profile(args):
        print(path)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dream profile", description=__doc__.splitlines()[0])
    add_profile_arguments(parser)
    return run_profile_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
