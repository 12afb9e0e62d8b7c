"""An exclusive lock on an output directory, held by the process that trains into it.

The lock is an ``flock`` on a small file beside the directory (``.NAME.lock``), so it
survives the directory being moved aside and is released by the kernel when the
process ends, however it ends (``kill -9`` included). The file records the holder's
process id and command line, for the message a second run gets.
"""
from __future__ import annotations

import fcntl
import os
import socket
import sys
from pathlib import Path

from prefopt.errors import ConfigError


def lock_path(directory: str | Path) -> Path:
    """The lock file of ``directory``."""
    d = Path(directory).resolve()
    return d.parent / f".{d.name}.lock"


class DirectoryLock:
    """``with DirectoryLock(dir):`` holds ``dir`` for this process; a second holder is refused, naming this one."""

    def __init__(self, directory: str | Path, what: str = "trainer.output_dir") -> None:
        self.directory = Path(directory)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        path = lock_path(self.directory)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(
                f"{self.what}: {self.directory} is in use by {holder}; wait for it to finish or stop it "
                f"(a second run, --resume or --overwrite on a directory in use is refused)"
            ) from None
        os.ftruncate(fd, 0)
        command = " ".join(sys.argv)[:300]
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} ({command})\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "DirectoryLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
