"""Crash protection of `dream train`: checkpoints, exact resume, kills, signals, exceptions, non-finite steps.

Every run trains the tiny UNet at 8x8 (16 base channels) on 8 synthetic images, batch 4 (2 steps an
epoch), with the seed objective switched on from epoch 1, so resumes land past its start epoch.
Tolerance: none. On CPU with one thread every comparison is bitwise (torch.equal).
"""
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from dream.checkpoint import MANIFEST, CheckpointManager, load_checkpoint
from dream.errors import DreamError
from dream.train import Diverged, Interrupted, TrainConfig, Trainer, TrainingAborted, train

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

REPO = Path(__file__).resolve().parents[1]
STEPS = 12  # 6 epochs of 2 steps
DROPOUT = 0.1  # dropout on: its masks must be reproduced too

CLI_FLAGS = ["--preset", "tiny", "--image-size", "8", "--base-channels", "16", "--dropout", str(DROPOUT),
             "--data-count", "8", "--batch-size", "4", "--epochs", str(STEPS // 2), "--dream-start-epoch", "1",
             "--ramp-epochs", "2", "--sample-every", "0", "--no-progress", "--log-every", "1",
             "--checkpoint-every", "1", "--checkpoint-keep", "3", "--device", "cpu"]


def small_config(run_dir, **overrides) -> TrainConfig:
    """The TrainConfig the CLI builds from CLI_FLAGS."""
    config = dict(run_dir=str(run_dir), preset="tiny",
                  model_overrides={"image_size": 8, "base_channels": 16, "dropout": DROPOUT},
                  objective_config={"dream_start_epoch": 1, "ramp_epochs": 2}, data_count=8, batch_size=4,
                  epochs=STEPS // 2, sample_every=0, progress=False, log_every=1, checkpoint_every=1,
                  checkpoint_keep=3, device="cpu")
    config.update(overrides)
    return TrainConfig(**config)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run of STEPS steps: its final checkpoint state."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("straight")
    Trainer(small_config(run_dir)).run()
    torch.set_num_threads(threads)
    return load_checkpoint(run_dir / "checkpoints")


def assert_same_weights(state, reference):
    assert state["step"] == reference["step"]
    for name, value in reference["model"].items():
        assert torch.equal(state["model"][name], value), f"model weight {name} differs"
    for name, value in reference["ema"]["shadow"].items():
        assert torch.equal(state["ema"]["shadow"][name], value), f"EMA weight {name} differs"
    assert state["ema"]["num_updates"] == reference["ema"]["num_updates"]


def assert_all_checkpoints_valid(folder: Path):
    results = CheckpointManager(folder).verify()
    assert results, f"no checkpoint listed in {folder}"
    for path, why in results:
        assert why is None, f"{path} is damaged: {why}"
        assert load_checkpoint(path)["step"] == int(path.stem.split("-")[1])


# ----------------------------------------------------------------------------------------------
# the checkpoint files
def fake_state(step: int) -> dict:
    return {"model": {"w": torch.full((64,), float(step))}, "config": {"step": step}, "step": step}


def test_manager_keeps_the_last_k_with_checksums(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    (tmp_path / f".ckpt-000000009.pt.tmp{os.getpid() + 1}").write_bytes(b"PK")  # a killed writer's leftover
    for step in range(1, 6):
        manager.save(fake_state(step), step)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pt")) == [f"ckpt-{s:09d}.pt" for s in (3, 4, 5)]
    assert [why for _, why in manager.verify()] == [None, None, None]
    assert manager.latest()["step"] == 5
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"


def test_a_rewritten_step_replaces_the_abandoned_future(tmp_path):
    manager = CheckpointManager(tmp_path, keep=5)
    for step in (1, 2, 3):
        manager.save(fake_state(step), step)
    manager.save(fake_state(20), 2)  # e.g. training resumed from step 1 and saved step 2 again
    assert [path.name for path, _ in manager.verify()] == ["ckpt-000000001.pt", "ckpt-000000002.pt"]
    assert manager.latest()["model"]["w"][0] == 20
    assert not (tmp_path / "ckpt-000000003.pt").exists()


def test_a_kill_at_any_moment_of_a_save_leaves_a_manifest_whose_files_verify(tmp_path, monkeypatch):
    """Before and after each rename of a save (a new step, then a rewritten one whose abandoned future is
    unlisted first), the manifest on disk lists only files that match their size and checksum; each renamed
    file was fsynced before its rename and the folder after it, so that order also survives a power cut."""
    manager = CheckpointManager(tmp_path, keep=3)
    for step in (1, 2, 3):
        manager.save(fake_state(step), step)
    events = []
    fsync, replace = os.fsync, os.replace

    def manifest_verifies(moment):
        for path, why in CheckpointManager(tmp_path).verify():
            assert why is None, f"{moment}: the manifest lists {path.name}, which is {why}"

    def recorded_fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        fsync(fd)

    def checked_replace(source, target):
        manifest_verifies(f"before the rename to {Path(target).name}")
        events.append(("rename", os.stat(source).st_ino, Path(target).name))
        replace(source, target)
        manifest_verifies(f"after the rename to {Path(target).name}")

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", checked_replace)
    manager.save(fake_state(4), 4)  # the file, the manifest listing it, then ckpt-1 deleted
    manager.save(fake_state(30), 3)  # steps 3 and 4 unlisted, ckpt-3 rewritten, listed again
    monkeypatch.undo()
    renames = [i for i, event in enumerate(events) if event[0] == "rename"]
    assert [events[i][2] for i in renames] == ["ckpt-000000004.pt", MANIFEST, MANIFEST, "ckpt-000000003.pt", MANIFEST]
    for i in renames:
        assert events[i - 1] == ("fsync", events[i][1]), f"{events[i][2]} renamed without an fsync of its data"
        assert events[i + 1] == ("fsync", tmp_path.stat().st_ino), f"no folder fsync after {events[i][2]}"
    assert [path.name for path, why in manager.verify() if why is None] == ["ckpt-000000002.pt", "ckpt-000000003.pt"]
    assert sorted(path.name for path in tmp_path.glob("ckpt-*.pt")) == ["ckpt-000000002.pt", "ckpt-000000003.pt"]


@pytest.mark.parametrize("keep", [1, 3])
def test_a_step_saved_again_stays_loadable_at_every_moment_of_the_save(tmp_path, monkeypatch, keep):
    """The step that ends an epoch is saved again once the epoch has advanced. A kill (or a full disk) at any
    moment of that second save leaves that step loadable, the old file or the new one, never unlisted: with
    keep=1 it is the only checkpoint, and a rerun that found none would start over and delete it."""
    manager = CheckpointManager(tmp_path, keep=keep)
    for step in (7, 8):
        manager.save(fake_state(step), step)
    moments = []
    replace = os.replace

    def loadable(moment):
        state = CheckpointManager(tmp_path, keep=keep).latest()
        assert state is not None and state["step"] == 8, f"{moment}: {state and state['step']}"
        moments.append((moment, state["model"]["w"][0].item()))

    def checked_replace(source, target):
        loadable(f"before the rename to {Path(target).name}")
        replace(source, target)
        loadable(f"after the rename to {Path(target).name}")

    monkeypatch.setattr(os, "replace", checked_replace)
    manager.save({**fake_state(8), "model": {"w": torch.full((64,), 80.0)}}, 8)
    monkeypatch.undo()
    assert [value for _, value in moments] == [8, 8, 8, 80, 80, 80], moments  # (manifest, file, manifest)
    assert manager.latest()["model"]["w"][0] == 80
    assert all("or" not in entry for entry in json.loads((tmp_path / MANIFEST).read_text())["checkpoints"])

    damaged = tmp_path / "ckpt-000000008.pt"  # a damaged file of the step is unlisted, not offered as the old one
    damaged.write_bytes(damaged.read_bytes()[:-10])
    def full_disk_for_checkpoints(source, target):
        if Path(target).name.startswith("ckpt-"):
            raise OSError(28, "No space left on device")
        replace(source, target)

    monkeypatch.setattr(os, "replace", full_disk_for_checkpoints)
    with pytest.raises(OSError):
        manager.save(fake_state(8), 8)
    monkeypatch.undo()
    assert [path.name for path, _ in manager.verify()] == (["ckpt-000000007.pt"] if keep > 1 else [])


@pytest.mark.parametrize("scanned", [False, True], ids=["listed", "scanned"])
def test_saves_of_a_step_that_fail_again_and_again_leave_its_file_loadable_and_checked(tmp_path, monkeypatch,
                                                                                       scanned):
    """A full disk fails the emergency save that follows a failed save of the same step: the entry's alternative
    is the file as it is (not the version of a save that never landed), so the old file still loads, and it is
    checked by its checksum, also when the folder had no manifest (scanned entries carry none)."""
    manager = CheckpointManager(tmp_path, keep=1)
    manager.save(fake_state(8), 8)
    if scanned:
        (tmp_path / MANIFEST).unlink()
    replace = os.replace

    def full_disk_for_checkpoints(source, target):
        if Path(target).name.startswith("ckpt-"):
            raise OSError(28, "No space left on device")
        replace(source, target)

    monkeypatch.setattr(os, "replace", full_disk_for_checkpoints)
    for value in (80.0, 800.0):
        with pytest.raises(OSError):
            manager.save({**fake_state(8), "model": {"w": torch.full((64,), value)}}, 8)
    monkeypatch.undo()
    assert manager.latest()["model"]["w"][0] == 8
    [entry] = json.loads((tmp_path / MANIFEST).read_text())["checkpoints"]
    assert entry["or"]["sha256"], entry
    path = tmp_path / "ckpt-000000008.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(DreamError, match="SHA-256 checksum mismatch"):
        manager.latest()


@pytest.mark.parametrize("manifest, where", [
    (True, r"listed in its manifest\.json, which lists no checkpoint"),
    (False, r"named ckpt-<step>\.pt, and there is no manifest\.json"),
])
def test_checkpoint_files_beside_a_manifest_that_lists_none_are_refused_not_started_over(tmp_path, manifest, where):
    manager = CheckpointManager(tmp_path, keep=1)
    manager.save(fake_state(8), 8)
    name = "ckpt-000000008.pt"
    if manifest:
        (tmp_path / MANIFEST).write_text(json.dumps({"checkpoints": []}))
    else:  # a file the run did not name
        (tmp_path / MANIFEST).unlink()
        name = "ckpt-best.pt"
        (tmp_path / "ckpt-000000008.pt").rename(tmp_path / name)
    with pytest.raises(DreamError, match=rf"^{re.escape(name)} in .* is not {where}; none was deleted: pass "
                                         rf"--resume FILE$"):
        manager.latest(": pass --resume FILE")
    assert (tmp_path / name).exists()


@pytest.mark.parametrize("damage", ["truncate", "flip_byte"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage):
    manager = CheckpointManager(tmp_path, keep=3)
    for step in (1, 2, 3):
        manager.save(fake_state(step), step)
    newest = tmp_path / "ckpt-000000003.pt"
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        payload = data.find(struct.pack("<f", 3.0) * 64)  # the tensor's bytes: torch.load alone would not notice
        assert payload > 0
        data[payload + 17] ^= 0x10
    newest.write_bytes(bytes(data))
    if damage == "flip_byte":
        silently_wrong = torch.load(newest, weights_only=True)["model"]["w"]
        assert not torch.equal(silently_wrong, torch.full((64,), 3.0))

    why = r"\d+ bytes, the manifest says \d+" if damage == "truncate" else "SHA-256 checksum mismatch"
    with pytest.warns(UserWarning, match=rf"ckpt-000000003\.pt is damaged \({why}\)"):
        state = manager.latest()
    assert state["step"] == 2 and state["_path"].endswith("ckpt-000000002.pt")
    assert dict(manager.verify())[newest] is not None
    with pytest.raises(DreamError, match="damaged"):
        load_checkpoint(newest)  # asked for by name: refused, never silently replaced
    with pytest.warns(UserWarning, match="damaged"):
        assert load_checkpoint(tmp_path)["step"] == 2  # a folder: the newest valid one


def test_an_intact_checkpoint_that_does_not_load_stops_and_is_kept(tmp_path):
    """A file that matches its manifest entry (size, SHA-256) but does not load here (a field a newer dream or
    torch writes, which the weights-only loader refuses; memory running out) is not damage: going back to the
    previous checkpoint would delete it at the next save. Stopped in one line; nothing is deleted."""
    import datetime
    import hashlib

    manager = CheckpointManager(tmp_path, keep=3)
    for step in (1, 2):
        manager.save(fake_state(step), step)
    newest = tmp_path / "ckpt-000000002.pt"
    torch.save({**fake_state(2), "written_on": datetime.date(2026, 12, 2)}, newest)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    data = newest.read_bytes()
    manifest["checkpoints"][-1].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    with pytest.raises(DreamError, match=rf"^checkpoint {re.escape(str(newest))} matches its manifest entry \(size, "
                                         rf"SHA-256\), so it is intact, yet it does not load here \(is not a dream "
                                         rf"checkpoint: .*\): another version of dream or torch may have written it, "
                                         rf"or memory ran out; none was deleted: pass --resume FILE$"):
        manager.latest(": pass --resume FILE")
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_a_run_whose_checkpoints_all_fail_is_refused_and_keeps_them(tmp_path):
    """Every checkpoint damaged: the rerun stops in one line and deletes nothing (starting over would
    replace them at its first save); checkpoints that are gone altogether leave nothing to lose."""
    config = small_config(tmp_path, epochs=1, max_steps=2)
    Trainer(config).run()
    folder = tmp_path / "checkpoints"
    files = sorted(folder.glob("ckpt-*.pt"))
    assert len(files) == 2
    damaged = []
    for path in files:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
        damaged.append(bytes(data))
    with pytest.warns(UserWarning, match="is damaged"), pytest.raises(DreamError, match="none was deleted"):
        Trainer(config).resume()
    with pytest.warns(UserWarning, match="is damaged"), \
            pytest.raises(DreamError, match="none was deleted: pass --resume FILE, or move them away"):
        Trainer(config).resume(str(tmp_path))  # --resume FOLDER: the same advice
    assert sorted(folder.glob("ckpt-*.pt")) == files and [p.read_bytes() for p in files] == damaged

    for path in files:
        path.unlink()
    log = (tmp_path / "metrics.jsonl").read_text()
    with pytest.warns(UserWarning, match=r"are gone; starting from step 0 \(the log of its steps is kept as "
                                         r"metrics-before-\d{8}-\d{6}\.jsonl\)$"):
        assert Trainer(config).resume() is False
    kept = list(tmp_path.glob("metrics-before-*.jsonl"))
    assert len(kept) == 1 and kept[0].read_text() == log and '"loss"' in log
    with pytest.warns(UserWarning, match="file missing"), \
            pytest.raises(DreamError, match=r"no valid checkpoint in folder .*\(the 2 listed in .* are gone\)"):
        load_checkpoint(tmp_path)  # asked for by --resume: an error, not a fresh start


def test_a_run_whose_checkpoints_folder_was_moved_away_keeps_its_log_aside(tmp_path):
    """The refusal of damaged checkpoints advises moving them away: the rerun starts over, and the log of the steps
    it no longer has is kept aside, not cut to step 0."""
    config = small_config(tmp_path, epochs=1, max_steps=2)
    Trainer(config).run()
    log = (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "checkpoints").rename(tmp_path / "moved-away")
    with pytest.warns(UserWarning, match=rf"^{re.escape(str(tmp_path))} holds a log of training steps but no "
                                         r"checkpoint \(moved away, or killed before its first\); starting from step "
                                         r"0 \(the log of its steps is kept as metrics-before-\d{8}-\d{6}\.jsonl\)$"):
        assert Trainer(config).resume() is False
    kept = list(tmp_path.glob("metrics-before-*.jsonl"))
    assert len(kept) == 1 and kept[0].read_text() == log and '"loss"' in log
    assert not (tmp_path / "metrics.jsonl").exists() or not logged_steps(tmp_path)


def test_checkpoint_holds_the_whole_training_state(tmp_path):
    trainer = Trainer(small_config(tmp_path, epochs=1, max_steps=1))
    trainer.run()
    path = tmp_path / "checkpoints" / "ckpt-000000001.pt"
    state = torch.load(path, weights_only=True)  # plain data only: a checkpoint cannot run code
    assert {"model", "ema", "optimizer", "scaler", "epoch", "batch_in_epoch", "step", "rng", "config",
            "code_version", "micro_batch"} <= set(state)
    assert {"python", "numpy", "torch"} <= set(state["rng"])
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (1, 0, 1)
    assert state["optimizer"]["state"], "optimizer moments missing"
    assert state["config"]["model"]["dropout"] == DROPOUT and state["config"]["batch_size"] == 4
    assert state["code_version"]


def test_a_saved_rng_state_brings_back_every_generator():
    """rng_state() survives a weights_only save and load, and set_rng_state() makes Python's, NumPy's (its
    position and cached Gaussian included) and torch's generators draw again what they drew after the save."""
    import io

    import numpy as np

    from dream.checkpoint import rng_state, set_rng_state

    random.random(), np.random.standard_normal(), torch.rand(1)  # NumPy now holds a cached Gaussian
    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)

    def draws():
        return random.random(), np.random.standard_normal(3).tolist(), np.random.rand(), torch.rand(3).tolist()

    expected = draws()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    set_rng_state(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert draws() == expected


# ----------------------------------------------------------------------------------------------
# exact continuation
def test_resume_is_bitwise(tmp_path, straight):
    """STEPS/2 steps, a fresh process state, the rest: the same weights and EMA as the straight run,
    with dropout on and the seed objective's rectified term active. Also through --resume PATH."""
    half = STEPS // 2 + 1  # mid-epoch, past the DREAM start epoch
    Trainer(small_config(tmp_path / "a", max_steps=half)).run()
    saved = tmp_path / "step-half.pt"
    saved.write_bytes((tmp_path / "a" / "checkpoints" / f"ckpt-{half:09d}.pt").read_bytes())
    torch.manual_seed(12345)  # a process that was killed and restarted has other RNG states
    random.seed(12345)
    Trainer(small_config(tmp_path / "a")).run()
    assert_same_weights(load_checkpoint(tmp_path / "a" / "checkpoints"), straight)

    resumed = Trainer(small_config(tmp_path / "b"))
    resumed.run(resume=str(saved))
    assert_same_weights(resumed.state_dict(), straight)
    assert not torch.equal(load_checkpoint(saved)["model"]["conv_in.weight"], straight["model"]["conv_in.weight"])


def test_each_step_rank_and_seed_draw_their_own_random_numbers(tmp_path):
    """A step's t and noise come from (seed, step), its dropout from (seed, step, rank): the same step draws
    them again alike (what makes a resume exact), the next step, another rank or another seed draws others."""
    import types

    trainer = Trainer(small_config(tmp_path))
    x0 = next(trainer.batches.epoch(0))

    def draws(step, seed=0, rank=0):
        trainer.step, trainer.config.seed = step, seed
        t, noise = trainer.draw_inputs(x0)
        trainer.dist = types.SimpleNamespace(rank=rank, world_size=1)  # (what reseed reads of it)
        trainer.reseed()
        return t, noise, torch.rand(64)  # dropout draws from the default generator

    def same(a, b):
        return [torch.equal(x, y) for x, y in zip(a, b)]

    first = draws(5)
    assert same(draws(5), first) == [True, True, True]
    for other in (draws(6), draws(5, seed=1)):
        assert same(other, first)[1:] == [False, False]
    assert same(draws(5, rank=1), first) == [True, True, False]


def test_exception_saves_an_emergency_checkpoint(tmp_path, straight):
    trainer = Trainer(small_config(tmp_path, checkpoint_every=0))
    objective = trainer.objective

    def failing(*args, **kwargs):
        if trainer.step == 7:
            raise RuntimeError("injected failure")
        return objective(*args, **kwargs)

    trainer.objective = failing
    with pytest.raises(TrainingAborted, match=r"RuntimeError at step 7 .*injected failure.*emergency "
                                              r"checkpoint .*ckpt-000000007\.pt saved\. To resume, rerun the same"):
        trainer.run()
    assert_all_checkpoints_valid(tmp_path / "checkpoints")
    Trainer(small_config(tmp_path)).run()  # the dropped step 8 is redone exactly
    assert_same_weights(load_checkpoint(tmp_path / "checkpoints"), straight)


def test_no_emergency_checkpoint_in_the_middle_of_an_update(tmp_path):
    trainer = Trainer(small_config(tmp_path, checkpoint_every=2))
    update = trainer.ema.update

    def failing(model, **options):
        if trainer.step == 3:
            raise RuntimeError("failure after the optimizer step")
        update(model, **options)

    trainer.ema.update = failing
    with pytest.raises(TrainingAborted, match=r"mid-update .* not saved; the last checkpoint is .*ckpt-000000002"):
        trainer.run()
    assert [path.name for path, _ in CheckpointManager(tmp_path / "checkpoints").verify()] == ["ckpt-000000002.pt"]


@pytest.mark.parametrize("poisoned", ["model", "ema"])
def test_no_emergency_checkpoint_of_non_finite_weights(tmp_path, poisoned):
    """An exception after the model or its EMA went non-finite saves nothing: that checkpoint would be the
    newest, and every rerun would go on from it."""
    trainer = Trainer(small_config(tmp_path, checkpoint_every=2))
    objective = trainer.objective

    def failing(*args, **kwargs):
        if trainer.step == 3:
            tensor = trainer.model.conv_in.weight if poisoned == "model" else trainer.ema.shadow[0]
            with torch.no_grad():
                tensor.view(-1)[0] = float("inf")
            raise RuntimeError("injected failure")
        return objective(*args, **kwargs)

    trainer.objective = failing
    with pytest.raises(TrainingAborted, match=r"not finite, so it was not saved; the last checkpoint is "
                                              r".*ckpt-000000002\.pt"):
        trainer.run()
    assert [path.name for path, _ in CheckpointManager(tmp_path / "checkpoints").verify()] == ["ckpt-000000002.pt"]


def signal_at_step(monkeypatch, step: int, count: int = 1, sig=signal.SIGINT):
    """Send `sig` to this process `count` times when training step `step` begins."""
    train_step = Trainer.train_step

    def patched(self, x0):
        if self.step == step:
            for _ in range(count):
                os.kill(os.getpid(), sig)
        return train_step(self, x0)

    monkeypatch.setattr(Trainer, "train_step", patched)


def test_ctrl_c_finishes_the_step_saves_and_exits_130(tmp_path, monkeypatch, capsys):
    from dream.cli import main

    signal_at_step(monkeypatch, 3)
    handler = signal.getsignal(signal.SIGINT)  # (Python's, or SIG_IGN in a job started in the background)
    assert main(["train", *CLI_FLAGS, "--checkpoint-every", "0", "--run-dir", str(tmp_path)]) == 130
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"dream train: stopped by SIGINT at step 4 \(epoch 1\); checkpoint .*ckpt-000000004\.pt "
                        r"saved\. To resume, rerun the same command\.", last_line), last_line
    assert_all_checkpoints_valid(tmp_path / "checkpoints")
    assert signal.getsignal(signal.SIGINT) is handler, "the handler was not restored"


def test_a_second_ctrl_c_drops_the_step(tmp_path, monkeypatch):
    from dream.train import Interrupted

    signal_at_step(monkeypatch, 3, count=2)
    with pytest.raises(Interrupted, match=r"interrupted at step 3 .*dropping the step; emergency checkpoint "
                                          r".*ckpt-000000003\.pt saved"):
        Trainer(small_config(tmp_path, checkpoint_every=0)).run()
    assert_all_checkpoints_valid(tmp_path / "checkpoints")


def test_a_second_sigterm_still_finishes_the_step_and_saves(tmp_path, monkeypatch):
    """Only a second Ctrl-C drops the step: a launcher or scheduler that repeats SIGTERM gets the checkpoint of
    the finished step, as after one."""
    signal_at_step(monkeypatch, 3, count=2, sig=signal.SIGTERM)
    with pytest.raises(Interrupted, match=r"^stopped by SIGTERM at step 4 .*ckpt-000000004\.pt saved"):
        Trainer(small_config(tmp_path, checkpoint_every=0)).run()
    assert_all_checkpoints_valid(tmp_path / "checkpoints")


# ----------------------------------------------------------------------------------------------
# non-finite steps
def inject_non_finite(trainer, bad_steps, where):
    objective = trainer.objective

    def poisoned(model, diffusion, x0, epoch, config, t=None, noise=None, backward=None):
        if trainer.step not in bad_steps:
            return objective(model, diffusion, x0, epoch, config, t=t, noise=noise, backward=backward)
        if where == "loss":
            loss, logs = objective(model, diffusion, x0, epoch, config, t=t, noise=noise,
                                   backward=lambda term: backward(term * float("nan")))
            return loss * float("nan"), {**logs, "loss": logs["loss"] * float("nan")}
        if where == "loss_alone":  # finite gradients under a non-finite loss: the step is no more trusted
            loss, logs = objective(model, diffusion, x0, epoch, config, t=t, noise=noise, backward=backward)
            return loss * float("nan"), {**logs, "loss": logs["loss"] * float("nan")}
        result = objective(model, diffusion, x0, epoch, config, t=t, noise=noise, backward=backward)
        trainer.model.conv_in.weight.grad[0, 0, 0, 0] = float("inf")
        return result

    trainer.objective = poisoned


@pytest.mark.parametrize("where", ["loss", "grad", "loss_alone"])
def test_a_non_finite_step_is_skipped_and_counted(tmp_path, where):
    trainer = Trainer(small_config(tmp_path, epochs=2, checkpoint_every=0))
    inject_non_finite(trainer, {2}, where)
    before = {}
    step = trainer.train_step

    def watched(x0):
        if trainer.step == 2:
            before["model"] = [p.detach().clone() for p in trainer.model.parameters()]
            before["ema"] = [s.clone() for s in trainer.ema.shadow]
        logs = step(x0)
        if trainer.step == 3:
            assert all(torch.equal(a, b) for a, b in zip(before["model"], trainer.model.parameters()))
            assert all(torch.equal(a, b) for a, b in zip(before["ema"], trainer.ema.shadow))
        return logs

    trainer.train_step = watched
    result = trainer.run()
    assert result["step"] == 4 and result["skipped_steps"] == 1 and "model" in before
    records = [r for r in map(eval_json, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["skipped"] for r in records] == [0, 0, 1, 0]
    assert records[-1]["skipped_steps"] == 1
    if where != "grad":  # the skipped step's loss, NaN, is logged as null
        assert records[2]["loss"] is None and records[1]["loss"] > 0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_a_skipped_step_is_decided_on_the_device_and_counted_a_step_later(tmp_path, where):
    """fp32: the skip is made on the device (fused AdamW's found_inf, the EMA's applied flag), and the host
    reads the step's flags after the next step, so that no step waits for its own result: the counters
    lag one step until count_steps(), while the weights, the EMA and AdamW's step counts never see the step."""
    trainer = Trainer(small_config(tmp_path, precision="fp32"))
    assert not trainer.scaler.is_enabled() and trainer.optimizer.defaults["fused"]
    inject_non_finite(trainer, {1}, where)
    batch = next(trainer.batches.epoch(0))
    trainer.train_step(batch)
    weights = [p.detach().clone() for p in trainer.model.parameters()]
    shadow = [s.clone() for s in trainer.ema.shadow]
    logs = trainer.train_step(batch)  # step 2: not finite
    assert float(logs["skipped"]) == 1
    assert (trainer.step, trainer.counted_step, trainer.skipped_steps) == (2, 1, 0)  # not read yet
    assert all(torch.equal(a, b) for a, b in zip(weights, trainer.model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(shadow, trainer.ema.shadow))
    assert {float(state["step"]) for state in trainer.optimizer.state.values()} == {1.0}
    assert trainer.ema.num_updates == 1
    logs = trainer.train_step(batch)  # step 3: finite; step 2 is counted now
    assert float(logs["skipped"]) == 0
    assert (trainer.counted_step, trainer.skipped_steps, trainer.bad_in_a_row, trainer.skipped_in_a_row) == \
        (2, 1, 1, 1)
    trainer.count_steps()
    assert (trainer.counted_step, trainer.skipped_steps, trainer.bad_in_a_row, trainer.skipped_in_a_row) == \
        (3, 1, 0, 0)
    assert {float(state["step"]) for state in trainer.optimizer.state.values()} == {2.0}
    assert trainer.ema.num_updates == 2
    assert trainer.state_dict()["skipped_steps"] == 1


def eval_json(line):
    """A metrics.jsonl line as standard JSON: NaN and Infinity, which other readers reject, fail here."""
    import json

    def not_standard(constant):
        raise AssertionError(f"metrics.jsonl holds {constant}, which is not JSON: {line}")

    return json.loads(line, parse_constant=not_standard)


def test_too_many_non_finite_steps_restore_the_last_good_checkpoint(tmp_path):
    trainer = Trainer(small_config(tmp_path, max_bad_steps=3))
    inject_non_finite(trainer, set(range(4, 100)), "loss")
    with pytest.raises(Diverged, match=r"3 steps in a row .*steps 5-7.*restored the last good checkpoint "
                                       r".*ckpt-000000004\.pt \(step 4\)"):
        trainer.run()
    assert trainer.step == 4
    good = load_checkpoint(tmp_path / "checkpoints")
    assert good["step"] == 4, "a checkpoint was written during the bad streak"
    assert_same_weights(trainer.state_dict(), good)


def test_fp16_gradients_that_never_turn_finite_diverge(tmp_path):
    """With fp16 an overflow is the loss scaler's business (it halves the scale, the step is skipped), but
    gradients that stay non-finite drive the scale below 1, and from there each skip counts towards the
    divergence. No checkpoint is written after a skipped step: the one restored is from before the streak."""
    trainer = Trainer(small_config(tmp_path, precision="fp16", max_bad_steps=3, epochs=30))
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() == 2.0**16
    inject_non_finite(trainer, set(range(4, 100)), "grad")
    # steps 5 .. 20 halve the scale to 2^0 (not counted); steps 21, 22, 23 leave it below 1 (counted)
    with pytest.raises(Diverged, match=r"3 steps in a row .*steps 21-23.*restored the last good checkpoint "
                                       r".*ckpt-000000004\.pt \(step 4\)"):
        trainer.run()
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("ckpt-*.pt"))[-1] == "ckpt-000000004.pt"


def test_a_streak_of_non_finite_steps_counts_on_after_a_resume(tmp_path, monkeypatch):
    """A checkpoint saved by a signal in the middle of a streak carries the streak: the resumed run
    diverges when the streak reaches max_bad_steps, not max_bad_steps more steps later."""
    signal_at_step(monkeypatch, 3)
    first = Trainer(small_config(tmp_path, max_bad_steps=3, checkpoint_every=0))
    inject_non_finite(first, {2, 3}, "loss")
    with pytest.raises(Interrupted):
        first.run()
    assert load_checkpoint(tmp_path / "checkpoints")["bad_in_a_row"] == 2
    monkeypatch.undo()
    probe = Trainer(small_config(tmp_path, max_bad_steps=3, checkpoint_every=0))
    assert probe.resume() and (probe.bad_in_a_row, probe.skipped_steps) == (2, 2)  # the run's totals go on too
    resumed = Trainer(small_config(tmp_path, max_bad_steps=3, checkpoint_every=0))
    inject_non_finite(resumed, {4}, "loss")
    with pytest.raises(Diverged, match=r"3 steps in a row .*\(steps 3-5\); restored .*ckpt-000000004\.pt"):
        resumed.run()


@pytest.mark.parametrize("stop", ["signal", "error"])
def test_a_stop_right_after_the_streak_that_diverges_saves_no_checkpoint_of_it(tmp_path, monkeypatch, stop):
    """The streak reaches --max-bad-steps at step 5, and the loop would act on it after step 6; a stop before then
    (a signal after step 5, an error in step 6) does what that check does, instead of saving a checkpoint holding
    the full streak, which every rerun would take, restore and diverge on at once: with a signal the last good
    checkpoint is restored and the run stops as diverged; with an error nothing is saved. Then a rerun goes on."""
    if stop == "signal":
        signal_at_step(monkeypatch, 4)
    else:
        train_step = Trainer.train_step

        def failing(self, x0):
            if self.step == 5:
                raise RuntimeError("injected failure")
            return train_step(self, x0)

        monkeypatch.setattr(Trainer, "train_step", failing)
    first = Trainer(small_config(tmp_path, max_bad_steps=3))
    inject_non_finite(first, {2, 3, 4}, "loss")
    if stop == "signal":
        expected = Diverged, r"3 steps in a row .*\(steps 3-5\); restored the last good checkpoint .*ckpt-000000002\.pt"
    else:
        expected = TrainingAborted, (r"RuntimeError at step 5 .*injected failure; the state was diverged \(3 "
                                     r"non-finite steps in a row\), so it was not saved; the last checkpoint is "
                                     r".*ckpt-000000002\.pt")
    with pytest.raises(expected[0], match=expected[1]):
        first.run()
    saved = load_checkpoint(tmp_path / "checkpoints")
    assert (saved["step"], saved["bad_in_a_row"]) == (2, 0)
    monkeypatch.undo()
    assert Trainer(small_config(tmp_path, max_bad_steps=3)).run()["step"] == STEPS


def test_a_checkpoint_at_the_end_of_an_epoch_is_saved_again_once_it_has_advanced(tmp_path):
    """A periodic checkpoint on an epoch's last step records that epoch's end; the run's final checkpoint
    records the next epoch's start, so a rerun of the finished run neither trains nor draws a grid again."""
    config = small_config(tmp_path, epochs=2, checkpoint_every=2, sample_every=1, sample_steps=1)
    assert Trainer(config).run()["step"] == 4
    final = load_checkpoint(tmp_path / "checkpoints")
    assert (final["step"], final["epoch"], final["batch_in_epoch"]) == (4, 2, 0)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "samples").iterdir()}
    before_checkpoint = (tmp_path / "checkpoints" / "ckpt-000000004.pt").stat().st_mtime_ns
    assert Trainer(config).run()["step"] == 4
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "samples").iterdir()} == before
    assert (tmp_path / "checkpoints" / "ckpt-000000004.pt").stat().st_mtime_ns == before_checkpoint


