"""The training step as a CUDA graph (dream train --cuda-graphs, dream.step_graph.StepGraph).

CPU: where it is refused, and the trainer's graph path (graph key, the capturable step body, the host's end of the
step) driven through a stand-in that runs the body uncaptured: bitwise the plain step's result, a non-finite step
included. CUDA: graphed training against plain training step by step (dropout on: the graph's random numbers
must be the plain step's), recaptures at DREAM's start and along its ramp, a non-finite batch skipped inside a
replay, and no host sync in the replayed steps.
"""
import contextlib
import json
import types

import pytest
import torch

from dream.errors import DreamError
from dream.step_graph import CaptureFailed, StepGraph
from dream.train import LogWindow, Trainer, check_cuda_graphs
from conftest import ON_GPU

from test_trainer import small_config


class Uncaptured:
    """StepGraph's interface, without a capture: the body runs as called; the keys and resets are recorded, and
    the second call of a key counts as its capture."""
    warmup_steps, last_capture_seconds = 1, 0.0

    def __init__(self, body):
        self.body, self.keys, self.resets, self.captures = body, [], 0, 0

    def __call__(self, key, *inputs):
        self.keys.append(key)
        self.captures += self.keys.count(key) == 2
        return self.body(*inputs)

    def reset(self):
        self.resets += 1

    def will_replay(self, key):
        return False


class ReplaysAtCapture(Uncaptured):
    """As Uncaptured, but a replay runs the body at the epoch of its capture, as a CUDA graph does: what the step
    computes from the trainer's epoch is fixed when it is captured, so a graph key that misses a dependence on the
    epoch gives other results than the plain step."""

    def __init__(self, trainer):
        super().__init__(trainer.graphed_step_body)
        self.trainer, self.capture_epochs = trainer, {}

    def __call__(self, key, *inputs):
        self.keys.append(key)
        if self.keys.count(key) == 2:
            self.captures += 1
            self.capture_epochs[key] = self.trainer.epoch
        epoch = self.trainer.epoch
        self.trainer.epoch = self.capture_epochs.get(key, epoch)
        try:
            return self.body(*inputs)
        finally:
            self.trainer.epoch = epoch


class FailingCapture(Uncaptured):
    def __call__(self, key, *inputs):
        raise CaptureFailed("RuntimeError: operation not permitted when stream is capturing")


def trainer_state(trainer):
    """Every tensor a step changes: weights, EMA shadow and count, AdamW moments and step counts."""
    state = [p.detach().clone() for p in trainer.model.parameters()]
    state += [s.clone() for s in trainer.ema.shadow] + [trainer.ema.updates.clone()]
    for per_param in trainer.optimizer.state.values():
        state += [v.clone() for v in per_param.values()]
    return state


def test_a_step_that_cannot_be_captured_stops_in_one_line_with_the_state_untouched(tmp_path):
    trainer = Trainer(small_config(tmp_path, precision="fp32"))
    trainer.step_graph = FailingCapture(trainer.graphed_step_body)
    before = trainer_state(trainer)
    with pytest.raises(DreamError, match=r"^--cuda-graphs: the training step could not be captured as a CUDA "
                                         r"graph \(RuntimeError: operation not permitted when stream is capturing\); "
                                         r"train without --cuda-graphs$"):
        trainer.train_step(next(iter(trainer.batches.epoch(0))))
    assert not trainer.updating and trainer.step == 0
    for a, b in zip(trainer_state(trainer), before):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cuda_graphs_on_a_cpu_is_refused_in_one_line(tmp_path):
    with pytest.raises(DreamError, match=r"^--cuda-graphs needs a CUDA device; this run is on cpu$"):
        Trainer(small_config(tmp_path, cuda_graphs=True, device="cpu"))


@pytest.mark.parametrize("precision, world_size, message", [
    ("fp16", 1, "--cuda-graphs does not work with --precision fp16"),
    ("bf16", 2, "--cuda-graphs works in one process; this job has 2"),
])
def test_cuda_graphs_are_refused_where_the_step_cannot_be_captured(precision, world_size, message):
    dist = types.SimpleNamespace(enabled=world_size > 1, world_size=world_size)
    with pytest.raises(DreamError, match=message) as caught:
        check_cuda_graphs(torch.device("cuda"), precision, dist)
    assert caught.value.same_on_every_rank and "\n" not in str(caught.value)
    check_cuda_graphs(torch.device("cuda"), "bf16", types.SimpleNamespace(enabled=False, world_size=1))


