"""The GPU suite: one command, under 8 minutes on one H200, everything into one folder, a short table last.

    bash bench/gpu_suite.sh [--out DIR] [--budget SECONDS] [--archive FILE.tar.gz] [--only a,b] [--skip a,b]
                            [--list] [--dry-run] [--allow-cpu]

Runs from the source tree (PYTHONPATH=<repo>); needs only torch, triton, numpy, pytest, pytest-benchmark
and nvidia-ml-py (no torch-fidelity, no xformers, no network). Stages, most valuable first, each under
its own time limit (SIGINT first, so pytest still writes its report; SIGKILL 20 s later) and all of them
under the overall budget (default 465 s, counted from the suite's start, its last FINISH_S kept for the
summary and the archive): a stage starts only with at least MIN_STAGE_S left, and gets min(its limit,
what is left). Stages:

  env       nvidia-smi and versions
  tests     correctness at full size: kernels forward/backward incl. bf16, UNet triton vs eager, sampling
            graphs (the GPU-relevant files of tests/, and the trainer's backend and layout comparisons)
  memory    the 6.8 GB budget of the seed objective step at batch 128 (estimate beside measurement)
  train     the seed objective's training step: ours vs eager fp32/bf16 and the seed's own way
  sampling  one ancestral step, and a short DDIM loop with and without CUDA graphs
  profile   `dream profile`: torch.profiler over a training step (in the default channels_last, and in
            NCHW for comparison), a sampling step, a graphed DDIM loop (--allow-cpu without a GPU: the
            training step in both layouts and a DDIM-4 loop on the engine sampler, at CPU sizes)
  kernels   attention at N=256/64, GroupNorm at two UNet sites (64x64 also with fused dropout), the
            64x64 skip concatenation and residual sum with bias vs eager, compile, SDPA backends
  tune      bench/tune_kernels.py: candidate launch configurations of both kernels at the UNet's sites,
            each checked then timed beside the heuristics' pick (channels_last, quick grid)
  unet      UNet forward and forward+backward vs eager, SDPA (no compile)
  compile   the torch.compile anchors and ours compiled (training step, sampling graphs), and
            max-autotune for the headline kernel cases: only with the time that is left
  autotune  ours with launch configurations autotuned at first use (kernels.autotune) beside the
            heuristics': the headline kernel cases, the seed training step, graphed DDIM-10

The tests stage runs DREAM_SUITE_TEST_WORKERS (default 6) pytest processes side by side, each on every
n-th test (bench/pytest_shard.py; no pytest-xdist needed): on a fresh machine its time goes mostly to
compiling Triton kernels on the CPU, and the processes share Triton's on-disk cache. One log and one
junit XML per shard; the stage's line sums their counts.

Output (DIR, default profiles/; env DREAM_SUITE_OUT): <DIR>/<gpu>/<date>-<stage>.md/.json (benchmarks,
profiles, Chrome traces), <DIR>/<gpu>/suite-logs/<stage>.log and summary.md (<DIR>/cpu/suite-logs with
--allow-cpu: a check of the suite never replaces a GPU's record). With --archive,
everything written is also packed into one .tar.gz (e.g. into the device tool's $OUT, which takes few files).
The output folder and the archive path are checked before any stage runs.

--dry-run prints each stage's command as a run with the same options would run it; --allow-cpu runs without a
GPU at the tools' CPU sizes, to check the suite itself (summary.md and the headline numbers then say CPU).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

STARTED_AT = time.monotonic()  # run as a script: the budget counts from here, before torch and CUDA start
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script (python3 bench/gpu_suite.py) from the source tree
    sys.path.insert(0, str(REPO))
from bench.pytest_shard import INTERRUPTED_LINE, SHARD_VARIABLE, STOP_VARIABLE  # noqa: E402
from dream.cli import OneLineErrors  # noqa: E402
from dream.files import folder_problem  # noqa: E402
PYTHON = os.environ.get("PYTHON", sys.executable or "python3")
MIN_STAGE_S = 45  # a stage starts only with this much budget left (its limit then >= 20 s)
FINISH_S = 10  # the end of the budget kept for the environment probe, the summary and the archive
GRACE_S = 20

TEST_FILES = ["tests/test_group_norm_silu.py", "tests/test_norm_conv.py", "tests/test_attention.py",
              "tests/test_upsample_concat.py", "tests/test_bias_residual.py", "tests/test_kernel_autotune.py",
              "tests/test_model*.py", "tests/test_step_graph.py",
              "tests/test_unet*.py", "tests/test_sampling*.py", "tests/test_memory*.py"]
# single tests of other files whose GPU form matters (the rest of those files checks CPU-side logic)
TEST_NODES = ["tests/test_trainer.py::test_eager_and_triton_trainers_follow_the_same_loss_trajectory",
              "tests/test_trainer.py::test_channels_last_trainer_step_gives_the_nchw_loss_and_gradients",
              "tests/test_trainer.py::test_steady_training_steps_make_no_host_sync_on_cuda",
              "tests/test_data.py::test_images_kept_on_the_host_give_the_same_batches_bit_for_bit"]
# pytest -k substrings: res64_pre_ss also selects res64_pre_ss_drop, skip64 and resid64 their _nchw forms
KERNEL_CASES = "res64_pre_ss or res16_pre_ss or n256 or n64 or skip64 or resid64"
NO_COMPILE = "-*compile*"
# ours with the heuristics' launch configurations and autotuned ones, side by side (nothing else runs)
AUTOTUNE_VARIANTS = "triton,triton_autotuned,triton_bf16,triton_bf16_autotuned,engine_triton_bf16_graphs," \
                    "engine_triton_bf16_graphs_autotuned"


@dataclass
class Stage:
    name: str
    limit_s: int
    what: str
    command: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    shards: int = 1  # > 1: that many copies side by side, DREAM_TEST_SHARD=i/n, "{shard}" in the command -> i


def bench(files, name, out, logs, k=None, variants=None, extra=()):
    command = [PYTHON, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", "--benchmark-only",
               "--benchmark-columns=median,iqr,rounds", "--bench-out", out, "--bench-name", name,
               f"--benchmark-json={logs}/{name}-pytest-benchmark.json"]
    if k:
        command += ["-k", k]
    if variants:
        command += [f"--bench-variants={variants}"]  # "=": a value may start with "-"
    return command + list(extra)


def test_workers() -> int:
    """pytest processes for the correctness tests (DREAM_SUITE_TEST_WORKERS, default 6)."""
    text = os.environ.get("DREAM_SUITE_TEST_WORKERS", "6").strip()
    if not text.isdigit() or int(text) < 1:
        raise SystemExit(f"gpu_suite: DREAM_SUITE_TEST_WORKERS must be a positive integer, got {text!r}")
    return int(text)


def number(kind: type, low: float, strict: bool = False):
    """An argparse type: a finite `kind` (int or float) >= low (> low when strict)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'} "
                                             f"{'>' if strict else '>='} {low:g}")
        return value

    return parse


