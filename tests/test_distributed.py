"""Multi-process training: two gloo processes under torchrun compute what one process computes with
the same global batch.

The model is the tiny UNet at 8x8 with 16 base channels, dropout 0 (dropout masks are per rank), global
batch 4 (2 per rank), 4 steps, with the seed objective's DREAM phase from epoch 1.

Tolerances (fp32; only the order of the gradient sums differs between 1 and 2 processes):
  loss and gradient norm per step      rtol 1e-5
  weights and EMA after 4 Adam steps   rtol 1e-4, atol 2e-5   (Adam's step lr * m / sqrt(v) turns fp-level
                                       gradient differences in near-zero entries into up to ~2e-6 here;
                                       a wrong rank slice moves weights by ~1e-3)
  weights across the ranks             bitwise
"""
import json
import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from dream.checkpoint import CheckpointManager, load_checkpoint
from dream.data import DeviceBatches, synthetic_faces
from dream.diffusion import GaussianDiffusion
from dream.distributed import Distributed, fingerprint_tensor
from dream.train import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
STEP_RTOL = 1e-5
WEIGHT_TOL = dict(rtol=1e-4, atol=2e-5)

CONFIG = dict(preset="tiny", model_overrides={"image_size": 8, "base_channels": 16, "dropout": 0.0},
              objective_config={"dream_start_epoch": 1, "ramp_epochs": 2}, data_count=8, batch_size=4,
              epochs=STEPS // 2, sample_every=0, progress=False, log_every=1, checkpoint_every=2, device="cpu")

# Runs under torchrun: trains, then hands every rank's final weights to rank 0, then checks that the
# cross-rank consistency check notices one rank's EMA drifting.
WORKER = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    from dream import distributed
    from dream.train import TrainConfig, Trainer

    config, out = json.loads(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    with distributed.session("cpu") as d:
        trainer = Trainer(TrainConfig(**config), d)
        result = trainer.run()
        weights = {"model": trainer.model.state_dict(), "ema": trainer.ema.state_dict()["shadow"],
                   "rank_batch": trainer.rank_batch, "batches": len(trainer.batches), "result": result,
                   "stop_signal": d.max(2 if d.rank == 1 else 0, "cpu")}  # SIGINT seen by rank 1 alone
        gathered = [None] * d.world_size
        dist.all_gather_object(gathered, weights)
        if d.rank == 1:
            trainer.ema.shadow[0].view(-1)[0] += 1e-3
        try:
            d.check_identical(trainer.ema.shadow, "EMA weights")
            gathered[0]["drift_detected"] = False
        except RuntimeError as error:
            gathered[0]["drift_detected"] = "differ between ranks" in str(error)
        if d.is_main:
            torch.save(gathered, out)
""")


def test_two_gloo_processes_match_one_process(tmp_path):
    worker, out = tmp_path / "worker.py", tmp_path / "ranks.pt"
    worker.write_text(WORKER)
    config = {**CONFIG, "run_dir": str(tmp_path / "ddp")}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              str(worker), json.dumps(config), str(out)],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-4000:]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    single = Trainer(TrainConfig(**{**CONFIG, "run_dir": str(tmp_path / "single")}))
    single.run()
    torch.set_num_threads(threads)

    ranks = torch.load(out, weights_only=False)
    assert [r["rank_batch"] for r in ranks] == [2, 2] and [r["batches"] for r in ranks] == [2, 2]
    assert ranks[0]["result"]["step"] == STEPS
    for name in ranks[0]["model"]:  # DDP keeps the ranks identical, and the EMA with them
        assert torch.equal(ranks[0]["model"][name], ranks[1]["model"][name]), name
    for name in ranks[0]["ema"]:
        assert torch.equal(ranks[0]["ema"][name], ranks[1]["ema"][name]), name
    assert ranks[0]["drift_detected"] is True

    # the same result as one process with the global batch
    for name, value in single.model.state_dict().items():
        assert torch.allclose(ranks[0]["model"][name], value, **WEIGHT_TOL), name
    for name, value in single.ema.state_dict()["shadow"].items():
        assert torch.allclose(ranks[0]["ema"][name], value, **WEIGHT_TOL), name
    assert single.model.conv_out.weight.abs().max() > 0, "the zero-initialised output layer never moved"

    assert [r["stop_signal"] for r in ranks] == [2, 2], "every rank stops for the signal one rank saw"

    # rank 0 alone wrote the log and the checkpoints: one record per step
    def steps(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if '"loss"' in line]

    ddp_log, single_log = steps(tmp_path / "ddp"), steps(tmp_path / "single")
    assert [r["step"] for r in ddp_log] == list(range(1, STEPS + 1))
    for a, b in zip(ddp_log, single_log):
        for key in ("loss", "loss_standard", "loss_rect", "grad_norm", "lambda_t_mean"):
            assert a[key] == pytest.approx(b[key], rel=STEP_RTOL, abs=1e-12), (a["step"], key)
    assert ddp_log[-1]["loss_rect"] > 0, "the DREAM phase was not reached"
    assert all(why is None for _, why in CheckpointManager(tmp_path / "ddp" / "checkpoints").verify())
    assert load_checkpoint(tmp_path / "ddp" / "checkpoints")["world_size"] == 2


def test_rank_slices_reassemble_the_global_batch():
    """Rank r takes samples r, r + W, ... of each global batch, of its t and of its noise."""
    images = synthetic_faces(24, size=8)
    whole = DeviceBatches(images, 6, "cpu", seed=3)
    parts = [DeviceBatches(images, 2, "cpu", seed=3, rank=r, world_size=3) for r in range(3)]
    assert len(whole) == len(parts[0]) == 4
    for epoch in (0, 1):
        for b, batch in enumerate(whole.epoch(epoch)):
            for r, part in enumerate(parts):
                assert torch.equal(list(part.epoch(epoch))[b], batch[r::3])

    def inputs(rank, world_size):
        trainer = types.SimpleNamespace(config=types.SimpleNamespace(seed=5, batch_size=6), step=7,
                                        dist=Distributed(rank=rank, world_size=world_size),
                                        diffusion=GaussianDiffusion("cosine", 1000), device=torch.device("cpu"),
                                        input_generator=torch.Generator())
        return Trainer.draw_inputs(trainer, torch.zeros(6 // world_size, 3, 8, 8))

    t, noise = inputs(0, 1)
    assert t.shape == (6,) and noise.shape == (6, 3, 8, 8)
    for r in range(3):
        t_r, noise_r = inputs(r, 3)
        assert torch.equal(t_r, t[r::3]) and torch.equal(noise_r, noise[r::3])
    assert not torch.equal(inputs(0, 1)[1], Trainer.draw_inputs(
        types.SimpleNamespace(config=types.SimpleNamespace(seed=5, batch_size=6), step=8, dist=Distributed(),
                              diffusion=GaussianDiffusion("cosine", 1000), device=torch.device("cpu"),
                              input_generator=torch.Generator()), torch.zeros(6, 3, 8, 8))[1])


def test_fingerprint_sees_every_bit():
    x = torch.randn(1000)
    base = int(fingerprint_tensor(x))
    for i in (0, 511, 999):
        y = x.clone()
        y.view(torch.int32)[i] ^= 1  # the lowest mantissa bit
        assert int(fingerprint_tensor(y)) != base
    swapped = x.clone()
    swapped[[3, 4]] = swapped[[4, 3]]
    assert int(fingerprint_tensor(swapped)) != base
    assert int(fingerprint_tensor(x.to(torch.bfloat16))) == int(fingerprint_tensor(x.to(torch.bfloat16).clone()))


def test_peer_lost_tells_another_process_stopping_from_this_ones_errors():
    from dream.distributed import peer_lost, peer_lost_summary

    assert peer_lost(RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
                                  "[127.0.0.1]:5532: Connection reset by peer"))
    assert peer_lost(RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Connection closed by "
                                  "peer [127.0.0.1]:12345"))
    assert peer_lost(torch.distributed.DistBackendError("NCCL error in: ..., remote process exited or there was a "
                                                        "network error, NCCL version 2.27"))
    assert peer_lost(torch.distributed.DistNetworkError("connection to the store was lost"))
    assert not peer_lost(torch.distributed.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:3356, unhandled "
                                                            "cuda error, illegal memory access"))
    assert not peer_lost(torch.distributed.DistStoreError("Timed out after 901 seconds waiting for clients"))
    assert not peer_lost(torch.OutOfMemoryError("CUDA out of memory"))
    assert not peer_lost(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not peer_lost(ValueError("Connection reset by peer"))
    assert peer_lost_summary(RuntimeError(
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
        "[127.0.0.1]:41162. This is typically caused by a remote worker crashing. Check the logs of the remote worker "
        "before reporting an error. GLHF!")) == "RuntimeError: Connection closed by peer [127.0.0.1]:41162"
    # only gloo's advice is cut: a first line's other sentences say what happened
    assert peer_lost_summary(torch.distributed.DistBackendError(
        "NCCL error: remote process exited or there was a network error. Last error: socket closed\nmore")) == (
        "DistBackendError: NCCL error: remote process exited or there was a network error. Last error: socket closed")


# Runs `dream train` under torchrun with rank 1 running out of memory in its second step.
FAILING_RANK = textwrap.dedent("""
    import sys
    import torch
    from dream import train

    original = train.Trainer.train_step

    def train_step(self, x0):
        if self.dist.rank == 1 and self.step == 1:
            raise torch.OutOfMemoryError("injected out of memory")
        return original(self, x0)

    train.Trainer.train_step = train_step
    from dream.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def train_under_torchrun(tmp_path, worker_source, run_dir, data_count=8, max_steps=4, image_size=8, more=(),
                         env=None):
    """`dream train` of the tiny model on CPU, as `worker_source` (a patched CLI) runs it in each of two gloo
    processes under torchrun; returns the finished torchrun process."""
    worker = tmp_path / "worker.py"
    worker.write_text(worker_source)
    flags = ["--preset", "tiny", "--image-size", str(image_size), "--base-channels", "16", "--data-count",
             str(data_count), "--batch-size", "4", "--max-steps", str(max_steps), "--sample-every", "0",
             "--no-progress", "--device", "cpu", "--backend", "eager", "--run-dir", str(run_dir), *more]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(worker), "train", *flags], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})})


