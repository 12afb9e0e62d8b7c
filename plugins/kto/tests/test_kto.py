import importlib.util

import pytest
import torch

from prefopt import LossInputs, build_loss
from prefopt.errors import ConfigError
from prefopt.testing import check_loss, registered
from prefopt_kto import KTO

needs_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL is not installed")

POLICY = [-12.0, -30.5, -7.25, -50.0, -3.0, -21.0]
REF = [-13.0, -30.0, -8.0, -50.5, -9.0, -14.0]
LABELS = [True, False, True, False, True, True]
MISMATCHED = [-20.0, -25.0, -31.0, -9.0, -17.5, -12.0]
REF_MISMATCHED = [-23.0, -24.0, -30.5, -9.5, -18.0, -15.0]


def inputs(policy: torch.Tensor, mismatched=MISMATCHED) -> LossInputs:
    return LossInputs(policy_logps=policy[:, None], ref_logps=torch.tensor(REF, dtype=policy.dtype)[:, None],
                      labels=torch.tensor(LABELS)[:, None], mismatched_logps=torch.tensor(mismatched, dtype=policy.dtype),
                      ref_mismatched_logps=torch.tensor(REF_MISMATCHED, dtype=policy.dtype))


def test_conformance():
    check_loss(KTO)
    check_loss(KTO, {"beta": 0.5, "desirable_weight": 1.33, "undesirable_weight": 0.75})


@needs_trl
@pytest.mark.parametrize("config, mismatched", [
    ({}, MISMATCHED),  # z0 > 0
    ({"beta": 0.5, "desirable_weight": 1.33, "undesirable_weight": 0.75}, MISMATCHED),
    ({}, [m - 5.0 for m in MISMATCHED]),  # the mean mismatched log-ratio is negative: z0 clamps to 0
])
def test_loss_gradients_and_metrics_equal_trl(config, mismatched):
    from prefopt.testing import trl_kto_loss

    ours_policy = torch.tensor(POLICY, dtype=torch.float64, requires_grad=True)
    out = KTO(**config)(inputs(ours_policy, mismatched))
    out.loss.backward()
    trl_policy = torch.tensor(POLICY, dtype=torch.float64, requires_grad=True)
    trl_loss, metrics = trl_kto_loss(trl_policy, torch.tensor(REF, dtype=torch.float64), torch.tensor(LABELS),
                                     torch.tensor(mismatched, dtype=torch.float64), torch.tensor(REF_MISMATCHED, dtype=torch.float64),
                                     **config)
    trl_loss.backward()
    torch.testing.assert_close(out.loss, trl_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_policy.grad, trl_policy.grad, rtol=1e-12, atol=1e-12)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl"):
        assert out.metrics[key].item() == pytest.approx(metrics[key], rel=1e-12), key


def test_the_reference_point_is_detached_and_clamped():
    policy = torch.tensor(POLICY, requires_grad=True)
    low = KTO()(inputs(policy, [m - 100.0 for m in MISMATCHED]))
    assert low.metrics["kl"].item() == 0.0
    mism = torch.tensor(MISMATCHED, requires_grad=True)
    out = KTO()(LossInputs(policy_logps=policy[:, None], ref_logps=torch.tensor(REF)[:, None], labels=torch.tensor(LABELS)[:, None],
                           mismatched_logps=mism, ref_mismatched_logps=torch.tensor(REF_MISMATCHED)))
    out.loss.backward()
    assert mism.grad is None or not mism.grad.any()


def test_several_labelled_completions_per_prompt_average_over_completions():
    # The same six completions as two prompts of three: the loss is the same mean over completions.
    policy = torch.tensor(POLICY)
    flat = KTO()(inputs(policy))
    grouped = KTO()(LossInputs(policy_logps=policy.view(2, 3), ref_logps=torch.tensor(REF).view(2, 3),
                               labels=torch.tensor(LABELS).view(2, 3), mismatched_logps=torch.tensor(MISMATCHED).view(2, 3).mean(-1),
                               ref_mismatched_logps=torch.tensor(REF_MISMATCHED).view(2, 3).mean(-1)))
    torch.testing.assert_close(grouped.loss, flat.loss)
    torch.testing.assert_close(grouped.losses, flat.losses.view(2, 3).sum(-1))


def test_selectable_by_name_and_takes_labelled_completions():
    with registered(KTO):
        loss = build_loss({"name": "kto", "desirable_weight": 1.33})
        assert isinstance(loss, KTO) and loss.takes == {"labelled"}
        with pytest.raises(ConfigError, match="loss.undesirable_weight"):
            build_loss({"name": "kto", "undesirable_weight": -1})
