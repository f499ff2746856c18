"""Test setup shared by every test file.

Without a GPU, Triton kernels run through the Triton interpreter, which is read
when a kernel is decorated: the variable must be set before `kernels` is imported.
"""
import os
import subprocess
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from dream import math_flags  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"

MAX_AUTO_WORKERS = 8  # each pytest-xdist worker imports torch and Triton (about half a GB)
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))  # set in each worker of `pytest -n`


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """`pytest -n auto` (pytest-xdist): one worker per CPU core, at most MAX_AUTO_WORKERS."""
    return min(os.cpu_count() or 1, MAX_AUTO_WORKERS)


if XDIST_WORKERS > 1:  # the workers share the cores rather than each running a thread on every one
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // XDIST_WORKERS))

# `--dist loadfile` hands whole files to the workers in collection order: the files that take longest (about 1.5
# to 3 minutes each on 2 CPU cores, 2026-12-01; test_training_run is one 35-80 s test) go first, so that none is
# handed out last to keep one worker busy while the others idle. (pytest-xdist's own order, by test count, put
# test_kernel_compile's 6 tests and test_training_run's one near the end.)
LONGEST_FILES = ("test_kernel_compile.py", "test_group_norm_silu.py", "test_distributed.py", "test_cli.py",
                 "test_memory.py", "test_trainer.py", "test_unet_backends.py", "test_crash_protection.py",
                 "test_sampling.py", "test_training_run.py")


def pytest_collection_modifyitems(config, items):
    """The LONGEST_FILES first, in that order; the order of the other files, and of the tests within each file,
    unchanged (a stable sort)."""
    position = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: position.get(item.path.name, len(position)))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stand_in_cuda_capture(monkeypatch, end_error: str, end_always: bool = False) -> list:
    """torch.cuda's CUDAGraph, graph and stream contexts replaced by stand-ins that fail as CUDA's do, and
    dream.step_graph.recover_from_failed_capture by a recorder: ending a capture raises RuntimeError("CUDA error:
    <end_error>") when its body raised (holding that error as its context), or always with `end_always` (an
    invalidated capture). Returns the list of events: stream, capture, stream restored, recovered."""
    import contextlib

    import dream.step_graph

    events = []

    @contextlib.contextmanager
    def stream(s):
        events.append("stream")
        try:
            yield
        finally:
            events.append("stream restored")

    @contextlib.contextmanager
    def graph(cuda_graph, pool=None, stream=None):
        events.append("capture")
        try:
            yield
        except BaseException:
            raise RuntimeError(f"CUDA error: {end_error}")
        if end_always:
            raise RuntimeError(f"CUDA error: {end_error}")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(dream.step_graph, "recover_from_failed_capture", lambda s, device: events.append("recovered"))
    return events


def run_without_interpreter(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a Python snippet in a fresh process from the repository root with TRITON_INTERPRET unset (the
    kernels then compile for a GPU), capturing its output."""
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def qkv_attention_with_float64(qkv: torch.Tensor, grad_out: torch.Tensor, heads: int):
    """kernels.attention_qkv_nchw on qkv and its gradient for grad_out, beside the float64 reference's:
    (out, dqkv, ref_out, ref_dqkv)."""
    from kernels import attention_qkv_nchw, attention_qkv_nchw_reference

    leaf = qkv.detach().requires_grad_()
    out = attention_qkv_nchw(leaf, heads)
    out.backward(grad_out)
    ref_leaf = qkv.detach().double().requires_grad_()
    ref_out = attention_qkv_nchw_reference(ref_leaf, heads)
    ref_out.backward(grad_out.double())
    return out, leaf.grad, ref_out.detach(), ref_leaf.grad


class NanEmptyTorch:
    """torch for a kernel module's host code (monkeypatch the module's `torch` with it), with torch.empty,
    empty_like and empty_strided filling what they allocate with NaN (counted in `allocated`): the public ops'
    outputs then start poisoned, so an element a kernel leaves unwritten fails the comparison."""

    def __init__(self):
        self.allocated = 0

    def __getattr__(self, name):
        return getattr(torch, name)

    def _poisoned(self, allocate):
        def allocate_nan(*args, **kwargs):
            self.allocated += 1
            return allocate(*args, **kwargs).fill_(float("nan"))
        return allocate_nan

    @property
    def empty(self):
        return self._poisoned(torch.empty)

    @property
    def empty_like(self):
        return self._poisoned(torch.empty_like)

    @property
    def empty_strided(self):
        return self._poisoned(torch.empty_strided)


class RecordOps(TorchDispatchMode):
    """Records every aten call made under it as (func, args) in `calls` (which ops a backward ran)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual − expected| / max|expected| over the whole tensor (the absolute error where expected is
    all zeros), in float64."""
    expected = expected.double()
    denom = expected.abs().max().item()
    err = (actual.double() - expected).abs().max().item()
    return err / denom if denom > 0 else err


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Same shape, finite, and rel_err within tol, with a message naming the tensor."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = rel_err(actual, expected)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def assert_fake_matches_real(op, *args) -> None:
    """op's outputs under FakeTensorMode (its fake implementation, as torch.compile traces it) have the shape, dtype
    and strides of its real outputs on the same arguments (a compiled graph lays out what follows by them)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = op(*args)
    with FakeTensorMode() as mode:
        fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    real, fake = ((out if isinstance(out, tuple) else (out,)) for out in (real, fake))
    for index, (fake_output, output) in enumerate(zip(fake, real, strict=True)):
        assert (fake_output.shape, fake_output.dtype, fake_output.stride()) == (
            output.shape, output.dtype, output.stride()), (str(op), index)


