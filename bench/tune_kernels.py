"""Time candidate launch configurations of the Triton kernels at the seed UNet's sites on this GPU,
beside the configuration the heuristics pick, so the heuristics can be set from one measured run.

    python3 -m bench.tune_kernels                          # both kernels, channels_last, quick grid
    python3 -m bench.tune_kernels --grid full --layouts channels_last,nchw --time-limit 900
    python3 -m bench.tune_kernels --allow-cpu              # tiny sizes in the interpreter: checks the tool

Problems: attention over the 16x16 and 8x8 maps (B=128, 8 heads of 64, read in place from the qkv
1x1-conv output as the UNet does) and GroupNorm+scale/shift+SiLU at three ResBlock sites (64x64x128,
16x16x512, 8x8x512), each forward and backward, bf16, in the layouts asked for (the trainer runs
channels_last). For each problem every candidate is first checked against an fp32 eager reference
on the same inputs (relative error within bench.harness's kernel tolerance; a wrong result is
reported and never timed), then timed with CUDA events over about --target-s seconds. The report
gives the heuristic's pick, the fastest candidate, their time ratio, TFLOP/s (attention) or GB/s
(GroupNorm: x, y [, dy, dx] moved once), the top five, and every failure. Problems run in order of
value and the report is rewritten after each one, so a run cut short by --time-limit keeps what it
measured. Output: <out>/<gpu>/<date>-tune.md / .json (default out: profiles/).

Compiling dominates a tuning run, so every candidate is first compiled offline in parallel
(--compile-workers processes replay the launches on meta tensors through bench/compile_report.py's
offline driver for this GPU's architecture, filling Triton's on-disk cache, which the timing run then
reads); a candidate that fails to compile or spills (64 bytes or more per thread) is listed and not
timed, except the heuristic's own pick.

The heuristics live in kernels/attention.py (forward_config, backward_config) and
kernels/group_norm_silu.py (_launch_config); bench/compile_report.py shows registers and spills of a
configuration without a GPU. The candidates come from kernels/attention.py (forward_candidates,
backward_candidates) and kernels/group_norm_silu.py (launch_candidates): the ones the run-time
autotuner (kernels/autotune.py, DREAM_KERNEL_AUTOTUNE=1) tries at first use of each problem. A GroupNorm
candidate whose tile holds a whole block (block_c >= groups x channels per group, block_hw >= H*W) runs
the kernels' resident path (marked "(resident)" in the report): each element read once, where other
tiles read it twice.
"""
from __future__ import annotations

import importlib
import itertools
import json
import os
import pathlib
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

COMPILE_ONLY_ENV = "DREAM_TUNE_COMPILE_ONLY"  # set for the precompile workers: they compile, never interpret

# The interpreter when there is no GPU, except in a compile-only worker (see precompile).
if not torch.cuda.is_available() and os.environ.get(COMPILE_ONLY_ENV) != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels are imported

ON_GPU = torch.cuda.is_available()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# most valuable first
SITE_ORDER = ["attn16", "res64", "res64_drop", "attn8", "res16", "mid8", "attn4", "c48_7x5", "c48_7x5_drop"]
TUNE_DROPOUT_SEED = 0x7E57_0DD5


@dataclass(frozen=True)
class Setting:
    device: torch.device   # cuda (timing), cpu (the interpreter) or meta (compile-only workers)
    full: bool             # the seed UNet's sizes in bf16 (a GPU); else tiny fp32 sizes (the interpreter)
    grid: str              # quick | full

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.full else torch.float32

    def randn(self, *shape, generator, dtype=None, scale=1.0, offset=0.0) -> torch.Tensor:
        dtype = dtype or self.dtype
        if self.device.type == "meta":  # shapes only: no values to draw
            return torch.empty(shape, device="meta", dtype=dtype)
        return (torch.randn(shape, generator=generator) * scale + offset).to(self.device, dtype)


@dataclass
class Problem:
    kernel: str                        # "attention" | "group_norm"
    name: str                          # "attn16 fwd channels_last"
    heuristic: object                  # the config the heuristics pick
    candidates: list
    run: Callable[[object], tuple]     # config -> outputs (the same order as reference)
    reference: tuple
    work: float                        # FLOPs (attention) or bytes (GroupNorm) per call
    unit: str                          # "TFLOP/s" | "GB/s"
    results: list = field(default_factory=list)
    static: dict = field(default_factory=dict)  # config key -> offline compile facts (precompile)
    whole_block: Callable[[object], bool] | None = None  # GroupNorm: the config's tile holds a whole block


def config_key(config) -> str:
    return json.dumps(_as_dict(config), sort_keys=True)


