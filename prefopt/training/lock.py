"""An exclusive lock on an output directory, held by the process that trains into it.

The lock is an ``flock`` on the directory itself (its inode, so the same whatever path,
symlink or bind mount leads to it, and nothing a user can delete by hand), taken after
resolving the path. The kernel releases it when the process ends, however it ends
(``kill -9`` included). Who holds it (process id, host, command line) is written to a
small file keyed by the directory's ``st_dev``/``st_ino`` in a per-machine lock folder
(``PREFOPT_LOCK_DIR``, default ``$TMPDIR/prefopt-locks``), for the message a second run gets;
nothing is written beside or into the directory for the lock.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import sys
import tempfile
from pathlib import Path

from prefopt.errors import ConfigError

_HELD: dict[str, "DirectoryLock"] = {}  # real path -> this process's lock on it


def lock_folder() -> Path:
    """Where holder notes are kept (one small file per locked directory)."""
    return Path(os.environ.get("PREFOPT_LOCK_DIR") or Path(tempfile.gettempdir()) / "prefopt-locks")


def holder_file(st: os.stat_result) -> Path:
    return lock_folder() / f"{st.st_dev}-{st.st_ino}.holder"


def make_directory(path: Path, what: str) -> None:
    """``mkdir -p`` with a clear message for a read-only parent, a name too long, or a file in the way."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{what}: {path} cannot be created: {describe_os_error(exc)}") from None


def describe_os_error(exc: OSError) -> str:
    """One line for the errors a path can meet, naming the limit or the cause."""
    if exc.errno == errno.ENAMETOOLONG:
        path = os.fsencode(str(exc.filename or ""))
        if len(path) >= 4096 and all(len(part) <= 255 for part in path.split(b"/")):
            return f"the path ({len(path)} bytes) is longer than the system allows (PATH_MAX, usually 4096 bytes)"
        return "a name in it is longer than the filesystem allows (NAME_MAX, usually 255 bytes)"
    if exc.errno == errno.EROFS:
        return f"{exc.filename or 'its parent'} is on a read-only filesystem"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied on {exc.filename or 'its parent'}"
    return f"{exc.strerror or exc} ({exc.filename})" if exc.filename else str(exc.strerror or exc)


class DirectoryLock:
    """``with DirectoryLock(dir):`` holds ``dir`` for this process; a second holder is refused, naming this one.

    The directory is created if missing (and removed again on release if still empty)."""

    def __init__(self, directory: str | Path, what: str = "trainer.output_dir") -> None:
        self.directory = Path(directory)
        self.what = what
        self._fd: int | None = None
        self.created = False
        self.real = Path(os.path.realpath(self.directory))

    def acquire(self) -> None:
        self.created = not self.real.exists()
        make_directory(self.real, self.what)
        self._lock(self.real)
        _HELD[str(self.real)] = self

    def _lock(self, real: Path) -> None:
        fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"{self.what}: {self.directory} is in use by {_holder(real)}; wait for it to finish or stop it "
                f"(a second run, --resume or --overwrite on a directory in use is refused)"
            ) from None
        if self._fd is not None:
            os.close(self._fd)  # the directory moved aside by --overwrite: the new one is held now
        self._fd = fd
        _write_holder(os.fstat(fd))

    def relock(self) -> None:
        """Hold the directory now at the path (after ``--overwrite`` moved the old one aside)."""
        if self._fd is not None and os.path.samestat(os.fstat(self._fd), os.stat(self.real)):
            return
        self._lock(self.real)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            _HELD.pop(str(self.real), None)
            if self.created:
                try:
                    self.real.rmdir()  # created by acquire, and nothing written since (a run refused at start)
                except OSError:
                    pass

    def __enter__(self) -> "DirectoryLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def relock(directory: str | Path) -> None:
    """If this process holds a lock on ``directory``'s path, move it to the directory now there."""
    held = _HELD.get(os.path.realpath(directory))
    if held is not None:
        held.relock()


def _write_holder(st: os.stat_result) -> None:
    command = " ".join(sys.argv)[:300]
    note = f"process {os.getpid()} on {socket.gethostname()} ({command})\n"
    try:
        lock_folder().mkdir(parents=True, exist_ok=True)
        path = holder_file(st)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        # a new file, never through a link: the lock folder may be shared, and a planted link would aim the write elsewhere
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(note)
        os.replace(tmp, path)
    except OSError:
        pass  # only the message a second run gets is poorer


def _holder(real: Path) -> str:
    try:  # a regular file only, a bounded read: a FIFO or a link to /dev/zero must not hang the refusal
        fd = os.open(holder_file(os.stat(real)), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return "another process"
            return f.read(1000).decode("utf-8", "replace").strip() or "another process"
    except OSError:
        return "another process"
