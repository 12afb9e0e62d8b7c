"""SLiC (Zhao et al. 2023): a hinge on the log-ratio margin against a reference model."""
from __future__ import annotations

import torch
from pydantic import Field

import prefopt
from prefopt.losses.base import Loss, LossConfig, LossInputs, LossOutput, Reference, log_ratios, reward_metrics


class SLiCConfig(LossConfig):
    beta: float = Field(0.1, gt=0, description="Scale of the margin h; the hinge is 0 once h >= 1 / beta.")


class SLiC(Loss):
    """``relu(1 - beta * h)`` with ``h = (pc - rc) - (pr - rr)`` (TRL's ``hinge``)."""

    name = "slic"
    Config = SLiCConfig
    reference = Reference.LOGPS

    def forward(self, inputs: LossInputs) -> LossOutput:
        beta = self.config.beta
        chosen, rejected = log_ratios(inputs)
        chosen, rejected = beta * chosen, beta * rejected
        losses = torch.relu(1 - (chosen - rejected))
        return LossOutput(losses.mean(), losses, reward_metrics(chosen, rejected, inputs))


@prefopt.hookimpl
def register_losses() -> list[type]:
    return [SLiC]