@pytest.mark.parametrize("checkpointing, dropout, refused", [
    ("resblocks", 0.1, True), ("all", 0.1, True), ("resblocks", 0.0, False), ("attention", 0.1, False),
    ("none", 0.1, False),
])
def test_cuda_graphs_refuse_checkpointing_that_recomputes_dropout(tmp_path, monkeypatch, checkpointing, dropout,
                                                                  refused):
    """torch.utils.checkpoint recomputes a ResBlock's dropout by restoring the random generator, which a capture
    cannot rewind: backward would draw another mask than forward, silently. Refused in one line; --checkpointing
    auto leaves those policies out. (CUDA itself is not needed to get there: its check is stood in for.)"""
    import dream.train

    monkeypatch.setattr(dream.train, "check_cuda_graphs", lambda *args: None)
    config = small_config(tmp_path, cuda_graphs=True, device="cpu", checkpointing=checkpointing)
    config.model_overrides = {**config.model_overrides, "dropout": dropout}
    if refused:
        with pytest.raises(DreamError, match=rf"^--cuda-graphs with --checkpointing {checkpointing} and dropout "
                                             rf"{dropout}: backward recomputes the ResBlocks' dropout .* use "
                                             rf"--checkpointing none, norms or attention, or --dropout 0$"):
            Trainer(config)
    else:  # past the check, as far as the StepGraph, which needs CUDA
        with pytest.raises(ValueError, match="^CUDA graphs need a CUDA device, not cpu$"):
            Trainer(config)
    policies = dream.train.policies_for_backend("triton")
    assert dream.train.graph_safe_policies(policies, True, 0.1) == ("none", "norms", "attention")
    assert dream.train.graph_safe_policies(policies, True, 0.0) == policies
    assert dream.train.graph_safe_policies(policies, False, 0.1) == policies


def test_the_graph_path_of_a_step_gives_the_plain_steps_result_bitwise(tmp_path):
    """CPU: the trainer's graph path (inputs drawn, body = gradients + clip + fused AdamW + EMA decided on the
    device, the host's end of the step) run uncaptured, replays at the epoch of their capture, against the plain
    path; DREAM on from the second epoch with a two-epoch ramp, dropout on, the second step's batch not finite
    (skipped by both). Same weights, EMA, AdamW state, logs and counters; the graph key follows the objective's
    phase (captures in epochs 0, 1 and 2; epoch 3 replays epoch 2's), each capture is logged (the first also
    said), and a load resets the graph."""
    overrides = {"image_size": 8, "base_channels": 16, "dropout": 0.1}
    trainers = [Trainer(small_config(tmp_path / name, model_overrides=overrides, precision="fp32", data_count=8,
                                     ema_warmup=True, epochs=4)) for name in ("plain", "graph")]
    graph = trainers[1].step_graph = ReplaysAtCapture(trainers[1])
    logs = {0: [], 1: []}
    for epoch in range(4):
        for i, trainer in enumerate(trainers):
            trainer.epoch = epoch
            for step, x0 in enumerate(trainer.batches.epoch(epoch)):
                if epoch == 0 and step == 1:
                    x0 = x0.clone()
                    x0[0, 0, 0, 0] = float("nan")
                logs[i].append({k: v.clone() for k, v in trainer.train_step(x0).items()})
    phases = [("standard",), ("dream", 0.5), ("dream", 1.0), ("dream", 1.0)]
    assert graph.keys == [(phase, 4, True) for phase in phases for _ in range(2)]
    for plain, graphed in zip(logs[0], logs[1]):
        assert plain.keys() == graphed.keys() and "finite" not in graphed
        for key in plain:
            torch.testing.assert_close(graphed[key], plain[key], rtol=0, atol=0, equal_nan=True)
    assert [float(entry["skipped"]) for entry in logs[1]] == [0, 1, 0, 0, 0, 0, 0, 0]
    for plain, graphed in zip(*map(trainer_state, trainers)):
        torch.testing.assert_close(graphed, plain, rtol=0, atol=0)
    for trainer in trainers:
        trainer.count_steps()
    assert [(t.step, t.skipped_steps, t.counted_step, t.updating) for t in trainers] == [(8, 1, 8, False)] * 2
    captured = [(r["captures"], r["step"], r["epoch"]) for r in trainers[1].pending_records
                if r.get("event") == "cuda_graph"]
    assert captured == [(1, 1, 0), (2, 3, 1), (3, 5, 2)]

    trainers[1].load_state_dict(trainers[0].state_dict())
    assert graph.resets == 1


