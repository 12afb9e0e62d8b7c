"""Tiny tokenizers and model configs built locally, for tests, examples and benchmarks.

The tokenizer's special tokens come first in its vocabulary, so their ids are fixed:
``<|bos|>`` = 0, ``<|eos|>`` = 1, ``<|pad|>`` = 2, then the chat role markers
``<|system|>``, ``<|user|>``, ``<|assistant|>``, ``<|tool|>`` = 3..6.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
SPECIAL_TOKENS = [BOS, EOS, PAD, *ROLE_TOKENS]
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on ``texts``.

    ``tokenizer(text)`` prepends BOS; ``add_special_tokens=False`` does not. The vocabulary
    has at most ``vocab_size`` entries (fewer when the texts run out of merges): check
    ``len(tokenizer)`` before sizing a model's embedding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def model_config(
    arch: str = "llama",
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position: int = 512,
    **overrides: Any,
) -> dict[str, Any]:
    """A small config dict for ``transformers.AutoConfig.for_model(**d)``.

    ``arch`` is llama, qwen2 or gpt2. Special-token ids match :func:`build_tokenizer`.
    """
    ids = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    if arch in ("llama", "qwen2"):
        config = {
            "model_type": arch,
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": 4 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_heads,
            "max_position_embeddings": max_position,
            "tie_word_embeddings": False,
            **ids,
        }
    elif arch == "gpt2":
        config = {
            "model_type": "gpt2",
            "vocab_size": vocab_size,
            "n_embd": hidden_size,
            "n_layer": num_layers,
            "n_head": num_heads,
            "n_positions": max_position,
            **ids,
        }
    else:
        raise ValueError(f"unknown arch {arch!r}: expected llama, qwen2 or gpt2")
    config.update(overrides)
    return config