def _as_dict(config) -> dict | str:
    return asdict(config) if hasattr(config, "__dataclass_fields__") else config


# ------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------
def _attention_candidates(seq_len: int, direction: str, setting: Setting, heuristic) -> list:
    att = importlib.import_module("kernels.attention")
    candidates = att.forward_candidates if direction == "fwd" else att.backward_candidates
    return candidates(seq_len, heuristic, setting.grid if setting.full else "minimal", setting.dtype)


def attention_problems(setting: Setting, batch, channels, heads, sizes, layouts) -> list[Problem]:
    att = importlib.import_module("kernels.attention")  # the package binds `attention` to the function
    dtype, device = setting.dtype, setting.device
    problems = []
    for (label, size), layout in itertools.product(sizes, layouts):
        g = torch.Generator(device="cpu").manual_seed(size)
        qkv = setting.randn(batch, 3 * channels, size, size, generator=g)
        dout = setting.randn(batch, channels, size, size, generator=g)
        if layout == "channels_last":
            qkv = qkv.contiguous(memory_format=torch.channels_last)
            dout = dout.contiguous(memory_format=torch.channels_last)
        seq_len, head_dim = size * size, channels // heads
        scale = head_dim ** -0.5
        q, k, v = att._qkv_nchw_views(qkv, heads)
        leaf = qkv.detach().float().requires_grad_(True)
        ref_out = att.attention_qkv_nchw_reference(leaf, heads, scale)
        (ref_dqkv,) = torch.autograd.grad(ref_out, leaf, dout.float())
        memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        out = torch.empty(batch, channels, size, size, device=device, dtype=dtype, memory_format=memory_format)
        lse = torch.empty(batch, heads, seq_len, device=device, dtype=torch.float32)
        att._attention_forward_into(q, k, v, scale, att._nchw_as_heads(out, heads), lse)
        fwd_flops = 4.0 * batch * heads * seq_len * seq_len * head_dim

        def run_forward(config, q=q, k=k, v=v, scale=scale, batch=batch, size=size, memory_format=memory_format):
            # the output in qkv's layout, as attention_qkv_nchw allocates it
            o = torch.empty(batch, channels, size, size, device=device, dtype=dtype,
                            memory_format=memory_format).fill_(float("nan"))
            lse_ = torch.empty(batch, heads, size * size, device=device, dtype=torch.float32)
            att._attention_forward_into(q, k, v, scale, att._nchw_as_heads(o, heads), lse_, config)
            return (o,)

        def run_backward(config, qkv=qkv, out=out, lse=lse, dout=dout, scale=scale):
            dqkv = torch.empty_like(qkv).fill_(float("nan"))  # in qkv's layout, as the backward op allocates it
            q_, k_, v_ = att._qkv_nchw_views(qkv, heads)
            dq, dk, dv = att._qkv_nchw_views(dqkv, heads)
            att._attention_backward_into(q_, k_, v_, att._nchw_as_heads(out, heads), lse,
                                         att._nchw_as_heads(dout, heads), scale, dq, dk, dv, config)
            return (dqkv,)

        fwd_heuristic = att.forward_config(seq_len, head_dim, dtype)
        bwd_heuristic = att.backward_config(seq_len, head_dim, dtype)
        problems.append(Problem("attention", f"{label} fwd {layout}", fwd_heuristic,
                                _attention_candidates(seq_len, "fwd", setting, fwd_heuristic), run_forward,
                                (ref_out.detach(),), fwd_flops, "TFLOP/s"))
        problems.append(Problem("attention", f"{label} bwd {layout}", bwd_heuristic,
                                _attention_candidates(seq_len, "bwd", setting, bwd_heuristic), run_backward,
                                (ref_dqkv,), 2.5 * fwd_flops, "TFLOP/s"))
    return problems


# ------------------------------------------------------------------------------------------------
# GroupNorm + scale/shift + SiLU
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupNormConfig:
    block_c: int
    block_hw: int
    num_warps: int
    groups: int = 1  # adjacent groups per program (channels_last, power-of-two channels per group)
    programs_per_sm: int = 0  # a grid capped at this many programs per SM, looping over blocks (0: no cap)


def _group_norm_candidates(channels_per_group, num_groups, hw, contiguous_channels, setting: Setting, heuristic,
                           min_hw=1, backward=False) -> list:
    """kernels.group_norm_silu.launch_candidates as GroupNormConfigs (the heuristic first)."""
    gns = importlib.import_module("kernels.group_norm_silu")
    configs = gns.launch_candidates(channels_per_group, num_groups, hw, contiguous_channels, asdict(heuristic),
                                    setting.grid if setting.full else "minimal", min_hw, backward)
    return [GroupNormConfig(**c) for c in configs]


