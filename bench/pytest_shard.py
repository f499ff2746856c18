"""pytest plugin: run one shard of the collected tests, so several pytest processes can share a test run
with nothing beyond pytest (no pytest-xdist), each with its own log and report, each stoppable on its own.

    DREAM_TEST_SHARD=1/4 python3 -m pytest -p bench.pytest_shard tests/...

keeps the collected items i, i + n, i + 2n, ... of shard "i/n" (0 <= i < n) and deselects the rest, so
the n shards together run every test exactly once. Interleaving spreads each parametrized test's slow
cases (the full-size shapes, which compile their own kernels) over all shards. On an interrupt it prints
INTERRUPTED_LINE at once.

    DREAM_TEST_FIRST=gpu-only,test_unet_backends.py

moves some tests to the front (before sharding, so each shard starts with its share of them), in case
the run is cut short: comma-separated node-id substrings, and `gpu-only` for the tests that a
`skipif` marker would skip without a GPU (its reason names CUDA or a GPU: bf16 on hardware, CUDA
graphs, the allocator's peak memory).

    DREAM_TEST_STOP_FILE=<path>

names the file a runner creates before its SIGINT at a time limit. Code under test that takes SIGINT
itself (the trainer: it saves and raises dream.train.Interrupted, which carries `signum`) would turn
that SIGINT into a test failure and let the session go on: while the file exists, an exception with
signum == SIGINT ends the session as interrupted instead.
"""
from __future__ import annotations

import os
import signal

import pytest

SHARD_VARIABLE = "DREAM_TEST_SHARD"
FIRST_VARIABLE = "DREAM_TEST_FIRST"
STOP_VARIABLE = "DREAM_TEST_STOP_FILE"
INTERRUPTED_LINE = "pytest_shard: interrupted; finishing the session (reports are being written)"


def parse_shard(text: str) -> tuple[int, int]:
    """"i/n" -> (i, n), with a one-line error naming what is wrong."""
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise ValueError(f"{SHARD_VARIABLE} must look like i/n (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"{SHARD_VARIABLE}={text!r}: need n >= 1 and 0 <= i < n")
    return index, count


def pytest_configure(config):
    spec = os.environ.get(SHARD_VARIABLE)
    if spec:
        try:
            parse_shard(spec)
        except ValueError as error:
            raise pytest.UsageError(str(error)) from None


def _gpu_only(item) -> bool:
    return any(any(word in str(marker.kwargs.get("reason", "")) for word in ("CUDA", "GPU"))
               for marker in item.iter_markers("skipif"))


def first_key(item, tokens: list[str]) -> int:
    """0 for a test that goes first, 1 otherwise (a stable sort keeps the collection order within each)."""
    for token in tokens:
        if (token == "gpu-only" and _gpu_only(item)) or (token != "gpu-only" and token in item.nodeid):
            return 0
    return 1


def pytest_collection_modifyitems(config, items):
    tokens = [t.strip() for t in os.environ.get(FIRST_VARIABLE, "").split(",") if t.strip()]
    if tokens:
        items.sort(key=lambda item: first_key(item, tokens))
    spec = os.environ.get(SHARD_VARIABLE)
    if not spec:
        return
    index, count = parse_shard(spec)
    deselected = [item for position, item in enumerate(items) if position % count != index]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = items[index::count]


def pytest_keyboard_interrupt(excinfo):
    """Say at once that the interrupt was taken (pytest's own note comes only after the reports are
    written), so a runner that repeats its SIGINT stops before it can cut the reports short."""
    print("\n" + INTERRUPTED_LINE, flush=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A SIGINT the runner sent (its stop file exists) that the test's own code took and raised as an
    exception with signum == SIGINT: a KeyboardInterrupt (the session stops, the test is not failed)."""
    try:
        return (yield)
    except Exception as error:
        stop_file = os.environ.get(STOP_VARIABLE)
        if getattr(error, "signum", None) == signal.SIGINT and stop_file and os.path.exists(stop_file):
            raise KeyboardInterrupt(f"{item.nodeid}: {error}") from error
        raise
