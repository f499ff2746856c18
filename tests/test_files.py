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
