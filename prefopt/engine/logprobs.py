"""Per-token completion log-probs and token KL, without materialising (rows x seq x vocab) logits.

Only completion positions go through the LM head, a chunk of positions at a time,
with log-softmax in fp32. Custom autograd functions keep only each chunk's
log-normaliser and recompute the chunk's logits in backward, turning them into their
gradient in place, so peak memory holds about one chunk's logits (two with the token
KL), not the whole batch's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from prefopt.data.batching import IGNORE_INDEX


def shift_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets for positions ``0..T-2`` (``logits[:, :-1]`` predict ``labels[:, 1:]``) and their mask."""
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    return target.masked_fill(~mask, 0), mask


def naive_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Reference implementation: per-token log-probs ``(N, T-1)``, zero at masked positions."""
    target, mask = shift_labels(labels)
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return logp * mask


def naive_token_kl(ref_logits: torch.Tensor, policy_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Reference implementation: per-token KL(ref || policy) ``(N, T-1)``, zero at masked positions."""
    _, mask = shift_labels(labels)
    ref = ref_logits[:, :-1].float().log_softmax(-1)
    pol = policy_logits[:, :-1].float().log_softmax(-1)
    return (ref.exp() * (ref - pol)).sum(-1) * mask


def _matmul_dtype(hidden: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def _head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    with torch.autocast(hidden.device.type, enabled=False):
        return F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)).float()


def _head_grads(ctx, g: torch.Tensor, h: torch.Tensor, w: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Gradients of hidden, weight and bias from the logits' gradient ``g`` (only those autograd asks for)."""
    with torch.autocast(hidden.device.type, enabled=False):
        gh = (g @ w).to(hidden.dtype) if ctx.needs_input_grad[0] else None
        gw = (g.t() @ h).to(weight.dtype) if ctx.needs_input_grad[1] else None
        gb = g.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
    return gh, gw, gb


class _ChunkLogps(torch.autograd.Function):
    """Log-probs of the targets under the LM head, for one chunk of positions.

    Forward keeps only the log-normaliser; backward recomputes the chunk's logits and
    turns them into their gradient in place, so about one chunk of fp32 logits is
    alive at a time (autograd through log-softmax would hold several).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target):  # type: ignore[override]
        dtype = _matmul_dtype(hidden)
        logits = _head_logits(hidden, weight, bias, dtype)
        picked = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        lse = logits.logsumexp(-1)
        ctx.save_for_backward(hidden, weight, bias, target, lse)
        ctx.dtype = dtype
        return picked - lse

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        hidden, weight, bias, target, lse = ctx.saved_tensors
        dtype = ctx.dtype
        h, w = hidden.to(dtype), weight.to(dtype)
        # d logp_t / d z = onehot(t) - softmax(z), scaled by the incoming gradient
        g = _head_logits(h, w, bias, dtype).sub_(lse.unsqueeze(-1)).exp_().mul_(-grad.unsqueeze(-1))
        g.scatter_add_(-1, target.unsqueeze(-1), grad.unsqueeze(-1).to(g.dtype))
        g = g.to(dtype)
        gh, gw, gb = _head_grads(ctx, g, h, w, hidden, weight, bias)
        return gh, gw, gb, None


def _logps_chunk(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
    return _ChunkLogps.apply(hidden, weight, bias, target)


class _ChunkLogpsKL(torch.autograd.Function):
    """Policy log-probs, per-token KL(ref || policy) and reference log-probs, for one chunk.

    As :class:`_ChunkLogps`: forward keeps only the two log-normalisers, backward
    recomputes both chunks of logits in place. Gradients reach the policy only.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, target):  # type: ignore[override]
        dtype = _matmul_dtype(hidden)
        label = target.unsqueeze(-1)
        logp = _head_logits(hidden, weight, bias, dtype)
        lse = logp.logsumexp(-1)
        logp = logp.sub_(lse.unsqueeze(-1))
        ref_logp = _head_logits(ref_hidden, ref_weight, ref_bias, dtype)
        ref_lse = ref_logp.logsumexp(-1)
        ref_logp = ref_logp.sub_(ref_lse.unsqueeze(-1))
        picked = logp.gather(-1, label).squeeze(-1)
        ref_picked = ref_logp.gather(-1, label).squeeze(-1)
        diff = logp.neg_().add_(ref_logp)  # log q - log p
        kl = diff.mul_(ref_logp.exp_()).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, target, lse, ref_lse)
        ctx.dtype = dtype
        ctx.mark_non_differentiable(ref_picked)
        return picked, kl, ref_picked

    @staticmethod
    def backward(ctx, grad_logp, grad_kl, _grad_ref):  # type: ignore[override]
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, target, lse, ref_lse = ctx.saved_tensors
        dtype = ctx.dtype
        h, w = hidden.to(dtype), weight.to(dtype)
        # d logp_t / dz = onehot(t) - p and d KL / dz = p - q, so the logits' gradient is
        # p * (g_kl - g_logp) - q * g_kl + onehot(t) * g_logp
        g = _head_logits(h, w, bias, dtype).sub_(lse.unsqueeze(-1)).exp_().mul_((grad_kl - grad_logp).unsqueeze(-1))
        q = _head_logits(ref_hidden, ref_weight, ref_bias, dtype).sub_(ref_lse.unsqueeze(-1)).exp_()
        g.sub_(q.mul_(grad_kl.unsqueeze(-1)))
        del q
        g.scatter_add_(-1, target.unsqueeze(-1), grad_logp.unsqueeze(-1).to(g.dtype))
        g = g.to(dtype)
        gh, gw, gb = _head_grads(ctx, g, h, w, hidden, weight, bias)
        return gh, gw, gb, None, None, None, None


