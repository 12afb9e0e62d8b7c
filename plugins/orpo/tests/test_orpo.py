import math

import pytest
import torch

from prefopt import LossInputs, Reference, build_loss
from prefopt.losses.base import reference_for
from prefopt.testing import check_loss, registered
from prefopt_orpo import MAX_MEAN_LOGP, ORPO, log_odds


def exact_log_odds(m: float) -> float:
    """log(p / (1 - p)) for p = exp(m), in float64."""
    return m - math.log(-math.expm1(m))


def test_conformance():
    check_loss(ORPO)
    check_loss(ORPO, {"beta": 1.0})


@pytest.mark.parametrize("m", [-1e-5, -1e-3, -0.5, -math.log(2), -0.7, -3.0, -50.0, -1e3, -1e4])
def test_log_odds_is_accurate_from_near_zero_to_very_negative(m):
    assert log_odds(torch.tensor([m])).item() == pytest.approx(exact_log_odds(m), rel=1e-5)


def test_log_odds_is_finite_at_probability_one():
    m = torch.tensor([0.0, -1e-12, -1e4], requires_grad=True)
    assert torch.isinf(torch.log1p(-torch.exp(m.detach()[:1]))).all()  # the naive form
    value = log_odds(m)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(m.grad).all()
    expected = exact_log_odds(MAX_MEAN_LOGP)
    assert value[0].item() == pytest.approx(expected, rel=1e-4) and value[1].item() == pytest.approx(expected, rel=1e-4)


def test_values_match_the_closed_form():
    # NLL of the mean chosen log-prob + beta * -logsigmoid(log_odds(y_w) - log_odds(y_l))
    inputs = LossInputs(
        policy_chosen_logps=[-2.0, -30.0], policy_rejected_logps=[-6.0, -10.0], chosen_tokens=[4, 10], rejected_tokens=[3, 5]
    )
    beta = 0.25
    out = ORPO(beta=beta)(inputs)
    expected = []
    for mw, ml in [(-0.5, -2.0), (-3.0, -2.0)]:
        ratio = exact_log_odds(mw) - exact_log_odds(ml)
        expected.append(-mw + beta * math.log1p(math.exp(-ratio)))
    torch.testing.assert_close(out.losses, torch.tensor(expected))
    assert out.metrics["nll/chosen"].item() == pytest.approx(1.75)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(beta * -1.75)
    assert out.metrics["rewards/accuracies"].item() == pytest.approx(0.5)


def test_reference_free_and_selectable_by_name():
    with registered(ORPO):
        loss = build_loss({"name": "orpo", "beta": 0.2})
    assert isinstance(loss, ORPO) and reference_for(loss.needs) is Reference.NONE
