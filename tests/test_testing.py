"""prefopt.testing: the conformance check passes every built-in loss and catches broken ones."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import Field

from prefopt import Loss, LossConfig, LossInputs, LossOutput, Reference, build_loss
from prefopt.errors import ConfigError
from prefopt.losses import DPO, IPO, SFT, TDPO
from prefopt.losses.base import Feature, ref_logps, reward_metrics
from prefopt.plugins.registry import get_registry
from prefopt.testing import check_loss, registered


@pytest.mark.parametrize(
    "cls, config",
    [
        (DPO, None),
        (DPO, {"reference_free": True, "label_smoothing": 0.2}),
        (IPO, None),
        (IPO, {"average_log_probs": False}),
        (TDPO, TDPO.Config(variant="tdpo1")),
        (TDPO, {"variant": "tdpo2"}),
        (SFT, None),
    ],
)
def test_builtin_losses_conform(cls, config):
    check_loss(cls, config)


def test_required_field_needs_an_explicit_config():
    with pytest.raises(AssertionError, match=r"default config .* is invalid: variant: Field required"):
        check_loss(TDPO)


class GoodConfig(LossConfig):
    beta: float = Field(0.1, gt=0, description="Inverse temperature.")


class Good(Loss):
    """A correct DPO, the base the broken variants below change one thing in."""

    name = "good"
    Config = GoodConfig
    reference = Reference.LOGPS

    def rewards(self, inputs: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
        rc, rr = ref_logps(inputs)
        return self.config.beta * (inputs.policy_chosen_logps - rc), self.config.beta * (inputs.policy_rejected_logps - rr)

    def forward(self, inputs: LossInputs) -> LossOutput:
        chosen, rejected = self.rewards(inputs)
        losses = -F.logsigmoid(chosen - rejected)
        return LossOutput(losses.mean(), losses, reward_metrics(chosen, rejected, inputs))


def test_a_correct_loss_passes():
    check_loss(Good)


class ReadsUndeclaredReference(Good):
    name = "undeclared"
    reference = Reference.NONE


class DeclaresUnusedReference(Good):
    name = "unused"

    def rewards(self, inputs):
        return self.config.beta * inputs.policy_chosen_logps, self.config.beta * inputs.policy_rejected_logps


class NaiveLogSigmoid(Good):
    name = "naive"

    def forward(self, inputs):
        chosen, rejected = self.rewards(inputs)
        losses = -torch.log(torch.sigmoid(chosen - rejected))  # -inf below about -88
        return LossOutput(losses.mean(), losses, reward_metrics(chosen, rejected, inputs))


class UnclampedLengths(Good):
    name = "unclamped"
    reference = Reference.NONE

    def rewards(self, inputs):
        return inputs.policy_chosen_logps / inputs.chosen_tokens, inputs.policy_rejected_logps / inputs.rejected_tokens


class ScalarLosses(Good):
    name = "scalar"

    def forward(self, inputs):
        out = super().forward(inputs)
        return LossOutput(out.loss, out.loss, out.metrics)


class NoRewardMetrics(Good):
    name = "nometrics"

    def forward(self, inputs):
        out = super().forward(inputs)
        return LossOutput(out.loss, out.losses, {"logps/chosen": inputs.policy_chosen_logps.detach().mean()})


class AttachedMetric(Good):
    name = "attached"

    def forward(self, inputs):
        out = super().forward(inputs)
        return LossOutput(out.loss, out.losses, {**out.metrics, "loss/raw": out.loss})


class ReadsToHost(Good):
    name = "readstohost"

    def forward(self, inputs):
        out = super().forward(inputs)
        scale = float(inputs.policy_chosen_logps.abs().max()) > 1e3  # a Python branch on a device value
        return LossOutput(out.loss * (0.5 if scale else 1.0), out.losses * (0.5 if scale else 1.0), out.metrics)


class UndocumentedConfig(Good):
    name = "undocumented"

    class Config(LossConfig):
        beta: float = 0.1


class PermissiveConfig(Good):
    name = "permissive"

    class Config(GoodConfig):
        model_config = {"extra": "allow"}


@pytest.mark.parametrize(
    "cls, message",
    [
        (ReadsUndeclaredReference, r"declared features: LENGTHS, POLICY_LOGPS\).*ref_chosen_logps is required.*"
                                   r"add Feature.REF_LOGPS to its features"),
        (DeclaresUnusedReference, r"declares Feature.REF_LOGPS but never reads LossInputs.ref_chosen_logps"),
        (NaiveLogSigmoid, r"on extreme log-ratio .* inputs .*: non-finite loss"),
        (UnclampedLengths, r"on zero-token completion inputs .*: non-finite loss"),
        (ScalarLosses, r"per-pair losses must have shape \(4,\), got \(\)"),
        (NoRewardMetrics, r"must report the metrics rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies"),
        (AttachedMetric, r"metric 'loss/raw' must be detached"),
        (ReadsToHost, r"reads values back to the host in forward or backward \(_local_scalar_dense\), a GPU sync per step"),
        (UndocumentedConfig, r"config fields without a description: beta"),
        (PermissiveConfig, r"must forbid unknown keys"),
    ],
)
def test_broken_losses_are_caught(cls, message):
    with pytest.raises(AssertionError, match=message):
        check_loss(cls)


class SignError(Good):
    name = "sign"

    def forward(self, inputs):
        chosen, rejected = self.rewards(inputs)
        losses = -F.logsigmoid(rejected - chosen)  # h_r - h_c: trains the wrong way
        return LossOutput(losses.mean(), losses, reward_metrics(chosen, rejected, inputs))


class SummedLoss(Good):
    name = "summed"

    def forward(self, inputs):
        out = super().forward(inputs)
        return LossOutput(out.losses.sum(), out.losses, out.metrics)


class MixesPairs(Good):
    name = "mixes"

    def forward(self, inputs):
        chosen, rejected = self.rewards(inputs)
        losses = -F.logsigmoid(chosen[:, None] - rejected[None, :]).mean(1)  # (B, B) averaged back to (B,)
        return LossOutput(losses.mean(), losses, reward_metrics(chosen, rejected, inputs))


class TokenMeanConfig(LossConfig):
    beta: float = Field(0.1, gt=0, description="Inverse temperature.")
    weighted: bool = Field(False, description="Weight each pair by its mean token entropy.")


class TokenMean(Loss):
    """DPO on mean per-token log-ratios, optionally weighted by mean entropy: needs depend on the config."""

    name = "token_mean"
    Config = TokenMeanConfig
    examples = ({"weighted": True},)

    @property
    def needs(self):
        base = {Feature.POLICY_TOKEN_LOGPS, Feature.REF_TOKEN_LOGPS}
        return frozenset(base | ({Feature.TOKEN_ENTROPY} if self.config.weighted else set()))

    def forward(self, inputs):
        pc, pr = inputs.policy_token_logps.mean()
        rc, rr = inputs.ref_token_logps.mean()
        chosen, rejected = self.config.beta * (pc - rc), self.config.beta * (pr - rr)
        losses = -F.logsigmoid(chosen - rejected)
        if self.config.weighted:
            ec, er = inputs.token_entropy.mean()
            losses = losses * (ec * er).detach()
        return LossOutput(losses.mean(), losses, reward_metrics(chosen, rejected, inputs))


class ForgetsEntropy(TokenMean):
    """Reads the entropy when weighted but never declares it."""

    name = "forgets_entropy"
    examples = ()

    @property
    def needs(self):
        return frozenset({Feature.POLICY_TOKEN_LOGPS, Feature.REF_TOKEN_LOGPS})


def test_per_token_loss_passes_on_every_listed_config():
    check_loss(TokenMean)


def test_under_declared_per_token_input_is_named():
    check_loss(ForgetsEntropy)  # the default config does not read the entropy, and it lists no other
    with pytest.raises(AssertionError, match=r"with \{'beta': 0.1, 'weighted': True\}: on ordinary inputs.*AttributeError.*"
                       r"it read LossInputs.token_entropy, which its needs do not declare: add Feature.TOKEN_ENTROPY"):
        check_loss(ForgetsEntropy, configs=[{}, {"weighted": True}])
    with pytest.raises(AssertionError, match="add Feature.TOKEN_ENTROPY"):
        check_loss(type("ListsIt", (ForgetsEntropy,), {"name": "lists_it", "examples": ({"weighted": True},)}))


@pytest.mark.parametrize(
    "cls, message",
    [
        (SignError, r"a step down the loss lowers the chosen log-ratio of pair 0 \(d loss / d pc = \+0.0125\); check the sign"),
        (SummedLoss, r"loss 2.6\d+ is not the mean of the per-pair losses \(0.6\d+\) on ordinary inputs"),
        (MixesPairs, r"per-pair losses mix pairs: changing the inputs of pair 0 changed the loss of pair 1"),
    ],
)
def test_wrong_math_is_caught(cls, message):
    with pytest.raises(AssertionError, match=message):
        check_loss(cls)


def test_stated_reduction_and_sign_exemption_are_honoured():
    check_loss(type("Summed", (SummedLoss,), {"name": "summed2", "reduction": "sum"}))
    check_loss(type("Exempt", (SignError,), {"name": "exempt", "sign_exempt": "a test of the exemption"}))
    with pytest.raises(AssertionError, match="sign_exempt must be None or the reason"):
        check_loss(type("Blank", (SignError,), {"name": "blank", "sign_exempt": " "}))


def test_config_dependent_needs_are_checked_per_listed_config():
    check_loss(DPO)  # default and its example reference_free=True
    broken = type("BrokenFree", (DPO,), {"name": "broken_free", "needs": property(lambda self: Reference.NONE)})
    with pytest.raises(AssertionError, match=r"BrokenFree \('broken_free'\): on ordinary inputs .*ref_chosen_logps is required"):
        check_loss(broken)
    with pytest.raises(AssertionError, match=r"with \{'beta': 0.1, 'label_smoothing': 0.0, 'reference_free': False, 'f_divergence_type': 'reverse_kl', 'f_alpha_divergence_coef': 0.5\}: on ordinary"):
        check_loss(broken, configs=[{"reference_free": True}, {"reference_free": False}])


def test_not_a_loss_is_caught():
    with pytest.raises(AssertionError, match="not a registrable loss"):
        check_loss(dict)  # type: ignore[arg-type]


def test_invalid_given_config_is_reported():
    with pytest.raises(AssertionError, match="the given config is invalid: beta: Input should be greater than 0"):
        check_loss(Good, {"beta": -1.0})


def test_registered_makes_a_loss_selectable_only_inside_the_block():
    with pytest.raises(ConfigError, match="unknown loss 'good'"):
        build_loss({"name": "good"})
    with registered(Good, NaiveLogSigmoid):
        loss = build_loss({"name": "good", "beta": 0.5})
        assert isinstance(loss, Good) and loss.config.beta == 0.5
        assert get_registry().losses["naive"].cls is NaiveLogSigmoid
        with registered(DPO):  # re-registering a class already there is not a clash
            assert build_loss({"name": "dpo"}).__class__ is DPO
    assert "good" not in get_registry().losses and "naive" not in get_registry().losses
    with pytest.raises(ConfigError, match="unknown loss 'good'"):
        build_loss({"name": "good"})
