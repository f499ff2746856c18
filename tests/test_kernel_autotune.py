"""kernels.autotune: launch configurations tuned at run time (opt-in), for the GroupNorm and attention
launchers.

On CPU the kernels run through the Triton interpreter, whose timings mean nothing: the tests let the
interpreter tune (autotune._ALLOW_INTERPRETER) and give a timer that ranks the candidates as the test
wants (autotune._TIMER), then check that the pick is the one launched, is kept in memory and in the
cache file, and that the results of the tuned launches still match the float64 references (fresh
random inputs, odd shapes, every gradient; tolerances as in test_group_norm_silu.py and
test_attention.py: 1e-5 in fp32). On a GPU the same tests run through the compiled kernels, with the
test's timer in place of CUDA events.
"""
import importlib
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import triton

from conftest import DEVICE, ON_GPU, assert_close, qkv_attention_with_float64

from kernels import autotune, set_autotune
from kernels.attention import attention, attention_qkv_nchw
from kernels.group_norm_silu import group_norm_silu, group_norm_silu_reference

gns = importlib.import_module("kernels.group_norm_silu")
TOL = 1e-5  # fp32 against float64


class RankingTimer:
    """A timer for autotune._TIMER: the heuristic (the first config timed in each problem) takes 1 s,
    the others less and less in the order they are timed (so the last one wins), unless `seconds` maps a
    config's JSON to its time. Counts the configs it was asked to time."""

    def __init__(self, seconds=None):
        self.seconds = seconds or {}
        self.timed = []

    def __call__(self, run, config):
        self.timed.append(config)
        key = json.dumps(config, sort_keys=True)
        if key in self.seconds:
            return self.seconds[key]
        return 1.0 / len(self.timed)


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    """Autotuning on (interpreter allowed), a ranking timer, a fresh cache file and no earlier picks."""
    timer = RankingTimer()
    monkeypatch.setenv(autotune.ENV, "1")
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "picks.json"))
    monkeypatch.setattr(autotune, "_ALLOW_INTERPRETER", True)
    monkeypatch.setattr(autotune, "_TIMER", timer)
    monkeypatch.setattr(autotune, "_GRID", "minimal")  # two candidates a problem: few compiles on a GPU
    monkeypatch.setattr(gns, "_POISON_NEW_BUFFERS", True)
    set_autotune(None)
    autotune.clear_picks()
    yield timer
    autotune.clear_picks()


def _picks(tmp_path):
    data = json.loads((tmp_path / "picks.json").read_text())
    assert data["version"] == autotune.CACHE_VERSION
    return data["picks"]


def _randn(gen, *shape, std=1.0, mean=0.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std + mean).to(DEVICE, torch.float32)


def _group_norm_case(seed, shape, groups, channels_last):
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x = _randn(gen, *shape, std=1.6, mean=0.4)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    params = [_randn(gen, c, std=0.5, mean=1.0), _randn(gen, c, std=0.4), _randn(gen, n, c, std=0.4),
              _randn(gen, n, c, std=0.5)]
    dy = _randn(gen, *shape)
    return x, params, dy


def _check_group_norm(x, params, dy, groups):
    leaves = [t.detach().requires_grad_() for t in (x, *params)]
    y = group_norm_silu(leaves[0], leaves[1], leaves[2], groups, scale=leaves[3], shift=leaves[4])
    grads = torch.autograd.grad(y, leaves, dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, *params)]
    ref_y = group_norm_silu_reference(ref_leaves[0], ref_leaves[1], ref_leaves[2], groups, scale=ref_leaves[3],
                                      shift=ref_leaves[4])
    ref_grads = torch.autograd.grad(ref_y, ref_leaves, dy.double())
    assert_close("y", y, ref_y.detach(), TOL)
    for name, g, r in zip(("dx", "dweight", "dbias", "dscale", "dshift"), grads, ref_grads):
        assert_close(name, g, r, TOL)