def test_no_emergency_checkpoint_while_the_model_holds_the_ema_weights(tmp_path):
    """Sampling a grid swaps the EMA weights into the model; until the training weights are all back, the
    state is not one to save (a second Ctrl-C during the restore would otherwise save the mix)."""
    trainer = Trainer(small_config(tmp_path))
    assert trainer.state_is_sane()
    with trainer.ema.applied(trainer.model):
        assert trainer.ema.in_use and not trainer.state_is_sane()
    assert not trainer.ema.in_use and trainer.state_is_sane()


def test_a_run_that_ends_inside_a_non_finite_streak_is_no_success(tmp_path):
    """Its last steps were skipped: no end checkpoint (which would push the good ones out), a Diverged error
    naming the last checkpoint; the rerun goes on from that checkpoint."""
    trainer = Trainer(small_config(tmp_path, max_steps=4, max_bad_steps=5, checkpoint_every=1, checkpoint_keep=2))
    inject_non_finite(trainer, {2, 3}, "loss")
    with pytest.raises(Diverged, match=r"ended with 2 non-finite step\(s\) in a row \(steps 3-4\); no checkpoint "
                                       r"was written after them, the last is .*ckpt-000000002\.pt"):
        trainer.run()
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("ckpt-*.pt")) == ["ckpt-000000001.pt",
                                                                                   "ckpt-000000002.pt"]
    assert Trainer(small_config(tmp_path, max_steps=4, checkpoint_every=1, checkpoint_keep=2)).run()["step"] == 4


