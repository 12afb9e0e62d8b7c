"""IPO (Azar et al. 2023): a squared loss that pulls the log-ratio margin to 1 / (2 tau)."""
from __future__ import annotations

from pydantic import AliasChoices, Field

from prefopt.losses.base import Loss, LossConfig, LossInputs, LossOutput, Reference, log_ratios, reward_metrics
from prefopt.losses.fdivergence import FAlphaCoef, FDivergenceType, f_scores


class IPOConfig(LossConfig):
    tau: float = Field(
        0.1, gt=0, validation_alias=AliasChoices("tau", "beta"),
        description="Regularisation strength; the target margin is 1 / (2 tau). TRL's name for it, beta, is accepted.",
    )
    average_log_probs: bool = Field(
        True,
        description="Average log-ratios over completion tokens (TRL's default); false sums them (the DPO reference repo).",
    )
    f_divergence_type: FDivergenceType = "reverse_kl"
    f_alpha_divergence_coef: FAlphaCoef = 0.5


class IPO(Loss):
    """``(h - 1/(2 tau))^2`` on token-averaged (default) or summed log-ratios (or f-divergence scores)."""

    name = "ipo"
    Config = IPOConfig
    reference = Reference.LOGPS

    def forward(self, inputs: LossInputs) -> LossOutput:
        tau = self.config.tau
        chosen, rejected = log_ratios(inputs)
        score_chosen, score_rejected = f_scores(chosen, rejected, self.config)
        if self.config.average_log_probs:
            n_chosen, n_rejected = inputs.lengths()
            h = score_chosen / n_chosen - score_rejected / n_rejected
        else:
            h = score_chosen - score_rejected
        losses = (h - 1 / (2 * tau)) ** 2
        return LossOutput(losses.mean(), losses, reward_metrics(tau * chosen, tau * rejected, inputs))