def group_norm_problems(setting: Setting, sites, groups, layouts) -> list[Problem]:
    gns = importlib.import_module("kernels.group_norm_silu")  # the package binds `group_norm_silu` to a function
    problems = []
    for (label, n, c, h, w, dropout_p), layout in itertools.product(sites, layouts):
        g = torch.Generator(device="cpu").manual_seed(c * h)
        x = setting.randn(n, c, h, w, generator=g, scale=1.5, offset=0.3)
        dy = setting.randn(n, c, h, w, generator=g)
        if layout == "channels_last":
            x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
        weight = setting.randn(c, generator=g, dtype=torch.float32, scale=0.2, offset=1.0)
        bias = setting.randn(c, generator=g, dtype=torch.float32, scale=0.2)
        scale = setting.randn(n, c, generator=g, scale=0.3)
        shift = setting.randn(n, c, generator=g, scale=0.3)
        seed = torch.tensor([TUNE_DROPOUT_SEED], device=x.device) if dropout_p else None
        y, mean, rstd = gns._forward(x, weight, bias, scale, shift, groups, 1e-5, "pre", True, dropout_p, seed)
        leaves = [t.detach().float().requires_grad_(True) for t in (x, weight, bias, scale, shift)]
        ref_y = gns.group_norm_silu_reference(*leaves[:3], groups, 1e-5, scale=leaves[3], shift=leaves[4])
        if dropout_p and x.device.type != "meta":  # the kernels' mask, computed independently (meta: compile only)
            keep = gns.dropout_keep_mask(seed, x.shape, dropout_p, layout == "channels_last")
            ref_y = ref_y * (keep.to(x.device).float() * gns.dropout_scale(dropout_p))
        ref_grads = torch.autograd.grad(ref_y, leaves, dy.float())

        def launch(config, fn):
            previous = gns._LAUNCH_OVERRIDE
            sms = gns._sm_count(x.device) if x.device.type == "cuda" else 1
            gns._LAUNCH_OVERRIDE = {"block_c": config.block_c, "block_hw": config.block_hw,
                                    "num_warps": config.num_warps, "groups": config.groups,
                                    "programs": config.programs_per_sm * sms}
            try:
                return fn()
            finally:
                gns._LAUNCH_OVERRIDE = previous

        def run_forward(config, x=x, weight=weight, bias=bias, scale=scale, shift=shift, dropout_p=dropout_p,
                        seed=seed):
            return launch(config, lambda: gns._forward(x, weight, bias, scale, shift, groups, 1e-5, "pre", True,
                                                        dropout_p, seed)[:1])

        def run_backward(config, x=x, dy=dy, weight=weight, bias=bias, scale=scale, shift=shift, mean=mean,
                         rstd=rstd, dropout_p=dropout_p, seed=seed):
            return launch(config, lambda: gns._backward(dy, x, weight, bias, scale, shift, mean, rstd, groups, 1e-5,
                                                         "pre", True, dropout_p, seed))

        contiguous_channels = x.stride(1) == 1 and c // groups > 1
        tensor_bytes = x.numel() * x.element_size()
        dropout_axis = gns._dropout_axis(dropout_p, gns.memory_format_of(x))
        for direction, backward in (("fwd", False), ("bwd", True)):
            picked = gns._launch_config(n, c, h * w, groups, x.stride(1), x.device, backward=backward,
                                        dropout=dropout_axis)
            heuristic = GroupNormConfig(picked.block_c, picked.block_hw, picked.num_warps, picked.groups)
            candidates = _group_norm_candidates(c // groups, groups, h * w, contiguous_channels, setting,
                                                heuristic, min_hw=8 if dropout_p and layout == "nchw" else 1,
                                                backward=backward)

            def whole_block(config, n=n, c=c, hw=h * w, stride_c=x.stride(1), device=x.device, backward=backward,
                            axis=dropout_axis):
                return gns._launch_config(n, c, hw, groups, stride_c, device, backward, axis,
                                          override=asdict(config)).resident

            if direction == "fwd":
                problems.append(Problem("group_norm", f"{label} fwd {layout}", heuristic, candidates, run_forward,
                                        (ref_y.detach(),), 2.0 * tensor_bytes, "GB/s", whole_block=whole_block))
            else:
                problems.append(Problem("group_norm", f"{label} bwd {layout}", heuristic, candidates, run_backward,
                                        tuple(t.detach() for t in ref_grads), 3.0 * tensor_bytes, "GB/s",
                                        whole_block=whole_block))
    return problems