def test_a_divergence_with_every_checkpoint_damaged_says_both(tmp_path):
    trainer = Trainer(small_config(tmp_path, max_bad_steps=3))
    inject_non_finite(trainer, set(range(4, 100)), "loss")
    resume_lookup = trainer.checkpoints.latest

    def latest(hint=""):  # the run's start finds nothing; by the divergence every checkpoint is damaged
        if trainer.step == 0:
            return resume_lookup(hint)
        raise DreamError("no checkpoint in X can be loaded (ckpt: damaged); none was deleted")

    trainer.checkpoints.latest = latest
    with pytest.raises(Diverged, match=r"3 steps in a row .*; and no checkpoint in X can be loaded .*none was "
                                       r"deleted: pass --resume FILE with a good copy"):
        trainer.run()


# ----------------------------------------------------------------------------------------------
# real processes: kill -9, SIGTERM and SIGINT at random moments
def launch(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "dream", "train", *CLI_FLAGS, "--run-dir", str(run_dir)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def newest_step(folder: Path) -> int:
    try:
        return max(int(p.stem.split("-")[1]) for p, _ in CheckpointManager(folder).verify())
    except ValueError:
        return 0


def step_seconds(run_dir: Path) -> float:
    """The duration of the last logged step."""
    records = [eval_json(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return 4 / [r for r in records if "images_per_s" in r][-1]["images_per_s"]


def test_kills_and_signals_at_random_moments_then_rerun_completes_bitwise(tmp_path, straight):
    rng = random.Random(2024)
    folder = tmp_path / "checkpoints"
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
        start = newest_step(folder)
        process = launch(tmp_path)
        deadline = time.monotonic() + 300
        while newest_step(folder) <= start and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, f"training ended before it could be interrupted: {process.communicate()}"
        time.sleep(rng.uniform(0.0, 1.0) * step_seconds(tmp_path))  # anywhere in a step or a checkpoint write
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=300)
        if sig == signal.SIGKILL:
            assert process.returncode == -signal.SIGKILL
        else:
            last_line = stderr.strip().splitlines()[-1]
            assert process.returncode == 128 + sig, stderr
            assert re.fullmatch(rf"dream train: stopped by {signal.Signals(sig).name} at step (\d+) .*checkpoint "
                                r".*ckpt-0*\1\.pt saved\. To resume, rerun the same command\.", last_line), last_line
        assert_all_checkpoints_valid(folder)
        assert newest_step(folder) < STEPS, "interrupted too late to test anything"
    process = launch(tmp_path)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert stdout.startswith(f"done: step {STEPS}")
    assert_all_checkpoints_valid(folder)
    assert_same_weights(load_checkpoint(folder), straight)
    steps = [eval_json(line).get("step") for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == list(range(1, STEPS + 1)), "the log should hold each step once after resumes"


# ----------------------------------------------------------------------------------------------
# rerunning a run folder: what carries over, what is refused
def logged_steps(run_dir: Path) -> list:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record["step"] for record in map(json.loads, lines) if "loss" in record]


def test_resume_takes_this_commands_optimizer_and_ema_settings(tmp_path):
    """A checkpoint brings back its optimizer's lr and weight decay and its EMA decay; the rerun's flags
    replace them (so "lower --lr and rerun the same command" does lower it), each change noted."""
    Trainer(small_config(tmp_path, max_steps=2)).run()
    resumed = Trainer(small_config(tmp_path, max_steps=3, lr=1e-2, weight_decay=0.1, ema_decay=0.5))
    resumed.run()
    assert all(g["lr"] == 1e-2 and g["weight_decay"] == 0.1 for g in resumed.optimizer.param_groups)
    assert resumed.ema.decay == 0.5
    state = load_checkpoint(tmp_path / "checkpoints")
    assert state["step"] == 3 and state["optimizer"]["param_groups"][0]["lr"] == 1e-2
    assert state["ema"]["decay"] == 0.5
    import json

    notes = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    changed = {(r["flag"], r["old"], r["new"]) for r in notes if r.get("event") == "hyperparameter"}
    assert changed == {("--lr", 2e-4, 1e-2), ("--weight-decay", 0.0, 0.1), ("--ema-decay", 0.9999, 0.5)}

    Trainer(small_config(tmp_path, max_steps=4, lr=1e-2, weight_decay=0.1, ema_decay=0.5, grad_clip=0.5)).run()
    notes = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["flag"], r["old"], r["new"]) for r in notes if r.get("event") == "hyperparameter"][-1] == \
        ("--grad-clip", 1.0, 0.5)


