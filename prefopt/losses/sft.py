"""Negative log-likelihood of the chosen completion, for weighted combinations (e.g. RPO)."""
from __future__ import annotations

from prefopt.losses.base import Loss, LossConfig, LossInputs, LossOutput, Reference


class SFT(Loss):
    """Mean per-token NLL of each chosen completion, averaged over pairs."""

    name = "sft"
    Config = LossConfig
    reference = Reference.NONE

    def forward(self, inputs: LossInputs) -> LossOutput:
        n_chosen, _ = inputs.lengths()
        losses = -inputs.policy_chosen_logps / n_chosen
        metrics = {"nll/chosen": losses.detach().mean(), "logps/chosen": inputs.policy_chosen_logps.detach().mean()}
        return LossOutput(losses.mean(), losses, metrics)