def cuda_trainer(run_dir, cuda_graphs=True, **overrides):
    config = dict(model_overrides={"image_size": 16, "base_channels": 32, "dropout": 0.1}, data_count=16,
                  batch_size=8, device="cuda", precision="fp32", cuda_graphs=cuda_graphs)
    return Trainer(small_config(run_dir, **{**config, **overrides}))


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_graphed_training_follows_plain_training_step_by_step(tmp_path, exact_fp32, monkeypatch):
    """CUDA, triton backend, fp32 with TF32 off, dropout on: 5 steps of the standard objective (2 warm-up steps,
    the capture, 2 replays), then 5 in each of DREAM's first three epochs (ramp 0.5, 1, 1: captures in the first
    two, the third replays the second's graph). Each step's loss and gradient norm, and at the end every weight,
    EMA and AdamW tensor, match the plain trainer's (cuDNN may pick other algorithms: 1e-4)."""
    monkeypatch.setattr("dream.train.use_fast_math", lambda: None)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # (the same sums run to run)
    plain, graphed = cuda_trainer(tmp_path / "plain", cuda_graphs=False), cuda_trainer(tmp_path / "graphed")
    batches = [x0 for x0 in plain.batches.epoch(0)]
    for epoch in range(4):
        for step in range(5):
            results = []
            for trainer in (plain, graphed):
                trainer.epoch = epoch
                results.append(trainer.train_step(batches[step % len(batches)]))
            for key in ("loss", "grad_norm", "skipped"):
                torch.testing.assert_close(results[1][key], results[0][key], rtol=1e-4, atol=1e-6,
                                           msg=f"epoch {epoch} step {step}: {key}")
    assert graphed.step_graph.captures == 3 and graphed.step_graph.captured
    for a, b in zip(trainer_state(graphed), trainer_state(plain)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_a_non_finite_batch_is_skipped_inside_a_replay(tmp_path):
    """CUDA, bf16: past the capture, a batch with a NaN leaves weights, EMA and AdamW state as they were, is
    counted as skipped a step later, and the next finite batch steps again."""
    graphed = cuda_trainer(tmp_path, precision="bf16")
    x0 = next(iter(graphed.batches.epoch(0)))
    for _ in range(graphed.step_graph.warmup_steps + 1):
        graphed.train_step(x0)
    assert graphed.step_graph.captured
    before = trainer_state(graphed)
    bad = x0.clone()
    bad[0, 0, 0, 0] = float("nan")
    assert float(graphed.train_step(bad)["skipped"]) == 1
    for a, b in zip(trainer_state(graphed), before):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert float(graphed.train_step(x0)["skipped"]) == 0
    graphed.count_steps()
    assert graphed.skipped_steps == 1 and graphed.step_graph.captures == 1
    assert any(not torch.equal(a, b) for a, b in zip(graphed.model.parameters(), before))


@pytest.mark.skipif(not ON_GPU, reason="CUDA's sync debug mode needs a GPU")
def test_replayed_steps_make_no_host_sync(tmp_path):
    """CUDA, the default precision (bf16), channels_last: replayed steps with their log window raise nothing under
    torch.cuda.set_sync_debug_mode("error"), and each replays one graph."""
    trainer = Trainer(small_config(tmp_path, data_count=24, device="cuda", cuda_graphs=True))
    trainer.epoch = 2
    batches, window = trainer.batches.epoch(0), LogWindow()
    for _ in range(trainer.step_graph.warmup_steps + 1):
        window.add(trainer.train_step(next(batches)))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            window.add(trainer.train_step(next(batches)))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert window.values()["logged_steps"] == 5 and trainer.step_graph.captures == 1


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_step_graph_warms_up_captures_replays_and_captures_again_for_a_new_key():
    """StepGraph alone: 2 eager calls, then a capture whose replays read new input values and draw fresh random
    numbers, as eager calls seeded alike would; outputs are clones; a new key captures again."""
    calls = []
    state = torch.zeros(4, device="cuda")

    def body(x):
        calls.append(torch.cuda.is_current_stream_capturing())
        state.add_(x)  # state read and written in place, as the trainer's parameters
        return {"y": state * 2 + torch.rand_like(x)}

    graph = StepGraph(body, torch.device("cuda"))
    outputs = []
    for i in range(5):
        torch.manual_seed(i)
        outputs.append(graph("a", torch.full((4,), float(i), device="cuda"))["y"])
    assert calls == [False, False, True] and graph.captures == 1
    assert graph.will_replay("a") and not graph.will_replay("b")
    expected_state = torch.zeros(4, device="cuda")
    for i, y in enumerate(outputs):
        expected_state += i
        torch.manual_seed(i)
        torch.testing.assert_close(y, expected_state * 2 + torch.rand(4, device="cuda"), rtol=0, atol=0)
    assert outputs[3].data_ptr() != outputs[4].data_ptr()
    graph("b", torch.ones(4, device="cuda"))
    assert not graph.captured and graph.captures == 1


class StandInGraphs:
    """torch.cuda's streams and graphs replaced by CPU stand-ins (monkeypatched), for StepGraph's own bookkeeping
    without a GPU: a capture runs the body once on the static inputs, as CUDA's records it; a replay runs it again
    on those same tensors and writes its outputs into the captured ones, as a graph's replay recomputes them in
    place. `waits` lists the streams' waits as (waiting, awaited) names."""

    def __init__(self, monkeypatch):
        self.capturing, self.replays, self.waits = None, 0, []
        stand_in = self

        class Stream:
            def __init__(self, name):
                self.name = name

            def wait_stream(self, other):
                stand_in.waits.append((self.name, other.name))

        class Graph:
            def replay(self):
                stand_in.replays += 1
                body, inputs, outputs = self.recorded
                for name, value in body(*inputs).items():
                    outputs[name].copy_(value)

        @contextlib.contextmanager
        def graph(cuda_graph, pool=None, stream=None):
            self.capturing = cuda_graph
            try:
                yield
            finally:
                self.capturing = None

        current = Stream("current")
        monkeypatch.setattr(torch.cuda, "Stream", lambda device: Stream("capture"))
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
        monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "graph", graph)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)

    def body(self, work):
        """work as a StepGraph body whose call inside a capture is recorded for the replays."""
        def body(*inputs):
            outputs = work(*inputs)
            if self.capturing is not None:
                self.capturing.recorded = (work, inputs, outputs)
            return outputs
        return body