def test_one_rank_failing_is_one_line_from_each_rank_and_rank_0_saves(tmp_path):
    """The failing rank says what stopped it; the other learns it only as a broken connection, and says
    that another process stopped, saves the state before the step, and how to resume. No tracebacks from
    the workers (torchrun adds its own summary after them)."""
    run_dir = tmp_path / "run"
    process = train_under_torchrun(tmp_path, FAILING_RANK, run_dir, more=["--checkpoint-every", "0"])
    assert process.returncode != 0
    lines = process.stderr.splitlines()
    ours = [line for line in lines if line.startswith("dream train")]
    assert sorted(ours) == sorted([
        "dream train (rank 1): error: OutOfMemoryError at step 1 (epoch 0): injected out of memory; rank 0, if it "
        "still runs, saves an emergency checkpoint. To resume, rerun the same command.",
        next(line for line in ours if line.startswith("dream train: error: another process of this job stopped at "
                                                      "step 1 (epoch 0) (")),
    ]), process.stderr[-4000:]
    rank0 = next(line for line in ours if line.startswith("dream train: error:"))
    assert rank0.endswith(f"emergency checkpoint {run_dir / 'checkpoints' / 'ckpt-000000001.pt'} saved. To resume, "
                          f"rerun the same command."), rank0
    assert not any("dream/train.py" in line for line in lines), process.stderr[-4000:]  # no worker traceback
    assert load_checkpoint(run_dir / "checkpoints")["step"] == 1


