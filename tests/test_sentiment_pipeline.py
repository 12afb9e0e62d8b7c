"""The sentiment example end to end at its tiny scale, plus checks of its parts."""
import json
import random

import pytest
import torch

pytest.importorskip("vaderSentiment")
pytest.importorskip("matplotlib")

from examples.sentiment import corpus, lm, report  # noqa: E402
from examples.sentiment.pipeline import run  # noqa: E402
from examples.sentiment.reward import sentiment  # noqa: E402
from examples.sentiment.train import methods  # noqa: E402


def test_corpus_is_deterministic_and_spans_sentiment():
    texts = corpus.reviews(300, seed=3)
    assert texts == corpus.reviews(300, seed=3)
    scores = sentiment(texts)
    assert min(scores) < -0.5 and max(scores) > 0.5
    prompt, rest = corpus.split_prompt(texts[0], random.Random(0))
    assert prompt + rest == texts[0] and rest.startswith(" ") and 2 <= len(prompt.split()) <= 8


def test_vader_orders_reviews():
    good, bad = sentiment(["the acting was superb . i loved every minute !", "the plot was awful . skip this one ."])
    assert good > 0.5 and bad < -0.3


def test_sample_keeps_prompt_ids_and_logps_match_a_full_forward():
    texts = corpus.reviews(200, seed=0)
    tok = lm.build_tokenizer(texts, 800)
    model = lm.build_model(tok, hidden_size=16, num_layers=1, num_heads=2, seed=0)
    prompts = corpus.prompts(6, seed=1)
    samples = lm.sample(model, tok, prompts, max_new_tokens=5, batch_size=4, seed=0)
    assert [p for p, _, _ in samples] == [tok(p)["input_ids"] for p in prompts]
    # the log-probs we score with equal the model's distribution at each sampled step
    p_ids, c_ids = samples[0][0], samples[0][1]
    logps = lm.token_logps(model, tok, [p_ids], [c_ids])[0]
    with torch.no_grad():
        full = torch.tensor([p_ids + c_ids])
        ref = torch.log_softmax(model(full).logits[0, :-1], -1)[len(p_ids) - 1 :].gather(-1, torch.tensor(c_ids)[:, None])
    torch.testing.assert_close(logps, ref.squeeze(-1))


def test_methods_cover_the_paper_families():
    runs = methods([0.1, 1.0], [0.5], [0.1], [1.0, 4.0])
    assert runs["preferred-ft-lr4x"] == ({"name": "sft"}, 4.0)
    assert runs["dpo-beta1"] == ({"name": "dpo", "beta": 1.0}, 1.0)
    assert runs["tdpo2-beta0.1"][0]["variant"] == "tdpo2" and runs["ipo-tau0.5"][0]["tau"] == 0.5
    assert len(runs) == 6


