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

The heuristics live in kernels/attention.py (forward_config, backward_config) and
kernels/group_norm_silu.py (_launch_config); bench/compile_report.py shows registers and spills of a
configuration without a GPU.
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels are imported

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


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


# ------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------
def _attention_candidates(seq_len: int, direction: str, grid: str, heuristic) -> list:
    from kernels.attention import BackwardConfig, ForwardConfig, _pow2_at_least

    tile = _pow2_at_least(seq_len)
    quick = grid == "quick"
    blocks = [b for b in (16, 32, 64, 128) if b <= max(tile, 16)]
    if direction == "fwd":
        stages = (3,) if quick else (2, 3, 4)
        configs = [ForwardConfig(m, n, w, s) for m, n, w, s in
                   itertools.product([b for b in blocks if b >= 32] or blocks, [b for b in blocks if b >= 32] or blocks,
                                     (4, 8), stages)]
    else:
        stages = (2,) if quick else (1, 2, 3)
        configs = [BackwardConfig(False, own, loop, w, s) for own, loop, w, s in
                   itertools.product([b for b in blocks if b >= 32] or blocks, [b for b in blocks if b <= 64],
                                     (4, 8), stages) if loop <= own]
        if tile <= 64:
            configs += [BackwardConfig(True, tile, tile, w, s) for w, s in itertools.product((4, 8), (1, 2))]
    if not ON_GPU:  # the interpreter: the heuristic and one other candidate are enough to check the tool
        configs = [c for c in configs if c != heuristic][:1]
    return [heuristic] + [c for c in configs if c != heuristic]