# Runs `dream train` under torchrun with rank 1 alone receiving SIGTERM as step 2 begins.
SIGNALLED_RANK = textwrap.dedent("""
    import os, signal, sys
    from dream.train import Trainer

    train_step = Trainer.train_step

    def signalled(self, x0):
        if os.environ["RANK"] == "1" and self.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(self, x0)

    Trainer.train_step = signalled
    from dream.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_a_signal_one_rank_sees_stops_every_rank_a_step_later_with_a_checkpoint(tmp_path):
    """The ranks vote on a stop after every step and read the vote a step later (not waiting for the all-reduce):
    a SIGTERM that rank 1 alone gets during step 2 stops both ranks after step 3, rank 0 saving its checkpoint."""
    run_dir = tmp_path / "run"
    process = train_under_torchrun(tmp_path, SIGNALLED_RANK, run_dir, data_count=16, max_steps=8,
                                   more=["--checkpoint-every", "0"])
    assert process.returncode != 0
    ours = [line for line in process.stderr.splitlines() if line.startswith("dream train")]
    assert any(re.fullmatch(r"dream train: stopped by SIGTERM at step 3 \(epoch 0\); checkpoint .*ckpt-000000003\.pt "
                            r"saved\. To resume, rerun the same command\.", line) for line in ours), \
        process.stderr[-4000:]
    assert load_checkpoint(run_dir / "checkpoints")["step"] == 3


# Runs `dream train` under torchrun with rank 0 alone receiving SIGTERM as it begins the final sample grid.
SIGNALLED_AT_THE_FINAL_GRID = textwrap.dedent("""
    import os, signal, sys
    from dream.train import Trainer

    save_sample_grid = Trainer.save_sample_grid

    def signalled(self, stop=None):
        if os.environ["RANK"] == "0" and self.finished():
            os.kill(os.getpid(), signal.SIGTERM)
        return save_sample_grid(self, stop)

    Trainer.save_sample_grid = signalled
    from dream.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_a_signal_during_the_final_grid_stops_every_rank_at_once(tmp_path):
    """Rank 0 alone makes the sample grids. A SIGTERM while it makes the last one (3 steps, epochs of 2: not an
    epoch's grid) drops the grid; the ranks agree on the stop and rank 0 says it, with the checkpoint of the last
    step. (The other rank used to wait in a barrier while rank 0 checked the ranks' weights: a hang.)"""
    run_dir = tmp_path / "run"
    process = train_under_torchrun(tmp_path, SIGNALLED_AT_THE_FINAL_GRID, run_dir, max_steps=3,
                                   more=["--sample-every", "1", "--sample-steps", "3"])
    ours = [line for line in process.stderr.splitlines() if line.startswith("dream train")]
    assert ours == [f"dream train: stopped by SIGTERM at step 3 (epoch 1); checkpoint "
                    f"{run_dir / 'checkpoints' / 'ckpt-000000003.pt'} saved. To resume, rerun the same command."], \
        process.stderr[-4000:]
    assert process.returncode != 0 and "exitcode: 143" in process.stderr
    assert sorted(path.name for path in (run_dir / "samples").iterdir()) == ["grid-000000002.png"]


# Runs `dream train` under torchrun with rank 1 reading other images than rank 0.
OTHER_IMAGES = textwrap.dedent("""
    import os, sys
    from dream import train

    original = train.load_images

    def load_images(*args, **kwargs):
        images = original(*args, **kwargs)
        if os.environ["RANK"] == "1":
            images[0, 0, 0, 0] ^= 1  # one bit of one pixel
        return images

    train.load_images = load_images
    from dream.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_ranks_reading_different_images_are_refused_in_one_line(tmp_path):
    process = train_under_torchrun(tmp_path, OTHER_IMAGES, tmp_path / "run", max_steps=1)
    assert process.returncode != 0
    ours = [line for line in process.stderr.splitlines() if line.startswith("dream train")]
    assert len(ours) == 1 and re.fullmatch(
        r"dream train: error: the training images differ between the processes of this job \(SHA-1 of rank 0's: "
        r"[0-9a-f]{12}\); every process must read the same data \(a folder copied differently to each machine\?\)",
        ours[0]), process.stderr[-4000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


# Runs `dream train` under torchrun; with OTHER_RUN_DIR set, rank 1 alone uses that run folder (a folder that is not
# shared between machines).
SPLIT_RUN_DIR = textwrap.dedent("""
    import os, sys
    from dream.cli import main

    argv = sys.argv[1:]
    if os.environ["RANK"] == "1" and os.environ.get("OTHER_RUN_DIR"):
        argv[argv.index("--run-dir") + 1] = os.environ["OTHER_RUN_DIR"]
    sys.exit(main(argv))
""")


def test_ranks_that_would_go_on_from_different_checkpoints_are_refused_in_one_line(tmp_path):
    """Each rank finds its checkpoint on its own: rank 0 in the run folder at step 4, rank 1 in a folder of its own
    with none. Training on, they would run apart and hang in a collective (the seed objective's passes differ
    between the phases); refused in one line before a step, and nothing is saved."""
    run_dir, other = tmp_path / "run", tmp_path / "other"
    assert train_under_torchrun(tmp_path, SPLIT_RUN_DIR, run_dir, max_steps=4).returncode == 0
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    process = train_under_torchrun(tmp_path, SPLIT_RUN_DIR, run_dir, max_steps=6, env={"OTHER_RUN_DIR": str(other)})
    assert process.returncode != 0
    ours = [line for line in process.stderr.splitlines() if line.startswith("dream train") and "error" in line]
    assert len(ours) == 1 and re.fullmatch(
        r"dream train: error: the processes of this job go on from different checkpoints \(rank 0: step 4, "
        r".*ckpt-000000004\.pt\): every process must see the same --run-dir \(a filesystem they share\) or "
        r"--resume FILE", ours[0]), process.stderr[-4000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    assert not (other / "checkpoints").exists()


@pytest.mark.parametrize("resume", ["missing", "junk"])
def test_a_resume_file_no_rank_can_use_is_said_once_and_leaves_no_folder(tmp_path, resume):
    path = tmp_path / f"{resume}.pt"
    if resume == "junk":
        path.write_bytes(b"not a checkpoint")
    process = train_under_torchrun(tmp_path, SPLIT_RUN_DIR, tmp_path / "run", max_steps=1,
                                   more=["--resume", str(path)])
    assert process.returncode != 0
    ours = [line for line in process.stderr.splitlines() if line.startswith("dream train")]
    said = "does not exist" if resume == "missing" else "is not a dream checkpoint or export"
    assert len(ours) == 1 and ours[0].startswith("dream train: error: ") and said in ours[0], process.stderr[-4000:]
    assert not (tmp_path / "run").exists()


# Runs `dream train` under torchrun with rank 1 alone failing to read its data.
FAILING_SETUP = textwrap.dedent("""
    import os, sys
    from dream import train
    from dream.errors import DreamError

    original = train.load_images

    def load_images(*args, **kwargs):
        if os.environ["RANK"] == "1" and os.environ.get("INJECT") == "sigterm":
            from dream.cli import Terminated
            raise Terminated  # what dream's SIGTERM handler raises
        if os.environ["RANK"] == "1":
            raise DreamError("image folder /data/faces does not exist (on this machine)")
        return original(*args, **kwargs)

    train.load_images = load_images
    from dream.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("bad_flag, inject", [(False, "error"), (True, "error"), (False, "sigterm")])
def test_a_setup_error_is_reported_once_by_rank_0_when_shared_and_by_its_rank_when_not(tmp_path, bad_flag, inject):
    process = train_under_torchrun(tmp_path, FAILING_SETUP, tmp_path / "run", max_steps=1,
                                   image_size=7 if bad_flag else 8, env={"INJECT": inject})
    assert process.returncode != 0
    ours = sorted(line for line in process.stderr.splitlines() if line.startswith("dream train"))
    if bad_flag:  # every rank fails alike: rank 0 alone says it
        assert len(ours) == 1 and ours[0].startswith("dream train: error: ") and "7" in ours[0], process.stderr[-3000:]
    else:
        rank1 = ("dream train (rank 1): SIGTERM; rerun the same command to go on (checkpoints already written are "
                 "kept)" if inject == "sigterm" else
                 "dream train (rank 1): error: image folder /data/faces does not exist (on this machine)")
        assert ours == [rank1, "dream train: error: the process of rank 1 stopped during setup (its line says why)"], \
            process.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_a_single_process_is_its_own_collective():
    """Without torchrun every collective is the identity and nothing touches torch.distributed (not initialised)."""
    d = Distributed()
    assert not d.enabled and d.is_main and not d.launcher_gone()  # launcher_pid 0: not checked
    values = torch.randn(3)
    assert d.mean(values) is values
    assert d.max(3, "cpu") == 3
    assert [type(flag) for flag in d.gather_flags(1)] == [bool] and d.gather_flags(0) == [False]
    d.check_identical([torch.randn(2)], "weights")
    plan = [(0, [1])]
    assert d.sum(5, "cpu") == 5 and d.share(plan) is plan
    d.barrier()
    d.leave()
    assert not torch.distributed.is_initialized()


def test_the_main_process_is_global_rank_0_not_every_machines_local_rank_0():
    assert not Distributed(rank=3, world_size=4, local_rank=0).is_main
    assert Distributed(rank=0, world_size=4, local_rank=0).is_main
    assert Distributed(rank=0, world_size=2).enabled


@pytest.mark.parametrize("environment", [{}, {"WORLD_SIZE": "1"}])
def test_a_world_of_one_process_needs_no_rank_and_no_process_group(monkeypatch, environment):
    from dream.distributed import from_environment, session

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert from_environment("cpu") == Distributed()
    with session("cpu") as d:
        assert d == Distributed()
    assert not torch.distributed.is_initialized()


def test_fingerprint_does_not_depend_on_the_chunk_size():
    x = torch.randn(1000)
    whole = int(fingerprint_tensor(x))
    assert int(fingerprint_tensor(x, chunk=7)) == int(fingerprint_tensor(x, chunk=1000)) == whole
    y = x.clone()
    y[[3, 10]] = y[[10, 3]]  # a swap across a chunk boundary
    assert int(fingerprint_tensor(y, chunk=7)) != whole


# ----------------------------------------------------------------------------------------------
# sampling and evaluation under torchrun: the ranks share the unfinished batches out

# Runs the `dream` CLI under torchrun, logging which images each rank writes to <log dir>/rank<R>.txt; for
# `eval`, with the tests' small feature extractor registered (test_evaluate.py).
SAMPLING_WORKER = textwrap.dedent("""
    import os, sys
    import dream.sample

    log_dir, argv = sys.argv[1], sys.argv[2:]
    if os.environ.get("RANK") == "1" and os.environ.get("TEST_RANK_1_FOLDER"):  # as if on another machine's disk
        argv[argv.index("--out") + 1] = os.environ["TEST_RANK_1_FOLDER"]
    if os.environ.get("RANK") == "1" and os.environ.get("TEST_RANK_1_CHECKPOINT"):  # as if another machine's copy
        argv[1] = os.environ["TEST_RANK_1_CHECKPOINT"]
    dream.sample.SHARED_FOLDER_WAIT_S = 1.0
    write_pngs = dream.sample.write_pngs

    def logged_write_pngs(pixels, out_dir, indices):
        with open(os.path.join(log_dir, f"rank{os.environ['RANK']}.txt"), "a") as log:
            log.write(" ".join(map(str, indices)) + "\\n")
        write_pngs(pixels, out_dir, indices)
        if f"{os.environ['RANK']}:{indices[0]}" == os.environ.get("TEST_SIGTERM_AFTER_WRITING"):  # (writer thread)
            import signal
            os.kill(os.getpid(), signal.SIGTERM)

    dream.sample.write_pngs = logged_write_pngs
    if os.environ.get("RANK") in os.environ.get("TEST_SIGNAL_RANKS", "").split(","):  # as each batch begins
        import signal
        batch_noise = dream.sample.batch_noise

        def signalled_batch_noise(*args, **kwargs):
            os.kill(os.getpid(), getattr(signal, os.environ.get("TEST_SIGNAL", "SIGTERM")))
            return batch_noise(*args, **kwargs)

        dream.sample.batch_noise = signalled_batch_noise
    if os.environ.get("TEST_SLOW_BATCH", ":").split(":")[0] == os.environ.get("RANK"):  # "rank:batch": 3 s late
        import time
        slowed, noise = int(os.environ["TEST_SLOW_BATCH"].split(":")[1]), dream.sample.batch_noise
        dream.sample.batch_noise = lambda seed, b, *a: time.sleep(3 * (b == slowed)) or noise(seed, b, *a)
    if os.environ.get("RANK") == os.environ.get("TEST_LAUNCHER_GONE_RANK"):  # as if torchrun had been SIGKILLed
        from dream.distributed import Distributed
        Distributed.launcher_gone = lambda self: True
    if argv[0] == "eval":
        sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
        import test_evaluate  # noqa: F401  (registers its feature extractor with torch-fidelity)
    from dream.cli import main
    sys.exit(main(argv))
""")


def dream_under_torchrun(tmp_path, argv, env=None) -> tuple[subprocess.CompletedProcess, dict]:
    """`dream <argv>` in two gloo processes under torchrun; returns the finished torchrun process and the images
    each rank wrote ({rank: [indices]})."""
    worker, logs = tmp_path / "sampling_worker.py", tmp_path / "written"
    worker.write_text(SAMPLING_WORKER)
    logs.mkdir(exist_ok=True)
    for log in logs.iterdir():
        log.unlink()
    process = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              str(worker), str(logs), *map(str, argv)], cwd=REPO, capture_output=True, text=True,
                             timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
                                               **(env or {})})
    written = {rank: [int(i) for i in (logs / f"rank{rank}.txt").read_text().split()]
               if (logs / f"rank{rank}.txt").exists() else [] for rank in (0, 1)}
    return process, written


