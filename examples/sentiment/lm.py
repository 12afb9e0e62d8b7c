"""The small language model: a GPT-2-shaped model on a locally trained tokenizer; SFT, sampling, log-probs.

Every sequence is ``BOS + prompt + completion + EOS``, the layout the preference
trainer gives a text pair.
"""
from __future__ import annotations

import math
import random

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

from prefopt.testing.tiny import build_tokenizer, model_config

__all__ = ["build_tokenizer", "build_model", "train_sft", "sample", "token_logps"]


def build_model(tokenizer: PreTrainedTokenizerBase, hidden_size: int, num_layers: int, num_heads: int, seed: int):
    """A freshly initialised GPT-2-shaped causal LM sized for ``tokenizer``."""
    torch.manual_seed(seed)
    config = model_config("gpt2", vocab_size=len(tokenizer), hidden_size=hidden_size, num_layers=num_layers,
                          num_heads=num_heads, max_position=128)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def train_sft(model, tokenizer: PreTrainedTokenizerBase, texts: list[str], epochs: int, batch_size: int, lr: float,
              seed: int, log=print) -> None:
    """Next-token training on whole reviews (BOS + text + EOS): AdamW, short warmup, cosine decay."""
    rows = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    steps = epochs * math.ceil(len(rows) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    step = 0
    for _ in range(epochs):
        rng.shuffle(rows)
        for start in range(0, len(rows), batch_size):
            ids, mask = (t.to(model.device) for t in _pad(rows[start : start + batch_size], tokenizer.pad_token_id))
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % 50 == 0 or step == steps:
                log(f"sft step {step}/{steps} loss {loss.item():.3f}")
    model.eval()


@torch.no_grad()
def sample(model, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int, batch_size: int,
           seed: int) -> list[tuple[list[int], list[int], bool]]:
    """One completion per prompt by pure sampling (temperature 1, no top-k/top-p), so its log-probs are those of pi.

    Prompts are batched by token length, so no padding shifts positions. Returns
    ``(prompt_ids, completion_ids, finished)`` in the order of ``prompts``;
    ``completion_ids`` ends in EOS when ``finished``, else it hit ``max_new_tokens``.
    """
    torch.manual_seed(seed)
    model.eval()
    eos = tokenizer.eos_token_id
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    out: list = [None] * len(prompts)
    for _, idx in sorted(by_len.items()):
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            ids = torch.tensor([encoded[i] for i in chunk], device=model.device)
            gen = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
            )
            for i, row in zip(chunk, gen[:, ids.shape[1] :].tolist()):
                done = eos in row
                out[i] = (encoded[i], row[: row.index(eos) + 1] if done else row, done)
    return out


@torch.no_grad()
def token_logps(model, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                batch_size: int = 128) -> list[torch.Tensor]:
    """Per-token log-probs of each completion given its prompt (one 1-D tensor per row)."""
    model.eval()
    out: list[torch.Tensor] = []
    for start in range(0, len(prompt_ids), batch_size):
        ps, cs = prompt_ids[start : start + batch_size], completion_ids[start : start + batch_size]
        ids, mask = (t.to(model.device) for t in _pad([p + c for p, c in zip(ps, cs)], tokenizer.pad_token_id))
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        for i, (p, c) in enumerate(zip(ps, cs)):
            out.append(logps[i, len(p) - 1 : len(p) - 1 + len(c)].cpu())
    return out
