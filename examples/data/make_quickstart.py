"""Write the quickstart preference data and its tokenizer (deterministic).

Each prompt asks about a thing; the chosen completion is a short positive sentence and
the rejected one the same sentence with negative words. The held-out rows draw on the
same word pools in combinations that do not occur in the training rows.

From the same rows it derives rankings (four completions per prompt) and labelled
completions (TRL's unpaired format) for examples/ranked.yaml and examples/unpaired.yaml.

    python examples/data/make_quickstart.py
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from transformers import AutoConfig

from prefopt.testing.tiny import build_tokenizer, model_config

HERE = Path(__file__).resolve().parent
TRAIN_ROWS, EVAL_ROWS, SEED = 1500, 200, 0

SUBJECTS = ["cafe", "phone", "hotel", "movie", "book", "park", "laptop", "restaurant",
            "museum", "concert", "bike", "game", "camera", "beach", "train", "bakery"]
PROMPTS = ["Review of the {s}:", "Tell me about the new {s}.", "What did you think of the {s}?",
           "Describe the {s}.", "How was the {s}?"]
SENTENCES = [" The {s} was {a} and {b}.", " It was {a}, really {b}.", " I found it {a} and {b}.",
             " A {a} {s}, {b} overall."]
POSITIVE = ["great", "lovely", "wonderful", "excellent", "amazing", "delightful", "friendly", "pleasant"]
NEGATIVE = ["terrible", "awful", "horrible", "boring", "dirty", "disappointing", "rude", "ugly"]


def make_rows(n: int, rng: random.Random) -> list[dict[str, str]]:
    rows, seen = [], set()
    while len(rows) < n:
        s, prompt, sentence = rng.choice(SUBJECTS), rng.choice(PROMPTS), rng.choice(SENTENCES)
        good, bad = rng.sample(POSITIVE, 2), rng.sample(NEGATIVE, 2)
        row = {
            "prompt": prompt.format(s=s),
            "chosen": sentence.format(s=s, a=good[0], b=good[1]),
            "rejected": sentence.format(s=s, a=bad[0], b=bad[1]),
        }
        key = tuple(row.values())
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def ranking(row: dict[str, str], index: int, rng: random.Random) -> dict:
    """Four completions: the chosen sentence (score 3), each positive word alone swapped for the rejected
    sentence's negative one, and the rejected sentence (score 0). The two half-swapped sentences tie on
    even rows (1.5 each) and rank the one keeping its first positive word higher on odd rows (2 and 1)."""
    good, bad = row["chosen"].split(" "), row["rejected"].split(" ")
    first, second = [i for i, (g, b) in enumerate(zip(good, bad)) if g != b]
    keep_first = " ".join(bad[i] if i == second else w for i, w in enumerate(good))
    keep_second = " ".join(bad[i] if i == first else w for i, w in enumerate(good))
    middle = (1.5, 1.5) if index % 2 == 0 else (2.0, 1.0)
    listed = list(zip([row["chosen"], keep_first, keep_second, row["rejected"]], [3.0, *middle, 0.0]))
    rng.shuffle(listed)  # rows list completions in no particular order; the scores rank them
    return {"prompt": row["prompt"], "completions": [c for c, _ in listed], "scores": [s for _, s in listed]}


def labelled(row: dict[str, str], index: int) -> dict:
    """TRL's unpaired format: the chosen completion labelled desirable on even rows, the rejected one not on odd rows."""
    if index % 2 == 0:
        return {"prompt": row["prompt"], "completion": row["chosen"], "label": True}
    return {"prompt": row["prompt"], "completion": row["rejected"], "label": False}


def write_derived(train: list[dict[str, str]], evals: list[dict[str, str]]) -> None:
    """The rankings and labelled completions made from the pairs (seeded: the same files every time)."""
    rng = random.Random(SEED)
    for name, rows in (("", train), ("_eval", evals)):
        write_jsonl(HERE / f"quickstart_ranked{name}.jsonl", [ranking(r, i, rng) for i, r in enumerate(rows)])
        write_jsonl(HERE / f"quickstart_unpaired{name}.jsonl", [labelled(r, i) for i, r in enumerate(rows)])


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    rows = make_rows(TRAIN_ROWS + EVAL_ROWS, random.Random(SEED))
    write_jsonl(HERE / "quickstart.jsonl", rows[:TRAIN_ROWS])
    write_jsonl(HERE / "quickstart_eval.jsonl", rows[TRAIN_ROWS:])
    write_derived(rows[:TRAIN_ROWS], rows[TRAIN_ROWS:])
    texts = [r[k] for r in rows for k in ("prompt", "chosen", "rejected")]
    tokenizer = build_tokenizer(texts, vocab_size=512)
    # The example model: a config and a tokenizer, no weights, so prefopt initialises it fresh.
    model_dir = HERE.parent / "tiny-llama"
    tokenizer.save_pretrained(model_dir)
    config = model_config("llama", vocab_size=len(tokenizer), hidden_size=64, num_layers=2, num_heads=4, max_position=128)
    AutoConfig.for_model(**config).save_pretrained(model_dir)
    print(f"wrote {TRAIN_ROWS} train and {EVAL_ROWS} eval rows; tokenizer of {len(tokenizer)} tokens")


if __name__ == "__main__":
    main()