def pixels_of(folder: Path, count: int) -> torch.Tensor:
    from dream.sample import read_sample

    return torch.stack([read_sample(folder / f"{i:06d}.png") for i in range(count)])


def test_two_processes_sample_what_one_process_samples_sharing_the_unfinished_batches(tmp_path, one_cpu_thread):
    """7 images in batches of 2, DDIM with eta 0.5 (step noise drawn per batch): a set begun in one process (images
    0-2, then image 1 lost) is finished by two; rank 0 takes unfinished batches 0 and 2, rank 1 batches 1 and 3,
    and the images equal those of one process making all 7 (bitwise: same per-batch seeds, one CPU thread)."""
    from conftest import make_tiny_checkpoint
    from dream.sample import sample_from_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path, step=3, num_timesteps=10, data_count=4)
    common = dict(batch_size=2, steps=2, eta=0.5, seed=3, progress=False)
    sample_from_checkpoint(str(checkpoint), str(tmp_path / "one"), count=7, **common)
    out = tmp_path / "two"
    sample_from_checkpoint(str(checkpoint), str(out), count=3, grid=False, **common)
    (out / "000001.png").unlink()

    argv = ["sample", checkpoint, "--out", out, "--count", 7, "--batch-size", 2, "--steps", 2, "--eta", 0.5,
            "--seed", 3, "--device", "cpu", "--no-progress"]
    process, written = dream_under_torchrun(tmp_path, argv)
    assert process.returncode == 0, process.stderr[-4000:]
    assert written == {0: [1, 4, 5], 1: [3, 6]}
    assert process.stdout.splitlines() == [  # rank 0 alone reports
        f"{out}: images 0-6 (5 made now by 2 processes, 2 already there) from the EMA weights of step 3 "
        f"({checkpoint.resolve()}); grid {out / 'grid.png'}"]
    assert torch.equal(pixels_of(out, 7), pixels_of(tmp_path / "one", 7))
    assert (out / "grid.png").exists()

    process, written = dream_under_torchrun(tmp_path, argv)  # finished: nothing to do on either rank
    assert process.returncode == 0 and written == {0: [], 1: []}, process.stderr[-4000:]
    assert "(0 made now by 2 processes, 7 already there)" in process.stdout


