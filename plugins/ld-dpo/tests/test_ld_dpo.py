import math

import pytest
import torch

from prefopt import LossInputs, build_loss
from prefopt.losses import DPO
from prefopt.losses.base import Feature, Tokens, reference_for
from prefopt.testing import check_loss, registered, trl_dpo_loss
from prefopt_ld_dpo import LDDPO


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def batch(seed: int, lengths: list[int]) -> tuple[Tokens, Tokens]:
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    policy = -torch.rand(n, generator=g) * 4
    ref = policy - 0.5 + torch.rand(n, generator=g)
    return Tokens.from_lengths(policy, lengths), Tokens.from_lengths(ref, lengths)


def inputs_of(policy: Tokens, ref: Tokens) -> LossInputs:
    return LossInputs(*policy.sum(), policy_token_logps=policy, ref_token_logps=ref)


def test_conformance():
    check_loss(LDDPO)
    check_loss(LDDPO, configs=[{"alpha": 0.0}, {"alpha": 1.0, "beta": 0.5}])


def test_values_and_gradients_match_the_closed_form():
    # chosen 3 tokens, rejected 1: the shared length is 1, chosen tokens 2 and 3 count alpha = 0.5
    leaf = torch.tensor([-1.0, -2.0, -3.0, -4.0], requires_grad=True)
    policy = Tokens.from_lengths(leaf, [3, 1])
    ref = Tokens.from_lengths(torch.tensor([-1.0, -1.0, -1.0, -2.0]), [3, 1])
    out = LDDPO(beta=0.1, alpha=0.5)(inputs_of(policy, ref))
    h = ((-1 + 0.5 * -5) - (-1 + 0.5 * -2)) - (-4 + 2)  # -1.5 + 2 = 0.5
    assert out.loss.item() == pytest.approx(softplus(-0.1 * h), rel=1e-6)
    out.loss.backward()
    g = 0.1 / (1 + math.exp(0.1 * h))
    torch.testing.assert_close(leaf.grad, torch.tensor([-g, -0.5 * g, -0.5 * g, g]))


def test_logps_metrics_are_the_desensitised_sums_as_trl_logs_them():
    # pair 0: chosen 3 tokens, rejected 1 (shared 1); pair 1: chosen 1, rejected 2 (shared 1); alpha = 0.5
    policy = Tokens.from_lengths(torch.tensor([-1.0, -2.0, -3.0, -0.5, -4.0, -1.0, -6.0]), [3, 1, 1, 2])
    ref = Tokens.from_lengths(torch.zeros(7), [3, 1, 1, 2])
    out = LDDPO(beta=0.1, alpha=0.5)(inputs_of(policy, ref))
    chosen = [-1 + 0.5 * (-2 - 3), -0.5]
    rejected = [-4.0, -1 + 0.5 * -6]
    assert out.metrics["logps/chosen"].item() == pytest.approx(sum(chosen) / 2, rel=1e-6)
    assert out.metrics["logps/rejected"].item() == pytest.approx(sum(rejected) / 2, rel=1e-6)


def test_alpha_one_is_dpo():
    policy, ref = batch(1, [4, 2, 6, 3, 5, 1])
    rc, rr = ref.sum()
    dpo = DPO(beta=0.1)(LossInputs(*policy.sum(), ref_chosen_logps=rc, ref_rejected_logps=rr))
    torch.testing.assert_close(LDDPO(beta=0.1, alpha=1.0)(inputs_of(policy, ref)).losses, dpo.losses)


def test_declares_per_token_log_probs_only():
    assert LDDPO().needs == {Feature.POLICY_LOGPS, Feature.POLICY_TOKEN_LOGPS, Feature.REF_TOKEN_LOGPS}
    assert reference_for(LDDPO().needs).name == "LOGPS"  # per-token reference log-probs: cacheable


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_matches_trl_ld_alpha(alpha):
    pytest.importorskip("trl")
    policy, ref = batch(0, [5, 1, 7, 0, 3, 6, 2, 4])
    ours, theirs = policy.like(policy.values.clone().requires_grad_()), policy.like(policy.values.clone().requires_grad_())
    out = LDDPO(beta=0.2, alpha=alpha)(inputs_of(ours, ref))
    expected = trl_dpo_loss(theirs, ref, 0.2, ld_alpha=alpha)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    expected.backward()
    torch.testing.assert_close(ours.values.grad, theirs.values.grad, rtol=1e-5, atol=1e-5)


def test_selectable_by_name():
    with registered(LDDPO):
        loss = build_loss({"name": "ld_dpo", "alpha": 0.25})
    assert isinstance(loss, LDDPO) and loss.config.alpha == 0.25
