"""Config files, data rows and what a run writes for people and programs: every bad input has a clean error;
``metrics.jsonl`` is strict JSON; warnings never land inside the progress bar's line."""
from __future__ import annotations

import io
import json
import logging
import os
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reliability import _nan_on

from engine_helpers import set_dotted, word_rows, write_jsonl
from prefopt.config import load_config, validate
from prefopt.data.pairs import load_data, load_examples, load_pairs
from prefopt.errors import ConfigError, DataError

CONFIG = "model: {name_or_path: ./model}\ndata: {train: ./train.jsonl}\n"


# ---------------------------------------------------------------- F: config files


def test_a_duplicate_key_is_an_error_naming_the_file_and_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(CONFIG + "trainer:\n  lr: 1.0e-3\n  seed: 1\ntrainer:\n  seed: 2\n")  # the first section would be dropped
    with pytest.raises(ConfigError, match=r"(?s)run.yaml: invalid YAML: .*duplicate key 'trainer' \(first at line 3\)\n  in .*run.yaml, line 6"):
        load_config(path)
    path.write_text(CONFIG + "trainer: {lr: 1.0e-3, lr: 2.0e-3}\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'lr'"):
        load_config(path)
    path.write_text(CONFIG + "loss: {<<: {name: dpo, beta: 0.2}, beta: 0.1}\n")  # a << merge may be overridden: YAML's rule
    assert load_config(path).loss == {"name": "dpo", "beta": 0.1}


def test_tilde_is_expanded_in_every_path_field(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "d").mkdir(parents=True)
    (home / "d" / "train.jsonl").write_text("")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "run.yaml"
    path.write_text("model: {name_or_path: ~/m, reference: ~/r, tokenizer: ~/t}\ndata: {train: ~/d/train.jsonl, eval: ~/d/e.jsonl}\n"
                    "reference: {cache_dir: ~/cache}\ntrainer: {output_dir: ~/runs/x}\n")
    for overrides in ([], ["trainer.output_dir=~/runs/y", "data.train=~/d/train.jsonl"]):
        c = load_config(path, overrides)
        values = [c.model.name_or_path, c.model.reference, c.model.tokenizer, c.data.train, c.data.eval, c.reference.cache_dir,
                  c.trainer.output_dir]
        assert all(v.startswith(str(home) + "/") for v in values), values
    assert not (tmp_path / "~").exists()
    with pytest.raises(ConfigError, match=r"--set trainer.output_dir=~: a lone ~ is ambiguous here .*write trainer.output_dir=null"):
        load_config(path, ["trainer.output_dir=~"])