def archive_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be the archive (one line), or None: its folder exists now and is writable."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a folder; give a file name, e.g. {path / 'gpu-suite.tar.gz'}"
    return folder_problem(path.parent)


def logs_folder(out: str | Path, device: str) -> str:
    """<out>/<device>/suite-logs: device is `cpu` or the GPU's slug (dream.profile.device_slug)."""
    return f"{out}/{device}/suite-logs"


def suite_device(on_gpu: bool) -> str:
    if not on_gpu:
        return "cpu"
    import torch

    from dream.profile import device_slug

    return device_slug({"device_type": "cuda", "device_name": torch.cuda.get_device_name()})


def write_archive(archive: Path, out: Path, started: float) -> None:
    """Everything under `out` written since `started`, packed into `archive` (unpack with tar -C profiles/)."""
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(out.rglob("*")):
            if path.is_file() and path.stat().st_mtime >= started - 1 and path.resolve() != archive.resolve():
                tar.add(path, arcname=str(path.relative_to(out)))


def stages(out: str, on_gpu: bool = True, device: str = "<gpu>") -> list[Stage]:
    """The stages; on_gpu=False (--allow-cpu without a GPU) swaps the GPU-only options of the tools for
    their CPU forms (a plain sampling loop to profile, the tuner's interpreter check). The logs go to
    <out>/<device>/suite-logs, beside that device's reports (a CPU check never touches a GPU's record)."""
    logs = logs_folder(out, device)
    tests = sorted({f for pattern in TEST_FILES for f in glob.glob(str(REPO / pattern))})
    tests += [str(REPO / node) for node in TEST_NODES]
    if on_gpu:
        profile_what = ("torch.profiler over a training step (channels_last, captured as a CUDA graph, then NCHW), "
                        "a sampling step and a graphed DDIM-10 loop")
        profiles = ["--warmup 2 --steps 3", "--what train --cuda-graphs --warmup 1 --steps 3",
                    "--what train --no-channels-last --warmup 2 --steps 3",
                    "--what sample --sampler graphs --sample-steps 10 --batch 256 --warmup 1 --steps 2"]
    else:  # the tools' CPU sizes (tiny preset, batch 2, one step): two processes, well inside the stage's limit
        profile_what = ("torch.profiler over a training step (NCHW, then channels_last) and a DDIM-4 loop "
                        "(engine sampler), CPU sizes")
        profiles = ["--sampler engine --sample-steps 4", "--what train --channels-last"]
    env_script = ("import json, torch; from dream.profile import environment_info; i = environment_info(); "
                  "print(json.dumps(i, indent=1)); print(f\"env: {i['device_name']}, driver {i['driver']}, "
                  "torch {i['torch']}, triton {i['triton']}\")")
    return [
        Stage("env", 30, "nvidia-smi and versions",
              ["bash", "-c", "nvidia-smi || true; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,"
                             "power.draw,power.limit,temperature.gpu --format=csv || true; "
                             f"{shlex.quote(PYTHON)} -c {shlex.quote(env_script)}"]),
        Stage("tests", 110, f"correctness {'at full size' if on_gpu else 'at CPU sizes (interpreter)'} ("
              + ", ".join(Path(t).name for t in tests) + ")",
              [PYTHON, "-m", "pytest", *tests, "-v", "-p", "no:cacheprovider", "-p", "bench.pytest_shard",
               "--maxfail=10", "-rfEs", f"--junitxml={logs}/tests-{{shard}}-junit.xml"],
              {"DREAM_TEST_FIRST": "gpu-only,test_unet_backends.py,test_trainer.py,test_step_graph.py"},
              shards=test_workers()),
        Stage("memory", 60, "6.8 GB budget of the seed step at batch 128",
              bench(["bench/test_memory_budget.py"], "bench-memory", out, logs, extra=["-s"])),
        Stage("train", 115, "seed objective training step (no compile; captured as a CUDA graph; with each step "
                            "read back, as a diagnostic)",
              bench(["bench/test_bench_train_step.py"], "bench-train", out, logs, k="seed-",
                    variants=NO_COMPILE + ",+*_step_sync"),
              {"DREAM_BENCH_TARGET_S": "0.5"}),
        Stage("sampling", 70, "ancestral step and DDIM-10 loop" + (", CUDA graphs" if on_gpu else ", no graphs on CPU"),
              bench(["bench/test_bench_sampling.py"], "bench-sampling", out, logs, variants=NO_COMPILE),
              {"DREAM_BENCH_DDIM_STEPS": "10", "DREAM_BENCH_TARGET_S": "0.3"}),
        Stage("profile", 95, profile_what, ["bash", "-c", " && ".join(
            f"{shlex.quote(PYTHON)} -m dream profile --out {shlex.quote(out)} {options}" for options in profiles)]),
        Stage("kernels", 110, "GroupNorm, attention, the skip concatenation and the residual sum vs their anchors",
              bench(["bench/test_bench_attention.py", "bench/test_bench_group_norm.py", "bench/test_bench_upsample.py",
                     "bench/test_bench_bias_residual.py"], "bench-kernels", out, logs,
                    k=KERNEL_CASES, variants=NO_COMPILE), {"DREAM_BENCH_TARGET_S": "0.25"}),
        Stage("tune", 100, "kernel launch configurations timed beside the heuristics' picks (quick grid)" if on_gpu
              else "kernel launch configurations checked and timed beside the heuristics' picks (tiny sizes, "
                   "interpreter)",
              [PYTHON, "-m", "bench.tune_kernels", "--out", out, "--time-limit", "85"]
              + ([] if on_gpu else ["--allow-cpu"])),
        Stage("unet", 60, "UNet forward and forward+backward (no compile)",
              bench(["bench/test_bench_unet.py"], "bench-unet", out, logs, variants=NO_COMPILE),
              {"DREAM_BENCH_TARGET_S": "0.3"}),
        Stage("compile", 400, "torch.compile anchors (default and max-autotune) and ours compiled",
              bench(["bench/test_bench_train_step.py", "bench/test_bench_sampling.py", "bench/test_bench_group_norm.py",
                     "bench/test_bench_attention.py"], "bench-compile", out, logs,
                    k="seed- or ddim or res64_pre_ss or n256",
                    variants="train_step/seed/step:*compile*,sampling/*:*compile*,"
                             "group_norm/res64_pre_ss/fwd+bwd:*compile*,attention/n256/fwd+bwd:*compile*"),
              {"DREAM_BENCH_DDIM_STEPS": "10", "DREAM_BENCH_TARGET_S": "0.3"}),
        Stage("autotune", 240, "launch configurations autotuned at first use (--autotune-kernels) beside the "
                               "heuristics': headline kernels, training step, graphed DDIM-10",
              bench(["bench/test_bench_group_norm.py", "bench/test_bench_attention.py",
                     "bench/test_bench_train_step.py", "bench/test_bench_sampling.py"], "bench-autotune", out, logs,
                    k="res64_pre_ss_drop- or res64_pre_ss-fwd or n256 or n64 or seed- or ddim",
                    variants=AUTOTUNE_VARIANTS),
              {"DREAM_BENCH_DDIM_STEPS": "10", "DREAM_BENCH_TARGET_S": "0.3"}),
    ]


