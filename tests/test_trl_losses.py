"""TRL's loss names on the built-in losses, the f-divergence scores, couples_pairs in the kit, and the TRL helper."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import Field

from prefopt import Loss, LossConfig, LossInputs, LossOutput, Reference, build_loss
from prefopt.errors import ConfigError
from prefopt.losses import DPO, IPO, SFT, Sigmoid, WeightedLoss
from prefopt.losses.base import log_ratios, reward_metrics
from prefopt.losses.fdivergence import EXP_MAX, f_score
from prefopt.testing import assert_matches_trl, check_loss, trl_inputs, trl_loss

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def test_sigmoid_is_dpo_under_trls_name_without_label_smoothing():
    loss = build_loss({"name": "sigmoid", "beta": 0.3, "f_divergence_type": "js_divergence"})
    assert type(loss) is Sigmoid and isinstance(loss, DPO)
    inputs = trl_inputs(seed=1)
    dpo = DPO(beta=0.3, f_divergence_type="js_divergence")
    torch.testing.assert_close(loss(inputs).losses, dpo(inputs).losses, rtol=0, atol=0)
    with pytest.raises(ConfigError, match=r"loss\.label_smoothing: loss 'sigmoid'.*no label smoothing; select 'dpo'"):
        build_loss({"name": "sigmoid", "label_smoothing": 0.1})


def test_ipo_takes_trls_beta_for_tau():
    assert build_loss({"name": "ipo", "beta": 0.3}).config.tau == 0.3
    assert build_loss({"name": "ipo", "tau": 0.2}).config.tau == 0.2
    with pytest.raises(ConfigError, match=r"loss\.beta: loss 'ipo': Extra inputs"):
        build_loss({"name": "ipo", "tau": 0.2, "beta": 0.3})


def test_sft_token_mean_is_trls_convention_and_couples_pairs():
    inputs = LossInputs(policy_chosen_logps=[-6.0, -1.0, 0.0], policy_rejected_logps=[-1.0, -2.0, -3.0],
                        chosen_tokens=[3, 1, 0], rejected_tokens=[1, 1, 1])
    token = build_loss({"name": "sft", "normalize": "token"})
    assert token.couples_pairs and not SFT().couples_pairs
    assert token(inputs).loss.item() == pytest.approx(7.0 / 4)  # every chosen token weighs the same
    assert SFT()(inputs).loss.item() == pytest.approx((2.0 + 1.0 + 0.0) / 3)  # every completion weighs the same
    assert WeightedLoss([(1.0, DPO()), (0.1, token)]).couples_pairs and not WeightedLoss([(1.0, SFT())]).couples_pairs


@pytest.mark.parametrize("cls, config", [(Sigmoid, None), (SFT, {"normalize": "token"}),
                                         *((c, {"f_divergence_type": f}) for c in (DPO, Sigmoid) for f in F_DIVERGENCES[1:]),
                                         (IPO, {"f_divergence_type": "js_divergence", "beta": 0.5})])
def test_conformance(cls, config):
    check_loss(cls, config)


def test_ipo_with_an_exponential_score_overflows_float32_as_trl_does():
    # (1 - exp(1e4 clamped to 80))^2 ~ 3e69: beyond float32, where TRL gives inf too; the kit says so.
    with pytest.raises(AssertionError, match=r"on extreme log-ratio \(\+-1e4\) inputs.*non-finite loss"):
        check_loss(IPO, {"f_divergence_type": "forward_kl"})


def test_f_scores_closed_forms():
    u = torch.tensor([-3.0, -0.5, 0.0, 0.7, 4.0], dtype=torch.float64)
    t = u.exp()
    torch.testing.assert_close(f_score(u, "reverse_kl"), u)
    torch.testing.assert_close(f_score(u, "forward_kl"), 1 - 1 / t)
    torch.testing.assert_close(f_score(u, "js_divergence"), torch.log(2 * t / (t + 1)))
    torch.testing.assert_close(f_score(u, "alpha_divergence", 0.3), (t ** -0.7 - 1) / -0.7)
    torch.testing.assert_close(f_score(u, "alpha_divergence", 1.0), u)  # the limit alpha -> 1
    # exp() is clamped at EXP_MAX: finite scores, and no gradient beyond the clamp (TRL's alpha_divergence clamp).
    far = torch.tensor([-1e4, -200.0], requires_grad=True)
    scores = f_score(far, "forward_kl")
    torch.testing.assert_close(scores, torch.full((2,), 1 - math.exp(EXP_MAX)))
    scores.sum().backward()
    assert far.grad.tolist() == [0.0, 0.0]


class Centred(Loss):
    """A DPO on margins centred on the batch mean: pairs couple, the order of pairs does not matter."""

    class Config(LossConfig):
        beta: float = Field(0.1, gt=0, description="Inverse temperature.")

    name = "centred_test"
    reference = Reference.LOGPS
    couples_pairs = True

    def forward(self, inputs: LossInputs) -> LossOutput:
        chosen, rejected = log_ratios(inputs)
        h = self.config.beta * (chosen - rejected)
        losses = -F.logsigmoid(2 * h - h.mean())  # still descends toward chosen at the reference point
        return LossOutput(losses.mean(), losses, reward_metrics(chosen, rejected, inputs))


class Undeclared(Centred):
    name = "undeclared_test"
    couples_pairs = False


class Ordered(Centred):
    name = "ordered_test"

    def forward(self, inputs: LossInputs) -> LossOutput:
        out = super().forward(inputs)
        losses = out.losses * torch.arange(1, len(out.losses) + 1, dtype=out.losses.dtype)
        return LossOutput(losses.mean(), losses, out.metrics)


def test_kit_checks_coupled_losses_by_pair_order_instead_of_pair_by_pair():
    check_loss(Centred)
    with pytest.raises(AssertionError, match="per-pair losses mix pairs"):
        check_loss(Undeclared)
    with pytest.raises(AssertionError, match="declares couples_pairs, but its loss depends on the order of the pairs"):
        check_loss(Ordered)


@pytest.mark.parametrize("f_divergence_type", F_DIVERGENCES)
def test_builtin_losses_match_trls_own_code(f_divergence_type):
    pytest.importorskip("trl")
    settings = {"beta": 0.4, **({"f_divergence_type": f_divergence_type} if f_divergence_type != "reverse_kl" else {})}
    for name in ("sigmoid", "ipo"):
        assert assert_matches_trl(build_loss({"name": name, **settings}), name, trl_inputs(seed=4), **settings) > 0
    assert assert_matches_trl(DPO(**settings), "sigmoid", trl_inputs(seed=5), **settings) > 0
    # sft has no f-divergence of its own (TRL accepts one and ignores it): token mean, with settings ignored.
    assert assert_matches_trl(SFT(normalize="token"), "sft", trl_inputs(seed=6), **settings) == 8


def test_trl_helper_refuses_what_trl_refuses_and_runs_trl_in_float32():
    pytest.importorskip("trl")
    inputs = trl_inputs(4, seed=2, extreme=False)
    with pytest.raises(TypeError, match="unknown loss type 'dpo'"):
        trl_loss(inputs, "dpo")
    with pytest.raises(ValueError, match="TRL refuses f_divergence_type='js_divergence' with loss_type='nca_pair'"):
        trl_loss(inputs, "nca_pair", f_divergence_type="js_divergence")
    assert trl_loss(inputs, "aot").losses is None
    # float32 runs TRL's code unedited; alpha_divergence agrees to float32 precision.
    single = LossInputs(**{k: v.float() if v.is_floating_point() else v for k, v in vars(inputs).items() if v is not None})
    settings = {"beta": 0.5, "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}
    theirs = trl_loss(single, "sigmoid", **settings)
    assert theirs.loss.dtype == torch.float32
    torch.testing.assert_close(theirs.losses, DPO(**settings)(single).losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(theirs.loss.double(), trl_loss(inputs, "sigmoid", **settings).loss, rtol=1e-5, atol=1e-6)


def test_trl_helper_catches_a_wrong_loss():
    pytest.importorskip("trl")

    class FlippedHinge(Loss):  # relu(1 + beta * h): the sign of the margin wrong
        Config = DPO.Config
        name = "flipped_test"

        def forward(self, inputs: LossInputs) -> LossOutput:
            chosen, rejected = log_ratios(inputs)
            losses = torch.relu(1 + self.config.beta * (chosen - rejected))
            return LossOutput(losses.mean(), losses, {})

    with pytest.raises(AssertionError, match="vs TRL's 'hinge'.*per-pair losses differ"):
        assert_matches_trl(FlippedHinge(beta=0.5), "hinge", beta=0.5)


def test_a_token_budget_is_refused_for_a_loss_that_couples_its_pairs(tmp_path):
    """sft's token mean divides by the tokens of the whole batch: a budget that splits the batch would change it."""
    from engine_helpers import make_config, write_assets
    from prefopt.config import RunConfig
    from prefopt.training.preflight import preflight

    assets = write_assets(tmp_path / "assets", n_train=16, n_eval=4)
    coupled = {"name": "sft", "normalize": "token"}
    with pytest.raises(ConfigError, match=r"trainer.max_tokens_per_forward: loss 'sft' couples the pairs"):
        preflight(RunConfig(**make_config(assets, tmp_path, loss=coupled, max_tokens_per_forward=64)), hub=False)
    preflight(RunConfig(**make_config(assets, tmp_path, loss=coupled)), hub=False)  # no budget: accepted
    preflight(RunConfig(**make_config(assets, tmp_path, max_tokens_per_forward=64)), hub=False)  # dpo: pairs independent
