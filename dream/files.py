"""Atomic file writes: the data goes to a temp file beside the target, which is then renamed over it, so
a reader, a crash or a kill sees the old file or the new one, never a part of one. And the check that a
folder can take output, made before any long work."""
from __future__ import annotations

import os
from contextlib import contextmanager, suppress
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb", durable: bool = True):
    """Yield a file open on `.<name>.tmp<pid>` beside `path`; on a clean exit it becomes `path` (with
    `durable`, its data and the rename are fsynced first); on an error it is removed and `path` is as it
    was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = True) -> None:
    with atomic_file(path, "wb", durable) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str, durable: bool = True) -> None:
    with atomic_file(path, "w", durable) as f:
        f.write(text)


def folder_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot hold output (one line), or None: it is a writable folder now (made if missing)."""
    import tempfile

    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        return f"{existing} exists and is not a folder"
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as error:
        return f"cannot write into folder {path}: {error.strerror or error}"
    return None


LOCK_FILE = ".lock"


@contextmanager
def folder_lock(folder: Path, name: str = LOCK_FILE, command: str = "dream"):
    """Hold an exclusive lock (flock) on folder/name while inside; yields None when it is taken, or, when
    another process holds it, what that process wrote there ("<its command>, pid N on HOST"). The lock goes
    with the process, however it ends; the file stays (deleting it would let two processes lock two files)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield None
        return
    path = Path(folder) / name
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            yield handle.read().strip() or "a running process"
            return
        try:
            import socket

            handle.seek(0)
            handle.truncate()
            handle.write(f"{command}, pid {os.getpid()} on {socket.gethostname()}")
            handle.flush()
            os.fsync(handle.fileno())  # (on a network filesystem, other machines read it: torchrun's other ranks)
            yield None
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