@pytest.mark.parametrize("shape,groups,channels_last", [
    ((3, 12, 7, 5), 4, False),   # 3 channels per group, a 7x5 image, batch 3
    ((1, 16, 5, 3), 4, True),    # channels_last, 4 channels per group (several groups per program), batch 1
])
def test_group_norm_launches_the_fastest_candidate_and_matches_float64(tuning, tmp_path, shape, groups,
                                                                       channels_last):
    x, params, dy = _group_norm_case(sum(shape) + groups, shape, groups, channels_last)
    _check_group_norm(x, params, dy, groups)
    picks = _picks(tmp_path)
    assert sorted(name.split("|")[0] for name in picks) == ["group_norm_silu_bwd", "group_norm_silu_fwd"]
    n, c, h, w = shape
    stride_c = 1 if channels_last else h * w
    for name, pick in picks.items():
        # the ranking timer makes the last candidate timed the fastest: not the heuristic's
        heuristic = gns._config_of(gns._launch_config(n, c, h * w, groups, stride_c, x.device,
                                                      backward="_bwd|" in name, override={}), x.device)
        assert pick in tuning.timed and pick != heuristic, (name, pick, heuristic)
    # the pick is what runs: launches record their configuration
    launched = []
    original = gns._launch_config

    def spy(*args, **kwargs):
        cfg = original(*args, **kwargs)
        launched.append((kwargs.get("backward", args[6] if len(args) > 6 else None), gns._config_of(cfg, x.device)))
        return cfg

    tuning.timed.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gns, "_launch_config", spy)
        _check_group_norm(x, params, dy, groups)
    assert tuning.timed == []  # reused, not tuned again
    fwd = next(p for n, p in picks.items() if n.startswith("group_norm_silu_fwd"))
    bwd = next(p for n, p in picks.items() if n.startswith("group_norm_silu_bwd"))
    assert launched == [(False, fwd), (True, bwd)]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_attention_launches_the_fastest_candidate_and_matches_float64(tuning, tmp_path, layout):
    gen = torch.Generator().manual_seed(23)
    batch, channels, heads, height, width = 3, 32, 2, 5, 3  # head dim 16, N = 15 (a tail block)
    qkv = _randn(gen, batch, 3 * channels, height, width)
    grad_out = _randn(gen, batch, channels, height, width)
    if layout == "channels_last":
        qkv, grad_out = (t.contiguous(memory_format=torch.channels_last) for t in (qkv, grad_out))
    out, dqkv, ref_out, ref_dqkv = qkv_attention_with_float64(qkv, grad_out, heads)
    assert_close("out", out, ref_out, TOL)
    assert_close("dqkv", dqkv, ref_dqkv, TOL)
    picks = _picks(tmp_path)
    assert sorted(name.split("|")[0] for name in picks) == ["attention_bwd", "attention_fwd"]
    for name, pick in picks.items():
        timed = [c for c in tuning.timed if c.keys() == pick.keys()]
        assert len(timed) >= 2 and pick == timed[-1] != timed[0], (name, pick, timed)
    tuning.timed.clear()
    leaf = qkv.detach().requires_grad_()
    again = attention_qkv_nchw(leaf, heads)
    (dqkv_again,) = torch.autograd.grad(again, (leaf,), grad_out)
    assert tuning.timed == []  # reused, not tuned again
    assert torch.equal(again, out) and torch.equal(dqkv_again, dqkv)


def test_off_by_default_nothing_is_timed_or_written(monkeypatch, tmp_path):
    def refuse(run, config):
        raise AssertionError("timed with autotuning off")

    monkeypatch.delenv(autotune.ENV, raising=False)
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "picks.json"))
    monkeypatch.setattr(autotune, "_ALLOW_INTERPRETER", True)
    monkeypatch.setattr(autotune, "_TIMER", refuse)
    set_autotune(None)
    x, params, dy = _group_norm_case(5, (2, 6, 3, 3), 2, False)
    _check_group_norm(x, params, dy, 2)
    assert not (tmp_path / "picks.json").exists()
    set_autotune(True)
    try:
        assert autotune.autotune_enabled()
    finally:
        set_autotune(None)


def test_the_interpreter_never_tunes_unless_a_test_allows_it(monkeypatch, tmp_path):
    monkeypatch.setenv(autotune.ENV, "1")
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "picks.json"))
    monkeypatch.setattr(autotune, "_TIMER", lambda run, config: pytest.fail("timed under the interpreter"))
    autotune.clear_picks()
    assert autotune.choose("k", (1,), torch.device("cpu"), lambda: ({"a": 1}, [{"a": 1}, {"a": 2}]),
                           lambda c: [torch.zeros(1)], interpreted=True) is None


def test_bad_environment_value_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(autotune.ENV, "sometimes")
    set_autotune(None)
    with pytest.raises(ValueError, match=r"^DREAM_KERNEL_AUTOTUNE must be 0 or 1, got 'sometimes'$"):
        autotune.autotune_enabled()
    with pytest.raises(TypeError, match="set_autotune"):
        set_autotune("yes")


def _values(config):
    """A run function's outputs per config: {"a": 3} returns a wrong result, {"a": 4} cannot launch."""
    if config["a"] == 4:
        raise RuntimeError("out of resources: shared memory\nsecond line")
    base = torch.arange(6, dtype=torch.float32) + 1
    return [base * 1.5 if config["a"] == 3 else base + 1e-6 * config["a"]]