@pytest.mark.parametrize("stop", ["sigterm-rank-1", "sigint-every-rank", "launcher-gone-rank-1",
                                  "sigterm-rank-0-in-its-last-vote"])
def test_a_stop_any_rank_sees_stops_every_rank_after_its_batch_said_once(tmp_path, one_cpu_thread, stop):
    """8 images in batches of 2, rank 0 taking batches 0 and 2, rank 1 batches 1 and 3. A signal as a rank's
    first batch begins drops that batch at its next denoising step; the ranks vote after each round of batches
    and stop together; rank 0 alone says it, naming the cause, and exits as the signal asks (128 + its number).
    torchrun gone (SIGKILLed: it cannot stop its workers) stops them the same way. A SIGTERM that comes while
    rank 0 waits in its last vote (rank 1's last batch is slow) is handled once that vote is over: not lost. A
    rerun makes the rest: the set one process makes."""
    from conftest import make_tiny_checkpoint
    from dream.sample import sample_from_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path, step=3, num_timesteps=10, data_count=4)
    out = tmp_path / "set"
    argv = ["sample", checkpoint, "--out", out, "--count", 8, "--batch-size", 2, "--steps", 2, "--eta", 0.5,
            "--seed", 3, "--device", "cpu", "--no-progress"]
    env, written_before_the_stop, exit_code = {
        "sigterm-rank-1": ({"TEST_SIGNAL_RANKS": "1"}, {0: [0, 1], 1: []}, 143),
        "sigint-every-rank": ({"TEST_SIGNAL_RANKS": "0,1", "TEST_SIGNAL": "SIGINT"}, {0: [], 1: []}, 130),
        "launcher-gone-rank-1": ({"TEST_LAUNCHER_GONE_RANK": "1"}, {0: [0, 1], 1: [2, 3]}, 143),
        "sigterm-rank-0-in-its-last-vote": ({"TEST_SIGTERM_AFTER_WRITING": "0:4", "TEST_SLOW_BATCH": "1:3"},
                                            {0: [0, 1, 4, 5], 1: [2, 3, 6, 7]}, 143)}[stop]
    process, written = dream_under_torchrun(tmp_path, argv, env=env)
    assert written == written_before_the_stop, process.stderr[-4000:]
    assert f"exitcode: {exit_code}" in process.stderr and process.returncode != 0, process.stderr[-4000:]
    ours = [line for line in process.stderr.splitlines() if line.startswith("dream sample")]
    why = {"sigint-every-rank": "interrupted", "launcher-gone-rank-1": "the launcher (torchrun) is gone"}.get(
        stop, "SIGTERM")
    assert ours == [f"dream sample: {why}; rerun the same command to go on (finished images are kept)"], \
        process.stderr[-4000:]
    assert sorted(path.name for path in out.glob("*.png")) == sorted(f"{i:06d}.png" for i in sum(written.values(), []))
    if stop == "sigterm-rank-1":
        process, written = dream_under_torchrun(tmp_path, argv)
        assert process.returncode == 0 and written == {0: [2, 3, 6, 7], 1: [4, 5]}, process.stderr[-4000:]
        sample_from_checkpoint(str(checkpoint), str(tmp_path / "one"), count=8, batch_size=2, steps=2, eta=0.5,
                               seed=3, progress=False)
        assert torch.equal(pixels_of(out, 8), pixels_of(tmp_path / "one", 8))


