"""Plackett-Luce: the DPO objective over a ranking of K completions (Rafailov et al. 2023, appendix A.3)."""
from __future__ import annotations

import torch
from pydantic import Field

import prefopt
from prefopt.losses.base import Loss, LossConfig, LossInputs, LossOutput, Reference, ranking_metrics


class PlackettLuceConfig(LossConfig):
    beta: float = Field(0.1, gt=0, description="Inverse temperature: strength of the implicit KL penalty, as in DPO.")


def plackett_luce(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``-sum_k log(exp(r_k) / sum_{j >= k} exp(r_j))`` per row of ``rewards (B, K)`` in ranked order, over the slots
    where ``mask`` is True (masked slots take no part; the last valid term is log 1 = 0)."""
    k = rewards.shape[-1]
    idx = torch.arange(k, device=rewards.device)
    later = idx[None, :] >= idx[:, None]  # [k, j]: j is ranked at or below k
    allowed = (later[None] & mask[:, None, :]) | torch.eye(k, dtype=torch.bool, device=rewards.device)[None]
    r = torch.where(mask, rewards, 0.0)  # a masked slot keeps its own term finite; its term is dropped below
    tail = torch.logsumexp(torch.where(allowed, r[:, None, :], float("-inf")), dim=-1)
    return -torch.where(mask, r - tail, 0.0).sum(-1)


class PlackettLuce(Loss):
    """``-sum_k log softmax(r_k, r_{k+1}, ..., r_K)`` with ``r = beta * (log pi - log pi_ref)``, best first.

    A pair is a ranking of two, where this is DPO exactly. Tied scores keep the order the row lists them in.
    """

    name = "plackett_luce"
    Config = PlackettLuceConfig
    reference = Reference.LOGPS
    takes = frozenset({"pairs", "rankings"})

    def forward(self, inputs: LossInputs) -> LossOutput:
        policy, ref, mask = inputs.groups()
        rewards = self.config.beta * (policy - ref)
        losses = plackett_luce(rewards, mask)
        return LossOutput(losses.mean(), losses, ranking_metrics(rewards, inputs))


@prefopt.hookimpl
def register_losses() -> list[type]:
    return [PlackettLuce]
