import itertools
import math

import pytest
import torch

from prefopt import LossInputs, build_loss
from prefopt.errors import ConfigError
from prefopt.losses.dpo import DPO
from prefopt.testing import check_loss, registered
from prefopt_plackett_luce import PlackettLuce

# Three prompts: K = 4, 2 and 3 (ragged: padded slots hold junk that must not matter).
POLICY = [[-12.0, -14.0, -9.5, -20.0], [-30.5, -28.0, 99.0, -99.0], [-7.25, -9.5, -8.0, 55.0]]
REF = [[-13.0, -13.5, -9.0, -19.0], [-30.0, -29.0, -1.0, 7.0], [-8.0, -9.0, -8.5, -3.0]]
COUNTS = [4, 2, 3]
MASK = [[k < n for k in range(4)] for n in COUNTS]
SCORES = [[4.0, 3.0, 3.0, 1.0], [2.0, 1.0, 0.0, 0.0], [9.0, 5.0, 1.0, 0.0]]


def oracle(policy: list[float], ref: list[float], beta: float) -> float:
    """The ranking likelihood in float64 from its definition: -sum_k log(exp(r_k) / sum_{j >= k} exp(r_j))."""
    r = [beta * (p - q) for p, q in zip(policy, ref)]
    return -sum(r[k] - math.log(sum(math.exp(x) for x in r[k:])) for k in range(len(r)))


def test_conformance():
    check_loss(PlackettLuce)
    check_loss(PlackettLuce, {"beta": 0.5})


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_values_and_gradients_match_a_float64_oracle(dtype, tol):
    beta = 0.7
    policy = torch.tensor(POLICY, dtype=dtype, requires_grad=True)
    ref = torch.tensor(REF, dtype=dtype)
    out = PlackettLuce(beta=beta)(LossInputs(policy_logps=policy, ref_logps=ref, completion_mask=MASK, scores=SCORES))
    expected = [oracle(p[:n], r[:n], beta) for p, r, n in zip(POLICY, REF, COUNTS)]
    torch.testing.assert_close(out.losses.double(), torch.tensor(expected, dtype=torch.float64), rtol=tol, atol=tol)
    out.loss.backward()
    h = 1e-6  # central differences of the float64 oracle, through the mean over prompts
    for b, k in itertools.product(range(3), range(4)):
        if k >= COUNTS[b]:
            assert policy.grad[b, k] == 0
            continue
        up, down = list(POLICY[b][: COUNTS[b]]), list(POLICY[b][: COUNTS[b]])
        up[k] += h
        down[k] -= h
        numeric = (oracle(up, REF[b], beta) - oracle(down, REF[b], beta)) / (2 * h) / 3
        assert policy.grad[b, k].item() == pytest.approx(numeric, rel=max(tol, 1e-6), abs=1e-7)


def test_equals_dpo_for_two_completions():
    pc, pr = torch.tensor([-0.5, -10.0, -1.0, -3.0]), torch.tensor([-0.1, -30.0, -21.0, 2.0])
    rc, rr = torch.tensor([-0.5, -10.1, -0.1, -4.0]), torch.tensor([-0.1, -20.1, -0.1, 1.5])
    dpo = DPO(beta=0.1)(LossInputs(pc, pr, ref_chosen_logps=rc, ref_rejected_logps=rr))
    as_pairs = PlackettLuce(beta=0.1)(LossInputs(pc, pr, ref_chosen_logps=rc, ref_rejected_logps=rr))
    as_groups = PlackettLuce(beta=0.1)(LossInputs(policy_logps=torch.stack([pc, pr], -1), ref_logps=torch.stack([rc, rr], -1)))
    for out in (as_pairs, as_groups):
        torch.testing.assert_close(out.losses, dpo.losses, rtol=1e-6, atol=1e-7)
        for key, value in dpo.metrics.items():
            torch.testing.assert_close(out.metrics[key], value, msg=key)
    # the published torchtune vector: h = [0, 10, 20]
    torch.testing.assert_close(as_groups.losses[:3], -torch.nn.functional.logsigmoid(0.1 * torch.tensor([0.0, 10.0, 20.0])))


def test_ranking_metrics_count_ordered_pairs_and_the_top_one():
    rewards_order = [[3.0, 1.0, 2.0, 0.0], [0.0, 1.0, 0.0, 0.0], [5.0, 4.0, 3.0, 0.0]]  # beta 1, ref 0
    out = PlackettLuce(beta=1.0)(LossInputs(policy_logps=rewards_order, ref_logps=[[0.0] * 4] * 3, completion_mask=MASK, scores=SCORES))
    # ordered pairs (scores differ): prompt 0 has 5 (the tie 3 = 3 is none), prompt 1 has 1, prompt 2 has 3.
    # correct: prompt 0: (0,1) (0,2) (0,3) (1,3) (2,3) -> 5; prompt 1: 0; prompt 2: 3. So 8 of 9.
    assert out.metrics["rewards/accuracies"].item() == pytest.approx(8 / 9)
    assert out.metrics["rewards/top1_accuracy"].item() == pytest.approx(2 / 3)
    assert out.metrics["rewards/chosen"].item() == pytest.approx((3.0 + 0.0 + 5.0) / 3)
    assert out.metrics["rewards/rejected"].item() == pytest.approx((0.0 + 1.0 + 3.0) / 3)


def test_selectable_by_name_and_takes_rankings():
    with registered(PlackettLuce):
        loss = build_loss({"name": "plackett_luce", "beta": 0.2})
        assert isinstance(loss, PlackettLuce) and loss.takes == {"pairs", "rankings"}
        with pytest.raises(ConfigError, match="loss.beta"):
            build_loss({"name": "plackett_luce", "beta": 0})