@pytest.mark.parametrize("change, message", [
    (["--seed", "4"], "holds images made with seed=3, this run has seed=4"),  # rank 0 alone checks the record
    (["--count", "0"], "--count must be a positive integer, got 0"),  # every rank refuses it
    (["--sampler", "ddpm"], "the ddpm sampler runs all 10 steps"),  # (with --steps 2) every rank refuses it
])
def test_a_refused_sampling_job_is_one_line_from_rank_0(tmp_path, change, message):
    from conftest import make_tiny_checkpoint
    from dream.sample import sample_from_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path, step=3, num_timesteps=10, data_count=4)
    out = tmp_path / "set"
    sample_from_checkpoint(str(checkpoint), str(out), count=2, batch_size=2, steps=2, seed=3, progress=False)
    argv = ["sample", checkpoint, "--out", out, "--count", 4, "--batch-size", 2, "--steps", 2, "--seed", 3,
            "--device", "cpu", "--no-progress"]
    for flag, value in zip(change[::2], change[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    process, written = dream_under_torchrun(tmp_path, argv)
    assert process.returncode != 0 and written == {0: [], 1: []}
    ours = [line for line in process.stderr.splitlines() if line.startswith("dream sample")]
    assert len(ours) == 1 and ours[0].startswith("dream sample: error: ") and message in ours[0], process.stderr
    assert not any("dream/" in line for line in process.stderr.splitlines()), process.stderr[-4000:]  # no traceback


def test_a_rank_that_does_not_see_rank_0s_folder_stops_the_job_before_sampling(tmp_path):
    """Under torchrun on several machines each rank writes its share into --out: a folder on each machine's own
    disk would scatter the set. Rank 1 given a folder of its own (an empty one, or a copy holding an old lock
    file) says so in one line, rank 0 names rank 1, and nothing is sampled."""
    from conftest import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path, step=3, num_timesteps=10, data_count=4)
    argv = ["sample", checkpoint, "--out", tmp_path / "set", "--count", 4, "--batch-size", 2, "--steps", 2,
            "--device", "cpu", "--no-progress"]
    elsewhere = tmp_path / "elsewhere"
    for stale_lock in (False, True):
        if stale_lock:
            elsewhere.mkdir()
            (elsewhere / ".lock").write_text("dream sample, pid 1 on another-host")
        process, written = dream_under_torchrun(tmp_path, argv, env={"TEST_RANK_1_FOLDER": str(elsewhere)})
        assert process.returncode != 0 and written == {0: [], 1: []}
        ours = sorted(line for line in process.stderr.splitlines() if line.startswith("dream sample"))
        assert ours == [f"dream sample (rank 1): error: {elsewhere} is not the folder rank 0 writes into (its .lock "
                        f"does not name rank 0's process): under torchrun on several machines, --out must be on a "
                        f"filesystem they all share",
                        "dream sample: error: the process of rank 1 stopped during setup (its line says why)"], \
            process.stderr[-4000:]
        assert not list((tmp_path / "set").glob("*.png"))


def test_a_rank_that_loaded_other_weights_stops_the_job_before_sampling(tmp_path):
    """Each rank loads the checkpoint itself: a run folder whose newest checkpoint changed between the loads, or
    machines holding different copies, would mix two models' images in one set. Rank 1 given another checkpoint
    says so in one line, rank 0 names rank 1, and nothing is sampled."""
    from conftest import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path / "a", step=3, num_timesteps=10, data_count=4)
    other = make_tiny_checkpoint(tmp_path / "b", step=5, num_timesteps=10, data_count=4)
    argv = ["sample", checkpoint, "--out", tmp_path / "set", "--count", 4, "--batch-size", 2, "--steps", 2,
            "--device", "cpu", "--no-progress"]
    process, written = dream_under_torchrun(tmp_path, argv, env={"TEST_RANK_1_CHECKPOINT": str(other)})
    assert process.returncode != 0 and written == {0: [], 1: []}
    ours = sorted(line for line in process.stderr.splitlines() if line.startswith("dream sample"))
    assert ours == ["dream sample (rank 1): error: this process loaded other weights than rank 0 (checkpoint_step 5, "
                    "rank 0's 3): a checkpoint was saved or deleted between their loads, or the machines hold "
                    "different copies; pass one checkpoint file that every machine sees",
                    "dream sample: error: the process of rank 1 stopped during setup (its line says why)"], \
        process.stderr[-4000:]


def test_two_processes_evaluate_as_one_process_does(tmp_path, one_cpu_thread):
    """dream eval under torchrun: the ranks share the sampling, rank 0 scores the set and writes the one report,
    whose metrics are those of one process (the same images, the same features)."""
    pytest.importorskip("torch_fidelity")
    from conftest import make_tiny_checkpoint
    from dream.evaluate import evaluate, format_report
    from test_evaluate import EXTRACTOR

    checkpoint = make_tiny_checkpoint(tmp_path, step=9, num_timesteps=10, data_count=12)
    settings = dict(count=5, steps=2, eta=0.3, batch_size=2, seed=4)
    single = evaluate(str(checkpoint), out=str(tmp_path / "one"), device="cpu", feature_extractor=EXTRACTOR,
                      cache_dir=tmp_path / "fidelity", kid_subset_size=5, progress=False, **settings)
    out = tmp_path / "two"
    argv = ["eval", checkpoint, "--out", out, "--device", "cpu", "--feature-extractor", EXTRACTOR, "--cache-dir",
            tmp_path / "fidelity", "--kid-subset-size", 5, "--no-progress",
            *[item for key, value in settings.items() for item in (f"--{key.replace('_', '-')}", value)]]
    process, written = dream_under_torchrun(tmp_path, argv)
    assert process.returncode == 0, process.stderr[-4000:]
    assert written == {0: [0, 1, 4], 1: [2, 3]}
    report = json.loads((out / "report-n5.json").read_text())
    assert process.stdout.splitlines() == [format_report(report)]  # rank 0 alone scores and reports
    assert (report["processes"], report["made"], single["processes"]) == (2, 5, 1)
    assert torch.equal(pixels_of(out / "samples", 5), pixels_of(tmp_path / "one" / "samples", 5))
    assert report["metrics"] == pytest.approx(single["metrics"], rel=1e-12)


def test_a_real_set_rank_0_refuses_stops_every_rank_before_sampling_in_one_line(tmp_path):
    """Rank 0 alone loads the real set (before any sampling): a folder of one image stops the job there, said once
    by rank 0, the other rank leaving silently."""
    pytest.importorskip("torch_fidelity")
    from PIL import Image

    from conftest import make_tiny_checkpoint
    from test_evaluate import EXTRACTOR

    checkpoint = make_tiny_checkpoint(tmp_path, step=9, num_timesteps=10, data_count=4)
    real = tmp_path / "real"
    real.mkdir()
    Image.new("RGB", (16, 16), (200, 120, 90)).save(real / "face.png")
    out = tmp_path / "eval"
    argv = ["eval", checkpoint, "--out", out, "--count", 4, "--steps", 1, "--batch-size", 2, "--device", "cpu",
            "--real", "folder", "--real-root", real, "--feature-extractor", EXTRACTOR, "--cache-dir",
            tmp_path / "fidelity", "--no-progress"]
    process, written = dream_under_torchrun(tmp_path, argv)
    assert process.returncode != 0 and written == {0: [], 1: []}
    ours = [line for line in process.stderr.splitlines() if line.startswith("dream eval")]
    assert len(ours) == 1 and ours[0].startswith("dream eval: error: ") and \
        "has 1 image; FID and KID need at least 2" in ours[0], process.stderr[-4000:]
    assert not (out / "samples").exists()


def test_sampling_jobs_let_collectives_wait_hours_not_torchs_default(monkeypatch):
    """While rank 0 alone prepares eval's real set, or the other ranks finish their last batch, the waiting ranks
    sit in a collective: sample and eval join the group with SAMPLING_TIMEOUT, training with torch's default."""
    import torch.distributed as torch_dist

    import dream.distributed
    from dream.cli import main
    from dream.distributed import SAMPLING_TIMEOUT, from_environment

    joined = []
    monkeypatch.setattr(torch_dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch_dist, "init_process_group", lambda backend, **kwargs: joined.append((backend, kwargs)))
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    assert from_environment("cpu", SAMPLING_TIMEOUT) == Distributed(rank=1, world_size=2, local_rank=1,
                                                                     launcher_pid=os.getppid())
    from_environment("cpu")
    assert joined == [("gloo", {"timeout": SAMPLING_TIMEOUT}), ("gloo", {})]
    assert SAMPLING_TIMEOUT.total_seconds() >= 3600

    sessions = []

    def session(device, timeout=None):
        sessions.append(timeout)
        raise KeyboardInterrupt  # (stops the command here)

    monkeypatch.setattr(dream.distributed, "session", session)
    monkeypatch.setenv("WORLD_SIZE", "1")
    for command in (["sample", "ckpt.pt"], ["eval", "ckpt.pt"]):
        assert main([*command, "--device", "cpu"]) == 130
    assert sessions == [SAMPLING_TIMEOUT, SAMPLING_TIMEOUT]


