"""Unit tests of the harness's own arithmetic (no benchmark fixture: they run with --benchmark-disable
or without pytest-benchmark options, and are skipped by --benchmark-only).

Covered: the profiler trace summary (busy fraction over a union of overlapping kernel intervals,
launch counts, steps, top kernels), the relative-error check (NaN, shape, tolerance), the variant
filter's ordered rules, goal evaluation, and the ceilings' formulas on this device.
"""
import json
import math
import time

import pytest
import torch

from bench import harness
from bench.harness import Goal, Mismatch, Variant, compare, relative_error, selected
from bench.report import evaluate_goal, speedups
from dream.profile import _union_length, summarize_trace


def event(cat, name, ts, dur):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_trace_summary_counts_and_busy_fraction():
    trace = {"traceEvents": [
        event("user_annotation", "ProfilerStep#1", 0.0, 100.0),
        event("user_annotation", "ProfilerStep#2", 100.0, 100.0),
        event("gpu_user_annotation", "ProfilerStep#1", 5.0, 90.0),  # GPU-side copy of the step: not a step
        event("cuda_runtime", "cudaLaunchKernel", 1.0, 2.0),
        event("cuda_driver", "cuLaunchKernelEx", 3.0, 2.0),
        event("cuda_runtime", "cudaGraphLaunch", 150.0, 2.0),
        event("cuda_runtime", "cudaMemcpyAsync", 4.0, 1.0),
        event("cuda_runtime", "cudaMemcpyAsync", 70.0, 12.0),   # a device-to-host copy that waited
        event("cuda_runtime", "cudaDeviceSynchronize", 96.0, 3.0),
        event("cuda_runtime", "cudaEventRecord", 97.0, 1.0),  # not a wait
        event("kernel", "gemm", 10.0, 30.0),        # 10..40
        event("kernel", "gemm", 30.0, 20.0),        # 30..50 overlaps: union 10..50
        event("kernel", "norm", 120.0, 10.0),       # 120..130
        event("gpu_memcpy", "Memcpy DtoD", 60.0, 5.0),  # 60..65
        event("kernel", "tail", 195.0, 15.0),       # runs past the last step: the window grows to 210
        {"ph": "i", "cat": "kernel", "name": "instant", "ts": 1.0},  # not a complete event
    ]}
    s = summarize_trace(trace, top=2)
    assert s["steps"] == 2
    assert s["kernels"] == 4
    assert s["launches"] == 2
    assert s["graph_launches"] == 1
    assert s["window_us"] == pytest.approx(210.0)
    assert s["busy_us"] == pytest.approx(40 + 10 + 5 + 15)
    assert s["busy_fraction"] == pytest.approx(70 / 210)
    assert [k["name"] for k in s["top_kernels"]] == ["gemm", "tail"]
    assert s["top_kernels"][0]["calls"] == 2
    assert s["top_kernels"][0]["share"] == pytest.approx(50 / 75)
    assert s["host_waits"] == {"cudaMemcpyAsync": {"calls": 2, "total_us": 13.0},
                               "cudaDeviceSynchronize": {"calls": 1, "total_us": 3.0}}
    assert list(s["host_waits"]) == ["cudaMemcpyAsync", "cudaDeviceSynchronize"]  # the longest first


def test_trace_summary_counts_only_the_profiled_window():
    """Launches, waits and kernels outside the steps (before the first, or after the last) are not counted; a kernel
    launched in the last step that runs after it still is, and widens the window. Kernels are matched to their
    launch calls by correlation id; an unmatched one counts when it starts at or after the first step."""
    def launched(cat, name, ts, dur, correlation):
        return {**event(cat, name, ts, dur), "args": {"correlation": correlation}}

    trace = {"traceEvents": [
        launched("cuda_runtime", "cudaLaunchKernel", 2.0, 1.0, 1),      # before the first step
        event("cuda_runtime", "cudaStreamSynchronize", 8.0, 2.0),        # before the first step
        launched("cuda_runtime", "cudaLaunchKernel", 9.0, 1.0, 2),      # before the first step ...
        launched("kernel", "setup", 4.0, 6.0, 1),                       # runs before the first step
        event("user_annotation", "ProfilerStep#3", 20.0, 30.0),
        launched("kernel", "queued", 21.0, 2.0, 2),                     # ... runs in it: not counted
        launched("cuda_runtime", "cudaLaunchKernel", 22.0, 1.0, 3),
        launched("kernel", "work", 25.0, 40.0, 3),                      # ends at 65, after the step
        event("kernel", "unmatched", 30.0, 5.0),                        # no correlation: starts in the window
        event("cuda_runtime", "cudaStreamSynchronize", 48.0, 1.0),
        launched("cuda_runtime", "cudaLaunchKernel", 70.0, 1.0, 4),     # after the last step
        launched("kernel", "late", 72.0, 3.0, 4),                       # launched after the last step
    ]}
    s = summarize_trace(trace)
    assert s["steps"] == 1 and s["launches"] == 1 and s["kernels"] == 2
    assert s["host_waits"] == {"cudaStreamSynchronize": {"calls": 1, "total_us": 1.0}}
    assert [k["name"] for k in s["top_kernels"]] == ["work", "unmatched"]
    assert s["window_us"] == pytest.approx(45.0) and s["busy_us"] == pytest.approx(40.0)


def test_trace_summary_without_gpu_events():
    s = summarize_trace({"traceEvents": [event("user_annotation", "ProfilerStep#0", 0.0, 50.0),
                                         event("cpu_op", "aten::mm", 1.0, 10.0)]})
    assert s["steps"] == 1 and s["kernels"] == 0 and s["busy_fraction"] is None


@pytest.mark.parametrize("intervals,length", [([], 0.0), ([(0, 1), (2, 3)], 2.0), ([(0, 5), (1, 2), (4, 7)], 7.0),
                                              ([(3, 4), (0, 1), (0.5, 3.5)], 4.0)])
def test_union_length(intervals, length):
    assert _union_length(intervals) == pytest.approx(length)


def test_relative_error_and_compare():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(100, generator=g, dtype=torch.float64)
    noise = torch.randn(100, generator=g, dtype=torch.float64)
    out = (ref + 1e-3 * noise).float()
    expected = float(torch.linalg.vector_norm(out.double() - ref) / torch.linalg.vector_norm(ref))
    assert relative_error(out, ref) == pytest.approx(expected, rel=1e-9)
    poisoned = out.clone()
    poisoned[7] = float("nan")
    assert relative_error(poisoned, ref) == math.inf
    assert relative_error(out[:50], ref) == math.inf
    assert compare((out,), (ref,), ("y",), tol=1e-2)["y"] == pytest.approx(expected, rel=1e-9)
    with pytest.raises(Mismatch, match="y: "):
        compare((out,), (ref,), ("y",), tol=1e-5)
    with pytest.raises(Mismatch, match="outputs"):
        compare((out, out), (ref,), ("y",), tol=1.0)


def test_variant_filter_rules(monkeypatch):
    plain = Variant("compile", build=None)
    slow = Variant("compile_max_autotune", build=None, explicit=True)
    cpu_off = Variant("triton_compile", build=None, cpu=False)
    case = "group_norm/res64_pre_ss/fwd+bwd"

    def runs(rules, variant):
        monkeypatch.setattr(harness.SETTINGS, "variants", rules)
        return selected(case, variant)[0]

    assert runs("", plain) and not runs("", slow)
    assert runs("all", slow)
    assert not runs("-compile*", plain)
    assert runs("-*, +compile", plain) and not runs("-*, +compile", slow)
    assert runs(f"-*max_autotune*,+{case}:compile_max_autotune", slow)
    assert not runs("eager*", plain)  # a first include rule leaves out what it does not match
    assert runs(f"{case}:compile", plain)
    assert runs("all", cpu_off)
    assert runs("", cpu_off) == harness.ON_GPU


def test_goals_and_speedups():
    rows = [{"variant": "triton", "role": "ours", "status": "ok", "time_s": 1.0, "pct_ceiling": 85.0,
             "ceiling": "copy"},
            {"variant": "triton_compile", "role": "ours", "status": "ok", "time_s": 0.5},
            {"variant": "compile", "role": "anchor", "status": "ok", "time_s": 1.5},
            {"variant": "sdpa", "role": "anchor", "status": "ok", "time_s": 2.0},
            {"variant": "broken", "role": "anchor", "status": "mismatch"}]
    ratios = speedups(rows)
    assert ratios["triton"] == {"compile": 1.5, "sdpa": 2.0}
    assert ratios["triton_compile"]["compile"] == pytest.approx(3.0)
    assert evaluate_goal(Goal("g", "speedup", "triton", 1.4, ("compile", "sdpa")), rows)["status"] == "met"
    assert evaluate_goal(Goal("g", "speedup", "triton", 1.6, ("compile", "sdpa")), rows)["status"] == "not met"
    best = evaluate_goal(Goal("g", "speedup", ("triton", "triton_compile"), 2.5, ("compile",)), rows)
    assert best["status"] == "met" and best["value"] == pytest.approx(3.0)
    assert evaluate_goal(Goal("g", "pct_ceiling", "triton", 80.0), rows)["status"] == "met"
    assert evaluate_goal(Goal("g", "speedup", "triton", 1.0, ("missing",)), rows)["status"] == "n/a"
    assert evaluate_goal(Goal("g", "speedup", "absent", 1.0, ("compile",)), rows)["status"] == "n/a"


def test_ceilings_are_positive_and_consistent():
    c = harness.measure_ceilings()
    assert c["copy_gbps"] > 0 and c["matmul_fp32_tflops"] > 0 and c["matmul_bf16_tflops"] > 0
    assert c["copy_bytes"] == 2 * ((1 << 28) if harness.ON_GPU else (1 << 24)) * 4