def test_resume_notes_a_change_in_how_the_step_runs(tmp_path):
    """Backend, compile, checkpointing, layout and where the images are kept may change between reruns (speed and
    memory, not the course); config.json takes this command's, so each change is noted in metrics.jsonl."""
    Trainer(small_config(tmp_path, max_steps=2)).run()
    Trainer(small_config(tmp_path, max_steps=3, backend="sdpa", checkpointing="resblocks")).run()
    notes = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    changed = [(r["flag"], r["old"], r["new"]) for r in notes if r.get("event") == "setting"]
    assert changed == [("--backend", "eager", "sdpa"), ("--checkpointing", "none", "resblocks")]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["backend"], saved["checkpointing"]) == ("sdpa", "resblocks")
    Trainer(small_config(tmp_path, max_steps=4, backend="sdpa", checkpointing="resblocks")).run()  # no change
    notes = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["flag"], r["old"], r["new"]) for r in notes if r.get("event") == "setting"] == changed


def test_resume_refuses_another_objective_setting(tmp_path):
    """The objective's settings fix the run's course like the objective itself: a change is refused, naming it,
    whether given or left to its default on either side."""
    Trainer(small_config(tmp_path, max_steps=1)).run()
    for objective_config, named in [({"dream_start_epoch": 1, "ramp_epochs": 2, "lambda_max": 0.3},
                                     "--lambda-max 0.5 (this command: 0.3)"),
                                    ({"dream_start_epoch": 1}, "--ramp-epochs 2 (this command: 20.0)")]:
        with pytest.raises(DreamError, match=re.escape(named) + ".*use another --run-dir"):
            Trainer(small_config(tmp_path, max_steps=2, objective_config=objective_config)).run()
    same = {"dream_start_epoch": 1, "ramp_epochs": 2.0, "lambda_max": 0.5}  # the defaults spelled out: the same
    assert Trainer(small_config(tmp_path, max_steps=2, objective_config=same)).run()["step"] == 2
    unused = {**same, "paper_power": 2.0, "paper_loss": "l1"}  # the paper objective's: the seed run reads neither
    assert Trainer(small_config(tmp_path, max_steps=3, objective_config=unused)).run()["step"] == 3


