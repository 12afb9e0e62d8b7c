import math

import pytest
import torch

from prefopt import LossInputs, Reference, build_loss
from prefopt.losses.base import reference_for
from prefopt.losses import DPO
from prefopt.testing import check_loss, registered
from prefopt_robust import RobustDPO

# Published vectors (torchtune's DPO loss tests): h = [0, 10, 20].
PUBLISHED = LossInputs(
    policy_chosen_logps=[-0.5, -10.0, -1.0],
    policy_rejected_logps=[-0.1, -30.0, -21.0],
    ref_chosen_logps=[-0.5, -10.1, -0.1],
    ref_rejected_logps=[-0.1, -20.1, -0.1],
)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_conformance():
    check_loss(RobustDPO)
    check_loss(RobustDPO, {"label_smoothing": 0.0})


def test_published_vectors_match_the_closed_form():
    # (-(1 - eps) * logsigmoid(beta h) + eps * logsigmoid(-beta h)) / (1 - 2 eps)
    eps = 0.2
    out = RobustDPO(beta=0.1, label_smoothing=eps)(PUBLISHED)
    expected = [((1 - eps) * softplus(-x) - eps * softplus(x)) / (1 - 2 * eps) for x in (0.0, 1.0, 2.0)]
    torch.testing.assert_close(out.losses, torch.tensor(expected))
    assert out.losses[0].item() == pytest.approx(math.log(2))


def test_unbiased_under_label_noise():
    # Flipping each label with probability eps leaves the expected loss equal to clean DPO's.
    eps = 0.3
    flipped = LossInputs(
        policy_chosen_logps=PUBLISHED.policy_rejected_logps,
        policy_rejected_logps=PUBLISHED.policy_chosen_logps,
        ref_chosen_logps=PUBLISHED.ref_rejected_logps,
        ref_rejected_logps=PUBLISHED.ref_chosen_logps,
    )
    robust = RobustDPO(beta=0.1, label_smoothing=eps)
    expected_loss = (1 - eps) * robust(PUBLISHED).losses + eps * robust(flipped).losses
    torch.testing.assert_close(expected_loss, DPO(beta=0.1)(PUBLISHED).losses)


def test_no_noise_is_dpo():
    torch.testing.assert_close(RobustDPO(label_smoothing=0.0)(PUBLISHED).losses, DPO()(PUBLISHED).losses)


def test_selectable_by_name():
    with registered(RobustDPO):
        loss = build_loss({"name": "robust", "label_smoothing": 0.25})
    assert isinstance(loss, RobustDPO) and reference_for(loss.needs) is Reference.LOGPS


@pytest.mark.parametrize("f_divergence_type", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
def test_matches_trls_own_code(f_divergence_type):
    settings = {"beta": 0.5, "label_smoothing": 0.2, "f_divergence_type": f_divergence_type}
    check_loss(RobustDPO, settings)
    pytest.importorskip("trl")
    from prefopt.testing import assert_matches_trl, trl_inputs

    for seed in range(2):
        assert assert_matches_trl(RobustDPO(**settings), "robust", trl_inputs(seed=seed), **settings) > 0