def build_problems(setting: Setting, kernels_asked, layouts) -> list[Problem]:
    """The problems in order of value: the 16x16 attention and the 64x64 GroupNorm first."""
    from dream.model import PRESETS

    if setting.full:
        batch = 128
        attention_sizes, attention_shape = [("attn16", 16), ("attn8", 8)], (512, 8)  # 8 heads of 64
        # the ResBlock's second norm at 64x64 also as in training, with dropout 0.1 fused
        gn_sites = [("res64", batch, 128, 64, 64, 0.0), ("res64_drop", batch, 128, 64, 64, 0.1),
                    ("res16", batch, 512, 16, 16, 0.0), ("mid8", batch, 512, 8, 8, 0.0)]
        groups = PRESETS["seed"].num_groups
    else:
        batch = 1
        attention_sizes, attention_shape = [("attn4", 4)], (64, 2)  # 2 heads of 32
        gn_sites, groups = [("c48_7x5", 1, 48, 7, 5, 0.0), ("c48_7x5_drop", 1, 48, 7, 5, 0.2)], 8
    problems = []
    if "attention" in kernels_asked:
        problems += attention_problems(setting, batch, *attention_shape, attention_sizes, layouts)
    if "group_norm" in kernels_asked:
        problems += group_norm_problems(setting, gn_sites, groups, layouts)
    return sorted(problems, key=lambda p: (SITE_ORDER.index(p.name.split()[0]), layouts.index(p.name.split()[2]),
                                           ("fwd", "bwd").index(p.name.split()[1])))


# ------------------------------------------------------------------------------------------------
# Compiling every candidate first, in parallel and offline (no GPU, no launch)
# ------------------------------------------------------------------------------------------------
def compile_share(setting: Setting, kernels_asked, layouts, arch: int, sms: int, share: int, shares: int,
                  progress: Callable[[str], None] = lambda line: None) -> dict:
    """Compile candidates share, share + shares, ... (in the problems' order) for sm_<arch> into Triton's
    on-disk cache, as compile_report does; returns {problem: {"heuristic": config key, "candidates":
    {config key: facts}}} with, per candidate, the registers and spilled bytes of each kernel it launches,
    or the compile error. `progress` gets "total N" (this share's candidates) first, then "done 1" per candidate."""
    from bench.compile_report import first_line, offline_compilation, resource_usage

    facts: dict = {}
    with offline_compilation(arch, sms) as (compiled, context):
        problems = build_problems(setting, kernels_asked, layouts)
        mine = [index % shares == share for index in range(1, 1 + sum(len(p.candidates) for p in problems))]
        progress(f"total {sum(mine)}")
        index = 0
        for problem in problems:
            for config in problem.candidates:
                index += 1
                if not mine[index - 1]:
                    continue
                context["launched"] = []
                entry: dict = {}
                try:
                    problem.run(config)
                    entry["kernels"] = {}
                    for key in dict.fromkeys(context["launched"]):
                        usage = resource_usage(compiled[key].compiled.asm["cubin"], count_spill_code=False)
                        entry["kernels"][key[0].strip("_")] = {
                            "registers": usage.get("reg", 0),
                            "spilled_bytes": usage.get("stack", 0) + usage.get("local", 0)}
                except Exception as error:  # reported beside the candidate; the GPU run skips it
                    entry["error"] = first_line(error)[:200]
                facts.setdefault(problem.name, {"heuristic": config_key(problem.heuristic), "candidates": {}})
                facts[problem.name]["candidates"][config_key(config)] = entry
                progress("done 1")
    return facts


def target_gpu(arch: int | None = None) -> tuple[int, int]:
    """(compute capability x10, SM count): this GPU's, else `arch` (default 90) with its reference part's."""
    from bench.compile_report import SM_LIMITS

    if ON_GPU and arch is None:
        major, minor = torch.cuda.get_device_capability()
        return 10 * major + minor, torch.cuda.get_device_properties(0).multi_processor_count
    arch = arch or 90
    if arch not in SM_LIMITS:
        raise SystemExit(f"bench.tune_kernels: no SM limits for sm_{arch} (known: {sorted(SM_LIMITS)})")
    return arch, SM_LIMITS[arch].sms


