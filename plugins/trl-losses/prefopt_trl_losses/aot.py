"""AOT (Melnyk et al. 2024): distributional alignment by optimal transport, sorting across the batch.

Both losses compare sorted batches, so each pair's loss depends on the others (``couples_pairs``).
"""
from __future__ import annotations

import torch
from pydantic import Field

from prefopt.losses.base import Loss, LossConfig, LossInputs, LossOutput, Reference, log_ratios, preference_loss, reward_metrics


class AOTConfig(LossConfig):
    beta: float = Field(0.1, gt=0, description="Inverse temperature, as in DPO.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Fraction of flipped labels assumed, as in conservative DPO.")


class AOT(Loss):
    """``l(beta * (sort(pc - pr) - sort(rc - rr)))``: the policy's margins dominate the reference's, in distribution."""

    name = "aot"
    Config = AOTConfig
    reference = Reference.LOGPS
    couples_pairs = True

    def forward(self, inputs: LossInputs) -> LossOutput:
        rc, rr = inputs.require("ref_chosen_logps", "ref_rejected_logps")
        policy, _ = torch.sort(inputs.policy_chosen_logps - inputs.policy_rejected_logps)
        ref, _ = torch.sort(rc - rr)
        return _output(self, policy - ref, inputs)


class AOTUnpaired(Loss):
    """``l(beta * (sort(pc - rc) - sort(pr - rr)))``: chosen log-ratios dominate rejected ones, in distribution."""

    name = "aot_unpaired"
    Config = AOTConfig
    reference = Reference.LOGPS
    couples_pairs = True

    def forward(self, inputs: LossInputs) -> LossOutput:
        chosen, rejected = log_ratios(inputs)
        return _output(self, torch.sort(chosen)[0] - torch.sort(rejected)[0], inputs)


def _output(loss: Loss, delta: torch.Tensor, inputs: LossInputs) -> LossOutput:
    beta = loss.config.beta
    losses = preference_loss(beta * delta, loss.config.label_smoothing)  # one per rank, not per pair
    chosen, rejected = log_ratios(inputs)
    return LossOutput(losses.mean(), losses, reward_metrics(beta * chosen, beta * rejected, inputs))
