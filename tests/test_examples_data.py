"""Preference data beyond pairs: rankings and labelled completions, their bad rows, and pairs made from rankings."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefopt.config import DataConfig
from prefopt.data.examples import Group, Pair, plan, to_pairs
from prefopt.data.pairs import fingerprint, load_data, load_examples, load_pairs
from prefopt.errors import DataError
from prefopt.testing.tiny import BOS_ID, EOS_ID

PROMPT = "Review of the cafe:"
RANKED = {"prompt": PROMPT, "completions": [" It was fine.", " It was lovely.", " It was awful."], "scores": [2, 3.5, 1]}


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"] + [EOS_ID]


def test_ranking_is_read_best_first(tokenizer, tmp_path):
    groups, report, kind = load_examples(write_jsonl(tmp_path / "r.jsonl", [RANKED]), tokenizer, max_length=64)
    assert kind == "rankings" and report.format == "rankings (completions and scores), text"
    (g,) = groups
    assert g.prompt_ids == [BOS_ID] + tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert g.completions == [ids(tokenizer, " It was lovely."), ids(tokenizer, " It was fine."), ids(tokenizer, " It was awful.")]
    assert g.scores == [3.5, 2.0, 1.0] and g.labels is None and g.row == 0


def test_chosen_with_a_list_of_rejected_is_a_ranking(tokenizer, tmp_path):
    row = {"prompt": PROMPT, "chosen": " Lovely.", "rejected": [" Awful.", " Loud."]}
    (g,), report, kind = load_examples(write_jsonl(tmp_path / "r.jsonl", [row]), tokenizer, max_length=64)
    assert kind == "rankings" and "chosen and a list of rejected" in report.format
    assert g.completions == [ids(tokenizer, t) for t in (" Lovely.", " Awful.", " Loud.")] and g.scores == [1.0, 0.0, 0.0]


def test_conversational_ranking_uses_the_chat_template(tokenizer, tmp_path):
    row = {"prompt": [{"role": "user", "content": "The cafe?"}],
           "completions": [[{"role": "assistant", "content": "Awful."}], [{"role": "assistant", "content": "Lovely."}]],
           "scores": [0, 1]}
    (g,), report, _ = load_examples(write_jsonl(tmp_path / "r.jsonl", [row]), tokenizer, max_length=64)
    assert report.format == "rankings (completions and scores), conversational"
    assert tokenizer.decode(g.prompt_ids) == "<|user|>\nThe cafe?\n<|assistant|>\n"
    assert [tokenizer.decode(c) for c in g.completions] == ["Lovely.\n", "Awful.\n"]


def test_labelled_completions_in_trl_unpaired_format(tokenizer, tmp_path):
    rows = [{"prompt": PROMPT, "completion": " Lovely.", "label": True}, {"prompt": "How was it?", "completion": " Awful.", "label": False}]
    groups, report, kind = load_examples(write_jsonl(tmp_path / "u.jsonl", rows), tokenizer, max_length=64)
    assert kind == "labelled" and report.format == "labelled completions, text"
    assert [g.labels for g in groups] == [[True], [False]] and groups[1].completions == [ids(tokenizer, " Awful.")]


@pytest.mark.parametrize("row, reason, where", [
    ({**RANKED, "scores": [1, 2]}, "scores and completions differ in length", "field 'scores': 2 scores for 3 completions"),
    ({"prompt": PROMPT, "completions": [" A."], "scores": [1]}, "fewer than two completions", "field 'completions': a ranking needs at least two"),
    ({"prompt": PROMPT, "chosen": " A.", "rejected": []}, "fewer than two completions", "field 'rejected': a ranking needs at least two"),
    ({**RANKED, "scores": [2, 2, 2]}, "all scores tied", "field 'scores': all 3 scores are 2"),
    ({**RANKED, "scores": [2, "high", 1]}, "wrong type", "field 'scores': score 1: expected a finite number, got a string"),
    ({**RANKED, "completions": [" A.", " ", " B."]}, "empty completion", "field 'completions': completion 1: empty completion"),
    ({**RANKED, "completions": [" A.", " B.", " A."]}, "identical completions", "field 'completions': completion 2 is identical to completion 0"),
    ({"prompt": PROMPT, "completions": [" A.", " B."]}, "missing field", "field 'scores': missing"),
])
def test_bad_rankings_are_named_by_file_row_and_field(tokenizer, tmp_path, row, reason, where):
    good = RANKED if "completions" in row else {"prompt": PROMPT, "chosen": " A.", "rejected": [" B."]}
    src = write_jsonl(tmp_path / "r.jsonl", [good, row])
    with pytest.raises(DataError) as err:
        load_examples(src, tokenizer, max_length=64)
    assert f"{src} line 2, {where}" in str(err.value) and reason in str(err.value)
    groups, report, _ = load_examples(src, tokenizer, max_length=64, on_error="skip")
    assert len(groups) == 1 and report.skipped == {reason: 1}


@pytest.mark.parametrize("label, got", [(1, "a number (1)"), ("true", "a string ('true')"), (None, None)])
def test_a_label_must_be_a_boolean(tokenizer, tmp_path, label, got):
    good = {"prompt": PROMPT, "completion": " Lovely.", "label": True}
    src = write_jsonl(tmp_path / "u.jsonl", [good, good | {"label": label}])
    with pytest.raises(DataError) as err:
        load_examples(src, tokenizer, max_length=64)
    expected = f"line 2, field 'label': expected true or false, got {got}" if got else "line 2, field 'label': is null"
    assert expected in str(err.value)
    _, report, _ = load_examples(src, tokenizer, max_length=64, on_error="skip")
    assert sum(report.skipped.values()) == 1


def _group(scores: list[float]) -> Group:
    return Group([0], [[10 + i] for i in range(len(scores))], scores, row=7)


@pytest.mark.parametrize("how, expected", [
    ("best_worst", [(10, 13)]),
    ("best_vs_rest", [(10, 12), (10, 13)]),  # completion 11 ties with the best: no pair
    ("all_pairs", [(10, 12), (10, 13), (11, 12), (11, 13), (12, 13)]),
])
def test_pairs_from_a_ranking_never_pair_tied_completions(how, expected):
    pairs = to_pairs([_group([4.0, 4.0, 2.0, 1.0])], how)
    assert [(p.chosen_ids[0], p.rejected_ids[0]) for p in pairs] == expected
    assert all(p.prompt_ids == [0] and p.row == 7 for p in pairs)


def test_all_pairs_skips_ties_in_the_middle():
    pairs = to_pairs([_group([3.0, 2.0, 2.0, 1.0])], "all_pairs")
    assert [(p.chosen_ids[0], p.rejected_ids[0]) for p in pairs] == [(10, 11), (10, 12), (10, 13), (11, 13), (12, 13)]


def test_load_pairs_turns_a_ranking_into_pairs(tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "r.jsonl", [RANKED])
    pairs, report = load_pairs(src, tokenizer, max_length=64, pairs_from="all_pairs")
    lovely, fine, awful = (ids(tokenizer, t) for t in (" It was lovely.", " It was fine.", " It was awful."))
    assert [(p.chosen_ids, p.rejected_ids) for p in pairs] == [(lovely, fine), (lovely, awful), (fine, awful)]
    assert "3 pairs by pairs_from all_pairs" in report.summary()
    (pair,), _ = load_pairs(src, tokenizer, max_length=64)
    assert (pair.chosen_ids, pair.rejected_ids) == (lovely, awful)
    as_pair = write_jsonl(tmp_path / "p.jsonl", [{"prompt": PROMPT, "chosen": " It was lovely.", "rejected": " It was awful."}])
    assert load_pairs(as_pair, tokenizer, max_length=64)[0] == [pair]


def test_labelled_data_is_refused_for_a_pairwise_loss_with_what_to_do(tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "u.jsonl", [{"prompt": PROMPT, "completion": " Lovely.", "label": True}] * 2)
    with pytest.raises(DataError, match=r"loss 'dpo' takes pairs .*labelled completions \(prompt, completion, label\): choose a loss .*\(kto\)"):
        load_data(DataConfig(train=src, max_length=64), tokenizer, 0)


def test_plan_says_what_each_kind_becomes():
    assert plan("rankings", {"pairs"}, "dpo") == "pairs"
    assert plan("rankings", {"pairs", "rankings"}, "plackett_luce") == "rankings"
    assert plan("pairs", {"pairs", "rankings"}, "plackett_luce") == "pairs"
    assert plan("pairs", {"rankings"}, "listwise") == "rankings"
    assert plan("labelled", {"labelled"}, "kto") == "labelled"
    with pytest.raises(DataError, match="loss 'kto' takes labelled completions .* this data holds pairs .*unpair_preference_dataset"):
        plan("pairs", {"labelled"}, "kto")
    with pytest.raises(DataError, match="plackett_luce"):
        plan("rankings", {"labelled"}, "kto")


def test_load_data_holds_out_whole_rankings_and_pairs_them_after(tokenizer, tmp_path):
    rows = [{"prompt": f"Review {i}:", "completions": [" A.", " B.", " C."], "scores": [3, 2, 1]} for i in range(10)]
    cfg = DataConfig(train=write_jsonl(tmp_path / "r.jsonl", rows), max_length=64, eval_fraction=0.2, pairs_from="all_pairs")
    train, evals, _ = load_data(cfg, tokenizer, seed=0)
    assert len(train) == 8 * 3 and len(evals) == 2 * 3 and all(isinstance(p, Pair) for p in train + evals)
    assert not {p.row for p in train} & {p.row for p in evals}
    groups, _, _ = load_data(cfg.model_copy(update={"eval_fraction": 0.0}), tokenizer, 0, takes=frozenset({"pairs", "rankings"}))
    assert all(isinstance(g, Group) and len(g.completions) == 3 for g in groups)


def test_labelled_examples_get_the_previous_completion_as_mismatched(tokenizer, tmp_path):
    rows = [{"prompt": f"Review {i}:", "completion": f" Answer {i}.", "label": i % 2 == 0} for i in range(3)]
    cfg = DataConfig(train=write_jsonl(tmp_path / "u.jsonl", rows), max_length=64)
    groups, _, _ = load_data(cfg, tokenizer, 0, takes=frozenset({"labelled"}), loss_name="kto")
    assert [g.mismatched_ids for g in groups] == [groups[2].completions[0], groups[0].completions[0], groups[1].completions[0]]


def test_fingerprint_of_groups_differs_from_the_same_tokens_as_pairs():
    pair = Pair([1], [2], [3], 0)
    group = Group([1], [[2], [3]], [1.0, 0.0])
    assert fingerprint([pair]) != fingerprint([group]) and fingerprint([group]) == fingerprint([Group([1], [[2], [3]], [2.0, 1.0])])
