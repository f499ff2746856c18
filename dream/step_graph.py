"""A training step captured as one CUDA graph and replayed: one launch a step instead of thousands.

`StepGraph(body)` runs `body(*inputs) -> dict of tensors` (gradients, clipping, optimizer, EMA: the whole
device side of a step) three ways, by how often the current key has been seen:
- the first `warmup_steps` calls of a key run body eagerly on the capture stream: they are real steps, and
  they do what must not happen during a capture (Triton compilation and autotuning, torch.compile, cuDNN's
  algorithm choice, cuBLAS workspaces, the optimizer's lazily made state);
- the next call copies its inputs into static buffers, captures body on them, then replays the graph;
- later calls copy their inputs into the static buffers and replay.
The key names what the captured work depends on besides the inputs' values (the trainer's: the objective's epoch
phase, micro-batch, training mode): a new key drops the graph and warms up again. Everything else the graph reads
(parameters, gradients, optimizer and EMA state) it reads in place, so it must be replaced only in place: after a
load that swaps tensors (an optimizer's load_state_dict) call reset().

Random numbers drawn inside body come from the default CUDA generator, graph-safe: each replay reads the
generator's seed and offset as they are then (after a torch.manual_seed too), so a replay draws what the
eager call would have. Outputs are static too: replay() returns clones.
"""
from __future__ import annotations

import time
import traceback
from typing import Callable, Hashable, NoReturn

import torch


class CaptureFailed(RuntimeError):
    """body could not be captured (an operation that syncs with the host or is not allowed in a capture)."""


class StepGraph:
    def __init__(self, body: Callable[..., dict], device: torch.device, warmup_steps: int = 2):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be at least 1, got {warmup_steps}")
        self.body, self.device, self.warmup_steps = body, device, warmup_steps
        self.stream = torch.cuda.Stream(device)
        self.captures = 0
        self.last_capture_seconds = 0.0
        self.reset()

    def reset(self) -> None:
        """Drop the graph; the next calls warm up and capture again."""
        self.key: Hashable = None
        self.warm = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[torch.Tensor, ...] = ()
        self.outputs: dict[str, torch.Tensor] = {}

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def will_replay(self, key: Hashable) -> bool:
        """Whether a call with this key replays a graph captured before (rather than running body in Python)."""
        return self.graph is not None and key == self.key

    def __call__(self, key: Hashable, *inputs: torch.Tensor) -> dict:
        if key != self.key:
            self.reset()
            self.key = key
        if self.graph is None and self.warm < self.warmup_steps:
            self.warm += 1
            return self._on_capture_stream(lambda: self.body(*inputs))
        if self.graph is None:
            self._capture(inputs)
        elif any(s.shape != v.shape or s.dtype != v.dtype for s, v in zip(self.inputs, inputs)):
            raise ValueError(f"StepGraph inputs changed under the same key {key!r}: "
                             f"{[tuple(v.shape) for v in inputs]} vs {[tuple(s.shape) for s in self.inputs]}")
        for static, value in zip(self.inputs, inputs):
            static.copy_(value)
        self.graph.replay()
        return {name: value.clone() for name, value in self.outputs.items()}

    def _on_capture_stream(self, work: Callable):
        """work() on the capture stream, ordered after the current stream's queued work and before its later work."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            result = work()
        current.wait_stream(self.stream)
        return result

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> None:
        start = time.perf_counter()
        # static buffers laid out like the inputs (channels_last stays channels_last); the call fills them
        self.inputs = tuple(torch.empty_like(value) for value in inputs)
        graph = torch.cuda.CUDAGraph()
        try:
            # A private memory pool per capture, freed with its graph. torch.cuda.graph synchronizes and empties
            # the allocator's cache first: the warm-up's cached blocks (and a dropped graph's pool) go back first.
            # (The outer stream context puts the current stream back even where ending the capture fails, when
            # torch.cuda.graph's exit does not.)
            with torch.cuda.stream(self.stream), torch.cuda.graph(graph, stream=self.stream):
                outputs = self.body(*self.inputs)
        except Exception as error:
            graph = None  # dropped: where torch's destructor releases what the failed capture held, that happens now
            raise_failed_capture(error, self.stream, self.device)
        self.graph, self.outputs = graph, outputs
        self.captures += 1
        self.last_capture_seconds = time.perf_counter() - start


def raise_failed_capture(error: Exception, stream: torch.cuda.Stream, device: torch.device) -> NoReturn:
    """Raise for a capture on `stream` that raised `error`, once the CUDA state is mended (recover_from_failed_capture;
    the caller drops its graph first): an out-of-memory error as itself (callers retry smaller), any other as a
    one-line CaptureFailed naming the operation that failed. An error inside a capture surfaces as its own and then as
    ending the capture's ("operation failed due to a previous error during capture"), which holds it as its context."""
    traceback.clear_frames(error.__traceback__)  # (its frames may hold the failed graph)
    recover_from_failed_capture(stream, device)
    if isinstance(error, torch.cuda.OutOfMemoryError):
        raise error
    cause = error.__context__ if error.__context__ is not None else error
    if isinstance(cause, torch.cuda.OutOfMemoryError):  # an allocation that failed inside the capture
        raise cause from None
    first_line = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    raise CaptureFailed(f"{type(cause).__name__}: {first_line}") from error


def recover_from_failed_capture(stream: torch.cuda.Stream, device: torch.device) -> None:
    """Best effort after a capture that failed: where ending it raised, some torch versions leave the default CUDA
    generator expecting the capture (its next eager draw then raises "Offset increment outside graph capture") and
    the allocator routing to its pool. A capture that succeeds, of one random draw, ends that state."""
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            torch.rand(1, device=device)
        del graph
    except Exception:  # (the caller raises the capture's own error)
        pass
