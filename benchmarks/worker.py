"""Entry point of one measured run: ``python -m benchmarks.worker SPEC.json RESULT.json``.

Each run has a process of its own, so peak RSS and CUDA peak memory are per run.
"""
from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks.probe import Probe, peak_rss_bytes, rss_bytes


def _measure_training(spec: dict) -> dict:
    if spec["side"] == "trl":
        from benchmarks import trl_side as side
    else:
        from benchmarks import prefopt_side as side
    side.preload()
    cuda = spec["device"] == "cuda"
    base_rss = rss_bytes()  # after importing torch, transformers and the side's library
    profile_steps = spec.get("profile_steps", 0) if (cuda or spec.get("profile_dir")) else 0
    probe = Probe(spec["pad_id"], cuda, spec.get("sync_steps", 1), profile_steps)
    if spec["warmup"] < probe.untimed_steps_needed:
        raise ValueError(f"warm-up of {spec['warmup']} steps is shorter than the measurement windows ({probe.untimed_steps_needed})")
    probe.install()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    side.run(spec)
    result = {"wall_s": time.perf_counter() - t0, "rss_after_imports": base_rss}
    result.update(probe.summary(spec["warmup"]))
    result.update(_profile(probe, spec))
    accel = sys.modules.get("prefopt.engine.accelerators")
    if spec["side"] == "prefopt" and accel is not None and accel.COMPILES:
        result["compilations"] = dict(accel.COMPILES)  # with trainer.compile: graphs compiled, recompiles
    if cuda:
        result["peak_memory"] = torch.cuda.max_memory_allocated()
        result["memory_kind"] = "cuda max_memory_allocated"
    else:
        result["peak_memory"] = peak_rss_bytes()
        result["memory_kind"] = "peak RSS"
    return result


def _profile(probe: Probe, spec: dict) -> dict:
    """The GPU-busy share; with ``--profile``, the top-operator tables written beside the results."""
    report = probe.profile_report()
    tables = {k: report.pop(k) for k in ("top_cpu", "top_cuda") if k in report}
    if spec.get("profile_dir") and tables:
        out = Path(spec["profile_dir"])
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{spec['scenario']}-{spec['label']}".replace("/", "-").replace("+", "-")
        report["profile_files"] = []
        for k, table in tables.items():
            path = out / f"{stem}-{k.removeprefix('top_')}.txt"
            head = f"{spec['label']}, scenario {spec['scenario']}: torch.profiler over {report.get('profiled_steps')} optimiser steps\n"
            path.write_text(head + table)
            report["profile_files"].append(str(path))
    return report


def main(argv: list[str]) -> int:
    spec_path, out_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    try:
        if spec["side"] == "logits":
            from benchmarks.vocab_memory import run

            result = run(spec)
        else:
            result = _measure_training(spec)
        result["ok"] = True
    except Exception as exc:  # the parent reports it and goes on with the other runs
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
