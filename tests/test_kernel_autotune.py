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
import warnings

import pytest
import torch

from conftest import DEVICE, ON_GPU, assert_close, qkv_attention_with_float64

from kernels import autotune, set_autotune
from kernels.attention import attention_qkv_nchw
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


def test_heuristic_kept_unless_beaten_beyond_noise(tuning):
    tuning.seconds = {json.dumps({"a": 1}): 1.0, json.dumps({"a": 2}): 1.0 - autotune.KEEP_HEURISTIC_MARGIN / 2}
    pick = autotune.choose("toy", (8,), torch.device("cpu"), TWO, _values,
                           interpreted=True)
    assert pick == {"a": 1}


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


def test_a_cached_pick_with_other_fields_than_the_launchers_is_tuned_again(tuning, tmp_path, caplog):
    """A cache file written by a release whose configurations had other fields: its pick would make every
    launch fail (a TypeError building the configuration), so it is tuned again and replaced."""
    name = autotune.problem_name("toy", (15,), torch.device("cpu"))
    (tmp_path / "picks.json").write_text(json.dumps({"version": autotune.CACHE_VERSION, "picks": {name: {"b": 5}}}))
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