def test_tilde_of_an_unknown_user_and_a_nul_in_a_path_are_errors_naming_the_field(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "run.yaml"
    path.write_text(CONFIG)
    with pytest.raises(ConfigError, match=r"run.yaml: trainer.output_dir: '~no-such-user-x/r': no user named 'no-such-user-x'"):
        load_config(path, ["trainer.output_dir=~no-such-user-x/r"])
    path.write_text(CONFIG + "reference: {cache_dir: ~no-such-user-x/c}\n")
    with pytest.raises(ConfigError, match=r"reference.cache_dir: .*no user named"):
        load_config(path)
    for field in ("trainer.output_dir", "model.name_or_path", "data.chat_template"):  # a ValueError deep in os.path before
        with pytest.raises(ConfigError, match=rf"run.yaml: {field}: .* contains a NUL character"):
            load_config(path, [f'{field}="a\\0b"'])
    assert not any("~" in p.name for p in tmp_path.rglob("*"))


@pytest.mark.slow
@settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from(["model:", "data:", "trainer:", "loss:", "  name: dpo", "- ", "[", "{", "&a ", "*a", "<<: *a",
                              "!!binary ", "? ", ": ", "\t", "\n", "  ", "'", '"', "\x00", "\xff", "~", "1e400", ".nan"]),
             max_size=40).map(lambda parts: "".join(parts).encode("utf-8", "surrogatepass")),
    st.integers(1, 5000).map(lambda n: b"[" * n),
))
def test_any_malformed_config_file_gives_a_clean_error_naming_the_file(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    path.write_bytes(data)
    try:
        load_config(path)
    except ConfigError as exc:
        assert "fuzz.yaml" in str(exc)


# ---------------------------------------------------------------- G: data


def test_pairs_identical_after_truncation_are_counted_and_refused_or_skipped(tokenizer, tmp_path):
    rows = [{"prompt": "Tell me about the phone.", "chosen": " It was great and bright" + " x" * i,
             "rejected": " It was great and bright" + " y" * i} for i in range(1, 5)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    n_prompt = len(tokenizer("Tell me about the phone.")["input_ids"])
    ids = [[tokenizer(r[k], add_special_tokens=False)["input_ids"] for k in ("chosen", "rejected")] for r in rows]
    short = n_prompt + min(next(i for i, (a, b) in enumerate(zip(c, r)) if a != b) for c, r in ids)  # the first difference, cut
    with pytest.raises(DataError, match=r"(?s)4 bad rows of 4 \(4 identical completions\).*line 1, field 'rejected': the same tokens as chosen once cut to max_length"):
        load_pairs(str(path), tokenizer, max_length=short)
    pairs, report = load_pairs(str(path), tokenizer, max_length=short, on_error="skip")
    assert pairs == [] and report.skipped == {"identical completions": 4}
    pairs, _ = load_pairs(str(path), tokenizer, max_length=short + 1)  # one more token tells them apart
    assert len(pairs) == 4


def test_an_eval_set_configured_but_empty_or_all_skipped_is_an_error_naming_it(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", word_rows(0, 8))
    for name, rows in (("empty", []), ("skipped", [{"prompt": "p", "chosen": "a"}] * 3)):
        path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        cfg = validate({"model": {"name_or_path": "m"}, "data": {"train": str(train), "eval": str(path), "on_error": "skip"}}).data
        with pytest.raises(DataError, match=rf"data.eval: .*{name}.jsonl"):
            load_data(cfg, tokenizer, 0)


def test_numbers_beyond_a_float_and_duplicate_keys_are_located_row_errors(tokenizer, tmp_path):
    ranked = [{"prompt": "p", "completions": [" good", " bad"], "scores": [1, 0]}] * 2
    path = write_jsonl(tmp_path / "r.jsonl", ranked + [{"prompt": "p", "completions": [" a", " b"], "scores": [10**400, 0]}])
    with pytest.raises(DataError, match=r"line 3, field 'scores': score 0: expected a finite number, got a number too large"):
        load_examples(str(path), tokenizer, max_length=64)
    assert load_examples(str(path), tokenizer, max_length=64, on_error="skip")[1].skipped == {"wrong type": 1}
    # which of two values a reader keeps is its own choice: the row is refused, in an array too, by item
    items = [{"prompt": "p", "chosen": " a", "rejected": " b"}] * 2
    text = json.dumps(items)[:-1] + ', {"prompt": "p", "chosen": [{"role": "user", "content": "x", "content": "y"}]}]'
    (tmp_path / "a.json").write_text(text)
    with pytest.raises(DataError, match=r"a.json item 2 \(0-based\): malformed JSON: duplicate key 'content'"):
        load_pairs(str(tmp_path / "a.json"), tokenizer, max_length=64)
    assert load_pairs(str(tmp_path / "a.json"), tokenizer, max_length=64, on_error="skip")[1].skipped == {"malformed JSON": 1}


def test_a_column_mapped_to_no_column_is_an_error_not_a_silently_dropped_field(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", word_rows(0, 4))  # with the mapping, prompt would be absent: an implicit prompt
    with pytest.raises(DataError, match=r"d.jsonl: data.columns maps prompt to 'question', but the data has no such column "
                                        r"\(its columns: chosen, prompt, rejected\)"):
        load_pairs(str(path), tokenizer, max_length=64, columns={"prompt": "question"})
    swapped, _ = load_pairs(str(path), tokenizer, max_length=64, columns={"chosen": "rejected", "rejected": "chosen"})
    assert len(swapped) == 4


def test_a_fifo_is_refused_unread_and_an_unparsable_csv_names_the_cause(tokenizer, tmp_path):
    fifo = tmp_path / "train.jsonl"
    os.mkfifo(fifo)  # reading it would wait for a writer forever
    with pytest.raises(DataError, match=r"train.jsonl: not a regular file or directory"):
        load_pairs(str(fifo), tokenizer, max_length=64)
    (tmp_path / "d.csv").write_text("prompt,chosen,rejected\np, a, b\nq, c, d, e\n")
    with pytest.raises(DataError, match=r"d.csv: cannot load: .*Expected 3 fields in line 3, saw 4"):
        load_pairs(str(tmp_path / "d.csv"), tokenizer, max_length=64)


def test_eval_rows_that_are_also_train_rows_are_logged(tokenizer, tmp_path, caplog):
    train = write_jsonl(tmp_path / "train.jsonl", word_rows(0, 8))
    other = write_jsonl(tmp_path / "eval.jsonl", word_rows(0, 8)[6:] + word_rows(1, 3))
    for ev, shared in ((train, "8 of 8"), (other, "2 of 5"), (None, None)):
        caplog.clear()
        cfg = validate({"model": {"name_or_path": "m"}, "data": {"train": str(train), "eval": ev and str(ev)}}).data
        with caplog.at_level(logging.WARNING, logger="prefopt"):
            load_data(cfg, tokenizer, 0)
        said = [r.getMessage() for r in caplog.records if "also in data.train" in r.getMessage()]
        assert said == ([f"data.eval: {shared} eval examples are also in data.train (the same token ids); their metrics are "
                         "not held out"] if shared else [])


# ---------------------------------------------------------------- H: metrics and the progress bar


@pytest.fixture
def project(tmp_path):
    from prefopt.testing.tiny import build_tokenizer, model_config

    rows = word_rows(0, 16, prompt=(3, 6), completion=(2, 4))
    write_jsonl(tmp_path / "train.jsonl", rows)
    build_tokenizer([r[k] for r in rows for k in ("prompt", "chosen", "rejected")], 300).save_pretrained(tmp_path / "tok")
    return {
        "model": {"config": model_config("llama", 300, 32, 1, 2, max_position=64), "tokenizer": str(tmp_path / "tok")},
        "data": {"train": str(tmp_path / "train.jsonl"), "max_length": 48},
        "reference": {"cache_dir": str(tmp_path / "cache")},
        "trainer": {"output_dir": str(tmp_path / "run"), "batch_size": 4, "max_steps": 4, "lr": 1e-3, "schedule": "constant"},
    }


def _strict(text: str) -> list[dict]:
    def refuse(name: str):
        raise ValueError(f"not strict JSON: {name}")

    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def test_metrics_are_strict_json_and_warnings_stay_off_the_progress_bar_line(project, tmp_path, monkeypatch, one_torch_thread,
                                                                            builtins_only):
    from prefopt.cli.commands import _setup_logging
    from prefopt.training.trainer import train

    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    logger = logging.getLogger("prefopt")
    monkeypatch.setattr(logger, "handlers", [])
    _setup_logging()  # the CLI's handler, on this stderr
    _nan_on(monkeypatch, {3})
    train(validate(set_dotted(project, {"trainer.output_dir": str(tmp_path / "run")})))
    rows = _strict((tmp_path / "run" / "metrics.jsonl").read_text())
    assert [r["loss"] is None for r in rows] == [False, False, True, False]  # the NaN of step 3, as null
    summary = _strict((tmp_path / "run" / "summary.json").read_text().replace("\n", " "))
    assert summary[0]["steps"] == 4
    lines = [line for line in stderr.getvalue().split("\n") if "non-finite loss or gradient" in line]
    assert lines and all(line.rsplit("\r", 1)[-1].startswith("[prefopt] step 3:") for line in lines), lines


def test_nan_weights_in_a_model_are_named_as_such(project, tmp_path, one_torch_thread, builtins_only):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from prefopt.training.trainer import train

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**project["model"]["config"]))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "model")
    raw = set_dotted(project, {"model.config": None, "model.name_or_path": str(tmp_path / "model")})
    with pytest.raises(ConfigError, match=r"model: the loaded weights are not finite \(NaN or infinite\) in 1 tensors, e\.g\. "
                                          r"model\.layers\.0\.mlp\.up_proj\.weight"):
        train(validate(raw))
