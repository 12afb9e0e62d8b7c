"""Loading preference data: formats, tokenisation, truncation, bad rows, sources, and the tiny helpers."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from prefopt.config import DataConfig
from prefopt.data.pairs import DataReport, Pair, fingerprint, load_data, load_pairs
from prefopt.errors import DataError
from prefopt.testing.tiny import BOS_ID, EOS_ID, PAD_ID, model_config

GOOD = {"prompt": "Review of the cafe:", "chosen": " It was lovely.", "rejected": " It was awful."}


def write_jsonl(path: Path, rows: list) -> str:
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# --- formats and tokenisation ----------------------------------------------------------


def test_text_pair_tokenised_with_bos_and_eos(tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    pairs, report = load_pairs(src, tokenizer, max_length=64)
    assert pairs == [
        Pair(
            prompt_ids=[BOS_ID] + ids(tokenizer, GOOD["prompt"]),
            chosen_ids=ids(tokenizer, GOOD["chosen"]) + [EOS_ID],
            rejected_ids=ids(tokenizer, GOOD["rejected"]) + [EOS_ID],
            row=0,
        )
    ]
    assert (report.rows, report.kept, report.skipped) == (1, 1, {})
    assert report.format == "text, explicit prompt"
    assert tokenizer.decode(pairs[0].chosen_ids, skip_special_tokens=True) == " It was lovely."


def test_conversational_pair_uses_chat_template(tokenizer, tmp_path):
    row = {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The cafe?"}],
        "chosen": [{"role": "assistant", "content": "Lovely."}],
        "rejected": [{"role": "assistant", "content": "Awful."}],
    }
    pairs, report = load_pairs(write_jsonl(tmp_path / "d.jsonl", [row]), tokenizer, max_length=64)
    p = pairs[0]
    # As TRL: only the tokens the template writes (this template writes no BOS and no EOS).
    assert tokenizer.decode(p.prompt_ids) == "<|system|>\nBe brief.\n<|user|>\nThe cafe?\n<|assistant|>\n"
    assert tokenizer.decode(p.chosen_ids) == "Lovely.\n"
    assert tokenizer.decode(p.rejected_ids) == "Awful.\n"
    assert report.format == "conversational, explicit prompt"


def test_implicit_text_prompt_is_common_prefix_cut_at_whitespace(tokenizer, tmp_path):
    row = {"chosen": "Review of the cafe: it was lovely", "rejected": "Review of the cafe: it was loud"}
    pairs, report = load_pairs(write_jsonl(tmp_path / "d.jsonl", [row]), tokenizer, max_length=64)
    p = pairs[0]
    assert p.prompt_ids == [BOS_ID] + ids(tokenizer, "Review of the cafe: it was")
    assert p.chosen_ids == ids(tokenizer, " lovely") + [EOS_ID]
    assert p.rejected_ids == ids(tokenizer, " loud") + [EOS_ID]
    assert report.format == "text, implicit prompt"


def test_implicit_messages_prompt_is_common_leading_messages(tokenizer, tmp_path):
    user = {"role": "user", "content": "The cafe?"}
    row = {
        "chosen": [user, {"role": "assistant", "content": "Lovely."}],
        "rejected": [user, {"role": "assistant", "content": "Awful."}],
    }
    pairs, _ = load_pairs(write_jsonl(tmp_path / "d.jsonl", [row]), tokenizer, max_length=64)
    assert tokenizer.decode(pairs[0].prompt_ids) == "<|user|>\nThe cafe?\n<|assistant|>\n"
    assert tokenizer.decode(pairs[0].chosen_ids) == "Lovely.\n"


def test_chat_template_that_is_not_prefix_consistent_is_an_error(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    # Renders the last message differently once it is no longer last.
    tok.chat_template = (
        "{% for m in messages %}{% if loop.last and not add_generation_prompt %}[{{ m.content }}]"
        "{% else %}<|{{ m.role }}|>{{ m.content }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    row = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    with pytest.raises(DataError, match=r"d.jsonl line 1, field 'chosen': the chat template's rendering"):
        load_pairs(write_jsonl(tmp_path / "d.jsonl", [row]), tok, max_length=64)


def test_bos_written_by_chat_template_is_not_doubled(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    row = {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}],
           "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]}
    pairs, _ = load_pairs(write_jsonl(tmp_path / "d.jsonl", [row]), tok, max_length=64)
    assert pairs[0].prompt_ids.count(BOS_ID) == 1 and pairs[0].prompt_ids[0] == BOS_ID


# --- truncation --------------------------------------------------------------------------


def test_max_prompt_length_keeps_the_last_prompt_tokens(tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    full = [BOS_ID] + ids(tokenizer, GOOD["prompt"])
    pairs, _ = load_pairs(src, tokenizer, max_length=64, max_prompt_length=3)
    assert pairs[0].prompt_ids == full[-3:]


def test_completion_cut_at_the_end_with_its_eos(tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{**GOOD, "rejected": " Awful, it was."}])  # different in the 2 kept tokens
    prompt_len = 1 + len(ids(tokenizer, GOOD["prompt"]))
    chosen = ids(tokenizer, GOOD["chosen"])
    pairs, report = load_pairs(src, tokenizer, max_length=prompt_len + 2)
    assert pairs[0].chosen_ids == chosen[:2]
    assert EOS_ID not in pairs[0].chosen_ids
    assert report.skipped == {}


# completions that differ from their first token, so that no cut makes them identical (such a pair is refused)
APART = {**GOOD, "chosen": " Lovely place, truly.", "rejected": " Awful place, truly."}


def test_max_completion_length_keeps_the_first_completion_tokens(tokenizer, tmp_path):
    rows = [APART, {**APART, "chosen": " Ok"}]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    prompt = [BOS_ID] + ids(tokenizer, APART["prompt"])
    chosen, rejected, short = (ids(tokenizer, t) + [EOS_ID] for t in (APART["chosen"], APART["rejected"], " Ok"))
    n = len(short)  # the short completion keeps its EOS; the others lose theirs
    assert len(chosen) > n and len(rejected) > n
    pairs, _ = load_pairs(src, tokenizer, max_length=64, max_completion_length=n)
    assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs] == [
        (prompt, chosen[:n], rejected[:n]), (prompt, short, rejected[:n])]
    # with max_length as well, each completion keeps min(max_completion_length, max_length - prompt) tokens
    for max_length, keep in ((len(prompt) + n - 1, n - 1), (len(prompt) + n + 1, n)):
        pairs, _ = load_pairs(src, tokenizer, max_length=max_length, max_completion_length=n)
        assert pairs[0].chosen_ids == chosen[:keep] and pairs[0].rejected_ids == rejected[:keep]
    # the prompt is cut first (to its last tokens), and the room it leaves is counted after that cut
    pairs, _ = load_pairs(src, tokenizer, max_length=4, max_prompt_length=2, max_completion_length=n)
    assert pairs[0].prompt_ids == prompt[-2:] and pairs[0].chosen_ids == chosen[:2]


def test_max_completion_length_from_the_config_reaches_the_pairs(tokenizer, tmp_path):
    from prefopt.config import DataConfig
    from prefopt.data.pairs import load_data

    src = write_jsonl(tmp_path / "d.jsonl", [APART])
    train, _, _ = load_data(DataConfig(train=str(src), max_completion_length=2), tokenizer, seed=0)
    assert train[0].chosen_ids == ids(tokenizer, APART["chosen"])[:2]


def test_prompt_filling_max_length_is_overlong(tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [GOOD, {**GOOD, "prompt": "Hi:"}])
    prompt_len = 1 + len(ids(tokenizer, GOOD["prompt"]))
    pairs, report = load_pairs(src, tokenizer, max_length=prompt_len)
    assert [p.row for p in pairs] == [1]
    assert report.skipped == {"overlong": 1}
    assert report.examples["overlong"] == [f"{src} line 1, field 'prompt': the prompt has {prompt_len} tokens, "
                                           f"leaving no room for a completion within max_length {prompt_len}"]
    with pytest.raises(DataError, match="(?s)line 1, field 'prompt'.*on_overlong: drop"):
        load_pairs(src, tokenizer, max_length=prompt_len, on_overlong="raise")
    # on_error: raise does not make dropping overlong rows an error
    assert len(load_pairs(src, tokenizer, max_length=prompt_len, on_error="raise")[0]) == 1


# --- bad data ----------------------------------------------------------------------------

MSG = [{"role": "user", "content": "hi"}]
BAD_ROWS = [
    ({"chosen": "a", "rejected": "b"}, "missing field", "field 'prompt': missing"),
    ({"prompt": "p", "chosen": None, "rejected": "b"}, "missing field", "field 'chosen': is null"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "wrong type", "field 'chosen': expected a string"),
    ({"prompt": MSG, "chosen": "a", "rejected": "b"}, "wrong type", "field 'prompt': expected a string"),
    ({"prompt": "p", "chosen": "   \n", "rejected": "b"}, "empty completion", "field 'chosen': empty completion"),
    ({"prompt": "p", "chosen": "a", "rejected": ""}, "empty completion", "field 'rejected': empty completion"),
    ({"prompt": "p", "chosen": " same", "rejected": " same"}, "identical completions", "field 'rejected': identical"),
    ({"prompt": "p", "chosen": "a\ud800", "rejected": "b"}, "invalid UTF-8", "field 'chosen': not valid Unicode"),
    (b'{"prompt": "p", "chosen": "a", ', "malformed JSON", "malformed JSON"),
    (b"[1, 2]", "malformed JSON", "expected a JSON object, got a list"),
    (b'{"prompt": "p", "chosen": "caf\xe9", "rejected": "b"}', "invalid UTF-8", "invalid UTF-8"),
    pytest.param(b'{"prompt": "p", "chosen": "a", "rejected": "b", "chosen": "c"}', "malformed JSON", "duplicate key 'chosen'",
                 id="duplicate-key"),
    pytest.param(b'{"prompt": "p", "chosen": "a", "rejected": "b", "id": ' + b"9" * 5000 + b"}", "malformed JSON", "(4300 digits)",
                 id="5000-digit-integer"),
]


@pytest.mark.parametrize("bad,reason,message", BAD_ROWS)
def test_bad_text_row_raises_or_is_counted(tokenizer, tmp_path, bad, reason, message):
    src = write_jsonl(tmp_path / "d.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(DataError) as info:
        load_pairs(src, tokenizer, max_length=64)
    assert f"{src} line 2" in str(info.value) and message in str(info.value)
    pairs, report = load_pairs(src, tokenizer, max_length=64, on_error="skip")
    assert [p.row for p in pairs] == [0, 2]
    assert (report.rows, report.kept, report.skipped) == (3, 2, {reason: 1})
    assert report.examples[reason][0].startswith(f"{src} line 2") and message in report.examples[reason][0]


CONV = {"prompt": MSG, "chosen": [{"role": "assistant", "content": "yes"}], "rejected": [{"role": "assistant", "content": "no"}]}
BAD_CONV = [
    ({**CONV, "chosen": [{"role": "robot", "content": "x"}]}, "unknown role", "field 'chosen': message 0: unknown role 'robot'"),
    ({**CONV, "prompt": [{"role": "user"}]}, "wrong type", "field 'prompt': message 0: 'content' must be a string (missing)"),
    ({**CONV, "rejected": ["no"]}, "wrong type", "field 'rejected': message 0: expected an object"),
    ({**CONV, "chosen": "yes"}, "wrong type", "field 'chosen': expected a list of messages"),
    ({**CONV, "chosen": [{"role": "assistant", "content": " "}]}, "empty completion", "field 'chosen': empty completion"),
    ({**CONV, "rejected": CONV["chosen"]}, "identical completions", "field 'rejected': identical"),
    ({"chosen": CONV["prompt"] + CONV["chosen"], "rejected": CONV["prompt"]}, "missing field", "field 'prompt': missing"),
    ({**CONV, "prompt": [{"role": "user", "content": "hi", "\udc00": 1}]}, "invalid UTF-8", "field 'prompt': not valid Unicode"),
]


@pytest.mark.parametrize("bad,reason,message", BAD_CONV)
def test_bad_conversational_row_raises_or_is_counted(tokenizer, tmp_path, bad, reason, message):
    src = write_jsonl(tmp_path / "d.jsonl", [CONV, bad, CONV])
    with pytest.raises(DataError, match=f"(?s)line 2.*{re.escape(message[:20])}"):
        load_pairs(src, tokenizer, max_length=64)
    pairs, report = load_pairs(src, tokenizer, max_length=64, on_error="skip")
    assert (report.kept, report.skipped) == (2, {reason: 1})
    assert message in report.examples[reason][0]


def test_columns_a_format_does_not_read_never_fail_the_file(tokenizer, tmp_path):
    nested = json.loads("[" * 100 + "]" * 100)  # too deep for Arrow's schema, which failed the whole file
    extra = [{"completion": "\ud800"}, {"completion": nested}, {"scores": "x", "label": [nested]}]
    src = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 4 + [{**GOOD, "chosen": f" {i}", **e} for i, e in enumerate(extra)])
    pairs, report = load_pairs(src, tokenizer, max_length=64)  # most rows are pairs: the format
    assert (report.kept, report.format) == (7, "text, explicit prompt")


def test_implicit_pair_where_one_is_a_prefix_of_the_other(tokenizer, tmp_path):
    row = {"chosen": [{"role": "user", "content": "hi"}], "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    src = write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(DataError, match="line 1, field 'chosen': empty completion after removing the common prefix"):
        load_pairs(src, tokenizer, max_length=64)


def test_raise_lists_every_reason_and_the_fix(tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [GOOD, b"oops", {"prompt": "p", "chosen": "a", "rejected": "a"}])
    with pytest.raises(DataError) as info:
        load_pairs(src, tokenizer, max_length=64)
    text = str(info.value)
    assert "2 bad rows of 3 (1 malformed JSON, 1 identical completions)" in text
    assert "data.on_error: skip" in text


def test_report_summary(tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [GOOD, b"oops", GOOD])
    _, report = load_pairs(src, tokenizer, max_length=64, on_error="skip")
    assert report.summary() == (
        f"{src}: 3 rows (text, explicit prompt), 2 kept, 1 skipped (1 malformed JSON); "
        f"e.g. {src} line 2: malformed JSON: Expecting value (column 1)."
    )
    clean = DataReport(source="x.jsonl", rows=2, kept=2, format="text, explicit prompt")
    assert clean.summary() == "x.jsonl: 2 rows (text, explicit prompt), 2 kept."


def test_blank_lines_are_not_rows_but_line_numbers_count_them(tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [GOOD, b"", b"  ", b"{bad"])
    pairs, report = load_pairs(src, tokenizer, max_length=64, on_error="skip")
    assert report.rows == 2 and report.examples["malformed JSON"][0].startswith(f"{src} line 4:")


# --- sources -----------------------------------------------------------------------------


def test_json_array_parquet_csv_and_directory_give_the_same_pairs(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [GOOD, {**GOOD, "prompt": "Review of the hotel:"}]
    expected, _ = load_pairs(write_jsonl(tmp_path / "a.jsonl", rows), tokenizer, max_length=64)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    with open(tmp_path / "a.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(GOOD))
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "dir").mkdir()
    write_jsonl(tmp_path / "dir" / "1.jsonl", rows[:1])
    write_jsonl(tmp_path / "dir" / "2.jsonl", rows[1:])
    for name in ("a.json", "a.parquet", "a.csv", "dir"):
        pairs, report = load_pairs(str(tmp_path / name), tokenizer, max_length=64)
        assert pairs == expected, name
        assert report.rows == 2


def test_parquet_rows_are_located_0_based(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([GOOD, {**GOOD, "chosen": " "}]), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"a.parquet row 1 \(0-based\), field 'chosen': empty completion"):
        load_pairs(str(tmp_path / "a.parquet"), tokenizer, max_length=64)


def test_directory_rows_name_their_file(tokenizer, tmp_path):
    write_jsonl(tmp_path / "1.jsonl", [GOOD])
    write_jsonl(tmp_path / "2.jsonl", [GOOD, b"{"])
    pairs, report = load_pairs(str(tmp_path), tokenizer, max_length=64, on_error="skip")
    assert [p.row for p in pairs] == [0, 1]
    assert report.examples["malformed JSON"][0].startswith(f"{tmp_path / '2.jsonl'} line 2:")


def test_a_directory_leaves_out_hidden_files_as_datasets_does(tokenizer, tmp_path):
    for sub in ("", ".ipynb_checkpoints/", "__pycache__/"):  # a notebook's checkpoint copy would double the rows
        (tmp_path / sub).mkdir(exist_ok=True)
        write_jsonl(tmp_path / f"{sub}a.jsonl", [GOOD])
    (tmp_path / "._a.jsonl").write_bytes(b"\x00\x05\x16\x07\xff")  # macOS resource fork
    pairs, report = load_pairs(str(tmp_path), tokenizer, max_length=64)
    assert (len(pairs), report.rows) == (1, 1)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: None, "no such file or directory"),
        (lambda p: p.write_text("x"), "unsupported file type '.txt'"),
        (lambda p: p.write_bytes(b"[{\"a\": 1},"), "malformed JSON at line 1"),
        (lambda p: p.write_bytes(b"prompt,chosen,rejected\np,\xff,b\n"), "line 2: invalid UTF-8"),
    ],
    ids=["missing", "txt", "broken-array", "csv-utf8"],
)
def test_unreadable_sources(tokenizer, tmp_path, make, message):
    suffix = {"unsupported file type '.txt'": ".txt", "malformed JSON at line 1": ".json", "line 2: invalid UTF-8": ".csv"}
    path = tmp_path / f"data{suffix.get(message, '.jsonl')}"
    make(path)
    with pytest.raises(DataError, match=message):
        load_pairs(str(path), tokenizer, max_length=64, on_error="skip")


def test_hub_names_go_to_load_dataset_with_the_split(tokenizer, monkeypatch):
    import datasets

    calls = []

    def fake_load(name, **kwargs):
        calls.append((name, kwargs))
        return [GOOD]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    pairs, report = load_pairs("someone/prefs", tokenizer, split="test", max_length=64, max_rows=5)
    assert calls == [("someone/prefs", {"split": "test[:5]"})]
    assert len(pairs) == 1 and report.source == "someone/prefs"


def test_max_rows_counts_bad_rows_too(tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [GOOD, b"{", GOOD, GOOD])
    pairs, report = load_pairs(src, tokenizer, max_length=64, on_error="skip", max_rows=3)
    assert (report.rows, report.kept, [p.row for p in pairs]) == (3, 2, [0, 2])


# --- load_data and fingerprint ------------------------------------------------------------


def _rows(n: int) -> list[dict]:
    return [{**GOOD, "prompt": f"Review {i}:"} for i in range(n)]


def test_load_data_with_eval_file(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", _rows(4))
    ev = write_jsonl(tmp_path / "e.jsonl", _rows(2))
    tr, evs, reports = load_data(DataConfig(train=train, eval=ev, max_length=64), tokenizer, seed=0)
    assert (len(tr), len(evs), [r.source for r in reports]) == (4, 2, [train, ev])


def test_load_data_holds_out_a_seeded_fraction(tokenizer, tmp_path):
    cfg = DataConfig(train=write_jsonl(tmp_path / "t.jsonl", _rows(20)), eval_fraction=0.25, max_length=64)
    tr, evs, _ = load_data(cfg, tokenizer, seed=1)
    assert (len(tr), len(evs)) == (15, 5)
    assert sorted(p.row for p in tr + evs) == list(range(20))
    assert [p.row for p in load_data(cfg, tokenizer, seed=1)[1]] == [p.row for p in evs]
    assert [p.row for p in load_data(cfg, tokenizer, seed=2)[1]] != [p.row for p in evs]
    assert load_data(cfg.model_copy(update={"eval_fraction": 0.0}), tokenizer, seed=1)[1] == []


def test_load_data_with_no_usable_rows_is_an_error(tokenizer, tmp_path):
    cfg = DataConfig(train=write_jsonl(tmp_path / "t.jsonl", [b"{"]), on_error="skip", max_length=64)
    with pytest.raises(DataError, match="no usable pairs"):
        load_data(cfg, tokenizer, seed=0)


def test_fingerprint_is_order_and_content_sensitive():
    a, b = Pair([0, 5], [6, 1], [7, 1], 0), Pair([0, 8], [9, 1], [7, 1], 1)
    assert fingerprint([a, b]) == fingerprint([Pair([0, 5], [6, 1], [7, 1], 3), b])  # row is not content
    assert fingerprint([a, b]) != fingerprint([b, a])
    assert fingerprint([a]) != fingerprint([Pair([0], [5, 6, 1], [7, 1], 0)])  # boundaries matter
    assert len(fingerprint([])) == 64


# --- tiny helpers ----------------------------------------------------------------------------


def test_tokenizer_special_ids_and_bos(tokenizer):
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    with_bos = tokenizer("the cafe")["input_ids"]
    assert with_bos[0] == BOS_ID and with_bos[1:] == ids(tokenizer, "the cafe")
    assert len(tokenizer) <= 400


def test_tokenizer_round_trips_through_save_pretrained(tokenizer, tokenizer_dir):
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = "Review of the café: 日本!"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text
    assert loaded.apply_chat_template(MSG, tokenize=False, add_generation_prompt=True) == "<|user|>\nhi\n<|assistant|>\n"
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_model_config_is_accepted_by_autoconfig(arch):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(**model_config(arch, vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, max_position=64))
    assert cfg.model_type == arch
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (300, 32, 1, 2)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    assert model_config(arch, dropout_extra=1)["dropout_extra"] == 1


def test_model_config_rejects_unknown_arch():
    with pytest.raises(ValueError, match="unknown arch 'bert'"):
        model_config("bert")


def test_format_is_decided_by_most_rows(tokenizer, tmp_path):
    implicit = {"chosen": "Q: cafe? A: lovely", "rejected": "Q: cafe? A: loud"}
    broken = {"chosen": "Q: cafe? A: ok"}  # invalid, but still counts towards the implicit majority
    stray = {**implicit, "prompt": "ignored"}
    pairs, report = load_pairs(write_jsonl(tmp_path / "d.jsonl", [broken, broken, stray]),
                               tokenizer, max_length=64, on_error="skip")
    assert report.format == "text, implicit prompt"
    assert [p.row for p in pairs] == [2]
    assert pairs[0].prompt_ids == [BOS_ID] + ids(tokenizer, "Q: cafe? A:")
    assert report.skipped == {"missing field": 2}
