"""SLiC (Zhao et al. 2023): a hinge on the log-ratio margin against a reference model; TRL's ``hinge``."""
from __future__ import annotations

import torch
from pydantic import Field

import prefopt
from prefopt.losses.base import Loss, LossConfig, LossInputs, LossOutput, Reference, log_ratios, reward_metrics
from prefopt.losses.fdivergence import FAlphaCoef, FDivergenceType, f_scores


class SLiCConfig(LossConfig):
    beta: float = Field(0.1, gt=0, description="Scale of the margin h; the hinge is 0 once h >= 1 / beta.")
    f_divergence_type: FDivergenceType = "reverse_kl"
    f_alpha_divergence_coef: FAlphaCoef = 0.5


class SLiC(Loss):
    """``relu(1 - beta * h)`` with ``h = (pc - rc) - (pr - rr)``, or the f-divergence score difference."""

    name = "slic"
    Config = SLiCConfig
    reference = Reference.LOGPS

    def forward(self, inputs: LossInputs) -> LossOutput:
        beta = self.config.beta
        chosen, rejected = log_ratios(inputs)
        score_chosen, score_rejected = f_scores(chosen, rejected, self.config)
        losses = torch.relu(1 - beta * (score_chosen - score_rejected))
        return LossOutput(losses.mean(), losses, reward_metrics(beta * chosen, beta * rejected, inputs))


class Hinge(SLiC):
    """The same loss under TRL's name, ``loss_type="hinge"``."""

    name = "hinge"


@prefopt.hookimpl
def register_losses() -> list[type]:
    return [SLiC, Hinge]
