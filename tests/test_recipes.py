"""The recipes in examples/recipes/, offline: each loaded from its file through the same path as
``prefopt train``, with only the Hub names replaced by a Hub-shaped model directory and dataset
directory (what a download gives). What a CPU test must also change is set in ``CPU_ONLY``: a few
steps, a temporary output directory and reference cache. (The Qwen recipe, the README's command,
is trained end to end in test_hub.py.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from hub_assets import build_hub_assets

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "examples" / "recipes").glob("*.yaml"))
HUB_NAMES = {"model.name_or_path": ("Qwen/Qwen2.5-0.5B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"),
             "data.train": ("trl-lib/ultrafeedback_binarized",), "data.eval": ("trl-lib/ultrafeedback_binarized",)}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return build_hub_assets(tmp_path_factory.mktemp("hub"))


def names(hub) -> list[str]:
    return [f"model.name_or_path={hub['model']}", f"data.train={hub['dataset']}", f"data.eval={hub['dataset']}"]


def cpu_only(out: Path) -> list[str]:
    return ["trainer.max_steps=2", f"trainer.output_dir={out / 'run'}", f"reference.cache_dir={out / 'cache'}"]


def test_there_are_three_recipes_and_the_readme_names_each():
    readme = (ROOT / "README.md").read_text()
    assert [r.name for r in RECIPES] == ["llama-3.1-8b-fsdp-dpo.yaml", "llama-3.1-8b-lora-dpo.yaml", "qwen2.5-0.5b-dpo.yaml"]
    assert all(f"examples/recipes/{r.name}" in readme for r in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_each_recipe_is_complete_with_trls_dpo_settings(recipe, monkeypatch, tmp_path):
    from prefopt.config import load_config

    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config(recipe)
    for field, allowed in HUB_NAMES.items():
        section, key = field.split(".")
        assert getattr(getattr(config, section), key) in allowed, field
    assert config.model.dtype == "bf16" and config.trainer.precision == "bf16"
    assert config.trainer.lr == (5e-6 if config.model.lora else 5e-7)  # TRL's example: full fine-tune and LoRA
    assert (config.loss, config.data.max_length, config.trainer.warmup_ratio, config.trainer.epochs) == (
        {"name": "dpo", "beta": 0.1}, 1024, 0.1, 1.0)
    assert config.trainer.max_steps is None and config.trainer.eval_every == 50
    assert config.reference.cache_dir == str(tmp_path / ".cache" / "prefopt")  # ~ is the user's home
    assert Path(config.trainer.output_dir).parent == recipe.parent / "runs"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_each_recipe_validates_on_the_downloaded_model_and_dataset(recipe, hub, tmp_path, capsys):
    from prefopt.cli import commands as cli

    args = [x for item in names(hub) + cpu_only(tmp_path) for x in ("--set", item)]
    assert cli.main(["validate", str(recipe), *args]) == 0, capsys.readouterr().err
    assert f"{recipe}: valid" in capsys.readouterr().out


@pytest.mark.slow
def test_the_lora_recipe_trains_an_adapter_on_a_bf16_base(hub, tmp_path):
    from prefopt.config import load_config
    from prefopt.training.trainer import train

    torch.set_num_threads(1)
    config = load_config(ROOT / "examples" / "recipes" / "llama-3.1-8b-lora-dpo.yaml", names(hub) + cpu_only(tmp_path))
    summary = train(config)
    assert summary["steps"] == 2 and summary["reference"] == "cache" and summary["after"]["eval/rewards/margins"] != 0
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"]) == (32, 16)


def test_the_fsdp_recipe_names_an_eight_gpu_fsdp2_accelerate_config():
    recipe = ROOT / "examples" / "recipes" / "llama-3.1-8b-fsdp-dpo.yaml"
    command = next(line for line in recipe.read_text().splitlines() if "accelerate launch" in line)
    accelerate = yaml.safe_load((ROOT / command.split("--config_file ")[1].split()[0]).read_text())
    assert (accelerate["distributed_type"], accelerate["num_machines"], accelerate["num_processes"]) == ("FSDP", 1, 8)
    assert accelerate["fsdp_config"]["fsdp_version"] == 2 and command.endswith(f"prefopt train examples/recipes/{recipe.name}")


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_the_fsdp_recipe_trains_sharded_over_two_cpu_processes(hub, tmp_path):
    from dist_helpers import cpu_env, launch, torchrun

    recipe = ROOT / "examples" / "recipes" / "llama-3.1-8b-fsdp-dpo.yaml"
    cmd = torchrun(2, "train", str(recipe), *[x for item in names(hub) + cpu_only(tmp_path) for x in ("--set", item)])
    proc = launch(cmd, cpu_env(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2"), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 processes (FSDP2 on cpu)" in proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["after"]["eval/rewards/margins"] != 0
