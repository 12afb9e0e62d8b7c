"""Attention over packed rows: several sequences end to end, each attending only to itself.

Registered with transformers as the ``prefopt_packed`` attention implementation, so any
model whose attention layers go through transformers' attention interface (Llama, Qwen2,
Mistral, GPT-2, ...) can run packed batches. The kernel is chosen once per run:

- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention, CUDA, sm80+),
  one call for all sequences, no padding, no per-length plans;
- ``sdpa``: PyTorch's ``scaled_dot_product_attention`` per sequence; the fallback on
  CPU and where the varlen kernel is missing. Same numbers, more launches.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from prefopt.errors import ConfigError

NAME = "prefopt_packed"
_registered = False


def register() -> None:
    """Make ``prefopt_packed`` a transformers attention implementation (idempotent)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, packed_attention)
        _registered = True


@contextmanager
def standard(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` with transformers' own SDPA attention inside the block (generation, plain forwards).

    A policy set up for packed rows accepts only packed batches; anything else that calls
    the Hugging Face model directly goes through this.
    """
    config = model.config
    before = config._attn_implementation
    if before == NAME:
        config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        config._attn_implementation = before


def varlen_available(device: torch.device) -> bool:
    """True where the variable-length FlashAttention kernel can run (CUDA, sm80+, torch >= 2.10)."""
    if torch.device(device).type != "cuda":
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def choose_kernel(requested: str, device: torch.device, packing: bool, precision: str = "bf16") -> tuple[str, str]:
    """The attention kernel a run uses, and why (logged at start-up)."""
    if not packing:
        if requested not in ("auto", "sdpa", "eager"):
            raise ConfigError(f"trainer.attention: {requested} needs packed batches (trainer.packing: true)")
        kernel = "eager" if requested == "eager" else "sdpa"
        return kernel, "padded batches (trainer.packing: false) through transformers' own attention"
    if requested == "eager":
        raise ConfigError("trainer.attention: eager needs padded batches (trainer.packing: false)")
    has_varlen = varlen_available(device)
    if requested == "varlen" and not has_varlen:
        raise ConfigError("trainer.attention: varlen needs CUDA (sm80+) and torch >= 2.10; use auto or sdpa")
    if requested == "varlen" and precision == "fp32":
        raise ConfigError("trainer.attention: varlen (FlashAttention) needs trainer.precision bf16 or fp16")
    if requested == "sdpa" or not has_varlen or precision == "fp32":
        why = ("set by trainer.attention" if requested == "sdpa" else f"no variable-length kernel on {torch.device(device).type}"
               if not has_varlen else "FlashAttention needs bf16 or fp16; trainer.precision is fp32")
        return "sdpa", f"packed rows, one scaled_dot_product_attention call per sequence; {why}"
    return "varlen", "packed rows, one variable-length FlashAttention call per layer (no padding, no per-length plans)"


_NO_POSITION_IDS = {"bloom", "mpt"}  # ALiBi models: positions come from the sequence layout, not from position ids


def choose_sharing(requested: str | bool, model: torch.nn.Module, packing: bool) -> tuple[bool, str]:
    """Whether a run shares each prompt between its completions (``trainer.share_prompt``), and why (logged)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    backbone = getattr(base, "base_model", base)
    why_not = None
    if not packing:
        why_not = "it needs packed batches (trainer.packing: true)"
    elif config.model_type in _NO_POSITION_IDS or getattr(config, "alibi", False) or \
            "position_ids" not in inspect.signature(backbone.forward).parameters:
        why_not = f"model type {config.model_type} does not place tokens by position ids"
    if requested is True and why_not:
        raise ConfigError(f"trainer.share_prompt: true, but {why_not}; use auto or false")
    if requested is False:
        return False, "set by trainer.share_prompt: false; each prompt computed once per completion"
    if why_not:
        return False, f"off: {why_not}; each prompt computed once per completion"
    return True, ("each pair one packed segment [prompt | chosen | rejected]: the prompt computed once, "
                  "each completion attending to the prompt and itself, positions continuing from the prompt's end")


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed sequence; ``query`` is ``(1, heads, L, dim)``."""
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ConfigError("trainer.packing: this model's attention (soft-capping or sinks) is not supported packed; set trainer.packing: false")
    kernel = kwargs.get("prefopt_kernel")
    if kernel is None:
        raise RuntimeError("this model is set up for packed batches (prefopt_packed attention); "
                           "call it on other inputs inside prefopt.engine.attention.standard(model)")
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if kernel == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # (L, heads, dim)
        if q.dtype == torch.float32:  # rotary embeddings in fp32 promote q and k; FlashAttention takes bf16/fp16
            device = q.device.type
            if not torch.is_autocast_enabled(device):
                raise ConfigError("trainer.attention: varlen (FlashAttention) needs trainer.precision bf16 or fp16")
            dtype = torch.get_autocast_dtype(device)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        kv_index = kwargs.get("prefopt_kv_index")
        if kv_index is not None:  # shared prompts: each completion's keys are [prompt | completion]
            k, v = k.index_select(0, kv_index), v.index_select(0, kv_index)
        # with fewer queries than keys, FlashAttention aligns the causal mask (and the window) to the end
        out = varlen_attn(q, k, v, kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"], kwargs["max_length_q"], kwargs["max_length_k"],
                          scale=scaling, window_size=(window - 1 if window else -1, 0), enable_gqa=k.shape[1] != q.shape[1])
        return out.unsqueeze(0), None
    p = dropout if module.training else 0.0
    return _per_sequence(query, key, value, kwargs["prefopt_cu_host"], window, p, scaling,
                         kwargs.get("prefopt_cu_k_host"), kwargs.get("prefopt_kv_index")), None


@functools.lru_cache(maxsize=512)
def _end_aligned_mask(n: int, m: int, window: int | None, device: torch.device) -> torch.Tensor:
    """``n`` queries over ``m >= n`` keys: causal aligned to the end, within ``window`` positions (built once per shape)."""
    mask = torch.ones(n, m, dtype=torch.bool, device=device).tril(m - n)
    return mask.triu(m - n - window + 1) if window else mask


@torch.compiler.disable
def _per_sequence(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_host: torch.Tensor, window: int | None,
                  dropout: float, scaling: float | None, cu_k_host: torch.Tensor | None = None,
                  kv_index: torch.Tensor | None = None) -> torch.Tensor:
    """One SDPA call per piece, ``(1, L, heads, dim)``; ``cu_host``: the query boundaries, an int64 CPU tensor.

    With ``kv_index`` (shared prompts), piece ``i``'s keys are ``key[kv_index]`` between ``cu_k_host[i]`` and
    ``cu_k_host[i + 1]``, at least as many as its queries: the mask is causal aligned to the end, the
    window counted in positions. Left out of compiled regions: a loop over the boundaries would make every
    batch composition a recompile."""
    gqa = key.shape[1] != query.shape[1]
    if kv_index is not None:
        key, value = key.index_select(2, kv_index), value.index_select(2, kv_index)
    cu_k_host = cu_host if kv_index is None else cu_k_host
    parts = []
    queries = query.tensor_split(cu_host[1:-1], dim=2)
    for q, k, v in zip(queries, *(t.tensor_split(cu_k_host[1:-1], dim=2) for t in (key, value))):
        n, m = q.shape[2], k.shape[2]
        if (window and m > window) or n != m:
            mask = _end_aligned_mask(n, m, window, q.device)
            parts.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=gqa))
        else:
            parts.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scaling, enable_gqa=gqa))
    return torch.cat(parts, 2).transpose(1, 2).contiguous()