class _ChunkLogpsStats(torch.autograd.Function):
    """Log-probs of the targets with the policy's per-token entropy and log(sum_v p_v^2), from one projection.

    For losses that declare those features. Backward recomputes the chunk's logits once and uses
    d logp_t / d z = onehot(t) - p, d H / d z = -p (log p + H), d log(sum p^2) / d z = 2 (p^2 / sum(p^2) - p).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target):  # type: ignore[override]
        dtype = _matmul_dtype(hidden)
        logits = _head_logits(hidden, weight, bias, dtype)
        # log-probs exactly as _ChunkLogps computes them (not log_softmax, which rounds differently), so a
        # loss reading these statistics sees the same log-probs as the reference and policy = reference ties exactly
        lse = logits.logsumexp(-1)
        picked = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) - lse
        logp = logits.sub_(lse.unsqueeze(-1))
        entropy = -(logp.exp() * logp).sum(-1)
        logsumsq = (2 * logp).logsumexp(-1)
        ctx.save_for_backward(hidden, weight, bias, target, lse, entropy, logsumsq)
        ctx.dtype = dtype
        return picked, entropy, logsumsq

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, grad_logsumsq):  # type: ignore[override]
        hidden, weight, bias, target, lse, entropy, logsumsq = ctx.saved_tensors
        dtype = ctx.dtype
        h, w = hidden.to(dtype), weight.to(dtype)
        logp = _head_logits(h, w, bias, dtype).sub_(lse.unsqueeze(-1))
        p = logp.exp()
        g = (logp + entropy.unsqueeze(-1)).mul_(p).mul_(-grad_entropy.unsqueeze(-1))
        g.add_((2 * logp - logsumsq.unsqueeze(-1)).exp_().sub_(p).mul_(2 * grad_logsumsq.unsqueeze(-1)))
        g.sub_(p.mul_(grad_logp.unsqueeze(-1)))
        del p, logp
        g.scatter_add_(-1, target.unsqueeze(-1), grad_logp.unsqueeze(-1).to(g.dtype))
        g = g.to(dtype)
        gh, gw, gb = _head_grads(ctx, g, h, w, hidden, weight, bias)
        return gh, gw, gb, None


def token_features(
    hidden: torch.Tensor,
    head: torch.nn.Linear,
    target: torch.Tensor,
    chunk_tokens: int = 512,
    *,
    ref_hidden: torch.Tensor | None = None,
    ref_head: torch.nn.Linear | None = None,
    stats: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-token quantities of flat completion positions: ``hidden (N, H)`` predicting ``target (N,)``.

    Always ``logps`` ``(N,)``. With ``ref_hidden``/``ref_head`` also ``kl`` (KL(ref || policy)
    over the vocabulary) and ``ref_logps``; with ``stats`` also ``entropy`` and ``logsumsq``
    (log of the summed squared probabilities). One pass over chunks of ``chunk_tokens``
    positions; no chunk's logits outlive it.
    """
    outs: dict[str, list[torch.Tensor]] = {"logps": [], "kl": [], "ref_logps": [], "entropy": [], "logsumsq": []}
    for start in range(0, hidden.shape[0], chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        if ref_hidden is not None:
            assert ref_head is not None
            lp, kl, rlp = _ChunkLogpsKL.apply(hidden[sl], head.weight, head.bias, ref_hidden[sl], ref_head.weight, ref_head.bias, target[sl])
            outs["kl"].append(kl)
            outs["ref_logps"].append(rlp)
            if stats:  # a second projection; rare (a loss reading both the KL and the policy's statistics)
                _, ent, lss = _ChunkLogpsStats.apply(hidden[sl], head.weight, head.bias, target[sl])
        elif stats:
            lp, ent, lss = _ChunkLogpsStats.apply(hidden[sl], head.weight, head.bias, target[sl])
        else:
            lp = _logps_chunk(hidden[sl], head.weight, head.bias, target[sl])
        outs["logps"].append(lp)
        if stats:
            outs["entropy"].append(ent)
            outs["logsumsq"].append(lss)
    empty = hidden.new_zeros(0, dtype=torch.float32)
    wanted = {"logps"} | ({"kl", "ref_logps"} if ref_hidden is not None else set()) | ({"entropy", "logsumsq"} if stats else set())
    return {k: torch.cat(v) if v else empty for k, v in outs.items() if k in wanted}


def chunked_token_logps(
    hidden: torch.Tensor,
    head: torch.nn.Linear,
    labels: torch.Tensor,
    chunk_tokens: int = 512,
    ref_hidden: torch.Tensor | None = None,
    ref_head: torch.nn.Linear | None = None,
) -> dict[str, torch.Tensor]:
    """Per-token log-probs of padded ``labels`` from final hidden states ``(N, T, H)``, as dense ``(N, T-1)``.

    A dense wrapper of :func:`token_features` (zero where masked). With ``ref_hidden`` and
    ``ref_head`` it also returns ``kl`` and ``ref_logps``.
    """
    target, mask = shift_labels(labels)
    pos = mask.nonzero(as_tuple=True)
    ref_h = ref_hidden[:, :-1][pos] if ref_hidden is not None else None
    flat = token_features(hidden[:, :-1][pos], head, target[pos], chunk_tokens, ref_hidden=ref_h, ref_head=ref_head)
    result = {}
    for key, values in flat.items():
        dense = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
        result[key] = dense.index_put(pos, values)
    return result