def compile_in_workers(full: bool, grid: str, kernels_asked, layouts, arch: int, sms: int, workers: int) -> dict:
    """Every candidate compiled offline by `workers` processes (meta tensors, offline driver, Triton's
    on-disk cache filled on the way); returns the merged facts of compile_share."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env[COMPILE_ONLY_ENV] = "1"
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    spec = json.dumps({"full": full, "grid": grid, "kernels": kernels_asked, "layouts": layouts,
                       "arch": arch, "sms": sms, "shares": workers})
    errors = [tempfile.TemporaryFile() for _ in range(workers)]
    try:
        processes = [subprocess.Popen([sys.executable, "-m", "bench.tune_kernels", "--compile-share", str(share),
                                       spec], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=errors[share],
                                      text=True)
                     for share in range(workers)]
        return collect_shares(processes, errors)
    finally:
        for handle in errors:
            handle.close()


def collect_shares(processes: list, errors: list) -> dict:
    """The compile workers' facts merged, with a progress bar on stderr fed by their "total N" / "done N"
    lines (stdout); a worker's last other line is its JSON facts. A failed worker is named in one line with
    the last line of its stderr (`errors`: one binary file per worker)."""
    import threading

    from tqdm import tqdm

    bar = tqdm(total=0, desc="compiling candidates offline", unit="candidate", file=sys.stderr, mininterval=1.0)
    lock = threading.Lock()
    results: list = [None] * len(processes)
    totals: list = []  # the bar shows a total once every worker has given its own

    def read(index, process):
        last = ""
        for line in process.stdout:
            kind, _, count = line.strip().partition(" ")
            if kind in ("total", "done") and count.isdigit():
                with lock:
                    if kind == "total":
                        totals.append(int(count))
                        if len(totals) == len(processes):
                            bar.total = sum(totals)
                            bar.refresh()
                    else:
                        bar.update(int(count))
            elif line.strip():
                last = line
        results[index] = (process.wait(), last)

    threads = [threading.Thread(target=read, args=item, daemon=True) for item in enumerate(processes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    bar.close()
    merged: dict = {}
    for (code, last), error in zip(results, errors):
        if code != 0:
            error.seek(0)
            lines = error.read().decode(errors="replace").strip().splitlines()
            print(f"compile worker failed ({code}): {lines[-1] if lines else ''}", file=sys.stderr)
            continue
        try:
            facts = json.loads(last)
        except ValueError:  # exited 0 without its JSON line (cut short): as failed
            print(f"compile worker printed no result: {last[:80]!r}", file=sys.stderr)
            continue
        for name, entry in facts.items():
            merged.setdefault(name, {"heuristic": entry["heuristic"], "candidates": {}})
            merged[name]["candidates"].update(entry["candidates"])
    return merged


def precompile(problems: list[Problem], setting: Setting, kernels_asked, layouts, workers: int) -> float:
    """Compile every candidate offline first, so the timing run finds them in Triton's cache, and attach
    the facts to each problem; returns the seconds taken."""
    from bench.compile_report import ptxas_available

    if workers < 1 or not ptxas_available():
        return 0.0
    started = time.monotonic()
    facts = compile_in_workers(setting.full, setting.grid, kernels_asked, layouts, *target_gpu(), workers)
    for problem in problems:
        problem.static.update(facts.get(problem.name, {}).get("candidates", {}))
    return time.monotonic() - started


def static_markdown(report: dict) -> str:
    lines = [f"# Kernel launch candidates compiled offline for sm_{report['arch']} (no GPU, nothing timed)", "",
             f"triton {report['triton']}, ptxas {report.get('ptxas')}, torch {report.get('torch')}, commit "
             f"{report.get('commit')}, {report['date']}; grid `{report['grid']}`, layouts "
             f"{', '.join(report['layouts'])}, bf16 at the seed UNet's sites (batch 128); {report['candidates']} "
             f"candidates in {report['seconds']} s with {report['workers']} processes. A candidate that spills "
             f"(64 bytes or more per thread) or fails to compile is not timed by a GPU run.", "",
             "| problem | candidates | not timeable | heuristic's pick | its registers (spilled B) |",
             "| --- | ---: | ---: | --- | --- |"]
    for name, entry in report["problems"].items():
        heuristic = entry["candidates"].get(entry["heuristic"], {})
        kernels = ", ".join(f"{k} {v['registers']} ({v['spilled_bytes']})"
                            for k, v in heuristic.get("kernels", {}).items()) or heuristic.get("error", "—")
        bad = [key for key, facts in entry["candidates"].items() if static_verdict(facts)]
        lines.append(f"| {name} | {len(entry['candidates'])} | {len(bad)} | "
                     f"{_config_text(json.loads(entry['heuristic']))} | {kernels} |")
    lines += ["", "## Not timeable", ""]
    verdicts = [f"- {name}: {_config_text(json.loads(key))}: {verdict}"
                for name, entry in report["problems"].items() for key, facts in entry["candidates"].items()
                if (verdict := static_verdict(facts))]
    lines += verdicts or ["None: every candidate compiled, none spilling."]
    lines += ["", f"Reproduce: `{report['command']}`", ""]
    return "\n".join(lines)


def static_only(args, argv, parser) -> int:
    """--static-only: compile every candidate of the GPU grid offline and report, without a GPU."""
    import datetime

    import triton

    from bench.compile_report import _commit, ptxas_available, ptxas_version
    from dream.files import folder_problem

    if not ptxas_available():
        parser.error("--static-only: this Triton has no NVIDIA backend with ptxas")
    arch, sms = target_gpu(args.arch)
    folder = os.path.join(args.out or os.path.join(REPO, "profiles"), f"sm{arch}-offline")
    problem = folder_problem(folder)
    if problem:
        parser.error(f"--out: {problem}")
    started = time.monotonic()
    workers = max(1, args.compile_workers)
    facts = compile_in_workers(True, args.grid, args.only, args.layouts, arch, sms, workers)
    report = {"arch": arch, "sms": sms, "triton": triton.__version__, "ptxas": ptxas_version(),
              "torch": torch.__version__, "commit": _commit(), "date": datetime.date.today().isoformat(),
              "grid": args.grid, "layouts": args.layouts, "workers": workers,
              "candidates": sum(len(e["candidates"]) for e in facts.values()),
              "seconds": round(time.monotonic() - started, 1), "problems": facts,
              "command": "python3 -m bench.tune_kernels " + " ".join(argv)}
    from dream.profile import unique_stem

    name = f"{report['date']}-tune-static-{args.grid}-triton{triton.__version__}"
    stem = str(unique_stem(pathlib.Path(folder) / name, (".md", ".json")))  # an earlier report of the day is kept
    with open(stem + ".json", "w") as handle:
        json.dump(report, handle, indent=1)
    with open(stem + ".md", "w") as handle:
        handle.write(static_markdown(report))
    bad = sum(1 for e in facts.values() for f in e["candidates"].values() if static_verdict(f))
    heuristic_bad = [name for name, e in facts.items() if static_verdict(e["candidates"].get(e["heuristic"]))]
    print(f"{report['candidates']} candidates compiled for sm_{arch} in {report['seconds']} s: {bad} not timeable"
          + (f"; the heuristic's pick spills or fails for {', '.join(heuristic_bad)}" if heuristic_bad else ""))
    print(f"wrote {stem}.md and .json")
    return 1 if heuristic_bad else 0


# ------------------------------------------------------------------------------------------------
# Checking and timing
# ------------------------------------------------------------------------------------------------
def seconds_per_call(fn, target_s: float) -> float:
    """Median over five rounds of (round time / calls per round), rounds of ~target_s/5."""
    from bench.harness import median_time, sync

    fn()
    sync()
    tick = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - tick, 1e-6)
    calls = max(1, min(1000, int(target_s / 5 / once)))

    def one_round():
        for _ in range(calls):
            fn()

    return median_time(one_round, reps=5, warmup=0) / calls


def static_verdict(facts: dict | None) -> str | None:
    """Why a candidate is not worth timing, from its offline compile (None: time it)."""
    if not facts:
        return None
    if "error" in facts:
        return f"failed to compile: {facts['error']}"
    spilled = {name: k["spilled_bytes"] for name, k in facts.get("kernels", {}).items() if k["spilled_bytes"] >= 64}
    if spilled:
        return "spills (offline compile): " + ", ".join(f"{name} {b} B/thread" for name, b in spilled.items())
    return None


def measure(problem: Problem, target_s: float, deadline: float, dtype: torch.dtype) -> None:
    """Check, then time, each candidate; the heuristic's pick is always tried."""
    from bench.compile_report import first_line
    from bench.harness import relative_error, tolerance

    tol = tolerance("kernel", dtype)
    for config in problem.candidates:
        entry = {"config": _as_dict(config), "heuristic": config == problem.heuristic,
                 "resident": bool(problem.whole_block and problem.whole_block(config))}
        facts = problem.static.get(config_key(config))
        if facts and "kernels" in facts:
            entry["static"] = facts["kernels"]
        verdict = static_verdict(facts)
        if time.monotonic() > deadline:
            entry["status"] = "not run (time limit)"
            problem.results.append(entry)
            continue
        if verdict and not entry["heuristic"]:
            entry["status"] = f"not timed: {verdict}"
            problem.results.append(entry)
            continue
        try:
            outputs = problem.run(config)
            errors = [relative_error(o, r) for o, r in zip(outputs, problem.reference)]
            entry["max_rel_error"] = max(errors)
            if not max(errors) <= tol:
                entry["status"] = f"wrong (relative error {max(errors):.3g} > {tol:g})"
            else:
                seconds = seconds_per_call(lambda: problem.run(config), target_s)
                entry.update(status="ok", us=seconds * 1e6,
                             rate=problem.work / seconds / (1e12 if problem.unit == "TFLOP/s" else 1e9))
        except Exception as error:  # a config that does not compile or launch: reported, not fatal
            entry["status"] = f"failed: {first_line(error)[:200]}"
        problem.results.append(entry)


