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
