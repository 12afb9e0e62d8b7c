"""Shared inputs of every run: synthetic preference data, a local byte-level BPE tokenizer, model configs."""
from __future__ import annotations

import json
import random
from pathlib import Path

PAD, EOS = "<pad>", "</s>"


def _lexicon(n: int, rng: random.Random) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(letters) for _ in range(rng.randint(3, 7))))
    return sorted(words)


def _text(n_words: int, lexicon: list[str], rng: random.Random) -> str:
    return " ".join(rng.choice(lexicon) for _ in range(n_words))


def _lengths(kind: str, budget: int, rng: random.Random) -> tuple[int, int, int]:
    """(prompt, chosen, rejected) words of one row of ``kind``."""
    if kind == "long_tail":
        total = min(budget, max(8, int(rng.lognormvariate(0, 0.9) * budget / 7)))
        p = max(2, int(total * rng.uniform(0.2, 0.5)))
        return (p, *(max(1, int((total - p) * rng.uniform(0.5, 1.0))) for _ in range(2)))
    if kind == "long_prompt":  # multi-turn history as the prompt, short long-tailed answers
        p = max(4, int(budget * rng.uniform(0.35, 0.85)))
        return (p, *(max(1, min(budget - p, int(rng.lognormvariate(0, 0.8) * budget / 16))) for _ in range(2)))
    p = int(budget * rng.uniform(0.15, 0.35))
    return (p, *(max(1, int((budget - p) * rng.uniform(0.2, 0.6))) for _ in range(2)))


def _chat(n_words: int, lexicon: list[str], rng: random.Random) -> str:
    """A multi-turn history of ``n_words`` words: turns marked user: / assistant:."""
    words, speaker = [], 0
    while len(words) < n_words:
        turn = min(n_words - len(words), max(2, int(rng.lognormvariate(2.5, 0.6))))
        words += [("user:", "assistant:")[speaker]] + [rng.choice(lexicon) for _ in range(turn - 1)]
        speaker ^= 1
    return " ".join(words[:n_words])


def write_pairs(path: Path, rows: int, max_tokens: int, kind: str, seed: int) -> None:
    """Preference pairs as JSONL (prompt/chosen/rejected strings); one word is one token.

    ``uniform``: prompts take 15-35% of ``max_tokens`` and completions 20-60% of the rest.
    ``long_tail``: log-normal lengths (many short pairs, a few near the limit), the shape of
    real chat data. ``long_prompt``: multi-turn histories of 35-85% of ``max_tokens`` as the
    prompt and short log-normal answers (the prompt is most of each pair's tokens). Every
    row fits ``max_tokens`` including EOS.
    """
    rng = random.Random(seed)
    lexicon = _lexicon(400, random.Random(0))
    budget = max_tokens - 2  # EOS, and one token of slack
    with path.open("w", encoding="utf-8") as f:
        for _ in range(rows):
            p, c, r = _lengths(kind, budget, rng)
            prompt = _chat(p, lexicon, rng) if kind == "long_prompt" else _text(p, lexicon, rng)
            row = {"prompt": prompt, "chosen": " " + _text(c, lexicon, rng), "rejected": " " + _text(r, lexicon, rng)}
            f.write(json.dumps(row) + "\n")


def build_tokenizer(directory: Path, data: Path, vocab_size: int) -> None:
    """Train a byte-level BPE on the data and save it as a transformers tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )

    def texts():
        with data.open(encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                yield from (row["prompt"], row["chosen"], row["rejected"])

    tok.train_from_iterator(texts(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)
    fast.save_pretrained(str(directory))


# Model shapes. "tiny"/"small" are Llama-shaped for CPU runs; "qwen2-0.5b" and "llama-3.2-1b"
# are those architectures (random weights, built from these configs) for GPU runs.
MODELS: dict[str, dict] = {
    "tiny": dict(
        model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False,
    ),
    "small": dict(
        model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
    ),
    "qwen2-0.5b": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, vocab_size=151936,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
    "llama-3.2-1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, vocab_size=128256, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
}


def model_config(name: str, vocab_size: int, pad_id: int, eos_id: int) -> dict:
    """The transformers config dict of a named shape; the vocabulary is at least the tokenizer's."""
    cfg = dict(MODELS[name])
    cfg["vocab_size"] = max(cfg.get("vocab_size", 0), vocab_size)
    cfg.update(pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=eos_id)
    return cfg
