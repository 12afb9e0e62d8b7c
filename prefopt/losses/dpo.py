"""DPO (Rafailov et al. 2023), with conservative label smoothing, a reference-free option and f-DPO scores.

``sigmoid`` is the same loss under TRL's name, with TRL 1.16's parameters.
"""
from __future__ import annotations

import pydantic
from pydantic import Field

from prefopt.losses.base import (
    LEGACY_NEEDS,
    Feature,
    Loss,
    LossConfig,
    LossInputs,
    LossOutput,
    Reference,
    log_ratios,
    preference_loss,
    reward_metrics,
)
from prefopt.losses.fdivergence import FAlphaCoef, FDivergenceType, f_scores


class DPOConfig(LossConfig):
    beta: float = Field(0.1, gt=0, description="Inverse temperature: strength of the implicit KL penalty.")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Fraction of flipped labels assumed (conservative DPO); 0 is plain DPO."
    )
    reference_free: bool = Field(False, description="Use a uniform reference (no reference model at all).")
    f_divergence_type: FDivergenceType = "reverse_kl"
    f_alpha_divergence_coef: FAlphaCoef = 0.5


class DPO(Loss):
    """``-logsigmoid(beta * h)`` with ``h = (pc - rc) - (pr - rr)``, or the f-divergence score difference."""

    name = "dpo"
    Config = DPOConfig
    reference = Reference.LOGPS
    examples = ({"reference_free": True},)

    @property
    def needs(self) -> frozenset[Feature]:
        return LEGACY_NEEDS[Reference.NONE if self.config.reference_free else Reference.LOGPS]

    def forward(self, inputs: LossInputs) -> LossOutput:
        beta = self.config.beta
        chosen, rejected = log_ratios(inputs, self.config.reference_free)
        score_chosen, score_rejected = f_scores(chosen, rejected, self.config)
        losses = preference_loss(beta * (score_chosen - score_rejected), self.config.label_smoothing)
        return LossOutput(losses.mean(), losses, reward_metrics(beta * chosen, beta * rejected, inputs))


class SigmoidConfig(DPOConfig):
    @pydantic.field_validator("label_smoothing")
    @classmethod
    def _no_smoothing(cls, value: float) -> float:
        if value != 0.0:
            raise ValueError("TRL 1.16's 'sigmoid' loss has no label smoothing; select 'dpo' for conservative DPO (cDPO)")
        return value


class Sigmoid(DPO):
    """DPO under TRL's ``loss_type="sigmoid"``; like TRL 1.16, no label smoothing."""

    name = "sigmoid"
    Config = SigmoidConfig
