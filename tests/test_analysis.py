import math

import pytest
import torch

from prefopt.analysis import token_rewards
from prefopt.losses import DPO, LossInputs


def test_token_rewards_values_and_mask():
    policy = torch.tensor([[-1.0, -2.0, -0.5, float("-inf")], [-3.0, -0.25, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -2.0], [-1.0, -0.75, float("nan"), -4.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 1]])
    out = token_rewards(policy, ref, mask, beta=0.1)
    expected = torch.tensor([[0.05, -0.1, 0.0, 0.0], [-0.2, 0.05, 0.0, 0.3]])
    torch.testing.assert_close(out, expected)
    assert torch.isfinite(out).all()


def test_token_rewards_sum_to_the_dpo_sequence_reward():
    gen = torch.Generator().manual_seed(0)
    policy = -torch.rand(2, 2, 5, generator=gen, dtype=torch.float64) * 3  # (pair, chosen/rejected, t)
    ref = -torch.rand(2, 2, 5, generator=gen, dtype=torch.float64) * 3
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).expand(2, 2, 5)
    seq = lambda x: (x * mask).sum(-1)  # noqa: E731
    beta = 0.3
    per_token = token_rewards(policy, ref, mask, beta).sum(-1)
    out = DPO(beta=beta)(
        LossInputs(seq(policy)[:, 0], seq(policy)[:, 1], ref_chosen_logps=seq(ref)[:, 0], ref_rejected_logps=seq(ref)[:, 1])
    )
    assert out.metrics["rewards/chosen"].item() == pytest.approx(per_token[:, 0].mean().item(), rel=1e-12)
    assert out.metrics["rewards/rejected"].item() == pytest.approx(per_token[:, 1].mean().item(), rel=1e-12)
    assert not math.isclose(per_token[:, 0].mean().item(), 0.0)


def test_token_rewards_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        token_rewards(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), beta=0.1)
