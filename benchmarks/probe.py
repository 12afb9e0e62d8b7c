"""Engine-agnostic instrumentation, installed the same way in every measured process.

Step ends come from a global optimiser-step hook; computed tokens from the input
embedding of every forward that builds a graph (the policy's): non-pad tokens, and
all positions of the batches they were in. Throughput counts *pair tokens*, the same
rule for every engine: the tokens of the trained pairs with the prompt counted once per
completion (what TRL and unshared prefopt compute); an engine that computes a shared
prompt once reports them with :meth:`Probe.note_pair_tokens`, the others are counted at
the embedding. The same hook records the distinct ``input_ids`` shapes of every forward.

Two short windows inside the untimed warm-up steps measure what would disturb the
timing: host syncs per step (a dispatch mode, see :class:`SyncCounter`) and, where
asked (always on CUDA), ``torch.profiler`` for the GPU-busy share and the top
operators. Window transitions happen before a step's end is recorded, so their
cost falls into untimed steps.
"""
from __future__ import annotations

import resource
import time
import warnings
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from prefopt.engine.syncs import SyncCounter

CURRENT: "Probe | None" = None  # the probe of this process, for an engine to report pair tokens to


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def busy_fraction(intervals: list[tuple[float, float]], wall: float) -> float:
    """Share of ``wall`` covered by the union of ``(start, end)`` intervals (same unit)."""
    covered, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            covered += e - max(s, end)
            end = e
    return covered / wall if wall > 0 else 0.0


