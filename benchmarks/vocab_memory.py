"""Scenario 3: memory of one forward + backward of per-token log-probs at a real vocabulary size.

A one-layer model with a tiny hidden size and a 128k/152k vocabulary isolates the
LM head, where full logits dominate memory. Three ways of getting the per-token
log-probs of the completion are measured, each in its own process:

- ``naive``: the model's full ``(batch, seq, vocab)`` logits, then log-softmax and gather;
- ``prefopt``: the backbone's hidden states through ``prefopt.engine.logprobs.chunked_token_logps``;
- ``trl``: TRL's fused LM head (``add_fused_lm_head``, as ``DPOTrainer`` installs it on the policy).
"""
from __future__ import annotations

import time

import torch

from benchmarks.probe import rss_bytes

_PROMPT_FRACTION = 0.25


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _build(spec: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "qwen2", vocab_size=spec["vocab_size"], hidden_size=spec["hidden_size"], intermediate_size=4 * spec["hidden_size"],
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=spec["seq_len"],
        tie_word_embeddings=False,
    )
    dtype = torch.bfloat16 if spec["device"] == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_config(config).to(device=spec["device"], dtype=dtype)
    b, t = spec["batch"], spec["seq_len"]
    ids = torch.randint(2, spec["vocab_size"], (b, t), device=spec["device"])
    labels = ids.clone()
    labels[:, : int(t * _PROMPT_FRACTION)] = -100  # the prompt: no log-probs needed
    return model, ids, labels


def _step(method: str, model, ids: torch.Tensor, labels: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    if method == "naive":
        from prefopt.engine.logprobs import naive_token_logps

        return naive_token_logps(model(input_ids=ids).logits, labels).sum()
    if method == "prefopt":
        from prefopt.engine.logprobs import chunked_token_logps

        hidden = model.model(input_ids=ids).last_hidden_state
        return chunked_token_logps(hidden, model.lm_head, labels, chunk_tokens=chunk_tokens)["logps"].sum()
    if method == "trl":
        return model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs.sum()
    raise ValueError(method)


def run(spec: dict) -> dict:
    """Measure one forward + backward; memory is the peak above what was resident just before it."""
    model, ids, labels = _build(spec)
    if spec["method"] == "trl":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    cuda = spec["device"] == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_bytes()
        _reset_peak_rss()
    t0 = time.perf_counter()
    _step(spec["method"], model, ids, labels, spec["chunk_tokens"]).backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss()
    return {"seconds": seconds, "peak_memory": peak - before, "memory_kind": "cuda allocated above start" if cuda else "RSS above start"}
