"""Token-level DPO (Zeng et al. 2024): DPO with a sequential KL term per completion."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from prefopt.losses.base import Feature, Loss, LossConfig, LossInputs, LossOutput, log_ratios, preference_loss, reward_metrics


class TDPOConfig(LossConfig):
    variant: Literal["tdpo1", "tdpo2"] = Field(
        description="tdpo1: the KL difference enters as is; tdpo2: scaled by alpha, no gradient through the chosen KL."
    )
    beta: float = Field(0.1, gt=0, description="Inverse temperature, as in DPO.")
    alpha: float = Field(0.5, ge=0, description="Weight of the KL difference (tdpo2 only).")


class TDPO(Loss):
    """``-logsigmoid(beta * ((m_w - m_l) - delta))`` with delta the sequential-KL difference."""

    name = "tdpo"
    Config = TDPOConfig
    features = frozenset({Feature.REF_LOGPS, Feature.KL})  # KL: a live reference

    def forward(self, inputs: LossInputs) -> LossOutput:
        beta = self.config.beta
        chosen, rejected = log_ratios(inputs)
        kl_chosen, kl_rejected = inputs.require("chosen_kl", "rejected_kl")
        if self.config.variant == "tdpo1":
            delta = kl_rejected - kl_chosen
        else:
            delta = self.config.alpha * (kl_rejected - kl_chosen.detach())
        losses = preference_loss(beta * ((chosen - rejected) - delta))
        metrics = reward_metrics(beta * (chosen + kl_chosen), beta * (rejected + kl_rejected), inputs)
        metrics["kl/chosen"] = kl_chosen.detach().mean()
        metrics["kl/rejected"] = kl_rejected.detach().mean()
        metrics["kl/margin"] = (kl_rejected - kl_chosen).detach().mean()
        return LossOutput(losses.mean(), losses, metrics)
