"""The benchmark's measuring code (no timings asserted): the probe's windows on the CPU, and the GPU report."""
from __future__ import annotations

import pytest
import torch

from benchmarks import fixtures, report
from benchmarks.probe import Probe, busy_fraction
from benchmarks.scenarios import PROFILES, peak_flops


def test_busy_fraction_is_the_union_of_intervals():
    assert busy_fraction([(0, 2), (1, 3), (5, 6), (5.5, 5.6)], 10) == pytest.approx(0.4)


def test_peak_flops_by_device_name():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("Tesla T4") is None


def test_probe_counts_shapes_host_reads_and_profiles_warm_up_steps():
    model = torch.nn.Sequential(torch.nn.Embedding(16, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.AdamW(model.parameters())
    probe = Probe(pad_id=0, cuda=False, sync_steps=1, profile_steps=2).install()
    try:
        for step in range(8):
            ids = torch.randint(1, 16, (2, 4 + step % 3))
            model(ids).sum().backward()
            loss_read = model[1].bias.sum().item()  # one host read per step
            opt.step()
            opt.zero_grad()
    finally:
        probe.uninstall()
    assert isinstance(loss_read, float)
    summary = probe.summary(warmup=probe.untimed_steps_needed)
    assert summary["input_shapes"] == 3
    assert summary["host_syncs_per_step"] >= 1  # the .item() above (AdamW's step counters count too on the CPU)
    assert summary["tokens"] == sum(2 * (4 + s % 3) for s in range(4, 8))
    profiled = probe.profile_report()
    assert profiled["gpu_busy"] is None and "aten::" in profiled["top_cpu"]


def _result(tps: float, memory: float) -> dict:
    return {"ok": True, "tokens_per_s": tps, "tokens": tps * 10, "cpu_seconds": 10.0, "step_times": [0.2, 0.2], "timed_steps": 2,
            "peak_memory": memory, "rss_after_imports": 0, "pad_fraction": 0.01, "memory_kind": "cuda max_memory_allocated",
            "input_shapes": 4, "host_syncs_per_step": 1.0, "cuda_sync_warnings_per_step": 1.0, "gpu_busy": 0.9}


def test_gpu_report_has_liger_ratios_mfu_and_targets():
    profile = dict(PROFILES["gpu"])
    config = fixtures.model_config("qwen2-0.5b", 4096, 0, 1)
    results = [{"scenario": s, "side": "prefopt" if label == "prefopt" else "trl", "label": label, "settings": {}, "result": _result(tps, mem)}
               for s in ("1-live-reference", "2-cached-reference", "4-long-tail")
               for label, tps, mem in (("prefopt", 60_000.0, 20e9), ("TRL", 30_000.0, 25e9), ("TRL+Liger", 45_000.0, 22e9))]
    device = {"gpu": "NVIDIA H100 80GB HBM3", "cpu": "x", "torch": "t", "transformers": "t", "trl": "t"}
    doc = report.build("gpu", profile, config, device, results, 1.0, ["--gpu"])
    assert doc["ratios"]["1-live-reference"]["throughput"] == pytest.approx(2.0)
    assert doc["ratios_liger"]["4-long-tail"]["throughput"] == pytest.approx(60 / 45)
    mfu = doc["aggregates"]["2-cached-reference / prefopt"]["mfu"]
    assert mfu == pytest.approx(6 * doc["parameters"] * 60_000 / 989e12)
    met = {t: ok for t, _, ok in doc["targets"]}
    assert met[">= 1.5x TRL as shipped"] and met[">= 1.2x TRL with Liger"] and met["peak memory <= TRL's"]
    assert met["MFU >= 40% with a cached reference"] is False
    assert "TRL+Liger" in doc["markdown"] and doc["summary"].startswith("prefopt/TRL throughput ratio: 2.00")