def attention_problems(batch, channels, heads, sizes, dtype, layouts, grid) -> list[Problem]:
    att = importlib.import_module("kernels.attention")  # the package binds `attention` to the function
    problems = []
    for (label, size), layout in itertools.product(sizes, layouts):
        g = torch.Generator(device="cpu").manual_seed(size)
        qkv = torch.randn(batch, 3 * channels, size, size, generator=g).to(DEVICE, dtype)
        dout = torch.randn(batch, channels, size, size, generator=g).to(DEVICE, dtype)
        if layout == "channels_last":
            qkv = qkv.contiguous(memory_format=torch.channels_last)
            dout = dout.contiguous(memory_format=torch.channels_last)
        seq_len, head_dim = size * size, channels // heads
        scale = head_dim ** -0.5
        q, k, v = att._qkv_nchw_views(qkv, heads)
        leaf = qkv.detach().float().requires_grad_(True)
        ref_out = att.attention_qkv_nchw_reference(leaf, heads, scale)
        (ref_dqkv,) = torch.autograd.grad(ref_out, leaf, dout.float())
        out = torch.empty(batch, channels, size, size, device=DEVICE, dtype=dtype)
        lse = torch.empty(batch, heads, seq_len, device=DEVICE, dtype=torch.float32)
        att._attention_forward_into(q, k, v, scale, att._nchw_as_heads(out, heads), lse)
        fwd_flops = 4.0 * batch * heads * seq_len * seq_len * head_dim

        def run_forward(config, q=q, k=k, v=v, scale=scale, batch=batch, size=size):
            o = torch.full((batch, channels, size, size), float("nan"), device=DEVICE, dtype=dtype)
            lse_ = torch.empty(batch, heads, size * size, device=DEVICE, dtype=torch.float32)
            att._attention_forward_into(q, k, v, scale, att._nchw_as_heads(o, heads), lse_, config)
            return (o,)

        def run_backward(config, qkv=qkv, out=out, lse=lse, dout=dout, scale=scale):
            dqkv = torch.full(qkv.shape, float("nan"), device=DEVICE, dtype=dtype)
            q_, k_, v_ = att._qkv_nchw_views(qkv, heads)
            dq, dk, dv = att._qkv_nchw_views(dqkv, heads)
            att._attention_backward_into(q_, k_, v_, att._nchw_as_heads(out, heads), lse,
                                         att._nchw_as_heads(dout, heads), scale, dq, dk, dv, config)
            return (dqkv,)

        fwd_heuristic = att.forward_config(seq_len, head_dim, dtype)
        bwd_heuristic = att.backward_config(seq_len, head_dim, dtype)
        problems.append(Problem("attention", f"{label} fwd {layout}", fwd_heuristic,
                                _attention_candidates(seq_len, "fwd", grid, fwd_heuristic), run_forward,
                                (ref_out.detach(),), fwd_flops, "TFLOP/s"))
        problems.append(Problem("attention", f"{label} bwd {layout}", bwd_heuristic,
                                _attention_candidates(seq_len, "bwd", grid, bwd_heuristic), run_backward,
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


def _group_norm_candidates(channels_per_group, hw, contiguous_channels, grid, heuristic) -> list:
    tiles = (1024, 2048, 4096) if grid == "quick" else (512, 1024, 2048, 4096, 8192)
    if not ON_GPU:  # the interpreter: a small tile, so the candidate loops over tiles with tails
        tiles = (64,)
    warps = (4, 8) if grid == "quick" else (2, 4, 8, 16)
    configs = []
    for tile, num_warps in itertools.product(tiles, warps):
        cg, p = 1 << max(0, (channels_per_group - 1).bit_length()), 1 << max(0, (hw - 1).bit_length())
        if contiguous_channels:
            block_c = min(cg, tile)
            block_hw = min(p, max(1, tile // block_c))
        else:
            block_hw = min(p, tile)
            block_c = min(cg, max(1, tile // block_hw))
        configs.append(GroupNormConfig(block_c, block_hw, num_warps))
    configs = list(dict.fromkeys(configs))  # tiles larger than the group collapse to one config
    if not ON_GPU:
        configs = [c for c in configs if c != heuristic][:1]
    return [heuristic] + [c for c in configs if c != heuristic]


def group_norm_problems(sites, groups, dtype, layouts, grid) -> list[Problem]:
    gns = importlib.import_module("kernels.group_norm_silu")  # the package binds `group_norm_silu` to a function

    problems = []
    for (label, n, c, h, w), layout in itertools.product(sites, layouts):
        g = torch.Generator(device="cpu").manual_seed(c * h)
        x = (torch.randn(n, c, h, w, generator=g) * 1.5 + 0.3).to(DEVICE, dtype)
        dy = torch.randn(n, c, h, w, generator=g).to(DEVICE, dtype)
        if layout == "channels_last":
            x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
        weight = (1 + 0.2 * torch.randn(c, generator=g)).to(DEVICE)
        bias = (0.2 * torch.randn(c, generator=g)).to(DEVICE)
        scale = (0.3 * torch.randn(n, c, generator=g)).to(DEVICE, dtype)
        shift = (0.3 * torch.randn(n, c, generator=g)).to(DEVICE, dtype)
        leaves = [t.detach().float().requires_grad_(True) for t in (x, weight, bias, scale, shift)]
        ref_y = gns.group_norm_silu_reference(*leaves[:3], groups, 1e-5, scale=leaves[3], shift=leaves[4])
        ref_grads = torch.autograd.grad(ref_y, leaves, dy.float())
        y, mean, rstd = gns._forward(x, weight, bias, scale, shift, groups, 1e-5, "pre", True)

        def launch(config, fn):
            previous = gns._LAUNCH_OVERRIDE
            gns._LAUNCH_OVERRIDE = {"block_c": config.block_c, "block_hw": config.block_hw,
                                    "num_warps": config.num_warps}
            try:
                return fn()
            finally:
                gns._LAUNCH_OVERRIDE = previous

        def run_forward(config, x=x, weight=weight, bias=bias, scale=scale, shift=shift):
            return launch(config, lambda: gns._forward(x, weight, bias, scale, shift, groups, 1e-5, "pre", True)[:1])

        def run_backward(config, x=x, dy=dy, weight=weight, bias=bias, scale=scale, shift=shift, mean=mean,
                         rstd=rstd):
            return launch(config, lambda: gns._backward(dy, x, weight, bias, scale, shift, mean, rstd, groups, 1e-5,
                                                         "pre", True))

        contiguous_channels = x.stride(1) == 1 and c // groups > 1
        tensor_bytes = x.numel() * x.element_size()
        for direction, heuristic_backward in (("fwd", False), ("bwd", True)):
            picked = gns._launch_config(n, c, h * w, groups, x.stride(1), x.device, backward=heuristic_backward)
            heuristic = GroupNormConfig(picked.block_c, picked.block_hw, picked.num_warps)
            candidates = _group_norm_candidates(c // groups, h * w, contiguous_channels, grid, heuristic)
            if direction == "fwd":
                problems.append(Problem("group_norm", f"{label} fwd {layout}", heuristic, candidates, run_forward,
                                        (ref_y.detach(),), 2.0 * tensor_bytes, "GB/s"))
            else:
                problems.append(Problem("group_norm", f"{label} bwd {layout}", heuristic, candidates, run_backward,
                                        tuple(t.detach() for t in ref_grads), 3.0 * tensor_bytes, "GB/s"))
    return problems


# ------------------------------------------------------------------------------------------------
# Checking and timing
# ------------------------------------------------------------------------------------------------
def seconds_per_call(fn, target_s: float) -> float:
    """Median over five rounds of (round time / calls per round), rounds of ~target_s/5."""
    from bench.harness import sync

    fn()
    sync()
    tick = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - tick, 1e-6)
    calls = max(1, min(1000, int(target_s / 5 / once)))
    rounds = []
    for _ in range(5):
        if ON_GPU:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            rounds.append(start.elapsed_time(end) / 1e3 / calls)
        else:
            tick = time.perf_counter()
            for _ in range(calls):
                fn()
            rounds.append((time.perf_counter() - tick) / calls)
    return sorted(rounds)[2]


def _as_dict(config) -> dict | str:
    return asdict(config) if hasattr(config, "__dataclass_fields__") else config


def measure(problem: Problem, target_s: float, deadline: float) -> None:
    from bench.harness import relative_error, tolerance

    tol = tolerance("kernel", torch.bfloat16 if ON_GPU else torch.float32)
    for config in problem.candidates:
        if time.monotonic() > deadline:
            problem.results.append({"config": _as_dict(config), "status": "not run (time limit)"})
            continue
        entry = {"config": _as_dict(config), "heuristic": config == problem.heuristic}
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
            entry["status"] = f"failed: {type(error).__name__}: {str(error).strip().splitlines()[0][:160] if str(error).strip() else ''}"
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
        return f"{_config_text(entry['config'])} {cost}"

    ratio = s["heuristic_over_best"]
    return (f"{s['problem']}: heuristic {timed(s['heuristic'])}; best {timed(s['best'])}"
            + (f"; heuristic/best {ratio:.2f}" if ratio else ""))


def _config_text(config: dict) -> str:
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in config.items())


def markdown(report: dict) -> str:
    env = report["environment"]
    label = "GPU" if env.get("device_type") == "cuda" else "CPU (interpreter: times say nothing about speed)"
    lines = [f"# Kernel launch configurations timed at the seed UNet's sites ({label})", "",
             f"{env.get('device_name', env.get('device_type'))}, driver {env.get('driver')}, torch {env.get('torch')}, "
             f"triton {env.get('triton')}, {env.get('date')}; grid `{report['grid']}`, layouts "
             f"{', '.join(report['layouts'])}, {report['dtype']}. Each candidate checked against fp32 eager before "
             f"timing ({'CUDA events' if env.get('device_type') == 'cuda' else 'wall clock'}, median of 5 rounds).", "",
             "| problem | heuristic | µs | best | µs | heuristic / best | best rate | candidates (failed) |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for s in report["summaries"]:
        h, b = s["heuristic"] or {}, s["best"] or {}
        ratio = f"{s['heuristic_over_best']:.2f}" if s["heuristic_over_best"] else "—"
        rate = f"{b['rate']:.1f} {s['unit']}" if b.get("rate") else "—"
        lines.append(f"| {s['problem']} | {_config_text(h.get('config', {}))} | {h.get('us', float('nan')):.1f} | "
                     f"{_config_text(b.get('config', {}))} | {b.get('us', float('nan')):.1f} | {ratio} | {rate} | "
                     f"{s['candidates']} ({len(s['problems'])}) |")
    lines += ["", "## Top five per problem", ""]
    for s in report["summaries"]:
        lines.append(f"- **{s['problem']}**: " + "; ".join(
            f"{_config_text(r['config'])} {r['us']:.1f} µs" for r in s["top5"]))
        for r in s["problems"]:
            lines.append(f"  - {_config_text(r['config'])}: {r['status']}")
    lines += ["", f"Reproduce: `{report['command']}`", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    from bench.harness import comma_choices

    parser = argparse.ArgumentParser(prog="python3 -m bench.tune_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", type=comma_choices("attention", "group_norm"), default="attention,group_norm",
                        help="attention, group_norm or both, comma-separated")
    parser.add_argument("--layouts", type=comma_choices("channels_last", "nchw"), default="channels_last",
                        help="channels_last, nchw or both, comma-separated")
    parser.add_argument("--grid", choices=("quick", "full"), default="quick", help="candidate grid (default quick)")
    parser.add_argument("--target-s", type=float, default=0.05, help="timed seconds per candidate (default 0.05)")
    parser.add_argument("--time-limit", type=float, default=600.0,
                        help="seconds; candidates not started by then are listed as not run (default 600)")
    parser.add_argument("--out", default=None, help="report root (default profiles/); <out>/<gpu>/<date>-tune.md")
    parser.add_argument("--allow-cpu", action="store_true", help="without a GPU: tiny sizes in the interpreter")
    args = parser.parse_args(argv)
    if not ON_GPU and not args.allow_cpu:
        parser.error("no CUDA device here; pass --allow-cpu to check the tool at tiny sizes in the interpreter")
    kernels_asked, layouts = args.only, args.layouts

    from dream.model import PRESETS
    from dream.profile import environment_info, report_stem

    started = time.monotonic()
    deadline = started + args.time_limit
    groups = PRESETS["seed"].num_groups
    if ON_GPU:
        dtype, batch = torch.bfloat16, 128
        attention_sizes = [("attn16", 16), ("attn8", 8)]
        attention_shape = (512, 8)  # channels, heads: 8 heads of 64
        gn_sites = [("res64", batch, 128, 64, 64), ("res16", batch, 512, 16, 16), ("mid8", batch, 512, 8, 8)]
    else:
        dtype, batch = torch.float32, 1
        attention_sizes = [("attn4", 4)]
        attention_shape = (64, 2)  # 2 heads of 32
        gn_sites = [("c48_7x5", 1, 48, 7, 5)]
    problems = []
    if "attention" in kernels_asked:
        problems += attention_problems(batch, *attention_shape, attention_sizes, dtype, layouts, args.grid)
    if "group_norm" in kernels_asked:
        problems += group_norm_problems(gn_sites, groups if ON_GPU else 8, dtype, layouts, args.grid)

    info = environment_info(DEVICE)
    stem = report_stem(args.out or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                "profiles"), info, "tune")
    report = {"environment": info, "grid": args.grid, "layouts": layouts, "dtype": str(dtype).replace("torch.", ""),
              "command": "python3 -m bench.tune_kernels " + " ".join(argv if argv is not None else sys.argv[1:]),
              "summaries": []}
    for problem in problems:
        measure(problem, args.target_s, deadline)
        report["summaries"].append(summary(problem))
        report["seconds"] = round(time.monotonic() - started, 1)
        stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        stem.with_suffix(".md").write_text(markdown(report))
        print(one_line(report["summaries"][-1]), flush=True)
    print(f"wrote {stem.with_suffix('.md')} and .json in {report.get('seconds', 0)} s")
    wrong = [p for s in report["summaries"] for p in s["problems"] if p["status"].startswith("wrong")]
    heuristic_failed = [s["problem"] for s in report["summaries"]
                        if not (s["heuristic"] and s["heuristic"].get("status") == "ok")
                        and not (s["heuristic"] or {}).get("status", "").startswith("not run")]
    for line in heuristic_failed:
        print(f"the heuristic's own configuration failed for {line}", file=sys.stderr)
    return 1 if wrong or heuristic_failed else 0


if __name__ == "__main__":
    sys.exit(main())
