"""The benchmark harness: numerical match first, then timing, ceilings, memory, GPU telemetry, reports.

A *case* is one workload at one size (e.g. GroupNorm at the 64x64 ResBlock site, forward+backward);
its *variants* are the project's path ("ours") and its anchors (eager fp32, eager bf16 autocast,
torch.compile default / max-autotune, SDPA with a pinned backend, xformers, ...). Each variant is
one pytest-benchmark test, and for each one the harness

 1. builds the variant (Unavailable -> the test is skipped with the reason);
 2. runs it once on the case's inputs and compares every output (and gradient) with the case's
    reference (float64 eager for kernels, eager fp32 with TF32 off for model-level cases) by
    ||out - ref|| / ||ref||; NaN or an error over the tolerance of the variant's dtype fails the
    test, and nothing is timed;
 3. times it: warm-up, then rounds of `inner` calls ended by a device sync, timed by
    pytest-benchmark (benchmark.pedantic); per-call time = round median / inner. Kernel cases on a
    GPU replay the `inner` calls as one captured CUDA graph, so small ops are timed on the GPU and
    not by Python's launch overhead (the plain launch-bound time is kept beside it). Inputs rotate
    among several sets when one set would fit in L2. With --benchmark-disable the single checked
    call is the (smoke) figure;
 4. records peak memory (torch.cuda.max_memory_allocated over one call) and GPU telemetry
    (nvidia-ml-py: clocks, power, energy-counter difference over the timed rounds).

The session (bench/conftest.py) measures the ceilings first (large device-to-device copy; large
matrix products), and at the end writes JSON and a markdown table to
<out>/<device>/<date>-<name>.json/.md (a name already taken gets -2, -3, ...): per case each variant's
time, speed-up of ours over each anchor, GB/s or TFLOP/s and % of the measured ceiling, peak memory and
telemetry, and the issues' goals as met / not met. Nothing here asserts on speed.
"""
from __future__ import annotations

import fnmatch
import gc
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from dream.math_flags import MathFlags, exact_fp32, use_fast_math

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

# ||out - ref|| / ||ref|| allowed, by level and by the dtype the variant computes in.
# "kernel": one op against float64. "model": a whole UNet / training step / sampling step against
# eager fp32 with TF32 off (errors grow through ~30 layers; fp32 on a GPU includes TF32 convs).
# "loop": many sampling steps chained.
# The kernel level is the tight one; model-level bounds catch a broken path (errors near 1) without
# failing on bf16 rounding carried through ~30 layers or 50 sampling steps (measured on the tiny
# model, CPU: DDIM-10 bf16 vs fp32 ~7e-2, DDIM-50 ~3e-2). Each error is reported in the tables.
TOLERANCES = {
    #  level      fp32 (CPU)  fp32 (GPU)  fp16   bf16
    "kernel": (1e-5, 2e-3, 5e-3, 3e-2),
    "model": (1e-3, 1e-2, 5e-2, 1e-1),
    "loop": (1e-3, 5e-2, 1e-1, 1.5e-1),
}


def tolerance(level: str, dtype: torch.dtype) -> float:
    fp32_cpu, fp32_gpu, fp16, bf16 = TOLERANCES[level]
    if dtype == torch.bfloat16:
        return bf16
    if dtype == torch.float16:
        return fp16
    return fp32_gpu if ON_GPU else fp32_cpu


class Unavailable(Exception):
    """This variant cannot run here (library missing, backend unsupported): the test is skipped."""


class Mismatch(AssertionError):
    """A variant's output differs from the reference by more than its tolerance."""


# ------------------------------------------------------------------------------------------------
# Configuration (set from bench/conftest.py options or environment variables)
# ------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    size: str = "auto"  # small | full | auto (full on a GPU, small on CPU)
    variants: str = ""  # ordered rules: 'pattern' / '+pattern' runs, '-pattern' leaves out, 'all' (see selected)
    out: str | None = None  # report root; None: profiles/ when timing, no report in smoke mode
    name: str = "bench"
    target_s: float = 0.5  # timed seconds per variant (GPU)
    round_s: float = 0.02  # seconds per round (inner calls amortise the sync)

    @property
    def full(self) -> bool:
        return self.size == "full" or (self.size == "auto" and ON_GPU)


SIZES = ("auto", "small", "full")


