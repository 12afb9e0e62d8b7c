import pytest
import torch

from prefopt import LossInputs, Reference, build_loss
from prefopt.losses.base import reference_for
from prefopt.testing import check_loss, registered
from prefopt_slic import SLiC

# Published vectors (torchtune's DPO loss tests): h = [0, 10, 20].
PUBLISHED = LossInputs(
    policy_chosen_logps=[-0.5, -10.0, -1.0],
    policy_rejected_logps=[-0.1, -30.0, -21.0],
    ref_chosen_logps=[-0.5, -10.1, -0.1],
    ref_rejected_logps=[-0.1, -20.1, -0.1],
)


def test_conformance():
    check_loss(SLiC)


def test_published_hinge_vector():
    out = SLiC(beta=0.1)(PUBLISHED)
    torch.testing.assert_close(out.losses, torch.tensor([1.0, 0.0, 0.0]))
    assert out.loss.item() == pytest.approx(1 / 3)
    assert out.metrics["rewards/margins"].item() == pytest.approx(1.0)


def test_linear_below_the_margin_and_flat_above():
    # relu(1 - beta * h): h = 5 gives 0.5 with beta 0.1, h = 10 with beta 0.5 gives 0.
    inputs = LossInputs(
        policy_chosen_logps=torch.tensor([-5.0, -5.0], requires_grad=True),
        policy_rejected_logps=[-10.0, -15.0],
        ref_chosen_logps=[-5.0, -5.0],
        ref_rejected_logps=[-5.0, -5.0],
    )
    out = SLiC(beta=0.1)(inputs)
    torch.testing.assert_close(out.losses, torch.tensor([0.5, 0.0]))
    out.loss.backward()
    torch.testing.assert_close(inputs.policy_chosen_logps.grad, torch.tensor([-0.05, 0.0]))


def test_needs_reference_log_probs_and_selectable_by_name():
    with registered(SLiC):
        loss = build_loss({"name": "slic", "beta": 0.5})
    assert isinstance(loss, SLiC) and reference_for(loss.needs) is Reference.LOGPS


def test_hinge_is_slic_under_trls_name():
    from prefopt_slic import Hinge

    check_loss(Hinge, configs=[None, {"f_divergence_type": "js_divergence"}, {"f_divergence_type": "alpha_divergence"}])
    with registered(SLiC, Hinge):
        hinge = build_loss({"name": "hinge", "beta": 0.1})
    assert type(hinge) is Hinge and isinstance(hinge, SLiC)
    torch.testing.assert_close(hinge(PUBLISHED).losses, SLiC(beta=0.1)(PUBLISHED).losses)


@pytest.mark.parametrize("f_divergence_type", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
def test_hinge_matches_trls_own_code(f_divergence_type):
    pytest.importorskip("trl")
    from prefopt.testing import assert_matches_trl, trl_inputs
    from prefopt_slic import Hinge

    settings = {"beta": 0.5, "f_divergence_type": f_divergence_type}
    for seed in range(2):
        assert assert_matches_trl(Hinge(**settings), "hinge", trl_inputs(seed=seed), **settings) > 0
