import math

import pytest
import torch

from prefopt import LossInputs, Reference, build_loss
from prefopt.losses.base import reference_for
from prefopt.errors import ConfigError
from prefopt.testing import check_loss, registered
from prefopt_simpo import SimPO


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_conformance():
    check_loss(SimPO)
    check_loss(SimPO, {"beta": 2.5, "gamma": 1.375})


def test_values_match_the_closed_form():
    # -logsigmoid(beta * (pc/|y_w| - pr/|y_l|) - gamma) = softplus(-(...))
    inputs = LossInputs(
        policy_chosen_logps=[-4.0, -10.0, -1.0],
        policy_rejected_logps=[-6.0, -3.0, -21.0],
        chosen_tokens=[2, 5, 4],
        rejected_tokens=[3, 1, 7],
    )
    out = SimPO(beta=2.0, gamma=0.5)(inputs)
    avg_c, avg_r = [-2.0, -2.0, -0.25], [-2.0, -3.0, -3.0]
    expected = [softplus(-(2.0 * (c - r) - 0.5)) for c, r in zip(avg_c, avg_r)]
    torch.testing.assert_close(out.losses, torch.tensor(expected))
    torch.testing.assert_close(out.loss, torch.tensor(expected).mean())
    assert out.metrics["rewards/chosen"].item() == pytest.approx(2.0 * sum(avg_c) / 3)
    assert out.metrics["rewards/rejected"].item() == pytest.approx(2.0 * sum(avg_r) / 3)
    assert out.metrics["rewards/accuracies"].item() == pytest.approx(2 / 3)


def test_gamma_is_a_margin_in_reward_units():
    # The loss is ln 2 exactly when the reward margin beta * (avg_c - avg_r) equals gamma,
    # so a recipe's gamma_beta_ratio of 0.55 with beta 2.5 is gamma = 1.375.
    beta, ratio = 2.5, 0.55
    inputs = LossInputs(policy_chosen_logps=[-1.0], policy_rejected_logps=[-1.0 - ratio], chosen_tokens=[1], rejected_tokens=[1])
    out = SimPO(beta=beta, gamma=ratio * beta)(inputs)
    assert out.loss.item() == pytest.approx(math.log(2))
    assert SimPO(beta=beta, gamma=0.0)(inputs).loss.item() < math.log(2)


def test_length_normalised_and_reference_free():
    short = LossInputs(policy_chosen_logps=[-2.0], policy_rejected_logps=[-4.0], chosen_tokens=[2], rejected_tokens=[4])
    long = LossInputs(policy_chosen_logps=[-20.0], policy_rejected_logps=[-40.0], chosen_tokens=[20], rejected_tokens=[40])
    assert SimPO()(short).loss.item() == pytest.approx(SimPO()(long).loss.item())
    assert reference_for(SimPO().needs) is Reference.NONE


def test_selectable_by_name_with_validated_config():
    with registered(SimPO):
        loss = build_loss({"name": "simpo", "beta": 2.5, "gamma": 1.0})
        assert isinstance(loss, SimPO) and loss.config.gamma == 1.0
        with pytest.raises(ConfigError, match="loss.gamma_beta_ratio"):
            build_loss({"name": "simpo", "gamma_beta_ratio": 0.5})