# Runs under torchrun: each collective of Distributed with values that differ between the ranks, then the setup
# agreement with a failure on one rank, on both, and on neither; each rank writes what it got to <out>/rank<R>.json.
COLLECTIVES = textwrap.dedent("""
    import json, os, sys
    from datetime import timedelta
    import torch
    import torch.distributed as dist
    from dream.distributed import agree_on_setup, agreed_setup, session
    from dream.errors import DreamError

    out = sys.argv[1]
    torch.set_num_threads(1)
    seen = {}

    def outcome(run):
        try:
            run()
            return None
        except BaseException as error:  # (KeyboardInterrupt included: a signal during setup)
            return [type(error).__name__, str(error), getattr(error, "same_on_every_rank", None)]

    with session("cpu", timedelta(seconds=60)) as d:  # (ranks out of step fail, not hang)
        r = d.rank
        values = torch.tensor([r + 1.0, 10.0 - 4 * r])  # (a sum that no max or min of the ranks' values gives)
        seen["mean"] = d.mean(values).tolist()
        seen["mean_input_kept"] = values.tolist() == [r + 1.0, 10.0 - 4 * r]
        seen["max"] = [d.max(3 * r + 1, "cpu"), d.max(5 - 4 * r, "cpu"), int(d.max_tensor(3 * r + 1, "cpu"))]
        seen["max_tensor_dtype"] = str(d.max_tensor(1, "cpu").dtype)
        seen["sum"] = d.sum(r + 1, "cpu")
        seen["flags"] = [d.gather_flags(r == 1), d.gather_flags(r == 0), d.gather_flags(True)]
        seen["share"] = d.share({"from": r})
        same = [torch.arange(6.0).reshape(2, 3), torch.ones(4)]
        seen["identical"] = outcome(lambda: d.check_identical(same, "weights"))
        drifted = [same[0], same[1] + (r == 1)]  # the last tensor alone differs on rank 1
        seen["drifted"] = outcome(lambda: d.check_identical(drifted, "weights"))

        def setup(failing_ranks, error):
            def run():
                with agreed_setup(d):
                    if r in failing_ranks:
                        raise error
            return outcome(run)

        seen["setup_rank_1"] = setup({1}, DreamError("rank 1's folder is missing"))
        seen["setup_every_rank"] = setup({0, 1}, ValueError("image_size 7 must be a multiple of 8"))
        seen["setup_os_error"] = setup({1}, OSError("disk full"))
        seen["setup_signal"] = setup({1}, KeyboardInterrupt())
        seen["setup_none"] = setup(set(), None)
        seen["agree_none"] = outcome(lambda: agree_on_setup(d, None))
        d.leave()
        seen["left"] = not dist.is_initialized()
    with open(os.path.join(out, f"rank{r}.json"), "w") as f:
        json.dump(seen, f)
""")


def test_each_collective_combines_what_the_ranks_hold(tmp_path):
    """Two gloo processes holding different values: mean, max, sum, every rank's flag in its place, rank 0's
    shared object, a drift in any of the tensors checked, and the setup agreement (one rank's error said by it and
    named by rank 0; an error of every rank said once; OSError and a signal shared like a DreamError)."""
    worker = tmp_path / "collectives.py"
    worker.write_text(COLLECTIVES)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              str(worker), str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)
    assert process.returncode == 0, process.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    named = ["DreamError", "the process of rank 1 stopped during setup (its line says why)", True]
    for r, seen in enumerate(ranks):
        assert seen["mean"] == [1.5, 8.0] and seen["mean_input_kept"], r
        assert seen["max"] == [4, 5, 4] and seen["sum"] == 3 and seen["max_tensor_dtype"] == "torch.int64", r
        assert seen["flags"] == [[False, True], [True, False], [True, True]], r
        assert seen["share"] == {"from": 0}, r
        assert seen["identical"] is None, r
        assert seen["drifted"][0] == "RuntimeError" and "weights differ between ranks" in seen["drifted"][1], r
        assert seen["setup_every_rank"] == ["DreamError", "image_size 7 must be a multiple of 8", True], r
        assert seen["setup_none"] is None and seen["agree_none"] is None and seen["left"], r
    assert ranks[1]["setup_rank_1"] == ["DreamError", "rank 1's folder is missing", False]
    assert ranks[1]["setup_os_error"] == ["OSError", "disk full", False]
    assert ranks[1]["setup_signal"] == ["KeyboardInterrupt", "", False]
    assert ranks[0]["setup_rank_1"] == ranks[0]["setup_os_error"] == ranks[0]["setup_signal"] == named


@pytest.mark.parametrize("value, processes", [(None, 1), ("", 1), ("4", 4), ("0", 1), ("junk", 1)])
def test_local_processes_is_torchruns_local_world_size_and_at_least_one(monkeypatch, value, processes):
    """Training checks that LOCAL_WORLD_SIZE copies of the set fit in this machine's memory: the count is torchrun's
    processes on this machine (not the job's WORLD_SIZE), one without torchrun or with a value that is no count."""
    from dream.distributed import local_processes

    monkeypatch.setenv("WORLD_SIZE", "16")  # a job across machines: not this machine's count
    if value is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", value)
    assert local_processes() == processes


def test_a_stop_is_said_by_its_signals_name_ctrl_c_as_interrupted():
    import signal

    from dream.distributed import LAUNCHER_GONE, stop_reason

    assert stop_reason(signal.SIGINT) == "interrupted"
    assert stop_reason(signal.SIGTERM) == "SIGTERM"
    assert stop_reason(signal.SIGHUP) == "SIGHUP"
    assert stop_reason(LAUNCHER_GONE) == "the launcher (torchrun) is gone"
    assert LAUNCHER_GONE > max(signal.Signals)  # the ranks agree on the largest reason: the launcher's death wins


