"""Everyday knobs from other trainers: a chat-template override, tracker project and run name, the
reference cache in the user's cache directory, and the CPU thread count stated at start-up."""
from __future__ import annotations

import logging

import pytest
import torch
import yaml

from engine_helpers import make_config, write_assets
from prefopt.config import load_config, validate
from prefopt.errors import ConfigError

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
CHAT = [{"prompt": [{"role": "user", "content": "Tell me about the new phone."}],
         "chosen": [{"role": "assistant", "content": "It is fast."}], "rejected": [{"role": "assistant", "content": "It is slow."}]}]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_assets(tmp_path_factory.mktemp("knobs"), n_train=16, n_eval=4)


def _write(tmp_path, raw: dict) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_chat_template_text_or_file_beside_the_config_replaces_the_tokenizers(assets, tmp_path):
    from prefopt.data.pairs import load_data
    from prefopt.engine.modeling import load_tokenizer

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(__import__("json").dumps(r) + "\n" for r in CHAT))
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "plain.jinja").write_text(TEMPLATE)
    raw = make_config(assets, tmp_path, data__train=str(data), data__max_length=512)
    for value in (TEMPLATE, "templates/plain.jinja"):
        raw["data"]["chat_template"] = value
        config = load_config(_write(tmp_path, raw))
        tok = load_tokenizer(config.model, config.data.chat_template)
        assert tok.chat_template == TEMPLATE
        (pair,), _, _ = load_data(config.data, tok, seed=0)
        assert tok.decode(pair.prompt_ids) == "[user] Tell me about the new phone.\n[assistant] "
        assert tok.decode(pair.chosen_ids) == "It is fast.\n"


@pytest.mark.parametrize("value, message", [
    ("missing.jinja", "neither a Jinja template"),
    ("no-template.txt", "holds no Jinja template"),
])
def test_a_chat_template_that_is_not_one_is_a_clear_error(assets, tmp_path, value, message):
    from prefopt.engine.modeling import load_tokenizer

    (tmp_path / "no-template.txt").write_text("hello")
    config = load_config(_write(tmp_path, {**make_config(assets, tmp_path), "data": {"train": assets["train"], "chat_template": value}}))
    with pytest.raises(ConfigError, match=f"data.chat_template: .*{message}"):
        load_tokenizer(config.model, config.data.chat_template)


def test_run_name_reaches_the_trackers_that_name_runs():
    from prefopt.training.tracking import tracker_init_kwargs

    assert tracker_init_kwargs(["jsonl", "wandb", "tensorboard", "mlflow"], "dpo-1") == {
        "mlflow": {"run_name": "dpo-1"}, "wandb": {"name": "dpo-1"}}
    assert tracker_init_kwargs(["wandb"], None) == {}
    assert set(tracker_init_kwargs(["all"], "x")) == {"wandb", "trackio", "mlflow", "swanlab", "clearml", "dvclive"}


def test_a_cache_dir_under_home_is_the_users_whatever_the_config_location(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    raw = make_config(assets, tmp_path, reference__cache_dir="~/.cache/prefopt")
    config = load_config(_write(tmp_path / "", raw))
    assert config.reference.cache_dir == str(tmp_path / "home" / ".cache" / "prefopt")
    assert load_config(_write(tmp_path, raw), ["reference.cache_dir=~/c"]).reference.cache_dir == str(tmp_path / "home" / "c")


def test_fields_added_since_a_checkpoint_are_no_change_at_their_defaults(assets, tmp_path):
    from prefopt.training.resume import config_differences

    new = validate(make_config(assets, tmp_path)).model_dump(mode="json")
    old = {s: {k: v for k, v in section.items() if k not in ("dtype", "master_weights", "max_completion_length")}
           if isinstance(section, dict) else section for s, section in new.items()}
    assert config_differences(old, new) == []
    new["model"]["dtype"] = "bf16"
    assert config_differences(old, new) == ["model.dtype"]
    assert config_differences(new, {**new, "trainer": {**new["trainer"], "run_name": "b", "project": "p"}}) == []


def test_the_cpu_thread_count_is_stated_at_start_up(assets, tmp_path, caplog):
    from prefopt.training.run import make_accelerator

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with caplog.at_level(logging.INFO, logger="prefopt"):
            make_accelerator(validate(make_config(assets, tmp_path)))
    finally:
        torch.set_num_threads(before)
    assert any(r.getMessage().startswith("CPU: 1 threads per process (torch.get_num_threads()") for r in caplog.records)