def test_failing_and_mismatching_candidates_are_dropped(tuning, tmp_path):
    candidates = lambda: ({"a": 1}, [{"a": 1}, {"a": 2}, {"a": 3}, {"a": 4}])  # noqa: E731
    tuning.seconds = {json.dumps({"a": 1}): 1.0, json.dumps({"a": 2}): 0.8, json.dumps({"a": 3}): 0.1,
                      json.dumps({"a": 4}): 0.1}
    pick = autotune.choose("toy", (7, "x"), torch.device("cpu"), candidates, _values, interpreted=True)
    assert pick == {"a": 2}
    assert tuning.timed == [{"a": 1}, {"a": 2}]  # 3 and 4 never timed
    assert list(_picks(tmp_path).values()) == [{"a": 2}]


TWO = lambda: ({"a": 1}, [{"a": 1}, {"a": 2}])  # noqa: E731 - the heuristic and one candidate


def test_a_candidate_failing_while_timed_is_dropped(tuning, tmp_path):
    def timer(run, config):
        if config == {"a": 2}:
            raise RuntimeError("an asynchronous launch failure")
        return 1.0

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(autotune, "_TIMER", timer)
        assert autotune.choose("toy", (13,), torch.device("cpu"), TWO, _values, interpreted=True) == {"a": 1}
        patch.setattr(autotune, "_TIMER", lambda run, config: (_ for _ in ()).throw(RuntimeError("heuristic")))
        with pytest.raises(RuntimeError, match="heuristic"):  # the heuristic's own failure is not hidden
            autotune.choose("toy", (14,), torch.device("cpu"), TWO, _values, interpreted=True)


def test_picks_are_reused_from_memory_and_from_the_file(tuning, tmp_path):
    args = ("toy", (9,), torch.device("cpu"), TWO, _values)
    assert autotune.choose(*args, interpreted=True) == {"a": 2}
    assert len(tuning.timed) == 2
    assert autotune.choose(*args, interpreted=True) == {"a": 2}  # memory
    autotune.clear_picks()
    assert autotune.choose(*args, interpreted=True) == {"a": 2}  # the file
    assert len(tuning.timed) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["picks.json"]  # no temp file left behind
    # another problem, another GPU or Triton version: a different name, tuned on its own
    names = list(_picks(tmp_path))
    assert names == [autotune.problem_name("toy", (9,), torch.device("cpu"))]


@pytest.mark.parametrize("cached", [{"b": 5}, {"a": 2, "b": 5}, {}], ids=["other", "more", "fewer"])
def test_a_cached_pick_with_other_fields_than_the_launchers_is_tuned_again(tuning, tmp_path, caplog, cached):
    """A cache file written by a release whose configurations had other fields (other ones, more, or fewer): its
    pick would make every launch fail (a TypeError building the configuration) or launch with fields left at
    defaults nobody tuned, so it is tuned again and replaced."""
    name = autotune.problem_name("toy", (15,), torch.device("cpu"))
    (tmp_path / "picks.json").write_text(json.dumps({"version": autotune.CACHE_VERSION, "picks": {name: cached}}))
    with caplog.at_level("WARNING", logger=autotune.__name__):
        assert autotune.choose("toy", (15,), torch.device("cpu"), TWO, _values, interpreted=True) == {"a": 2}
    assert "does not fit this release's launcher; tuning again" in caplog.text
    assert _picks(tmp_path) == {name: {"a": 2}} and len(tuning.timed) == 2
    autotune.clear_picks()
    assert autotune.choose("toy", (15,), torch.device("cpu"), TWO, _values, interpreted=True) == {"a": 2}
    assert len(tuning.timed) == 2  # the new pick is served from the file


def test_an_unreadable_cache_file_warns_once_and_is_replaced(tuning, tmp_path):
    path = tmp_path / "picks.json"
    path.write_text('{"version": 1, "picks": {"x": "not a config"')
    with pytest.warns(UserWarning, match="picks.json is unreadable") as caught:
        pick = autotune.choose("toy", (10,), torch.device("cpu"), TWO, _values,
                               interpreted=True)
    assert pick == {"a": 2} and len(caught) == 1
    assert list(_picks(tmp_path).values()) == [{"a": 2}]


def test_without_a_cache_file_picks_stay_in_memory(tuning, tmp_path, monkeypatch):
    monkeypatch.setenv(autotune.CACHE_ENV, "")
    assert autotune.cache_path() is None
    assert autotune.choose("toy", (11,), torch.device("cpu"), TWO, _values,
                           interpreted=True) == {"a": 2}
    assert list(tmp_path.iterdir()) == []