def size_value(text: str) -> str:
    if text not in SIZES:
        raise ValueError(f"must be one of {', '.join(SIZES)}")
    return text


def positive_float(text) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ValueError("must be a positive number of seconds")
    return value


def positive_int(text) -> int:
    if not str(text).strip().isdigit() or int(text) < 1:
        raise ValueError("must be a positive integer")
    return int(text)


# Settings attribute -> (environment variable, parser); a bad value is kept in ENV_PROBLEMS, not raised at
# import (bench.tune_kernels and bench.compile_report import this module), and refused by bench/conftest.py.
ENVIRONMENT = {"size": ("DREAM_BENCH_SIZE", size_value), "variants": ("DREAM_BENCH_VARIANTS", str),
               "out": ("DREAM_BENCH_OUT", str), "name": ("DREAM_BENCH_NAME", str),
               "target_s": ("DREAM_BENCH_TARGET_S", positive_float)}
ENV_PROBLEMS: dict[str, str] = {}  # attribute -> one line


def settings_from_environment() -> Settings:
    settings = Settings()
    for attribute, (variable, parse) in ENVIRONMENT.items():
        text = os.environ.get(variable, "")
        if not text:
            continue
        try:
            setattr(settings, attribute, parse(text))
        except ValueError as error:
            ENV_PROBLEMS[attribute] = f"{variable}={text!r}: {error}"
    return settings


SETTINGS = settings_from_environment()


def selected(case_id: str, variant: "Variant") -> tuple[bool, str]:
    """Whether the variant runs under the DREAM_BENCH_VARIANTS / --bench-variants filter.

    The filter is a comma-separated list of rules, 'pattern' or '+pattern' (run) and '-pattern'
    (leave out), matched (fnmatch) against the variant name and against 'case_id:variant'; the last
    rule that matches decides; 'all' matches everything. A variant no rule matches is left out when
    the first rule is an include, and otherwise gets the default: variants marked cpu=False (slow
    in the Triton interpreter or to compile) are left out on CPU, those marked explicit (minutes
    to compile) everywhere. gpu_only variants never run on CPU.
    Example: '-*max_autotune*,+group_norm/res64_pre_ss/fwd+bwd:compile_max_autotune'."""
    if variant.gpu_only and not ON_GPU:
        return False, "GPU-only " + ("variant of ours" if variant.role == "ours" else "anchor")
    rules = [r.strip() for r in SETTINGS.variants.split(",") if r.strip()]
    names = (variant.name, f"{case_id}:{variant.name}")
    decision = None
    for rule in rules:
        negative = rule.startswith("-")
        pattern = rule.lstrip("+-")
        if pattern == "all" or any(fnmatch.fnmatch(n, pattern) for n in names):
            decision = not negative
    if decision is True:
        return True, ""
    if decision is False:
        return False, f"left out by variant filter {SETTINGS.variants!r}"
    if rules and not rules[0].startswith("-"):
        return False, f"not in variant filter {SETTINGS.variants!r}"
    if not ON_GPU and not variant.cpu:
        return False, "left out on CPU (interpreter/compile too slow); DREAM_BENCH_VARIANTS=all runs it"
    if variant.explicit:
        return False, "runs only when selected (DREAM_BENCH_VARIANTS / --bench-variants)"
    return True, ""


# ------------------------------------------------------------------------------------------------
# Cases and variants
# ------------------------------------------------------------------------------------------------
@dataclass
class Runner:
    """What a variant's build returns: `run(inputs)` is timed; `check(inputs)` (default: run) gives
    the outputs compared with the reference (e.g. in eval mode, while run trains with dropout)."""
    run: Callable[[Any], Any]
    check: Callable[[Any], Any] | None = None
    keep: Any = None  # objects that must stay alive while the variant runs (models, trainers)
    warm_after_check: bool = True  # call `run` once after a separate check (False: the check ran it)


@dataclass
class Variant:
    name: str
    build: Callable[["CaseState"], Runner | Callable]
    role: str = "anchor"  # "ours" (the project's path) or "anchor"
    own_code: bool = False  # an anchor that runs the project's code (ours by another path): its errors fail the case
    dtype: torch.dtype = torch.float32  # the precision it computes in (tolerance, bytes, ceiling)
    gpu_only: bool = False
    cpu: bool = True  # run on CPU by default
    explicit: bool = False  # runs only when a variant pattern (or 'all') selects it (e.g. slow compiles)
    graph: bool = True  # kernel cases on a GPU: time CUDA-graph replays of the calls (False: plain calls)
    note: str = ""


