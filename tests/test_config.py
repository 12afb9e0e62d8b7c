"""The run config: validation names every bad field by its path; YAML and --set overrides."""
from __future__ import annotations

import pytest

from prefopt.config import apply_overrides, load_config, parse_yaml, validate
from prefopt.errors import ConfigError
from prefopt.losses import DPO, WeightedLoss

pytestmark = pytest.mark.usefixtures("builtins_only")


def _minimal(**extra) -> dict:
    return {"model": {"name_or_path": "some/model"}, "data": {"train": "pairs.jsonl"}, **extra}


def test_minimal_config_defaults():
    config = validate(_minimal())
    assert config.loss == {"name": "dpo"}
    assert config.reference.mode == "auto"
    assert config.trainer.lr == 5e-7 and config.data.max_length == 512
    loss = config.build_loss()
    assert isinstance(loss, DPO) and loss.config.beta == 0.1


def test_every_bad_field_is_named_by_path():
    raw = _minimal(
        data={"train": "pairs.jsonl", "max_length": 1, "on_error": "ignore"},
        trainer={"lr": -1, "batch_size": 0, "precision": "fp8"},
        reference={"mode": "sometimes"},
        loss={"name": "dpo", "beta": -1, "bta": 0.1},
    )
    with pytest.raises(ConfigError) as err:
        validate(raw, "run.yaml")
    lines = str(err.value).splitlines()
    assert lines[0] == "run.yaml: invalid config:"
    for path in (
        "data.max_length",
        "data.on_error",
        "trainer.lr",
        "trainer.batch_size",
        "trainer.precision",
        "reference.mode",
        "loss.beta",
        "loss.bta",
    ):
        assert any(line.strip().startswith(f"{path}: ") for line in lines[1:]), path
    assert len(lines) == 9
    assert "(got -1)" in str(err.value) and "(got 'fp8')" in str(err.value)


@pytest.mark.parametrize(
    "raw,path",
    [
        (_minimal(foo=1), "foo"),
        (_minimal(trainer={"lrr": 1e-6}), "trainer.lrr"),
        ({"model": {"name_or_path": "m", "revision": "main"}, "data": {"train": "t"}}, "model.revision"),
        (_minimal(loss={"name": "ipo", "tua": 0.1}), "loss.tua"),  # ipo takes beta, as TRL does, but no tua
        (_minimal(loss=[{"name": "dpo"}, {"name": "sft", "weight": 0.2, "tau": 1}]), "loss[1].tau"),
    ],
)
def test_unknown_keys_are_rejected(raw, path):
    with pytest.raises(ConfigError) as err:
        validate(raw)
    assert any(line.startswith(f"  {path}: ") and "Extra inputs are not permitted" in line for line in str(err.value).splitlines())


def test_missing_sections_and_model_source():
    with pytest.raises(ConfigError) as err:
        validate({"model": {}})
    message = str(err.value)
    assert "data: Field required" in message
    assert "give exactly one of model.name_or_path and model.config" in message


def test_loss_check_can_be_skipped():
    config = validate(_minimal(loss={"name": "not_installed_here"}), check_loss=False)
    assert config.loss == {"name": "not_installed_here"}
    with pytest.raises(ConfigError, match=r"loss\.name: unknown loss 'not_installed_here'"):
        validate(_minimal(loss={"name": "not_installed_here"}))


def test_top_level_must_be_a_mapping():
    with pytest.raises(ConfigError, match="expected a mapping"):
        validate(["model"])


@pytest.mark.parametrize("text,value", [("1e-6", 1e-6), ("5E-7", 5e-7), ("-2.5e+3", -2500.0), ("1.0e-6", 1e-6), ("3", 3)])
def test_yaml_scientific_notation_is_a_float(text, value):
    parsed = parse_yaml(f"lr: {text}")["lr"]
    assert parsed == value and type(parsed) is type(value)


def test_invalid_yaml_names_the_source():
    with pytest.raises(ConfigError, match="run.yaml: invalid YAML"):
        parse_yaml("a: [1, 2", "run.yaml")


def test_apply_overrides():
    raw = _minimal(loss={"name": "dpo"})
    out = apply_overrides(raw, ["trainer.lr=1e-6", "loss.beta=0.25", "data.max_length=64", "trainer.report_to=[jsonl, tensorboard]"])
    assert out["trainer"] == {"lr": 1e-6, "report_to": ["jsonl", "tensorboard"]}
    assert out["loss"] == {"name": "dpo", "beta": 0.25}
    config = validate(out)
    assert config.trainer.lr == 1e-6 and config.data.max_length == 64 and config.build_loss().config.beta == 0.25


@pytest.mark.parametrize("item,pattern", [("trainer.lr", "expected KEY=VALUE"), ("=3", "expected KEY=VALUE"), ("trainer.lr.x=1", "lr is not a section")])
def test_bad_overrides(item, pattern):
    with pytest.raises(ConfigError, match=pattern):
        apply_overrides(_minimal(trainer={"lr": 1e-6}), [item])


def test_load_config_from_yaml(tmp_path):
    (tmp_path / "pairs.jsonl").write_text("")
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: {name_or_path: some/model}\n"
        "data: {train: pairs.jsonl}\n"
        "loss: [{name: dpo, beta: 0.1}, {name: sft, weight: 0.2}]\n"
        "trainer: {lr: 1e-6}\n"
    )
    config = load_config(path, ["trainer.max_steps=3"])
    assert config.trainer.lr == 1e-6 and config.trainer.max_steps == 3
    assert config.data.train == str(tmp_path / "pairs.jsonl")  # resolved beside the YAML file
    loss = config.build_loss()
    assert isinstance(loss, WeightedLoss) and [w for w, _ in loss.terms] == [1.0, 0.2]


def test_load_config_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {name_or_path: m}\ndata: {train: t}\nloss: {name: dpo, beta: high}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid config:\n  loss\.beta: loss 'dpo'"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