def summary(problem: Problem) -> dict:
    timed = sorted((r for r in problem.results if r.get("status") == "ok"), key=lambda r: r["us"])
    picked = next((r for r in problem.results if r.get("heuristic")), None)
    best = timed[0] if timed else None
    return {
        "problem": problem.name, "kernel": problem.kernel, "unit": problem.unit,
        "heuristic": picked, "best": best,
        "heuristic_over_best": (picked["us"] / best["us"]) if picked and best and picked.get("us") else None,
        "top5": timed[:5],
        "problems": [r for r in problem.results if r.get("status") not in ("ok", None)],
        "candidates": len(problem.candidates),
    }


def one_line(s: dict) -> str:
    def timed(entry):
        if not entry:
            return "—"
        cost = f"{entry['us']:.1f} µs" if "us" in entry else entry.get("status", "")
        return f"{_config_text(entry['config'], entry.get('resident'))} {cost}"

    ratio = s["heuristic_over_best"]
    return (f"{s['problem']}: heuristic {timed(s['heuristic'])}; best {timed(s['best'])}"
            + (f"; heuristic/best {ratio:.2f}" if ratio else ""))


def _config_text(config: dict, resident: bool = False) -> str:
    """A configuration as k=v pairs; "(resident)": a GroupNorm tile holding its whole block (x read once)."""
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in config.items()) + (
        " (resident)" if resident else "")


