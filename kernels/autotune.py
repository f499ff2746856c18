"""Launch configurations tuned at run time on a GPU (opt-in).

Each launcher picks its tile sizes and warps by heuristic. With autotuning on, the first call of
each problem (kernel, GPU, Triton version and the launcher's key: shapes, dtype, layout, flags)
instead tries the launcher's candidate configurations and keeps the fastest; later calls of the
same problem, in this process or in later ones through the cache file, launch that pick at once.

    DREAM_KERNEL_AUTOTUNE=1           tune (default 0: the heuristics); or kernels.set_autotune(True),
                                      or `with kernels.autotune.autotuning():`; `dream ... --autotune-kernels`
    DREAM_KERNEL_AUTOTUNE_CACHE=FILE  the picks' JSON file (default $DREAM_CACHE/kernel-autotune.json,
                                      else ~/.cache/dream/kernel-autotune.json; empty: no file)

Tuning one problem:
  0. every candidate is compiled, in parallel threads (Triton's AsyncCompileMode; see precompile);
  1. the heuristic's configuration runs; its outputs are the reference;
  2. every other candidate runs once; one that fails to compile or launch, or whose outputs differ
     from the reference by more than the dtype's tolerance (MATCH_TOLERANCE, max|a - b| / max|b|),
     is dropped;
  3. the survivors and the heuristic are timed (median of triton.testing.do_bench); a candidate
     replaces the heuristic only if it is faster by more than KEEP_HEURISTIC_MARGIN (timing noise).

Never under the Triton interpreter (its timings mean nothing) and never while a CUDA graph is being
captured: there an earlier pick is used if there is one, else the heuristic, so a graphed loop is
tuned by its warm-up steps. A pick changes launch shapes only, not the formulas, but sums then run
in another order (GroupNorm's statistics over other tiles): results can differ from the heuristic's
in the last bits, and two processes that time differently can pick differently.

The cache file is written atomically (temp file, fsync, rename), merged with what another process
wrote meanwhile; an unreadable file is reported in one warning and replaced at the next pick.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import torch
import triton

ENV = "DREAM_KERNEL_AUTOTUNE"
CACHE_ENV = "DREAM_KERNEL_AUTOTUNE_CACHE"
CACHE_VERSION = 1
# max|candidate - heuristic| / max|heuristic| allowed per output dtype (rounding of other sum orders)
MATCH_TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
KEEP_HEURISTIC_MARGIN = 0.03

log = logging.getLogger(__name__)

# Test hooks (patched by tests only): _ALLOW_INTERPRETER lets the interpreter tune (its timings are
# meaningless, so tests give _TIMER, a function (run, config) -> seconds, in place of do_bench);
# _GRID forces the launchers' candidate grid ("minimal": two candidates, few compiles on a GPU).
_ALLOW_INTERPRETER = False
_TIMER: Optional[Callable[[Callable[[], object], dict], float]] = None
_GRID: Optional[str] = None

_forced: Optional[bool] = None
_picks: dict = {}
_checked: set = set()  # picks whose fields were compared with the launcher's configurations in this process
_loaded_from: Optional[str] = None
_lock = threading.Lock()


def set_autotune(enabled: Optional[bool]) -> None:
    """Turn autotuning on or off for this process (None: follow DREAM_KERNEL_AUTOTUNE again)."""
    global _forced
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_autotune: enabled must be True, False or None, got {enabled!r}")
    _forced = enabled


@contextlib.contextmanager
def autotuning(enabled: bool = True):
    """Autotuning on (or off) inside the block, then as it was."""
    global _forced
    previous = _forced
    set_autotune(enabled)
    try:
        yield
    finally:
        _forced = previous


def autotune_enabled() -> bool:
    if _forced is not None:
        return _forced
    text = os.environ.get(ENV, "0").strip().lower()
    if text in ("", "0", "false", "off", "no"):
        return False
    if text in ("1", "true", "on", "yes"):
        return True
    raise ValueError(f"{ENV} must be 0 or 1, got {os.environ[ENV]!r}")


def cache_path() -> Optional[Path]:
    """The picks' file, or None (DREAM_KERNEL_AUTOTUNE_CACHE set empty: picks stay in memory)."""
    if CACHE_ENV in os.environ:
        text = os.environ[CACHE_ENV].strip()
        return Path(text).expanduser() if text else None
    root = os.environ.get("DREAM_CACHE") or os.path.join("~", ".cache", "dream")
    return Path(root).expanduser() / "kernel-autotune.json"


def clear_picks() -> None:
    """Forget the picks held in memory (the file stays; it is read again at the next lookup)."""
    global _loaded_from
    with _lock:
        _picks.clear()
        _checked.clear()
        _loaded_from = None


