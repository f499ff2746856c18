"""Atomic writes (dream/files.py): the target holds the old data or the new, and no temp file is left."""
import fcntl
import os
import socket
import stat
from pathlib import Path

import pytest

from dream.files import LOCK_FILE, atomic_file, atomic_write_bytes, atomic_write_text, folder_lock, folder_problem


def test_atomic_write_replaces_the_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    atomic_write_text(target, "new")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01", durable=False)
    assert target.read_text() == "new" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temp_file(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="half way"), atomic_file(target, "w") as f:
        f.write("partial")
        raise RuntimeError("half way")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


@pytest.mark.parametrize("case", ["target_is_a_folder", "parent_is_a_file"])
def test_a_target_that_cannot_be_written_raises_oserror_and_leaves_nothing(tmp_path, case):
    if case == "target_is_a_folder":
        target = tmp_path / "x.safetensors"
        target.mkdir()
    else:
        (tmp_path / "file").write_text("x")
        target = tmp_path / "file" / "x.safetensors"
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"data")
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_a_durable_write_fsyncs_the_data_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """A power cut must find the old file or the whole new one: the temp file's data is on disk (flushed from
    Python's buffer, then fsynced) before the rename, and the rename itself is made durable by an fsync of
    the folder after it."""
    events = []
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(fd):
        info = os.fstat(fd)
        events.append(("fsync folder", info.st_ino) if stat.S_ISDIR(info.st_mode) else ("fsync file", info.st_size))
        fsync(fd)

    def recorded_replace(source, target):
        events.append(("rename", os.path.basename(target)))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    atomic_write_bytes(tmp_path / "a.bin", b"x" * 1000)
    assert events == [("fsync file", 1000), ("rename", "a.bin"), ("fsync folder", tmp_path.stat().st_ino)]
    events.clear()
    atomic_write_text(tmp_path / "b.txt", "new", durable=False)  # (scratch output: no fsync asked for)
    assert events == [("rename", "b.txt")]


def test_the_lock_file_names_its_current_holder_alone(tmp_path):
    """The lock file outlives its holders (see folder_lock): each new holder replaces the line, which is what a
    refused job prints, rather than appending to its predecessors' ("a+" writes at the end)."""
    with folder_lock(tmp_path, command="dream train") as holder:
        assert holder is None
    with folder_lock(tmp_path, command="dream sample") as holder:
        assert holder is None
        with folder_lock(tmp_path) as refused:
            assert refused == f"dream sample, pid {os.getpid()} on {socket.gethostname()}"


def test_the_holders_line_is_on_disk_while_it_holds_the_lock(tmp_path, monkeypatch):
    """Other machines read the line (torchrun's other ranks check that they see rank 0's folder): it is fsynced
    once written, not left in this machine's cache until the lock goes."""
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))  # (Linux) the file behind the descriptor
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with folder_lock(tmp_path, command="dream sample") as holder:
        assert holder is None and (tmp_path / LOCK_FILE).read_text().startswith("dream sample, pid ")
        assert synced == [str((tmp_path / LOCK_FILE).resolve())]


def test_an_interrupt_during_the_write_keeps_the_old_file_and_removes_the_temp_file(tmp_path):
    """Ctrl-C (KeyboardInterrupt, not an Exception) mid-write cleans up like an error."""
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_file(target, "w") as f:
        f.write("partial")
        raise KeyboardInterrupt
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_the_temp_file_sits_beside_the_target_and_is_named_after_the_writing_process(tmp_path):
    """Beside the target, so that the rename stays within one file system; with this process's id in its name,
    so that two processes writing the same target do not write into one temp file."""
    target = tmp_path / "a.json"
    with atomic_file(target, "w") as f:
        assert Path(f.name) == tmp_path / f".a.json.tmp{os.getpid()}"
        assert not target.exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_a_durable_write_leaves_no_descriptor_open(tmp_path):
    before = len(os.listdir("/proc/self/fd"))
    for i in range(5):
        atomic_write_bytes(tmp_path / f"{i}.bin", b"data")
    assert len(os.listdir("/proc/self/fd")) == before


def test_folder_problem_makes_missing_folders_and_names_a_file_in_the_way(tmp_path):
    nested = tmp_path / "a" / "b" / "c"
    assert folder_problem(nested) is None and nested.is_dir()
    assert folder_problem(nested) is None  # an existing writable folder
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert folder_problem(blocker) == f"{blocker} exists and is not a folder"
    assert folder_problem(blocker / "sub") == f"{blocker} exists and is not a folder"


def test_a_lock_held_by_a_holder_that_wrote_nothing_is_still_refused(tmp_path):
    """A holder killed between taking the lock and writing its line leaves an empty file; the lock still counts."""
    with open(tmp_path / LOCK_FILE, "a+") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with folder_lock(tmp_path) as refused:
            assert refused == "a running process"
    with folder_lock(tmp_path) as holder:
        assert holder is None


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_a_folder_that_refuses_fsync_is_no_error_and_leaks_no_descriptor(tmp_path, monkeypatch):
    """Some file systems refuse fsync on a folder (EINVAL): the write still lands, and the folder's descriptor is
    closed all the same (a long run writes a checkpoint and a manifest at every save: a leak would run out of them)."""
    import errno

    fsync = os.fsync

    def refused_for_folders(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", refused_for_folders)
    before = len(os.listdir("/proc/self/fd"))
    for i in range(5):
        atomic_write_bytes(tmp_path / f"{i}.bin", b"data")
    assert len(os.listdir("/proc/self/fd")) == before
    assert [(tmp_path / f"{i}.bin").read_bytes() for i in range(5)] == [b"data"] * 5
