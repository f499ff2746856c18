"""Compile every Triton kernel the seed UNet launches for a GPU architecture, on a machine without a
GPU, and report each kernel configuration's static resources (registers, spills, shared memory).

    python3 -m bench.compile_report                      # sm_90 (H100/H200), writes profiles/sm90-offline/
    python3 -m bench.compile_report --arch 80 --precisions bf16 --out /tmp/report --json-only

How. The seed UNet (backend "triton") runs one forward and backward on the meta device under a
dispatch mode that records every call of a `dream_kernels` custom op, so the sites, shapes, strides
and flags are exactly the model's, for each layout (NCHW, channels_last) and batch size asked for.
Each recorded call is replayed through the op's Python implementation (`OP_IMPLEMENTATIONS` in the
kernel modules) with meta tensors in each precision, and every `*_kernel` JITFunction is swapped for
a stand-in that calls `warmup` instead of launching, under a driver whose target is the chosen
architecture: the launch heuristics pick the configuration they would pick on that GPU, Triton
compiles it through ptxas to a cubin, and nothing runs. cuobjdump then reads the cubin.

Precisions: "fp32" (everything fp32), "bf16" and "fp16" (activations, scale/shift and gradients in
half precision, GroupNorm weights and statistics in fp32: the trainer's autocast).

Static occupancy is an estimate from the cubin, not a measurement: resident programs per SM =
min(register file / (registers per thread rounded to 8 x 32 x warps), shared memory / (shared per
program + 1 KB), max warps / warps, max programs), with the SM limits of the chosen architecture.
A kernel that spills (64 or more bytes of stack/local memory per thread), needs more shared memory
than one program may have, or does not compile fails the report (exit status 1).
"""
from __future__ import annotations

import datetime
import functools
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton
from torch.utils._python_dispatch import TorchDispatchMode

from bench.harness import comma_choices

REPO = Path(__file__).resolve().parent.parent
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class SMLimits:
    name: str
    sms: int                  # SM count of the reference part, for the split heuristics
    registers: int = 65536    # 32-bit registers per SM
    shared_per_sm: int = 233472
    shared_per_program: int = 232448
    max_warps: int = 64
    max_programs: int = 32


SM_LIMITS = {
    80: SMLimits("A100 (sm_80)", sms=108, shared_per_sm=167936, shared_per_program=166912),
    89: SMLimits("L40S (sm_89)", sms=142, shared_per_sm=102400, shared_per_program=101376, max_warps=48,
                 max_programs=24),
    90: SMLimits("H100/H200 SXM (sm_90)", sms=132),
}

# A kernel whose stack + local memory reaches this many bytes per thread fails the report: a spilled
# value or two (ptxas keeping 8-16 bytes out of registers, outside the hot loop) is listed but tolerated.
SPILL_LIMIT_BYTES = 64

# Which tensor arguments of each op carry activations (the precision under test); the others
# (GroupNorm weight/bias, statistics, logsumexp) stay fp32 as in the trainer's mixed precision.
ACTIVATION_ARGS = {
    "dream_kernels::group_norm_silu_fwd": (0, 3, 4),          # x, scale, shift
    "dream_kernels::group_norm_silu_bwd": (0, 1, 4, 5),       # dy, x, scale, shift
    "dream_kernels::attention_forward": (0, 1, 2),            # q, k, v
    "dream_kernels::attention_backward": (0, 1, 2, 3, 5),     # q, k, v, o, do
    "dream_kernels::attention_qkv_nchw_forward": (0,),        # qkv
    "dream_kernels::attention_qkv_nchw_backward": (0, 1, 3),  # qkv, out, dout
    "dream_kernels::group_norm_silu_conv2d": (0, 3, 4, 11, 12),  # x, scale, shift, conv weight and bias (autocast)
    "dream_kernels::upsample2x_concat": (0, 1),               # h, skip (h's bias stays fp32)
    "dream_kernels::add_bias_residual": (0, 1),               # a, b (the bias stays fp32)
    "dream_kernels::upsample2x_bilinear_backward": (0,),      # the gradient (its dtype argument follows it)
}