def run_stage(stage: Stage, limit: float, log_path: Path, grace_s: float = GRACE_S) -> dict:
    """Run the stage's command (or its shards side by side) under `limit` seconds: SIGINT at the limit, so
    pytest still writes its report, SIGKILL `grace_s` later."""
    stop_file = log_path.with_name(f"{log_path.stem}.stop")  # created before the limit's SIGINT (pytest_shard)
    stop_file.unlink(missing_ok=True)
    env = {**os.environ, **stage.env, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ['PYTHONPATH']}"
           if os.environ.get("PYTHONPATH") else str(REPO), "PYTHONUNBUFFERED": "1", STOP_VARIABLE: str(stop_file)}
    sharded = stage.shards > 1
    runs = [([c.replace("{shard}", str(i)) for c in stage.command],
             {**env, SHARD_VARIABLE: f"{i}/{stage.shards}"} if sharded else env,
             log_path.with_name(f"{log_path.stem}-{i}{log_path.suffix}") if sharded else log_path)
            for i in range(stage.shards)]
    paths = [path for _, _, path in runs]
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # an ignored SIGINT (a shell's background job) survives exec: the stages would not see the limit's
        # SIGINT and would be killed without their reports. A handled one is reset to the default by exec.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    start = time.monotonic()
    processes, logs, timed_out = [], [], False
    try:
        for command, run_env, path in runs:
            log = open(path, "w")
            logs.append(log)
            prefix = f"{SHARD_VARIABLE}={run_env[SHARD_VARIABLE]} " if sharded else ""
            log.write("$ " + prefix + " ".join(shlex.quote(c) for c in command) + "\n")
            log.flush()
            processes.append(subprocess.Popen(command, cwd=REPO, env=run_env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        timed_out = not _wait_all(processes, start + limit)
        if timed_out:  # SIGINT: pytest still finishes its session and writes its report
            stop_file.touch()
            _interrupt(processes, paths, time.monotonic() + grace_s, repeat=sharded)
    except BaseException:  # a failed start or Ctrl-C here: leave no shard running
        for process in processes:
            _signal_group(process.pid, signal.SIGKILL)
        raise
    finally:
        for log in logs:
            log.close()
        stop_file.unlink(missing_ok=True)
    seconds = time.monotonic() - start
    codes = [process.returncode for process in processes]
    if timed_out:
        status = "timeout"
    elif sharded:  # pytest's exit 5 (no tests collected) is an empty shard, not a failure
        failed = [code for code in codes if code not in (0, 5)]
        status = "ok" if not failed and any(code == 0 for code in codes) else f"failed (exit {max(failed or codes)})"
    else:
        status = "ok" if codes[0] == 0 else f"failed (exit {codes[0]})"
    if sharded:
        last_line = f"{stage.shards} shards: {_summed_counts(paths)}"
        log_path.write_text("".join(path.read_text(errors="replace") for path in paths))
    else:
        last_line = _last_line(log_path)
    return {"stage": stage.name, "status": status, "seconds": round(seconds, 1), "limit_s": round(limit),
            "log": str(log_path), "last_line": last_line}


def _interrupt(processes: list, logs: list[Path], deadline: float, repeat: bool = False,
               every_s: float = 4.0) -> None:
    """SIGINT to every process, then SIGKILL at `deadline`. With `repeat` (test shards, whose plugin
    prints INTERRUPTED_LINE when pytest takes the interrupt), SIGINT again every `every_s` seconds to a
    process whose log does not show that line yet: an interrupt raised inside torch's C++ code can be
    lost there."""
    for process in processes:
        _signal_group(process.pid, signal.SIGINT)
    while not _wait_all(processes, min(time.monotonic() + every_s, deadline)):
        if time.monotonic() >= deadline:
            for process in processes:
                _signal_group(process.pid, signal.SIGKILL)
            _wait_all(processes, None)
            return
        if repeat:
            for process, log in zip(processes, logs):
                if process.poll() is None and INTERRUPTED_LINE not in log.read_text(errors="replace"):
                    _signal_group(process.pid, signal.SIGINT)


def _wait_all(processes: list, deadline: float | None) -> bool:
    """Wait for every process until `deadline` (time.monotonic(); None: no limit); True when all exited."""
    for process in processes:
        try:
            process.wait(timeout=None if deadline is None else max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            return False
    return True


RESULT_LINE = re.compile(r"^\S+::\S.* (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def _summed_counts(paths: list[Path]) -> str:
    """pytest's final count lines of several logs added up: "500 passed, 2 failed, 30 skipped"
    (deselected counts are left out: each shard deselects the others' tests). A log without one (a
    killed shard) is counted from its per-test lines (pytest -v) and named."""
    totals: dict[str, int] = {}
    killed = []
    for index, path in enumerate(paths):
        lines = _read_lines(path)
        line = _count_line(lines)
        if line is not None:
            counts = re.findall(r"(\d+) (\w+)", line)
        else:
            killed.append(str(index))
            results = [m.group(1) for m in map(RESULT_LINE.match, lines) if m]
            counts = [(results.count(r), r.lower()) for r in sorted(set(results))]
        for number, word in counts:
            word = {"errors": "error", "warnings": "warning", "xfail": "xfailed", "xpass": "xpassed"}.get(word, word)
            totals[word] = totals.get(word, 0) + int(number)
    order = ["passed", "failed", "error", "skipped", "xfailed", "xpassed", "warning"]
    text = ", ".join(f"{totals[word]} {word}" for word in order if totals.get(word)) or "no results"
    return text + (f" (killed: shard {', '.join(killed)}, counted from its log)" if killed else "")


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:  # the stage ended on its own in the meantime
        pass


def _count_line(lines: list[str]) -> str | None:
    """pytest's final count line ("3 passed, 1 skipped in 2.0s"), if the log has one."""
    for line in reversed(lines):
        if any(word in line for word in (" passed", " failed", " error", " skipped")) and " in " in line:
            return line.strip().strip("= ")
    return None


def _last_line(path: Path) -> str:
    """pytest's final count line, else the log's last line."""
    lines = [line for line in _read_lines(path) if line.strip()]
    return _count_line(lines) or (lines[-1].strip()[:160] if lines else "")


def _reports(out: Path, started: float) -> list[dict]:
    found = []
    for path in sorted(out.glob("*/*.json")) + sorted(out.glob("*/*.partial.jsonl")):
        if path.stat().st_mtime < started - 1:
            continue
        try:
            if path.suffix == ".jsonl":  # a result recorded again replaces the earlier line
                latest = {}
                for line in path.read_text().splitlines():
                    if line.strip():
                        result = json.loads(line)
                        latest[(result.get("case"), result.get("variant"))] = result
                found.append({"path": path, "results": list(latest.values()), "partial": True})
            else:
                report = json.loads(path.read_text())
                if isinstance(report, dict):  # not a stage list (a list)
                    found.append({"path": path, **report})
        except (OSError, ValueError):
            continue
    return found


def headline_lines(out: Path, started: float, on_gpu: bool = True) -> list[str]:
    """Per benchmark case: the fastest ours, its time and % of ceiling (n/a on the CPU, whose ceilings mean
    nothing), the speed-up over the fastest anchor (3 significant figures); memory rows; profile summaries."""
    from dream.profile import significant

    lines = []
    for report in _reports(out, started):
        results = report.get("results")
        if results:
            cases = {}
            for r in results:
                cases.setdefault(r["case"], []).append(r)
            for case_id, rows in cases.items():
                if any("estimate_bytes" in r for r in rows):
                    for r in rows:
                        measured = r.get("measured_bytes")
                        text = (f"{case_id:<36} ckpt={r.get('policy'):<9} estimate {r['estimate_bytes'] / 1e9:6.2f} GB")
                        if measured is not None:
                            text += (f"  measured {measured / 1e9:6.2f} GB  "
                                     f"{'fits' if r.get('fits') else 'OVER'} 6.8 GB")
                        if r.get("time_s"):
                            text += f"  step {r['time_s'] * 1e3:.1f} ms"
                        lines.append(text)
                    continue
                done = [r for r in rows if r.get("status") == "ok" and r.get("time_s")]
                ours = [r for r in done if r["role"] == "ours"]
                anchors = [r for r in done if r["role"] != "ours"]
                bad = [f"{r['variant']} ({r['status']})" for r in rows if r.get("status") in ("mismatch", "error")]
                text = f"{case_id:<36}"
                if ours:
                    best = min(ours, key=lambda r: r["time_s"])
                    text += f" {best['variant'][:30]:<30} {best['time_s'] * 1e3:9.3f} ms"
                    pct = best.get("pct_ceiling")
                    text += (f" {pct:5.1f}%" if pct is not None else "       ") if on_gpu else "  n/a (CPU)"
                    if anchors:
                        fastest = min(anchors, key=lambda r: r["time_s"])
                        text += f"  {significant(fastest['time_s'] / best['time_s'])}x vs {fastest['variant']}"
                if bad:
                    text += f"  FAILED {', '.join(bad)}"
                if ours or bad:
                    lines.append(text)
        summary = report.get("summary")
        if summary and "step_ms" in summary:
            busy = summary.get("busy_fraction")
            steps = max(summary.get("steps") or 1, 1)
            label = report["path"].name.split(".")[0].split("-profile-")[-1]
            lines.append(f"profile {label:<28} step {summary['step_ms']:9.3f} ms  "
                         f"busy {100 * busy:5.1f}%  {summary.get('kernels', 0) / steps:.0f} kernels/step"
                         if busy is not None else f"profile {label}: step {summary['step_ms']:.3f} ms")
        if report.get("summaries"):
            from bench.tune_kernels import one_line

            lines += [f"tune {one_line(s)}" for s in report["summaries"]]
        for goal in report.get("goals") or []:
            lines.append(f"goal {goal['case']}: {goal['goal']}: {goal.get('detail', '')} -> {goal['status']}")
    return lines


REPORT_ROWS = [("kernels (GroupNorm, attention, skip concatenation, residual sum)", "bench-kernels"),
               ("training step (`seed` objective)", "bench-train"),
               ("memory budget (6.8 GB at batch 128)", "bench-memory"),
               ("sampling (step, DDIM loop, CUDA graphs)", "bench-sampling"),
               ("UNet forward / forward+backward", "bench-unet"),
               ("profile: training step / sampling step", "profile-"),
               ("kernel launch configurations (tune)", "tune"), ("torch.compile anchors", "bench-compile"),
               ("autotuned launch configurations", "bench-autotune")]


def report_links(out: Path, started: float) -> list[str]:
    """A markdown table: each kind of report this run wrote (its .md files under <out>/<device>/)."""
    written = [p for p in sorted(out.glob("*/*.md")) if p.parent.name != "suite-logs"
               and p.stat().st_mtime >= started - 1]
    rows = []
    for what, stem in REPORT_ROWS:
        found = [p for p in written if p.stem.split("-", 3)[-1].startswith(stem)]
        links = ", ".join(f"[{p.name}]({p.relative_to(out).as_posix()})" for p in found)
        rows.append(f"| {what} | {links or '—'} |")
    return ["| what | report |", "| --- | --- |", *rows]


def main(argv=None, start: float | None = None) -> int:
    parser = OneLineErrors(prog="bench/gpu_suite.sh", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--out", default=os.environ.get("DREAM_SUITE_OUT", str(REPO / "profiles")),
                        help="output folder (env DREAM_SUITE_OUT; default profiles/)")
    parser.add_argument("--budget", type=number(float, MIN_STAGE_S + FINISH_S), default=None,
                        help=f"overall seconds for all stages, at least {MIN_STAGE_S + FINISH_S} (default 465; "
                             f"env DREAM_SUITE_BUDGET)")
    parser.add_argument("--archive", help="also pack everything written into this .tar.gz")
    parser.add_argument("--only", help="comma-separated stages to run (in the suite's order)")
    parser.add_argument("--skip", help="comma-separated stages to leave out")
    parser.add_argument("--list", action="store_true", help="list the stages and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the commands a run with these options would run, without running them")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run without a GPU (small CPU sizes: for checking the suite itself)")
    args = parser.parse_args(argv)
    if args.budget is None:
        text = os.environ.get("DREAM_SUITE_BUDGET", "465")
        try:
            args.budget = number(float, MIN_STAGE_S + FINISH_S)(text)
        except argparse.ArgumentTypeError as error:
            parser.error(f"DREAM_SUITE_BUDGET: {error}")

    out = Path(args.out).resolve()
    names = [s.name for s in stages(str(out))]
    for option in (args.only, args.skip):
        unknown = [n for n in (option or "").split(",") if n and n not in names]
        if unknown:
            parser.error(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(names)}")
    chosen = [n for n in names if n in (args.only or ",".join(names)).split(",")
              and n not in (args.skip or "").split(",")]
    if not chosen:
        parser.error("--only and --skip leave no stage to run")
    on_gpu = True
    if args.allow_cpu or not (args.list or args.dry_run):
        import torch

        on_gpu = torch.cuda.is_available()
    # without a GPU (--allow-cpu) the same stages run with the tools' CPU options
    device = suite_device(on_gpu) if args.allow_cpu or not (args.list or args.dry_run) else "<gpu>"
    plan = [s for s in stages(str(out), on_gpu, device) if s.name in chosen]
    if args.list or args.dry_run:
        for s in plan:
            print(f"{s.name:<9} {s.limit_s:>4}s  {s.what}" + (f" [{s.shards} processes]" if s.shards > 1 else ""))
            if args.dry_run:
                shard = {SHARD_VARIABLE: f"i/{s.shards}"} if s.shards > 1 else {}
                env = " ".join(f"{k}={v}" for k, v in {**s.env, **shard}.items())
                print(f"          {env + ' ' if env else ''}{' '.join(shlex.quote(c) for c in s.command)}")
        return 0

    if not on_gpu and not args.allow_cpu:
        parser.error("no CUDA device here; run it on a GPU machine (or pass --allow-cpu to check the suite "
                     "itself at CPU sizes)")
    logs = Path(logs_folder(out, device))
    for option, problem in (("--out", folder_problem(logs)),
                            ("--archive", args.archive and archive_problem(args.archive))):
        if problem:
            parser.error(f"{option}: {problem}")
    started = time.time()
    deadline = (time.monotonic() if start is None else start) + args.budget - FINISH_S
    done = []
    print(f"gpu_suite: {len(plan)} stages, budget {args.budget:.0f} s, output {out}", flush=True)
    for stage in plan:
        left = deadline - time.monotonic()
        if left < MIN_STAGE_S:
            done.append({"stage": stage.name, "status": "not run (budget spent)", "seconds": 0, "limit_s": 0,
                         "last_line": ""})
            print(f"[{stage.name}] not run: {left:.0f} s left", flush=True)
            continue
        limit = min(stage.limit_s, left - GRACE_S - 5)  # the grace after SIGINT stays inside the budget
        print(f"[{stage.name}] {stage.what} (limit {limit:.0f} s)", flush=True)
        result = run_stage(stage, limit, logs / f"{stage.name}.log")
        done.append(result)
        print(f"[{stage.name}] {result['status']} in {result['seconds']:.0f} s: {result['last_line']}", flush=True)
        if result["status"] != "ok":
            lines = Path(result["log"]).read_text(errors="replace").splitlines()
            failures = [line for line in lines if line.startswith(("FAILED ", "ERROR "))][:20]
            print("\n".join("    " + line for line in failures + lines[-15:]), flush=True)

    table = [f"{'stage':<9} {'status':<24} {'s':>6} {'limit':>6}  result"]
    table += [f"{d['stage']:<9} {d['status']:<24} {d['seconds']:>6.0f} {d['limit_s']:>6}  {d['last_line'][:90]}"
              for d in done]
    (logs / "stages.json").write_text(json.dumps(done, indent=1))
    try:  # the measurements are on disk whatever happens here; the archive below must still be written
        headlines = headline_lines(out, started, on_gpu)
    except Exception as error:  # noqa: BLE001
        headlines = [f"headline summary failed: {type(error).__name__}: {error}"]
    env = environment()
    (logs / "summary.md").write_text("\n".join(summary_lines(out, table, headlines, started, env, on_gpu)) + "\n")
    archived = True
    if args.archive:
        archive = Path(args.archive)
        try:
            write_archive(archive, out, started)
            print(f"archive: {archive} ({archive.stat().st_size / 2**20:.1f} MiB)")
        except (OSError, tarfile.TarError) as error:
            archived = False
            print(f"gpu_suite: error: could not write the archive {archive}: {error}; the results are in {out}",
                  file=sys.stderr, flush=True)
    label = [] if on_gpu else ["headline numbers on the CPU (no GPU figures):"]
    print("\n".join(["", "=" * 100, *table, "", *label, *headlines, "=" * 100]), flush=True)
    return 0 if archived and all(d["status"] == "ok" for d in done) else 1


def environment() -> dict:
    """Device, versions, commit and date of this run (dream.profile.environment_info); {} if that fails."""
    try:
        from dream.profile import environment_info

        return environment_info()
    except Exception:  # noqa: BLE001  the summary is still written without it
        return {}


def summary_lines(out: Path, table: list[str], headlines: list[str], started: float, env: dict,
                  on_gpu: bool | None = None) -> list[str]:
    """<device>/suite-logs/summary.md. Not on a GPU, the title and the headline numbers say CPU: they are no
    GPU figures.
    on_gpu: what the suite ran on (None: as env says; env is empty when its probe failed)."""
    on_gpu = env.get("device_type") == "cuda" if on_gpu is None else on_gpu
    label = "" if on_gpu else " (CPU: a check of the suite, its numbers say nothing about GPU speed)"
    device = env.get("device_name") or "unknown device"
    return [f"# GPU suite summary{label}", "",
            f"{device}{', driver ' + str(env['driver']) if env.get('driver') else ''}, torch {env.get('torch')}, "
            f"triton {env.get('triton')}, "
            f"commit {env.get('git_commit')}, {env.get('time') or env.get('date')}", "",
            f"output: {out}", "", "```", *table, "```", "",
            f"## Headline numbers{'' if on_gpu else ' (CPU)'} (fastest ours; speed-up over the fastest anchor)", "",
            "```", *headlines, "```",
            "", "## Reports (paths relative to the output folder; unpacked into profiles/, the links of its "
            "README's table)", "", *report_links(out, started)]


if __name__ == "__main__":
    sys.exit(main(start=STARTED_AT))