class Probe:
    """Records optimiser-step end times and, per policy forward, (time, non-pad tokens, positions).

    ``sync_steps``: steps 2 to ``1 + sync_steps`` run under :class:`SyncCounter`;
    ``profile_steps``: the steps after them run under ``torch.profiler`` (0: none).
    """

    def __init__(self, pad_id: int, cuda: bool, sync_steps: int = 1, profile_steps: int = 0) -> None:
        self.pad_id = pad_id
        self.cuda = cuda
        self.step_ends: list[float] = []
        self.step_cpu: list[float] = []
        self.forwards: list[tuple[float, torch.Tensor, int]] = []
        self.pair_tokens: list[tuple[float, int]] = []
        self.shapes: set[tuple[int, ...]] = set()
        self.sync_window = (1, 1 + sync_steps)  # (starts after step, ends after step)
        self.profile_window = (1 + sync_steps, 1 + sync_steps + profile_steps) if profile_steps else None
        self.reads: SyncCounter | None = None
        self.sync_warnings: int | None = None
        self.profiler: Any = None
        self.profile_wall: float = 0.0
        self._caught: Any = None
        self._warned: list = []
        self._handle = None
        self._orig_embedding_forward = None

    @property
    def untimed_steps_needed(self) -> int:
        """The warm-up (untimed steps before the timed window) the windows need."""
        return (self.profile_window or self.sync_window)[1] - 1

    def note_pair_tokens(self, n: int) -> None:
        """The pair tokens of the forwards about to run (an engine that does not compute them all)."""
        self.pair_tokens.append((time.perf_counter(), n))

    def install(self) -> "Probe":
        global CURRENT
        CURRENT = probe = self
        orig = torch.nn.Embedding.forward

        def forward(module: torch.nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
            if ids.dim() == 2:
                probe.shapes.add(tuple(ids.shape))
                if torch.is_grad_enabled() and module.weight.requires_grad:
                    # kept on the device (read after training), so counting adds no host sync
                    probe.forwards.append((time.perf_counter(), (ids != probe.pad_id).sum(), ids.numel()))
            return orig(module, ids)

        self._orig_embedding_forward = orig
        torch.nn.Embedding.forward = forward
        self._handle = register_optimizer_step_post_hook(self._on_step)
        return self

    def uninstall(self) -> None:
        """Undo :meth:`install` (the worker's process ends instead; tests call this)."""
        if self._handle is not None:
            self._handle.remove()
            torch.nn.Embedding.forward = self._orig_embedding_forward  # type: ignore[method-assign]
            self._handle = None

    def _on_step(self, *_: object) -> None:
        if self.cuda:
            debug = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)  # the probe's own synchronise is not the engine's
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode(debug)
        self._windows(len(self.step_ends) + 1)
        self.step_ends.append(time.perf_counter())
        self.step_cpu.append(time.process_time())

    def _windows(self, done: int) -> None:
        """Open and close the measurement windows after step ``done`` (1-based)."""
        if done == self.sync_window[1] and self.reads is not None:
            self.reads.__exit__(None, None, None)
            if self.cuda:
                torch.cuda.set_sync_debug_mode(0)
                self._caught.__exit__(None, None, None)
                self.sync_warnings = sum("synchroniz" in str(w.message) for w in self._warned)
        if done == self.sync_window[0]:
            if self.cuda:  # CUDA's own count, beside the dispatch-mode one
                self._caught = warnings.catch_warnings(record=True)
                self._warned = self._caught.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode(1)
            self.reads = SyncCounter(device_only=self.cuda).__enter__()
        if self.profile_window and done == self.profile_window[1] and self.profiler is not None:
            self.profile_wall += time.perf_counter()
            self.profiler.stop()
        if self.profile_window and done == self.profile_window[0]:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.profiler = profile(activities=acts)
            self.profiler.start()
            self.profile_wall = -time.perf_counter()

    def profile_report(self, rows: int = 30) -> dict:
        """GPU-busy share of the profiled steps (None without CUDA kernels) and top-operator tables."""
        if self.profiler is None:
            return {"gpu_busy": None}
        events = self.profiler.events()
        kernels = [(e.time_range.start, e.time_range.end) for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        averages = self.profiler.key_averages()
        out = {
            "gpu_busy": busy_fraction(kernels, self.profile_wall * 1e6) if kernels else None,
            "profiled_steps": self.profile_window[1] - self.profile_window[0],
            "profiled_wall_s": self.profile_wall,
            "kernel_s": sum(e - s for s, e in kernels) / 1e6,
            "top_cpu": averages.table(sort_by="self_cpu_time_total", row_limit=rows),
            "top_ops": _top_ops(averages, self.cuda),
        }
        if self.cuda:
            out["top_cuda"] = averages.table(sort_by="self_device_time_total", row_limit=rows)
        return out

    def summary(self, warmup: int) -> dict:
        """Timing over the steps after ``warmup``: step times, tokens and positions in that window."""
        ends = self.step_ends
        if len(ends) < warmup + 2:
            raise RuntimeError(f"only {len(ends)} optimiser steps recorded; need more than warmup + 1 = {warmup + 1}")
        start, stop = ends[warmup], ends[-1]
        window = [f for f in self.forwards if start < f[0] <= stop]
        tokens = int(sum(int(f[1]) for f in window))
        positions = sum(f[2] for f in window)
        noted = [n for t, n in self.pair_tokens if start < t <= stop]
        pair_tokens = sum(noted) if self.pair_tokens else tokens
        step_times = [b - a for a, b in zip(ends[warmup:], ends[warmup + 1 :])]
        sync_steps = self.sync_window[1] - self.sync_window[0]
        return {
            "steps": len(ends),
            "timed_steps": len(step_times),
            "seconds": stop - start,
            "cpu_seconds": self.step_cpu[-1] - self.step_cpu[warmup],
            "step_times": step_times,
            "tokens": tokens,
            "positions": positions,
            "tokens_per_s": pair_tokens / (stop - start),  # pair tokens (see the module's docstring)
            "pair_tokens": pair_tokens,
            "computed_tokens": tokens,
            "pad_fraction": 1 - tokens / positions if positions else 0.0,
            "input_shapes": len(self.shapes),
            # tensors made from Python data (batch building, on a GPU copied pinned and non-blocking) are not counted
            "host_syncs_per_step": sum(v for k, v in self.reads.ops.items() if k != "from_python") / sync_steps if self.reads else None,
            "host_sync_ops": dict(self.reads.ops) if self.reads else {},
            "aten_ops_per_step": self.reads.calls / sync_steps if self.reads else None,
            "cuda_sync_warnings_per_step": self.sync_warnings / sync_steps if self.sync_warnings is not None else None,
        }


def _top_ops(averages: Any, cuda: bool, n: int = 5) -> list[tuple[str, float]]:
    """The ``n`` aten operators with the most self time (CUDA time on a GPU), as (name, ms over the profiled steps)."""
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    ops = sorted((e for e in averages if e.key.startswith("aten::")), key=lambda e: -getattr(e, key))
    return [(e.key, getattr(e, key) / 1e3) for e in ops[:n]]