# The position of shift among each GroupNorm op's arguments (see _RecordOps)
MODEL_FP32_SHIFT = {"dream_kernels::group_norm_silu_fwd": 4, "dream_kernels::group_norm_silu_bwd": 5}


# ------------------------------------------------------------------------------------------------
# Recording the model's op calls on the meta device
# ------------------------------------------------------------------------------------------------
@dataclass
class OpCall:
    op: str                    # "dream_kernels::group_norm_silu_fwd"
    args: tuple
    site: str                  # "B=128 nchw (128, 256, 32, 32)"
    fp32_args: tuple = ()      # activation arguments that stay fp32 in every precision


class _RecordOps(TorchDispatchMode):
    def __init__(self, sink: list, label: str):
        super().__init__()
        self.sink, self.label = sink, label

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "dream_kernels":
            op = f"dream_kernels::{func._opname}"
            shape = tuple(args[0].shape)
            # the ResBlock's shift is fp32 under autocast: the triton backend folds conv1's fp32 bias into it
            shift = MODEL_FP32_SHIFT.get(op)
            fp32_args = (shift,) if shift is not None and args[shift] is not None else ()
            self.sink.append(OpCall(op, tuple(args), f"{self.label} {shape}", fp32_args))
        return func(*args, **(kwargs or {}))


