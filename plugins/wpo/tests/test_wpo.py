import math

import pytest
import torch

from prefopt import LossInputs, build_loss
from prefopt.losses.base import Feature, Tokens, reference_for
from prefopt.testing import check_loss, registered, trl_dpo_loss
from prefopt_wpo import WPO


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def batch(seed: int, lengths: list[int]) -> tuple[Tokens, Tokens, Tokens]:
    """Policy, reference and log-sum-of-squares per token: a plausible batch of 2B completions."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    policy = -torch.rand(n, generator=g, dtype=torch.float64) * 4
    ref = policy - 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
    logsumsq = policy * torch.rand(n, generator=g, dtype=torch.float64)  # log sum p^2 lies in [2 log p_max, 0]
    return tuple(Tokens.from_lengths(v.float(), lengths) for v in (policy, ref, logsumsq))


def inputs_of(policy: Tokens, ref: Tokens, logsumsq: Tokens) -> LossInputs:
    pc, pr = policy.sum()
    rc, rr = ref.sum()
    return LossInputs(pc, pr, ref_chosen_logps=rc, ref_rejected_logps=rr, policy_token_logps=policy, token_logsumsq=logsumsq)


def test_conformance():
    check_loss(WPO)
    check_loss(WPO, {"beta": 0.5})


def test_values_and_gradients_match_the_closed_form():
    # chosen: log p = (-1, -2), log sum p^2 = (-0.5, -0.5): w_w = exp(-1); rejected: (-3), (-1): w_l = exp(-2)
    lengths = [2, 1]
    leaf = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    policy = Tokens.from_lengths(leaf, lengths)
    logsumsq = Tokens.from_lengths(torch.tensor([-0.5, -0.5, -1.0]), lengths)
    ref = Tokens.from_lengths(torch.tensor([-1.0, -1.5, -2.0]), lengths)
    out = WPO(beta=0.1)(inputs_of(policy, ref, logsumsq))
    h = (-3.0 + 2.5) - (-3.0 + 2.0)  # 0.5
    w = math.exp(-3.0)
    assert out.loss.item() == pytest.approx(w * softplus(-0.1 * h), rel=1e-6)
    assert out.metrics["wpo/weight"].item() == pytest.approx(w)
    out.loss.backward()  # the weight is a constant: d/d log p_t = -+ w * beta * sigmoid(-beta h)
    g = w * 0.1 / (1 + math.exp(0.1 * h))
    torch.testing.assert_close(leaf.grad, torch.tensor([-g, -g, g]))


def test_declares_what_it_reads():
    needs = WPO().needs
    assert needs == {Feature.POLICY_LOGPS, Feature.REF_LOGPS, Feature.POLICY_TOKEN_LOGPS, Feature.TOKEN_LOGSUMSQ}
    assert reference_for(needs).name == "LOGPS"  # reference log-probs come from the cache


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_matches_trl_use_weighting(beta):
    pytest.importorskip("trl")
    policy, ref, logsumsq = batch(0, [5, 1, 7, 0, 3, 6, 2, 4])
    ours, theirs = policy.like(policy.values.clone().requires_grad_()), policy.like(policy.values.clone().requires_grad_())
    out = WPO(beta=beta)(inputs_of(ours, ref, logsumsq))
    expected = trl_dpo_loss(theirs, ref, beta, logsumsq=logsumsq)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    expected.backward()
    torch.testing.assert_close(ours.values.grad, theirs.values.grad, rtol=1e-5, atol=1e-5)


def test_selectable_by_name():
    with registered(WPO):
        loss = build_loss({"name": "wpo", "beta": 0.2})
    assert isinstance(loss, WPO) and loss.config.beta == 0.2
