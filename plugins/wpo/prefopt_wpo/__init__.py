"""WPO (Zhou et al. 2024): DPO with each pair weighted by the policy's own probability of it."""
from __future__ import annotations

import torch
from pydantic import Field

import prefopt
from prefopt.losses.base import Feature, Loss, LossConfig, LossInputs, LossOutput, log_ratios, preference_loss, reward_metrics


class WPOConfig(LossConfig):
    beta: float = Field(0.1, gt=0, description="Inverse temperature, as in DPO.")


class WPO(Loss):
    """``w_w * w_l * -logsigmoid(beta * h)``, ``w = exp(mean_t(log p_t - log sum_v p_v^2))``, no gradient through ``w``.

    ``w`` is a completion's geometric-mean token probability, normalised by the policy's
    ``sum_v p_v^2`` at each position (WPO eq. 2; TRL's ``use_weighting=True``).
    """

    name = "wpo"
    Config = WPOConfig
    features = frozenset({Feature.REF_LOGPS, Feature.POLICY_TOKEN_LOGPS, Feature.TOKEN_LOGSUMSQ})

    def forward(self, inputs: LossInputs) -> LossOutput:
        beta = self.config.beta
        logps, logsumsq = inputs.policy_token_logps, inputs.token_logsumsq
        with torch.no_grad():
            mean_c, mean_r = logps.like(logps.values - logsumsq.values).mean()
            weights = torch.exp(mean_c + mean_r)  # w_w * w_l
        chosen, rejected = log_ratios(inputs)
        losses = weights * preference_loss(beta * (chosen - rejected))
        metrics = reward_metrics(beta * chosen, beta * rejected, inputs)
        metrics["wpo/weight"] = weights.mean()
        return LossOutput(losses.mean(), losses, metrics)


@prefopt.hookimpl
def register_losses() -> list[type]:
    return [WPO]
