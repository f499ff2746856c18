"""The harness's promises to a reader of its reports, checked in-process on a tiny case (no benchmark fixture:
skipped by --benchmark-only): a mismatch fails the case and is recorded, nothing of ours is skipped for an
error, tolerances by dtype and device, throughput and % of ceiling by the variant's dtype, speed-ups with
ours as the denominator, CPU reports labelled CPU, goals left out on CPU, reports never overwritten."""
import json
import math
import statistics
import time

import pytest
import torch

from bench import harness, report
from bench.harness import Case, CaseState, Goal, Mismatch, Runner, Variant, compare, relative_error, run_variant
from dream.profile import environment_info


@pytest.fixture
def session(monkeypatch):
    """A fresh BenchSession for harness and report alike, with no ceilings measured and no report root."""
    fresh = harness.BenchSession()
    fresh.ceilings = {}
    monkeypatch.setattr(harness, "SESSION", fresh)
    monkeypatch.setattr(report, "SESSION", fresh)
    monkeypatch.setattr(harness.SETTINGS, "out", None)
    monkeypatch.setattr(harness.SETTINGS, "name", "unit")
    return fresh


def doubling_case(variants, goals=()):
    """y = 2x and z = x * x for a random float64 x: the reference every variant is checked against."""
    x = torch.randn(256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def setup():
        return CaseState(input_sets=[x], reference=(2 * x, x * x), outputs=("y", "z"),
                         bytes=lambda dtype: 3 * x.numel() * torch.finfo(dtype).bits // 8, info={"n": x.numel()})

    return Case("unit", "double", "fwd", setup=setup, variants=list(variants), goals=list(goals))


def fp32_path(scale=1.0):
    """A variant computing in fp32: exact up to fp32 rounding for scale 1, wrong by (scale - 1) otherwise."""
    return lambda state: lambda x: (2 * scale * x.float(), (x * x).float())


def failing(state):
    raise RuntimeError("no kernel for this shape\nsecond line")


def run_unskipped(case, variant, benchmark=None):
    """run_variant, where a skip fails the test (a skip raised out of a test would only mark it skipped)."""
    try:
        return run_variant(benchmark, case, variant)
    except pytest.skip.Exception as skip:
        pytest.fail(f"{variant.name} was skipped: {skip}")


class DisabledBenchmark:
    """The pytest-benchmark fixture under --benchmark-disable: pedantic() makes one plain call."""
    disabled = True

    def __init__(self):
        self.calls = []

    def pedantic(self, fn, args=()):
        self.calls.append(fn)
        return fn(*args)


def test_a_mismatch_fails_the_case_and_is_recorded_and_reported(session):
    """A wrong anchor fails (never skipped), its row says mismatch with the tolerance, and the summary and
    the table name it; ours within tolerance passes with its largest error."""
    ours, wrong = Variant("ours", fp32_path(), role="ours"), Variant("wrong", fp32_path(1.01))
    case = doubling_case([ours, wrong])
    entry = run_unskipped(case, ours)
    assert entry["status"] == "ok" and set(entry["errors"]) == {"y", "z"}
    assert entry["max_error"] == max(entry["errors"].values()) > 0 and len(set(entry["errors"].values())) == 2
    with pytest.raises(Mismatch, match="y: 0.01"):
        run_unskipped(case, wrong)
    row = next(r for r in session.results if r["variant"] == "wrong")
    assert row["status"] == "mismatch" and row["tolerance"] == harness.tolerance("kernel", torch.float32)
    assert "y: 0.01" in row["reason"] and "time_s" not in row
    [line] = report.summary_lines()
    assert line.endswith("FAILED: wrong (mismatch)"), line
    table = report.case_table(session.results)
    [wrong_row] = [line for line in table.splitlines() if line.startswith("| wrong ")]
    assert "mismatch: output differs from the reference" in wrong_row, table


def test_an_error_in_the_projects_code_fails_the_case_and_is_reported_while_a_failing_anchor_is_skipped(session):
    """ours, or an anchor running the project's code by another path (own_code), fails the case, and its row,
    the table and the summary say so; a third-party anchor that cannot run is skipped with its reason."""
    case = doubling_case([])
    with pytest.raises(RuntimeError, match="no kernel"):
        run_unskipped(case, Variant("ours", failing, role="ours"))
    with pytest.raises(RuntimeError, match="no kernel"):
        run_unskipped(case, Variant("ours_by_the_dispatcher", failing, own_code=True))
    with pytest.raises(pytest.skip.Exception, match="anchor"):
        run_variant(None, case, Variant("anchor", failing))
    rows = {row["variant"]: row for row in session.results}
    assert {name: row["status"] for name, row in rows.items()} == {
        "ours": "error", "ours_by_the_dispatcher": "error", "anchor": "skipped"}
    assert rows["ours"]["reason"] == "RuntimeError: no kernel for this shape"
    assert rows["anchor"]["reason"] == "anchor failed: RuntimeError: no kernel for this shape"
    [line] = report.summary_lines()
    assert line.endswith("FAILED: ours (error), ours_by_the_dispatcher (error)"), line
    table = report.case_table(session.results)
    [ours_row] = [line for line in table.splitlines() if line.startswith("| ours ")]
    assert "error: RuntimeError: no kernel for this shape" in ours_row, table


def test_a_smoke_run_times_the_checked_call_once(session):
    """Under --benchmark-disable the benchmark's single call is the checked call: one call, no rounds,
    marked smoke in the row and the table."""
    ours = Variant("ours", fp32_path(), role="ours")
    benchmark = DisabledBenchmark()
    entry = run_unskipped(doubling_case([ours]), ours, benchmark)
    assert len(benchmark.calls) == 1 and entry["smoke"] is True and entry["rounds"] == 1 and entry["time_s"] > 0
    assert session.timing is False
    [row] = [line for line in report.case_table(session.results).splitlines() if line.startswith("| ours ")]
    assert "ok (smoke: 1 call)" in row and "1.00x (ours)" in row, row
    checked = Variant("checked", lambda state: Runner(run=lambda x: None, check=fp32_path()(state)), role="ours")
    benchmark = DisabledBenchmark()
    run_unskipped(doubling_case([checked]), checked, benchmark)  # the timed path differs: its plain call is the one
    assert len(benchmark.calls) == 1 and benchmark.calls[0](None) is None


def test_a_result_recorded_again_replaces_the_earlier_row(session):
    case, variant = doubling_case([]), Variant("v", None)
    session.record(case, variant, status="skipped", reason="first")
    session.record(case, variant, status="ok", time_s=1.0)
    assert [(r["variant"], r["status"]) for r in session.results] == [("v", "ok")]


def test_tolerance_by_dtype_and_device(monkeypatch):
    """bf16 keeps 8 significant bits, fp16 11, fp32 24: each looser format gets a looser bound. On CPU fp32
    is exact enough that a result rounded through bf16 fails a kernel check; on a GPU fp32 allows TF32."""
    monkeypatch.setattr(harness, "ON_GPU", False)
    for level in harness.TOLERANCES:
        fp32, fp16, bf16 = (harness.tolerance(level, d) for d in (torch.float32, torch.float16, torch.bfloat16))
        assert fp32 < fp16 < bf16, level
    x = torch.randn(4096, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cpu_fp32 = harness.tolerance("kernel", torch.float32)
    compare((x.float(),), (x,), ("y",), cpu_fp32)
    with pytest.raises(Mismatch):
        compare((x.bfloat16(),), (x,), ("y",), cpu_fp32)
    monkeypatch.setattr(harness, "ON_GPU", True)
    assert harness.tolerance("kernel", torch.float32) > cpu_fp32


def test_relative_error_edge_cases_fail_where_they_should():
    x = torch.randn(64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    zeros = torch.zeros_like(x)
    assert relative_error(zeros, zeros) == 0.0
    assert relative_error(x, zeros) == math.inf  # any output against a zero reference is wrong
    assert relative_error(None, None) == 0.0
    assert relative_error(None, x) == math.inf and relative_error(x, None) == math.inf
    poisoned = x.clone()
    poisoned[3] = float("nan")
    with pytest.raises(Mismatch):  # a NaN in the reference passes nothing
        compare((x,), (poisoned,), ("y",), tol=1.0)
    # outputs as a dict or nested sequences are flattened in order
    errors = compare({"y": x, "grads": [2 * x, None]}, (x, (2 * x, None)), ("y", "dx", "dw"), tol=1e-12)
    assert errors == {"y": 0.0, "dx": 0.0, "dw": 0.0}


def test_numbers_from_the_environment_and_options_must_be_positive_and_finite():
    assert harness.positive_float("0.25") == 0.25 and harness.positive_int("3") == 3
    for text in ("0", "-1", "inf", "nan", "abc", None):
        with pytest.raises(ValueError):
            harness.positive_float(text)
    for text in ("0", "-1", "1.5", "x"):
        with pytest.raises(ValueError):
            harness.positive_int(text)


def test_throughput_uses_the_variant_dtype_and_the_ceiling_measured_for_it(session):
    """GB/s = fewest bytes for the variant's dtype / time; TFLOP/s over the matmul ceiling of its dtype;
    % ceiling = 100 x rate / ceiling; img/s = images / time."""
    session.ceilings = {"copy_gbps": 8.0, "matmul_fp32_tflops": 8.0, "matmul_bf16_tflops": 4.0}
    bytes_state = CaseState([], (), (), bytes=lambda dtype: 2e3 * torch.finfo(dtype).bits, images=6)
    bf16 = harness._throughput(0.002, torch.bfloat16, bytes_state)  # 32 kB in 2 ms
    assert bf16["bytes"] == 32e3 and bf16["gbps"] == pytest.approx(0.016) and bf16["ceiling"] == "copy"
    assert bf16["pct_ceiling"] == pytest.approx(0.2) and bf16["images_per_s"] == pytest.approx(3000)
    flops_state = CaseState([], (), (), flops=6e9)
    fp32 = harness._throughput(0.003, torch.float32, flops_state)  # 2 TFLOP/s
    assert fp32["tflops"] == pytest.approx(2.0)
    if not harness.ON_GPU:  # on a GPU fp32 matmuls count against the TF32 rate when the session allows TF32
        assert fp32["ceiling"] == "matmul_fp32" and fp32["pct_ceiling"] == pytest.approx(25.0)
    bf16 = harness._throughput(0.003, torch.bfloat16, flops_state)
    assert bf16["ceiling"] == "matmul_bf16" and bf16["pct_ceiling"] == pytest.approx(50.0)


def test_telemetry_difference_divides_energy_by_time_and_calls():
    before = {"time": 10.0, "energy_mj": 1000.0}
    after = {"time": 12.0, "energy_mj": 9000.0, "power_w": 350.0, "sm_clock_mhz": 1980, "mem_clock_mhz": 3200,
             "temperature_c": 50, "clock_event_reasons": 0}
    diff = harness.Telemetry.difference(before, after, calls=4)
    assert diff["energy_j"] == pytest.approx(8.0) and diff["avg_power_w"] == pytest.approx(4.0)
    assert diff["energy_j_per_call"] == pytest.approx(2.0) and diff["sm_clock_mhz"] == 1980
    assert harness.Telemetry.difference({}, after, calls=4) == {}


def timed_rows():
    base = {"case": "unit/double/fwd", "suite": "unit", "dtype": "bf16", "status": "ok", "gbps": 1.0,
            "pct_ceiling": 50.0}
    return [{**base, "variant": "ours_slow", "role": "ours", "time_s": 0.004},
            {**base, "variant": "ours_fast", "role": "ours", "time_s": 0.002},
            {**base, "variant": "anchor_fast", "role": "anchor", "time_s": 0.003},
            {**base, "variant": "anchor_slow", "role": "anchor", "time_s": 0.008}]


def test_summary_line_is_the_fastest_ours_over_the_fastest_anchor(session, monkeypatch):
    monkeypatch.setattr(report, "ON_GPU", True)
    session.results = timed_rows()
    [line] = report.summary_lines()
    assert " ours_fast " in line and " 2 ms" in line and " 50.0% ceil" in line, line
    assert line.endswith("1.50x vs fastest anchor anchor_fast"), line


def test_case_table_ratios_are_anchor_time_over_the_first_ours():
    table = report.case_table(timed_rows()).splitlines()
    assert table[0].split(" | ")[5:7] == ["ours_slow speed-up", "GB/s"], table[0]
    ratios = {line.split(" | ")[0][2:]: line.split(" | ")[5] for line in table[2:]}
    assert ratios == {"ours_slow": "1.00x (ours)", "ours_fast": "", "anchor_fast": "0.750x",
                      "anchor_slow": "2.00x"}


def test_rows_not_timed_as_graph_replays_say_so_under_a_graph_header():
    """The time column reads "(graph)" when a row was replayed as a CUDA graph; rows timed as plain calls
    (by choice, or because capture failed) say so in their status."""
    timings = {"ours_slow": "cuda-graph", "ours_fast": "cuda-graph", "anchor_fast": "plain",
               "anchor_slow": "plain (graph capture failed: RuntimeError: capture)"}
    rows = [dict(r, timing=timings[r["variant"]], time_plain_s=2 * r["time_s"]) for r in timed_rows()]
    table = report.case_table(rows).splitlines()
    assert "time ms (graph)" in table[0], table[0]
    status = {line.split(" | ")[0][2:]: line.split(" | ")[-1].rstrip(" |") for line in table[2:]}
    assert status == {"ours_slow": "ok", "ours_fast": "ok", "anchor_fast": "ok [timed as plain calls]",
                      "anchor_slow": "ok [plain (graph capture failed: RuntimeError: capture)]"}, status


def test_a_speedup_goal_equal_to_its_target_is_met_and_a_missing_percentage_is_n_a():
    rows = timed_rows()
    assert report.evaluate_goal(Goal("g", "speedup", "ours_fast", 1.5, ("anchor_fast",)), rows)["status"] == "met"
    no_ceiling = [dict(r, pct_ceiling=None) for r in rows]
    assert report.evaluate_goal(Goal("g", "pct_ceiling", "ours_fast", 10.0), no_ceiling)["status"] == "n/a"


def test_memory_summary_says_when_a_policy_is_over_the_budget(session):
    base = {"case": "memory/seed_b128/step", "suite": "memory", "role": "ours", "status": "ok"}
    session.results = [{**base, "variant": "none", "policy": "none", "estimate_bytes": 9e9, "measured_bytes": 8e9,
                        "fits": False},
                       {**base, "variant": "all", "policy": "all", "estimate_bytes": 5e9, "measured_bytes": 4e9,
                        "fits": True}]
    [line] = report.summary_lines()
    assert "none: est 9.00 GB, measured 8.00 GB (over); all: est 5.00 GB, measured 4.00 GB" in line, line
    assert line.count("(over)") == 1


def test_cpu_report_is_labelled_cpu_smoke_and_leaves_goals_out(session, monkeypatch):
    monkeypatch.setattr(report, "ON_GPU", False)
    ours, anchor = Variant("ours", fp32_path(), role="ours"), Variant("anchor", fp32_path())
    case = doubling_case([ours, anchor], goals=[Goal("ours 1.0x", "speedup", "ours", 1.0, ("anchor",))])
    for variant in (ours, anchor):
        run_unskipped(case, variant)
    environment = environment_info()
    data, markdown = report.build_report(environment)
    lines = markdown.splitlines()
    assert lines[0] == "# Benchmarks: unit — CPU"
    assert "**CPU figures**" in lines[2] and "**Smoke run**" in lines[4], lines[:6]
    assert f"| torch | {environment['torch']} |" in markdown and f"| triton | {environment['triton']} |" in markdown
    assert f"| time | {environment['time']} |" in markdown
    assert "## Goals" not in markdown and data["goals"] == []
    assert data["settings"]["timed"] is False and data["settings"]["size"] == ("full" if harness.SETTINGS.full
                                                                              else "small")
    assert [r["variant"] for r in data["results"]] == ["ours", "anchor"]
    assert set(data["speedups"]["unit/double/fwd"]["ours"]) == {"anchor"}
    assert "### unit/double/fwd" in markdown and "Inputs: n=256" in markdown


def test_gpu_report_names_the_gpu_and_driver_and_evaluates_goals(session, monkeypatch):
    monkeypatch.setattr(report, "ON_GPU", True)
    session.results = timed_rows()
    session.cases["unit/double/fwd"] = doubling_case([], goals=[Goal("1.2x", "speedup", "ours_fast", 1.2,
                                                                     ("anchor_fast",))])
    environment = {**environment_info(), "device_type": "cuda", "device_name": "NVIDIA H200", "driver": "580.1"}
    data, markdown = report.build_report(environment)
    assert markdown.splitlines()[0] == "# Benchmarks: unit — NVIDIA H200"
    assert "CPU" not in markdown.split("## Environment")[0] and "Smoke run" not in markdown
    assert "| driver | 580.1 |" in markdown and "| device_name | NVIDIA H200 |" in markdown
    [goal] = data["goals"]
    assert goal["status"] == "met" and goal["value"] == pytest.approx(1.5)
    assert "## Goals" in markdown and "| unit/double/fwd | 1.2x | ours_fast: 1.50x vs anchor_fast | met |" in markdown


def test_the_report_replaces_this_run_s_partial_file_and_no_other_report(session, monkeypatch, tmp_path):
    monkeypatch.setattr(harness.SETTINGS, "out", str(tmp_path))
    session.use_root(str(tmp_path))
    ours = Variant("ours", fp32_path(), role="ours")
    run_unskipped(doubling_case([ours]), ours)
    partial = session.partial_path()
    assert [json.loads(line)["variant"] for line in partial.read_text().splitlines()] == ["ours"]
    other = session.report_path(".md")  # another run wrote a report of the same name meanwhile
    other.write_text("another run")
    json_path, md_path = report.write_report(str(tmp_path))
    assert other.read_text() == "another run" and not partial.exists()
    assert md_path.name == other.name.replace(".md", "-2.md") and json_path.with_suffix(".md") == md_path
    assert json.loads(json_path.read_text())["results"][0]["variant"] == "ours"
    assert md_path.read_text().startswith("# Benchmarks: unit — CPU")


def test_a_kernel_ten_percent_off_fails_even_at_the_bf16_tolerance():
    """The loosest kernel bound (bf16) still catches a wrong kernel: bf16 rounding of the reference passes,
    an output 10% off fails."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    bf16 = harness.tolerance("kernel", torch.bfloat16)
    compare((x.bfloat16(),), (x,), ("y",), bf16)
    with pytest.raises(Mismatch):
        compare((1.1 * x,), (x,), ("y",), bf16)


def test_an_error_equal_to_the_tolerance_passes():
    """The bound is inclusive: ||2x - x|| / ||x|| is exactly 1, which passes tol=1 and fails just below it."""
    x = torch.randn(64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert compare((2 * x,), (x,), ("y",), tol=1.0) == {"y": 1.0}
    with pytest.raises(Mismatch):
        compare((2 * x,), (x,), ("y",), tol=0.999)


def test_a_bf16_variant_is_checked_and_measured_as_bf16(session):
    """A variant computing in bf16 gets the bf16 tolerance (its rounding would fail the fp32 one) and its bytes
    moved are counted for bf16."""
    bf16 = Variant("ours_bf16", lambda state: lambda x: (2 * x.bfloat16(), (x * x).bfloat16()), role="ours",
                   dtype=torch.bfloat16)
    case = doubling_case([bf16])
    entry = run_unskipped(case, bf16)
    assert entry["status"] == "ok" and entry["tolerance"] == harness.tolerance("kernel", torch.bfloat16)
    assert entry["max_error"] > harness.tolerance("kernel", torch.float32)  # would fail an fp32 check
    assert entry["dtype"] == "bf16" and entry["bytes"] == case.setup().bytes(torch.bfloat16)


def test_settings_from_the_environment_skip_empty_values_and_keep_bad_ones_as_problems(monkeypatch):
    """Set variables override the defaults, an empty one is ignored, and a bad one leaves the default and is
    kept under its Settings attribute (the key bench/conftest.py drops when an option overrides it)."""
    monkeypatch.setattr(harness, "ENV_PROBLEMS", {})
    monkeypatch.setenv("DREAM_BENCH_NAME", "nightly")
    monkeypatch.setenv("DREAM_BENCH_SIZE", "")
    monkeypatch.setenv("DREAM_BENCH_VARIANTS", "triton*")
    monkeypatch.setenv("DREAM_BENCH_TARGET_S", "-1")
    settings = harness.settings_from_environment()
    default = harness.Settings()
    assert (settings.name, settings.variants) == ("nightly", "triton*")
    assert settings.size == default.size and settings.target_s == default.target_s
    assert harness.ENV_PROBLEMS == {"target_s": "DREAM_BENCH_TARGET_S='-1': must be a positive number of seconds"}
    monkeypatch.setenv("DREAM_BENCH_TARGET_S", "0.125")
    assert harness.settings_from_environment().target_s == 0.125


def test_size_auto_is_full_on_a_gpu_and_small_on_cpu(monkeypatch):
    for on_gpu in (False, True):
        monkeypatch.setattr(harness, "ON_GPU", on_gpu)
        assert harness.Settings(size="auto").full is on_gpu
        assert harness.Settings(size="full").full and not harness.Settings(size="small").full


def test_fp32_counts_against_tf32_only_on_a_gpu_that_allows_it_and_fp16_against_bf16(session, monkeypatch):
    """The matmul ceiling follows the variant's dtype and the session's TF32 flag: fp32 with TF32 allowed on a
    GPU -> the TF32 rate, fp32 otherwise -> the fp32 rate, fp16 -> the 16-bit (bf16) rate."""
    session.ceilings = {"matmul_fp32_tflops": 1.0, "matmul_tf32_tflops": 4.0, "matmul_bf16_tflops": 8.0}
    state = CaseState([], (), (), flops=2e12)  # 2 TFLOP/s in one second
    monkeypatch.setattr(harness, "ON_GPU", True)
    for allow_tf32, ceiling in ((True, "matmul_tf32"), (False, "matmul_fp32")):
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allow_tf32)
        out = harness._throughput(1.0, torch.float32, state)
        assert out["ceiling"] == ceiling
        assert out["pct_ceiling"] == pytest.approx(100 * 2.0 / session.ceilings[ceiling + "_tflops"])
    monkeypatch.setattr(harness, "ON_GPU", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert harness._throughput(1.0, torch.float32, state)["ceiling"] == "matmul_fp32"
    assert harness._throughput(1.0, torch.float16, state)["ceiling"] == "matmul_bf16"


class TimingBenchmark:
    """The pytest-benchmark fixture when timing: pedantic() runs the rounds; the per-round times it reports are
    the given ones, so the harness's statistics on them can be checked."""
    disabled = False

    def __init__(self, round_times):
        self.stats = type("Stats", (), {"stats": type("Data", (), {"data": list(round_times)})()})()
        self.extra_info = {}
        self.rounds = None

    def pedantic(self, fn, rounds, iterations, warmup_rounds):
        self.rounds = rounds
        for _ in range(rounds):
            fn()


def test_time_per_call_is_the_median_round_over_its_inner_calls(session, monkeypatch):
    """Per-call time = median of the rounds / inner (one slow round does not move it), IQR = Q3 - Q1, min = the
    fastest round / inner. Run as on a GPU (no sync needed) so that a round holds several calls."""
    monkeypatch.setattr(harness, "ON_GPU", True)
    monkeypatch.setattr(harness, "sync", lambda: None)
    monkeypatch.setattr(harness.SETTINGS, "round_s", 0.01)
    monkeypatch.setattr(harness.SETTINGS, "target_s", 0.01)
    rounds = [0.4, 0.1, 0.3, 0.2, 9.0]
    benchmark = TimingBenchmark(rounds)
    calls = []
    result = harness._time(benchmark, calls.append, [0, 1])
    inner = result["inner"]
    assert inner > 1 and result["rounds"] == benchmark.rounds and result["input_sets"] == 2
    assert result["time_s"] == pytest.approx(statistics.median(rounds) / inner)
    q1, _, q3 = statistics.quantiles([r / inner for r in rounds], n=4)
    assert result["time_iqr_s"] == pytest.approx(q3 - q1) and result["time_min_s"] == pytest.approx(0.1 / inner)
    assert set(calls) == {0, 1}  # the input sets rotate


def test_ceiling_timings_are_medians(monkeypatch):
    """One slow repetition (a hiccup) does not move a ceiling's time: median, not mean."""
    delays = iter([0.001] * 4 + [0.3])
    seconds = harness.median_time(lambda: time.sleep(next(delays)), reps=5, warmup=0)
    assert 0.001 <= seconds < 0.03, seconds


def test_ceilings_are_bytes_read_and_written_and_two_n_cubed_flops_per_second(monkeypatch):
    monkeypatch.setattr(harness, "median_time", lambda fn, reps, warmup: 0.5)
    c = harness.measure_ceilings()
    assert c["copy_gbps"] == pytest.approx(c["copy_bytes"] / 0.5 / 1e9)
    for name in ("fp32", "bf16"):
        n = c[f"matmul_{name}_n"]
        assert c[f"matmul_{name}_tflops"] == pytest.approx(2 * n ** 3 / 0.5 / 1e12), name


def test_a_percentage_goal_counts_the_fastest_of_the_named_ours_variants():
    rows = [dict(r, pct_ceiling=25.0 if r["variant"] == "ours_slow" else 50.0) for r in timed_rows()]
    goal = Goal("g", "pct_ceiling", ("ours_slow", "ours_fast"), 40.0)
    result = report.evaluate_goal(goal, rows)
    assert result["status"] == "met" and result["value"] == 50.0 and result["detail"].startswith("ours_fast:")


def test_no_partial_file_without_bench_out(session, tmp_path):
    """A timed run reporting to the default root (profiles/) writes no partial file; only --bench-out does."""
    session.stem = tmp_path / "2026-01-01-unit"
    ours = Variant("ours", fp32_path(), role="ours")
    run_unskipped(doubling_case([ours]), ours)
    assert session.partial_path() is None and list(tmp_path.iterdir()) == []
