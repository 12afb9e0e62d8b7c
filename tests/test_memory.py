"""The memory estimate: parameter counts from model configs, and per-process bytes checked against what runs hold."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from dist_helpers import cpu_env, launch, torchrun
from engine_helpers import make_config, write_assets
from prefopt.cli import memory


def test_parameter_counts_of_the_documented_models():
    # published sizes: Qwen2-0.5B ties its embeddings (counted once), Llama-3.1-8B does not
    assert memory.count_parameters(memory.MODELS["Qwen2-0.5B"]) == 494_032_768
    assert memory.count_parameters(memory.MODELS["Llama-3.1-8B"]) == 8_030_261_248


def test_estimate_shards_everything_under_fsdp_and_adds_buckets_under_ddp():
    one = memory.estimate(1000)
    assert (one.weights, one.gradients, one.optimizer, one.buckets, one.reference) == (4000, 4000, 8000, 0, 4000)
    ddp = memory.estimate(1000, processes=4)
    assert ddp.buckets == 4000 and ddp.total == one.total + 4000
    fsdp = memory.estimate(1001, processes=4, sharded=True, live_reference=False)
    assert (fsdp.weights, fsdp.optimizer, fsdp.buckets, fsdp.reference) == (1001, 2002, 0, 0)


def _configs(tmp_path, **settings) -> dict[str, str]:
    assets = write_assets(tmp_path / "assets", n_train=16, n_eval=4)
    paths = {}
    for mode in ("live", "cache"):
        path = tmp_path / f"{mode}.yaml"
        path.write_text(yaml.safe_dump(make_config(assets, tmp_path / mode, batch_size=2, reference__mode=mode, **settings)))
        paths[mode] = str(path)
    return paths


def _check(result: dict, weight_bytes: int = 4) -> None:
    est = result["estimate"]
    assert result["measured"] == {k: est[k] for k in ("weights", "gradients", "optimizer", "reference")}
    assert est["weights"] == weight_bytes * result["parameters"] > 0


def test_one_process_holds_what_the_estimate_says(tmp_path):
    paths = _configs(tmp_path)
    live, cache = memory.measure_run(paths["live"]), memory.measure_run(paths["cache"])
    _check(live)
    _check(cache)
    assert live["measured"]["reference"] == live["measured"]["weights"] and cache["measured"]["reference"] == 0


def test_bf16_weights_hold_what_the_estimate_says_with_and_without_fp32_masters(tmp_path):
    pure = _configs(tmp_path / "pure", model__dtype="bf16", master_weights="none")
    live, cache = memory.measure_run(pure["live"]), memory.measure_run(pure["cache"])
    _check(live, weight_bytes=2)  # weights, gradients, AdamW moments and the live reference all in bf16
    _check(cache, weight_bytes=2)
    assert live["measured"]["reference"] == live["measured"]["weights"] and cache["measured"]["reference"] == 0
    masters = memory.measure_run(_configs(tmp_path / "masters", model__dtype="bf16")["cache"])
    _check(masters)  # read in bf16, trained as fp32 masters: the fp32 run's bytes
    assert masters["measured"]["weights"] == 2 * live["measured"]["weights"]


def test_the_table_for_bf16_weights_halves_every_state():
    n = memory.count_parameters(memory.MODELS["Qwen2-0.5B"])
    for sharded in (False, True):
        for live in (False, True):
            full = memory.estimate(n, processes=8, sharded=sharded, live_reference=live)
            half = memory.estimate(n, processes=8, sharded=sharded, live_reference=live, weight_bytes=2, reference_bytes=2)
            assert abs(2 * half.total - full.total) <= 8  # equal up to the rounding up of shards
    assert "| Qwen2-0.5B | 0.49 B | 5.5 | 4.6 | 0.6 | 0.5 |" in memory.table(8, "none")


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_two_fsdp_processes_each_hold_half_of_every_state_reference_included(tmp_path):
    paths = _configs(tmp_path)
    whole = memory.measure_run(paths["live"])["measured"]
    cmd = torchrun(2, "--measure", paths["live"])
    cmd[cmd.index("prefopt")] = "prefopt.cli.memory"
    proc = launch(cmd, cpu_env(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2"), timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in results) == [0, 1]
    for r in results:
        assert r["sharded"] and r["processes"] == 2 and r["estimate"]["buckets"] == 0
        for key in ("weights", "gradients", "optimizer", "reference"):
            # each shard is half of every tensor, rounded up to whole rows
            assert r["measured"][key] == pytest.approx(whole[key] / 2, rel=0.02), key
            assert r["measured"][key] == pytest.approx(r["estimate"][key], rel=0.02), key
