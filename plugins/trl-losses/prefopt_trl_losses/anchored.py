"""Losses of each completion's own reward ``r = beta * (log pi - log pi_ref)``: NCA, BCO, SPPO, APO.

They anchor chosen and rejected separately, not only their difference, so TRL offers them
with the reverse KL only (no ``f_divergence_type``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from prefopt.losses.base import Loss, LossConfig, LossInputs, LossOutput, Reference, log_ratios, reward_metrics


class BetaConfig(LossConfig):
    beta: float = Field(0.1, gt=0, description="Inverse temperature: r = beta * log-ratio.")


class _Anchored(Loss):
    """Computes ``losses(r_w, r_l)`` from the rewards; subclasses define :meth:`pair_loss`."""

    Config = BetaConfig
    reference = Reference.LOGPS

    def pair_loss(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, inputs: LossInputs) -> LossOutput:
        chosen, rejected = log_ratios(inputs)
        chosen, rejected = self.config.beta * chosen, self.config.beta * rejected
        losses = self.pair_loss(chosen, rejected)
        return LossOutput(losses.mean(), losses, reward_metrics(chosen, rejected, inputs))


class NCAPair(_Anchored):
    """NCA (Chen et al. 2024), pairwise: ``-logsigmoid(r_w) - logsigmoid(-r_w) / 2 - logsigmoid(-r_l) / 2``."""

    name = "nca_pair"

    def pair_loss(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


class BCOPair(_Anchored):
    """BCO (Jung et al. 2024) on pairs, without its reward shift: ``-logsigmoid(r_w) - logsigmoid(-r_l)``."""

    name = "bco_pair"

    def pair_loss(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        return -F.logsigmoid(chosen) - F.logsigmoid(-rejected)


class SPPOHard(_Anchored):
    """SPPO (Wu et al. 2024) with hard win probabilities: ``(r_w - 1/2)^2 + (r_l + 1/2)^2``, over beta^2.

    TRL's form ``(u_w - 1/(2 beta))^2 + (u_l + 1/(2 beta))^2`` on log-ratios ``u``.
    """

    name = "sppo_hard"

    def pair_loss(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        return ((chosen - 0.5) ** 2 + (rejected + 0.5) ** 2) / self.config.beta**2


class APOZero(_Anchored):
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7): ``1 - sigmoid(r_w) + sigmoid(r_l)``; chosen better than the policy."""

    name = "apo_zero"

    def pair_loss(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        return 1 - torch.sigmoid(chosen) + torch.sigmoid(rejected)


class APODown(_Anchored):
    """APO-down (eq. 8): ``sigmoid(r_w) + 1 - sigmoid(r_w - r_l)``; chosen worse than the policy, rejected worse still."""

    name = "apo_down"

    def pair_loss(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(chosen) + 1 - torch.sigmoid(chosen - rejected)
