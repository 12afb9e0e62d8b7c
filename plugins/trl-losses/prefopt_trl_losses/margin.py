"""Losses of the f-divergence score margin ``delta = s(chosen) - s(rejected)``: EXO, DiscoPOP, normalised sigmoid.

``s`` is the log-ratio under TRL's default ``reverse_kl``, another f-divergence's score otherwise.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from prefopt.losses.base import Loss, LossConfig, LossInputs, LossOutput, Reference, log_ratios, reward_metrics
from prefopt.losses.fdivergence import FAlphaCoef, FDivergenceType, f_scores


class MarginConfig(LossConfig):
    beta: float = Field(0.1, gt=0, description="Inverse temperature: scale of the score margin.")
    f_divergence_type: FDivergenceType = "reverse_kl"
    f_alpha_divergence_coef: FAlphaCoef = 0.5


def _margin(loss: Loss, inputs: LossInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``beta * delta`` and the chosen and rejected log-ratios."""
    chosen, rejected = log_ratios(inputs)
    score_chosen, score_rejected = f_scores(chosen, rejected, loss.config)
    return loss.config.beta * (score_chosen - score_rejected), chosen, rejected


class EXOPairConfig(MarginConfig):
    label_smoothing: float = Field(1e-3, gt=0, lt=0.5, description="epsilon: the target puts 1 - epsilon on chosen (the paper: 1e-3).")


class EXOPair(Loss):
    """EXO (Ji et al. 2024, eq. 16): ``KL(q || p)`` with ``q = softmax(beta * s)`` over the pair, ``p = (1 - eps, eps)``."""

    name = "exo_pair"
    Config = EXOPairConfig
    reference = Reference.LOGPS

    def forward(self, inputs: LossInputs) -> LossOutput:
        x, chosen, rejected = _margin(self, inputs)
        eps = self.config.label_smoothing
        losses = torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps)) + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps))
        beta = self.config.beta
        return LossOutput(losses.mean(), losses, reward_metrics(beta * chosen, beta * rejected, inputs))


class DiscoPOPConfig(MarginConfig):
    discopop_tau: float = Field(
        0.05, gt=0, le=1, description="Temperature of the blend (the paper: 0.05); at most 1, or the loss grows exponentially in a wrong margin."
    )


class DiscoPOP(Loss):
    """DiscoPOP (Lu et al. 2024, eq. 5): ``(1 - m) * -logsigmoid(x) + m * exp(-x)``, ``m = sigmoid(x / tau)``, ``x = beta * delta``."""

    name = "discopop"
    Config = DiscoPOPConfig
    reference = Reference.LOGPS
    sign_exempt = ("the log-ratio modulation makes the loss rise with the margin at 0 when discopop_tau < (1 - ln 2) / 3, "
                   "the paper's default 0.05 included: a property of the discovered objective")

    def forward(self, inputs: LossInputs) -> LossOutput:
        x, chosen, rejected = _margin(self, inputs)
        tau = self.config.discopop_tau
        # m * exp(-x) as exp(-x + log m): finite where exp(-x) alone overflows and m is 0
        losses = -F.logsigmoid(x) * torch.sigmoid(-x / tau) + torch.exp(F.logsigmoid(x / tau) - x)
        beta = self.config.beta
        return LossOutput(losses.mean(), losses, reward_metrics(beta * chosen, beta * rejected, inputs))


class SigmoidNorm(Loss):
    """DPO on length-normalised scores: ``-logsigmoid(beta * (s_w / |y_w| - s_l / |y_l|))`` (TRL's ``sigmoid_norm``)."""

    name = "sigmoid_norm"
    Config = MarginConfig
    reference = Reference.LOGPS

    def forward(self, inputs: LossInputs) -> LossOutput:
        beta = self.config.beta
        chosen, rejected = log_ratios(inputs)
        score_chosen, score_rejected = f_scores(chosen, rejected, self.config)
        n_chosen, n_rejected = inputs.lengths()
        losses = -F.logsigmoid(beta * (score_chosen / n_chosen - score_rejected / n_rejected))
        return LossOutput(losses.mean(), losses, reward_metrics(beta * chosen, beta * rejected, inputs))
