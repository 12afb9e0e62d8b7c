"""Atomic file writes and checksums: a crash leaves the old file or the new one, never half of one."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def crash_point(name: str) -> None:
    """Test hook: with ``PREFOPT_CRASH_AT=name`` the process SIGKILLs itself here, to test what a kill leaves."""
    if os.environ.get("PREFOPT_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)``, fsync it, and rename it over ``path``.

    The temporary ``.NAME.*.tmp`` is ``flock``-ed while written, so :func:`remove_stale_temporaries`
    can tell one left by a killed writer from one being written by a live process."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        write(Path(tmp))
        crash_point("atomic_write:written")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        os.close(fd)
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temporaries(folder: str | Path, pattern: str = ".*.tmp") -> list[Path]:
    """Remove the temporaries of :func:`atomic_write` in ``folder`` whose writer is gone (no live ``flock``)."""
    removed = []
    for tmp in Path(folder).glob(pattern) if Path(folder).is_dir() else ():
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live writer
        finally:
            os.close(fd)  # closing drops our lock
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def disk_full(exc: BaseException) -> bool:
    """A write that failed for lack of space, whichever layer raised it (an OSError, safetensors' Rust error, or
    torch's C++ writer, whose error carries the Python ``OSError`` as its context)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC or "(os error 28)" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def no_space_error(exc: BaseException, what: str, folder: str | Path, need: int) -> Exception:
    """For a full disk, the documented message with the space ``need``-ed (bytes); otherwise ``exc`` itself."""
    if not disk_full(exc):
        return exc
    from prefopt.errors import NoSpaceError

    free = shutil.disk_usage(folder).free
    return NoSpaceError(
        f"{what}: no space left on the device holding {folder}; it needs about {need / 2**20:.1f} MiB and "
        f"{free / 2**20:.1f} MiB are free. The partial files were removed, earlier ones are intact; free some space and run "
        f"again (with --resume for a run that has checkpoints)"
    )
