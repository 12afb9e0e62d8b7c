"""Launchers: what each one starts, and the launches prefopt refuses instead of training wrongly."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import yaml

from dist_helpers import ROOT, cpu_env, free_port, launch
from engine_helpers import make_config, read_metrics, write_assets
from prefopt.errors import ConfigError
from prefopt.training import distributed

_LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU",
                "PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE",
                "ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING", "ACCELERATE_USE_DEEPSPEED")


@pytest.fixture
def env(monkeypatch):
    for key in _LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def _gpus(monkeypatch, n: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_alone_is_one_main_process_on_any_device(env):
    _gpus(env, 1)
    distributed.check_launch()
    assert distributed.world_size() == 1 and distributed.is_main_process()
    assert distributed.accelerator_options() == {"cpu": False, "step_scheduler_with_optimizer": False}


def test_rank_decides_the_main_process(env):
    env.setenv("WORLD_SIZE", "4")
    env.setenv("RANK", "2")
    env.setenv("LOCAL_RANK", "0")  # first process of the second machine: not the one that prints
    assert not distributed.is_main_process()
    env.setenv("RANK", "0")
    assert distributed.is_main_process()


def test_more_processes_than_cuda_devices_is_refused(env):
    _gpus(env, 1)
    env.setenv("WORLD_SIZE", "2")
    env.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"2 processes on this machine but 1 CUDA device.*at most 1.*CUDA_VISIBLE_DEVICES"):
        distributed.check_launch()
    env.setenv("ACCELERATE_USE_CPU", "True")  # asked for the CPU: gloo, no devices needed
    distributed.check_launch()
    assert distributed.accelerator_options()["cpu"] is True


def test_several_processes_without_cuda_train_together_on_cpu(env):
    _gpus(env, 0)
    env.setenv("WORLD_SIZE", "2")
    env.setenv("LOCAL_WORLD_SIZE", "2")
    distributed.check_launch()
    assert distributed.accelerator_options()["cpu"] is True


def test_accelerate_cpu_launch_that_started_one_process_is_refused(env):
    # what `accelerate launch --cpu --num_processes 2` gives its only process
    env.setenv("ACCELERATE_USE_CPU", "True")
    env.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(ConfigError, match="started only this one.*torchrun --nproc_per_node"):
        distributed.check_launch()
    env.delenv("MASTER_ADDR")  # `accelerate launch --cpu` with one process
    distributed.check_launch()


def _accelerate(*args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()), *args]


@pytest.mark.slow
def test_accelerate_launch_cpu_with_several_processes_refuses_clearly(tmp_path):
    assets = write_assets(tmp_path / "assets", n_train=16, n_eval=4)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(make_config(assets, tmp_path / "out", batch_size=2, max_steps=1)))
    proc = launch(_accelerate("--cpu", "--num_processes", "2", "-m", "prefopt", "train", str(config)), cpu_env(), timeout=120)
    assert proc.returncode != 0
    assert "error: accelerate launch --cpu with several processes started only this one" in proc.stderr
    assert not (tmp_path / "out" / "run" / "metrics.jsonl").exists()  # refused before training


@pytest.mark.slow
def test_accelerate_launch_with_the_ddp_config_on_cpu_trains_two_processes_together(tmp_path):
    assets = write_assets(tmp_path / "assets", n_train=16, n_eval=4)
    raw = make_config(assets, tmp_path / "out", batch_size=2, max_steps=2, group_by_length=False, data__eval=assets["eval"])
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    # the shipped DDP config, with as many processes as this test can afford; no CUDA device is visible
    ddp = str(ROOT / "examples" / "accelerate" / "ddp.yaml")
    proc = launch(_accelerate("--config_file", ddp, "--num_processes", "2", "-m", "prefopt", "train", str(config)), cpu_env(), timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.count("[prefopt] 2 processes (MULTI_CPU on cpu)") == 1
    assert proc.stdout.count("held-out pairs") == 1 and proc.stdout.count("saved to") == 1, proc.stdout
    rows = read_metrics(raw["trainer"]["output_dir"])
    assert [r["step"] for r in rows] == [1, 2]  # one writer


def test_fsdp_options_prefopt_cannot_honour_are_refused(env):
    env.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file fsdp.yaml` sets
    env.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="fsdp_version 1 .* FSDP2 only"):
        distributed.check_launch()  # accelerate's default version
    env.setenv("FSDP_VERSION", "2")
    distributed.check_launch()
    env.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(ConfigError, match="fsdp_offload_params .* not supported"):
        distributed.check_launch()
    env.setenv("FSDP_OFFLOAD_PARAMS", "false")
    env.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    with pytest.raises(ConfigError, match="trainer.gradient_checkpointing"):
        distributed.check_launch()


def test_deepspeed_is_refused_with_what_to_use_instead(env):
    """Its clipping returns no norm and its optimiser state is partitioned: checkpoints and resume would lie."""
    env.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets for a DeepSpeed config
    with pytest.raises(ConfigError, match=r"DeepSpeed .* not supported; FSDP shards the same states as ZeRO-3: use distributed_type: FSDP with fsdp_version: 2"):
        distributed.check_launch()
    env.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    distributed.check_launch()


def test_forwards_outside_training_cover_every_pair_once_within_the_budget():
    from prefopt.data.batching import forward_plans

    # 9 pairs over 2 processes, 2 per batch: 5 and 4 pairs, 3 forwards and 2 (matched: a filler)
    assert forward_plans([0] * 9, 2, None, 2) == [[[0, 2], [4, 6], [8]], [[1, 3], [5, 7]]]
    assert forward_plans([0] * 9, 2, None, 2, matched=True) == [[[0, 2], [4, 6], [8]], [[1, 3], [5, 7], None]]
    sizes = [10, 50, 30, 20, 40, 10, 30, 60, 5]
    plans = forward_plans(sizes, 4, 45, 2)
    assert sorted(i for plan in plans for f in plan for i in f) == list(range(9))
    for rank, plan in enumerate(plans):
        assert all(i % 2 == rank for f in plan for i in f)
        assert all(sum(sizes[i] for i in f) <= 45 or len(f) == 1 for f in plan)
    assert plans == [[[0, 2], [4], [6], [8]], [[1], [3, 5], [7]]]  # unequal counts: FSDP pads with filler forwards


def test_accelerate_builds_its_state_without_fsdp_and_leaves_loading_to_prefopt(env):
    env.setenv("ACCELERATE_USE_FSDP", "true")
    env.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")  # accelerate's default for an FSDP config
    with distributed.accelerate_without_fsdp():
        assert "ACCELERATE_USE_FSDP" not in os.environ  # accelerate would fall back to DDP on CPU
    assert os.environ["ACCELERATE_USE_FSDP"] == "true" and distributed.fsdp_requested()
    assert os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"  # prefopt loads on the first process itself


def test_fsdp_refuses_fp16(env):
    from types import SimpleNamespace

    env.setenv("ACCELERATE_USE_FSDP", "true")
    trainer = SimpleNamespace(max_tokens_per_forward=None, precision="fp16", batch_size=2)
    run = SimpleNamespace(accelerator=SimpleNamespace(num_processes=2), config=SimpleNamespace(trainer=trainer), eval_pairs=[])
    with pytest.raises(ConfigError, match="fp16 is not supported"):
        distributed.prepare(run, torch.optim.AdamW)