@dataclass
class Goal:
    """A goal from the issues, reported as met / not met (never asserted).
    kind 'speedup': time(anchor) / time(ours) >= value, anchors = one name or several (fastest used);
    kind 'pct_ceiling': ours reaches value % of its ceiling. `ours`: a variant name, or several (the
    fastest of them counts)."""
    text: str
    kind: str
    ours: str | tuple
    value: float
    anchors: tuple[str, ...] = ()


@dataclass
class Case:
    suite: str
    name: str
    direction: str  # fwd | fwd+bwd | step | loop
    setup: Callable[[], "CaseState"]
    variants: list[Variant]
    level: str = "kernel"  # tolerance level
    describe: str = ""
    goals: list[Goal] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.suite}/{self.name}/{self.direction}"


@dataclass
class CaseState:
    """Inputs and reference outputs of a case, shared by its variants.
    input_sets[0] is the one checked; all sets rotate while timing. `outputs` names the entries of
    the reference tuple. `flops` (counted) or `bytes` (fewest bytes moved by one call, for the
    variant's dtype: a function of the dtype) give the throughput; `images` per call gives img/s."""
    input_sets: list[Any]
    reference: tuple
    outputs: tuple[str, ...]
    flops: float | None = None
    bytes: Callable[[torch.dtype], float] | None = None
    images: int | None = None
    info: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # case-specific objects shared by variant builders


def input_set_count(bytes_per_call: float) -> int:
    """Enough input sets that rotating through them leaves L2 cold (4x L2), at most 8."""
    if not ON_GPU or not bytes_per_call:
        return 1
    l2 = getattr(torch.cuda.get_device_properties(DEVICE), "L2_cache_size", 50 * 2**20) or 50 * 2**20
    return int(min(8, max(1, math.ceil(4 * l2 / bytes_per_call))))


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------
def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def session_backend_defaults() -> None:
    """The settings every variant runs under (the trainer's): cudnn autotuning, TF32 allowed."""
    if ON_GPU:
        use_fast_math()


def flatten(outputs) -> list:
    if isinstance(outputs, torch.Tensor) or outputs is None:
        return [outputs]
    if isinstance(outputs, dict):
        return [t for v in outputs.values() for t in flatten(v)]
    return [t for v in outputs for t in flatten(v)]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (inf on NaN/inf or a shape mismatch)."""
    if out is None or ref is None:
        return math.inf if (out is None) != (ref is None) else 0.0
    if tuple(out.shape) != tuple(ref.shape):
        return math.inf
    out64, ref64 = out.detach().to(torch.float64), ref.detach().to(ref.device, torch.float64)
    if out64.device != ref64.device:
        out64 = out64.to(ref64.device)
    if not bool(torch.isfinite(out64).all()):
        return math.inf
    denominator = float(torch.linalg.vector_norm(ref64))
    numerator = float(torch.linalg.vector_norm(out64 - ref64))
    if denominator == 0.0:
        return 0.0 if numerator == 0.0 else math.inf
    return numerator / denominator


def compare(outputs, reference: tuple, names: tuple[str, ...], tol: float) -> dict[str, float]:
    """Relative errors per named output; raises Mismatch naming every output over `tol`."""
    got, want = flatten(outputs), flatten(reference)
    if len(got) != len(want):
        raise Mismatch(f"variant returned {len(got)} outputs, the reference {len(want)} ({', '.join(names)})")
    errors = {name: relative_error(g, w) for name, g, w in zip(names, got, want)}
    bad = {k: v for k, v in errors.items() if not v <= tol}
    if bad:
        detail = ", ".join(f"{k}: {v:.3g}" for k, v in bad.items())
        raise Mismatch(f"output differs from the reference beyond tolerance {tol:g} "
                       f"(||out-ref||/||ref||): {detail}")
    return errors


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs counted by torch's FlopCounterMode (matmuls and convolutions, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def comma_choices(*choices: str) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated list whose items are all among `choices`."""
    import argparse

    def parse(text: str) -> list[str]:
        items = [item for item in text.split(",") if item]
        unknown = [item for item in items if item not in choices]
        if not items or unknown:
            raise argparse.ArgumentTypeError(f"{', '.join(unknown) or 'nothing'} is not one of {', '.join(choices)}")
        return items

    return parse


