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
                                 DREAM_BENCH_DDIM_STEPS steps of the sampling loop case

Bad values and an output folder that cannot be written are refused at startup in one line (exit 4).
Reports are never overwritten: a name already taken gets -2, -3, ...
"""
import fnmatch
import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from bench import harness  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def pytest_addoption(parser):
    group = parser.getgroup("dream-bench", "dream benchmarks")
    group.addoption("--bench-size", choices=["auto", "small", "full"], default=None)
    group.addoption("--bench-variants", default=None,
                    help="ordered fnmatch rules on variant or case:variant, '-' leaves out, 'all'; "
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
            harness.ENV_PROBLEMS.pop(attribute, None)  # the option decides, not the environment
            setattr(settings, attribute, value)
    problems = list(harness.ENV_PROBLEMS.values())
    if config.getoption("bench_target_s", default=None) is not None:
        try:
            harness.positive_float(settings.target_s)
        except ValueError as error:
            problems.append(f"--bench-target-s {settings.target_s:g}: {error}")
    if config.getoption("bench_out", default=None) == "":
        problems.append("--bench-out is empty; give a folder")
    steps = os.environ.get("DREAM_BENCH_DDIM_STEPS", "")
    if steps:
        try:
            harness.positive_int(steps)
        except ValueError as error:
            problems.append(f"DREAM_BENCH_DDIM_STEPS={steps!r}: {error}")
    if problems:
        raise pytest.UsageError(problems[0])
    if settings.out and not config.getoption("collectonly", default=False):
        problem = _use_root(config)
        if problem:
            raise pytest.UsageError(problem)
    harness.session_backend_defaults()


def _use_root(config) -> str | None:
    """Checks the report folder and picks this run's report name there; the problem in one line, if any."""
    from dream.errors import DreamError

    option = "DREAM_BENCH_OUT" if harness.SETTINGS.out and not config.getoption("bench_out", default=None) \
        else "--bench-out"
    try:
        harness.SESSION.use_root(_report_root(config), option)
    except DreamError as error:
        return str(error)
    return None


def _timing(config) -> bool:
    """Whether pytest-benchmark will time the cases (not --benchmark-disable, and installed)."""
    return config.pluginmanager.hasplugin("benchmark") and not config.getoption("benchmark_disable", default=False)


def _report_root(config) -> str | None:
    """Where the report goes: --bench-out, else profiles/ when timing; None for a smoke run or --collect-only."""
    if config.getoption("collectonly", default=False):
        return None
    if harness.SETTINGS.out:
        return harness.SETTINGS.out
    return str(REPO / "profiles") if _timing(config) else None


def pytest_collection_finish(session):
    """One warning line per --bench-variants rule that names no variant of the selected tests (a typo
    would otherwise skip everything quietly)."""
    rules = [r.strip() for r in harness.SETTINGS.variants.split(",") if r.strip()]
    names = set()
    for item in session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        case, variant = params.get("case"), params.get("variant")
        if isinstance(case, harness.Case) and isinstance(variant, harness.Variant):
            names.update((variant.name, f"{case.id}:{variant.name}"))
    if not names:
        return
    if harness.SESSION.stem is None and _report_root(session.config):  # the default root, profiles/
        problem = _use_root(session.config)
        if problem:
            pytest.exit(problem, returncode=4)
    unmatched = [rule for rule in rules if rule.lstrip("+-") != "all"
                 and not any(fnmatch.fnmatch(name, rule.lstrip("+-")) for name in names)]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for rule in unmatched:
        line = f"warning: --bench-variants rule {rule!r} matches no variant of the selected tests"
        if reporter is not None:
            reporter.write_line(line)
        else:
            print(line, file=sys.stderr)


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
    root = _report_root(session.config)
    harness.SESSION.release()
    if root and harness.SESSION.results and (harness.SETTINGS.out or harness.SESSION.timing):
        try:
            harness.SESSION.report_paths = write_report(root)
            harness.SESSION.report_error = None  # a failed partial append is superseded by the full report
        except Exception as error:  # noqa: BLE001  - one line in the summary, never a traceback over pytest's
            harness.SESSION.report_error = f"{type(error).__name__}: {error}"
    if harness.SESSION.report_error and session.exitstatus == 0:
        session.exitstatus = 1
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
    if harness.SESSION.report_error:
        terminalreporter.write_line(f"report not written: {harness.SESSION.report_error}", red=True)