def test_no_tuning_while_a_cuda_graph_is_captured(tuning, monkeypatch):
    monkeypatch.setattr(autotune, "_capturing", lambda device: True)
    args = ("toy", (12,), torch.device("cpu"), TWO, _values)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert autotune.choose(*args, interpreted=True) is None  # no pick yet: the heuristic
    assert tuning.timed == []
    monkeypatch.setattr(autotune, "_capturing", lambda device: False)
    assert autotune.choose(*args, interpreted=True) == {"a": 2}
    monkeypatch.setattr(autotune, "_capturing", lambda device: True)
    assert autotune.choose(*args, interpreted=True) == {"a": 2}  # an earlier pick is used


@pytest.mark.skipif(not ON_GPU, reason="CUDA events time the candidates on a GPU")
def test_real_timing_on_the_gpu_picks_a_candidate_that_matches_float64(monkeypatch, tmp_path):
    """No test timer: triton.testing.do_bench times the candidates (minimal grid, an fp32 problem)."""
    monkeypatch.setenv(autotune.ENV, "1")
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "picks.json"))
    monkeypatch.setattr(autotune, "_GRID", "minimal")
    set_autotune(None)
    autotune.clear_picks()
    try:
        x, params, dy = _group_norm_case(31, (64, 96, 17, 9), 8, True)  # 12 channels per group
        _check_group_norm(x, params, dy, 8)
        picks = _picks(tmp_path)
        assert sorted(name.split("|")[0] for name in picks) == ["group_norm_silu_bwd", "group_norm_silu_fwd"]
        assert all(torch.cuda.get_device_name(x.device) in name for name in picks)
    finally:
        autotune.clear_picks()


PRECOMPILE_SNIPPET = """
import importlib, json, os, sys
os.environ["TRITON_CACHE_DIR"] = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("TRITON_CACHE_DIR", "")
import torch
from triton.runtime.driver import driver
from bench.compile_report import _OfflineDriver, ptxas_available
from kernels import autotune
gns = importlib.import_module("kernels.group_norm_silu")
att = importlib.import_module("kernels.attention")
if not ptxas_available():
    print(json.dumps({"skip": True})); sys.exit(0)
driver.set_active(_OfflineDriver(90))  # compile for sm_90 without a GPU; a real launch would fail
from triton.runtime import _async_compile
from triton.runtime.jit import JITFunction
calls = []  # (warmup, inside AsyncCompileMode) of every kernel call
jit_run = JITFunction.run
def spy(self, *args, **kwargs):
    calls.append((kwargs.get("warmup"), _async_compile.active_mode.get() is not None))
    return jit_run(self, *args, **kwargs)
JITFunction.run = spy
gns._sm_count = att._sm_count = lambda device: 132
x = torch.empty(8, 48, 7, 5, device="meta", dtype=torch.float16)  # 6 channels per group, NCHW
w, b = torch.empty(48, device="meta"), torch.empty(48, device="meta")
heuristic = gns._config_of(gns._launch_config(8, 48, 35, 8, 35, x.device, False, override={}), x.device)
candidates = gns.launch_candidates(6, 8, 35, False, heuristic, "quick")
broken = {**heuristic, "groups": 2}  # refused by _launch_config in NCHW: precompiling goes on past it
cache = gns._gn_fwd_kernel.device_caches[0][0]
before = len(cache)
autotune.precompile([lambda c=c: gns._forward(x, w, b, None, None, 8, 1e-5, "pre", True, override=c)
                     for c in [broken] + candidates], workers=2)
tiles = {(c["block_c"], c["block_hw"], c["num_warps"]) for c in candidates}
q = torch.empty(64, 8, 256, 32, device="meta", dtype=torch.float16)  # 512+ tiles: persistent grids loop
lse = torch.empty(64, 8, 256, device="meta")
fwd = att.forward_candidates(256, att.forward_config(256, 32, q.dtype), "quick", q.dtype)
acache = att._attention_forward_kernel.device_caches[0][0]
abefore = len(acache)
autotune.precompile([lambda c=c: att._attention_forward_into(q, q, q, 0.2, torch.empty_like(q), lse, c) for c in fwd])
# one binary per tile shape, kind of grid (1 and 2 programs per SM share the persistent one) and kind of load
binaries = {(c.block_m, c.block_n, c.num_warps, c.num_stages, c.programs_per_sm > 0, c.tma) for c in fwd}
print(json.dumps({"gn_new": len(cache) - before, "gn_tiles": len(tiles),
                  "attention_new": len(acache) - abefore, "attention_binaries": len(binaries),
                  "attention_persistent": sum(c.programs_per_sm > 0 for c in fwd),
                  "attention_tma": sum(c.tma for c in fwd),
                  "pending": sum(hasattr(k, "result") for k in [*cache.values(), *acache.values()]),
                  "compile_only_left_on": autotune._compile_only.get(),
                  "calls": len(calls), "all_warmup_async": all(w and a for w, a in calls)}))
"""


