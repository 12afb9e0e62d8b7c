import math

import pytest

from prefopt import LossInputs, build_loss
from prefopt.testing import check_loss, registered
from prefopt_example_loss import MarginDPO


def test_contract():
    check_loss(MarginDPO)


def test_value():
    # h = 10, beta = 0.1, margin = 0.5: -logsigmoid(0.5) = log(1 + exp(-0.5))
    inputs = LossInputs(
        policy_chosen_logps=[-10.0], policy_rejected_logps=[-30.0], ref_chosen_logps=[-10.0], ref_rejected_logps=[-20.0]
    )
    out = MarginDPO(beta=0.1, margin=0.5)(inputs)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-0.5)))


def test_selectable_by_name():
    with registered(MarginDPO):
        loss = build_loss({"name": "example_margin", "margin": 1.0})
    assert isinstance(loss, MarginDPO) and loss.config.margin == 1.0
