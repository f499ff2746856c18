"""Benchmark session setup (outside the default test run: `python3 -m pytest bench/ --benchmark-only`).

Without a GPU the Triton kernels run through the interpreter, which is read when a kernel is
decorated: TRITON_INTERPRET is set here, before anything imports `kernels`.

Options (each also an environment variable):
  --bench-size small|full|auto   DREAM_BENCH_SIZE      auto: full on a GPU, small on CPU
  --bench-variants=RULES         DREAM_BENCH_VARIANTS  ordered rules, e.g. 'triton*,eager_bf16', '-*max_autotune*',
                                                       'all' (see bench/harness.py: selected)
  --bench-out DIR                DREAM_BENCH_OUT       report root (default profiles/ when timing;
                                                       a --benchmark-disable smoke run writes none)
  --bench-name NAME              DREAM_BENCH_NAME      report file name: <out>/<device>/<date>-<NAME>.md
  --bench-target-s SECONDS       DREAM_BENCH_TARGET_S  timed seconds per variant on a GPU (0.5)
"""
import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from bench import harness  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def pytest_addoption(parser):
    group = parser.getgroup("dream-bench", "dream benchmarks")
    group.addoption("--bench-size", choices=["auto", "small", "full"], default=None)
    group.addoption("--bench-variants", default=None, help="ordered fnmatch rules on variant or case:variant, '-' leaves out, 'all'; "
                     "give it as --bench-variants=RULES")
    group.addoption("--bench-out", default=None, help="report root folder (default profiles/ when timing)")
    group.addoption("--bench-name", default=None, help="report name: <out>/<device>/<date>-<name>.json/.md")
    group.addoption("--bench-target-s", type=float, default=None, help="timed seconds per variant on a GPU")


def pytest_configure(config):
    settings = harness.SETTINGS
    for option, attribute in (("bench_size", "size"), ("bench_variants", "variants"), ("bench_out", "out"),
                              ("bench_name", "name"), ("bench_target_s", "target_s")):
        value = config.getoption(option, default=None)
        if value is not None:
            setattr(settings, attribute, value)
    harness.session_backend_defaults()


if importlib.util.find_spec("pytest_benchmark") is None:
    # without pytest-benchmark every case is still checked and run once (smoke)
    class _NoBenchmark:
        disabled = True
        group = None

        def __init__(self):
            self.extra_info = {}

    @pytest.fixture
    def benchmark():
        return _NoBenchmark()


def _report_root(session) -> str | None:
    if harness.SETTINGS.out:
        return harness.SETTINGS.out
    return str(REPO / "profiles") if harness.SESSION.timing and harness.SESSION.results else None


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """Our report first, before pytest-benchmark's own session end (also a wrapper), which an
    interrupted round would break: a round stopped by SIGINT (a suite stage's time limit) leaves a
    benchmark without data, on which pytest-benchmark's summary fails, so those are dropped."""
    from bench.report import write_report

    benchmark_session = getattr(session.config, "_benchmarksession", None)
    if benchmark_session is not None and isinstance(getattr(benchmark_session, "benchmarks", None), list):
        benchmark_session.benchmarks[:] = [b for b in benchmark_session.benchmarks
                                           if getattr(getattr(b, "stats", None), "data", [1])]
    root = _report_root(session)
    harness.SESSION.release()
    if root and harness.SESSION.results:
        harness.SESSION.report_paths = write_report(root)
    yield


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from bench.report import summary_lines

    if not harness.SESSION.results:
        return
    label = "GPU" if harness.ON_GPU else "CPU (small sizes; not GPU figures)"
    terminalreporter.section(f"dream benchmarks — {label}")
    for line in summary_lines():
        terminalreporter.write_line(line)
    paths = getattr(harness.SESSION, "report_paths", None)
    if paths:
        terminalreporter.write_line(f"report: {paths[1]} (+ {paths[0].name})")