def test_compile_report_occupancy_and_problem_checks():
    from bench.compile_report import SM_LIMITS, occupancy, problems

    h100 = SM_LIMITS[90]
    # 64 registers x 32 threads x 8 warps = 16384 per program: 4 fit the 65536-register file
    assert occupancy(64, 8192, 8, h100) == 4
    # registers round up to a multiple of 8 per thread: 65 counts as 72 -> 65536 // (72*32*4) = 7
    assert occupancy(65, 0, 4, h100) == 7
    # shared memory binds: 100 KB + 1 KB reserved per program -> 2 programs in 228 KB
    assert occupancy(32, 100 * 1024, 4, h100) == 2
    # warps bind: 64 warps per SM / 32 warps per program
    assert occupancy(16, 0, 32, h100) == 2
    assert occupancy(255, 300 * 1024, 4, h100) == 0
    good = {"kernel": "k", "config": {}, "precisions": ["bf16"], "local_bytes": 0, "stack_bytes": 8,
            "spill_stores": 1, "spill_loads": 1, "shared_bytes": 1024, "programs_per_sm": 3}
    assert problems([good], 90) == []  # a value or two spilled: tolerated
    spilling = dict(good, stack_bytes=48, local_bytes=16)
    too_much_shared = dict(good, shared_bytes=h100.shared_per_program + 1, programs_per_sm=0)
    found = problems([spilling, too_much_shared], 90)
    assert len(found) == 3 and "spills" in found[0] and "shared memory" in found[1]


def test_compile_report_measures_innermost_loops():
    from bench.compile_report import _loops_text, innermost_loops, instructions_per_element

    sass = "\n".join([
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
        "        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;",           # outer loop: 0010-0080
        "        /*0020*/              @!P1 LDG.E.128 R4, desc[UR4][R2.64] ;",  # inner loop 1: 0020-0050
        "        /*0030*/                   LDG.E.U16 R8, desc[UR4][R2.64] ;",
        "        /*0040*/                   FFMA R6, R4, R5, R6 ;",
        "        /*0050*/              @!P0 BRA 0x20 ;",
        "        /*0060*/                   FADD R7, R6, R7 ;",                 # inner loop 2: 0060-0070
        "        /*0070*/               @P1 BRA 0x60 ;",
        "        /*0080*/               @P2 BRA 0x10 ;",
        "        /*0090*/                   BRA 0xa0 ;",                        # forward: not a loop
        "        /*00a0*/                   EXIT ;",
    ])
    loops = innermost_loops(sass)
    assert loops == [{"instructions": 4, "load_bytes": 18}, {"instructions": 2, "load_bytes": 0}]
    assert innermost_loops("        /*0000*/                   EXIT ;") == []
    # a bf16 forward loop reading 16 bytes (8 elements) a trip; backward loops read x and dy
    one_pass = {"FUSED_STATS": False, "FUSED_SUMS": False}
    assert instructions_per_element("_gn_fwd_kernel", one_pass, [{"instructions": 56, "load_bytes": 16}], 2) == [7.0]
    assert instructions_per_element("_gn_bwd_kernel", one_pass, [{"instructions": 56, "load_bytes": 32}], 2) == [7.0]
    assert instructions_per_element("_gn_fwd_kernel", one_pass, [{"instructions": 56, "load_bytes": 32}], 4) == [7.0]
    assert instructions_per_element("_attention_forward_kernel", {}, loops, 2) is None
    assert instructions_per_element("_gn_fwd_kernel", one_pass, loops, 2) == [0.4, None]  # 9 elements; no loads
    # fused statistics: the last two loops that load stream x; an earlier one (merging partials) does not
    merge, stats, empty, output = ({"instructions": n, "load_bytes": b}
                                   for n, b in ((30, 8), (56, 16), (3, 0), (88, 16)))
    assert instructions_per_element("_gn_fwd_kernel", {"FUSED_STATS": True}, [merge, stats, empty, output], 2) \
        == [None, 7.0, None, 11.0]
    assert instructions_per_element("_gn_bwd_kernel", {"FUSED_SUMS": False}, [merge, output], 2) == [None, 22.0]
    row = {"inner_loops": [{"instructions": 55, "load_bytes": 16}, {"instructions": 87, "load_bytes": 16}],
           "inner_loop_instructions_per_element": [6.9, 10.9]}
    assert _loops_text(row) == "55, 87 [6.9, 10.9/elem]"
    assert _loops_text({"inner_loops": [], "inner_loop_instructions_per_element": None}) == "-"
    row["inner_loop_instructions_per_element"] = [6.9, None]
    assert _loops_text(row) == "55, 87 [6.9, -/elem]"


def test_compile_report_notes_warp_level_mma_on_hopper_only():
    from bench.compile_report import warp_mma_rows

    row = {"kernel": "attention_forward_kernel", "config": {"BLOCK_M": 32}, "num_warps": 4, "precisions": ["bf16"]}
    wgmma, mma_sync, no_dots = dict(row, hgmma=8, hmma=0), dict(row, hgmma=0, hmma=16), dict(row, hgmma=0, hmma=0)
    (note,) = warp_mma_rows([wgmma, mma_sync, no_dots], 90)
    assert note == "attention_forward_kernel BLOCK_M=32 warps=4 [bf16]: 16 HMMA, no HGMMA"
    assert warp_mma_rows([mma_sync], 80) == []  # before Hopper mma.sync is the tensor-core path


def test_tune_kernels_checks_then_times_each_candidate(tmp_path):
    """The tuner at CPU sizes: every problem's heuristic and its other candidates (GroupNorm: another tile
    and a capped grid) pass the check against the eager reference and get a time; the report is written."""
    from bench import compile_report, tune_kernels

    assert tune_kernels.main(["--allow-cpu", "--out", str(tmp_path)]) == 0
    (path,) = (tmp_path / "cpu").glob("*-tune.json")
    report = json.loads(path.read_text())
    names = [s["problem"] for s in report["summaries"]]
    assert names == ["attn4 fwd channels_last", "attn4 bwd channels_last",
                     "c48_7x5 fwd channels_last", "c48_7x5 bwd channels_last",
                     "c48_7x5_drop fwd channels_last", "c48_7x5_drop bwd channels_last"]
    for s in report["summaries"]:
        assert s["heuristic"]["status"] == "ok" and s["heuristic"]["us"] > 0, s
        expected = 3 if s["problem"].startswith("c48") else 2
        assert s["candidates"] == expected and len(s["top5"]) == expected and s["problems"] == [], s
        assert s["heuristic"]["max_rel_error"] < 1e-4
        if s["kernel"] == "group_norm":  # the interpreter's 4096-element tiles hold a 6x35 group; the small one not
            assert s["heuristic"]["resident"] and not all(r["resident"] for r in s["top5"]), s
    if compile_report.ptxas_available():  # the candidates were compiled offline for sm_90 first
        assert report["precompile_s"] > 0
        facts = [r["static"] for s in report["summaries"] for r in s["top5"] if "static" in r]
        assert facts and all(k["registers"] > 0 and k["spilled_bytes"] == 0 for f in facts for k in f.values())
    text = (tmp_path / "cpu" / path.name.replace(".json", ".md")).read_text()
    assert "(resident)" in text and "| n/a (CPU) |" in text and "driver" not in text.splitlines()[2]
    assert text.startswith("# Kernel launch configurations timed at the seed UNet's sites (CPU: the interpreter, ")


def test_tune_kernels_reports_wrong_and_failing_candidates():
    from bench.tune_kernels import Problem, config_key, measure, summary

    reference = (torch.randn(8, 8, generator=torch.Generator().manual_seed(0)),)

    def run(config):
        if config == "broken":
            raise RuntimeError("does not compile\nsecond line")
        return (reference[0] * (1.5 if config == "wrong" else 1.0),)

    problem = Problem("attention", "p", "good", ["good", "wrong", "broken", "spills"], run, reference, 1e9, "GB/s")
    problem.static[config_key("spills")] = {"kernels": {"k": {"registers": 255, "spilled_bytes": 160}}}
    measure(problem, target_s=0.001, deadline=float("inf"), dtype=torch.float32)
    s = summary(problem)
    assert s["best"]["config"] == s["heuristic"]["config"] == "good"
    statuses = [r["status"] for r in s["problems"]]
    assert statuses[0].startswith("wrong (relative error 0.5")
    assert statuses[1] == "failed: RuntimeError: does not compile"
    assert statuses[2] == "not timed: spills (offline compile): k 160 B/thread"


def test_tune_static_report_lists_spilling_and_failing_candidates():
    from bench.tune_kernels import static_markdown, static_verdict

    ok = {"kernels": {"attention_forward_kernel": {"registers": 120, "spilled_bytes": 0}}}
    spills = {"kernels": {"attention_forward_kernel": {"registers": 255, "spilled_bytes": 144}}}
    broken = {"error": "CompilationError: bad block"}
    assert static_verdict(ok) is None and static_verdict(None) is None
    assert static_verdict(spills) == "spills (offline compile): attention_forward_kernel 144 B/thread"
    assert static_verdict(broken) == "failed to compile: CompilationError: bad block"
    heuristic = json.dumps({"block_m": 128}, sort_keys=True)
    report = {"arch": 90, "triton": "3.6.0", "date": "2026-11-29", "grid": "full", "layouts": ["nchw"],
              "candidates": 3, "seconds": 1.0, "workers": 2, "command": "python3 -m bench.tune_kernels --static-only",
              "problems": {"attn16 fwd nchw": {"heuristic": heuristic, "candidates": {
                  heuristic: ok, json.dumps({"block_m": 64}): spills, json.dumps({"block_m": 32}): broken}}}}
    text = static_markdown(report)
    assert "| attn16 fwd nchw | 3 | 2 | block_m=128 | attention_forward_kernel 120 (0) |" in text
    assert "block_m=64: spills" in text and "block_m=32: failed to compile" in text


def test_gpu_suite_stages_swap_gpu_only_options_on_cpu(tmp_path):
    from bench.gpu_suite import main as suite_main
    from bench.gpu_suite import stages

    gpu = {stage.name: " ".join(stage.command) for stage in stages(str(tmp_path))}
    cpu = {stage.name: " ".join(stage.command) for stage in stages(str(tmp_path), on_gpu=False)}
    assert list(gpu) == list(cpu) and "tune" in gpu
    assert "--sampler graphs" in gpu["profile"] and "--sampler engine" in cpu["profile"]
    assert "--allow-cpu" not in gpu["tune"] and cpu["tune"].endswith("--allow-cpu")
    assert suite_main(["--out", str(tmp_path), "--list"]) == 0