_device_names: dict = {}


def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_names:
        _device_names[index] = torch.cuda.get_device_name(index)
    return _device_names[index]


def problem_name(kernel: str, key: Sequence, device: torch.device) -> str:
    """kernel|GPU name|triton version|key..., the picks' name in memory and in the file."""
    return "|".join([kernel, _device_name(device), f"triton {triton.__version__}", *map(str, key)])


def _read_file(path: Path) -> dict:
    """The picks in `path` ({} if there is no file); one warning if it cannot be read."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as error:
        warnings.warn(f"kernel autotune cache {path}: cannot read it ({error}); tuning again", stacklevel=3)
        return {}
    try:
        data = json.loads(text)
        if data.get("version") != CACHE_VERSION or not isinstance(data.get("picks"), dict):
            raise ValueError(f"not a version-{CACHE_VERSION} picks file")
        picks = data["picks"]
        if not all(isinstance(v, dict) and all(isinstance(x, (int, bool)) for x in v.values())
                   for v in picks.values()):
            raise ValueError("a pick is not a mapping of integers")
        return picks
    except (ValueError, AttributeError) as error:
        warnings.warn(f"kernel autotune cache {path} is unreadable ({error}); it is ignored and will be "
                      f"replaced", stacklevel=3)
        return {}


def _write_file(path: Path, name: str, config: dict) -> None:
    """Add one pick to the file: read what is there (another process may have added picks), write the
    union to a temp file in the same folder, fsync it, rename it over the file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an unreadable file was reported when it was loaded
            picks = _read_file(path)
        picks[name] = config
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": CACHE_VERSION, "picks": picks}, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as error:
        warnings.warn(f"kernel autotune cache {path}: cannot write it ({error}); the pick is kept in memory only",
                      stacklevel=3)


def _load_once() -> None:
    global _loaded_from
    path = cache_path()
    where = str(path) if path is not None else ""
    if _loaded_from == where:
        return
    if path is not None:
        for name, config in _read_file(path).items():
            _picks.setdefault(name, config)
    _loaded_from = where


def candidate_grid(interpreted: bool) -> str:
    """The launchers' candidate grid: "quick" on a GPU (one to two dozen), "minimal" in the interpreter."""
    return _GRID or ("minimal" if interpreted else "quick")


_compile_only: ContextVar[bool] = ContextVar("dream_kernels_compile_only", default=False)


_GRID_X_MAX, _GRID_YZ_MAX = 2**31 - 1, 65535


def launch(kernel, grid):
    """kernel[grid], the way every launcher launches: inside precompile(), the kernel is only compiled
    (Triton's warmup), not run. (bench/test_bench_dispatch.py replaces it to time the host side alone.)
    A grid beyond CUDA's limits (2^31 - 1 blocks along x, 65535 along y and z) is a one-line ValueError, here
    and in the interpreter alike, not a launch failure on the GPU alone."""
    if grid[0] > _GRID_X_MAX or any(blocks > _GRID_YZ_MAX for blocks in grid[1:]):
        name = getattr(kernel, "fn", kernel).__name__
        raise ValueError(f"{name}: a launch grid of {grid} blocks exceeds CUDA's limits ({_GRID_X_MAX} along x, "
                         f"{_GRID_YZ_MAX} along y and z): the input is too large for this kernel")
    if _compile_only.get():
        return lambda *args, **kwargs: kernel.warmup(*args, grid=grid, **kwargs)
    return kernel[grid]


def precompile(calls: Sequence[Callable[[], object]], workers: Optional[int] = None) -> None:
    """Compile the kernels that each call launches, in parallel, without running them: the calls run with
    launch() compiling only, inside Triton's AsyncCompileMode over a thread pool (compiles wait on ptxas
    and other code outside the GIL). What fails to compile here fails again, with its error, when the call
    runs for real; precompiling is only a head start."""
    token = _compile_only.set(True)
    try:
        with ThreadPoolExecutor(workers or min(16, os.cpu_count() or 1)) as pool, \
                triton.AsyncCompileMode(pool, ignore_errors=True):
            for call in calls:
                try:
                    call()
                except Exception as error:  # noqa: BLE001 - see the docstring
                    log.debug("precompile: %s", error)
    except Exception as error:  # noqa: BLE001 - no AsyncCompileMode in this Triton, or it failed: no head start
        log.debug("precompile skipped: %s", error)
    finally:
        _compile_only.reset(token)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _time(run: Callable[[], object], config: dict) -> float:
    """Seconds per call of run(): the median of triton.testing.do_bench (CUDA events)."""
    if _TIMER is not None:
        return _TIMER(run, config)
    import triton.testing

    return triton.testing.do_bench(run, warmup=10, rep=40, return_mode="median") * 1e-3


