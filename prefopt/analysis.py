"""Inspecting what a trained policy learned: the per-token implicit reward."""
from __future__ import annotations

import torch


def token_rewards(
    policy_token_logps: torch.Tensor, ref_token_logps: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """``beta * (log pi_theta(y_t) - log pi_ref(y_t))`` per token, 0 where ``mask`` is 0.

    The token-level implicit reward of DPO ("From r to Q*", Rafailov et al. 2024);
    summed over a completion's tokens it is the sequence reward that ``rewards/chosen``
    reports. Inputs share one shape, e.g. ``(batch, seq)``; masked positions may hold
    anything (even -inf) and still give 0. Call under ``torch.no_grad()`` to inspect.
    """
    if policy_token_logps.shape != ref_token_logps.shape or policy_token_logps.shape != mask.shape:
        raise ValueError(
            f"token_rewards: shapes differ: policy {tuple(policy_token_logps.shape)}, "
            f"reference {tuple(ref_token_logps.shape)}, mask {tuple(mask.shape)}"
        )
    rewards = beta * (policy_token_logps - ref_token_logps)
    return torch.where(mask.bool(), rewards, torch.zeros_like(rewards))