def test_gpu_suite_reads_partial_results_once_each(tmp_path):
    """A stage cut short leaves <name>.partial.jsonl; a result recorded again (the memory budget's
    timed policy) replaces its earlier line in the summary instead of being listed twice; the suite's
    own stage list (suite-logs/stages.json) is not read as a report."""
    import time as time_module

    from bench.gpu_suite import _reports

    started = time_module.time()
    device = tmp_path / "nvidia-h200"
    device.mkdir()
    lines = [{"case": "memory/seed", "variant": "ckpt_none", "measured_bytes": 1},
             {"case": "memory/seed", "variant": "ckpt_all", "measured_bytes": 2},
             {"case": "memory/seed", "variant": "ckpt_none", "measured_bytes": 1, "time_s": 0.5}]
    (device / "2026-11-29-bench-memory.partial.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (device / "suite-logs").mkdir()
    (device / "suite-logs" / "stages.json").write_text(json.dumps([{"stage": "memory", "status": "timeout"}]))
    (report,) = _reports(tmp_path, started)  # the stage list is not a report
    assert report["partial"] and [(r["variant"], r.get("time_s")) for r in report["results"]] == [
        ("ckpt_none", 0.5), ("ckpt_all", None)]


def test_gpu_suite_headlines_say_n_a_for_ceilings_on_cpu_and_keep_small_ratios(tmp_path):
    import time as time_module

    from bench.gpu_suite import headline_lines

    started = time_module.time()
    (tmp_path / "cpu").mkdir()
    rows = [{"case": "attention/n64/fwd", "variant": "triton", "role": "ours", "status": "ok", "time_s": 0.2,
             "pct_ceiling": 0.0},
            {"case": "attention/n64/fwd", "variant": "eager", "role": "anchor", "status": "ok", "time_s": 0.0005}]
    (tmp_path / "cpu" / "2026-11-30-bench-kernels.json").write_text(json.dumps({"results": rows}))
    (cpu_line,) = headline_lines(tmp_path, started, on_gpu=False)
    assert "n/a (CPU)" in cpu_line and "0.00250x vs eager" in cpu_line and "0.0%" not in cpu_line
    (gpu_line,) = headline_lines(tmp_path, started)
    assert "  0.0%" in gpu_line and "n/a" not in gpu_line

    from bench.gpu_suite import summary_lines

    title = summary_lines(tmp_path, [], [], started, {}, on_gpu=True)[0]  # the environment probe failed
    assert title == "# GPU suite summary", "a GPU run is not labelled CPU for want of its environment"
    assert "(CPU" in summary_lines(tmp_path, [], [], started, {}, on_gpu=False)[0]


SHARD_TESTS = '''
import os, signal, time
import pytest

@pytest.mark.parametrize("i", range(7))
def test_case(i):
    if os.environ.get("DEAF_CASE") == str(i):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # like an interrupt lost inside torch's C++ code
    if os.environ.get("LOSES_ONE_INTERRUPT") == str(i):  # the first SIGINT lost, the next one taken
        def second_time(signum, frame):
            signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGINT, second_time)
    if os.environ.get("TAKES_INTERRUPT") == str(i):  # like the trainer: SIGINT raised as its own exception
        class Stopped(Exception):
            signum = signal.SIGINT

        def stop(signum, frame):
            raise Stopped("stopped by SIGINT")
        signal.signal(signal.SIGINT, stop)
        if os.environ.get("SELF_INTERRUPT"):  # a SIGINT that is not the runner's
            os.kill(os.getpid(), signal.SIGINT)
    if str(i) in (os.environ.get("SLOW_CASE"), os.environ.get("DEAF_CASE"), os.environ.get("LOSES_ONE_INTERRUPT"),
                  os.environ.get("TAKES_INTERRUPT")):
        time.sleep(60)
'''


def _shard_run(tmp_path, index, count, extra_env=None):
    import os
    import subprocess
    import sys

    from bench.gpu_suite import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO), "DREAM_TEST_SHARD": f"{index}/{count}", **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "pytest", str(tmp_path / "test_shard_me.py"), "-v", "-p",
                           "no:cacheprovider", "-p", "bench.pytest_shard"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)


def test_pytest_shards_run_every_test_exactly_once(tmp_path):
    (tmp_path / "test_shard_me.py").write_text(SHARD_TESTS)
    ran = []
    for index in range(3):
        result = _shard_run(tmp_path, index, 3)
        assert result.returncode == 0, result.stdout[-2000:]
        ran.append({line.split("::")[1].split(" ")[0] for line in result.stdout.splitlines() if " PASSED" in line})
    assert [len(r) for r in ran] == [3, 2, 2]
    assert set.union(*ran) == {f"test_case[{i}]" for i in range(7)}
    bad = _shard_run(tmp_path, 3, 3)
    assert bad.returncode == 4 and "DREAM_TEST_SHARD='3/3': need n >= 1 and 0 <= i < n" in bad.stderr


def test_gpu_suite_stage_shards_sum_counts_and_stop_at_the_limit(tmp_path):
    """Shards run side by side, their counts are summed; at the limit every shard gets SIGINT and still
    writes its report, even when this process was started with SIGINT ignored (a background job), and
    a shard that loses the first SIGINT gets another."""
    import signal
    import sys
    import time as time_module

    from bench.gpu_suite import GRACE_S, Stage, run_stage
    from bench.pytest_shard import INTERRUPTED_LINE

    (tmp_path / "test_shard_me.py").write_text(SHARD_TESTS)
    command = [sys.executable, "-m", "pytest", str(tmp_path / "test_shard_me.py"), "-v", "-p", "no:cacheprovider",
               "-p", "bench.pytest_shard", f"--junitxml={tmp_path}/junit-{{shard}}.xml"]
    result = run_stage(Stage("tests", 60, "shards", command, shards=3), 60, tmp_path / "tests.log")
    assert result["status"] == "ok" and result["last_line"] == "3 shards: 7 passed", result
    assert sorted(p.name for p in tmp_path.glob("junit-*.xml")) == [f"junit-{i}.xml" for i in range(3)]
    assert (tmp_path / "tests.log").read_text().count("DREAM_TEST_SHARD=") == 3

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        start = time_module.monotonic()
        slow = Stage("tests", 60, "shards", command, {"SLOW_CASE": "4"}, shards=3)  # case 4 is shard 1's
        result = run_stage(slow, 8, tmp_path / "slow.log")
        seconds = time_module.monotonic() - start
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result["status"] == "timeout" and seconds < 8 + GRACE_S - 5, (result, seconds)
    assert result["last_line"] == "3 shards: 6 passed", result  # shard 1 reported the case that ran before
    assert "KeyboardInterrupt" in (tmp_path / "slow-1.log").read_text()
    assert INTERRUPTED_LINE in (tmp_path / "slow-1.log").read_text()

    start = time_module.monotonic()
    lossy = Stage("tests", 60, "shards", command, {"LOSES_ONE_INTERRUPT": "4"}, shards=3)
    result = run_stage(lossy, 8, tmp_path / "lossy.log", grace_s=30)
    seconds = time_module.monotonic() - start
    assert result["last_line"] == "3 shards: 6 passed" and seconds < 8 + 15, (result, seconds)  # repeated, not killed


def test_gpu_suite_counts_a_killed_shard_from_its_log(tmp_path):
    import sys

    from bench.gpu_suite import Stage, run_stage

    (tmp_path / "test_shard_me.py").write_text(SHARD_TESTS)
    command = [sys.executable, "-m", "pytest", str(tmp_path / "test_shard_me.py"), "-v", "-p", "no:cacheprovider",
               "-p", "bench.pytest_shard"]
    deaf = Stage("tests", 60, "shards", command, {"DEAF_CASE": "5"}, shards=2)  # case 5 is shard 1's (1, 3, 5)
    result = run_stage(deaf, 8, tmp_path / "deaf.log", grace_s=6)
    assert result["status"] == "timeout"
    assert result["last_line"] == "2 shards: 6 passed (killed: shard 1, counted from its log)", result


def test_profile_report_says_when_a_gpu_trace_holds_no_gpu_events():
    from dream.profile import NO_GPU_EVENTS, environment_info, format_report

    info = {**environment_info(torch.device("cpu")), "device_type": "cuda", "device_name": "NVIDIA H200"}
    trace = {"traceEvents": [event("user_annotation", "ProfilerStep#1", 0.0, 100.0),
                             event("cuda_runtime", "cudaGraphLaunch", 1.0, 2.0)]}
    summary = {**summarize_trace(trace), "step_ms": 0.1, "wall_ms": [0.1]}
    assert summary["gpu_events"] == 0 and summary["busy_fraction"] is None
    assert NO_GPU_EVENTS in format_report("sample", info, {}, summary, "t.json.gz", 5)
    trace["traceEvents"].append(event("kernel", "k", 5.0, 50.0))
    summary = {**summarize_trace(trace), "step_ms": 0.1, "wall_ms": [0.1]}
    text = format_report("sample", info, {}, summary, "t.json.gz", 5)
    assert NO_GPU_EVENTS not in text and "| GPU busy fraction (kernels, copies, memsets / window) | 50.0 % |" in text


def test_profile_report_gives_the_host_waits_per_step():
    """Each CUDA call the host can wait in, per step and longest first; the profiling loop's own end-of-step
    synchronization says whose it is."""
    from dream.profile import environment_info, format_report

    info = {**environment_info(torch.device("cpu")), "device_type": "cuda", "device_name": "NVIDIA H200"}
    trace = {"traceEvents": [event("user_annotation", "ProfilerStep#1", 0.0, 100.0),
                             event("user_annotation", "ProfilerStep#2", 100.0, 100.0),
                             event("kernel", "k", 5.0, 150.0),
                             event("cuda_runtime", "cudaMemcpyAsync", 40.0, 30.0),
                             event("cuda_runtime", "cudaMemcpyAsync", 140.0, 10.0),
                             event("cuda_runtime", "cudaDeviceSynchronize", 95.0, 4.0),
                             event("cuda_runtime", "cudaDeviceSynchronize", 195.0, 2.0)]}
    text = format_report("train", info, {}, {**summarize_trace(trace), "step_ms": 0.1, "wall_ms": [0.1, 0.1]},
                         "t.json.gz", 5)
    rows = [line for line in text.splitlines() if line.startswith("| host waits")]
    assert rows == ["| host waits per step in cudaMemcpyAsync | 1 calls, 0.020 ms |",
                    "| host waits per step in cudaDeviceSynchronize (the profiling loop's own, at each step's end) | "
                    "1 calls, 0.003 ms |"]


