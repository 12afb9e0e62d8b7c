"""SimPO (Meng et al. 2024): reference-free, length-normalised preference loss."""
from __future__ import annotations

from pydantic import Field

import prefopt
from prefopt.losses.base import Loss, LossConfig, LossInputs, LossOutput, Reference, preference_loss, reward_metrics


class SimPOConfig(LossConfig):
    beta: float = Field(2.0, gt=0, description="Scale of the reward, the mean per-token log-prob of a completion.")
    gamma: float = Field(
        0.5,
        ge=0,
        description="Target reward margin, in reward units (the paper's gamma, TRL's simpo_gamma); "
        "recipes that give gamma_beta_ratio mean gamma = gamma_beta_ratio * beta.",
    )


class SimPO(Loss):
    """``-logsigmoid(beta * (pc/|y_w| - pr/|y_l|) - gamma)``: no reference model at all."""

    name = "simpo"
    Config = SimPOConfig
    reference = Reference.NONE

    def forward(self, inputs: LossInputs) -> LossOutput:
        beta = self.config.beta
        n_chosen, n_rejected = inputs.lengths()
        chosen = beta * inputs.policy_chosen_logps / n_chosen
        rejected = beta * inputs.policy_rejected_logps / n_rejected
        losses = preference_loss(chosen - rejected - self.config.gamma)
        return LossOutput(losses.mean(), losses, reward_metrics(chosen, rejected, inputs))


@prefopt.hookimpl
def register_losses() -> list[type]:
    return [SimPO]