def test_an_fp16_resume_of_an_fp32_run_starts_a_fresh_loss_scaler(tmp_path):
    Trainer(small_config(tmp_path, max_steps=1)).run()
    resumed = Trainer(small_config(tmp_path, max_steps=2, precision="fp16"))
    resumed.run()
    assert resumed.step == 2 and resumed.scaler.is_enabled()


def test_a_checkpoint_of_an_unfused_adamw_resumes_into_the_fused_one(tmp_path):
    """A checkpoint whose AdamW was not fused (a CPU run of an earlier release) loads with this run's flags: the
    fused AdamW that skips a step on the device, its moments and step counts carried over."""
    first = Trainer(small_config(tmp_path / "first", max_steps=2))
    first.run()
    state = first.state_dict()
    state["optimizer"]["param_groups"] = [{**group, "fused": None, "foreach": None}
                                          for group in state["optimizer"]["param_groups"]]
    resumed = Trainer(small_config(tmp_path / "resumed", max_steps=3))
    resumed.load_state_dict(state)
    assert all(group["fused"] and group["foreach"] is None for group in resumed.optimizer.param_groups)
    moments = [resumed.optimizer.state[p]["exp_avg"] for p in resumed.model.parameters()]
    assert all(torch.equal(a, first.optimizer.state[p]["exp_avg"])
               for a, p in zip(moments, first.model.parameters()))
    resumed.train_step(next(resumed.batches.epoch(resumed.epoch, resumed.batch_in_epoch)))
    assert {float(s["step"]) for s in resumed.optimizer.state.values()} == {3.0}
    assert len(resumed.pending_steps) == 1


