"""Built-in losses against their closed forms (LOSSES.md), gradients and properties."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prefopt.losses import DPO, IPO, SFT, TDPO, LossInputs, Reference, WeightedLoss
from prefopt.losses.base import reference_for
from prefopt.plugins.registry import build_loss

LN2 = math.log(2.0)
B = 6


def _softplus(x: np.ndarray) -> np.ndarray:
    """-log(sigmoid(-x)), computed independently of torch."""
    return np.logaddexp(0.0, x)


@pytest.fixture
def raw() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "policy_chosen_logps": -rng.uniform(1, 40, B),
        "policy_rejected_logps": -rng.uniform(1, 40, B),
        "ref_chosen_logps": -rng.uniform(1, 40, B),
        "ref_rejected_logps": -rng.uniform(1, 40, B),
        "chosen_kl": rng.uniform(0, 3, B),
        "rejected_kl": rng.uniform(0, 3, B),
        "chosen_tokens": rng.integers(1, 30, B).astype(np.float64),
        "rejected_tokens": rng.integers(1, 30, B).astype(np.float64),
    }


def _inputs(raw: dict[str, np.ndarray], dtype=torch.float64, grad: bool = False) -> LossInputs:
    t = {k: torch.tensor(v, dtype=dtype, requires_grad=grad and "tokens" not in k) for k, v in raw.items()}
    return LossInputs(**t)


# ---------------------------------------------------------------- closed forms


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_dpo_closed_form(raw, beta, eps):
    h = (raw["policy_chosen_logps"] - raw["ref_chosen_logps"]) - (raw["policy_rejected_logps"] - raw["ref_rejected_logps"])
    expected = (1 - eps) * _softplus(-beta * h) + eps * _softplus(beta * h)
    out = DPO(beta=beta, label_smoothing=eps)(_inputs(raw))
    np.testing.assert_allclose(out.losses.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert out.loss.item() == pytest.approx(expected.mean(), rel=1e-12)


def test_dpo_label_smoothing_zero_is_plain_dpo(raw):
    plain = DPO(beta=0.1)(_inputs(raw)).losses
    smoothed = DPO(beta=0.1, label_smoothing=0.0)(_inputs(raw)).losses
    tiny = DPO(beta=0.1, label_smoothing=1e-9)(_inputs(raw)).losses
    assert torch.equal(plain, smoothed)
    torch.testing.assert_close(tiny, plain, rtol=1e-7, atol=1e-7)


def test_dpo_reference_free(raw):
    free = DPO(beta=0.1, reference_free=True)
    assert reference_for(free.needs) is Reference.NONE
    assert reference_for(DPO(beta=0.1).needs) is Reference.LOGPS
    zeroed = dict(raw, ref_chosen_logps=np.zeros(B), ref_rejected_logps=np.zeros(B))
    expected = DPO(beta=0.1)(_inputs(zeroed)).losses
    torch.testing.assert_close(free(_inputs(raw)).losses, expected, rtol=0, atol=0)
    # it never reads the reference: inputs without any reference log-probs work
    no_ref = LossInputs(torch.tensor(raw["policy_chosen_logps"]), torch.tensor(raw["policy_rejected_logps"]))
    torch.testing.assert_close(free(no_ref).losses, expected, rtol=0, atol=0)


@pytest.mark.parametrize("tau", [0.1, 0.25])
def test_ipo_closed_form_averaged(raw, tau):
    h = (raw["policy_chosen_logps"] - raw["ref_chosen_logps"]) / raw["chosen_tokens"] - (
        raw["policy_rejected_logps"] - raw["ref_rejected_logps"]
    ) / raw["rejected_tokens"]
    expected = (h - 1 / (2 * tau)) ** 2
    out = IPO(tau=tau)(_inputs(raw))
    np.testing.assert_allclose(out.losses.numpy(), expected, rtol=1e-12)
    assert out.loss.item() == pytest.approx(expected.mean(), rel=1e-12)


@pytest.mark.parametrize("tau", [0.1, 0.25])
def test_ipo_closed_form_summed(raw, tau):
    h = (raw["policy_chosen_logps"] - raw["ref_chosen_logps"]) - (raw["policy_rejected_logps"] - raw["ref_rejected_logps"])
    expected = (h - 1 / (2 * tau)) ** 2
    out = IPO(tau=tau, average_log_probs=False)(_inputs(raw))
    np.testing.assert_allclose(out.losses.numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("beta,alpha", [(0.1, 0.5), (0.3, 0.2)])
def test_tdpo_closed_forms(raw, beta, alpha):
    m = (raw["policy_chosen_logps"] - raw["ref_chosen_logps"]) - (raw["policy_rejected_logps"] - raw["ref_rejected_logps"])
    dkl = raw["rejected_kl"] - raw["chosen_kl"]
    tdpo1 = _softplus(-beta * (m - dkl))
    tdpo2 = _softplus(-beta * (m - alpha * dkl))
    np.testing.assert_allclose(TDPO(variant="tdpo1", beta=beta)(_inputs(raw)).losses.numpy(), tdpo1, rtol=1e-12)
    np.testing.assert_allclose(
        TDPO(variant="tdpo2", beta=beta, alpha=alpha)(_inputs(raw)).losses.numpy(), tdpo2, rtol=1e-12
    )


def test_tdpo_variant_is_required():
    with pytest.raises(Exception, match="variant"):
        TDPO()
    assert reference_for(TDPO(variant="tdpo1").needs) is Reference.TOKEN_KL


def test_sft_closed_form(raw):
    expected = -raw["policy_chosen_logps"] / raw["chosen_tokens"]
    out = SFT()(_inputs(raw))
    np.testing.assert_allclose(out.losses.numpy(), expected, rtol=1e-12)
    assert out.metrics["nll/chosen"].item() == pytest.approx(expected.mean(), rel=1e-12)
    assert reference_for(SFT().needs) is Reference.NONE


# ---------------------------------------------------------------- published vectors (torchtune)

PUBLISHED = {
    "policy_chosen_logps": [-0.5, -10.0, -1.0],
    "policy_rejected_logps": [-0.1, -30.0, -21.0],
    "ref_chosen_logps": [-0.5, -10.1, -0.1],
    "ref_rejected_logps": [-0.1, -20.1, -0.1],
}


def _published(dtype=torch.float64) -> LossInputs:
    return LossInputs(**{k: torch.tensor(v, dtype=dtype) for k, v in PUBLISHED.items()})


def test_published_dpo_vector():
    expected = torch.tensor([-math.log(1 / (1 + math.exp(x))) for x in (0.0, -1.0, -2.0)], dtype=torch.float64)
    out = DPO(beta=0.1)(_published())
    torch.testing.assert_close(out.losses, expected, rtol=0, atol=1e-6)
    # fp32, as training sees it
    torch.testing.assert_close(DPO(beta=0.1)(_published(torch.float32)).losses, expected.float(), rtol=0, atol=1e-6)


def test_published_ipo_summed_vector():
    out = IPO(tau=0.1, average_log_probs=False)(_published())
    torch.testing.assert_close(out.losses, torch.tensor([25.0, 25.0, 225.0], dtype=torch.float64), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- gradients


def _gradcheck(loss, raw, names, **const):
    """gradcheck ``loss`` in float64 w.r.t. the named inputs (others held constant)."""
    base = {k: torch.tensor(v, dtype=torch.float64) for k, v in raw.items()}
    base.update(const)

    def f(*tensors):
        return loss(LossInputs(**{**base, **dict(zip(names, tensors))})).loss

    args = tuple(base[n].clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7)


LOGPS = ["policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"]


@pytest.mark.parametrize(
    "loss,names",
    [
        (DPO(beta=0.1), LOGPS),
        (DPO(beta=0.5, label_smoothing=0.2), LOGPS),
        (DPO(beta=0.1, reference_free=True), LOGPS[:2]),
        (IPO(tau=0.1), LOGPS),
        (IPO(tau=0.1, average_log_probs=False), LOGPS),
        (TDPO(variant="tdpo1"), LOGPS + ["chosen_kl", "rejected_kl"]),
        (TDPO(variant="tdpo2", alpha=0.5), LOGPS + ["rejected_kl"]),  # chosen_kl is stop-gradient
        (SFT(), ["policy_chosen_logps"]),
        (WeightedLoss([(1.0, DPO(beta=0.1)), (0.2, SFT())]), LOGPS),
    ],
    ids=["dpo", "cdpo", "dpo-free", "ipo-avg", "ipo-sum", "tdpo1", "tdpo2", "sft", "dpo+sft"],
)
def test_gradcheck(raw, loss, names):
    _gradcheck(loss, raw, names)


def test_tdpo2_stops_gradient_through_chosen_kl(raw):
    inputs = _inputs(raw, grad=True)
    TDPO(variant="tdpo2")(inputs).loss.backward()
    assert inputs.chosen_kl.grad is None or torch.all(inputs.chosen_kl.grad == 0)
    assert inputs.rejected_kl.grad is not None and torch.all(inputs.rejected_kl.grad != 0)

    inputs = _inputs(raw, grad=True)
    TDPO(variant="tdpo1")(inputs).loss.backward()
    assert inputs.chosen_kl.grad is not None and torch.all(inputs.chosen_kl.grad != 0)
    # d loss / d kl_chosen = -(1/B) * beta * sigma(-beta * logits) in TDPO1: same magnitude as d/d pc
    torch.testing.assert_close(inputs.chosen_kl.grad, inputs.policy_chosen_logps.grad)


def test_dpo_gradient_identity_on_a_linear_model():
    """grad = mean_i -beta * sigma(r_l - r_w) * (grad log pi(y_w) - grad log pi(y_l)) (LOSSES.md)."""
    gen = torch.Generator().manual_seed(0)
    vocab, dim, n_pairs, length, beta = 7, 5, 4, 3, 0.5
    weight = torch.randn(vocab, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    ref_weight = torch.randn(vocab, dim, generator=gen, dtype=torch.float64)
    feats = torch.randn(n_pairs, 2, length, dim, generator=gen, dtype=torch.float64)  # (pair, chosen/rejected, t, dim)
    labels = torch.randint(0, vocab, (n_pairs, 2, length), generator=gen)

    def seq_logps(w: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(feats @ w.T, dim=-1)
        return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1).sum(-1)  # (pair, 2)

    pol, ref = seq_logps(weight), seq_logps(ref_weight)
    out = DPO(beta=beta)(LossInputs(pol[:, 0], pol[:, 1], ref_chosen_logps=ref[:, 0], ref_rejected_logps=ref[:, 1]))
    (autograd,) = torch.autograd.grad(out.loss, weight, retain_graph=True)

    expected = torch.zeros_like(weight)
    r = beta * (pol - ref).detach()
    for i in range(n_pairs):
        (g_w,) = torch.autograd.grad(pol[i, 0], weight, retain_graph=True)
        (g_l,) = torch.autograd.grad(pol[i, 1], weight, retain_graph=True)
        expected += -beta * torch.sigmoid(r[i, 1] - r[i, 0]) * (g_w - g_l)
    expected /= n_pairs
    assert expected.abs().max() > 1e-3  # a non-trivial check
    torch.testing.assert_close(autograd, expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- properties


def _at_init(with_kl: bool = True) -> LossInputs:
    logps = torch.tensor([-3.0, -12.5, -40.0])
    zero = torch.zeros(3) if with_kl else None
    return LossInputs(logps, logps - 1, ref_chosen_logps=logps, ref_rejected_logps=logps - 1, chosen_kl=zero, rejected_kl=zero)


@pytest.mark.parametrize("loss", [DPO(beta=0.1), DPO(beta=1.0), TDPO(variant="tdpo1"), TDPO(variant="tdpo2")], ids=repr)
def test_ln2_when_policy_equals_reference(loss):
    out = loss(_at_init())
    torch.testing.assert_close(out.losses, torch.full((3,), LN2), rtol=0, atol=1e-7)
    assert out.metrics["rewards/margins"].item() == 0.0


@pytest.mark.parametrize("average", [True, False])
def test_ipo_minimum_at_target_margin(average):
    tau = 0.2
    target = 1 / (2 * tau)
    n_c, n_r = torch.tensor([4.0], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)

    def loss_at(h: float):
        # rejected log-ratio fixed at -1 per token; chosen set so the margin is h
        rej_ratio = -1.0 * (n_r if average else 1.0)
        chosen_ratio = (h + rej_ratio / (n_r if average else 1.0)) * (n_c if average else 1.0)
        pc = (torch.tensor([-5.0], dtype=torch.float64) + chosen_ratio).requires_grad_(True)
        inputs = LossInputs(
            pc,
            torch.tensor([-7.0], dtype=torch.float64) + rej_ratio,
            chosen_tokens=n_c,
            rejected_tokens=n_r,
            ref_chosen_logps=torch.tensor([-5.0], dtype=torch.float64),
            ref_rejected_logps=torch.tensor([-7.0], dtype=torch.float64),
        )
        out = IPO(tau=tau, average_log_probs=average)(inputs)
        (grad,) = torch.autograd.grad(out.loss, pc)
        return out.loss.item(), grad.item()

    at, grad_at = loss_at(target)
    assert at == pytest.approx(0.0, abs=1e-12)
    assert grad_at == pytest.approx(0.0, abs=1e-10)
    for d in (-0.5, -1e-3, 1e-3, 0.5):
        value, grad = loss_at(target + d)
        assert value == pytest.approx(d * d, rel=1e-6) and value > at
        assert math.copysign(1, grad) == math.copysign(1, d)  # descent pushes back to the target


def test_ipo_zero_token_completion_is_finite():
    pc = torch.tensor([-4.0, 0.0], requires_grad=True)
    pr = torch.tensor([0.0, -3.0], requires_grad=True)
    inputs = LossInputs(
        pc,
        pr,
        chosen_tokens=torch.tensor([3, 0]),
        rejected_tokens=torch.tensor([0, 2]),
        ref_chosen_logps=torch.tensor([-5.0, 0.0]),
        ref_rejected_logps=torch.tensor([0.0, -2.0]),
    )
    out = IPO(tau=0.1)(inputs)
    out.loss.backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    # a zero-token completion counts as length 1: h = 1/3 - 0 and 0 - (-1)/2
    torch.testing.assert_close(out.losses, torch.tensor([(1 / 3 - 5) ** 2, (0.5 - 5) ** 2]))


EXTREME_LOSSES = [
    DPO(beta=0.1),
    DPO(beta=0.1, label_smoothing=0.1),
    DPO(beta=0.1, reference_free=True),
    IPO(tau=0.1),
    IPO(tau=0.1, average_log_probs=False),
    TDPO(variant="tdpo1"),
    TDPO(variant="tdpo2"),
    SFT(),
    WeightedLoss([(1.0, DPO(beta=0.1)), (0.2, SFT())]),
]


@pytest.mark.parametrize("loss", EXTREME_LOSSES, ids=repr)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_finite_on_extreme_log_ratios_fp32(loss, sign):
    r = sign * 1e4
    leaves = {
        "policy_chosen_logps": torch.tensor([-1.0, -1e4 - 1.0, -2.0]),
        "policy_rejected_logps": torch.tensor([-1e4 - 3.0, -1.0, -2.0]),
        "chosen_kl": torch.tensor([1e4, 0.0, 5.0]),
        "rejected_kl": torch.tensor([0.0, 1e4, 5.0]),
    }
    leaves = {k: v.requires_grad_(True) for k, v in leaves.items()}
    inputs = LossInputs(
        **leaves,
        ref_chosen_logps=leaves["policy_chosen_logps"].detach() - r,
        ref_rejected_logps=leaves["policy_rejected_logps"].detach() + r,
        chosen_tokens=torch.tensor([1, 7, 0]),
        rejected_tokens=torch.tensor([3, 1, 0]),
    )
    out = loss(inputs)
    assert out.loss.dtype == torch.float32
    assert torch.isfinite(out.losses).all()
    out.loss.backward()
    for name, leaf in leaves.items():
        assert leaf.grad is None or torch.isfinite(leaf.grad).all(), name
    assert all(torch.isfinite(v).all() for v in out.metrics.values())


# ---------------------------------------------------------------- metrics


def test_dpo_metrics(raw):
    beta = 0.2
    out = DPO(beta=beta)(_inputs(raw))
    c = beta * (raw["policy_chosen_logps"] - raw["ref_chosen_logps"])
    r = beta * (raw["policy_rejected_logps"] - raw["ref_rejected_logps"])
    expected = {
        "rewards/chosen": c.mean(),
        "rewards/rejected": r.mean(),
        "rewards/margins": (c - r).mean(),
        "rewards/accuracies": (c > r).mean(),
        "logps/chosen": raw["policy_chosen_logps"].mean(),
        "logps/rejected": raw["policy_rejected_logps"].mean(),
    }
    assert set(out.metrics) == set(expected)
    assert 0 < expected["rewards/accuracies"] < 1  # the random batch exercises both outcomes
    for k, v in expected.items():
        assert out.metrics[k].ndim == 0 and not out.metrics[k].requires_grad
        assert out.metrics[k].item() == pytest.approx(v, rel=1e-7), k


def test_ipo_metrics_use_tau_as_beta(raw):
    out = IPO(tau=0.25)(_inputs(raw))
    c = 0.25 * (raw["policy_chosen_logps"] - raw["ref_chosen_logps"])
    assert out.metrics["rewards/chosen"].item() == pytest.approx(c.mean(), rel=1e-12)


def test_tdpo_metrics(raw):
    beta = 0.1
    inputs = _inputs(raw, grad=True)
    out = TDPO(variant="tdpo2", beta=beta)(inputs)
    mc = raw["policy_chosen_logps"] - raw["ref_chosen_logps"]
    mr = raw["policy_rejected_logps"] - raw["ref_rejected_logps"]
    c, r = beta * (mc + raw["chosen_kl"]), beta * (mr + raw["rejected_kl"])
    expected = {
        "rewards/chosen": c.mean(),
        "rewards/rejected": r.mean(),
        "rewards/margins": (c - r).mean(),
        "rewards/accuracies": (c > r).mean(),
        "logps/chosen": raw["policy_chosen_logps"].mean(),
        "logps/rejected": raw["policy_rejected_logps"].mean(),
        "kl/chosen": raw["chosen_kl"].mean(),
        "kl/rejected": raw["rejected_kl"].mean(),
        "kl/margin": (raw["rejected_kl"] - raw["chosen_kl"]).mean(),
    }
    assert set(out.metrics) == set(expected)
    for k, v in expected.items():
        assert not out.metrics[k].requires_grad
        assert out.metrics[k].item() == pytest.approx(v, rel=1e-7), k


def test_missing_input_names_the_field(raw):
    inputs = _inputs(raw)
    inputs.chosen_kl = None
    with pytest.raises(ValueError, match="chosen_kl"):
        TDPO(variant="tdpo1")(inputs)


# ---------------------------------------------------------------- weighted combinations


def test_weighted_dpo_plus_sft_equals_weighted_sum(raw):
    combined = build_loss([{"name": "dpo", "beta": 0.1}, {"name": "sft", "weight": 0.2}])
    assert isinstance(combined, WeightedLoss)
    inputs = _inputs(raw)
    dpo, sft = DPO(beta=0.1)(inputs), SFT()(inputs)
    out = combined(inputs)
    assert out.loss.item() == pytest.approx(dpo.loss.item() + 0.2 * sft.loss.item(), rel=1e-12)
    torch.testing.assert_close(out.losses, dpo.losses + 0.2 * sft.losses)
    assert out.metrics["loss/dpo"].item() == pytest.approx(dpo.loss.item())
    assert out.metrics["loss/sft"].item() == pytest.approx(sft.loss.item())
    assert out.metrics["rewards/chosen"].item() == pytest.approx(dpo.metrics["rewards/chosen"].item())


def test_weighted_same_loss_twice_gets_distinct_labels(raw):
    combined = build_loss([{"name": "dpo", "beta": 0.1}, {"name": "dpo", "beta": 0.5, "weight": 2}])
    out = combined(_inputs(raw))
    expected = DPO(beta=0.1)(_inputs(raw)).loss + 2 * DPO(beta=0.5)(_inputs(raw)).loss
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert {"loss/dpo_0", "loss/dpo_1"} <= set(out.metrics)


@pytest.mark.parametrize(
    "spec,needs",
    [
        ([{"name": "sft"}], Reference.NONE),
        ([{"name": "dpo", "reference_free": True}, {"name": "sft"}], Reference.NONE),
        ([{"name": "dpo"}, {"name": "sft", "weight": 0.2}], Reference.LOGPS),
        ([{"name": "sft"}, {"name": "tdpo", "variant": "tdpo1"}, {"name": "dpo"}], Reference.TOKEN_KL),
    ],
)
def test_weighted_needs_is_the_union_of_its_terms(spec, needs):
    assert reference_for(build_loss(spec).needs) is needs