def test_tiny_pipeline_end_to_end(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = run("tiny", tmp_path, seed=0, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    results = summary["results"]
    assert set(results) == {"sft", "preferred-ft-lr1x", "dpo-beta0.1", "ipo-tau1", "tdpo2-beta0.1"}
    assert results["sft"]["kl"] == pytest.approx(0.0, abs=1e-5)  # the reference against itself
    for name, r in results.items():
        assert -1.0 <= r["reward"] <= 1.0
        if name != "sft":
            assert r["kl"] != 0.0  # training moved every policy
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert rows and all(r["chosen"] != r["rejected"] for r in rows)
    assert all(s > t for s, t in (sentiment([r["prompt"] + r["chosen"], r["prompt"] + r["rejected"]]) for r in rows))
    assert (tmp_path / "reward_kl.png").read_bytes()[:4] == b"\x89PNG"
    page = (tmp_path / "token_rewards.html").read_text()
    assert "beta = 0.1" in page and page.count("class=ex") == 8
    assert "| dpo-beta0.1 |" in (tmp_path / "results.md").read_text()


def test_table_orders_methods_by_kl():
    r = {"reward": 0.1, "reward_se": 0.0, "kl_se": 0.0, "finished": 1.0, "length": 5.0}
    table = report.table({"dpo-beta1": {**r, "kl": 1.0}, "dpo-beta0.1": {**r, "kl": 5.0}, "sft": {**r, "kl": 0.0}})
    names = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert names == ["sft", "dpo-beta1", "dpo-beta0.1"]


# ---------------------------------------------------------------- four samples per prompt: rankings and labels


def test_median_labels_drop_ties_at_the_median():
    from examples.sentiment.ranked import median_labels

    assert median_labels([0.5, -0.2, 0.1, 0.3]) == [True, False, False, True]  # median 0.2
    assert median_labels([0.0, 0.0, 0.5, -0.5]) == [None, None, True, False]  # the middle two tie: both dropped
    assert median_labels([0.1, 0.9, 0.4]) == [False, True, None]  # odd K: the middle one is the median


def test_rank_group_keeps_distinct_finished_completions():
    from examples.sentiment.ranked import rank_group

    row, _ = rank_group("the film", [" was superb .", " was awful .", " was superb .", " was", " "], [True, True, True, False, True])
    assert row["completions"] == [" was superb .", " was awful ."]
    assert row["scores"] == sentiment(["the film was superb .", "the film was awful ."])
    assert rank_group("the film", [" was .", " is ."], [True, True]) == (None, "all scores tied")
    assert rank_group("the film", [" was superb .", " was awful ."], [True, False])[0] is None


def test_labelled_rows_are_the_median_split_with_neighbours_from_other_prompts():
    from examples.sentiment.ranked import labelled_rows, median_labels

    rng = random.Random(0)
    rankings = [{"prompt": f"p{i}", "completions": [f" c{i}-{j}" for j in range(4)],
                 "scores": [rng.choice([-0.5, 0.0, 0.5, 0.9]) for _ in range(4)]} for i in range(30)]
    rows = labelled_rows(rankings, random.Random(1))
    expected = {(r["prompt"], c, lab) for r in rankings for c, lab in zip(r["completions"], median_labels(r["scores"]))
                if lab is not None}
    assert sorted((r["prompt"], r["completion"], r["label"]) for r in rows) == sorted(expected)
    # prefopt takes the previous row's completion as KTO's mismatched one: it must come from another prompt
    assert all(a["prompt"] != b["prompt"] for a, b in zip(rows, rows[1:]))


@pytest.mark.slow
def test_tiny_ranked_stage_end_to_end(tmp_path, group_plugins):
    from examples.sentiment import ranked

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = ranked.run_seed("tiny", tmp_path, seed=0, betas=[0.1], log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    results = summary["results"]
    assert set(results) == {"sft", *(f"{m}-beta0.1" for m in ranked.METHODS)}
    for name, r in results.items():
        assert -1.0 <= r["reward"] <= 1.0 and (name == "sft" or r["kl"] != 0.0)  # training moved every policy
    rankings = [json.loads(line) for line in (tmp_path / "rankings.jsonl").read_text().splitlines()]
    labelled = [json.loads(line) for line in (tmp_path / "labelled.jsonl").read_text().splitlines()]
    assert len(rankings) == summary["data"]["rankings"] and len(labelled) == summary["data"]["labelled"]
    for r in rankings:  # the scores are the reward of prompt + completion
        assert 2 <= len(r["completions"]) <= 4 and r["scores"] == sentiment([r["prompt"] + c for c in r["completions"]])
    by_text = {(r["prompt"], c): lab for r in rankings for c, lab in zip(r["completions"], ranked.median_labels(r["scores"]))}
    assert all(by_text[(row["prompt"], row["completion"])] is row["label"] for row in labelled)
    seen = {r["method"]: r["seen"] for r in results.values() if "method" in r}
    assert seen["dpo-best_worst"]["pairs"] == seen["dpo-all_pairs"]["pairs"] == 3 * 8  # steps x batch, one pair each
    assert seen["plackett_luce"]["completions"] > seen["dpo-best_worst"]["completions"] > seen["kto"]["completions"]
    assert all(s["tokens"] > 0 for s in seen.values())
    ranked.plot([summary], tmp_path / "fig.png", "tiny")
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"
    assert ranked.table([summary]).count("\n") == 2 + len(results) - 1