def _mismatch(outputs: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> Optional[str]:
    """Why `outputs` do not match `expected` (None when they do)."""
    if len(outputs) != len(expected):
        return f"{len(outputs)} outputs instead of {len(expected)}"
    for i, (out, ref) in enumerate(zip(outputs, expected)):
        if out.shape != ref.shape or out.dtype != ref.dtype:
            return f"output {i} is {out.dtype} {tuple(out.shape)}, expected {ref.dtype} {tuple(ref.shape)}"
        if ref.numel() == 0:
            continue
        a, b = out.float(), ref.float()
        if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
            return f"output {i} has non-finite values where the heuristic's has none (or the reverse)"
        finite = torch.isfinite(b)
        scale = b[finite].abs().max().item() if finite.any() else 0.0
        err = (a[finite] - b[finite]).abs().max().item() if finite.any() else 0.0
        tol = MATCH_TOLERANCE.get(ref.dtype, 1e-4)
        if err > tol * max(scale, 1e-30):
            return f"output {i} differs by {err:.3g} (max |heuristic| {scale:.3g}, tolerance {tol:g} of it)"
    return None


def choose(kernel: str, key: Sequence, device: torch.device,
           candidates: Callable[[], Tuple[dict, Sequence[dict]]], run: Callable[[dict], Sequence[torch.Tensor]],
           interpreted: bool = False) -> Optional[dict]:
    """The configuration to launch `kernel` with for the problem `key` on `device`: None when
    autotuning is off (the launcher uses its heuristic), the earlier pick if there is one, else the one
    tuned now (see the module's docstring). candidates() gives (the heuristic's config, the configs to
    try), only when tuning; run(config) launches with `config` into fresh outputs and returns them.
    Configs are flat dicts of ints and bools (JSON)."""
    if not autotune_enabled():
        return None
    name = problem_name(kernel, key, device)
    with _lock:
        _load_once()
        pick = _picks.get(name)
        if pick is not None and name in _checked:
            return dict(pick)
    heuristic = None
    if pick is not None:  # from the file: written by a release whose configurations may have had other fields
        heuristic, configs = candidates()
        with _lock:
            if isinstance(pick, dict) and set(pick) == set(heuristic):
                _checked.add(name)
                return dict(pick)
            _picks.pop(name, None)
        log.warning("autotune %s: the cached pick %s does not fit this release's launcher; tuning again", name, pick)
    if (interpreted and not _ALLOW_INTERPRETER) or _capturing(device):
        return None
    if heuristic is None:
        heuristic, configs = candidates()
    if not interpreted:  # compile every candidate in parallel first (the interpreter compiles nothing)
        precompile([lambda config=config: run(config) for config in [heuristic, *configs]])
    config = _tune(name, heuristic, configs, run)
    with _lock:
        _picks[name] = config
        _checked.add(name)
    path = cache_path()
    if path is not None:
        with _lock:
            _write_file(path, name, config)
    return dict(config)


def _tune(name: str, heuristic: dict, candidates: Sequence[dict], run) -> dict:
    expected = [t.detach().clone() for t in run(heuristic)]
    times = {}
    dropped = 0
    for config in [heuristic] + [c for c in candidates if c != heuristic]:
        if config is not heuristic:
            try:
                why = _mismatch(run(config), expected)
            except Exception as error:  # noqa: BLE001 - a candidate that cannot compile or launch is dropped
                why = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            if why is not None:
                log.debug("autotune %s: candidate %s dropped: %s", name, config, why)
                dropped += 1
                continue
        try:
            seconds = _time(lambda config=config: run(config), config)
        except Exception as error:  # noqa: BLE001 - as above; the heuristic's own failure is the launch's
            if config is heuristic:
                raise
            log.debug("autotune %s: candidate %s dropped while timed: %s", name, config, error)
            dropped += 1
            continue
        if math.isfinite(seconds):
            times[json.dumps(config, sort_keys=True)] = (seconds, config)
    if not times:
        return dict(heuristic)
    base = times.get(json.dumps(heuristic, sort_keys=True), (math.inf, heuristic))[0]
    best_seconds, best = min(times.values(), key=lambda item: item[0])
    if best_seconds >= base * (1 - KEEP_HEURISTIC_MARGIN):  # not more than the margin faster
        best_seconds, best = base, heuristic
    log.info("autotune %s: %d candidates timed, %d dropped; picked %s (%.1f us, heuristic %.1f us)",
             name, len(times), dropped, best, best_seconds * 1e6, base * 1e6)
    return dict(best)