def record_model_calls(preset: str, batch: int, channels_last: bool) -> list[OpCall]:
    """Every dream_kernels op call of one training forward + backward of the UNet (dropout on), and
    of one eval-mode forward (sampling: dropout off), on fake CPU tensors (FakeTensorMode: shapes and
    strides, no data). Not the meta device: its convolutions return NCHW-contiguous outputs whatever
    the input's layout, where CUDA's (and the CPU's) keep channels_last."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dream.model import build_unet, to_channels_last

    calls: list[OpCall] = []
    label = f"B={batch} {'channels_last' if channels_last else 'nchw'}"
    with FakeTensorMode():
        model = build_unet(preset, backend="triton")
        size = model.config.image_size
        x = torch.empty(batch, model.config.in_channels, size, size)
        t = torch.zeros(batch, dtype=torch.long)
        if channels_last:
            to_channels_last(model)
            x = x.to(memory_format=torch.channels_last)
        with _RecordOps(calls, label):
            model(x, t).float().sum().backward()
        model.eval()
        with _RecordOps(calls, label + " eval"), torch.no_grad():
            model(x, t)
    return calls


# The kernels' whole contract beyond the UNet's sites (--contract): attention for every supported head
# dim and sequence lengths from 1 to 4096 (masked tails), GroupNorm over the kernel tests' shapes
# (channels per group not powers of two, 7x5 and 1x1 images, batches 1 to 1024, the split path), both
# modes, SiLU on and off, with and without scale/shift, and the ResBlock's form with fused dropout (its
# two forms in channels_last too: tiles along channels, dropout octets of channels, whole or element-wise), and
# the skip upsampling and the residual sum with bias over the kernel tests' shapes in both layouts.
CONTRACT_ATTENTION = [(n, d) for n in (1, 17, 64, 100, 256, 1000, 4096) for d in (16, 32, 64, 128)]
CONTRACT_GROUP_NORM = [(3, 96, 7, 5, 8), (1, 96, 7, 5, 8), (3, 12, 1, 1, 2), (2, 18, 3, 6, 3), (128, 256, 16, 16, 8),
                       (16, 128, 64, 64, 8), (2, 512, 8, 8, 8), (1, 32, 96, 96, 8), (1024, 64, 8, 8, 8),
                       (7, 1024, 9, 3, 8)]
CONTRACT_UPSAMPLE = [(1, 3, 5, 7, 5), (3, 8, 6, 1, 1), (1, 70, 33, 2, 40), (5, 96, 160, 13, 21)]  # (N, Ch, Cs, H, W)
CONTRACT_BIAS_RESIDUAL = [(1, 3, 7, 5), (3, 96, 1, 1), (1, 300, 3, 3), (2, 7, 20, 20), (5, 96, 13, 21)]


def contract_calls() -> list[OpCall]:
    def meta(*shape, dtype=torch.float32):
        return torch.empty(shape, device="meta", dtype=dtype)

    calls = []
    for n, d in CONTRACT_ATTENTION:
        q, k, v, o, do = (meta(2, 3, n, d) for _ in range(5))
        label = f"contract N={n} D={d}"
        calls.append(OpCall("dream_kernels::attention_forward", (q, k, v, d ** -0.5), label))
        calls.append(OpCall("dream_kernels::attention_backward", (q, k, v, o, meta(2, 3, n), do, d ** -0.5), label))
    forms = [(mode, silu, scaled, 0.0, torch.contiguous_format)
             for mode in ("pre", "post") for silu in (True, False) for scaled in (True, False)]
    forms += [("pre", True, True, 0.1, torch.contiguous_format), ("pre", True, True, 0.0, torch.channels_last),
              ("pre", True, True, 0.1, torch.channels_last)]
    for (n, c, h, w, groups) in CONTRACT_GROUP_NORM:
        for mode, silu, scaled, dropout_p, memory_format in forms:
            x, dy = (meta(n, c, h, w).contiguous(memory_format=memory_format) for _ in range(2))
            scale = meta(n, c) if scaled else None
            shift = meta(n, c) if scaled else None
            layout = " channels_last" if memory_format == torch.channels_last else ""
            label = (f"contract {mode}{'' if silu else ' no-silu'}{' scale/shift' if scaled else ''}"
                     f"{' dropout' if dropout_p else ''}{layout}")
            seed = torch.empty(1, device="meta", dtype=torch.int64) if dropout_p else None
            common = (groups, 1e-5, mode, silu, dropout_p, seed)
            calls.append(OpCall("dream_kernels::group_norm_silu_fwd", (x, meta(c), meta(c), scale, shift, *common),
                                f"{label} {(n, c, h, w)}"))
            calls.append(OpCall("dream_kernels::group_norm_silu_bwd",
                                (dy, x, meta(c), meta(c), scale, shift, meta(n, groups), meta(n, groups), *common),
                                f"{label} {(n, c, h, w)}"))
    for (n, ch, cs, h, w) in CONTRACT_UPSAMPLE:
        for memory_format in (torch.contiguous_format, torch.channels_last):
            layout = "channels_last" if memory_format == torch.channels_last else "nchw"
            label = f"contract {layout} {(n, ch, cs, h, w)}"
            h_in = meta(n, ch, 2 * h, 2 * w).contiguous(memory_format=memory_format)
            skip = meta(n, cs, h, w).contiguous(memory_format=memory_format)
            for h_bias in (None, meta(ch)):
                calls.append(OpCall("dream_kernels::upsample2x_concat", (h_in, skip, h_bias), label))
            calls.append(OpCall("dream_kernels::upsample2x_bilinear_backward",
                                (meta(n, cs, 2 * h, 2 * w).contiguous(memory_format=memory_format), torch.float32,
                                 memory_format == torch.channels_last), label))
    for shape in CONTRACT_BIAS_RESIDUAL:
        for memory_format in (torch.contiguous_format, torch.channels_last):
            layout = "channels_last" if memory_format == torch.channels_last else "nchw"
            a, b = (meta(*shape).contiguous(memory_format=memory_format) for _ in range(2))
            calls.append(OpCall("dream_kernels::add_bias_residual", (a, b, meta(shape[1])),
                                f"contract {layout} {shape}"))
    return calls


def _as_precision(call: OpCall, dtype: torch.dtype) -> tuple:
    activations = ACTIVATION_ARGS[call.op]
    out = []
    for index, arg in enumerate(call.args):
        if isinstance(arg, torch.Tensor):
            arg_dtype = dtype if index in activations and index not in call.fp32_args else arg.dtype
            arg = torch.empty_strided(arg.shape, arg.stride(), dtype=arg_dtype, device="meta")
        elif isinstance(arg, torch.dtype):  # an output's dtype (the skip gradient's): the precision's
            arg = dtype
        out.append(arg)
    return tuple(out)


# ------------------------------------------------------------------------------------------------
# Compiling instead of launching
# ------------------------------------------------------------------------------------------------
class _OfflineDriver:
    """Just enough of a Triton driver for JITFunction.warmup: a fixed target, no device."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self):
        return True