def test_step_graph_warms_up_captures_and_replays_each_key_on_stand_ins(monkeypatch):
    """StepGraph's bookkeeping on a CPU, with CUDA's streams and graphs stood in for (StandInGraphs): a key's first
    warmup_steps calls run the body on the caller's tensors, ordered between the caller's stream and the capture
    stream both ways; the next captures on static buffers, and it and every later call copy their input values
    into those buffers and replay. Outputs are clones, never the graph's static ones; a changed input shape or
    dtype under the same key is refused; a new key warms up and captures again."""
    graphs = StandInGraphs(monkeypatch)
    seen = []

    def work(x):
        seen.append(x)
        return {"y": x * 2 + 1}

    stepper = StepGraph(graphs.body(work), torch.device("cuda"), warmup_steps=2)
    inputs = [torch.full((3,), float(i)) for i in range(5)]
    results = []
    for x in inputs:
        results.append(stepper("a", x)["y"])
        if len(results) == 1:
            assert graphs.waits == [("capture", "current"), ("current", "capture")]
    for x, y in zip(inputs, results):
        torch.testing.assert_close(y, x * 2 + 1, rtol=0, atol=0)
    assert seen[:2] == inputs[:2] and all(a is b for a, b in zip(seen, inputs[:2]))
    assert len(seen) == 6 and all(x is stepper.inputs[0] for x in seen[2:])  # the capture, then 3 replays
    assert (stepper.captures, graphs.replays) == (1, 3) and stepper.captured
    assert all(y is not stepper.outputs["y"] for y in results)
    assert stepper.will_replay("a") and not stepper.will_replay("b")
    for changed in (torch.zeros(4), torch.zeros(3, dtype=torch.float64)):
        with pytest.raises(ValueError, match="^StepGraph inputs changed under the same key 'a'"):
            stepper("a", changed)
    other = torch.ones(3)
    torch.testing.assert_close(stepper("b", other)["y"], other * 3, rtol=0, atol=0)
    assert seen[-1] is other and not stepper.captured and not stepper.will_replay("a")
    for _ in range(2):
        stepper("b", other)
    assert stepper.captures == 2 and stepper.will_replay("b")


