"""Turning Ctrl-C and SIGTERM into a request to stop at the end of the step."""
from __future__ import annotations

import logging
import signal
from typing import Any

log = logging.getLogger("prefopt")


class GracefulStop:
    """Within the block, SIGINT and SIGTERM set ``signal`` instead of stopping; a second one stops at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "GracefulStop":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("interrupt received: finishing this step, writing a checkpoint, then stopping")

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
