"""CPU kernels for PyTorch's variable-length attention ops, so the engine's CUDA attention branch runs on CPU.

``torch.nn.attention.varlen.varlen_attn`` calls the custom op ``torch_attn::_varlen_attn`` (FlashAttention,
CUDA only) and its registered backward ``torch_attn::_varlen_attn_backward``. Registering CPU kernels for
both keeps everything else real: the public function, the op's autograd formula, and its fake (meta)
implementation that ``torch.compile`` traces. The math is plain attention in fp32 over each sequence
(causal, with a left window; with fewer queries than keys both aligned to the end, as FlashAttention's
are), returning the kernel's dtypes and shapes: ``out`` like ``query``, ``lse``
``(heads, total_q)`` in fp32.
"""
from __future__ import annotations

import torch

_registered = False
calls: list[tuple[int, ...]] = []  # the query shape of every forward call


def _check(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu: torch.Tensor, max_q: int, cu_k: torch.Tensor,
           max_k: int) -> None:
    """What FlashAttention's varlen forward requires of its inputs (it reads only ``max_q`` tokens of a sequence)."""
    assert query.ndim == key.ndim == value.ndim == 3, "expects (tokens, heads, dim)"
    assert query.dtype == key.dtype == value.dtype and query.dtype in (torch.float16, torch.bfloat16), \
        f"FlashAttention takes fp16 or bf16 q/k/v, got {query.dtype}, {key.dtype}, {value.dtype}"
    assert all(t.stride(-1) == 1 for t in (query, key, value)), "last dimension must be contiguous"
    assert cu.dtype == torch.int32 and int(cu[-1]) == query.shape[0], "cu_seqlens: int32, ending at the token count"
    assert max_q >= int((cu[1:] - cu[:-1]).max()), "max_seqlen below the longest sequence"
    assert cu_k.dtype == torch.int32 and cu_k.shape == cu.shape and int(cu_k[-1]) == key.shape[0], \
        "cu_seqlens_k: int32, one boundary per query boundary, ending at the key count"
    assert max_k >= int((cu_k[1:] - cu_k[:-1]).max()), "max_seqlen_k below the longest key sequence"


def _spans(cu: torch.Tensor) -> list[tuple[int, int]]:
    bounds = cu.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float | None, causal: bool, window: list[int]) -> torch.Tensor:
    """``(heads, Lq, Lk)`` masked scores of one sequence; k already repeated to the query heads."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    i = torch.arange(q.shape[0])[:, None] + (k.shape[0] - q.shape[0])  # FlashAttention: aligned to the bottom right
    j = torch.arange(k.shape[0])[None, :]
    keep = torch.ones_like(s[0], dtype=torch.bool)
    if causal or window[1] >= 0:
        keep &= j <= i + max(window[1], 0)
    if window[0] >= 0:
        keep &= j >= i - window[0]
    return s.masked_fill(~keep, float("-inf"))


def _repeat(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.repeat_interleave(heads // t.shape[1], dim=1)


def forward(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, scale=None, window_size=None,
            enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    _check(query, key, value, cu_seq_q, max_q, cu_seq_k, max_k)
    calls.append(tuple(query.shape))
    window = list(window_size) if window_size is not None else [-1, -1]
    heads = query.shape[1]
    out = torch.empty_like(query)
    lse = torch.empty((heads, query.shape[0]), dtype=torch.float)
    for (a, b), (c, d) in zip(_spans(cu_seq_q), _spans(cu_seq_k)):
        q, k, v = query[a:b].float(), _repeat(key[c:d], heads).float(), _repeat(value[c:d], heads).float()
        s = _scores(q, k, scale, is_causal, window)
        lse[:, a:b] = torch.logsumexp(s, -1)
        out[a:b] = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v).to(query.dtype)
    return out, lse, torch.zeros(2, dtype=torch.uint64)


def backward(grad_out, query, key, value, out, lse, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, rng_state,
             scale=None, window_size=None):
    window = list(window_size) if window_size is not None else [-1, -1]
    heads, kv_heads = query.shape[1], key.shape[1]
    dq, dk, dv = (torch.zeros_like(t, dtype=torch.float) for t in (query, key, value))
    sc = query.shape[-1] ** -0.5 if scale is None else scale
    for (a, b), (c, d) in zip(_spans(cu_seq_q), _spans(cu_seq_k)):
        q, k, v = query[a:b].float(), _repeat(key[c:d], heads).float(), _repeat(value[c:d], heads).float()
        p = torch.softmax(_scores(q, k, scale, is_causal, window), -1)  # (h, q, k)
        g, o = grad_out[a:b].float(), out[a:b].float()
        dp = torch.einsum("qhd,khd->hqk", g, v)
        ds = p * (dp - (g * o).sum(-1).transpose(0, 1)[:, :, None])
        dq[a:b] = torch.einsum("hqk,khd->qhd", ds, k) * sc
        group = heads // kv_heads  # grouped-query attention: key/value heads collect their query heads' gradients
        dk[c:d] = (torch.einsum("hqk,qhd->khd", ds, q) * sc).unflatten(1, (kv_heads, group)).sum(2)
        dv[c:d] = torch.einsum("hqk,qhd->khd", p, g).unflatten(1, (kv_heads, group)).sum(2)
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype)


def register() -> None:
    """Register the CPU kernels (once per process; nothing else in a CPU process can run these ops)."""
    global _registered
    if _registered:
        return
    import torch.nn.attention.varlen  # noqa: F401  (defines the ops)

    torch.library.register_kernel("torch_attn::_varlen_attn", "cpu", forward)
    torch.library.register_kernel("torch_attn::_varlen_attn_backward", "cpu", backward)
    _registered = True