def free_memory() -> None:
    gc.collect()
    if ON_GPU:
        torch.cuda.empty_cache()


def compile_fn(fn, mode: str | None = None, fullgraph: bool = False):
    """torch.compile with fresh dynamo caches (so no earlier case's shapes count against the
    recompile limit or turn dimensions dynamic)."""
    torch._dynamo.reset()
    kwargs = {"dynamic": False, "fullgraph": fullgraph}
    if mode and mode != "default":
        kwargs["mode"] = mode
    return torch.compile(fn, **kwargs)


def autotuned(build: Callable[["CaseState"], Runner | Callable]) -> Callable[["CaseState"], Runner]:
    """A variant's build whose runs and checks launch the kernels with autotuning on (kernels.autotune): the
    first call of each problem (the check, before any CUDA-graph capture) tunes it, later calls reuse the pick."""

    def build_autotuned(state):
        from kernels.autotune import autotuning

        built = build(state)
        runner = built if isinstance(built, Runner) else Runner(run=built)

        def within(fn):
            if fn is None:
                return None

            def run(inputs):
                with autotuning(True):
                    return fn(inputs)

            return run

        return Runner(run=within(runner.run), check=within(runner.check), keep=runner.keep,
                      warm_after_check=runner.warm_after_check)

    return build_autotuned


def named_inputs_runner(op, direction: str, names: tuple[str, ...], grad: str = "dout"):
    """callable(inputs): out = op(*(inputs[n] for n in names)) -> (out,) under no_grad; with backward
    (direction != "fwd") (out, *gradients of those inputs for the output gradient inputs[grad])."""

    def run(inputs):
        if direction == "fwd":
            with torch.no_grad():
                return (op(*(inputs[name] for name in names)),)
        leaves = [inputs[name].detach().requires_grad_() for name in names]
        out = op(*leaves)
        return (out, *torch.autograd.grad(out, leaves, inputs[grad]))

    return run


def fused_op_variants(direction: str, names: tuple[str, ...], load_ours: Callable[[], Callable],
                      eager: Callable, eager_note: str, dtype: torch.dtype) -> list[Variant]:
    """The variants of a fused elementwise-style op: ours (the custom op `load_ours()` returns, imported
    when a variant is built; also under torch.compile on a GPU), the eager model's unfused path `eager`,
    and torch.compile of that path (default and, on a GPU, max-autotune), each run through
    named_inputs_runner over the inputs `names`."""

    def runner(load):
        return lambda state: named_inputs_runner(load(), direction, names)

    def compiled(load, **options):
        return lambda state: named_inputs_runner(compile_fn(load(), **options), direction, names)

    def load_eager():
        return eager

    return [
        Variant("triton", runner(load_ours), role="ours", dtype=dtype),
        Variant("triton_compile", compiled(load_ours, fullgraph=True), role="ours", dtype=dtype, cpu=False),
        Variant("eager", runner(load_eager), dtype=dtype, note=eager_note),
        Variant("compile", compiled(load_eager), dtype=dtype, cpu=False),
        Variant("compile_max_autotune", compiled(load_eager, mode="max-autotune"), dtype=dtype, gpu_only=True,
                graph=False, note="max-autotune replays its own CUDA graphs (cudagraph trees): timed as plain calls"),
    ]


