"""Robust DPO (Chowdhury et al. 2024): DPO made unbiased under a known rate of flipped labels."""
from __future__ import annotations

from pydantic import Field

import prefopt
from prefopt.losses.base import Loss, LossConfig, LossInputs, LossOutput, Reference, log_ratios, preference_loss, reward_metrics
from prefopt.losses.fdivergence import FAlphaCoef, FDivergenceType, f_scores


class RobustDPOConfig(LossConfig):
    beta: float = Field(0.1, gt=0, description="Inverse temperature, as in DPO.")
    label_smoothing: float = Field(
        0.1, ge=0, lt=0.5, description="Assumed fraction eps of flipped preference labels; 0 is plain DPO."
    )
    f_divergence_type: FDivergenceType = "reverse_kl"
    f_alpha_divergence_coef: FAlphaCoef = 0.5


class RobustDPO(Loss):
    """``((1 - eps) * l(beta h) - eps * l(-beta h)) / (1 - 2 eps)`` with ``l(x) = -logsigmoid(x)`` (TRL's ``robust``).

    ``h`` is the log-ratio margin, or the f-divergence score difference.
    """

    name = "robust"
    Config = RobustDPOConfig
    reference = Reference.LOGPS

    def forward(self, inputs: LossInputs) -> LossOutput:
        beta, eps = self.config.beta, self.config.label_smoothing
        chosen, rejected = log_ratios(inputs)
        score_chosen, score_rejected = f_scores(chosen, rejected, self.config)
        logits = beta * (score_chosen - score_rejected)
        losses = ((1 - eps) * preference_loss(logits) - eps * preference_loss(-logits)) / (1 - 2 * eps)
        return LossOutput(losses.mean(), losses, reward_metrics(beta * chosen, beta * rejected, inputs))


@prefopt.hookimpl
def register_losses() -> list[type]:
    return [RobustDPO]