def test_a_missing_manifest_falls_back_to_the_files_and_deletes_nothing_newer(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    for step in (1, 2, 3):
        manager.save(fake_state(step), step)
    (tmp_path / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="manifest .* is missing; scanning the folder"):
        assert manager.latest()["step"] == 3
    with pytest.warns(UserWarning, match="missing"):
        manager.save(fake_state(4), 4)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pt")) == [f"ckpt-{s:09d}.pt" for s in (2, 3, 4)]
    empty = CheckpointManager(tmp_path / "empty")
    assert empty.latest() is None  # nothing there: no warning (pytest's filterwarnings would not fail it,
    assert empty.verify() == []    # but no entry either)


def test_a_damaged_checkpoint_is_named_once_in_one_short_warning(tmp_path):
    """Without a manifest to check it against, a truncated newest checkpoint fails torch.load: the warning names
    the file once and keeps torch's reason, not its paragraph of advice."""
    import warnings

    manager = CheckpointManager(tmp_path, keep=3)
    for step in (1, 2):
        manager.save(fake_state(step), step)
    (tmp_path / "manifest.json").unlink()
    newest = tmp_path / "ckpt-000000002.pt"
    newest.write_bytes(newest.read_bytes()[:newest.stat().st_size // 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert manager.latest()["step"] == 1
    [damaged] = [str(w.message) for w in caught if " is damaged (" in str(w.message)]
    assert damaged.count(str(newest)) == 1 and damaged.endswith("; skipping it"), damaged
    assert "cannot be read (RuntimeError: " in damaged and len(damaged) < 300 and "\n" not in damaged, damaged


def test_a_run_folder_without_its_manifest_still_loads(tmp_path):
    """Loading a run folder looks in its checkpoints/ folder even when the manifest there is missing."""
    manager = CheckpointManager(tmp_path / "run" / "checkpoints", keep=3)
    for step in (1, 2):
        manager.save(fake_state(step), step)
    (tmp_path / "run" / "checkpoints" / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="missing"):
        assert load_checkpoint(tmp_path / "run")["step"] == 2


def test_a_rerun_that_finds_no_checkpoint_logs_each_step_once(tmp_path):
    """Killed before its first checkpoint, a run starts again from step 0: its log starts again too."""
    import shutil

    Trainer(small_config(tmp_path, max_steps=3, checkpoint_every=0)).run()
    shutil.rmtree(tmp_path / "checkpoints")  # as if killed (kill -9) before any checkpoint was written
    Trainer(small_config(tmp_path, max_steps=3, checkpoint_every=0)).run()
    assert logged_steps(tmp_path) == [1, 2, 3]
    with open(tmp_path / "metrics.jsonl", "a") as log:  # a step logged after the last checkpoint, then a kill
        log.write(json.dumps({"step": 4, "loss": 1.0}) + "\n")
    Trainer(small_config(tmp_path, max_steps=5, checkpoint_every=0)).run()  # goes on from step 3, redoing 4
    assert logged_steps(tmp_path) == [1, 2, 3, 4, 5]


def write_folder(folder: Path, count: int, first: int = 0) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(first, first + count):
        Image.new("RGB", (12, 10), (i * 29 % 256, 255 - i * 13 % 256, 90)).save(folder / f"{i:03d}.png")


@pytest.mark.parametrize("change", ["fewer_images", "other_folder"])
def test_resume_onto_other_data_is_refused(tmp_path, monkeypatch, change):
    """Fewer images used to leave the resumed epoch past its end, and the loop spun forever."""
    monkeypatch.setenv("DREAM_CACHE", str(tmp_path / "cache"))
    write_folder(tmp_path / "faces", 8)
    config = dict(data="folder", data_root=str(tmp_path / "faces"))
    Trainer(small_config(tmp_path / "run", max_steps=1, **config)).run()
    if change == "fewer_images":
        for path in sorted((tmp_path / "faces").glob("*.png"))[4:]:
            path.unlink()
        message = "was made on 8 images, this run's data has 4"
    else:
        write_folder(tmp_path / "other", 8)
        config["data_root"] = str(tmp_path / "other")
        message = "was made with --data-root .*: pass --data-root .* to go on, or use another --run-dir"
    with pytest.raises(DreamError, match=message):
        Trainer(small_config(tmp_path / "run", max_steps=2, **config)).run()


def test_resume_onto_images_replaced_at_the_same_count_is_noted(tmp_path, monkeypatch):
    """One image rewritten: the count still matches, the content does not; the resume says so (stderr and
    a data_changed record), and an unchanged folder resumes without it."""
    monkeypatch.setenv("DREAM_CACHE", str(tmp_path / "cache"))
    write_folder(tmp_path / "faces", 8)
    config = dict(data="folder", data_root=str(tmp_path / "faces"))
    Trainer(small_config(tmp_path / "run", max_steps=1, **config)).run()
    Trainer(small_config(tmp_path / "run", max_steps=2, **config)).run()
    def data_changed_records():
        lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        return [record for record in map(json.loads, lines) if record.get("event") == "data_changed"]

    assert not data_changed_records()

    write_folder(tmp_path / "faces", 1, first=40)  # 040.png: the same count, one image different
    (tmp_path / "faces" / "003.png").unlink()
    Trainer(small_config(tmp_path / "run", max_steps=3, **config)).run()
    changed = data_changed_records()
    assert len(changed) == 1 and changed[0]["step"] == 2 and changed[0]["old"] != changed[0]["new"]


def test_initial_weights_do_not_depend_on_the_image_cache(tmp_path, monkeypatch):
    """Decoding a folder the first time draws random numbers (a DataLoader's seed); a warm cache does not.
    The same --seed gives the same initial weights either way."""
    monkeypatch.setenv("DREAM_CACHE", str(tmp_path / "cache"))
    write_folder(tmp_path / "faces", 8)
    config = dict(data="folder", data_root=str(tmp_path / "faces"))
    cold = Trainer(small_config(tmp_path / "a", **config)).model.state_dict()
    assert list((tmp_path / "cache").glob("*.pt"))
    warm = Trainer(small_config(tmp_path / "b", **config)).model.state_dict()
    assert all(torch.equal(cold[name], warm[name]) for name in cold)


def test_ctrl_c_during_the_final_sample_grid_is_the_resume_line(tmp_path, monkeypatch):
    from dream.train import Interrupted

    trainer = Trainer(small_config(tmp_path, max_steps=3, sample_every=10, sample_count=1))

    def interrupted(stop=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_sample_grid", interrupted)
    with pytest.raises(Interrupted, match="To resume, rerun the same command"):
        try:
            trainer.run()
        except KeyboardInterrupt:  # escaping, it would stop the whole pytest session
            pytest.fail("a bare KeyboardInterrupt (a traceback for the user) escaped the trainer")
    assert load_checkpoint(tmp_path / "checkpoints")["step"] == 3


def signal_at_grid_step(monkeypatch, trainer, signum, at: int) -> list:
    """The grid's DDIM steps, counted; the process gets `signum` (the trainer's handler takes it) in step `at`."""
    ddim_step, steps = trainer.diffusion.ddim_step, []

    def counted(*args, **kwargs):
        steps.append(trainer.step)
        if len(steps) == at:
            os.kill(os.getpid(), signum)
        return ddim_step(*args, **kwargs)

    monkeypatch.setattr(trainer.diffusion, "ddim_step", counted)
    return steps


def test_a_stop_during_an_epochs_sample_grid_drops_it_and_saves_at_once(tmp_path, monkeypatch):
    """SIGTERM while an epoch's grid is made (torchrun kills its workers 30 s after its own): the grid stops after
    its current denoising step and is dropped, and the checkpoint is saved at the epoch's end without training
    another step."""
    trainer = Trainer(small_config(tmp_path, max_steps=6, sample_every=1, sample_count=1, sample_steps=5))
    steps = signal_at_grid_step(monkeypatch, trainer, signal.SIGTERM, at=2)
    with pytest.raises(Interrupted, match="stopped by SIGTERM at step 2 "):
        trainer.run()
    assert steps == [2, 2] and load_checkpoint(tmp_path / "checkpoints")["step"] == 2  # 8 images, batch 4
    assert not list((tmp_path / "samples").glob("*.png")) and trainer.model.training


def test_a_stop_during_the_final_sample_grid_drops_it_and_the_rerun_makes_it(tmp_path, monkeypatch):
    """Ctrl-C while the final grid is made (the checkpoint is saved already): the grid stops after its current
    denoising step, the line says how to go on, and the rerun makes the grid."""
    trainer = Trainer(small_config(tmp_path, max_steps=3, sample_every=10, sample_count=1, sample_steps=5))
    steps = signal_at_grid_step(monkeypatch, trainer, signal.SIGINT, at=3)
    with pytest.raises(Interrupted, match=r"stopped by SIGINT at step 3 .*To resume, rerun the same command\."):
        trainer.run()
    assert steps == [3, 3, 3] and not (tmp_path / "samples" / "grid-000000003.png").exists()
    assert load_checkpoint(tmp_path / "checkpoints")["step"] == 3
    result = Trainer(small_config(tmp_path, max_steps=3, sample_every=10, sample_count=1, sample_steps=5)).run()
    assert result["step"] == 3 and Path(result["grid"]).name == "grid-000000003.png"


def test_a_run_stopped_at_an_epochs_last_step_resumes_into_the_next_epoch(tmp_path, monkeypatch):
    """Stopped after step 4, the last of epoch 1 (two steps an epoch) and of --max-steps 4: the rerun has nothing
    left to train and ends where the uninterrupted run ends, in epoch 2."""
    straight = Trainer(small_config(tmp_path / "straight", max_steps=4)).run()
    trainer = Trainer(small_config(tmp_path / "stopped", max_steps=4))
    train_step = trainer.train_step

    def step_then_sigterm(x0):
        result = train_step(x0)
        if trainer.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(trainer, "train_step", step_then_sigterm)
    with pytest.raises(Interrupted, match="at step 4 "):
        trainer.run()
    resumed = Trainer(small_config(tmp_path / "stopped", max_steps=4)).run()
    assert (resumed["step"], resumed["epoch"]) == (straight["step"], straight["epoch"]) == (4, 2)
    assert load_checkpoint(tmp_path / "stopped" / "checkpoints")["epoch"] == 2


def test_a_sample_grid_cut_short_by_a_stop_is_made_again_by_the_rerun(tmp_path, monkeypatch):
    """A stop while the final grid is written (here: half its bytes, then Ctrl-C) leaves no torn PNG that the
    rerun, which makes only a missing grid, would take for done."""
    import io

    import torchvision

    from dream.sample import image_done

    config = small_config(tmp_path, max_steps=3, sample_every=10, sample_count=1, sample_steps=2)
    save_image = torchvision.utils.save_image

    def stopped_halfway(tensor, fp, format=None):
        whole = io.BytesIO()
        save_image(tensor, whole, format="png")
        with (open(fp, "wb") if isinstance(fp, (str, Path)) else nullcontext(fp)) as f:
            f.write(whole.getvalue()[:len(whole.getvalue()) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(torchvision.utils, "save_image", stopped_halfway)
    with pytest.raises(Interrupted):
        Trainer(config).run()
    monkeypatch.setattr(torchvision.utils, "save_image", save_image)
    result = Trainer(config).run()
    assert result["grid"] and image_done(Path(result["grid"])), "the rerun left the grid cut short"


# ----------------------------------------------------------------------------------------------
# the run folder and --resume: nothing is overwritten or deleted that the user did not ask for
def test_resume_file_behind_the_run_folders_newest_is_refused_and_deletes_nothing(tmp_path):
    """Going on from an older file would delete the run's newer checkpoints (and cut its log back) at the
    first save; the stop line of such a run used to lead there ("rerun with --resume <that checkpoint>")."""
    Trainer(small_config(tmp_path / "run", max_steps=4)).run()
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("ckpt-*.pt"))
    log = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    older = tmp_path / "run" / "checkpoints" / "ckpt-000000002.pt"
    with pytest.raises(DreamError, match=r"--resume .*ckpt-000000002\.pt is at step 2, but .*checkpoints holds newer "
                                         r"checkpoints \(up to step 4\) .*rerun without --resume to continue from "
                                         r"step 4, or use another --run-dir to branch off at step 2"):
        Trainer(small_config(tmp_path / "run", max_steps=6)).run(resume=str(older))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("ckpt-*.pt")) == files
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == log
    # branching off into another folder works, and its stop line says to rerun without --resume
    branch = Trainer(small_config(tmp_path / "branch", max_steps=3))
    assert branch.run(resume=str(older))["step"] == 3
    assert branch.resume_hint == "rerun the same command without --resume"
    assert Trainer(small_config(tmp_path / "run", max_steps=5)).run()["step"] == 5
    newest = tmp_path / "run" / "checkpoints" / "ckpt-000000005.pt"  # --resume naming the newest itself goes on
    assert Trainer(small_config(tmp_path / "run", max_steps=6)).run(resume=str(newest))["step"] == 6


def test_resume_file_into_a_folder_of_another_run_is_refused_and_changes_nothing(tmp_path):
    """--resume FILE --run-dir OLD, where OLD holds a run of another course (here: another seed): going on would
    list FILE's checkpoints beside OLD's and keep OLD's log lines up to FILE's step, one folder holding two runs.
    Refused, naming the setting, also where OLD's checkpoints are newer than FILE (whose refusal would advise
    going on with OLD's run); a folder of FILE's own course (a branch merged back, a checkpoint restored from a
    copy) goes on."""
    Trainer(small_config(tmp_path / "old", max_steps=4, seed=1)).run()
    Trainer(small_config(tmp_path / "other", max_steps=3)).run()
    before = {path.name: path.read_bytes() for path in (tmp_path / "old").rglob("*") if path.is_file()}
    source = tmp_path / "other" / "checkpoints" / "ckpt-000000003.pt"
    with pytest.raises(DreamError, match=rf"^{tmp_path / 'old'} holds another run \(made with --seed 1; {source} was "
                                         rf"made with --seed 0\): going on from {source} there would mix their "
                                         rf"checkpoints and logs; pass another --run-dir to branch off from it$"):
        Trainer(small_config(tmp_path / "old", max_steps=4)).run(resume=str(source))
    after = {path.name: path.read_bytes() for path in (tmp_path / "old").rglob("*") if path.is_file()}
    assert after.keys() - {".lock"} == before.keys() - {".lock"}
    assert all(after[name] == data for name, data in before.items() if name != ".lock")

    Trainer(small_config(tmp_path / "same", max_steps=1)).run()  # the same course: FILE goes on there
    assert Trainer(small_config(tmp_path / "same", max_steps=4)).run(resume=str(source))["step"] == 4
    records = [json.loads(line) for line in (tmp_path / "same" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if "loss" in record] == [1, 4]


def test_a_branch_that_fails_before_its_first_step_saves_into_its_own_folder(tmp_path):
    """--resume FILE --run-dir NEW failing before a step is taken: the emergency checkpoint is NEW's own, so that
    the line's advice (rerun without --resume) goes on from FILE's step instead of starting NEW over."""
    Trainer(small_config(tmp_path / "run", max_steps=2)).run()
    source = tmp_path / "run" / "checkpoints" / "ckpt-000000002.pt"
    branch = Trainer(small_config(tmp_path / "branch", max_steps=4))

    def failing(*args, **kwargs):
        raise RuntimeError("injected failure")

    branch.objective = failing
    saved = tmp_path / "branch" / "checkpoints" / "ckpt-000000002.pt"
    with pytest.raises(TrainingAborted, match=rf"RuntimeError at step 2 .*emergency checkpoint {saved} saved\. To "
                                              rf"resume, rerun the same command without --resume\."):
        branch.run(resume=str(source))
    assert load_checkpoint(saved)["step"] == 2
    assert Trainer(small_config(tmp_path / "branch", max_steps=4)).run()["step"] == 4
    records = [json.loads(line) for line in (tmp_path / "branch" / "metrics.jsonl").read_text().splitlines()]
    resumes = [record for record in records if record.get("event") == "resume"]
    assert [record["step"] for record in resumes] == [2, 2], resumes  # the branch, then the rerun, from step 2
    assert [record["step"] for record in records if "loss" in record] == [3, 4]


@pytest.mark.parametrize("state, what", [
    ({"model": {"w": torch.zeros(2)}, "config": "resnet50"}, "is not a dream checkpoint"),
    ({"model": {"w": torch.zeros(2)}, "config": {"lr": 1e-4}}, "is not a dream checkpoint"),
    ({"model": {"w": torch.zeros(2)}, "config": {"model": {}, "schedule": "cosine", "num_timesteps": 10}},
     r"is not a dream training checkpoint \(no ema, optimizer, scaler, epoch, batch_in_epoch, step, rng\); "
     r"training cannot go on from it"),
])
def test_resume_from_another_projects_checkpoint_is_one_line(tmp_path, state, what):
    foreign = tmp_path / "foreign.pt"
    torch.save(state, foreign)
    with pytest.raises(DreamError, match=f"^{foreign} {what}"):
        Trainer(small_config(tmp_path / "run", max_steps=1)).run(resume=str(foreign))


def test_a_folder_of_someone_elses_files_is_not_taken_for_a_run(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text('{"my": "important settings"}')
    (project / "metrics.jsonl").write_text("my notes\nmore notes\n")
    with pytest.raises(DreamError, match=r"--run-dir .*project holds config\.json and metrics\.jsonl that training "
                                         r"did not write"):
        Trainer(small_config(project, max_steps=1))
    assert (project / "config.json").read_text() == '{"my": "important settings"}'
    assert (project / "metrics.jsonl").read_text() == "my notes\nmore notes\n"
    # a one-line log, or one whose last line is not a record's start, is someone else's too (a torn last line
    # starts as a record does: the run's first rewrite of the log would drop any other)
    for text in ("my notes\n", '{"step": 1}\nmy notes\n'):
        (project / "config.json").unlink(missing_ok=True)
        (project / "metrics.jsonl").write_text(text)
        with pytest.raises(DreamError, match=r"--run-dir .*project holds metrics\.jsonl that training did not write"):
            Trainer(small_config(project, max_steps=1))
        assert (project / "metrics.jsonl").read_text() == text
    # a run's own files, a torn last log line included (a kill mid-write), are a run's
    Trainer(small_config(tmp_path / "run", max_steps=1)).run()
    with open(tmp_path / "run" / "metrics.jsonl", "a") as log:
        log.write('{"step": 2, "lo')
    assert Trainer(small_config(tmp_path / "run", max_steps=2)).run()["step"] == 2
    # appends that a machine crash left unwritten read back as NUL bytes, in place of the records' own
    with open(tmp_path / "run" / "metrics.jsonl", "a") as log:
        log.write("\x00" * 40)
    assert Trainer(small_config(tmp_path / "run", max_steps=3)).run()["step"] == 3
    assert "\x00" not in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_a_refused_rerun_leaves_the_run_as_it_was_and_a_refused_new_run_leaves_no_folder(tmp_path):
    Trainer(small_config(tmp_path / "run", max_steps=2)).run()
    log = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    with pytest.raises(DreamError, match=r"was made with --timesteps 1000, this command has --timesteps 500: pass "
                                         r"--timesteps 1000 to go on, or use another --run-dir"):
        Trainer(small_config(tmp_path / "run", max_steps=3, num_timesteps=500)).run()
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == log  # setup's notes were not appended
    checkpoint = tmp_path / "run" / "checkpoints" / "ckpt-000000002.pt"
    with pytest.raises(DreamError, match=r"was made with --seed 0, this command has --seed 5: pass --seed 0 to go "
                                         r"on, or resume another checkpoint"):
        train(small_config(tmp_path / "new", max_steps=3, seed=5), resume=str(checkpoint))
    assert not (tmp_path / "new").exists()


def test_resume_path_that_does_not_exist_is_refused_before_setup(tmp_path, capsys):
    from dream.cli import main

    assert main(["train", *CLI_FLAGS, "--run-dir", str(tmp_path / "run"), "--resume", str(tmp_path / "typo.pt")]) == 2
    assert capsys.readouterr().err.strip() == f"dream train: error: --resume {tmp_path / 'typo.pt'} does not exist"
    assert not (tmp_path / "run").exists()


def test_sigterm_during_setup_is_one_line(tmp_path, monkeypatch, capsys):
    """Before the loop's own handler (which saves a checkpoint) is installed, SIGTERM used to end the
    process silently."""
    import dream.train
    from dream.cli import main

    def terminated_while_loading(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
        raise AssertionError("SIGTERM did not stop the setup")

    monkeypatch.setattr(dream.train, "load_images", terminated_while_loading)
    assert main(["train", *CLI_FLAGS, "--run-dir", str(tmp_path / "run")]) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("dream train: SIGTERM; rerun the same command")


def test_a_full_disk_is_one_line_that_says_what_to_free(tmp_path, monkeypatch, capsys):
    import errno

    from dream.cli import main

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Trainer, "save_checkpoint", full)
    assert main(["train", *CLI_FLAGS, "--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("dream train: error: OSError at step 1 (epoch 0): [Errno 28] No space left on device "
                           f"(free space where {tmp_path / 'run'} is, or lower --checkpoint-keep)"), line


def test_the_progress_bar_is_cleared_before_the_stop_line(tmp_path, monkeypatch, capsys):
    from dream.cli import main

    signal_at_step(monkeypatch, 1)
    flags = [flag for flag in CLI_FLAGS if flag != "--no-progress"]
    assert main(["train", *flags, "--checkpoint-every", "0", "--run-dir", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    before, stop, _ = err.rpartition("dream train: stopped by SIGINT")
    assert stop and before.endswith(("\n", "\r")) and "it/s]" not in before.rsplit("\r", 2)[-1], repr(err[-400:])


def test_data_line_and_too_few_images_name_the_flags(tmp_path, capsys):
    from dream.cli import main

    write_folder(tmp_path / "faces", 5)
    (tmp_path / "faces" / "broken.png").write_text("not an image")
    flags = [*CLI_FLAGS, "--data", "folder", "--data-root", str(tmp_path / "faces"), "--max-steps", "1"]
    assert main(["train", *flags, "--run-dir", str(tmp_path / "a")]) == 0
    assert f"dream train: data: 5 images under {tmp_path / 'faces'}" in capsys.readouterr().err
    flags = [*CLI_FLAGS, "--run-dir", str(tmp_path / "b"), "--batch-size", "16"]
    assert main(["train", *flags]) == 2
    assert capsys.readouterr().err.strip() == "dream train: error: --batch-size 16 needs at least 16 images; the " \
                                              "data has 8"


def test_a_record_holds_the_mean_of_its_steps(tmp_path):
    """With --log-every 3 a record's loss is the mean of its 3 steps' losses (the run logging each step
    computes the same steps), not the last step's alone."""
    Trainer(small_config(tmp_path / "each", max_steps=6)).run()
    Trainer(small_config(tmp_path / "window", max_steps=6, log_every=3)).run()

    def records(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(line)]

    each, window = records("each"), records("window")
    assert [r["step"] for r in window] == [2, 3, 4, 6]  # log steps and epoch ends (2 steps an epoch)
    assert [r["logged_steps"] for r in window] == [2, 1, 1, 2]
    by_step = {r["step"]: r for r in each}
    for record, steps in zip(window, [(1, 2), (3,), (4,), (5, 6)]):
        for key in ("loss", "grad_norm"):
            expected = sum(by_step[s][key] for s in steps) / len(steps)
            assert abs(record[key] - expected) <= 1e-6 * abs(expected), (record["step"], key)


def test_a_second_job_in_a_running_jobs_folder_is_refused_in_one_line(tmp_path):
    """The run folder is locked while a run is on (a rerun while the first still runs, or workers a killed
    launcher left behind, would write checkpoints and logs over each other's)."""
    from dream.files import folder_lock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "dream", "train", *CLI_FLAGS, "--run-dir", str(run_dir), "--max-steps", "1"]
    with folder_lock(run_dir) as holder:
        assert holder is None
        with folder_lock(run_dir) as second:  # another open file: flock refuses it, in this process too
            assert second == f"dream, pid {os.getpid()} on {os.uname().nodename}"
        refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2
    assert refused.stderr == (f"dream train: error: --run-dir {run_dir} is in use by another process (dream, pid "
                              f"{os.getpid()} on {os.uname().nodename}); let it finish or stop it, then rerun\n")
    assert not (run_dir / "checkpoints").exists()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)  # the lock went with it
    assert done.returncode == 0, done.stderr
    new_run = tmp_path / "new"
    assert subprocess.run([*command[:-4], "--run-dir", str(new_run), "--lr", "-1"], env=env, capture_output=True,
                          timeout=600).returncode == 2
    assert not new_run.exists()  # a refused command leaves no folder behind, lock file included


def test_workers_whose_launcher_died_stop_as_on_sigterm(tmp_path):
    """torchrun killed with SIGKILL cannot stop its workers: they notice they were re-parented, save and stop
    at the end of their step, as on SIGTERM."""
    from dream.distributed import Distributed

    assert not Distributed(launcher_pid=os.getppid()).launcher_gone()
    orphan = Distributed(launcher_pid=os.getppid() + 1)
    assert orphan.launcher_gone()
    with pytest.raises(Interrupted, match=r"^the launcher \(torchrun\) is gone at step 1 \(epoch 0\); checkpoint .* "
                                          r"saved") as stop:
        Trainer(small_config(tmp_path), orphan).run()
    assert stop.value.signum == signal.SIGTERM
    assert load_checkpoint(tmp_path / "checkpoints")["step"] == 1


def test_a_job_refused_for_the_lock_deletes_nothing_of_the_job_that_holds_it(tmp_path):
    """Job B made the folder, job A locked it first: B is refused and leaves the folder and A's lock alone."""
    from dream.files import LOCK_FILE, folder_lock

    run_dir = tmp_path / "new"
    second = Trainer(small_config(run_dir, max_steps=1))  # finds no folder and makes it
    assert second.made_run_dir and run_dir.is_dir()
    with folder_lock(run_dir) as holder:
        assert holder is None
        with pytest.raises(DreamError, match=r"is in use by another process \(dream, pid"):
            second.run()
        assert (run_dir / LOCK_FILE).exists()
    assert [path.name for path in run_dir.iterdir()] == [LOCK_FILE]


SLOW_DECODING = """
import os, sys, time
from pathlib import Path
import dream.data

original = dream.data._DecodeFiles.__getitem__

def slow(self, i):
    Path(os.environ["MARKER"]).touch()
    time.sleep(0.05)
    return original(self, i)

dream.data._DecodeFiles.__getitem__ = slow
from dream.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_process_group_while_decoding_is_one_line(tmp_path, signum):
    """torchrun (and a shell's Ctrl-C) signals the whole process group, the decoding workers too: they leave
    the signal to their parent, which stops in one line (no worker tracebacks)."""
    from PIL import Image

    folder = tmp_path / "faces"
    folder.mkdir()
    for i in range(300):  # more than 256 files: decoded by worker processes
        Image.new("RGB", (20, 20), (i % 256, 50, 90)).save(folder / f"{i:03d}.png")
    (tmp_path / "wrapper.py").write_text(SLOW_DECODING)
    marker = tmp_path / "decoding"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MARKER": str(marker),
           "DREAM_CACHE": str(tmp_path / "cache")}
    process = subprocess.Popen([sys.executable, str(tmp_path / "wrapper.py"), "train", *CLI_FLAGS, "--data", "folder",
                                "--data-root", str(folder), "--run-dir", str(tmp_path / "run")],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(process.pid, signum)
    _, err = process.communicate(timeout=300)
    name = "SIGTERM" if signum == signal.SIGTERM else "interrupted"
    assert err == (f"dream train: {name}; rerun the same command to go on (checkpoints already written are "
                   f"kept)\n"), err[-3000:]
    assert process.returncode == 128 + signum


def test_a_checkpoint_file_its_save_did_not_list_is_named_when_resuming(tmp_path):
    """A kill between writing ckpt-N.pt and listing it in the manifest: the file is not trusted (it may be
    the only one of a save cut short), and the resume says that it goes on from the last listed one."""
    Trainer(small_config(tmp_path, max_steps=2)).run()
    folder = tmp_path / "checkpoints"
    (folder / "ckpt-000000003.pt").write_bytes((folder / "ckpt-000000002.pt").read_bytes())
    with pytest.warns(UserWarning, match=r"^ckpt-000000003\.pt in .* is not listed in manifest\.json \(the save was "
                                         r"stopped before it was listed\): going on from step 2$"):
        state = CheckpointManager(folder).latest()
    assert state["step"] == 2


def test_a_damaged_newest_checkpoint_whose_predecessors_are_gone_is_refused_not_started_over(tmp_path):
    """The one file left is damaged and the older ones it would fall back to are gone: not an empty folder (starting
    over would delete the damaged file at the first save, which may still be repairable), a refusal that keeps it."""
    manager = CheckpointManager(tmp_path, keep=3)
    for step in (1, 2):
        manager.save(fake_state(step), step)
    (tmp_path / "ckpt-000000001.pt").unlink()
    newest = tmp_path / "ckpt-000000002.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x10
    newest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="is damaged"), pytest.raises(DreamError, match="none was deleted"):
        manager.latest()
    assert newest.read_bytes() == bytes(data)


def test_an_fp16_resume_brings_back_its_loss_scaler_and_random_generators(tmp_path):
    """The loss scale (and its growth count) an fp16 run reached is saved and restored: a fresh scaler would start
    again at 2^16 and skip steps on overflow to find it. The saved generator states come back too."""
    import numpy as np

    first = Trainer(small_config(tmp_path, max_steps=2, precision="fp16"))
    first.run()
    reached = first.scaler.state_dict()
    assert reached != torch.amp.GradScaler("cpu").state_dict()  # not what a fresh scaler holds
    saved = load_checkpoint(tmp_path / "checkpoints")
    assert saved["scaler"] == reached
    random.seed(12345), np.random.seed(12345)  # a process that was killed and restarted has other states
    resumed = Trainer(small_config(tmp_path, max_steps=3, precision="fp16"))
    assert resumed.resume() and resumed.scaler.state_dict() == reached
    assert random.getstate()[1] == tuple(saved["rng"]["python"][1])
    assert np.array_equal(np.random.get_state()[1], saved["rng"]["numpy"]["keys"].numpy().astype(np.uint32))


# ----------------------------------------------------------------------------------------------
# fp16 skips, the counters saved between log records
@pytest.mark.parametrize("where", ["loss_alone", "grad"])
def test_an_fp16_step_with_a_non_finite_loss_or_overflow_is_skipped(tmp_path, where):
    """fp16: a non-finite loss (finite gradients or not) skips the step and counts towards divergence; an overflow
    while the loss scale is still >= 1 skips it (the scaler lowers its scale) without counting towards divergence.
    Neither moves the weights, the EMA or AdamW's step count; both are in skipped_steps."""
    trainer = Trainer(small_config(tmp_path, precision="fp16", checkpoint_every=0))
    assert trainer.scaler.is_enabled()
    inject_non_finite(trainer, {1}, where)
    batch = next(trainer.batches.epoch(0))
    trainer.train_step(batch)
    weights = [p.detach().clone() for p in trainer.model.parameters()]
    shadow, updates = [s.clone() for s in trainer.ema.shadow], trainer.ema.num_updates
    scale = trainer.scaler.get_scale()
    logs = trainer.train_step(batch)  # step 2: skipped
    assert float(logs["skipped"]) == 1
    assert all(torch.equal(a, b) for a, b in zip(weights, trainer.model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(shadow, trainer.ema.shadow)) and trainer.ema.num_updates == updates
    assert {float(state["step"]) for state in trainer.optimizer.state.values()} == {1.0}
    expected_bad = 1 if where == "loss_alone" else 0
    assert (trainer.counted_step, trainer.skipped_steps, trainer.bad_in_a_row, trainer.skipped_in_a_row) == \
        (2, 1, expected_bad, 1)
    if where == "grad":
        assert trainer.scaler.get_scale() == scale / 2
    trainer.train_step(batch)  # step 3: good, ends both streaks
    assert (trainer.skipped_steps, trainer.bad_in_a_row, trainer.skipped_in_a_row) == (1, 0, 0)


def test_a_stop_between_log_records_saves_the_counters_of_its_last_step(tmp_path, monkeypatch):
    """With --log-every past the stop, the last step's flags are still pending when the stop saves: the checkpoint
    counts them all the same (skipped_steps, bad_in_a_row)."""
    signal_at_step(monkeypatch, 2, sig=signal.SIGTERM)  # stops after step 3, mid-epoch 1, no log record there
    trainer = Trainer(small_config(tmp_path, log_every=100, checkpoint_every=0, precision="fp32"))
    inject_non_finite(trainer, {2}, "loss")
    with pytest.raises(Interrupted, match="at step 3 "):
        trainer.run()
    saved = load_checkpoint(tmp_path / "checkpoints")
    assert (saved["step"], saved["skipped_steps"], saved["bad_in_a_row"]) == (3, 1, 1)


def test_each_record_counts_the_skipped_steps_up_to_its_own(tmp_path):
    """A record's skipped_steps includes its own steps: the record of a skipped step says so in both fields."""
    trainer = Trainer(small_config(tmp_path, epochs=2, checkpoint_every=0, precision="fp32"))
    inject_non_finite(trainer, {2}, "loss")
    trainer.run()
    records = [r for r in map(eval_json, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [(r["step"], r["skipped"], r["skipped_steps"]) for r in records] == [(1, 0, 0), (2, 0, 0), (3, 1, 1),
                                                                               (4, 0, 1)]


def test_no_periodic_checkpoint_after_a_skipped_step_between_log_records(tmp_path):
    """The periodic checkpoint looks at the step just taken, not a step behind (the host reads a step's flags a
    step later): a skipped step gets none, even where no log record has counted it."""
    trainer = Trainer(small_config(tmp_path, max_steps=4, log_every=100, checkpoint_every=1, checkpoint_keep=5,
                                   precision="fp32"))
    inject_non_finite(trainer, {2}, "loss")
    trainer.run()
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("ckpt-*.pt")) == [
        "ckpt-000000001.pt", "ckpt-000000002.pt", "ckpt-000000004.pt"]