def test_precompile_compiles_every_candidate_in_parallel_without_running_it(tmp_path):
    """autotune.precompile on Triton's offline sm_90 target (no GPU; the interpreter compiles nothing): each
    distinct GroupNorm tile and attention binary (tile shape, kind of grid) lands in the JIT cache as a finished
    compiled kernel, every kernel call is a warm-up inside Triton's AsyncCompileMode (nothing launched),
    a call that raises does not stop the rest, and the compile-only switch is off afterwards."""
    if ON_GPU:
        pytest.skip("on a GPU the tuning tests above precompile for real")
    from conftest import run_without_interpreter

    snippet = PRECOMPILE_SNIPPET.replace("sys.argv[1] if len(sys.argv) > 1 else ", f"{str(tmp_path)!r} or ")
    run = run_without_interpreter(snippet)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    if result.get("skip"):
        pytest.skip("this Triton has no NVIDIA backend with ptxas")
    assert result["gn_new"] == result["gn_tiles"] > 1  # capped grids share their tiles' binaries
    assert result["attention_new"] == result["attention_binaries"] > 1
    # the heuristic (128x64, 8 warps) on 1 and 2 programs per SM, and those three through tensor descriptors
    assert result["attention_persistent"] == 4 and result["attention_tma"] == 3
    assert result["pending"] == 0 and result["compile_only_left_on"] is False
    assert result["calls"] > 0 and result["all_warmup_async"]  # compiled in AsyncCompileMode, never launched


@pytest.mark.parametrize("text,enabled", [("off", False), ("no", False), (" FALSE ", False), ("", False),
                                          ("on", True), ("yes", True), ("True", True)])
def test_environment_values_are_read_case_insensitively(monkeypatch, text, enabled):
    monkeypatch.setenv(autotune.ENV, text)
    set_autotune(None)
    assert autotune.autotune_enabled() is enabled


def test_the_context_manager_restores_the_setting_it_found(monkeypatch):
    monkeypatch.setenv(autotune.ENV, "1")
    set_autotune(False)
    try:
        with autotune.autotuning():
            assert autotune.autotune_enabled()
        assert not autotune.autotune_enabled()  # forced off again, not back to the environment's 1
    finally:
        set_autotune(None)


def test_the_cache_file_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(autotune.CACHE_ENV, raising=False)
    monkeypatch.delenv("DREAM_CACHE", raising=False)
    assert autotune.cache_path() == tmp_path / "home" / ".cache" / "dream" / "kernel-autotune.json"
    monkeypatch.setenv("DREAM_CACHE", str(tmp_path / "cache"))
    assert autotune.cache_path() == tmp_path / "cache" / "kernel-autotune.json"
    monkeypatch.setenv(autotune.CACHE_ENV, "~/picks.json")
    assert autotune.cache_path() == tmp_path / "home" / "picks.json"


def test_candidate_grids_without_a_test_override():
    assert autotune._GRID is None
    assert autotune.candidate_grid(interpreted=False) == "quick"
    assert autotune.candidate_grid(interpreted=True) == "minimal"


def _fake_gpu(monkeypatch, name="Fake GPU 1"):
    """cuda:0 named `name` for problem_name, without asking a driver."""
    monkeypatch.setitem(autotune._device_names, 0, name)
    return torch.device("cuda", 0)


def test_problem_names_hold_the_gpu_name_and_the_triton_version(monkeypatch):
    device = _fake_gpu(monkeypatch)
    name = autotune.problem_name("toy", (4, "cl"), device)
    assert name.startswith("toy|") and name.endswith("|4|cl")
    assert "Fake GPU 1" in name.split("|") and any(triton.__version__ in part for part in name.split("|"))
    assert autotune.problem_name("toy", (4, "cl"), _fake_gpu(monkeypatch, "Fake GPU 2")) != name
    assert autotune.problem_name("toy", (4, "cl"), torch.device("cpu")) != name