def test_step_graph_refuses_fewer_than_one_warm_up_step():
    """The capture needs at least one eager call before it (Triton compiles, the optimizer makes its state)."""
    with pytest.raises(ValueError, match="^warmup_steps must be at least 1, got 0$"):
        StepGraph(lambda x: {"y": x}, torch.device("cuda"), warmup_steps=0)


# Runs in a process of its own: a capture that fails may leave CUDA state behind (the current stream, the default
# generator's capture bookkeeping), which would break later tests of the same process if StepGraph did not mend it.
FAILED_CAPTURE = """
import json, torch
from dream.step_graph import CaptureFailed, StepGraph
graph = StepGraph(lambda x: {"y": x * float(x.sum())}, torch.device("cuda"), warmup_steps=1)  # a host read
x = torch.ones(4, device="cuda")
graph("a", x)
try:
    graph("a", x)
    message = None
except CaptureFailed as error:
    message = str(error)
torch.cuda.synchronize()
print(json.dumps({"message": message, "captured": graph.captured,
                  "default_stream": torch.cuda.current_stream() == torch.cuda.default_stream(),
                  "random": torch.rand(3, device="cuda").tolist(), "sum": float((x * 2).sum())}))
"""


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_step_graph_says_in_one_line_what_could_not_be_captured_and_cuda_goes_on():
    from conftest import run_without_interpreter

    process = run_without_interpreter(FAILED_CAPTURE)
    assert process.returncode == 0, process.stderr[-4000:]
    result = json.loads(process.stdout.splitlines()[-1])
    assert result["message"] is not None and "\n" not in result["message"] and not result["captured"]
    assert "previous error during capture" not in result["message"], result["message"]  # the cause, not its echo
    assert result["default_stream"], "the capture stream stayed current"
    assert len(result["random"]) == 3 and result["sum"] == 8  # the default generator and CUDA still usable


@pytest.mark.parametrize("body_error, end_error, raised, message", [
    # an operation not allowed in a capture: its own error, then ending the capture's, which holds it
    (RuntimeError("operation not permitted when stream is capturing\nmore"), "previous error during capture",
     CaptureFailed, "RuntimeError: operation not permitted when stream is capturing"),
    # only ending the capture fails (an invalidated capture): its own error
    (None, "operation failed due to a previous error during capture", CaptureFailed,
     "RuntimeError: CUDA error: operation failed due to a previous error during capture"),
    # an allocation that failed inside the capture: the out-of-memory error itself (the trainer halves the batch)
    (torch.cuda.OutOfMemoryError("CUDA out of memory"), "previous error during capture", torch.cuda.OutOfMemoryError,
     "CUDA out of memory"),
])
def test_a_failed_capture_names_its_cause_and_mends_the_cuda_state(monkeypatch, body_error, end_error, raised,
                                                                    message):
    """StepGraph._capture's error path, with torch.cuda's capture and stream contexts replaced by stand-ins that
    fail as CUDA's do: the error names the operation that failed, the stream context is left, and the default
    generator's capture state is mended (recover_from_failed_capture) before the error is raised."""
    from conftest import stand_in_cuda_capture

    events = stand_in_cuda_capture(monkeypatch, end_error, end_always=True)  # capture_end raises either way

    def body(x):
        if body_error is not None:
            raise body_error
        return {"y": x}

    stepper = StepGraph.__new__(StepGraph)  # (__init__ makes a CUDA stream)
    stepper.body, stepper.device, stepper.stream, stepper.warmup_steps, stepper.captures = body, None, None, 1, 0
    stepper.reset()
    with pytest.raises(raised) as caught:
        stepper._capture((torch.ones(2),))
    assert str(caught.value) == message
    assert events == ["stream", "capture", "stream restored", "recovered"]
    assert not stepper.captured and stepper.captures == 0