def test_gpu_suite_links_the_reports_it_wrote(tmp_path):
    import os
    import time as time_module

    from bench.gpu_suite import report_links

    device = tmp_path / "nvidia-h200"
    device.mkdir()
    for name in ("2026-11-29-bench-kernels.md", "2026-11-29-profile-train.md", "2026-11-29-profile-sample-graphs.md",
                 "2026-11-28-bench-unet.md"):
        (device / name).write_text("#")
    old = time_module.time() - 3600
    os.utime(device / "2026-11-28-bench-unet.md", (old, old))  # an earlier run's report is not this run's
    rows = report_links(tmp_path, time_module.time() - 60)
    assert ("| kernels (GroupNorm, attention, skip concatenation, residual sum) | "
            "[2026-11-29-bench-kernels.md](nvidia-h200/2026-11-29-bench-kernels.md) |") in rows
    assert any(r.startswith("| profile: training step / sampling step |") and "profile-sample-graphs.md" in r
               and "profile-train.md" in r for r in rows)
    assert "| UNet forward / forward+backward | — |" in rows


FIRST_TESTS = '''
import pytest

def test_plain_a():
    pass

@pytest.mark.skipif(False, reason="bf16 needs CUDA")
def test_hardware_only():
    pass

def test_plain_b():
    pass

def test_named_first():
    pass
'''