@dataclass
class CompiledConfig:
    kernel: str
    meta: dict                 # launch constexprs and num_warps / num_stages
    compiled: object           # triton CompiledKernel
    precisions: set = field(default_factory=set)
    sites: set = field(default_factory=set)


class _CompileInsteadOfLaunch:
    """Stands in for a JITFunction at its module-global name: `kernel[grid](...)` compiles."""

    def __init__(self, jit_fn, sink: dict, context: dict):
        self.jit_fn, self.sink, self.context = jit_fn, sink, context

    def __getitem__(self, grid):
        def compile_only(*args, **kwargs):
            compiled = self.jit_fn.warmup(*args, grid=grid, **kwargs)
            meta = {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")}
            key = (self.jit_fn.__name__, compiled.hash)
            entry = self.sink.setdefault(key, CompiledConfig(self.jit_fn.__name__, meta, compiled))
            entry.precisions.add(self.context["precision"])
            entry.sites.add(self.context["site"])
            self.context["launched"].append(key)
        return compile_only


def _kernel_modules():
    # import_module: the package binds the names `attention` and `group_norm_silu` to functions
    return [importlib.import_module(f"kernels.{name}")
            for name in ("group_norm_silu", "attention", "norm_conv", "upsample_concat", "bias_residual")]


@contextmanager
def offline_compilation(arch: int, sms: int | None = None):
    """Inside, every `*_kernel` launch of the kernel modules compiles for sm_<arch> (Triton's JIT in
    warmup mode under an offline driver) instead of running, with the launchers that size grids by the SM
    count (GroupNorm's split, capped and persistent grids) seeing `sms` SMs (default: the architecture's
    reference part). Yields (compiled, context): compiled maps
    (kernel, hash) to a CompiledConfig; set context["precision"] and context["site"] to label what
    compiles next; context["launched"] lists the (kernel, hash) of every launch in order."""
    from triton.runtime.driver import driver

    modules = _kernel_modules()
    sms = sms or SM_LIMITS[arch].sms
    compiled: dict = {}
    context = {"precision": None, "site": None, "launched": []}  # launched: (kernel, hash) of every launch
    saved = []
    previous_driver = driver._active  # None until a driver was needed (none exists without a GPU)
    driver.set_active(_OfflineDriver(arch))
    try:
        for module in modules:
            for name, value in vars(module).items():
                if name.endswith("_kernel") and isinstance(value, triton.runtime.jit.JITFunction):
                    saved.append((module, name, value))
                    setattr(module, name, _CompileInsteadOfLaunch(value, compiled, context))
        for module in modules:  # the launchers that size their grids by the SM count
            if hasattr(module, "_sm_count"):
                saved.append((module, "_sm_count", module._sm_count))
                module._sm_count = lambda device: sms
        yield compiled, context
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        driver.set_active(previous_driver)


def compile_calls(calls: list[OpCall], precisions: list[str], arch: int):
    """Replay each call in each precision, compiling every kernel it launches; returns
    ({(kernel, hash): CompiledConfig}, [failure lines])."""
    implementations = {}
    for module in _kernel_modules():
        implementations.update(module.OP_IMPLEMENTATIONS)
    failures: list[str] = []
    with offline_compilation(arch) as (compiled, context):
        seen = set()
        for precision in precisions:
            for call in calls:
                signature = (call.op, precision, call.fp32_args, tuple((tuple(a.shape), a.stride(), a.dtype)
                                                                       if isinstance(a, torch.Tensor) else a
                                                                       for a in call.args))
                if signature in seen:
                    continue
                seen.add(signature)
                context.update(precision=precision, site=f"{call.op.split('::')[1]} {call.site}")
                try:
                    implementations[call.op](*_as_precision(call, PRECISIONS[precision]))
                except Exception as error:  # a compile error: report it, go on with the rest
                    failures.append(f"{context['site']} [{precision}]: {first_line(error)}")
    return compiled, failures


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


# ------------------------------------------------------------------------------------------------
# Reading the cubin
# ------------------------------------------------------------------------------------------------
def _nvidia_tool(name: str) -> str:
    """The path of a CUDA tool Triton ships with its NVIDIA backend (ptxas, cuobjdump)."""
    try:
        return getattr(triton.knobs.nvidia, name).path
    except AttributeError:  # older Triton: the binaries sit beside the nvidia backend
        import triton.backends.nvidia as nvidia

        return str(Path(nvidia.__file__).parent / "bin" / name)


def ptxas_available() -> bool:
    """Whether this Triton can compile for NVIDIA GPUs here (its nvidia backend ships ptxas)."""
    try:
        return Path(_nvidia_tool("ptxas")).is_file() and Path(_nvidia_tool("cuobjdump")).is_file()
    except Exception:  # no nvidia backend at all
        return False


def ptxas_version() -> str:
    out = subprocess.run([_nvidia_tool("ptxas"), "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\S+),", out)
    return match.group(1) if match else "unknown"


@functools.lru_cache(maxsize=None)
def resource_usage(cubin: bytes, count_spill_code: bool = True) -> dict:
    """From cuobjdump: registers per thread, stack frame and local memory (bytes per thread: where
    spilled registers go), static shared memory, and (count_spill_code: disassembling takes most of the
    time) the SASS store/load-local instructions (STL/LDL: the spill code itself), tensor-core
    instructions (HGMMA: Hopper's warpgroup wgmma; HMMA: the warp-level mma.sync of earlier GPUs) and
    the size of each innermost loop (innermost_loop_sizes)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        usage = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", handle.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", handle.name], capture_output=True, text=True,
                              check=True).stdout if count_spill_code else ""
    fields = {key.lower(): int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    if count_spill_code:
        fields["spill_stores"] = len(re.findall(r"\bSTL(?:\.\w+)*\b", sass))
        fields["spill_loads"] = len(re.findall(r"\bLDL(?:\.\w+)*\b", sass))
        fields["hgmma"] = len(re.findall(r"\bHGMMA(?:\.\w+)*\b", sass))
        fields["hmma"] = len(re.findall(r"\bHMMA(?:\.\w+)*\b", sass))
        fields["inner_loops"] = innermost_loops(sass)
    return fields


_LOAD_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def innermost_loops(sass: str) -> list[dict]:
    """Each innermost loop of a disassembly, in address order: its SASS instructions per trip and
    the bytes its global loads (LDG) read per trip, per thread. A loop is a branch back to a lower
    address, [target, branch] its body; innermost = containing no other loop. ptxas may unroll, so
    one trip can be several iterations of the source loop (the load bytes tell how many)."""
    instructions = [(int(address, 16), text)
                    for address, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;\n]+);", sass)]
    loops = set()
    for address, text in instructions:
        target = re.search(r"\bBRA\S*\s+0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address:
            loops.add((int(target.group(1), 16), address))
    found = []
    for start, end in sorted(loops):
        if any(start <= s2 and e2 <= end and (s2, e2) != (start, end) for s2, e2 in loops):
            continue
        body = [text for address, text in instructions if start <= address <= end]
        load_bytes = 0
        for text in body:
            load = re.search(r"\bLDG((?:\.\w+)*)", text)
            if load:
                suffixes = load.group(1).split(".")
                load_bytes += next((_LOAD_BYTES[x] for x in suffixes if x in _LOAD_BYTES), 4)
        found.append({"instructions": len(body), "load_bytes": load_bytes})
    return found


# GroupNorm kernels: how many activation tensors each pass reads (x; x and dy), and the config flag that
# adds a first pass (statistics / channel sums) before the main one
_GROUP_NORM_PASSES = {"_gn_fwd_moments_kernel": (1, None), "_gn_fwd_kernel": (1, "FUSED_STATS"),
                      "_gn_bwd_sums_kernel": (2, None), "_gn_bwd_kernel": (2, "FUSED_SUMS")}


def _x_element_bytes(compiled) -> int:
    """Bytes per element of a kernel's x_ptr argument (2 for '*bf16' / '*fp16', 4 for '*fp32')."""
    signature = getattr(getattr(compiled, "src", None), "signature", None) or {}
    return {"*fp32": 4, "*bf16": 2, "*fp16": 2}.get(str(signature.get("x_ptr")), 2)


def instructions_per_element(kernel: str, config: dict, loops: list[dict], element_bytes: int) -> list | None:
    """For the GroupNorm kernels, each innermost loop's SASS instructions per activation element, for
    the loops that stream the activations (the last one or two that load anything: statistics / sums,
    then the main pass; a trip handles load_bytes / (element_bytes x tensors read) elements per thread);
    None for the other loops (merging partial sums, empty ones). None for other kernels."""
    if kernel not in _GROUP_NORM_PASSES or not loops:
        return None
    tensors, fused_flag = _GROUP_NORM_PASSES[kernel]
    passes = 2 if fused_flag and config.get(fused_flag) else 1
    streaming = [index for index, loop in enumerate(loops) if loop["load_bytes"]][-passes:]
    return [round(loop["instructions"] * element_bytes * tensors / loop["load_bytes"], 1) if index in streaming
            else None for index, loop in enumerate(loops)]


def occupancy(registers: int, shared: int, warps: int, limits: SMLimits) -> int:
    """Resident programs per SM (static estimate)."""
    per_program_registers = -(-max(registers, 1) // 8) * 8 * 32 * warps
    by_registers = limits.registers // per_program_registers
    by_shared = limits.shared_per_sm // (shared + 1024)
    by_warps = limits.max_warps // warps
    return max(0, min(by_registers, by_shared, by_warps, limits.max_programs))


def summarize(compiled: dict, arch: int) -> list[dict]:
    limits = SM_LIMITS[arch]
    rows = []
    for (kernel, _), entry in sorted(compiled.items(), key=lambda item: (item[0][0], str(item[1].meta))):
        usage = resource_usage(entry.compiled.asm["cubin"])
        shared = max(int(entry.compiled.metadata.shared), usage.get("shared", 0))
        warps = int(entry.compiled.metadata.num_warps)
        programs = occupancy(usage.get("reg", 0), shared, warps, limits)
        rows.append({
            "kernel": kernel.strip("_"),
            "config": {k: v for k, v in entry.meta.items() if k not in ("num_warps", "num_stages")},
            "num_warps": warps,
            "num_stages": int(entry.compiled.metadata.num_stages),
            "registers": usage.get("reg", 0),
            "local_bytes": usage.get("local", 0),
            "stack_bytes": usage.get("stack", 0),
            "spill_stores": usage["spill_stores"],
            "spill_loads": usage["spill_loads"],
            "hgmma": usage["hgmma"],
            "hmma": usage["hmma"],
            "shared_bytes": shared,
            "inner_loops": usage["inner_loops"],
            "inner_loop_instructions_per_element": instructions_per_element(
                kernel, entry.meta, usage["inner_loops"], _x_element_bytes(entry.compiled)),
            "programs_per_sm": programs,
            "warp_occupancy": round(programs * warps / limits.max_warps, 3),
            "precisions": sorted(entry.precisions, key=list(PRECISIONS).index),
            "sites": sorted(entry.sites),
        })
    return rows


def warp_mma_rows(rows: list[dict], arch: int) -> list[str]:
    """Notes, not failures: on Hopper, kernels whose tensor-core dots run as warp-level mma.sync
    (HMMA) rather than warpgroup wgmma (HGMMA), the slower path. wgmma needs 64 rows per warpgroup,
    so tiles of 16 or 32 rows (N <= 32) land here by design; a larger tile here is worth a look."""
    if arch < 90:
        return []
    return [f"{row['kernel']} {_config_text(row['config'])} warps={row['num_warps']} "
            f"[{','.join(row['precisions'])}]: {row['hmma']} HMMA, no HGMMA"
            for row in rows if row["hmma"] and not row["hgmma"]]


def problems(rows: list[dict], arch: int) -> list[str]:
    limits = SM_LIMITS[arch]
    found = []
    for row in rows:
        name = f"{row['kernel']} {row['config']} [{','.join(row['precisions'])}]"
        spilled = row["local_bytes"] + row["stack_bytes"]
        if spilled >= SPILL_LIMIT_BYTES:
            found.append(f"{name}: spills ({spilled} bytes of stack and local memory per thread, "
                         f"{row['spill_stores']} STL / {row['spill_loads']} LDL instructions)")
        if row["shared_bytes"] > limits.shared_per_program:
            found.append(f"{name}: needs {row['shared_bytes']} bytes of shared memory > {limits.shared_per_program}")
        if row["programs_per_sm"] < 1:
            found.append(f"{name}: does not fit on one SM")
    return found


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def _commit() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              cwd=REPO, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _config_text(config: dict) -> str:
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in config.items())


def _loops_text(row: dict) -> str:
    """'55, 87 [6.9, 10.9/elem]': SASS instructions per trip of each innermost loop (per element)."""
    text = ", ".join(str(loop["instructions"]) for loop in row.get("inner_loops", [])) or "-"
    per_element = row.get("inner_loop_instructions_per_element")
    if per_element:
        text += " [" + ", ".join("-" if value is None else f"{value:.1f}" for value in per_element) + "/elem]"
    return text


def _sites_text(sites: list[str]) -> str:
    """'B=128 nchw ×5, B=2 channels_last ×1': how many model sites of each recording use the config."""
    counts: dict = {}
    for site in sites:
        parts = site.split(" ")
        label = "contract" if parts[1] == "contract" else " ".join(parts[1:4] if parts[3] == "eval" else parts[1:3])
        counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{label} ×{count}" for label, count in counts.items())


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# Triton kernels compiled offline for {env['target']}",
        "",
        f"Static resources from the cubins (no GPU, nothing launched): triton {env['triton']}, ptxas "
        f"{env['ptxas']}, torch {env['torch']}, commit {env['commit']}, {env['date']}. Sites: the seed UNet's "
        f"training forward + backward and eval forward at {', '.join(report['recorded'])}; "
        f"precisions {', '.join(report['precisions'])}. "
        f"Programs/SM and warp occupancy are static estimates for {env['sm']} "
        f"(registers, shared memory, warp and program limits), not measurements.",
        "",
        "Inner loops: SASS instructions per trip of each innermost loop, per thread (ptxas may unroll a "
        "trip to several iterations), and for the GroupNorm kernels per activation element in brackets "
        "(a trip's elements: the bytes its loads read / element size / tensors read): the issue cost of the "
        "kernels' passes. An SM issues 4 x 32 such thread-instructions per clock.",
        "",
        "| kernel | config | warps | stages | regs | stack B | STL/LDL | HGMMA/HMMA | shared KB | inner loops | "
        "programs/SM | occupancy | precisions | shapes (per recording) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- | --- |",
    ]
    for row in report["kernels"]:
        lines.append(
            f"| {row['kernel']} | {_config_text(row['config'])} | {row['num_warps']} | {row['num_stages']} | "
            f"{row['registers']} | {row['stack_bytes'] + row['local_bytes']} | "
            f"{row['spill_stores']}/{row['spill_loads']} | {row['hgmma']}/{row['hmma']} | "
            f"{row['shared_bytes'] / 1024:.1f} | {_loops_text(row)} | "
            f"{row['programs_per_sm']} | {row['warp_occupancy']:.0%} | {','.join(row['precisions'])} | "
            f"{_sites_text(row['sites'])} |")
    lines += ["", f"Compile failures: {len(report['failures'])}. Problems (spills, shared memory): "
              f"{len(report['problems'])}."]
    for line in report["failures"] + report["problems"]:
        lines.append(f"- {line}")
    notes = report["warp_mma"]
    if notes:
        lines += ["", f"Tensor-core dots on warp-level mma.sync (HMMA) instead of Hopper's wgmma (HGMMA), "
                  f"which needs 64-row tiles (tiles of 16 or 32 rows, for N <= 32, are expected here): {len(notes)}."]
        lines += [f"- {line}" for line in notes]
    lines += ["", f"Reproduce: `{report['command']}`", ""]
    return "\n".join(lines)


def summary_line(report: dict, configurations: int, op_calls: int, arch: int) -> str:
    """The run in one line; the mma.sync-vs-wgmma count only from sm_90 on (before Hopper, mma.sync is
    the only tensor-core path)."""
    return (f"{configurations} kernel configurations compiled for sm_{arch} from {op_calls} op calls in "
            f"{report['seconds']} s; {len(report['failures'])} failed to compile, {len(report['problems'])} problems"
            + (f", {len(report['warp_mma'])} on mma.sync rather than wgmma" if arch >= 90 else ""))


def main(argv=None) -> int:
    from dream.files import folder_problem
    from dream.cli import OneLineErrors
    from dream.model import PRESETS

    parser = OneLineErrors(prog="python3 -m bench.compile_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SM_LIMITS),
                        help="compute capability x10 to compile for (default 90: H100/H200)")
    parser.add_argument("--preset", default="seed", choices=sorted(PRESETS),
                        help="UNet preset whose launches are compiled (default seed)")
    parser.add_argument("--batches", default="128,2",
                        help="batch sizes to record, comma-separated (default 128,2: the trainer's batch and "
                             "a small one that takes the split path)")
    parser.add_argument("--layouts", type=comma_choices("nchw", "channels_last"), default="nchw,channels_last",
                        help="nchw, channels_last or both, comma-separated")
    parser.add_argument("--precisions", type=comma_choices(*PRECISIONS), default="bf16,fp16,fp32",
                        help="any of bf16, fp16, fp32, comma-separated")
    parser.add_argument("--out", default=None,
                        help="output folder (default profiles/sm<arch>-offline/ in the repository)")
    parser.add_argument("--json-only", action="store_true", help="write the JSON report only")
    parser.add_argument("--contract", action="store_true",
                        help="also the kernels' whole contract beyond the UNet's sites (every head dim, N from 1 "
                             "to 4096, the GroupNorm test shapes in both modes); several minutes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("it compiles real kernels: unset TRITON_INTERPRET (it is set to 1)")
    if not ptxas_available():
        parser.error("this Triton has no NVIDIA backend with ptxas; install a CUDA build of triton")

    try:
        batches = [int(b) for b in args.batches.split(",") if b]
        if not batches or min(batches) < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--batches must be positive integers separated by commas, got {args.batches!r}")
    layouts, precisions = args.layouts, args.precisions
    out = Path(args.out) if args.out else REPO / "profiles" / f"sm{args.arch}-offline"
    problem = folder_problem(out)
    if problem:
        parser.error(f"--out: {problem}")

    started = time.time()
    calls, recorded = [], []
    for batch in batches:
        for layout in layouts:
            calls += record_model_calls(args.preset, batch, layout == "channels_last")
            recorded.append(f"B={batch} {layout}")
    if args.contract:
        calls += contract_calls()
        recorded.append("the kernels' contract (attention D 16-128, N 1-4096; GroupNorm test shapes, modes; "
                        "skip upsampling and residual sum test shapes)")
    compiled, failures = compile_calls(calls, precisions, args.arch)
    rows = summarize(compiled, args.arch)
    report = {
        "environment": {
            "target": f"sm_{args.arch}", "sm": SM_LIMITS[args.arch].name, "triton": triton.__version__,
            "ptxas": ptxas_version(), "torch": torch.__version__, "commit": _commit(),
            "date": datetime.date.today().isoformat(), "gpu_used": False,
        },
        "command": "python3 -m bench.compile_report " + " ".join(argv if argv is not None else sys.argv[1:]),
        "recorded": recorded,
        "precisions": precisions,
        "op_calls": len(calls),
        "kernels": rows,
        "failures": failures,
        "problems": problems(rows, args.arch),
        "warp_mma": warp_mma_rows(rows, args.arch),
        "seconds": round(time.time() - started, 1),
    }

    from dream.profile import unique_stem

    stem = unique_stem(out / (f"{report['environment']['date']}-compile-{args.preset}"
                              f"{'-contract' if args.contract else ''}-triton{triton.__version__}"),
                       (".md", ".json")).name  # an earlier report of the day is kept
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    written = [out / f"{stem}.json"]
    if not args.json_only:
        (out / f"{stem}.md").write_text(markdown(report))
        written.append(out / f"{stem}.md")

    print(summary_line(report, len(rows), len(calls), args.arch))
    for line in failures + report["problems"]:
        print(f"  {line}")
    print("wrote " + ", ".join(str(path) for path in written))
    return 1 if failures or report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