def markdown(report: dict) -> str:
    env = report["environment"]
    on_gpu = env.get("device_type") == "cuda"
    label = "GPU" if on_gpu else "CPU: the interpreter, whose times say nothing about speed"
    driver = f", driver {env['driver']}" if env.get("driver") else ""
    lines = [f"# Kernel launch configurations timed at the seed UNet's sites ({label})", "",
             f"{env.get('device_name', env.get('device_type'))}{driver}, torch {env.get('torch')}, "
             f"triton {env.get('triton')}, commit {env.get('git_commit')}, {env.get('date')}; grid `{report['grid']}`, "
             f"layouts "
             f"{', '.join(report['layouts'])}, {report['dtype']}. Each candidate checked against fp32 eager before "
             f"timing ({'CUDA events' if env.get('device_type') == 'cuda' else 'wall clock'}, median of 5 rounds).", "",
             "| problem | heuristic | µs | best | µs | heuristic / best | best rate | candidates (failed) |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for s in report["summaries"]:
        h, b = s["heuristic"] or {}, s["best"] or {}
        ratio = f"{s['heuristic_over_best']:.2f}" if s["heuristic_over_best"] else "—"
        rate = (f"{b['rate']:.1f} {s['unit']}" if on_gpu else "n/a (CPU)") if b.get("rate") else "—"
        lines.append(f"| {s['problem']} | {_config_text(h.get('config', {}), h.get('resident'))} | "
                     f"{h.get('us', float('nan')):.1f} | {_config_text(b.get('config', {}), b.get('resident'))} | "
                     f"{b.get('us', float('nan')):.1f} | {ratio} | {rate} | "
                     f"{s['candidates']} ({len(s['problems'])}) |")
    lines += ["", "## Top five per problem", ""]
    for s in report["summaries"]:
        lines.append(f"- **{s['problem']}**: " + "; ".join(
            f"{_config_text(r['config'], r.get('resident'))} {r['us']:.1f} µs" for r in s["top5"]))
        for r in s["problems"]:
            lines.append(f"  - {_config_text(r['config'], r.get('resident'))}: {r['status']}")
    lines += ["", f"Reproduce: `{report['command']}`", ""]
    return "\n".join(lines)


def _compile_share_main(share: str, spec: str) -> int:
    """The precompile worker: compile one share of the candidates, print the facts as one JSON line."""
    spec = json.loads(spec)
    setting = Setting(torch.device("meta"), spec["full"], spec["grid"])
    facts = compile_share(setting, spec["kernels"], spec["layouts"], spec["arch"], spec["sms"], int(share),
                          spec["shares"], progress=lambda line: print(line, flush=True))
    print(json.dumps(facts))
    return 0


def main(argv=None) -> int:
    from bench.gpu_suite import number
    from dream.files import folder_problem
    from bench.harness import comma_choices
    from dream.cli import OneLineErrors

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--compile-share"]:
        return _compile_share_main(*argv[1:3])
    parser = OneLineErrors(prog="python3 -m bench.tune_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", type=comma_choices("attention", "group_norm"), default="attention,group_norm",
                        help="attention, group_norm or both, comma-separated")
    parser.add_argument("--layouts", type=comma_choices("channels_last", "nchw"), default="channels_last",
                        help="channels_last, nchw or both, comma-separated")
    parser.add_argument("--grid", choices=("quick", "full"), default="quick", help="candidate grid (default quick)")
    parser.add_argument("--target-s", type=number(float, 0, strict=True), default=0.05,
                        help="timed seconds per candidate (default 0.05)")
    parser.add_argument("--time-limit", type=number(float, 0, strict=True), default=600.0,
                        help="seconds; candidates not started by then are listed as not run (default 600)")
    parser.add_argument("--compile-workers", type=number(int, 0), default=min(16, os.cpu_count() or 1),
                        help="processes that compile every candidate offline first (default: one per CPU, at "
                             "most 16; 0: compile each candidate when it is first run)")
    parser.add_argument("--out", default=None, help="report root (default profiles/); <out>/<gpu>/<date>-tune.md")
    parser.add_argument("--allow-cpu", action="store_true", help="without a GPU: tiny sizes in the interpreter")
    parser.add_argument("--static-only", action="store_true",
                        help="no GPU needed: compile every candidate of the GPU grid offline and report registers "
                             "and spills (<out>/sm<arch>-offline/<date>-tune-static-<grid>-triton<version>.md)")
    parser.add_argument("--arch", type=int, default=None,
                        help="with --static-only: compute capability x10 (default: this GPU's, else 90)")
    args = parser.parse_args(argv)
    if args.arch is not None and not args.static_only:
        parser.error("--arch is for --static-only (a timing run measures the GPU it runs on)")
    from bench.compile_report import SM_LIMITS

    if args.arch is not None and args.arch not in SM_LIMITS:
        parser.error(f"--arch {args.arch}: no SM limits for sm_{args.arch} (known: {sorted(SM_LIMITS)})")
    if args.static_only:
        return static_only(args, argv, parser)
    if not ON_GPU and not args.allow_cpu:
        parser.error("no CUDA device here; pass --allow-cpu to check the tool at tiny sizes in the interpreter")

    from dream.profile import device_slug, environment_info, report_stem, unique_stem

    setting = Setting(torch.device("cuda" if ON_GPU else "cpu"), full=ON_GPU, grid=args.grid)
    info = environment_info(setting.device)
    out = args.out or os.path.join(REPO, "profiles")
    problem = folder_problem(os.path.join(out, device_slug(info)))
    if problem:
        parser.error(f"--out: {problem}")
    stem = unique_stem(report_stem(out, info, "tune"), (".md", ".json"))  # an earlier report of the day is kept

    started = time.monotonic()
    deadline = started + args.time_limit
    problems = build_problems(setting, args.only, args.layouts)
    precompile_s = precompile(problems, setting, args.only, args.layouts, args.compile_workers)

    report = {"environment": info, "grid": args.grid, "layouts": args.layouts,
              "dtype": str(setting.dtype).replace("torch.", ""), "precompile_s": round(precompile_s, 1),
              "command": "python3 -m bench.tune_kernels " + " ".join(argv), "summaries": []}
    for problem in problems:
        measure(problem, args.target_s, deadline, setting.dtype)
        report["summaries"].append(summary(problem))
        report["seconds"] = round(time.monotonic() - started, 1)
        stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        stem.with_suffix(".md").write_text(markdown(report))
        print(one_line(report["summaries"][-1]), flush=True)
    print(f"wrote {stem.with_suffix('.md')} and .json in {report.get('seconds', 0)} s "
          f"(offline precompile {precompile_s:.0f} s)")
    wrong = [p for s in report["summaries"] for p in s["problems"] if p["status"].startswith("wrong")]
    heuristic_failed = [s["problem"] for s in report["summaries"]
                        if not (s["heuristic"] and s["heuristic"].get("status") == "ok")
                        and not (s["heuristic"] or {}).get("status", "").startswith("not run")]
    for line in heuristic_failed:
        print(f"the heuristic's own configuration failed for {line}", file=sys.stderr)
    return 1 if wrong or heuristic_failed else 0


if __name__ == "__main__":
    sys.exit(main())