def test_pytest_shard_moves_gpu_only_and_named_tests_first(tmp_path):
    import os
    import subprocess
    import sys

    from bench.gpu_suite import REPO

    (tmp_path / "test_order.py").write_text(FIRST_TESTS)
    env = {**os.environ, "PYTHONPATH": str(REPO), "DREAM_TEST_FIRST": "gpu-only, named_first"}
    env.pop("DREAM_TEST_SHARD", None)
    result = subprocess.run([sys.executable, "-m", "pytest", "test_order.py", "--collect-only", "-q", "-p",
                             "no:cacheprovider", "-p", "bench.pytest_shard"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    order = [line.split("::")[1] for line in result.stdout.splitlines() if "::" in line]
    assert order == ["test_hardware_only", "test_named_first", "test_plain_a", "test_plain_b"], result.stdout


def test_autotuned_variant_runs_and_checks_with_autotuning_on():
    """harness.autotuned: the variant's run and check launch with kernels.autotune on, and leave it as it was."""
    from bench.harness import Runner, autotuned
    from kernels.autotune import autotune_enabled, set_autotune

    set_autotune(False)
    try:
        plain = autotuned(lambda state: (lambda inputs: (inputs, autotune_enabled())))(None)
        assert plain.run("x") == ("x", True) and plain.check is None and not autotune_enabled()
        both = autotuned(lambda state: Runner(run=lambda inputs: autotune_enabled(),
                                              check=lambda inputs: ("checked", autotune_enabled()),
                                              keep="model", warm_after_check=False))(None)
        assert both.run(None) is True and both.check(None) == ("checked", True)
        assert both.keep == "model" and both.warm_after_check is False and not autotune_enabled()
    finally:
        set_autotune(None)


def _trivial_suite(monkeypatch):
    """gpu_suite with one stage that runs `true`, on the CPU: main() checks, runs and reports in a second."""
    from bench import gpu_suite

    monkeypatch.setattr(gpu_suite, "stages",
                        lambda out, on_gpu=True, device="<gpu>": [gpu_suite.Stage("env", 30, "x", ["true"])])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return gpu_suite


def test_gpu_suite_checks_out_and_archive_before_any_stage(tmp_path, monkeypatch, capsys):
    gpu_suite = _trivial_suite(monkeypatch)
    monkeypatch.setattr(gpu_suite, "run_stage", lambda *a, **k: pytest.fail("a stage ran before the checks"))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for argv, expected in ((["--out", str(a_file)], f"--out: {a_file} exists and is not a folder"),
                           (["--out", str(tmp_path / "o"), "--archive", str(tmp_path)],
                            f"--archive: {tmp_path} is a folder"),
                           (["--out", str(tmp_path / "o"), "--archive", str(a_file / "x.tar.gz")],
                            f"--archive: {a_file} exists and is not a folder")):
        with pytest.raises(SystemExit) as exit_info:
            gpu_suite.main(["--allow-cpu", *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and expected in err, err


def test_gpu_suite_prints_its_table_when_the_archive_cannot_be_written(tmp_path, monkeypatch, capsys):
    gpu_suite = _trivial_suite(monkeypatch)

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gpu_suite, "write_archive", full_disk)
    assert gpu_suite.main(["--allow-cpu", "--out", str(tmp_path / "o"), "--archive", str(tmp_path / "a.tar.gz")]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "could not write the archive" in captured.err, captured.err
    assert captured.out.rstrip().endswith("=" * 100) and "env       ok" in captured.out, captured.out
    summary = (tmp_path / "o" / "cpu" / "suite-logs" / "summary.md").read_text()
    assert summary.startswith("# GPU suite summary (CPU") and "## Headline numbers (CPU)" in summary
    assert f"torch {torch.__version__}" in summary and "commit " in summary and "triton " in summary


def test_a_cpu_check_of_the_suite_leaves_the_gpu_record_alone(tmp_path, monkeypatch):
    """--allow-cpu writes its logs and summary under <out>/cpu/suite-logs, and the stages' own log paths
    point there too; a GPU's suite-logs beside it are not touched."""
    from bench import gpu_suite

    record = tmp_path / "o" / "nvidia-h200" / "suite-logs" / "summary.md"
    record.parent.mkdir(parents=True)
    record.write_text("# GPU suite summary\n\nNVIDIA H200\n")
    commands = [stage.command for stage in gpu_suite.stages(str(tmp_path / "o"), on_gpu=False, device="cpu")]
    logs_named = [part for command in commands for part in command if "suite-logs" in part]
    assert logs_named and all(f"{tmp_path / 'o' / 'cpu' / 'suite-logs'}/" in part for part in logs_named)
    _trivial_suite(monkeypatch)
    assert gpu_suite.main(["--allow-cpu", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "cpu" / "suite-logs" / "summary.md").read_text().startswith("# GPU suite summary (CPU")
    assert record.read_text() == "# GPU suite summary\n\nNVIDIA H200\n"
    assert sorted(p.name for p in (tmp_path / "o" / "nvidia-h200" / "suite-logs").iterdir()) == ["summary.md"]


def test_gpu_suite_refuses_bad_budgets_in_one_line(monkeypatch, capsys):
    from bench.gpu_suite import main as suite_main

    for argv, env in ((["--budget", "-5", "--list"], None), (["--budget", "nan", "--list"], None), (["--list"], "abc")):
        if env is not None:
            monkeypatch.setenv("DREAM_SUITE_BUDGET", env)
        with pytest.raises(SystemExit) as exit_info:
            suite_main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert "DREAM_SUITE_BUDGET: 'abc'" in err
    monkeypatch.setenv("DREAM_SUITE_BUDGET", "300")
    assert suite_main(["--list"]) == 0
    with pytest.raises(SystemExit) as exit_info:
        suite_main(["--only", "env", "--skip", "env", "--list"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "--only and --skip leave no stage to run" in err


def test_gpu_suite_dry_run_shows_what_an_allow_cpu_run_runs(monkeypatch, capsys):
    from bench.gpu_suite import main as suite_main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert suite_main(["--dry-run", "--allow-cpu", "--only", "profile,tune"]) == 0
    cpu = capsys.readouterr().out
    assert "--sampler engine" in cpu and "--allow-cpu" in cpu and "graph" not in cpu and "--batch 256" not in cpu
    assert suite_main(["--dry-run", "--only", "profile,tune"]) == 0  # without --allow-cpu: what a GPU runs
    gpu = capsys.readouterr().out
    assert "--sampler graphs" in gpu and "--batch 256" in gpu and "--allow-cpu" not in gpu


def test_gpu_suite_cpu_profile_stage_is_small_and_says_what_runs(tmp_path):
    from bench.gpu_suite import stages

    gpu = {s.name: s for s in stages(str(tmp_path))}["profile"]
    cpu = {s.name: s for s in stages(str(tmp_path), on_gpu=False)}["profile"]
    assert "graphed DDIM-10" in gpu.what and "graph" not in cpu.what and "engine sampler" in cpu.what
    assert "--steps 3" in gpu.command[-1] and "--steps" not in cpu.command[-1]  # CPU: the tool's one step
    assert cpu.command[-1].count("dream profile") == 2 and "--sample-steps 4" in cpu.command[-1]


def test_tune_kernels_checks_numbers_and_out_before_any_work(tmp_path, monkeypatch, capsys):
    from bench import tune_kernels

    monkeypatch.setattr(tune_kernels, "build_problems", lambda *a: pytest.fail("built problems before the checks"))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for argv in (["--arch", "90"], ["--static-only", "--arch", "75"],
                 ["--time-limit", "-5"], ["--target-s", "-1"], ["--compile-workers", "-2"], ["--time-limit", "inf"],
                 ["--out", str(a_file)], ["--out", str(a_file / "below")]):
        with pytest.raises(SystemExit) as exit_info:
            tune_kernels.main(["--allow-cpu", *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1, (argv, err)
    assert f"--out: {a_file} exists and is not a folder" in err


def test_tune_static_only_checks_out_first_and_records_the_environment(tmp_path, monkeypatch, capsys):
    from bench import compile_report, tune_kernels

    monkeypatch.setattr(compile_report, "ptxas_available", lambda: True)
    monkeypatch.setattr(compile_report, "ptxas_version", lambda: "V12.8.93")
    monkeypatch.setattr(tune_kernels, "compile_in_workers", lambda *a: pytest.fail("compiled before checking --out"))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        tune_kernels.main(["--static-only", "--only", "attention", "--out", str(a_file)])
    assert exit_info.value.code == 2 and capsys.readouterr().err.count("\n") == 1

    heuristic = json.dumps({"block_m": 128}, sort_keys=True)
    facts = {"attn16 fwd channels_last": {"heuristic": heuristic, "candidates": {heuristic: {"kernels": {}}}}}
    monkeypatch.setattr(tune_kernels, "compile_in_workers", lambda *a: facts)
    assert tune_kernels.main(["--static-only", "--only", "attention", "--out", str(tmp_path), "--arch", "90"]) == 0
    (path,) = (tmp_path / "sm90-offline").glob("*-tune-static-quick-*.json")
    report = json.loads(path.read_text())
    assert report["ptxas"] == "V12.8.93" and report["torch"] == torch.__version__ and report["commit"]
    text = path.with_suffix(".md").read_text()
    assert f"ptxas V12.8.93, torch {torch.__version__}, commit {report['commit']}" in text
    first = path.read_bytes()
    assert tune_kernels.main(["--static-only", "--only", "attention", "--out", str(tmp_path), "--arch", "90"]) == 0
    again = sorted((tmp_path / "sm90-offline").glob("*-tune-static-quick-*.json"))
    assert len(again) == 2 and path.read_bytes() == first, "the day's earlier report is kept"
    (second,) = set(again) - {path}
    assert second.name == path.name.replace(".json", "-2.json") and second.with_suffix(".md").exists()


def test_tune_precompile_shows_progress_and_names_a_failed_worker(capsys):
    import subprocess
    import sys
    import tempfile

    from bench.tune_kernels import collect_shares

    worker = ("import json, sys; print('total 2', flush=True); print('done 1'); print('done 1'); "
              "print(json.dumps({'p': {'heuristic': 'h', 'candidates': {sys.argv[1]: {}}}}))")
    failing = "import sys; print('total 1', flush=True); sys.exit('boom')"
    silent = "print('total 1', flush=True)"  # exits 0 without its JSON line
    errors = [tempfile.TemporaryFile() for _ in range(4)]
    processes = [subprocess.Popen([sys.executable, "-c", code, name], stdout=subprocess.PIPE, stderr=error, text=True)
                 for (code, name), error in zip(((worker, "a"), (worker, "b"), (failing, "c"), (silent, "d")),
                                                errors)]
    merged = collect_shares(processes, errors)
    assert merged == {"p": {"heuristic": "h", "candidates": {"a": {}, "b": {}}}}
    err = capsys.readouterr().err
    assert "4/6" in err and "compile worker failed (1): boom" in err and "printed no result" in err, err


def test_compile_report_checks_preset_and_out_first_and_names_wgmma_on_hopper_only(tmp_path, monkeypatch, capsys):
    from bench import compile_report

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # main() refuses it; triton is imported already
    monkeypatch.setattr(compile_report, "ptxas_available", lambda: True)
    monkeypatch.setattr(compile_report, "record_model_calls", lambda *a: pytest.fail("recorded before the checks"))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for argv in (["--preset", "nope"], ["--preset", "tiny", "--out", str(a_file)]):
        with pytest.raises(SystemExit) as exit_info:
            compile_report.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1, err
    report = {"seconds": 1.0, "failures": [], "problems": [], "warp_mma": []}
    assert "mma.sync" not in compile_report.summary_line(report, 3, 10, 80)
    assert compile_report.summary_line(report, 3, 10, 90).endswith(", 0 on mma.sync rather than wgmma")


def test_model_level_check_catches_one_wrong_parameter_gradient():
    """A model-level case compares every parameter's gradient on its own: the attention blocks' qkv
    gradients zeroed (a few % of the whole gradient's norm) fail even the loosest (bf16) model tolerance."""
    from bench.test_bench_unet import CASES

    case = next(c for c in CASES if c.direction == "fwd+bwd")
    state = case.setup()
    runner = next(v for v in case.variants if v.name == "eager_fp32").build(state)
    tol = harness.tolerance("model", torch.bfloat16)
    compare(runner.check(state.input_sets[0]), state.reference, state.outputs, tol)
    qkv = [p for name, p in runner.keep.named_parameters() if name.endswith("qkv.weight")]
    assert qkv
    for p in qkv:
        p.register_hook(torch.zeros_like)
    with pytest.raises(Mismatch, match="qkv"):
        compare(runner.check(state.input_sets[0]), state.reference, state.outputs, tol)


def test_sampling_step_check_catches_a_step_that_ignores_its_model(monkeypatch):
    """At t = T/2 a step with eps = 0 moves x_{t-1} by ~0.1 %: the step case also compares the model's share
    of the step, so an engine step that drops its model fails even the loosest (bf16) model tolerance."""
    import dream.sampling
    from bench.test_bench_sampling import CASES, engine_step_variant

    case = next(c for c in CASES if c.direction == "step")
    state = case.setup()
    tol = harness.tolerance("model", torch.bfloat16)
    runner = engine_step_variant("eager", "fp32")(state)
    compare(runner.check(state.input_sets[0]), state.reference, state.outputs, tol)
    real_step = dream.sampling.denoise_step

    def step_without_model(model, x, *args, **kwargs):
        return real_step(lambda x, t: torch.zeros_like(x), x, *args, **kwargs)

    monkeypatch.setattr(dream.sampling, "denoise_step", step_without_model)
    with pytest.raises(Mismatch):
        compare(runner.check(state.input_sets[0]), state.reference, state.outputs, tol)


def test_a_limit_sigint_taken_by_the_code_under_test_is_no_test_failure(tmp_path):
    """The trainer takes SIGINT itself and raises Interrupted (signum SIGINT): at a stage's limit that is the
    stage's interrupt, not a failed test, and the shard stops there."""
    import sys

    from bench.gpu_suite import Stage, run_stage

    (tmp_path / "test_shard_me.py").write_text(SHARD_TESTS)
    command = [sys.executable, "-m", "pytest", str(tmp_path / "test_shard_me.py"), "-v", "-p", "no:cacheprovider",
               "-p", "bench.pytest_shard"]
    taking = Stage("tests", 60, "shards", command, {"TAKES_INTERRUPT": "4"}, shards=3)  # case 4 is shard 1's
    result = run_stage(taking, 8, tmp_path / "taking.log")
    assert result["status"] == "timeout" and result["last_line"] == "3 shards: 6 passed", result
    assert not list(tmp_path.glob("*.stop"))
    outside = _shard_run(tmp_path, 1, 3, {"TAKES_INTERRUPT": "1", "SELF_INTERRUPT": "1",
                                          "DREAM_TEST_STOP_FILE": str(tmp_path / "none")})
    assert outside.returncode == 1 and "FAILED" in outside.stdout  # not the runner's SIGINT: a failure stands


def test_gpu_suite_budget_counts_from_its_start_and_keeps_time_to_finish(tmp_path, monkeypatch):
    """Run as a script, the budget counts from the suite's start (torch's import and CUDA's start-up are in
    it), and its last FINISH_S seconds are left for the summary and the archive."""
    gpu_suite = _trivial_suite(monkeypatch)
    limits = []
    monkeypatch.setattr(gpu_suite, "run_stage", lambda stage, limit, log: limits.append(limit) or {
        "stage": stage.name, "status": "ok", "seconds": 0, "limit_s": limit, "last_line": "", "log": str(log)})
    budget = gpu_suite.MIN_STAGE_S + gpu_suite.FINISH_S + 20
    monkeypatch.setattr(gpu_suite, "stages", lambda out, on_gpu=True, device="<gpu>": [
        gpu_suite.Stage("env", 10_000, "x", ["true"])])
    assert gpu_suite.main(["--allow-cpu", "--out", str(tmp_path / "o"), "--budget", str(budget)],
                          start=time.monotonic() - 15) == 0
    left = budget - 15 - gpu_suite.FINISH_S - gpu_suite.GRACE_S - 5
    assert limits and left - 2 < limits[0] <= left, limits
    assert gpu_suite.main(["--allow-cpu", "--out", str(tmp_path / "p"), "--budget", str(budget)],
                          start=time.monotonic() - 30) == 1  # fewer than MIN_STAGE_S left: not run
    assert len(limits) == 1


def test_param_grads_of_a_generator_are_every_parameter_s():
    """model.parameters() is a generator: each parameter's gradient all the same, none silently left out."""
    import torch

    from bench.workloads import grad_names, param_grads

    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1, bias=False))
    model(torch.ones(4, 2)).sum().backward()
    grads = param_grads(model.parameters())
    assert len(grads) == len(grad_names(model)) == 3
    assert all(torch.equal(g, p.grad.flatten()) for g, p in zip(grads, model.parameters(), strict=True))


def test_gpu_suite_numbers_and_worker_count_are_checked_at_their_bounds(monkeypatch):
    import argparse

    from bench import gpu_suite

    at_least_55, positive, count = gpu_suite.number(float, 55), gpu_suite.number(float, 0, strict=True), \
        gpu_suite.number(int, 0)
    assert at_least_55("55") == 55.0 and positive("0.5") == 0.5 and count("0") == 0
    for parse, text in ((at_least_55, "54.9"), (positive, "0"), (positive, "inf"), (count, "-1"), (count, "1.5")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
    monkeypatch.setenv("DREAM_SUITE_TEST_WORKERS", "0")
    with pytest.raises(SystemExit, match="positive integer"):
        gpu_suite.test_workers()
    monkeypatch.setenv("DREAM_SUITE_TEST_WORKERS", "3")
    assert gpu_suite.test_workers() == 3


def test_gpu_suite_headlines_pick_the_fastest_ours_and_anchor_and_name_what_failed(tmp_path):
    """Per case: the fastest ours over the fastest anchor; a case whose only row is a mismatch still gets its
    line; a memory policy over the budget says OVER; a report from before the run is not read."""
    import os
    import time as time_module

    from bench.gpu_suite import headline_lines

    started = time_module.time()
    device = tmp_path / "nvidia-h200"
    device.mkdir()
    timed = {"case": "unit/double/fwd", "status": "ok", "pct_ceiling": 50.0}
    rows = [{**timed, "variant": "ours_slow", "role": "ours", "time_s": 0.004},
            {**timed, "variant": "ours_fast", "role": "ours", "time_s": 0.002},
            {**timed, "variant": "anchor_fast", "role": "anchor", "time_s": 0.003},
            {**timed, "variant": "anchor_slow", "role": "anchor", "time_s": 0.008},
            {"case": "unit/broken/fwd", "variant": "broken", "role": "anchor", "status": "mismatch"},
            {"case": "unit/broken/fwd", "variant": "crashed", "role": "ours", "status": "error"},
            {"case": "memory/seed_b128/step", "variant": "ckpt_none", "role": "ours", "status": "ok",
             "policy": "none", "estimate_bytes": 9e9, "measured_bytes": 8e9, "fits": False}]
    (device / "2026-11-30-bench-kernels.json").write_text(json.dumps({"results": rows}))
    earlier = device / "2026-11-29-bench-kernels.json"
    earlier.write_text(json.dumps({"results": [{**rows[0], "case": "earlier/run/fwd"}]}))
    os.utime(earlier, (started - 3600, started - 3600))
    lines = headline_lines(tmp_path, started)
    assert len(lines) == 3 and not any("earlier" in line for line in lines), lines
    [memory, broken, double] = sorted(lines)
    assert " ours_fast " in double and " 2.000 ms  50.0%" in double and double.endswith("1.50x vs anchor_fast"), double
    assert broken.startswith("unit/broken/fwd") and broken.endswith("FAILED broken (mismatch), crashed (error)"), broken
    assert "measured   8.00 GB  OVER 6.8 GB" in memory, memory


def test_gpu_suite_fails_when_a_stage_fails(tmp_path, monkeypatch):
    gpu_suite = _trivial_suite(monkeypatch)
    monkeypatch.setattr(gpu_suite, "stages",
                        lambda out, on_gpu=True, device="<gpu>": [gpu_suite.Stage("env", 30, "x", ["false"])])
    assert gpu_suite.main(["--allow-cpu", "--out", str(tmp_path / "o")]) == 1


def test_gpu_suite_sums_the_shards_counts_whatever_pytest_calls_them(tmp_path):
    from bench.gpu_suite import _summed_counts

    first, second = tmp_path / "a.log", tmp_path / "b.log"
    first.write_text("tests...\n====== 3 passed, 2 errors, 1 warning in 1.0s ======\n")
    second.write_text("====== 1 failed, 4 passed, 1 error, 5 deselected, 2 warnings in 2.0s ======\n")
    assert _summed_counts([first, second]) == "7 passed, 1 failed, 3 error, 3 warning"


def test_tune_times_a_spilling_heuristic_and_ranks_candidates_by_time(monkeypatch):
    """The heuristic's pick is timed even when its offline compile spills (at the compile report's limit);
    a candidate wrong in any output is not timed; best = the fastest; heuristic / best >= 1."""
    from bench import tune_kernels
    from bench.compile_report import SPILL_LIMIT_BYTES

    at_limit = {"kernels": {"k": {"registers": 255, "spilled_bytes": SPILL_LIMIT_BYTES}}}
    assert tune_kernels.static_verdict(at_limit) == f"spills (offline compile): k {SPILL_LIMIT_BYTES} B/thread"
    assert tune_kernels.static_verdict({"kernels": {"k": {"registers": 255,
                                                          "spilled_bytes": SPILL_LIMIT_BYTES - 8}}}) is None
    g = torch.Generator().manual_seed(3)
    reference = (torch.randn(8, 8, generator=g), torch.randn(8, generator=g))

    def run(config):
        return (reference[0], reference[1] * (1.5 if config == "wrong" else 1.0))

    problem = tune_kernels.Problem("attention", "p", "heuristic", ["heuristic", "fast", "wrong", "middle"], run,
                                   reference, 1e9, "GB/s")
    problem.static[tune_kernels.config_key("heuristic")] = at_limit
    seconds = iter([30e-6, 10e-6, 20e-6])  # heuristic, fast, middle
    monkeypatch.setattr(tune_kernels, "seconds_per_call", lambda fn, target_s: next(seconds))
    tune_kernels.measure(problem, target_s=0.001, deadline=float("inf"), dtype=torch.float32)
    s = tune_kernels.summary(problem)
    assert s["heuristic"]["status"] == "ok" and s["heuristic"]["static"] == at_limit["kernels"]
    assert [r["config"] for r in s["top5"]] == ["fast", "middle", "heuristic"] and s["best"]["config"] == "fast"
    assert s["heuristic_over_best"] == pytest.approx(3.0)
    [wrong] = s["problems"]
    assert wrong["config"] == "wrong" and wrong["status"].startswith("wrong (relative error 0.5")


def test_compile_report_limits_at_their_bounds():
    """Shared memory up to the per-program maximum fits; a 32-bit global load (no width suffix) reads 4 bytes."""
    from bench.compile_report import SM_LIMITS, innermost_loops, problems

    h100 = SM_LIMITS[90]
    row = {"kernel": "k", "config": {}, "precisions": ["bf16"], "local_bytes": 0, "stack_bytes": 0,
           "spill_stores": 0, "spill_loads": 0, "shared_bytes": h100.shared_per_program, "programs_per_sm": 1}
    assert problems([row], 90) == []
    sass = "\n".join(["        /*0000*/                   LDG.E R4, desc[UR4][R2.64] ;",
                      "        /*0010*/                   LDG.E.64 R6, desc[UR4][R2.64+0x4] ;",
                      "        /*0020*/               @P0 BRA 0x0 ;"])
    assert innermost_loops(sass) == [{"instructions": 3, "load_bytes": 12}]


def test_variant_filter_defaults_on_a_gpu_and_after_a_first_exclude_rule(monkeypatch):
    """On a GPU the default runs gpu_only and cpu=False variants (explicit ones still need selecting); a filter
    whose first rule leaves out gives the default to a variant no rule matches, whatever the later rules."""
    monkeypatch.setattr(harness, "ON_GPU", True)
    monkeypatch.setattr(harness.SETTINGS, "variants", "")
    assert selected("c", Variant("compile_max_autotune", build=None, gpu_only=True)) == (True, "")
    assert selected("c", Variant("triton_compile", build=None, cpu=False)) == (True, "")
    assert not selected("c", Variant("slow", build=None, explicit=True))[0]
    monkeypatch.setattr(harness.SETTINGS, "variants", "-eager*,+sdpa*")
    assert selected("c", Variant("compile", build=None)) == (True, "")
    assert not selected("c", Variant("eager_bf16", build=None))[0] and selected("c", Variant("sdpa_flash", None))[0]


@pytest.mark.parametrize("argv,message", [
    (["--only", "tests,nope", "--list"], "unknown stage(s) nope; stages: env, tests, memory"),
    (["--skip", "tune,typo", "--list"], "unknown stage(s) typo; stages: env, tests, memory"),
    (["--only", "env"], "no CUDA device here; run it on a GPU machine (or pass --allow-cpu"),
])
def test_gpu_suite_refuses_unknown_stages_and_a_run_without_a_gpu_in_one_line(argv, message, monkeypatch, capsys):
    from bench import gpu_suite

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_suite, "run_stage", lambda *a, **k: pytest.fail("a stage ran"))
    with pytest.raises(SystemExit) as exit_info:
        gpu_suite.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_gpu_suite_archive_packs_this_run_s_files_relative_to_the_output_folder(tmp_path):
    """The archive unpacks into profiles/ (names relative to the output folder) and holds only what this run
    wrote: not an earlier run's report, nor the archive itself when it is written inside the folder."""
    import os
    import tarfile
    import time as time_module

    from bench.gpu_suite import write_archive

    out = tmp_path / "o"
    (out / "cpu" / "suite-logs").mkdir(parents=True)
    (out / "cpu" / "2026-11-30-bench-kernels.json").write_text("{}")
    (out / "cpu" / "suite-logs" / "summary.md").write_text("# GPU suite summary")
    earlier = out / "cpu" / "2026-11-29-bench-unet.json"
    earlier.write_text("{}")
    started = time_module.time()
    os.utime(earlier, (started - 3600, started - 3600))
    archive = out / "gpu-suite.tar.gz"
    write_archive(archive, out, started)
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["cpu/2026-11-30-bench-kernels.json", "cpu/suite-logs/summary.md"]
        assert tar.extractfile("cpu/suite-logs/summary.md").read() == b"# GPU suite summary"


def test_gpu_suite_fails_when_any_stage_fails_and_records_every_stage(tmp_path, monkeypatch):
    """The exit status is 0 only when every stage is ok; suite-logs/stages.json lists each stage's result."""
    gpu_suite = _trivial_suite(monkeypatch)
    monkeypatch.setattr(gpu_suite, "stages", lambda out, on_gpu=True, device="<gpu>": [
        gpu_suite.Stage("env", 30, "x", ["true"]), gpu_suite.Stage("tests", 30, "y", ["false"])])
    monkeypatch.setattr(gpu_suite, "run_stage", lambda stage, limit, log: {
        "stage": stage.name, "status": "ok" if stage.command == ["true"] else "failed (exit 1)", "seconds": 0,
        "limit_s": round(limit), "last_line": "", "log": str(log)})
    log = tmp_path / "o" / "cpu" / "suite-logs" / "tests.log"
    log.parent.mkdir(parents=True)
    log.write_text("FAILED tests/test_x.py::test_y\n")
    assert gpu_suite.main(["--allow-cpu", "--out", str(tmp_path / "o")]) == 1
    done = json.loads((tmp_path / "o" / "cpu" / "suite-logs" / "stages.json").read_text())
    assert [(d["stage"], d["status"]) for d in done] == [("env", "ok"), ("tests", "failed (exit 1)")]


def test_gpu_suite_bench_stages_pass_k_and_variant_rules_as_pytest_reads_them(tmp_path, monkeypatch):
    """A variant rule may start with '-' (leave out): it goes in one '--bench-variants=RULES' argument, or pytest
    would read it as an option; -k keeps each stage to its cases; the tests stage runs DREAM_SUITE_TEST_WORKERS
    shards and names the single tests of other files (TEST_NODES), each of which exists."""
    from bench import gpu_suite

    monkeypatch.setenv("DREAM_SUITE_TEST_WORKERS", "3")
    by_name = {stage.name: stage for stage in gpu_suite.stages(str(tmp_path))}
    kernels = by_name["kernels"].command
    assert f"--bench-variants={gpu_suite.NO_COMPILE}" in kernels and gpu_suite.NO_COMPILE not in kernels
    assert kernels[kernels.index("-k") + 1] == gpu_suite.KERNEL_CASES
    train = by_name["train"].command
    assert train[train.index("-k") + 1] == "seed-" and "--bench-variants=-*compile*,+*_step_sync" in train
    tests = by_name["tests"]
    assert tests.shards == 3
    for node in gpu_suite.TEST_NODES:
        assert str(gpu_suite.REPO / node) in tests.command
        path, name = node.split("::")
        assert f"\ndef {name}(" in (gpu_suite.REPO / path).read_text(), f"{node} names no test"


def test_gpu_suite_dry_run_shows_each_stage_s_environment_and_processes(monkeypatch, capsys):
    from bench.gpu_suite import main as suite_main

    monkeypatch.setenv("DREAM_SUITE_TEST_WORKERS", "3")
    assert suite_main(["--dry-run", "--only", "tests,sampling"]) == 0
    out = capsys.readouterr().out
    assert "[3 processes]" in out and "DREAM_TEST_SHARD=i/3" in out, out
    assert "DREAM_BENCH_DDIM_STEPS=10 DREAM_BENCH_TARGET_S=0.3 " in out, out


def test_gpu_suite_sharded_stage_status_counts_an_empty_shard_as_no_failure(tmp_path):
    """pytest exits 5 when a shard collects nothing: no failure while another shard passed; a stage where every
    shard is empty, or one shard fails, is not ok (named by the failing shard's exit); a lone command's exit 5 is a
    failure."""
    import sys

    from bench.gpu_suite import Stage, run_stage

    def stage(codes, shards=2):
        code = f"import os, sys; sys.exit({codes}[int(os.environ.get('DREAM_TEST_SHARD', '0/1').split('/')[0])])"
        return Stage("tests", 60, "x", [sys.executable, "-c", code], shards=shards)

    assert run_stage(stage([0, 5]), 30, tmp_path / "a.log")["status"] == "ok"
    assert run_stage(stage([5, 5]), 30, tmp_path / "b.log")["status"] == "failed (exit 5)"
    assert run_stage(stage([1, 0]), 30, tmp_path / "c.log")["status"] == "failed (exit 1)"
    assert run_stage(stage([1, 5]), 30, tmp_path / "e.log")["status"] == "failed (exit 1)"  # the failure, not the empty
    assert run_stage(stage([5], shards=1), 30, tmp_path / "d.log")["status"] == "failed (exit 5)"


def test_gpu_suite_headlines_give_memory_profile_tune_and_goal_lines_in_their_units(tmp_path):
    """Memory in GB (1e9 bytes) with the timed step in ms; a profile's step in ms, its busy fraction in % and
    its kernels per step; one line per tuned problem; one per goal."""
    import time as time_module

    from bench.gpu_suite import headline_lines

    started = time_module.time()
    device = tmp_path / "nvidia-h200"
    device.mkdir()
    memory = {"case": "memory/seed_b128/step", "variant": "ckpt_none", "role": "ours", "status": "ok",
              "policy": "none", "estimate_bytes": 6.5e9, "measured_bytes": 6.25e9, "fits": True, "time_s": 0.0125}
    (device / "2026-11-30-bench-memory.json").write_text(json.dumps({"results": [memory]}))
    profile = {"summary": {"step_ms": 12.5, "busy_fraction": 0.875, "steps": 3, "kernels": 600}}
    (device / "2026-11-30-profile-train.json").write_text(json.dumps(profile))
    tune = {"summaries": [{"problem": "attn16 fwd channels_last", "heuristic": {"config": {"block_m": 128}, "us": 12.0},
                           "best": {"config": {"block_m": 64}, "us": 10.0}, "heuristic_over_best": 1.2}]}
    (device / "2026-11-30-tune.json").write_text(json.dumps(tune))
    goal = {"case": "attention/n256/fwd", "goal": "1.2x over compile", "detail": "1.50x", "status": "met"}
    (device / "2026-11-30-bench-kernels.json").write_text(json.dumps({"results": [], "goals": [goal]}))
    assert sorted(headline_lines(tmp_path, started)) == sorted([
        "memory/seed_b128/step                ckpt=none      estimate   6.50 GB  measured   6.25 GB  fits 6.8 GB"
        "  step 12.5 ms",
        "profile train                        step    12.500 ms  busy  87.5%  200 kernels/step",
        "tune attn16 fwd channels_last: heuristic block_m=128 12.0 µs; best block_m=64 10.0 µs; heuristic/best 1.20",
        "goal attention/n256/fwd: 1.2x over compile: 1.50x -> met"])


@pytest.mark.parametrize("env,title,device_line", [
    ({"device_type": "cuda", "device_name": "NVIDIA H200", "driver": "570.86", "torch": "2.9.1", "triton": "3.5.1",
      "git_commit": "abc1234", "date": "2026-11-30"},
     "# GPU suite summary", "NVIDIA H200, driver 570.86, torch 2.9.1, triton 3.5.1, commit abc1234, 2026-11-30"),
    ({"device_type": "cpu", "device_name": "cpu", "torch": "2.9.1", "triton": "3.5.1", "git_commit": "abc1234",
      "date": "2026-11-30"},
     "# GPU suite summary (CPU: a check of the suite, its numbers say nothing about GPU speed)",
     "cpu, torch 2.9.1, triton 3.5.1, commit abc1234, 2026-11-30"),
])
def test_gpu_suite_summary_takes_its_device_and_label_from_the_environment(tmp_path, env, title, device_line):
    """Without an explicit on_gpu the summary is labelled by the environment's device type; the driver is named
    when there is one."""
    import time as time_module

    from bench.gpu_suite import summary_lines

    lines = summary_lines(tmp_path, [], [], time_module.time(), env)
    assert lines[0] == title and lines[2] == device_line, lines[:3]


@pytest.mark.parametrize("log,counts", [
    ("ERROR tests/test_x.py\n====== 2 errors in 1.0s ======\n", "2 error"),
    ("====== 4 skipped in 0.5s ======\n", "4 skipped"),
])
def test_gpu_suite_reads_a_count_line_without_passed_tests(tmp_path, log, counts):
    """A shard whose tests all errored at collection, or were all skipped, still has pytest's count line."""
    from bench.gpu_suite import _summed_counts

    (tmp_path / "a.log").write_text(log)
    assert _summed_counts([tmp_path / "a.log"]) == counts


def test_gpu_suite_links_a_report_under_its_own_row_only(tmp_path):
    """Rows match the start of a report's name after its date: the autotune report is not also a 'tune' one."""
    import time as time_module

    from bench.gpu_suite import report_links

    device = tmp_path / "nvidia-h200"
    device.mkdir()
    for name in ("2026-11-30-bench-autotune.md", "2026-11-30-tune.md"):
        (device / name).write_text("#")
    rows = report_links(tmp_path, time_module.time() - 60)
    assert "| kernel launch configurations (tune) | [2026-11-30-tune.md](nvidia-h200/2026-11-30-tune.md) |" in rows
    assert ("| autotuned launch configurations | "
            "[2026-11-30-bench-autotune.md](nvidia-h200/2026-11-30-bench-autotune.md) |") in rows


def test_gpu_suite_sh_passes_its_options_on_from_any_folder(tmp_path):
    import os
    import subprocess
    import sys

    from bench.gpu_suite import REPO

    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), "--list", "--only", "env,tune"], cwd=tmp_path,
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert [line.split()[0] for line in run.stdout.splitlines()] == ["env", "tune"], run.stdout


def _tune_problem(tune_kernels, configs, wrong=(), failing=(), unit="GB/s", work=2e9):
    """A Problem whose run returns the reference, scaled for a `wrong` config, raising for a `failing` one."""
    reference = (torch.randn(4, 4, generator=torch.Generator().manual_seed(1)),)

    def run(config):
        if config in failing:
            raise RuntimeError("out of resources")
        return (reference[0] * (2.0 if config in wrong else 1.0),)

    return tune_kernels.Problem("attention", "attn4 fwd channels_last", configs[0], list(configs), run, reference,
                                work, unit)


def test_tune_gives_microseconds_rates_in_the_problem_s_unit_and_the_five_fastest(monkeypatch):
    """us = seconds x 1e6; rate = work / seconds in GB/s (1e9) or TFLOP/s (1e12); top5 holds the five fastest,
    fastest first; a run past its deadline times nothing and says so."""
    from bench import tune_kernels

    configs = [f"c{i}" for i in range(7)]
    seconds = dict(zip(configs, (7e-6, 2e-6, 6e-6, 1e-6, 4e-6, 5e-6, 3e-6)))
    calls = iter(configs)
    monkeypatch.setattr(tune_kernels, "seconds_per_call", lambda fn, target_s: seconds[next(calls)])
    problem = _tune_problem(tune_kernels, configs)
    tune_kernels.measure(problem, target_s=0.001, deadline=float("inf"), dtype=torch.float32)
    s = tune_kernels.summary(problem)
    assert [r["config"] for r in s["top5"]] == ["c3", "c1", "c6", "c4", "c5"]
    assert s["best"]["us"] == pytest.approx(1.0) and s["best"]["rate"] == pytest.approx(2e9 / 1e-6 / 1e9)
    assert s["heuristic"]["us"] == pytest.approx(7.0) and s["heuristic_over_best"] == pytest.approx(7.0)
    flops = _tune_problem(tune_kernels, ["c0"], unit="TFLOP/s", work=3e12)
    calls = iter(["c3"])
    tune_kernels.measure(flops, target_s=0.001, deadline=float("inf"), dtype=torch.float32)
    assert flops.results[0]["rate"] == pytest.approx(3e12 / 1e-6 / 1e12)
    late = _tune_problem(tune_kernels, configs[:2])
    tune_kernels.measure(late, target_s=0.001, deadline=time.monotonic() - 1, dtype=torch.float32)
    assert [r["status"] for r in late.results] == ["not run (time limit)"] * 2


def test_tune_one_line_names_configs_times_and_their_ratio():
    from bench.tune_kernels import one_line

    s = {"problem": "res64 fwd channels_last", "heuristic_over_best": 1.25,
         "heuristic": {"config": {"block_c": 32, "tma": True}, "us": 12.5, "resident": True},
         "best": {"config": {"block_c": 64, "tma": False}, "us": 10.0}}
    assert one_line(s) == ("res64 fwd channels_last: heuristic block_c=32 tma=1 (resident) 12.5 µs; "
                           "best block_c=64 tma=0 10.0 µs; heuristic/best 1.25")
    failed = {"problem": "p", "heuristic_over_best": None, "best": None,
              "heuristic": {"config": {"block_c": 32}, "status": "failed: RuntimeError: x"}}
    assert one_line(failed) == "p: heuristic block_c=32 failed: RuntimeError: x; best —"


@pytest.mark.parametrize("arch,expected", [(None, (90, 132)), (80, (80, 108)), (89, (89, 142))])
def test_tune_target_gpu_without_a_gpu_is_the_arch_s_reference_part(monkeypatch, arch, expected):
    from bench import tune_kernels

    monkeypatch.setattr(tune_kernels, "ON_GPU", False)
    assert tune_kernels.target_gpu(arch) == expected


def test_tune_target_gpu_refuses_an_arch_without_limits():
    from bench import tune_kernels

    with pytest.raises(SystemExit, match="no SM limits for sm_75"):
        tune_kernels.target_gpu(75)


def test_tune_seconds_per_call_divides_rounds_of_about_a_fifth_of_the_target(monkeypatch):
    """Two calls to warm up and size the rounds, then five rounds of about target_s / 5 each; the result is per
    call, not per round."""
    from bench import harness, tune_kernels

    monkeypatch.setattr(harness, "ON_GPU", False)
    calls = []

    def sleep_2ms():
        calls.append(1)
        time.sleep(0.002)

    per_call = tune_kernels.seconds_per_call(sleep_2ms, target_s=0.05)
    assert 0.0015 < per_call < 0.006, per_call
    assert 2 + 5 <= len(calls) <= 2 + 5 * 5, len(calls)  # a round of 0.01 s holds at most 5 calls of 2 ms


def _fake_tuning_run(monkeypatch, out, problems, argv=()):
    from bench import tune_kernels

    monkeypatch.setattr(tune_kernels, "build_problems", lambda *a: problems)
    monkeypatch.setattr(tune_kernels, "seconds_per_call", lambda fn, target_s: 1e-5)
    return tune_kernels.main(["--allow-cpu", "--compile-workers", "0", "--out", str(out), *argv])


def test_tune_exit_status_says_whether_a_candidate_was_wrong_or_the_heuristic_failed(tmp_path, monkeypatch, capsys):
    """0 when every candidate checks (or, cut short by --time-limit, none ran); 1 when one is wrong, or when the
    heuristic's own pick fails, which is named on stderr."""
    from bench import tune_kernels

    heuristic, other = {"block_m": 128}, {"block_m": 64}

    def problems(**kwargs):
        return [_tune_problem(tune_kernels, [heuristic, other], **kwargs)]

    assert _fake_tuning_run(monkeypatch, tmp_path / "ok", problems()) == 0
    assert _fake_tuning_run(monkeypatch, tmp_path / "wrong", problems(wrong=[other])) == 1
    assert "the heuristic's own" not in capsys.readouterr().err
    assert _fake_tuning_run(monkeypatch, tmp_path / "failing", problems(failing=[heuristic])) == 1
    assert "the heuristic's own configuration failed for attn4 fwd channels_last" in capsys.readouterr().err
    assert _fake_tuning_run(monkeypatch, tmp_path / "late", problems(), ["--time-limit", "1e-9"]) == 0
    (path,) = (tmp_path / "late" / "cpu").glob("*-tune.json")
    report = json.loads(path.read_text())
    assert [r["status"] for r in report["summaries"][0]["problems"]] == ["not run (time limit)"] * 2


def test_tune_static_only_fails_when_the_heuristic_s_pick_spills(tmp_path, monkeypatch, capsys):
    from bench import compile_report, tune_kernels

    monkeypatch.setattr(compile_report, "ptxas_available", lambda: True)
    monkeypatch.setattr(compile_report, "ptxas_version", lambda: "V12.8.93")
    heuristic, other = json.dumps({"block_m": 128}, sort_keys=True), json.dumps({"block_m": 64}, sort_keys=True)
    spills = {"kernels": {"attention_forward_kernel": {"registers": 255, "spilled_bytes": 96}}}
    ok = {"kernels": {"attention_forward_kernel": {"registers": 128, "spilled_bytes": 0}}}
    facts = {"attn16 fwd channels_last": {"heuristic": heuristic, "candidates": {heuristic: spills, other: ok}},
             "attn8 fwd channels_last": {"heuristic": other, "candidates": {other: ok, heuristic: spills}}}
    monkeypatch.setattr(tune_kernels, "compile_in_workers", lambda *a: facts)
    assert tune_kernels.main(["--static-only", "--only", "attention", "--out", str(tmp_path), "--arch", "90"]) == 1
    out = capsys.readouterr().out
    assert "4 candidates compiled for sm_90" in out and ": 2 not timeable" in out, out
    assert out.splitlines()[0].endswith("; the heuristic's pick spills or fails for attn16 fwd channels_last"), out


def test_compile_report_occupancy_reserves_shared_memory_per_program_and_caps_programs():
    from bench.compile_report import SM_LIMITS, occupancy

    h100, l40s = SM_LIMITS[90], SM_LIMITS[89]
    # 97 registers are allocated as 104: 104 x 32 x 4 = 13312 per program -> 4 in 65536 (5 at 97)
    assert occupancy(97, 0, 4, h100) == 4
    # 76 KB + 1 KB reserved per program: 3 x 77 KB > 228 KB -> 2 (3 without the reserve)
    assert occupancy(32, 76 * 1024, 4, h100) == 2
    # nothing else binds one small warp: the SM's program limit does (32 on sm_90, 24 on sm_89)
    assert occupancy(8, 0, 1, h100) == 32 and occupancy(8, 0, 1, l40s) == 24


def test_compile_report_row_takes_the_larger_shared_memory_and_leaves_launch_options_out_of_the_config(monkeypatch):
    """A row from a compiled kernel: shared memory the larger of Triton's and cuobjdump's, programs per SM from
    it, warp occupancy = programs x warps / max warps, fp32 GroupNorm loops per 4-byte element; the markdown
    gives stack + local bytes and shared memory in KB (1024 bytes)."""
    from types import SimpleNamespace

    from bench import compile_report

    usage = {"reg": 64, "stack": 8, "local": 16, "shared": 70 * 1024, "spill_stores": 1, "spill_loads": 2,
             "hgmma": 0, "hmma": 0, "inner_loops": [{"instructions": 56, "load_bytes": 16}]}
    monkeypatch.setattr(compile_report, "resource_usage", lambda cubin: usage)
    compiled = SimpleNamespace(asm={"cubin": b"cubin"}, src=SimpleNamespace(signature={"x_ptr": "*fp32"}),
                               metadata=SimpleNamespace(shared=16 * 1024, num_warps=8, num_stages=2))
    meta = {"BLOCK_C": 32, "FUSED_STATS": False, "num_warps": 8, "num_stages": 2}
    entry = compile_report.CompiledConfig("_gn_fwd_kernel", meta, compiled, {"bf16", "fp32"},
                                          {"gn_fwd B=128 nchw (128, 256, 32, 32)"})
    (row,) = compile_report.summarize({("_gn_fwd_kernel", "hash"): entry}, 90)
    # registers 64 x 32 x 8 -> 4 programs; shared (70 + 1) KB -> 3; warps 64 / 8 -> 8
    assert row["shared_bytes"] == 70 * 1024 and row["programs_per_sm"] == 3
    assert row["warp_occupancy"] == pytest.approx(3 * 8 / 64, abs=1e-3)
    assert row["config"] == {"BLOCK_C": 32, "FUSED_STATS": False} and row["num_warps"] == 8
    assert row["kernel"] == "gn_fwd_kernel" and row["precisions"] == ["fp32", "bf16"]
    assert row["inner_loop_instructions_per_element"] == [56 * 4 / 16]
    report = {"environment": {"target": "sm_90", "sm": "H100", "triton": "3", "ptxas": "12", "torch": "2",
                              "commit": "c", "date": "d"},
              "recorded": ["B=128 nchw"], "precisions": ["fp32", "bf16"], "kernels": [row], "failures": [],
              "problems": [], "warp_mma": [], "command": "python3 -m bench.compile_report"}
    assert ("| gn_fwd_kernel | BLOCK_C=32 FUSED_STATS=0 | 8 | 2 | 64 | 24 | 1/2 | 0/0 | 70.0 | 56 [14.0/elem] | 3 |"
            in compile_report.markdown(report))


def test_compile_report_counts_sites_per_recording():
    from bench.compile_report import _sites_text

    sites = ["gn_fwd B=128 nchw (128, 256, 32, 32)", "gn_fwd B=128 nchw eval (128, 256, 32, 32)",
             "gn_fwd B=128 nchw (128, 512, 16, 16)", "gn_fwd B=2 channels_last (2, 256, 32, 32)",
             "gn_fwd contract pre (3, 96, 7, 5)"]
    assert _sites_text(sites) == "B=128 nchw ×2, B=128 nchw eval ×1, B=2 channels_last ×1, contract ×1"


def test_compile_report_replays_an_output_dtype_argument_in_the_precision_under_test():
    from bench.compile_report import OpCall, _as_precision

    grad = torch.empty(2, 3, 4, 4, device="meta")
    call = OpCall("dream_kernels::upsample2x_bilinear_backward", (grad, torch.float32, False), "site")
    replayed, dtype, channels_last = _as_precision(call, torch.bfloat16)
    assert replayed.dtype == dtype == torch.bfloat16 and channels_last is False


@pytest.mark.parametrize("argv,env,message", [
    (["--batches", "0,2"], None, "--batches must be positive integers separated by commas, got '0,2'"),
    (["--batches", "128,x"], None, "--batches must be positive integers separated by commas, got '128,x'"),
    ([], "1", "it compiles real kernels: unset TRITON_INTERPRET (it is set to 1)"),
])
def test_compile_report_refuses_bad_batches_and_the_interpreter_in_one_line(monkeypatch, capsys, argv, env, message):
    from bench import compile_report

    if env is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", env)
    monkeypatch.setattr(compile_report, "ptxas_available", lambda: True)
    monkeypatch.setattr(compile_report, "record_model_calls", lambda *a: pytest.fail("recorded before the checks"))
    with pytest.raises(SystemExit) as exit_info:
        compile_report.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_param_grads_count_a_missing_gradient_as_zeros_and_refuse_a_count_mismatch():
    from bench.workloads import param_grads

    used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))
    (used * 2).sum().backward()
    grads = param_grads([used, unused])
    assert torch.equal(grads[0], torch.full((3,), 2.0)) and torch.equal(grads[1], torch.zeros(4))
    with pytest.raises(ValueError, match="1 gradients for 2 parameters"):
        param_grads([used, unused], [torch.ones(3)])


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_workload_autocast_runs_matmuls_in_its_precision(precision, dtype):
    from bench.harness import DEVICE
    from bench.workloads import autocast

    a = torch.ones(4, 4, device=DEVICE)
    with autocast(precision):
        assert (a @ a).dtype == dtype


def test_cloned_model_has_the_reference_s_weights_in_the_layout_asked_for():
    from bench.workloads import build_model, clone_model

    reference = build_model("eager", seed=3)
    for channels_last in (False, True):
        clone = clone_model(reference, "eager", channels_last=channels_last)
        assert all(torch.equal(a, b) for a, b in zip(clone.state_dict().values(), reference.state_dict().values()))
        convs = [p for p in clone.parameters() if p.dim() == 4 and p.shape[-2:] == (3, 3)]  # 1x1: either layout
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) == channels_last for p in convs)
