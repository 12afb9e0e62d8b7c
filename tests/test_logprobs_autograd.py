"""The chunked log-prob and token-KL autograd functions match autograd through full logits."""
from __future__ import annotations

import pytest
import torch

from prefopt.engine.logprobs import chunked_token_logps, naive_token_kl, naive_token_logps

N, T, H, V = 3, 11, 8, 50


def _labels() -> torch.Tensor:
    labels = torch.randint(0, V, (N, T))
    labels[:, :4] = -100
    labels[1, 8:] = -100
    return labels


def _run(chunked: bool, hidden, head, labels, ref=None, weights=None, autocast=False):
    hidden.grad = None
    head.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if chunked:
            out = chunked_token_logps(hidden, head, labels, 4, *(ref or (None, None)))
        else:
            logits = head(hidden)
            out = {"logps": naive_token_logps(logits, labels)}
            if ref:
                ref_logits = ref[1](ref[0])
                out.update(kl=naive_token_kl(ref_logits, logits, labels), ref_logps=naive_token_logps(ref_logits, labels))
    loss = sum((out[k] * weights[k]).sum() for k in ("logps", "kl") if k in out)
    loss.backward()
    grads = [hidden.grad] + [p.grad for p in head.parameters()]
    return [v.detach().float() for v in out.values()] + [g.float() for g in grads]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("with_kl", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_matches_full_logits(bias: bool, with_kl: bool, autocast: bool) -> None:
    torch.manual_seed(0)
    dtype = torch.float32 if autocast else torch.float64
    hidden = torch.randn(N, T, H, dtype=dtype, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=bias).to(dtype)
    ref = (torch.randn(N, T, H, dtype=dtype), torch.nn.Linear(H, V, bias=bias).to(dtype).requires_grad_(False)) if with_kl else None
    labels = _labels()
    weights = {"logps": torch.randn(N, T - 1), "kl": torch.randn(N, T - 1)}
    want = _run(False, hidden, head, labels, ref, weights, autocast)
    got = _run(True, hidden, head, labels, ref, weights, autocast)
    tol = 3e-2 if autocast else 1e-6
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=tol * (1 + w.abs().max().item()), rtol=0)


def test_no_completion_positions_gives_zeros() -> None:
    with torch.no_grad():
        out = chunked_token_logps(torch.randn(2, 5, 8), torch.nn.Linear(8, 20), torch.full((2, 5), -100), 4, torch.randn(2, 5, 8), torch.nn.Linear(8, 20))
    assert set(out) == {"logps", "kl", "ref_logps"}
    assert all(v.shape == (2, 4) and not v.any() for v in out.values())


@pytest.mark.parametrize("bias", [False, True])
def test_entropy_and_log_sum_of_squares_match_full_logits(bias: bool) -> None:
    """Per-token entropy and log(sum p^2), values and gradients, against autograd through full log-softmax."""
    from prefopt.engine.logprobs import token_features

    torch.manual_seed(1)
    h = torch.randn(13, H, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=bias).to(torch.float64)
    target = torch.randint(0, V, (13,))
    w = {k: torch.randn(13, dtype=torch.float64) for k in ("logps", "entropy", "logsumsq")}

    out = token_features(h, head, target, 4, stats=True)
    (sum((out[k] * w[k]).sum() for k in w)).backward()
    got = [out[k].detach() for k in w] + [h.grad.clone()] + [p.grad.clone() for p in head.parameters()]

    h.grad = None
    head.zero_grad()
    logp = head(h).log_softmax(-1)
    want_out = {"logps": logp.gather(-1, target[:, None])[:, 0], "entropy": -(logp.exp() * logp).sum(-1), "logsumsq": (2 * logp).logsumexp(-1)}
    (sum((want_out[k] * w[k]).sum() for k in w)).backward()
    want = [want_out[k].detach() for k in w] + [h.grad] + [p.grad for p in head.parameters()]
    for g, x in zip(got, want):  # the vocabulary reductions run in fp32
        assert torch.allclose(g.double(), x.double(), atol=1e-6 * (1 + x.abs().max().item()), rtol=0)
