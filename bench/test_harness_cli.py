"""The benchmark harness as a user meets it: option and environment checks at startup (one line, exit 4),
reports that never overwrite one another, a variant filter that names nothing, CPU figures that read
as such. The subprocess runs time one small case (attention n17, eager: a few seconds on CPU)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import harness, report
from bench.harness import Case, Variant

REPO = Path(__file__).resolve().parent.parent
ATTENTION = str(REPO / "bench" / "test_bench_attention.py")


def run_pytest(tmp_path, *args, env=None):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DREAM_BENCH_")}
    environment.update(env or {}, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "pytest", ATTENTION, "-q", "-p", "no:cacheprovider", *args],
                            cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)
    return result, result.stdout + result.stderr


@pytest.mark.parametrize("out", ["AFILE", "AFILE/sub", "/proc/dream-bench-nope"])
def test_an_unusable_bench_out_is_refused_in_one_line_before_anything_runs(tmp_path, out):
    if out.startswith("/proc") and not Path("/proc/self").exists():
        pytest.skip("no /proc here")
    (tmp_path / "AFILE").write_text("")
    result, output = run_pytest(tmp_path, "--benchmark-only", "-k", "n17-fwd-eager", "--bench-out", out)
    assert result.returncode == 4, output
    [line] = [line for line in output.splitlines() if line.strip()]
    assert line.startswith(f"ERROR: --bench-out {out}: ") and "choose another --bench-out" in line, output


@pytest.mark.parametrize("variable,value", [("DREAM_BENCH_TARGET_S", "abc"), ("DREAM_BENCH_TARGET_S", "-1"),
                                            ("DREAM_BENCH_SIZE", "huge"), ("DREAM_BENCH_DDIM_STEPS", "0")])
def test_a_bad_environment_variable_is_refused_in_one_line(tmp_path, variable, value):
    result, output = run_pytest(tmp_path, "--collect-only", env={variable: value})
    assert result.returncode == 4, output
    [line] = [line for line in output.splitlines() if line.strip()]
    assert line.startswith(f"ERROR: {variable}={value!r}: must be"), output


def test_reports_of_the_same_day_are_never_overwritten(tmp_path):
    first, output = run_pytest(tmp_path, "--benchmark-only", "-k", "n17-fwd-eager", "--bench-out", "out")
    assert first.returncode == 0, output
    [md] = (tmp_path / "out" / "cpu").glob("*-bench.md")
    assert f"report: out/cpu/{md.name}" in output
    before = md.read_text()
    second, output = run_pytest(tmp_path, "--benchmark-only", "-k", "n17-fwd-eager", "--bench-out", "out")
    assert second.returncode == 0, output
    names = sorted(p.name for p in (tmp_path / "out" / "cpu").iterdir())
    stem = md.name[:-len(".md")]
    assert names == sorted(f"{stem}{n}.{s}" for n in ("", "-2") for s in ("json", "md")), names
    assert md.read_text() == before
    assert f"report: out/cpu/{stem}-2.md" in output


def test_a_variant_rule_that_names_nothing_is_warned_about(tmp_path):
    result, output = run_pytest(tmp_path, "--benchmark-disable", "-k", "n17-fwd-eager",
                                "--bench-variants=trtion,eager")
    assert result.returncode == 0, output
    warnings = [line for line in output.splitlines() if line.startswith("warning: --bench-variants")]
    assert warnings == ["warning: --bench-variants rule 'trtion' matches no variant of the selected tests"], output


def test_a_gpu_only_variant_of_ours_is_not_called_an_anchor(monkeypatch):
    monkeypatch.setattr(harness, "ON_GPU", False)
    ours = Variant("triton_autotuned", build=lambda state: None, role="ours", gpu_only=True)
    anchor = Variant("compile_max_autotune", build=lambda state: None, gpu_only=True)
    assert harness.selected("c", ours) == (False, "GPU-only variant of ours")
    assert harness.selected("c", anchor) == (False, "GPU-only anchor")


def _case_rows():
    base = {"case": "attention/n17/fwd", "suite": "attention", "dtype": "fp32", "status": "ok",
            "gbps": 0.01, "pct_ceiling": 0.004}
    return [{**base, "variant": "triton", "role": "ours", "time_s": 0.1158},
            {**base, "variant": "eager", "role": "anchor", "time_s": 4.1e-5}]


def test_cpu_tables_and_summary_show_small_ratios_and_no_ceiling(monkeypatch):
    monkeypatch.setattr(report, "ON_GPU", False)
    monkeypatch.setattr(report.SESSION, "results", _case_rows())
    table = report.case_table(_case_rows())
    [eager_row] = [line for line in table.splitlines() if line.startswith("| eager ")]
    assert "| 0.000354x |" in eager_row and "n/a (CPU)" in eager_row, table
    [line] = report.summary_lines()
    assert "ceil n/a (CPU)" in line and "0.000354x vs fastest anchor eager" in line, line
    assert "0.00x" not in line + table and "0.0%" not in line


def test_a_failed_partial_write_does_not_fail_the_case(monkeypatch, tmp_path):
    monkeypatch.setattr(harness.SETTINGS, "out", str(tmp_path))
    monkeypatch.setattr(harness.SESSION, "stem", tmp_path / "gone" / "2026-01-01-bench")
    monkeypatch.setattr(harness.SESSION, "results", [])
    monkeypatch.setattr(harness.SESSION, "cases", {})
    monkeypatch.setattr(harness.SESSION, "report_error", None)
    case = Case("s", "n", "fwd", setup=lambda: None, variants=[])
    entry = harness.SESSION.record(case, Variant("v", build=lambda state: None), status="ok", time_s=1.0)
    assert entry["status"] == "ok" and "could not append" in harness.SESSION.report_error


def test_a_timed_run_without_bench_out_reports_to_profiles(request):
    """pytest-benchmark registers itself as "benchmark": a timed run (this one, unless --benchmark-disable)
    writes its report under profiles/."""
    from bench import conftest

    if request.config.getoption("benchmark_disable", default=False):
        pytest.skip("--benchmark-disable")
    pytest.importorskip("pytest_benchmark")
    assert conftest._report_root(request.config) == (harness.SETTINGS.out or str(REPO / "profiles"))


@pytest.mark.parametrize("args,env,refusal", [
    (["--bench-size", "small"], {"DREAM_BENCH_SIZE": "huge"}, None),  # the option decides, not the environment
    (["--bench-out", ""], {}, "ERROR: --bench-out is empty; give a folder"),
    (["--bench-target-s=-1"], {}, "ERROR: --bench-target-s -1: must be a positive number of seconds"),
])
def test_options_override_the_environment_and_are_refused_like_it(tmp_path, args, env, refusal):
    result, output = run_pytest(tmp_path, "--collect-only", *args, env=env)
    if refusal is None:
        assert result.returncode == 0 and "n17-fwd-eager" in output, output
    else:
        assert result.returncode == 4, output
        [line] = [line for line in output.splitlines() if line.strip()]
        assert line == refusal, output


def test_a_smoke_run_with_bench_out_writes_a_report_labelled_cpu_and_smoke(tmp_path):
    result, output = run_pytest(tmp_path, "--benchmark-disable", "-k", "n17-fwd-eager", "--bench-out", "out",
                                "--bench-variants=+all")
    assert result.returncode == 0, output
    assert "warning: --bench-variants" not in output, output  # 'all' names every variant
    assert "dream benchmarks — CPU (small sizes; not GPU figures)" in output, output
    [md] = (tmp_path / "out" / "cpu").glob("*-bench.md")
    assert f"report: out/cpu/{md.name}" in output
    text = md.read_text()
    assert text.startswith("# Benchmarks: bench — CPU\n") and "**CPU figures**" in text and "**Smoke run**" in text
    [eager_row] = [line for line in text.splitlines() if line.startswith("| eager ")]
    assert "ok (smoke: 1 call)" in eager_row and "n/a (CPU)" in eager_row, eager_row
    assert not list((tmp_path / "out" / "cpu").glob("*.partial.jsonl"))


class FakeConfig:
    """What bench/conftest.py reads of a pytest config: two options and whether pytest-benchmark is loaded."""

    def __init__(self, benchmark_disable=False, collectonly=False, plugin=True):
        self.options = {"benchmark_disable": benchmark_disable, "collectonly": collectonly}
        self.pluginmanager = type("Plugins", (), {"hasplugin": staticmethod(lambda name: plugin)})()

    def getoption(self, name, default=None):
        return self.options.get(name, default)


def test_report_root_is_bench_out_else_profiles_when_timing_else_none(monkeypatch):
    from bench import conftest

    monkeypatch.setattr(harness.SETTINGS, "out", None)
    assert conftest._report_root(FakeConfig()) == str(REPO / "profiles")
    assert conftest._report_root(FakeConfig(benchmark_disable=True)) is None  # a smoke run writes nothing
    assert conftest._report_root(FakeConfig(plugin=False)) is None  # no pytest-benchmark: nothing is timed
    assert conftest._report_root(FakeConfig(collectonly=True)) is None
    monkeypatch.setattr(harness.SETTINGS, "out", "somewhere")
    assert conftest._report_root(FakeConfig(benchmark_disable=True)) == "somewhere"
    assert conftest._report_root(FakeConfig(collectonly=True)) is None


def test_a_report_that_could_not_be_written_fails_the_run(monkeypatch):
    from bench import conftest

    monkeypatch.setattr(harness.SETTINGS, "out", None)
    monkeypatch.setattr(harness, "SESSION", harness.BenchSession())
    harness.SESSION.report_error = "could not append to out/cpu/x.partial.jsonl: No space left on device"
    session = type("Session", (), {"config": FakeConfig(benchmark_disable=True), "exitstatus": 0})()
    finish = conftest.pytest_sessionfinish(session, 0)
    next(finish)
    assert session.exitstatus == 1
