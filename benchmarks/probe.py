"""Engine-agnostic instrumentation, installed the same way in every measured process.

Step ends come from a global optimiser-step hook; processed tokens from the input
embedding of every forward that builds a graph (the policy's), so prefopt and TRL
are counted by one rule: non-pad tokens of the chosen and rejected sequences, and
all positions of the padded batches they were in.
"""
from __future__ import annotations

import resource
import time

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Probe:
    """Records optimiser-step end times and, per policy forward, (time, non-pad tokens, positions)."""

    def __init__(self, pad_id: int, cuda: bool) -> None:
        self.pad_id = pad_id
        self.cuda = cuda
        self.step_ends: list[float] = []
        self.step_cpu: list[float] = []
        self.forwards: list[tuple[float, int, int]] = []
        self._handle = None
        self._orig_embedding_forward = None

    def install(self) -> "Probe":
        probe = self
        orig = torch.nn.Embedding.forward

        def forward(module: torch.nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled() and module.weight.requires_grad and ids.dim() == 2:
                probe.forwards.append((time.perf_counter(), int((ids != probe.pad_id).sum()), ids.numel()))
            return orig(module, ids)

        self._orig_embedding_forward = orig
        torch.nn.Embedding.forward = forward
        self._handle = register_optimizer_step_post_hook(self._on_step)
        return self

    def _on_step(self, *_: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter())
        self.step_cpu.append(time.process_time())

    def summary(self, warmup: int) -> dict:
        """Timing over the steps after ``warmup``: step times, tokens and positions in that window."""
        ends = self.step_ends
        if len(ends) < warmup + 2:
            raise RuntimeError(f"only {len(ends)} optimiser steps recorded; need more than warmup + 1 = {warmup + 1}")
        start, stop = ends[warmup], ends[-1]
        window = [f for f in self.forwards if start < f[0] <= stop]
        tokens = sum(f[1] for f in window)
        positions = sum(f[2] for f in window)
        step_times = [b - a for a, b in zip(ends[warmup:], ends[warmup + 1 :])]
        return {
            "steps": len(ends),
            "timed_steps": len(step_times),
            "seconds": stop - start,
            "cpu_seconds": self.step_cpu[-1] - self.step_cpu[warmup],
            "step_times": step_times,
            "tokens": tokens,
            "positions": positions,
            "tokens_per_s": tokens / (stop - start),
            "pad_fraction": 1 - tokens / positions if positions else 0.0,
        }