def test_nothing_is_tuned_while_the_devices_stream_is_captured(tuning, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    device = _fake_gpu(monkeypatch)
    assert autotune.choose("toy", (16,), device, TWO, _values) is None
    assert tuning.timed == []


def test_every_candidate_is_compiled_before_any_is_timed(tuning, monkeypatch):
    """On a GPU (not interpreted) precompile gets a call of every configuration before the timing starts;
    the interpreter compiles nothing."""
    compiled = []

    def record(calls, workers=None):
        assert tuning.timed == []
        for call in calls:
            call()

    def run(config):
        if not tuning.timed:  # launched inside precompile
            compiled.append(config)
        return _values(config)

    monkeypatch.setattr(autotune, "precompile", record)
    assert autotune.choose("toy", (17,), torch.device("cpu"), TWO, run, interpreted=False) == {"a": 2}
    heuristic, configs = TWO()
    assert heuristic in compiled and all(config in compiled for config in configs)
    compiled.clear()
    tuning.timed.clear()
    assert autotune.choose("toy", (18,), torch.device("cpu"), TWO, run, interpreted=True) == {"a": 2}
    assert compiled == [heuristic]  # only the reference run before the first timing


def _outputs(config, reference, candidate):
    return reference() if config == {"a": 1} else candidate()


def _ramp(dtype=torch.float32, scale=1.0):
    gen = torch.Generator().manual_seed(3)
    return ((torch.rand(8, generator=gen, dtype=torch.float64) + 0.5) * scale).to(dtype)


def _with_nan():
    values = _ramp()
    values[3] = float("nan")
    return [values]


@pytest.mark.parametrize("reference,candidate,kept", [
    (lambda: [_ramp(), _ramp()], lambda: [_ramp()], False),                              # an output missing
    (lambda: [_ramp()], lambda: [_ramp().double()], False),                                 # another dtype
    (lambda: [_ramp()], _with_nan, False),                                                  # NaN where finite
    (lambda: [_ramp()], lambda: [_ramp() * (1 + 1e-3)], False),                            # fp32: beyond rounding
    (lambda: [_ramp(scale=1e4)], lambda: [_ramp(scale=1e4) * (1 + 1e-6)], True),           # relative, not absolute
    (lambda: [_ramp(torch.float16)], lambda: [_ramp(torch.float16) * (1 + 1e-3)], True),   # fp16's rounding
    (lambda: [torch.empty(0)], lambda: [torch.empty(0)], True),
], ids=["fewer-outputs", "dtype", "nan", "fp32-1e-3", "large-values", "fp16-1e-3", "empty"])
def test_candidates_are_compared_with_the_heuristic_relative_to_its_largest_output(tuning, reference, candidate,
                                                                                  kept):
    """max|candidate - heuristic| / max|heuristic| within the output dtype's rounding keeps a candidate (here the
    faster one); other shapes, dtypes, counts, non-finite values or larger differences drop it."""
    run = lambda config: _outputs(config, reference, candidate)  # noqa: E731
    assert autotune.choose("toy", (19,), torch.device("cpu"), TWO, run, interpreted=True) == ({"a": 2} if kept
                                                                                              else {"a": 1})


@pytest.mark.parametrize("faster_by,picked", [(0.04, {"a": 2}), (0.03, {"a": 1}), (0.02, {"a": 1})])
def test_the_heuristic_is_kept_unless_beaten_by_more_than_three_percent(tuning, faster_by, picked):
    """A candidate replaces the heuristic's pick ({"a": 1}) only when more than 3 % faster: within timing noise
    the heuristic, made for the GPU, stays."""
    assert autotune.KEEP_HEURISTIC_MARGIN == 0.03
    tuning.seconds = {json.dumps({"a": 1}): 1.0, json.dumps({"a": 2}): 1.0 - faster_by}
    assert autotune.choose("toy", (20,), torch.device("cpu"), TWO, _values, interpreted=True) == picked


@pytest.mark.parametrize("heuristic_seconds,candidate_seconds,picked", [
    (float("nan"), 0.5, {"a": 2}),
    (1.0, float("nan"), {"a": 1}),
    (float("inf"), 0.5, {"a": 2}),
], ids=["heuristic-nan", "candidate-nan", "heuristic-inf"])
def test_a_timing_that_is_not_a_finite_number_is_not_ranked(tuning, heuristic_seconds, candidate_seconds, picked):
    """A configuration whose timing is NaN or infinite is left out of the ranking (a NaN would compare as neither
    faster nor slower): the fastest finite timing wins, and with the heuristic's time unknown, any finite one
    beats it."""
    tuning.seconds = {json.dumps({"a": 1}): heuristic_seconds, json.dumps({"a": 2}): candidate_seconds}
    assert autotune.choose("toy", (28,), torch.device("cpu"), TWO, _values, interpreted=True) == picked


def test_a_cache_file_not_yet_written_is_no_warning(tuning, tmp_path):
    assert not (tmp_path / "picks.json").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert autotune.choose("toy", (22,), torch.device("cpu"), TWO, _values, interpreted=True) == {"a": 2}
    assert list(_picks(tmp_path).values()) == [{"a": 2}]


def _cached_pick_file(tmp_path, text):
    (tmp_path / "picks.json").write_text(text)


@pytest.mark.parametrize("contents", [
    lambda name: json.dumps({"version": autotune.CACHE_VERSION + 1, "picks": {name: {"a": 3}}}),
    lambda name: json.dumps({"version": autotune.CACHE_VERSION, "picks": {name: {"a": 3.5}}}),
    lambda name: json.dumps([name, {"a": 3}]),
], ids=["other-version", "not-integers", "not-a-mapping"])
def test_a_cache_file_of_another_format_is_ignored_with_one_warning(tuning, tmp_path, contents):
    name = autotune.problem_name("toy", (21,), torch.device("cpu"))
    _cached_pick_file(tmp_path, contents(name))
    with pytest.warns(UserWarning, match="picks.json is unreadable") as caught:
        assert autotune.choose("toy", (21,), torch.device("cpu"), TWO, _values, interpreted=True) == {"a": 2}
    assert len(caught) == 1
    assert _picks(tmp_path) == {name: {"a": 2}}


def test_the_file_is_written_through_a_synced_temp_file_and_keeps_other_processes_picks(tuning, tmp_path,
                                                                                       monkeypatch):
    events = []
    fsync, replace = autotune.os.fsync, autotune.os.replace
    monkeypatch.setattr(autotune.os, "fsync", lambda fd: (events.append("fsync"), fsync(fd))[1])
    monkeypatch.setattr(autotune.os, "replace", lambda src, dst: (events.append(("replace", src, dst)),
                                                                  replace(src, dst))[1])
    first = autotune.choose("toy", (22,), torch.device("cpu"), TWO, _values, interpreted=True)
    path = tmp_path / "picks.json"
    assert events[0] == "fsync" and events[1][0] == "replace" and events[1][2] == path
    assert Path(events[1][1]).parent == tmp_path  # renamed within the folder: atomic
    # meanwhile another process adds its pick; this one's next pick keeps it
    other = {**_picks(tmp_path), "other|problem": {"a": 7}}
    path.write_text(json.dumps({"version": autotune.CACHE_VERSION, "picks": other}))
    second = autotune.choose("toy", (23,), torch.device("cpu"), TWO, _values, interpreted=True)
    assert _picks(tmp_path) == {**other, autotune.problem_name("toy", (23,), torch.device("cpu")): second}
    assert first == second == {"a": 2}


def test_a_file_that_cannot_be_written_warns_keeps_the_pick_and_leaves_no_temp_file(tuning, tmp_path, monkeypatch):
    path = tmp_path / "picks.json"
    _cached_pick_file(tmp_path, json.dumps({"version": autotune.CACHE_VERSION, "picks": {}}))
    before = path.read_text()

    def refuse(src, dst):
        raise PermissionError(13, "read-only file system")

    monkeypatch.setattr(autotune.os, "replace", refuse)
    with pytest.warns(UserWarning, match="cannot write it .*kept in memory only"):
        assert autotune.choose("toy", (24,), torch.device("cpu"), TWO, _values, interpreted=True) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["picks.json"] and path.read_text() == before
    assert autotune.choose("toy", (24,), torch.device("cpu"), TWO, _values, interpreted=True) == {"a": 2}
    assert len(tuning.timed) == 2  # served from memory


def test_a_checked_pick_is_served_without_building_the_candidates_again(tuning):
    calls = []

    def candidates():
        calls.append(1)
        return TWO()

    args = ("toy", (25,), torch.device("cpu"), candidates, _values)
    assert autotune.choose(*args, interpreted=True) == {"a": 2} and len(calls) == 1
    autotune.clear_picks()
    for _ in range(3):  # from the file: its fields are compared with the launcher's once
        assert autotune.choose(*args, interpreted=True) == {"a": 2}
    assert len(calls) == 2


def test_a_pick_made_in_this_process_outlives_a_switch_of_cache_file(tuning, tmp_path, monkeypatch):
    """Once a problem has its pick in this process, pointing DREAM_KERNEL_AUTOTUNE_CACHE at another file that holds
    another pick for it does not change the configuration launched midway (the other file's picks fill in only
    problems without one)."""
    args = ("toy", (26,), torch.device("cpu"), TWO, _values)
    assert autotune.choose(*args, interpreted=True) == {"a": 2}
    other = tmp_path / "other.json"
    name = autotune.problem_name("toy", (26,), torch.device("cpu"))
    unseen = autotune.problem_name("toy", (27,), torch.device("cpu"))
    other.write_text(json.dumps({"version": autotune.CACHE_VERSION, "picks": {name: {"a": 1}, unseen: {"a": 1}}}))
    monkeypatch.setenv(autotune.CACHE_ENV, str(other))
    assert autotune.choose(*args, interpreted=True) == {"a": 2}
    assert autotune.choose("toy", (27,), torch.device("cpu"), TWO, _values, interpreted=True) == {"a": 1}
    assert len(tuning.timed) == 2  # neither tuned again


@pytest.fixture
def problem_keys(monkeypatch):
    """Autotuning on, choose() recording (kernel, key) and answering None (the heuristics launch)."""
    keys = []
    monkeypatch.setenv(autotune.ENV, "1")
    set_autotune(None)
    monkeypatch.setattr(autotune, "choose", lambda kernel, key, *args, **kwargs: keys.append((kernel, key)))
    return keys


def test_group_norm_problems_differ_in_every_flag_that_changes_the_launch(problem_keys):
    gen = torch.Generator().manual_seed(29)
    x, weight, bias, scale = _randn(gen, 1, 4, 2, 3), _randn(gen, 4), _randn(gen, 4), _randn(gen, 1, 4)
    seed = torch.tensor([7], dtype=torch.int64, device=DEVICE)
    variants = {
        "base": lambda: group_norm_silu(x, weight, bias, 2),
        "again": lambda: group_norm_silu(x.clone(), weight, bias, 2),
        "identity": lambda: group_norm_silu(x, weight, bias, 2, silu=False),
        "channels_last": lambda: group_norm_silu(x.contiguous(memory_format=torch.channels_last), weight, bias, 2),
        "fp16": lambda: group_norm_silu(x.half(), weight, bias, 2),
        "groups": lambda: group_norm_silu(x, weight, bias, 4),
        "scale": lambda: group_norm_silu(x, weight, bias, 2, scale=scale),
        "shift": lambda: group_norm_silu(x, weight, bias, 2, shift=scale),
        "post": lambda: group_norm_silu(x, weight, bias, 2, scale=scale, mode="post"),
        "dropout": lambda: group_norm_silu(x, weight, bias, 2, dropout_p=0.5, seed=seed),
    }
    keys = {}
    for name, call in variants.items():
        problem_keys.clear()
        call()
        (keys[name],) = problem_keys
        assert keys[name][0] == "group_norm_silu_fwd"
    assert keys.pop("again") == keys["base"]
    assert len(set(keys.values())) == len(keys), keys


def test_attention_problems_differ_in_the_operands_strides(problem_keys):
    gen = torch.Generator().manual_seed(31)
    q, k, v = (_randn(gen, 1, 2, 5, 16) for _ in range(3))
    heads_inner = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]  # (B, N, H, D) memory
    for operands in ((q, k, v), (q.clone(), k, v), heads_inner):
        attention(*operands)
    assert [kernel for kernel, _ in problem_keys] == ["attention_fwd"] * 3
    assert problem_keys[0] == problem_keys[1] != problem_keys[2]