def pytest_configure(config):
    """Under pytest-xdist, the files go out in collection order (pytest_collection_modifyitems), not sorted by test
    count. Under the Triton interpreter, stop at once with one line if it cannot run a kernel's loop here
    (Triton 3.6's interpreter turns a loop bound into an int with int() of a 1-element array, which
    NumPy 2.4 refuses), rather than failing every kernel test with the same traceback."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def count_blocks(out_ptr, n, BLOCK: tl.constexpr):
        total = 0
        for _ in range(0, n, BLOCK):
            total += 1
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count_blocks[(1,)](out, 5, BLOCK=2)
    except Exception as error:  # noqa: BLE001 - reported in one line below
        pytest.exit(f"the Triton {triton.__version__} interpreter cannot run a kernel loop with NumPy "
                    f"{numpy.__version__} ({type(error).__name__}: {str(error).splitlines()[0]}); install "
                    f"'numpy<2.4' or a newer Triton", returncode=4)
    if out.item() != 3:
        pytest.exit(f"the Triton {triton.__version__} interpreter counted {out.item()} loop trips instead of 3",
                    returncode=4)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def restore_backend_flags():
    """Every test starts from and leaves the same global math flags: the Trainer turns on TF32 and
    cudnn.benchmark on CUDA, which must not leak into the tests that follow."""
    with math_flags.MathFlags():
        yield


@pytest.fixture
def exact_fp32():
    """fp32 matmuls and convolutions without TF32 for the test."""
    with math_flags.exact_fp32():
        yield


@pytest.fixture
def broken_torchvision(monkeypatch):
    """torchvision failing at import the way PyPI's does beside another torch: a RuntimeError, not an
    ImportError (its message has a second line)."""
    import builtins

    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name.startswith("torchvision"):
            raise RuntimeError("operator torchvision::nms does not exist\nmore lines")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)


@pytest.fixture
def one_cpu_thread():
    """One intra-op CPU thread: tiny models gain nothing from more on a shared CPU, and trainer tests
    compare with subprocesses that run single-threaded (the same summation order everywhere)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tiny_checkpoint(tmp_path, step: int, **config):
    """A checkpoint of a tiny 16x16 model with perturbed weights and EMA (so they differ), at `step`."""
    from dream.train import TrainConfig, Trainer

    settings = dict(run_dir=str(tmp_path / "run"), preset="tiny",
                    model_overrides={"image_size": 16, "base_channels": 16},
                    backend="eager", num_timesteps=10, objective="standard", data="synthetic", batch_size=2,
                    device="cpu", precision="fp32", sample_every=0, progress=False)
    trainer = Trainer(TrainConfig(**{**settings, **config}))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        trainer.ema.shadow = [s + torch.randn(s.shape, generator=g) * 0.05 for s in trainer.ema.shadow]
    trainer.step = step
    return trainer.save_checkpoint()