def test_the_stop_flag_takes_sigint_and_sigterm_while_installed_and_gives_them_back():
    """Inside `installed()` SIGINT and SIGTERM set the flag; once it is set a SIGINT (Ctrl-C pressed again) raises
    KeyboardInterrupt, a SIGTERM (a scheduler repeating it) does not; afterwards the previous handlers are back."""
    import signal

    from dream.distributed import StopFlag

    def mine(signum, frame):
        pass

    previous = {sig: signal.signal(sig, mine) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        flag = StopFlag()
        with flag.installed():
            assert signal.getsignal(signal.SIGINT) == flag.handle == signal.getsignal(signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            assert flag.requested and flag.signum == signal.SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler repeating SIGTERM: still the step's end
            assert flag.requested and flag.signum == signal.SIGTERM
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is mine and signal.getsignal(signal.SIGTERM) is mine
        first = StopFlag()
        first.handle(signal.SIGINT, None)  # a first Ctrl-C only asks
        assert first.requested and first.signum == signal.SIGINT
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_a_value_error_during_setup_becomes_a_one_line_error():
    """agree_on_setup turns a ValueError (a bad model setting) into a DreamError, which the CLI says in one line;
    in one process the failure is every process's."""
    from dream.distributed import agree_on_setup
    from dream.errors import DreamError

    with pytest.raises(DreamError, match="^image_size 7 must be a multiple of 8$") as error:
        agree_on_setup(Distributed(), ValueError("image_size 7 must be a multiple of 8"))
    assert error.value.same_on_every_rank is True
    agree_on_setup(Distributed(), None)


def test_a_cuda_device_without_cuda_is_refused_once_before_joining(monkeypatch):
    """Every rank of a job asked for a GPU on a machine without CUDA refuses alike (rank 0 says it) and joins no
    process group; a rank without LOCAL_RANK takes its global rank (one machine)."""
    import torch.distributed as torch_dist

    from dream.distributed import from_environment
    from dream.errors import DreamError

    joined = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch_dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch_dist, "init_process_group", lambda backend, **kwargs: joined.append(backend))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(DreamError, match=rf"^device '{device}' was asked for, but CUDA is not available") as error:
            from_environment(device)
        assert error.value.same_on_every_rank is True
    assert joined == []
    assert from_environment("cpu").local_rank == 1 and joined == ["gloo"]


def test_a_session_meets_at_a_barrier_before_leaving_but_not_after_an_error(monkeypatch):
    """On a normal exit the ranks meet at a barrier, then leave the group; after an exception each leaves at once
    (the others may never reach a barrier). leave() also meets first."""
    import torch.distributed as torch_dist

    from dream.distributed import session

    calls = []
    monkeypatch.setattr(torch_dist, "is_initialized", lambda: bool(calls) and calls[-1] != "destroy")
    monkeypatch.setattr(torch_dist, "init_process_group", lambda backend, **kwargs: calls.append("init"))
    monkeypatch.setattr(torch_dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(torch_dist, "destroy_process_group", lambda: calls.append("destroy"))
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    with session("cpu") as d:
        assert d.enabled and calls == ["init"]
        d.barrier()
        assert calls == ["init", "barrier"]
    assert calls == ["init", "barrier", "barrier", "destroy"]
    calls.clear()
    with pytest.raises(RuntimeError, match="^a failed step$"):
        with session("cpu"):
            raise RuntimeError("a failed step")
    assert calls == ["init", "destroy"]
    calls.clear()
    with session("cpu") as d:
        d.leave()
        assert calls == ["init", "barrier", "destroy"]
    assert calls == ["init", "barrier", "destroy"]  # left already: nothing more at the end


def test_a_sigterm_after_a_first_ctrl_c_is_the_stop_reported():
    """Ctrl-C asks for a stop; a SIGTERM that follows (a scheduler ending the job) is the stop said and exited with
    (143), as the ranks also agree on the larger of their signals."""
    import signal

    from dream.distributed import StopFlag

    flag = StopFlag()
    flag.handle(signal.SIGINT, None)
    flag.handle(signal.SIGTERM, None)
    assert flag.requested and flag.signum == signal.SIGTERM


def test_the_mean_divides_the_ranks_sum_by_the_world_size(monkeypatch):
    """mean() is the all-reduced sum over world_size: four ranks holding the same values get those values back."""
    import torch.distributed as torch_dist

    def all_reduce(tensor, op):
        assert op == torch_dist.ReduceOp.SUM
        tensor.mul_(4)  # four ranks' equal values summed

    monkeypatch.setattr(torch_dist, "all_reduce", all_reduce)
    values = torch.tensor([1.0, -3.0, 0.5])
    assert torch.equal(Distributed(rank=2, world_size=4).mean(values), values)


def test_the_launcher_is_gone_once_this_process_has_another_parent():
    assert not Distributed(rank=1, world_size=2, launcher_pid=os.getppid()).launcher_gone()
    assert Distributed(rank=1, world_size=2, launcher_pid=os.getppid() + 1).launcher_gone()  # re-parented


@pytest.mark.parametrize("error", [ValueError("image_size 7 must be a multiple of 8"), OSError("disk full"),
                                   KeyboardInterrupt()], ids=["ValueError", "OSError", "KeyboardInterrupt"])
def test_in_one_process_a_setup_error_passes_agreed_setup_unchanged(error):
    """Without torchrun agreed_setup is a no-op: the error raised is the one the setup raised, as it was."""
    from dream.distributed import agreed_setup

    with pytest.raises(type(error)) as raised:
        with agreed_setup(Distributed()):
            raise error
    assert raised.value is error and not hasattr(error, "same_on_every_rank")


def test_a_gpu_rank_joins_nccl_on_the_gpu_of_its_local_rank(monkeypatch):
    """With CUDA (faked here) a rank takes the GPU of its local rank (its global rank counts across machines) and the
    group runs NCCL; a local rank beyond this machine's GPUs is refused; "auto" without CUDA joins gloo; a group
    already joined is not joined again."""
    import torch.distributed as torch_dist

    from dream.distributed import from_environment
    from dream.errors import DreamError

    joined, devices = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(torch_dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch_dist, "init_process_group", lambda backend, **kwargs: joined.append(backend))
    for name, value in {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}.items():  # the second machine's second
        monkeypatch.setenv(name, value)
    for device in ("auto", "cuda"):
        assert from_environment(device) == Distributed(rank=3, world_size=4, local_rank=1, launcher_pid=os.getppid())
    assert devices == [1, 1] and joined == ["nccl", "nccl"]
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(DreamError, match="^local rank 2 has no GPU: this machine has 2$"):
        from_environment("cuda")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert from_environment("auto").local_rank == 1 and joined == ["nccl", "nccl", "gloo"] and devices == [1, 1]
    monkeypatch.setattr(torch_dist, "is_initialized", lambda: True)
    assert from_environment("cpu").enabled and joined == ["nccl", "nccl", "gloo"]
