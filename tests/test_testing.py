"""prefopt.testing: the conformance check passes every built-in loss and catches broken ones."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import Field

from prefopt import Loss, LossConfig, LossInputs, LossOutput, Reference, build_loss
from prefopt.errors import ConfigError
from prefopt.losses import DPO, IPO, SFT, TDPO
from prefopt.losses.base import ref_logps, reward_metrics
from prefopt.registry import get_registry
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
        (ReadsUndeclaredReference, r"declares needs=NONE.*ref_chosen_logps is required"),
        (DeclaresUnusedReference, r"declares needs=LOGPS but .* does not use the reference"),
        (NaiveLogSigmoid, r"non-finite loss on extreme log-ratio"),
        (UnclampedLengths, r"non-finite loss on zero-token completion"),
        (ScalarLosses, r"per-pair losses must have shape \(4,\), got \(\)"),
        (NoRewardMetrics, r"must report the metrics rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies"),
        (AttachedMetric, r"metric 'loss/raw' must be detached"),
        (UndocumentedConfig, r"config fields without a description: beta"),
        (PermissiveConfig, r"must forbid unknown keys"),
    ],
)
def test_broken_losses_are_caught(cls, message):
    with pytest.raises(AssertionError, match=message):
        check_loss(cls)


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
