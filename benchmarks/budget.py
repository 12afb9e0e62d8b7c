"""Fitting a benchmark into a wall-clock budget (``--budget SECONDS``): steps per run and repeats.

GPU time comes in short slots, so one command must give the whole picture within a budget. Each run
costs a fixed start-up (a fresh process: imports, model, data, the reference) plus its steps; the
estimates start from the profile's priors and are replaced by what the finished runs took (the
largest seen, so a slower side never overruns the rest). Every run keeps the profile's warm-up and
at least ``min_timed`` timed steps; a run that cannot fit even that is skipped, and said so.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Budget:
    seconds: float
    warmup: int
    max_steps: int
    overhead_s: float  # prior: start-up of one run (process, imports, model, data)
    step_s: float  # prior: one optimiser step of the slowest side
    min_timed: int = 3
    reserve_s: float = 5.0  # the report at the end
    clock: Callable[[], float] = time.monotonic
    started: float = field(default=0.0)
    _seen: bool = False

    def __post_init__(self) -> None:
        self.started = self.clock()

    @property
    def min_steps(self) -> int:
        return self.warmup + self.min_timed + 1  # the summary needs a step beyond the warm-up to open the window

    def left(self) -> float:
        return self.seconds - self.reserve_s - (self.clock() - self.started)

    def repeats(self, runs: int, most: int = 3) -> int:
        """How many times every run fits at twice the minimum steps (at least 1, at most ``most``)."""
        one = runs * (self.overhead_s + 2 * self.min_steps * self.step_s)
        return max(1, min(most, int(self.left() // one)))

    def steps(self, runs_left: int) -> int | None:
        """Steps for the next run so that it and the ``runs_left - 1`` after it share what is left; None: it cannot fit."""
        share = self.left() / max(runs_left, 1)
        fit = int((share - self.overhead_s) // self.step_s)
        if self.overhead_s + self.min_steps * self.step_s > self.left():
            return None
        return max(self.min_steps, min(self.max_steps, fit))

    def record(self, wall_s: float, steps: int, step_times: list[float]) -> None:
        """Learn from a finished run: its step time (median of its timed steps) and the rest of its wall time."""
        if not step_times:
            return
        step = sorted(step_times)[len(step_times) // 2]
        overhead = max(0.0, wall_s - steps * step)
        if not self._seen:  # the first measurement replaces the priors
            self.step_s, self.overhead_s, self._seen = step, overhead, True
        else:
            self.step_s, self.overhead_s = max(self.step_s, step), max(self.overhead_s, overhead)
