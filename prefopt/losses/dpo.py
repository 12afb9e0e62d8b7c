"""DPO (Rafailov et al. 2023), with conservative label smoothing and a reference-free option."""
from __future__ import annotations

from pydantic import Field

from prefopt.losses.base import LEGACY_NEEDS, Feature, Loss, LossConfig, LossInputs, LossOutput, Reference, log_ratios, preference_loss, reward_metrics


class DPOConfig(LossConfig):
    beta: float = Field(0.1, gt=0, description="Inverse temperature: strength of the implicit KL penalty.")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Fraction of flipped labels assumed (conservative DPO); 0 is plain DPO."
    )
    reference_free: bool = Field(False, description="Use a uniform reference (no reference model at all).")


class DPO(Loss):
    """``-logsigmoid(beta * h)`` with ``h = (pc - rc) - (pr - rr)``."""

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
        losses = preference_loss(beta * (chosen - rejected), self.config.label_smoothing)
        return LossOutput(losses.mean(), losses, reward_metrics(beta * chosen, beta * rejected, inputs))
