"""IPO (Azar et al. 2023): a squared loss that pulls the log-ratio margin to 1 / (2 tau)."""
from __future__ import annotations

from pydantic import Field

from prefopt.losses.base import Loss, LossConfig, LossInputs, LossOutput, Reference, log_ratios, reward_metrics


class IPOConfig(LossConfig):
    tau: float = Field(0.1, gt=0, description="Regularisation strength; the target margin is 1 / (2 tau).")
    average_log_probs: bool = Field(
        True,
        description="Average log-ratios over completion tokens (TRL's default); false sums them (the DPO reference repo).",
    )


class IPO(Loss):
    """``(h - 1/(2 tau))^2`` on token-averaged (default) or summed log-ratios."""

    name = "ipo"
    Config = IPOConfig
    reference = Reference.LOGPS

    def forward(self, inputs: LossInputs) -> LossOutput:
        tau = self.config.tau
        chosen, rejected = log_ratios(inputs)
        if self.config.average_log_probs:
            n_chosen, n_rejected = inputs.lengths()
            h = chosen / n_chosen - rejected / n_rejected
        else:
            h = chosen - rejected
        losses = (h - 1 / (2 * tau)) ** 2
        return LossOutput(losses.mean(), losses, reward_metrics(tau * chosen, tau * rejected, inputs))
