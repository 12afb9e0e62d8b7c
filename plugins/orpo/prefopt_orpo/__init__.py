"""ORPO (Hong et al. 2024): NLL on the chosen completion plus an odds-ratio term, no reference model."""
from __future__ import annotations

import math

import torch
from pydantic import Field

import prefopt
from prefopt.losses.base import Loss, LossConfig, LossInputs, LossOutput, Reference, preference_loss, reward_metrics

# A mean log-prob of exactly 0 (probability 1) has infinite odds; cap it just below.
MAX_MEAN_LOGP = -1e-6


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 - p))`` for ``p = exp(mean_logp)``, finite for every ``mean_logp <= 0``.

    ``log(1 - p)`` is ``log(-expm1(x))`` near 0 and ``log1p(-exp(x))`` further out,
    the accurate choice on each side of ``-log 2`` (Maechler 2012).
    """
    x = mean_logp.clamp(max=MAX_MEAN_LOGP)
    log1mexp = torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return x - log1mexp


class ORPOConfig(LossConfig):
    beta: float = Field(
        0.1, gt=0, description="Weight of the odds-ratio term against the NLL (lambda in the paper, beta in TRL's ORPOConfig)."
    )


class ORPO(Loss):
    """``-pc/|y_w| + beta * -logsigmoid(log_odds(y_w) - log_odds(y_l))`` on mean per-token log-probs."""

    name = "orpo"
    Config = ORPOConfig
    reference = Reference.NONE

    def forward(self, inputs: LossInputs) -> LossOutput:
        beta = self.config.beta
        n_chosen, n_rejected = inputs.lengths()
        chosen = inputs.policy_chosen_logps / n_chosen
        rejected = inputs.policy_rejected_logps / n_rejected
        ratio = log_odds(chosen) - log_odds(rejected)
        nll = -chosen
        losses = nll + beta * preference_loss(ratio)
        metrics = reward_metrics(beta * chosen, beta * rejected, inputs)
        metrics["nll/chosen"] = nll.detach().mean()
        metrics["log_odds_ratio"] = -preference_loss(ratio).detach().mean()  # TRL's names
        metrics["log_odds_chosen"] = ratio.detach().mean()
        return LossOutput(losses.mean(), losses, metrics)


@prefopt.hookimpl
def register_losses() -> list[type]:
    return [ORPO]