# ------------------------------------------------------------------------------------------------
# Ceilings and telemetry
# ------------------------------------------------------------------------------------------------
def median_time(fn, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        if ON_GPU:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            tick = time.perf_counter()
            fn()
            times.append(time.perf_counter() - tick)
    return statistics.median(times)


def measure_ceilings() -> dict:
    """The device's ceilings, measured now on random data:
    copy_gbps: a large device-to-device copy (bytes read + written per second);
    matmul_<dtype>_tflops: large square matrix products (2 n^3 FLOPs) through torch."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    result = {}
    copy_elems = (1 << 28) if ON_GPU else (1 << 24)  # fp32: 1 GiB on GPU, 64 MiB on CPU
    src = torch.rand(copy_elems, device=DEVICE, generator=g)
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), reps=20 if ON_GPU else 5, warmup=3)
    result["copy_bytes"] = 2 * src.numel() * src.element_size()
    result["copy_gbps"] = result["copy_bytes"] / seconds / 1e9
    src = dst = None  # free the copy buffers before the matrix products
    sizes = {"bf16": (torch.bfloat16, 8192 if ON_GPU else 512), "fp32": (torch.float32, 4096 if ON_GPU else 1024)}
    if ON_GPU:  # fp32 variants run with TF32 allowed (the session's settings): their ceiling is the TF32 rate
        sizes["tf32"] = (torch.float32, 8192)
    for name, (dtype, n) in sizes.items():
        a = torch.randn(n, n, device=DEVICE, generator=g).to(dtype)
        b = torch.randn(n, n, device=DEVICE, generator=g).to(dtype)
        with exact_fp32():
            if name == "tf32":
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.set_float32_matmul_precision("high")
            seconds = median_time(lambda: torch.mm(a, b), reps=10 if ON_GPU else 3, warmup=3 if ON_GPU else 1)
        result[f"matmul_{name}_n"] = n
        result[f"matmul_{name}_tflops"] = 2 * n ** 3 / seconds / 1e12
        a = b = None
    free_memory()
    return result


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}.get(
        dtype, str(dtype).replace("torch.", ""))


class Telemetry:
    """GPU state through nvidia-ml-py (module pynvml); every reading is optional."""

    def __init__(self):
        self.handle = None
        self.error = None
        if not ON_GPU:
            self.error = "CPU"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            props = torch.cuda.get_device_properties(DEVICE)
            pci = [getattr(props, f"pci_{k}_id", None) for k in ("domain", "bus", "device")]
            handle = None
            if all(isinstance(v, int) for v in pci):  # match CUDA's device to NVML's by PCI address
                try:
                    handle = pynvml.nvmlDeviceGetHandleByPciBusId(f"{pci[0]:08X}:{pci[1]:02X}:{pci[2]:02X}.0")
                except Exception:  # noqa: BLE001
                    handle = None
            self.handle = handle or pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        except Exception as error:  # noqa: BLE001  - no pynvml or no NVML: telemetry is left out
            self.error = f"{type(error).__name__}: {error}"

    def _read(self, name, *args):
        try:
            return getattr(self.nvml, name)(self.handle, *args)
        except Exception:  # noqa: BLE001
            return None

    def snapshot(self) -> dict:
        if self.handle is None:
            return {}
        nv = self.nvml
        power = self._read("nvmlDeviceGetPowerUsage")
        snap = {
            "time": time.perf_counter(),
            "energy_mj": self._read("nvmlDeviceGetTotalEnergyConsumption"),
            "power_w": None if power is None else power / 1e3,
            "sm_clock_mhz": self._read("nvmlDeviceGetClockInfo", nv.NVML_CLOCK_SM),
            "mem_clock_mhz": self._read("nvmlDeviceGetClockInfo", nv.NVML_CLOCK_MEM),
            "temperature_c": self._read("nvmlDeviceGetTemperature", nv.NVML_TEMPERATURE_GPU),
        }
        reasons = None
        for reader in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"):
            if hasattr(nv, reader):
                reasons = self._read(reader)
                if reasons is not None:
                    break
        snap["clock_event_reasons"] = reasons
        return snap

    def describe(self) -> dict:
        if self.handle is None:
            return {"telemetry": self.error}
        name = self.nvml.nvmlDeviceGetName(self.handle)
        limit = self._read("nvmlDeviceGetEnforcedPowerLimit")
        max_sm = self._read("nvmlDeviceGetMaxClockInfo", self.nvml.NVML_CLOCK_SM)
        return {"nvml_name": name.decode() if isinstance(name, bytes) else name,
                "power_limit_w": None if limit is None else limit / 1e3, "max_sm_clock_mhz": max_sm}

    @staticmethod
    def difference(before: dict, after: dict, calls: int) -> dict:
        if not before or not after:
            return {}
        seconds = after["time"] - before["time"]
        out = {k: after[k] for k in ("power_w", "sm_clock_mhz", "mem_clock_mhz", "temperature_c",
                                     "clock_event_reasons")}
        if before.get("energy_mj") is not None and after.get("energy_mj") is not None and seconds > 0:
            joules = (after["energy_mj"] - before["energy_mj"]) / 1e3
            out.update(energy_j=joules, avg_power_w=joules / seconds, energy_j_per_call=joules / max(calls, 1))
        return out


# ------------------------------------------------------------------------------------------------
# The session: ceilings, current case state, results
# ------------------------------------------------------------------------------------------------
class BenchSession:
    def __init__(self):
        self.results: list[dict] = []
        self.cases: dict[str, Case] = {}
        self.ceilings: dict | None = None
        self.telemetry: Telemetry | None = None
        self._state_id: str | None = None
        self._state: CaseState | None = None
        self.timing = True
        self.started = time.time()
        self.stem = None  # <root>/<device>/<date>-<name>[-n]: this run's report files, chosen once (use_root)
        self.report_error: str | None = None  # why the report could not be written (one line)

    def ensure_ceilings(self) -> dict:
        if self.ceilings is None:
            with MathFlags():
                self.ceilings = measure_ceilings()
            self.telemetry = Telemetry()
        return self.ceilings

    def state_for(self, case: Case) -> CaseState:
        if self._state_id != case.id:
            self._state, self._state_id = None, None
            free_memory()
            with exact_fp32():
                self._state = case.setup()
            self._state_id = case.id
        return self._state

    def release(self) -> None:
        self._state, self._state_id = None, None
        free_memory()

    def record(self, case: Case, variant: Variant, **values) -> dict:
        self.cases[case.id] = case
        entry = {"case": case.id, "suite": case.suite, "name": case.name, "direction": case.direction,
                 "describe": case.describe, "variant": variant.name, "role": variant.role,
                 "dtype": dtype_name(variant.dtype), "note": variant.note, **values}
        self.results = [r for r in self.results if not (r["case"] == case.id and r["variant"] == variant.name)]
        self.results.append(entry)
        self._append_partial(entry)
        return entry

    def use_root(self, root: str, option: str = "--bench-out") -> None:
        """Checks that <root>/<device> is a writable folder (DreamError, one line, otherwise) and picks this
        run's report stem there: a name no earlier report or partial file has, so nothing is overwritten."""
        from dream.profile import check_out_root, environment_info, report_stem, unique_stem

        info = environment_info()
        check_out_root(root, info, option)
        self.stem = unique_stem(report_stem(root, info, SETTINGS.name, option), REPORT_SUFFIXES)

    def report_path(self, suffix: str):
        return None if self.stem is None else self.stem.with_name(self.stem.name + suffix)

    def partial_path(self):
        """<out>/<device>/<date>-<name>.partial.jsonl: one line per result as it is recorded, so a stage
        killed by a time limit keeps its numbers (removed once the full report is written)."""
        return self.report_path(".partial.jsonl") if SETTINGS.out else None

    def _append_partial(self, entry: dict) -> None:
        import json

        path = self.partial_path()
        if path is None:
            return
        try:
            with open(path, "a") as f:
                f.write(json.dumps(entry, default=str) + "\n")
        except OSError as error:  # the case's result stands; the report at the end says what went wrong
            self.report_error = f"could not append to {path}: {error.strerror or error}"


REPORT_SUFFIXES = (".md", ".json", ".partial.jsonl")
SESSION = BenchSession()


# ------------------------------------------------------------------------------------------------
# Running one variant of one case (called by each benchmark test)
# ------------------------------------------------------------------------------------------------
def run_variant(benchmark, case: Case, variant: Variant) -> dict:
    import pytest

    ok, why = selected(case.id, variant)
    if not ok:
        pytest.skip(why)
    timing = benchmark is not None and not getattr(benchmark, "disabled", True)
    SESSION.timing = SESSION.timing and timing
    SESSION.ensure_ceilings()
    state = SESSION.state_for(case)
    if benchmark is not None and hasattr(benchmark, "group"):
        benchmark.group = case.id
    with MathFlags():
        session_backend_defaults()
        runner = None
        if ON_GPU:  # the setup peak runs from here: build, compile, check, timing, graph captures
            sync()
            torch.cuda.reset_peak_memory_stats()
        try:
            built = variant.build(state)
            runner = built if isinstance(built, Runner) else Runner(run=built)
            del built
            return _check_and_time(benchmark, timing, case, variant, state, runner, runner.check or runner.run)
        except Unavailable as reason:  # a missing library, or SDPA finding no kernel at the first call
            SESSION.record(case, variant, status="skipped", reason=str(reason))
            pytest.skip(f"{variant.name}: {reason}")
        except Mismatch:
            raise
        except Exception as error:  # noqa: BLE001
            reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
            if variant.role == "ours" or variant.own_code:  # the project's code failed: the report says so
                SESSION.record(case, variant, status="error", reason=reason)
                raise
            # an anchor that cannot run here (a library limit, an inductor failure, out of memory) is
            # reported and skipped: it is not the project's path
            SESSION.record(case, variant, status="skipped", reason=f"anchor failed: {reason}")
            pytest.skip(f"{variant.name} (anchor) failed: {reason}")
        finally:
            runner = None  # the variant's models and trainers go before the next one is built
            free_memory()


def _check_and_time(benchmark, timing, case, variant, state, runner, check) -> dict:
    tol = tolerance(case.level, variant.dtype)
    # In a smoke run (--benchmark-disable) the fixture's single call is the checked call, or the
    # plain call after it when the timed path differs from the checked one.
    smoke_fixture = benchmark is not None and not timing and hasattr(benchmark, "pedantic")
    sync()
    tick = time.perf_counter()
    if smoke_fixture and (runner.check is None or not runner.warm_after_check):
        outputs = benchmark.pedantic(check, args=(state.input_sets[0],))
    else:
        outputs = check(state.input_sets[0])
    sync()
    first_call_s = time.perf_counter() - tick
    try:
        errors = compare(outputs, state.reference, state.outputs, tol)
    except Mismatch as mismatch:
        SESSION.record(case, variant, status="mismatch", tolerance=tol, reason=str(mismatch),
                       first_call_s=first_call_s)
        raise
    finally:
        del outputs
    entry = dict(status="ok", tolerance=tol, errors=errors, max_error=max(errors.values(), default=0.0),
                 first_call_s=first_call_s)
    sets = state.input_sets
    if runner.check is not None and runner.warm_after_check:
        # the timed path differs from the checked one: one plain call first (compiles, allocates)
        sync()
        tick = time.perf_counter()
        if smoke_fixture:
            benchmark.pedantic(runner.run, args=(sets[0],))
        else:
            runner.run(sets[0])
        sync()
        first_call_s = time.perf_counter() - tick
    if timing:
        entry.update(_time(benchmark, runner.run, sets, graph=ON_GPU and case.level == "kernel" and variant.graph))
    else:
        entry.update(time_s=first_call_s, rounds=1, inner=1, smoke=True)
    # CUDA-graph replays allocate nothing: a graphed variant's memory is its graph pool, made at capture
    # (inside the build or the first calls), which only the setup peak sees
    entry["setup_peak_bytes"] = torch.cuda.max_memory_allocated() if ON_GPU else None
    entry.update(_peak_memory(runner.run, sets[0]))
    entry.update(_throughput(entry["time_s"], variant.dtype, state))
    entry["info"] = state.info
    return SESSION.record(case, variant, **entry)


def _capture(block):
    """A CUDA graph of block() (warmed up on a side stream first, as torch.cuda.graph requires).

    The capture runs on that side stream inside our own stream context: if the capture fails,
    torch.cuda.graph's exit raises before restoring the stream, and ours still restores it; a one-draw capture
    that succeeds then ends the failed one's state (see recover_from_failed_capture)."""
    from dream.step_graph import recover_from_failed_capture

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        for _ in range(2):
            block()
        try:
            with torch.cuda.graph(graph, stream=side):
                block()
        except Exception:
            # the caller times the plain calls instead, and later cases draw random numbers eagerly: the default
            # generator must not be left expecting the failed capture
            graph = None  # (the traceback keeps this frame)
            recover_from_failed_capture(side, torch.device("cuda", torch.cuda.current_device()))
            raise
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    return graph


def _time(benchmark, fn, sets, graph: bool = False) -> dict:
    """Per-call time: rounds of `inner` calls, each round ended by a sync, timed by pytest-benchmark.
    graph=True (kernel cases on a GPU): the `inner` calls are captured once as a CUDA graph and the
    rounds replay it, so the time is the GPU's and not the Python launch overhead's (which is still
    measured, as time_plain_s, with a few plain rounds)."""

    def block():
        for i in range(inner):
            fn(sets[i % len(sets)])

    # warm-up (compilation and the first call happened in the check): cudnn.benchmark, autotuning
    # and allocator caches settle; then one call estimates the time per call
    warm_calls, tick = 0, time.perf_counter()
    while warm_calls < 1 or (ON_GPU and time.perf_counter() - tick < 0.05 and warm_calls < 1000):
        fn(sets[warm_calls % len(sets)])
        sync()
        warm_calls += 1
    tick = time.perf_counter()
    fn(sets[0])
    sync()
    estimate = max(time.perf_counter() - tick, 1e-7)
    inner = max(1, min(1000, int(SETTINGS.round_s / estimate))) if ON_GPU else 1
    plain = []
    for _ in range(3 if graph else 0):  # launch-bound time of the same block, for reference
        tick = time.perf_counter()
        block()
        sync()
        plain.append((time.perf_counter() - tick) / inner)
    mode, replay = "plain", None
    if graph:
        try:
            replay = _capture(block)
            mode = "cuda-graph"
        except Exception as error:  # noqa: BLE001  - not capturable: time the plain calls
            mode = f"plain (graph capture failed: {type(error).__name__}: {str(error)[:120]})"
            torch.cuda.synchronize()

    def timed_round():
        if replay is not None:
            replay.replay()
        else:
            block()
        sync()

    tick = time.perf_counter()
    timed_round()
    round_s = max(time.perf_counter() - tick, 1e-7)
    # CPU: two rounds of a slow call (the interpreter), the full target for a fast one (host-time cases)
    target = SETTINGS.target_s if ON_GPU or round_s < 0.05 else min(SETTINGS.target_s, 2 * round_s)
    least = 2 if not ON_GPU else (3 if round_s > 0.2 else 5)
    rounds = int(max(least, min(200, math.ceil(target / round_s))))

    telemetry = SESSION.telemetry
    before = telemetry.snapshot() if telemetry else {}
    benchmark.pedantic(timed_round, rounds=rounds, iterations=1, warmup_rounds=0)
    after = telemetry.snapshot() if telemetry else {}
    data = list(getattr(benchmark.stats.stats, "data", [])) or [benchmark.stats.stats.median]
    per_call = [d / inner for d in data]
    median = statistics.median(per_call)
    q = statistics.quantiles(per_call, n=4) if len(per_call) >= 2 else [median, median, median]
    benchmark.extra_info.update(per_call_ms=median * 1e3, inner=inner, timing=mode)
    replay = None  # noqa: F841  (the graph and its memory pool go now)
    return {"time_s": median, "time_iqr_s": q[2] - q[0], "time_min_s": min(per_call), "rounds": rounds,
            "inner": inner, "input_sets": len(sets), "smoke": False, "timing": mode,
            "time_plain_s": statistics.median(plain) if plain else None,
            "telemetry": Telemetry.difference(before, after, rounds * inner)}


def _peak_memory(fn, inputs) -> dict:
    if not ON_GPU:
        return {"peak_bytes": None}
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(inputs)
    sync()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_bytes": peak, "peak_extra_bytes": peak - base}


def _throughput(seconds: float, dtype: torch.dtype, state: CaseState) -> dict:
    ceilings = SESSION.ceilings or {}
    out = {}
    if state.flops:
        tflops = state.flops / seconds / 1e12
        name = "bf16"
        if dtype == torch.float32:  # the rate the variant's matmuls may use under the session's flags
            name = "tf32" if ON_GPU and torch.backends.cuda.matmul.allow_tf32 else "fp32"
        ceiling = ceilings.get(f"matmul_{name}_tflops")
        out.update(flops=state.flops, tflops=tflops, pct_ceiling=100 * tflops / ceiling if ceiling else None,
                   ceiling=f"matmul_{name}")
    elif state.bytes:
        moved = state.bytes(dtype)
        gbps = moved / seconds / 1e9
        ceiling = ceilings.get("copy_gbps")
        out.update(bytes=moved, gbps=gbps, pct_ceiling=100 * gbps / ceiling if ceiling else None, ceiling="copy")
    if state.images:
        out["images_per_s"] = state.images / seconds
    return out
