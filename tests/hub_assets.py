"""What a Hub download gives, built offline: a small Qwen2-shaped chat model and preference
datasets in the schemas TRL users bring (``trl-lib/ultrafeedback_binarized`` and others)."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

# Qwen2.5-Instruct's template without its tool branch: ChatML, a default system turn,
# no BOS, every turn closed by <|im_end|> (the EOS) and a newline.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINGS = ["cafe", "phone", "hotel", "movie", "park", "book", "train", "song"]
GOOD = ["lovely", "great", "kind", "bright", "calm"]
BAD = ["awful", "slow", "rude", "dull", "loud"]


def ultrafeedback_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Rows in the schema of ``trl-lib/ultrafeedback_binarized``: conversational, prompt implicit."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        thing = rng.choice(THINGS)
        user = {"content": f"How was the {thing}?", "role": "user"}
        good, bad = rng.choice(GOOD), rng.choice(BAD)
        rows.append({
            "chosen": [user, {"content": f"The {thing} was {good}.", "role": "assistant"}],
            "rejected": [user, {"content": f"The {thing} was {bad}.", "role": "assistant"}],
            "score_chosen": float(rng.randint(7, 10)),
            "score_rejected": float(rng.randint(1, 5)),
        })
    return rows


def write_hub_dataset(root: Path, splits: dict[str, list[dict[str, Any]]]) -> Path:
    """A dataset directory as the Hub stores one: ``data/<split>-00000-of-00001.parquet``."""
    import datasets

    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        datasets.Dataset.from_list(rows).to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def build_chat_tokenizer(texts: list[str]):
    """A byte-level BPE tokenizer shaped like Qwen2's: no BOS, EOS ``<|im_end|>``, pad ``<|endoftext|>``, ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=SPECIAL)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def write_hub_model(root: Path, tokenizer, seed: int = 0) -> Path:
    """A small Qwen2 model and its tokenizer saved with ``save_pretrained`` into one directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from prefopt.testing.tiny import model_config

    ids = {"bos_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    cfg = model_config("qwen2", vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=4, max_position=128, **ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(root, safe_serialization=True)
    tokenizer.save_pretrained(root)
    return root


def build_hub_assets(root: Path) -> dict[str, Path]:
    """``model`` (Qwen2-shaped, with tokenizer) and ``dataset`` (ultrafeedback_binarized-shaped) under ``root``."""
    splits = {"train": ultrafeedback_rows(64, seed=1), "test": ultrafeedback_rows(12, seed=2)}
    texts = [m["content"] for rows in splits.values() for r in rows for k in ("chosen", "rejected") for m in r[k]]
    tokenizer = build_chat_tokenizer(texts * 4 + ["You are a helpful assistant.", "system user assistant"] * 8)
    return {
        "model": write_hub_model(root / "Qwen2-tiny-Instruct", tokenizer),
        "dataset": write_hub_dataset(root / "ultrafeedback_binarized", splits),
    }
