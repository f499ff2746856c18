"""Atomic writes (dream/files.py): the target holds the old data or the new, and no temp file is left."""
import pytest

from dream.files import atomic_file, atomic_write_bytes, atomic_write_text


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
    import os
    import stat

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
    import os
    import socket

    from dream.files import folder_lock

    with folder_lock(tmp_path, command="dream train") as holder:
        assert holder is None
    with folder_lock(tmp_path, command="dream sample") as holder:
        assert holder is None
        with folder_lock(tmp_path) as refused:
            assert refused == f"dream sample, pid {os.getpid()} on {socket.gethostname()}"
