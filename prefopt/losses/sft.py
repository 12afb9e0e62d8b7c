"""Negative log-likelihood of the chosen completion, for weighted combinations (e.g. RPO)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from prefopt.losses.base import Loss, LossConfig, LossInputs, LossOutput, Reference


class SFTConfig(LossConfig):
    normalize: Literal["sequence", "token"] = Field(
        "sequence",
        description="sequence: mean of each chosen completion's per-token NLL; token: mean over every chosen token "
        "of the batch (TRL's loss_type='sft'), which ties each pair's share to the batch's token count.",
    )


class SFT(Loss):
    """Mean per-token NLL of each chosen completion, averaged over pairs; or over all chosen tokens (TRL)."""

    name = "sft"
    Config = SFTConfig
    reference = Reference.NONE
    examples = ({"normalize": "token"},)

    @property
    def couples_pairs(self) -> bool:  # type: ignore[override]
        return self.config.normalize == "token"

    def forward(self, inputs: LossInputs) -> LossOutput:
        n_chosen, _ = inputs.lengths()
        if self.config.normalize == "token":  # -sum(pc) / sum(|y_w|), spread so that losses.mean() is that
            tokens = inputs.chosen_tokens.to(n_chosen.dtype)
            share = (tokens > 0) * (n_chosen.numel() / tokens.sum().clamp(min=1))  # an empty completion has no token
            losses = -inputs.policy_chosen_logps * share
        else:
            losses = -inputs.policy_chosen_logps / n_chosen
        metrics = {"nll/chosen": losses.detach().mean(), "logps/chosen": inputs.policy_chosen_logps.detach().mean()}
        return LossOutput(losses.mean(), losses, metrics)