def test_an_unknown_candidate_grid_is_one_clear_error():
    att = importlib.import_module("kernels.attention")
    with pytest.raises(ValueError, match=r"^launch_candidates: grid must be quick, full or minimal, got 'fast'"):
        gns.launch_candidates(4, 8, 64, False, {"groups": 1}, grid="fast")
    heuristic = att.forward_config(64, 32, torch.float16)
    with pytest.raises(ValueError, match=r"^attention candidates: grid must be quick, full or minimal, got 'fast'"):
        att.forward_candidates(64, heuristic, grid="fast")


def _toy_kernel():
    pass


class _GridRecorder:
    """A stand-in for a @triton.jit function (named by its `fn`, as Triton's are): kernel[grid] returns the grid."""

    fn = _toy_kernel

    def __getitem__(self, grid):
        return grid


@pytest.mark.parametrize("grid,allowed", [
    ((2**31 - 1, 65535, 65535), True),   # the largest grid CUDA launches
    ((2**31, 1, 1), False),
    ((1, 65536, 1), False),
    ((1, 1, 65536), False),
    ((1, 65536), False),
], ids=["largest", "x", "y", "z", "y-of-2d"])
def test_launch_checks_the_grid_against_cudas_limits_along_every_axis(grid, allowed):
    """autotune.launch passes a grid of up to 2^31 - 1 blocks along x and 65535 along y and z through, and refuses
    one block more along any axis, z included, in one line naming the kernel (on CPU too, before any launch)."""
    if allowed:
        assert autotune.launch(_GridRecorder(), grid) == grid
    else:
        with pytest.raises(ValueError, match=rf"^_toy_kernel: a launch grid of {re.escape(str(grid))} blocks exceeds "
                                             r"CUDA's limits"):
            autotune.launch(_GridRecorder(), grid)
